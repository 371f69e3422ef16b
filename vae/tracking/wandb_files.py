"""W&B's files and settings, for the W&B backend (wandb_backend.py): the run directory's record of its W&B run
(wandb_run.json), the command that uploads its offline segments, where wandb writes, which mode (online, offline,
disabled: decided without network, never prompting), the credentials, wandb's settings for the harness's runs,
and stopping wandb's service. wandb is imported only inside functions.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from ..storage.checkpoint import atomic_write_text
from .backend import shown_path

RUN_FILE = "wandb_run.json"
FLUSH_EVERY_S = 2.0  # how often wandb writes what was logged to the run's offline file (see run_settings)
ID_ALPHABET = string.ascii_lowercase + string.digits


# ---------------------------------------------------------------------------------------------------------
# The run directory's record of its W&B run


def read_run_file(run_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
        return None
    return data


def write_run_file(run_dir: Path, data: dict) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(data, indent=1) + "\n")


def new_run_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(8))


def sweep_run_id() -> str | None:
    """Under `wandb agent` (a W&B sweep): the run id the agent was given for this run, which the sweep waits for."""
    return os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None


def sync_command(run_dir: Path, run_id: str, run) -> str:
    """The `wandb sync` command that uploads this run's offline folders (all of its starts, oldest first)."""
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    if len(segments) <= 1:
        here = segments[0] if segments else Path(run.settings.sync_dir)
        return f"wandb sync {shown_path(here)}"
    pattern = shown_path(run_dir / "wandb") + f"/offline-run-*-{run_id}"
    return f"wandb sync --id {run_id} {pattern}"


def keep_wandb_files_in(run_dir: Path) -> None:
    """Besides the run folders (wandb.init's dir), wandb writes into the home directory: a staging folder for what
    it logs as artifacts (the model files, each logged Table), which an offline run's `wandb sync` reads later
    (WANDB_DATA_DIR), and its service's logs and artifact cache (WANDB_CACHE_DIR). Keep both in the run's wandb/
    folder, unless the user set them, so that the run directory holds everything the run wrote and sync needs.
    Called before wandb's settings are first read, which would otherwise warn about a changed environment."""
    wandb_dir = (Path(run_dir) / "wandb").resolve()
    for variable, folder in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        current, ours = os.environ.get(variable), f"VAE_SET_{variable}"  # what this process set before
        if current is None or current == os.environ.get(ours):
            os.environ[variable] = os.environ[ours] = str(wandb_dir / folder)


# ---------------------------------------------------------------------------------------------------------
# Which mode: online, offline, disabled (decided without network, never prompting)


def wandb_settings():
    """wandb's settings as wandb itself reads them (environment, settings files)."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings


def configured_mode() -> str | None:
    """The mode the user chose, "offline" or "disabled" (WANDB_MODE, `wandb offline`); None: online."""
    try:
        settings = wandb_settings()
        if settings._noop:
            return "disabled"
        if settings._offline:
            return "offline"
        return None
    except Exception:  # another wandb version: read the environment variable ourselves
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        return {"offline": "offline", "dryrun": "offline", "disabled": "disabled"}.get(mode)


def has_credentials() -> bool:
    """Whether wandb.init would find credentials without asking: WANDB_API_KEY (or an identity token file),
    ~/.netrc (where `wandb login` stores the key) or wandb's settings. Never prompts, never uses the network."""
    try:
        from wandb.sdk.lib import wbauth

        settings = wandb_settings()
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        return wbauth.authenticate_session(host=host, source="vae", prompt=False, update_session=False) is not None
    except Exception:  # another wandb version, or a key in an invalid format: look by hand
        pass
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ---------------------------------------------------------------------------------------------------------
# wandb's settings and service


def run_settings(silent: bool):
    """wandb's settings for the harness's runs: silent unless the user asks otherwise, and the run's offline file
    written every FLUSH_EVERY_S seconds (wandb's default, 15 s, would lose that much when Slurm stops the
    service together with the job)."""
    import wandb

    values = {"silent": True} if silent else {}
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):  # wandb >= 0.22
        values["x_transaction_log_flush_interval"] = FLUSH_EVERY_S
    return wandb.Settings(**values) if values else None


def redirects_console() -> bool:
    """Whether wandb captures the console by redirecting file descriptors (console: redirect, from WANDB_CONSOLE
    or wandb's settings files): that installs a SIGWINCH handler, which only the main thread may; such a start
    stays on the main thread. Settings that cannot be read count as redirect: the main thread is always safe."""
    try:
        return str(wandb_settings().console).lower() not in ("wrap", "off", "wrap_raw", "wrap_emu")
    except Exception:
        return True


def stop_wandb_service() -> None:
    """wandb's service process outlives run.finish(); an atexit hook of wandb's stops it when Python exits. A
    process leaving after a stop must not leave that to the hook: a Slurm requeue or scancel signals every
    process of the job, the service among them, and the hook would then end the job's output in a traceback.
    wandb.teardown() unregisters the hook before it talks to the service, so it is done here, failing quietly
    if the service is gone already."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass
