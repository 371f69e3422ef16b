"""What a run writes and where: the user's umask on every file and folder of the run directory, and nothing
outside the run directory, the data root and W&B's folder (checked with a private HOME and TMPDIR)."""

import os
import stat
import subprocess
import sys

import matplotlib
import pytest

from .conftest import REPO, _env, assert_ok, train_cmd

pytestmark = pytest.mark.slow

UMASK = 0o027  # group may read, others nothing: a lab's shared-project setting


def _files_under(root):
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def _repo_snapshot():
    """Every file of the repository (not .git) with its modification time."""
    return {p: p.stat().st_mtime_ns for p in REPO.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(REPO).parts}


def test_a_run_writes_only_its_own_folders_with_the_users_umask(tmp_path, mnist_root):
    home, tmp, run_dir = tmp_path / "home", tmp_path / "tmp", tmp_path / "runs" / "umask"
    home.mkdir()
    tmp.mkdir()
    env = _env({"HOME": str(home), "TMPDIR": str(tmp),
                "MPLCONFIGDIR": matplotlib.get_cachedir(),  # matplotlib's font cache, built once per machine
                "PYTHONDONTWRITEBYTECODE": "1"})  # Python's own .pyc cache is not the run's doing
    # no WANDB_* and no credentials: W&B runs, offline, as for a user who never logged in
    env = {k: v for k, v in env.items() if not k.startswith("WANDB_") and k != "NETRC"}
    before = _repo_snapshot()
    result = subprocess.run([sys.executable, *train_cmd(run_dir, mnist_root, "train.epochs=2",
                                                        "log.checkpoint_artifacts=true", wandb=True)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: os.umask(UMASK))
    assert_ok(result)
    assert "logged offline" in result.stdout  # W&B really ran

    # The run directory, W&B's folder included: nothing readable by others, and the harness's own files exactly
    # as the umask says (safetensors alone would write model.safetensors 0600, shutting the group out)
    wandb_dir = run_dir / "wandb"
    for path in [run_dir, *run_dir.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o007, f"{path} is {oct(mode)}"
        if wandb_dir not in path.parents and path != wandb_dir:  # wandb keeps its staging copies read-only
            assert mode == (0o777 if path.is_dir() else 0o666) & ~UMASK, f"{path} is {oct(mode)}"
    assert any(p.name == "model.safetensors" for p in run_dir.rglob("*"))

    # Nothing anywhere else: not in HOME (W&B's logs and cache go to the run's wandb/ folder), not in the
    # temporary directory (torch may leave an empty torchinductor_<user> folder there), not in the repository
    # (the data root, REPO/data here, is only read: its files were already there and verified)
    assert _files_under(home) == []
    assert _files_under(tmp) == []
    after = _repo_snapshot()
    assert {p for p in after if p not in before or after[p] != before[p]} == set()
