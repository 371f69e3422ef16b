"""How each training process of a several-process launch ended, written where vae.cluster.launcher reads it.

The launcher decides its own exit code from these records, not from what accelerate's launcher raises or prints
when a worker exits non-zero (that changed between accelerate 1.15 and 1.16). A worker that died without
writing one (a crash, kill -9, a traceback) leaves the launcher's own report of the failure in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Set by vae.cluster.launcher for the processes it starts; without it (python train.py, a plain accelerate launch)
# nothing is written.
RECORDS_DIR_ENV = "VAE_EXIT_RECORDS_DIR"


def record_exit(code: int) -> None:
    """This process's exit code, as its last act (the entry points call it with what they return)."""
    folder = os.environ.get(RECORDS_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "exit_code": int(code),
              "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)}
    partial = Path(folder) / f".rank-{rank}.json.partial"
    try:
        partial.write_text(json.dumps(record))
        os.replace(partial, Path(folder) / f"rank-{rank}.json")  # the launcher never reads half a record
    except OSError:
        pass  # the folder is gone (the launcher left first): nobody is left to read it


def read_exits(folder: Path) -> list[dict]:
    """The records in the folder, in rank order; unreadable ones are left out."""
    records = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("exit_code"), int):
            records.append(record)
    return sorted(records, key=lambda record: record.get("rank", 0))
