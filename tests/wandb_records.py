"""Read back what an offline W&B run wrote, without a server or a login (tests only).

A `run-<id>.wandb` file is a 7-byte header (b":W&B", the magic 0xBEE1 as little-endian uint16, a version byte)
followed by LevelDB-log records in 32 KiB blocks counted from the start of the file: each record is a 7-byte
header (crc32 of type byte + data, uint16 data length, type: 1 full, 2 first, 3 middle, 4 last) and its data; a
block tail shorter than a record header is zero padding. A FULL record, or FIRST + MIDDLE... + LAST chunks joined,
is one protobuf `Record` from `wandb.proto.wandb_internal_pb2`.

    run = read_offline_run(path_to_offline_run_dir)
    run.run_id, run.config["train"]["epochs"], run.history[0]["train/loss"], run.summary["best/val_loss"]
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
IDENT, MAGIC = b":W&B", 0xBEE1
BLOCK = 32 * 1024
CHUNK = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    pass


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The raw payload of every record in a .wandb file, in order; checks headers and checksums."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, shorter than the file header")
    ident, magic, _version = HEADER.unpack_from(data, 0)
    if ident != IDENT or magic != MAGIC:
        raise WandbFileError(f"{path}: not a .wandb file (header {data[:HEADER.size]!r})")
    pos, pending = HEADER.size, None
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        if pos + CHUNK.size > len(data):
            break  # a header cut short: the writer was killed mid-record
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding (a preallocated or unfinished tail)
            pos += left_in_block
            continue
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        if end > len(data):
            break  # data cut short
        chunk = data[start:end]
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = end
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind == MIDDLE and pending is not None:
            pending += chunk
        elif kind == LAST and pending is not None:
            pending += chunk
            yield bytes(pending)
            pending = None
        else:
            raise WandbFileError(f"{path}: unexpected record type {kind} at byte {pos - length - CHUNK.size}")


def iter_records(path: str | Path):
    """Every protobuf `Record` of a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _item_value(item) -> Any:
    return json.loads(item.value_json) if item.value_json else None


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    display_name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)  # define_metric: name -> {"step_metric": ...}
    artifacts: list[dict] = field(default_factory=list)
    exit_code: int | None = None
    record_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]


def read_wandb_file(path: str | Path) -> OfflineRun:
    """Run id, config, history rows, summary, metric definitions and artifacts of one .wandb file."""
    run = OfflineRun(Path(path))
    for record in iter_records(path):
        kind = record.WhichOneof("record_type") or "none"
        run.record_kinds[kind] = run.record_kinds.get(kind, 0) + 1
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.display_name, run.group, run.tags = r.display_name, r.run_group, list(r.tags)
            _apply(run.config, r.config)
        elif kind == "config":
            _apply(run.config, record.config)
        elif kind == "history":
            run.history.append({_item_key(item): _item_value(item) for item in record.history.item})
        elif kind == "summary":
            _apply(run.summary, record.summary)
        elif kind == "metric":
            m = record.metric
            name = m.name or m.glob_name
            run.metrics[name] = {"step_metric": m.step_metric, "glob": bool(m.glob_name)}
            kept = [kind for kind in ("min", "max", "mean", "best", "last", "none") if getattr(m.summary, kind, False)]
            if kept:
                run.metrics[name]["summary"] = kept
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                  "files": [entry.path for entry in a.manifest.contents],
                                  "local_paths": [entry.local_path for entry in a.manifest.contents],
                                  "metadata": json.loads(a.metadata) if a.metadata else {}})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def wandb_file(offline_run_dir: str | Path) -> Path:
    files = sorted(Path(offline_run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise WandbFileError(f"{offline_run_dir}: expected one run-*.wandb file, found {len(files)}")
    return files[0]


def offline_run_dirs(run_dir: str | Path) -> list[Path]:
    """The offline-run-* folders under <run_dir>/wandb, oldest first (their names start with a timestamp)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir())


def _apply(target: dict, change) -> None:
    """A config or summary record's `update` and `remove` items, applied to `target`."""
    for item in change.update:
        target[_item_key(item)] = _item_value(item)
    for item in change.remove:
        target.pop(_item_key(item), None)


def read_offline_run(offline_run_dir: str | Path) -> OfflineRun:
    return read_wandb_file(wandb_file(offline_run_dir))
