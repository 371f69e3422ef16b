"""A real two-node Slurm cluster on this machine, for the tests of slurm/*.sh (no mocks).

Debian's slurm-wlm is built with MULTIPLE_SLURMD, so one slurmctld and two slurmd daemons, all on 127.0.0.1,
make a cluster with nodes n1 and n2 (../shared/DESIGN.md, "A real Slurm cluster on one machine"). Everything
lives in one temporary directory: slurm.conf, state, spool, logs and pid files; the daemons listen on private
ports, so a system Slurm (if any) is untouched. Authentication is off (auth/none, cred/none), which needs root.

    python -m tests.slurm_cluster /tmp/mycluster    # start one by hand; prints the SLURM_CONF to export

The pytest fixture is `slurm_cluster` in tests/test_slurm.py; it starts one cluster per test module.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODES = ("n1", "n2")
PARTITION = "debug"
# Slurm's daemons live in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    pass


def missing_programs() -> list[str]:
    """The Slurm programs this machine lacks (empty: a cluster can be started)."""
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=SEARCH_PATH) is None]


def why_unavailable() -> str | None:
    """None when a local cluster can be started here, else the reason in words."""
    missing = missing_programs()
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found); on Debian/Ubuntu: "
                f"apt-get install slurm-wlm")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons without authentication (auth/none), which needs root"
    return None


def _free_port_block(count: int, start: int = 20000, stop: int = 60000) -> int:
    """The first of `count` consecutive TCP ports that are free now (a random place to start, to keep two test
    sessions on one machine apart)."""
    base = start + (os.getpid() * 7919) % (stop - start - count)
    for offset in range(0, stop - start, count):
        first = start + (base - start + offset) % (stop - start - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("0.0.0.0", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise SlurmError("no block of free TCP ports found")


def parse_record(text: str) -> dict[str, str]:
    """One `scontrol show -o` line as a dict (values may contain spaces only in the last field, Command=...)."""
    record = {}
    for match in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", text.strip()):
        record[match.group(1)] = match.group(2)
    return record


class SlurmCluster:
    """slurmctld + slurmd n1 + slurmd n2 in `root`. `start()`, then `sbatch(...)`, `wait(job)`, `output(job)`;
    `stop()` cancels what still runs and kills the daemons by the pids they wrote."""

    def __init__(self, root: Path, *, cpus: int | None = None, memory_mb: int = 8000):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.hostname = socket.gethostname().split(".")[0]
        self.processes: dict[str, subprocess.Popen] = {}
        self.ctld_port = 0
        self.node_ports: tuple[int, int] = (0, 0)

    # -- configuration ------------------------------------------------------------------------------------

    def write_conf(self) -> Path:
        first = _free_port_block(1 + len(NODES))
        self.ctld_port, self.node_ports = first, (first + 1, first + len(NODES))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a throw-away two-node cluster on this machine.
ClusterName=vaetest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
# No munge: nothing leaves 127.0.0.1, and the daemons run as root.
AuthType=auth/none
CredType=cred/none
# A requeued job may not start again before its old launch credential has expired: cred_expire seconds
# (default 120) after the requeue, shown as Reason=BeginTime in `scontrol show job`. 5 is the least Slurm
# accepts (below it logs "cred_expire=N invalid" and keeps 120).
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Jobs may be requeued (sbatch --requeue, scontrol requeue, the harness's requeue on SIGUSR1).
JobRequeue=1
# New and ended jobs trigger the scheduler at once, but a job whose BeginTime has passed (a requeued one) waits
# for the periodic pass: every second here, not every 60 s.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# Finished jobs stay visible to `scontrol show job` for an hour (no accounting database here).
MinJobAge=3600
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={NODES[0][:-1]}[1-{len(NODES)}] NodeHostname={self.hostname} NodeAddr=127.0.0.1 \
Port={self.node_ports[0]}-{self.node_ports[1]} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODES[0][:-1]}[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP
""")
        return self.conf

    # -- environment and commands -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm commands against this cluster (and nothing of an enclosing Slurm job)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = SEARCH_PATH
        return env

    def run(self, *args: str, check: bool = True, env: dict | None = None, timeout: float = 60,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path = REPO) -> str:
        """Submit (from the repository, as a user would) and return the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` of a job (one record per array task), [] when Slurm does not know it."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            return []
        return [parse_record(line) for line in result.stdout.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        records = self.job(job_id)
        return records[0].get("JobState", "?") if records else "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 180, poll: float = 1.0) -> list[dict[str, str]]:
        """Wait until the job (every task of an array) has ended; its records. Raises on timeout, with the
        job's record and output in the message."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.job(job_id)
            if records and all(r.get("JobState") in TERMINAL_STATES for r in records):
                return records
            if time.monotonic() > deadline:
                details = "\n".join(str(r) for r in records)
                outputs = "\n".join(self.output_of(r)[-3000:] for r in records)
                raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s:\n{details}\n{outputs}")
            time.sleep(poll)

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")

    def output_of(self, record: dict[str, str]) -> str:
        path = Path(record.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""

    def output(self, job_id: str) -> str:
        """The job's output file (every array task's, one after the other)."""
        return "\n".join(self.output_of(r) for r in self.job(job_id))

    # -- life cycle ---------------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.console", "ab")  # noqa: SIM115 - kept open by the child
        # -D: in the foreground, so that the process is ours to wait for; its own session, so that a Ctrl-C
        # meant for pytest does not take the cluster down before the teardown has cancelled the jobs.
        self.processes[name] = subprocess.Popen(list(args), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.write_conf()
        ctld = shutil.which("slurmctld", path=SEARCH_PATH)
        slurmd = shutil.which("slurmd", path=SEARCH_PATH)
        # -c: start clean, with no saved jobs (the state dir is new anyway).
        self._spawn("slurmctld", ctld, "-D", "-c", "-f", str(self.conf))
        for node in NODES:
            self._spawn(f"slurmd-{node}", slurmd, "-D", "-f", str(self.conf), "-N", node)
        try:
            self.wait_for(self._all_idle, timeout, "both nodes idle in sinfo")
        except SlurmError as e:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                             for p in sorted((self.root / "log").iterdir()))
            self.stop()
            raise SlurmError(f"{e}\n{logs}") from None
        return self

    def _all_idle(self) -> bool:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} while starting")
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
        states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
        return result.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def pids(self) -> dict[str, int]:
        """The daemons' pids, as they wrote them to their pid files (falling back on what we started)."""
        pids = {}
        files = {"slurmctld": self.root / "slurmctld.pid", **{f"slurmd-{n}": self.root / f"slurmd-{n}.pid"
                                                             for n in NODES}}
        for name, path in files.items():
            try:
                pids[name] = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                if name in self.processes:
                    pids[name] = self.processes[name].pid
        return pids

    def job_processes(self) -> list[int]:
        """Processes started by this cluster's jobs (they carry our SLURM_CONF in their environment)."""
        needle = f"SLURM_CONF={self.conf}".encode() + b"\0"
        daemons = set(self.pids().values()) | {p.pid for p in self.processes.values()}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons | {os.getpid()}:
                continue
            try:
                if needle in (entry / "environ").read_bytes() + b"\0":
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then end the daemons by their pids (SIGTERM, then SIGKILL) and check they are gone."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--partition", PARTITION, check=False, timeout=10)
            try:
                self.wait_for(lambda: not self.run("squeue", "-h", check=False, timeout=10).stdout.strip(),
                              timeout, "the jobs to end")
            except SlurmError:
                pass
        pids = self.pids()
        for pid in pids.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, pid in pids.items():
            while _alive(pid, self.processes.get(name)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, self.processes.get(name)):
                _signal(pid, signal.SIGKILL)
        # Left-overs of killed jobs (slurmstepd goes with its job, but a job's own stray children may not).
        for pid in self.job_processes():
            _signal(pid, signal.SIGKILL)
        time.sleep(0.2)
        still = {n: p for n, p in pids.items() if _alive(p, self.processes.get(n))}
        strays = self.job_processes()
        if still or strays:
            raise SlurmError(f"could not end the local Slurm cluster: daemons {still}, job processes {strays}")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int, proc: subprocess.Popen | None = None) -> bool:
    if proc is not None and proc.pid == pid:
        return proc.poll() is None  # reaps it when it has exited
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


if __name__ == "__main__":  # start a cluster by hand: python -m tests.slurm_cluster DIR; Ctrl-C stops it
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vae-slurm")
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it cleanly too
    cluster = SlurmCluster(root).start()
    print(f"export SLURM_CONF={cluster.conf}  # PATH needs /usr/sbin for the daemons only", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        print("stopped", flush=True)
