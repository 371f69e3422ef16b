"""slurm/*.sh against a real two-node Slurm cluster started on this machine (tests/slurm_cluster.py): one
training per node, one training across both nodes, preemption by SIGUSR1 and by `scontrol requeue` with exact
resume, and a job-array sweep. CPU only (GPUS_PER_NODE=0), configs/debug.yaml, run directories in tmp_path.

Skipped where slurm-wlm is not installed (or not as root); on CI (CI=true) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, epochs_in, read_jsonl
from .slurm_cluster import SlurmCluster, why_unavailable
from .wandb_records import offline_run_dirs, read_offline_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DEBUG_TRAIN_SIZE = yaml.safe_load((REPO / "configs/debug.yaml").read_text())["data"]["train_subset"]
# A run long enough to be interrupted on purpose: 3 epochs of 20,000 images, about 5 s each on one CPU thread.
LONG = ("train.epochs=3", "data.train_subset=20000", "log.figures=false")


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        if _on_ci():
            pytest.fail(f"CI=true but the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    own_root = len(str(root)) > 60  # slurmd's unix sockets live under the spool dir: their paths must be short
    if own_root:
        root = Path(tempfile.mkdtemp(prefix="vae-slurm-"))
    cluster = SlurmCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _job_env() -> dict[str, str]:
    """What the jobs see besides the cluster: this test's Python environment, CPU only, quiet W&B."""
    in_venv = sys.prefix != sys.base_prefix
    return {
        "VAE_VENV": sys.prefix if in_venv else "",  # the scripts activate it ("" = the python on PATH)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        "VAE_GPUS_PER_NODE": "0",
        "OMP_NUM_THREADS": "1",  # both "nodes" share this machine's cores
        "WANDB_MODE": "disabled",
    }


@pytest.fixture
def job_env():
    return _job_env()


def submit(slurm: SlurmCluster, tmp_path: Path, script: str, *args: str, sbatch_args=(), env=None,
           output: str = "slurm-%x-%j.out") -> str:
    # The scripts' own --output is relative to the submit dir (the repository); tests keep theirs in tmp_path.
    return slurm.sbatch(f"--output={tmp_path / output}", *sbatch_args, script, *args, env=env)


def finished(slurm: SlurmCluster, job: str, timeout: float = 180) -> tuple[dict, str]:
    records = slurm.wait(job, timeout=timeout)
    output = slurm.output(job)
    for record in records:
        assert record["JobState"] == "COMPLETED", f"job {record.get('JobId')}: {record}\n{output[-4000:]}"
    return records[0], output


def wait_until(slurm: SlurmCluster, job: str, condition, what: str, timeout: float = 120) -> None:
    """Poll `condition` while the job runs; fail at once if the job ends first."""
    def check():
        state = slurm.state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(f"job {job} ended ({state}) before {what}:\n{slurm.output(job)}")
        return condition()

    slurm.wait_for(check, timeout, what, poll=0.3)


def assert_finished_run(run: Path, epochs: int) -> dict:
    assert epochs_in(run) == list(range(1, epochs + 1))
    assert (run / "last.pt").is_file()
    assert any((run / "checkpoints").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epoch"] == epochs
    return summary


def test_train_sh_one_node(slurm, tmp_path, job_env, mnist_root):
    """Submitted from inside a GPU allocation (its SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES, which sbatch passes
    on) with --gres=none: the job counts its own GPUs, asked of Slurm, and trains on the CPU."""
    run = tmp_path / "run"
    del job_env["VAE_GPUS_PER_NODE"]
    job_env.update(SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="0,1", SLURM_JOB_GPUS="0,1")
    # --gres=none: the script asks for one GPU, and this cluster has none (as on a CPU-only partition)
    job = submit(slurm, tmp_path, "slurm/train.sh", "configs/debug.yaml", f"run.dir={run}",
                 f"data.root={mnist_root}", sbatch_args=["--gres=none"], env=job_env)
    record, output = finished(slurm, job)
    assert (tmp_path / f"slurm-vae-{job}.out").is_file()  # the script's job name, in the output file name
    assert f"job {job}" in output and f"run dir:    {run}" in output and "configs/debug.yaml" in output
    assert "1 process on the CPU" in output
    summary = assert_finished_run(run, epochs=1)
    assert summary["num_processes"] == 1


def test_srun_of_several_lone_python_processes_is_refused(slurm, tmp_path, job_env, mnist_root):
    """`srun -n 2 python train.py` starts 2 processes without a process group: each would train alone, into
    one run directory. Both stop before training, saying what to run instead."""
    run = tmp_path / "run"
    result = slurm.run("srun", "--nodes=1", "--ntasks=2", sys.executable, "train.py", "--config",
                       "configs/debug.yaml", f"run.dir={run}", f"data.root={mnist_root}", check=False,
                       env=job_env, timeout=180)
    assert result.returncode != 0
    assert "launched as 2 processes but Accelerate sees only one (srun started them)" in result.stderr
    assert "accelerate launch --multi_gpu" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "metrics.jsonl").exists()


def test_train_multinode_sh_one_run_over_two_nodes(slurm, tmp_path, job_env, mnist_root):
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, "slurm/train_multinode.sh", "configs/debug.yaml", f"run.dir={run}",
                 f"data.root={mnist_root}", sbatch_args=["--nodes=2"], env=job_env)
    record, output = finished(slurm, job)
    assert record["NodeList"] == "n[1-2]"
    # each node's launcher got its own machine rank, read on that node
    assert "vae.cluster.launcher --machine_rank 0" in output and "vae.cluster.launcher --machine_rank 1" in output
    summary = assert_finished_run(run, epochs=1)
    assert summary["num_processes"] == 2
    checksums = summary["param_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # one DDP training, not two alone
    for row in read_jsonl(run / "metrics.jsonl"):
        assert len(row["samples_per_rank"]) == 2 and sum(row["samples_per_rank"]) == DEBUG_TRAIN_SIZE


# The ways a running job gets interrupted. Each takes a minute (two starts, a requeue), so all run at once, two
# per node (one CPU each), driven from threads; each test then checks its own.
@dataclass(frozen=True)
class Interruption:
    command: tuple[str, ...]  # what interrupts the job (its id is appended)
    delay: float = 0.0  # seconds after epoch 1 is in metrics.jsonl (and its checkpoint written)
    env: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    ends: str = "COMPLETED"


# Two processes of one "node" (as with two GPUs; gloo on the CPU here).
TWO_PROCESSES = {"env": {"VAE_GPUS_PER_NODE": "2"}, "overrides": ("train.cpu=true",)}
INTERRUPTIONS = {
    # What Slurm does before a time limit with --signal=B:USR1@N: signal only the batch shell. Sent mid-epoch 2.
    # W&B logs offline here: its run must be finished before the requeue's SIGTERM reaches wandb's service.
    "usr1": Interruption(("scancel", "--signal=USR1", "--batch"), 1.5, env={"WANDB_MODE": "offline"}),
    # A requeue without warning (an admin, a failed node): Slurm sends SIGTERM to every process of the job.
    "requeue": Interruption(("scontrol", "requeue")),
    # The warning as USR2 (sbatch --signal=B:USR2@N), to a job of two processes.
    "usr2 2 processes": Interruption(("scancel", "--signal=USR2", "--batch"), 1.5, **TWO_PROCESSES),
    # scancel: SIGTERM to every process of the job, torchrun's agent included, and no requeue.
    "scancel 2 processes": Interruption(("scancel",), 1.5, ends="CANCELLED", **TWO_PROCESSES),
    # scancel with W&B offline: the same TERM reaches wandb's service.
    "scancel wandb": Interruption(("scancel",), 1.5, env={"WANDB_MODE": "offline"}, ends="CANCELLED"),
}


@pytest.fixture(scope="module")
def interrupted(request, slurm, tmp_path_factory, mnist_root):
    def drive(name: str) -> dict:
        how = INTERRUPTIONS[name]
        tmp = tmp_path_factory.mktemp(name.replace(" ", "-"))
        run = tmp / "run"
        job = submit(slurm, tmp, "slurm/train.sh", "configs/debug.yaml", f"run.dir={run}",
                     f"data.root={mnist_root}", *LONG, *how.overrides, env={**_job_env(), **how.env},
                     sbatch_args=["--gres=none", "--cpus-per-task=1"])
        wait_until(slurm, job, lambda: epochs_in(run) == [1], f"{name}: the moment to interrupt")
        time.sleep(how.delay)
        slurm.run(*how.command, job)
        records = slurm.wait(job, timeout=300)
        output = slurm.output(job)
        assert records[0]["JobState"] == how.ends, f"job {job}: {records[0]}\n{output[-4000:]}"
        return {"job": job, "run": run, "record": records[0], "output": output}

    # Only the jobs the selected tests read (their `interruption` marker): `pytest -k usr1` drives one, not all.
    wanted = {marker.args[0] for item in request.session.items if item.module is request.module
              for marker in item.iter_markers("interruption")}
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:
        futures = {name: pool.submit(drive, name) for name in sorted(wanted)}
        wait(futures.values())
    return futures  # each test takes its own result (or failure) with .result()


@pytest.mark.interruption("usr1")
def test_usr1_checkpoints_requeues_and_resumes(interrupted):
    result = interrupted["usr1"].result()
    job, output = result["job"], result["output"]
    assert result["record"]["Restarts"] == "1", output
    assert "got SIGUSR1" in output  # the batch shell caught it...
    assert "stopped by SIGUSR1" in output and f"requeued Slurm job {job}" in output  # ...python checkpointed
    assert "training exited with code 138" in output  # python's own code: no launcher turning it into 1
    assert re.search(r"^resuming .* from step_\d+", output, re.MULTILINE), output
    assert "| start 2 |" in output
    assert_finished_run(result["run"], epochs=3)  # every epoch exactly once


@pytest.mark.interruption("usr1")
def test_usr1_finishes_the_wandb_run_before_the_requeue(interrupted):
    """The requeue SIGTERMs every process of the job, wandb's service too: the first start's W&B run must be
    marked preempted and finished before it, or its offline file keeps nothing of what it logged."""
    result = interrupted["usr1"].result()
    output, run = result["output"], result["run"]
    assert "Traceback" not in output and "W&B failed" not in output, output
    first, second = (read_offline_run(d) for d in offline_run_dirs(run))
    assert first.run_id == second.run_id
    assert first.record_kinds.get("preempting") == 1 and first.exit_code == 138, output
    assert second.exit_code == 0
    assert first.steps and min(second.steps) > max(first.steps)  # the first start's steps are all there
    assert max(second.steps) == 3 * 20000 // 50


@pytest.mark.interruption("requeue")
def test_scontrol_requeue_resumes_from_checkpoint(interrupted):
    result = interrupted["requeue"].result()
    output = result["output"]
    assert result["record"]["Restarts"] == "1", output
    assert "stopped by SIGTERM" in output  # the SIGTERM reached python, which saved where it was
    assert re.search(r"^resuming .* from step_\d+", output, re.MULTILINE), output
    assert "| start 2 |" in output
    assert_finished_run(result["run"], epochs=3)


@pytest.mark.interruption("usr2 2 processes")
def test_usr2_on_two_processes_checkpoints_requeues_and_resumes(interrupted):
    result = interrupted["usr2 2 processes"].result()
    job, output = result["job"], result["output"]
    assert result["record"]["Restarts"] == "1", output
    assert "2 processes, one per GPU" in output and "got SIGUSR2" in output
    assert "stopped by SIGUSR2" in output and f"requeued Slurm job {job}" in output
    assert "stopped as planned (exit code 140)" in output and "training exited with code 140" in output
    assert "second SIGTERM" not in output, output  # the requeue's TERMs came after the stop: one request
    assert re.search(r"^resuming .* from step_\d+", output, re.MULTILINE), output
    summary = assert_finished_run(result["run"], epochs=3)
    assert summary["num_processes"] == 2 and len(set(summary["param_checksum_per_rank"])) == 1


@pytest.mark.interruption("scancel 2 processes")
def test_scancel_of_two_processes_checkpoints_mid_epoch_and_exits(interrupted):
    """scancel sends TERM to every process of the job (the batch script passes one on too, and torchrun's agent
    would have sent a third): the ranks stop once, together, after a checkpoint the same command resumes."""
    from vae.storage.checkpoint import complete_states, read_trainer_state

    result = interrupted["scancel 2 processes"].result()
    output = result["output"]
    assert "stopped by SIGTERM" in output and "second SIGTERM" not in output, output
    assert "Traceback" not in output, output  # the launcher says it in one line, with the workers' exit code
    assert "stopped as planned (exit code 143)" in output and "training exited with code 143" in output
    newest = read_trainer_state(complete_states(result["run"])[-1][1])
    assert newest["epoch"] == 2 and newest["batches_done"] > 0  # mid-epoch 2, where it was cancelled


@pytest.mark.interruption("scancel wandb")
def test_scancel_closes_the_wandb_run_as_preempted(interrupted):
    """scancel stops wandb's service together with the training (wandb #9963): the run's W&B history must still
    end closed, as preempted, and the same command continues it."""
    result = interrupted["scancel wandb"].result()
    output, run = result["output"], result["run"]
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output
    segments = [read_offline_run(d) for d in offline_run_dirs(run)]
    assert len({s.run_id for s in segments}) == 1, output
    assert segments[-1].exit_code == 143 and segments[-1].record_kinds.get("preempting") == 1, output
    steps = [step for segment in segments for step in segment.steps]
    assert steps == sorted(steps) and steps, output


def test_warnings_during_start_up_stop_requeueing_after_three_starts(slurm, tmp_path, job_env, mnist_root):
    """A time limit too short for the start-up: each start gets the warning before its first step. Such a start
    has nothing new to save; the third in a row is not requeued, in one line saying why and what to change."""
    from vae.cluster.preemption import STARTS_FILE

    run = tmp_path / "run"
    job = submit(slurm, tmp_path, "slurm/train.sh", "configs/debug.yaml", f"run.dir={run}",
                 f"data.root={mnist_root}", *LONG, sbatch_args=["--gres=none", "--cpus-per-task=1"],
                 env={**job_env, "WANDB_MODE": "offline"})  # W&B's start keeps each start-up a few seconds long

    def starts() -> int:
        return (run / STARTS_FILE).read_text().count('"event": "start"') if (run / STARTS_FILE).exists() else 0

    for start in (1, 2, 3):
        wait_until(slurm, job, lambda start=start: starts() == start, f"start {start}")
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        if start < 3:
            wait_until(slurm, job, lambda start=start: slurm.job(job)[0].get("Restarts") == str(start),
                       f"requeue {start}")
    record = slurm.wait(job, timeout=180)[0]
    output = slurm.output(job)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "138:0", record
    assert record["Restarts"] == "2" and "| start 3 |" in output, output
    assert output.count("stopped by SIGUSR1 at start-up, before its first step; nothing new to save") == 3, output
    assert output.count("requeued Slurm job") == 2
    assert "not requeued: the last 3 starts of this run were stopped before they trained a step (the warning " \
           "came during start-up); give the job more time (--time)" in output
    assert "restarts:   0; previous stop: none: the run's first start" in output
    assert "restarts:   2; previous stop: SIGUSR1 at start-up, before its first step" in output
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_sweep_sh_from_another_directory_and_a_requeue_of_one_array_task(slurm, tmp_path, job_env, mnist_root):
    """A sweep submitted from outside the repository (VAE_REPO), with an entry holding spaces, while the user's
    environment has CONFIG, VENV, RUN_DIR... of its own; task 0 gets the warning signal and requeues itself
    alone (not the whole array, Lightning #15022): task 1 runs to its end untouched."""
    sweep_dir = tmp_path / "sweep"
    env = {**job_env, "VAE_REPO": str(REPO), "VAE_SWEEP_CONFIG": "configs/debug.yaml",
           "VAE_SWEEP_LIST": "model.z_dim=2;model.z_dim=3 model.hidden=[64, 32]", "VAE_SWEEP_DIR": str(sweep_dir),
           # unrelated settings of the user's that sbatch passes on: none may reach the job
           "CONFIG": "/nowhere.yaml", "VENV": "/nowhere", "RUN_DIR": "/nowhere", "GPUS_PER_NODE": "x",
           "SWEEP_LIST": "model.z_dim=9"}
    job = slurm.sbatch(f"--output={tmp_path}/slurm-%x-%A_%a.out", "--array=0-1", "--gres=none",
                       "--cpus-per-task=1", str(REPO / "slurm/sweep.sh"), f"data.root={mnist_root}", *LONG,
                       env=env, cwd=tmp_path)
    entries = env["VAE_SWEEP_LIST"]
    names = [os.path.basename(d) for d in _sweep_run_dirs(tmp_path / "naming", entries, f"data.root={mnist_root}",
                                                           *LONG, config="configs/debug.yaml")]
    assert names[0].startswith("z_dim-2-") and names[1].startswith("z_dim-3_hidden-64,32-")
    first = sweep_dir / names[0]
    wait_until(slurm, f"{job}_0", lambda: epochs_in(first) == [1], "task 0's epoch 1")
    time.sleep(1.5)
    slurm.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
    records = {r["ArrayTaskId"]: r for r in slurm.wait(job, timeout=300)}
    outputs = {task: slurm.output_of(record) for task, record in records.items()}
    assert all(r["JobState"] == "COMPLETED" for r in records.values()), outputs
    assert records["0"]["Restarts"] == "1" and "stopped by SIGUSR1" in outputs["0"], outputs["0"]
    assert records["1"]["Restarts"] == "0" and "SIGUSR1" not in outputs["1"], outputs["1"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == names
    for name, z, hidden in ((names[0], 2, [400]), (names[1], 3, [64, 32])):
        assert_finished_run(sweep_dir / name, epochs=3)
        config = yaml.safe_load((sweep_dir / name / "config.yaml").read_text())
        assert config["model"]["z_dim"] == z and config["model"]["hidden"] == hidden
    assert {p.name for p in tmp_path.glob("slurm-vae-sweep-*.out")} == {f"slurm-vae-sweep-{job}_{i}.out"
                                                                          for i in (0, 1)}


def _sweep_run_dirs(tmp_path, entries: str, *arguments: str, config: str = "configs/z2.yaml") -> list[str]:
    """The run directory sweep.sh gives each entry (tasks 0, 1, ...), read from what it hands slurm/train.sh (here
    a stand-in in a copy of the repository's scripts that prints it; the real one trains, in the sweep test above)."""
    repo = tmp_path / "repo"
    if not repo.exists():  # made once per tmp_path
        (repo / "slurm").mkdir(parents=True)
        (repo / "train.py").touch()
        (repo / "slurm" / "common.sh").touch()
        shutil.copy(REPO / "slurm" / "sweep.sh", repo / "slurm" / "sweep.sh")
        (repo / "slurm" / "train.sh").write_text('echo "$VAE_RUN_DIR"\n')
    dirs = []
    for task in range(len(entries.split(";"))):
        env = {"PATH": os.environ["PATH"], "VAE_REPO": str(repo), "SLURM_ARRAY_TASK_ID": str(task),
               "VAE_SWEEP_LIST": entries}
        result = subprocess.run(["bash", str(repo / "slurm" / "sweep.sh"), config, *arguments], capture_output=True,
                                text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        dirs.append(result.stdout.strip().splitlines()[-1])
    return dirs


def test_sweep_entries_that_read_alike_and_sweeps_that_differ_get_run_directories_of_their_own(tmp_path):
    alike = _sweep_run_dirs(tmp_path, "run.name=x;log.name=x;log.group=a/b;log.group=a:b")
    assert len(set(alike)) == 4, alike
    assert alike[0].startswith("runs/z2-sweep/name-x-") and alike[2].startswith("runs/z2-sweep/group-a_b-")
    lr_3, lr_4 = (_sweep_run_dirs(tmp_path, "model.z_dim=10", f"train.lr={lr}") for lr in ("1e-3", "1e-4"))
    other_config = _sweep_run_dirs(tmp_path, "model.z_dim=10", "train.lr=1e-3", config="configs/other/z2.yaml")
    assert len({*lr_3, *lr_4, *other_config}) == 3
    assert _sweep_run_dirs(tmp_path, "model.z_dim=10", "train.lr=1e-3") == lr_3  # the same setting: its own run again


def test_outside_the_repository_without_vae_repo_is_one_line(tmp_path):
    result = subprocess.run(["bash", str(REPO / "slurm/train.sh")], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"]}, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {tmp_path} is not the harness's repository (no train.py and "
                                     "slurm/common.sh there): submit from the repository's root, or set "
                                     "VAE_REPO=/path/to/the/repository")
