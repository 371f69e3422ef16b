"""The datasets data.name chooses (vae.datasets), on real files: the real MNIST, Debian's real FashionMNIST files
(package dataset-fashion-mnist; .ci/run installs it), and real .npz files written here; and the binarized pixels
of data.binarize."""

import gzip
import hashlib
import re
import shutil

import numpy as np
import pytest
import torch

from vae.config import DataConfig
from vae.datasets import DataError, check_dataset_paths, fashion_mnist, load_dataset
from vae.datasets.binarize import (
    STATIC_DRAW,
    STATIC_SEED,
    TEST_DRAW,
    UNIFORM_BITS,
    bernoulli_pixels,
    binarize_images,
    pixel_uniforms,
)
from vae.datasets.fashion_mnist import FASHION_MNIST, FASHION_MNIST_FILES

# sha256 of the tensors vae.datasets.batches decoded from the real MNIST before the datasets moved into vae.datasets:
# (train images, train labels, test images, test labels). `mnist` must stay today's data to the last bit.
MNIST_SHA256 = (
    "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c",
    "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243",
)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
UNREACHABLE = ["http://127.0.0.1:9/"]  # nothing listens there: torchvision's download fails as it does offline


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message, message
    return message


@pytest.fixture
def offline(monkeypatch):
    """torchvision's FashionMNIST mirror unreachable, as on a machine without internet (and on CI)."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", UNREACHABLE)


# ---------------------------------------------------------------------------------------------------------
# MNIST


def test_mnist_is_todays_data_bit_for_bit(mnist_root):
    data = load_dataset(DataConfig(root=str(mnist_root)))
    tensors = (data.train_images, data.train_labels, data.test_images, data.test_labels)
    assert tuple(_sha256(t) for t in tensors) == MNIST_SHA256
    assert [t.dtype for t in tensors] == [torch.uint8, torch.int64] * 2
    assert data.train_images.shape == (60000, 784) and data.test_images.shape == (10000, 784)
    assert data.image_shape == (1, 28, 28) and data.class_names == tuple("0123456789")


# ---------------------------------------------------------------------------------------------------------
# FashionMNIST


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """FashionMNIST fetched into a fresh data root with torchvision's mirror unreachable: from Debian's files."""
    from torchvision.datasets import FashionMNIST

    root, messages = tmp_path_factory.mktemp("data"), []
    mirrors, FashionMNIST.mirrors = FashionMNIST.mirrors, UNREACHABLE
    try:
        data = load_dataset(DataConfig(name="fashion_mnist", root=str(root)), say=messages.append)
    finally:
        FashionMNIST.mirrors = mirrors
    return root, data, messages


def test_fashion_mnist_comes_from_debians_files_when_offline(fashion_root):
    from torchvision.datasets import FashionMNIST

    root, data, messages = fashion_root
    assert [m.split("; fetching it ")[1] for m in messages] == [
        "with torchvision ...", "from Debian's package dataset-fashion-mnist ..."]
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(FASHION_MNIST_FILES)  # nothing half-done left behind
    FASHION_MNIST.verify(root)
    assert data.train_images.shape == (60000, 784) and data.test_images.shape == (10000, 784)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.image_shape == (1, 28, 28) and data.class_names == FASHION_CLASSES
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    reference = FashionMNIST(str(root), train=False, download=False)  # decoded as torchvision decodes them
    assert torch.equal(data.test_images, reference.data.reshape(-1, 784))
    assert torch.equal(data.test_labels, reference.targets)


def test_fashion_mnist_files_already_there_are_used_without_fetching(fashion_root, monkeypatch):
    root, _, _ = fashion_root
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", root / "no-such-folder")
    messages = []
    data = load_dataset(DataConfig(name="fashion_mnist", root=str(root), download=False), say=messages.append)
    assert messages == [] and data.class_names == FASHION_CLASSES


def _copy_raw(root, to):
    raw = to / "FashionMNIST" / "raw"
    shutil.copytree(root / "FashionMNIST" / "raw", raw)
    return raw


def test_a_corrupted_fashion_mnist_file_is_refused_in_one_line(fashion_root, tmp_path):
    raw = _copy_raw(fashion_root[0], tmp_path)
    path = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[200] ^= 1  # same size, one bit changed: caught by the pinned md5 of the decompressed file
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as error:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert re.fullmatch(rf"{re.escape(str(path))} fails its checksum \(md5 \w+, expected "
                        rf"15d484375f8d13e6eb1aabb0c3f46965\); delete it and run again to fetch a fresh copy",
                        _one_line(error))


def test_a_damaged_debian_package_is_refused_and_leaves_no_file(tmp_path, monkeypatch, offline):
    """A .gz whose content is not the original (a package damaged on disk): refused by the decompressed file's
    pinned checksum, before it gets its real name."""
    debian = tmp_path / "debian"
    shutil.copytree(fashion_mnist.DEBIAN_DIR, debian)
    labels = gzip.decompress((debian / "train-labels-idx1-ubyte.gz").read_bytes())
    (debian / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + bytes([labels[-1] ^ 1])))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    with pytest.raises(DataError) as error:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "data")))
    message = _one_line(error)
    assert message.startswith("could not fetch FashionMNIST (torchvision: ")
    assert f"{debian / 'train-labels-idx1-ubyte.gz'}: its decompressed file fails its checksum" in message
    assert "apt install --reinstall dataset-fashion-mnist" in message
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def test_without_internet_or_the_debian_package_one_line_names_both_ways(tmp_path, monkeypatch, offline):
    # The package is installed wherever these tests run (.ci/run installs it), so "not installed" is this module
    # constant pointed at an empty folder; removing the package is not something a test may do.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", empty / "fashion-mnist")
    root = tmp_path / "data"
    with pytest.raises(DataError) as error:
        load_dataset(DataConfig(name="fashion_mnist", root=str(root)), say=lambda message: None)
    message = _one_line(error)
    assert message.startswith("could not fetch FashionMNIST (torchvision: RuntimeError: Error downloading")
    assert "Debian's dataset-fashion-mnist: DataError: " in message
    assert "`apt install dataset-fashion-mnist`" in message
    assert (f"copy the four uncompressed files {', '.join(FASHION_MNIST_FILES)} into "
            f"{root / 'FashionMNIST' / 'raw'}/ by hand") in message


def test_fashion_mnist_is_not_fetched_with_download_false(tmp_path):
    with pytest.raises(DataError, match=r"FashionMNIST files missing under .* and data.download=false; set "
                                        r"data.download=true or copy the files there"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    assert not (tmp_path / "FashionMNIST" / "raw").exists()


# ---------------------------------------------------------------------------------------------------------
# Your own images: .npz files


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _npz_config(tmp_path, train: dict, test: dict | None = None, **keys) -> DataConfig:
    rng = np.random.default_rng(0)
    good = {"images": rng.integers(0, 256, (6, 5, 7), dtype=np.uint8), "labels": np.array([0, 1, 2, 0, 1, 2])}
    train_path = _write_npz(tmp_path / "train.npz", **{**good, **train})
    test_path = _write_npz(tmp_path / "test.npz", **{**good, **(test or {})})
    return DataConfig(name="npz", train_path=str(train_path), test_path=str(test_path), **keys)


def test_a_three_channel_npz_is_read_in_c_h_w_order(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 3, 32, 32)).astype(np.int64)  # integers within 0-255: taken as uint8
    names = np.array(["cat", "dog", "ship"])
    data = load_dataset(_npz_config(tmp_path, {"images": train, "labels": np.arange(9) % 3, "class_names": names},
                                    {"images": test, "labels": np.array([2, 1, 0, 1], dtype=np.uint8)}))
    assert data.image_shape == (3, 32, 32) and data.class_names == ("cat", "dog", "ship")
    assert data.train_images.shape == (9, 3072) and data.train_images.dtype == torch.uint8
    assert torch.equal(data.train_images, torch.from_numpy(train.reshape(9, -1)))
    assert torch.equal(data.test_images, torch.from_numpy(test.astype(np.uint8).reshape(4, -1)))
    assert data.train_labels.dtype == torch.int64 and data.test_labels.tolist() == [2, 1, 0, 1]


def test_a_grey_npz_without_class_names_names_classes_by_their_labels(tmp_path):
    data = load_dataset(_npz_config(tmp_path, {}, {"labels": np.array([0, 1, 2, 3, 1, 1])}))
    assert data.image_shape == (1, 5, 7) and data.train_images.shape == (6, 35)
    assert data.class_names == ("0", "1", "2", "3")  # up to the largest label of either file


IMAGES = np.zeros((6, 5, 7), dtype=np.uint8)
# case -> (the train file's arrays (replacing the good ones; None removes one), the test file's, the message)
NPZ_ERRORS = {
    "no images": ({"images": None}, {}, r"has no `images` array \(it has: labels\)"),
    "no labels": ({"labels": None}, {}, r"has no `labels` array \(it has: images\)"),
    "float images": ({"images": IMAGES.astype(np.float32)}, {},
                     r"`images` is float32, it must be uint8 grey levels 0-255; from floats in \[0, 1\]"),
    "float labels": ({"labels": np.zeros(6)}, {}, r"`labels` is float64, it must be integers"),
    "flat images": ({"images": IMAGES.reshape(6, 35)}, {},
                    r"`images` has shape \[6, 35\]; it must be \[N, H, W\] or \[N, C, H, W\]"),
    "labels of rank 2": ({"labels": np.zeros((6, 1), dtype=np.int64)}, {},
                         r"`labels` has shape \[6, 1\], it must be \[N\]"),
    "channels last": ({"images": np.zeros((6, 5, 7, 3), dtype=np.uint8)}, {},
                      r"`images` has 5 channels .* it must have 1 or 3 \(it looks like \[N, H, W, C\]"),
    "grey levels above 255": ({"images": np.full((6, 5, 7), 300, dtype=np.int16)}, {},
                              r"`images` holds values from 300 to 300, outside 0-255"),
    "negative labels": ({"labels": np.array([0, 1, -1, 0, 1, 2])}, {}, r"`labels` holds -1; labels must be 0 or more"),
    "a label without a class name": ({"class_names": np.array(["a", "b"])}, {},
                                     r"`class_names` names 2 classes, but a label is 2"),
    "fewer labels than images": ({"labels": np.array([0, 1, 2])}, {}, r"3 labels for 6 images"),
    "train and test shapes differ": ({}, {"images": np.zeros((6, 7, 5), dtype=np.uint8)},
                                     r"holds images of \[C, H, W\] = \[1, 5, 7\], data.test_path .* of \[1, 7, 5\]"),
    "pickled class names": ({"class_names": np.array(["a", 2, None], dtype=object)}, {},
                            r"holds pickled Python objects, which are never loaded"),
}


@pytest.mark.parametrize("case", NPZ_ERRORS)
def test_each_npz_problem_is_one_line_naming_the_file_and_the_fix(tmp_path, case):
    train, test, expected = NPZ_ERRORS[case]
    data = _npz_config(tmp_path, {k: v for k, v in train.items() if v is not None}, test)
    for key in [k for k, v in train.items() if v is None]:  # rewrite the file without that array
        arrays = dict(np.load(data.train_path))
        del arrays[key]
        np.savez(data.train_path, **arrays)
    with pytest.raises(DataError) as error:
        load_dataset(data)
    message = _one_line(error)
    assert re.search(expected, message), message
    assert data.train_path in message  # the file it is about
    assert "test_path" not in case or data.test_path in message


@pytest.mark.parametrize("content, expected", [
    (b"images,labels\n1,2\n", r"is not an .npz file \(not a zip archive\)"),
    (b"PK\x03\x04 cut short", r"is not a readable .npz file \(BadZipFile: File is not a zip file\)"),
    (None, r"is a single array \(.npy\), not an .npz archive"),
], ids=["text", "truncated zip", "npy"])
def test_a_file_that_is_not_a_readable_npz_is_one_line(tmp_path, content, expected):
    data = _npz_config(tmp_path, {})
    path = tmp_path / "train.npz"
    if content is None:
        with path.open("wb") as f:
            np.save(f, IMAGES)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_dataset(data)
    assert re.search(rf"^data.train_path {re.escape(str(path))} {expected}; write it with numpy.savez",
                     _one_line(error))


def test_npz_paths_are_checked_before_any_long_work(tmp_path):
    data = _npz_config(tmp_path, {})
    missing = DataConfig(name="npz", train_path=str(tmp_path / "nope.npz"), test_path=data.test_path)
    with pytest.raises(DataError, match=rf"^data.train_path {re.escape(str(tmp_path))}/nope.npz does not exist; "
                                        r"pass the path of your .npz file$"):
        check_dataset_paths(missing)
    folder = DataConfig(name="npz", train_path=data.train_path, test_path=str(tmp_path))
    with pytest.raises(DataError, match=r"^data.test_path .* is not a file; pass the path of your .npz file$"):
        check_dataset_paths(folder)
    check_dataset_paths(data)


def test_a_data_root_that_cannot_be_a_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    for name in ("mnist", "fashion_mnist"):
        with pytest.raises(DataError, match=r"^--data-root .*/file/data cannot be a folder: .*/file is a file"):
            check_dataset_paths(DataConfig(name=name, root=str(tmp_path / "file" / "data")), "--data-root")


# ---------------------------------------------------------------------------------------------------------
# data.binarize


GREYS = torch.arange(256, dtype=torch.uint8)  # one image holding every grey level


def test_a_pixel_is_on_with_probability_grey_over_255():
    images = GREYS.repeat(4000, 1)
    across_images = bernoulli_pixels(images, torch.arange(4000), 3, 11).mean(0)
    across_draws = torch.stack([bernoulli_pixels(GREYS[None], torch.tensor([5]), draw, 11)[0]
                                for draw in range(2000)]).mean(0)
    expected = GREYS.double() / 255
    for means, count in ((across_images, 4000), (across_draws, 2000)):
        sigma = (expected * (1 - expected) / count).sqrt()
        assert torch.all((means.double() - expected).abs() <= 5 * sigma + 1e-12)
        assert means[0] == 0 and means[255] == 1  # black never, white always
    assert bernoulli_pixels(images, torch.arange(4000), 3, 11).unique().tolist() == [0.0, 1.0]


def test_an_images_pixels_do_not_depend_on_its_batch_or_its_place_in_it():
    images = torch.randint(0, 256, (100, 50), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    indices = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:100]
    whole = bernoulli_pixels(images, indices, 7, 3)
    split = torch.cat([bernoulli_pixels(images[lo:hi], indices[lo:hi], 7, 3) for lo, hi in ((0, 37), (37, 100))])
    order = torch.randperm(100, generator=torch.Generator().manual_seed(2))
    shuffled = bernoulli_pixels(images[order], indices[order], 7, 3)
    assert torch.equal(whole, split) and torch.equal(whole[order], shuffled)
    # the draw as a device tensor (as the training step keeps the epoch) or as an int: the same pixels
    assert torch.equal(whole, bernoulli_pixels(images, indices, torch.tensor(7), 3))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:  # computed there, compared on the CPU
        on = bernoulli_pixels(images.to(device), indices.to(device), torch.tensor(7, device=device), 3)
        assert on.dtype == torch.float32 and torch.equal(on.cpu(), whole)


def test_the_same_inputs_give_the_same_pixels_and_another_draw_or_seed_others():
    images = GREYS.repeat(20, 1)
    indices = torch.arange(20)
    first = bernoulli_pixels(images, indices, 1, 5)
    assert torch.equal(first, bernoulli_pixels(images, indices, 1, 5))
    for other in (bernoulli_pixels(images, indices, 2, 5), bernoulli_pixels(images, indices, 1, 6),
                  bernoulli_pixels(images, indices + 1, 1, 5)):
        differ = (other != first).float().mean()
        # independent draws differ at p(1-p) + (1-p)p of the pixels: about a third for uniform greys
        assert 0.25 < differ < 0.42, differ


def test_the_hash_is_pinned_to_known_values():
    """Changing the hash would silently change every binarized dataset (and resumed runs mid-way): these values
    are what it gave when it was written."""
    assert pixel_uniforms(torch.tensor([0, 1, 59999]), 4, 3, 42).tolist() == [
        [6104674, 5944753, 6471690, 411129], [3382168, 4435155, 2749839, 925528],
        [6564205, 4979226, 2136878, 56462]]
    images = torch.arange(0, 256, 16, dtype=torch.uint8).repeat(2, 1)
    bits = bernoulli_pixels(images, torch.tensor([7, 8]), 5, 2026)
    assert "".join(str(int(b)) for b in bits.flatten()) == "00000010010111110001000100000011"
    assert 0 <= pixel_uniforms(torch.arange(500), 784, 0, 0).min() and \
        pixel_uniforms(torch.arange(500), 784, 0, 0).max() < 2 ** UNIFORM_BITS


@pytest.mark.parametrize("mode", ["none", "dynamic", "static"])
def test_binarize_fixes_the_test_set_for_every_run_and_static_the_training_set(tmp_path, mode):
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (300, 6, 6), dtype=np.uint8)
    test = rng.integers(0, 256, (200, 6, 6), dtype=np.uint8)
    config = _npz_config(tmp_path, {"images": train, "labels": np.zeros(300, dtype=np.int64)},
                         {"images": test, "labels": np.zeros(200, dtype=np.int64)}, binarize=mode)
    data, again = load_dataset(config), load_dataset(config)
    grey_train, grey_test = torch.from_numpy(train.reshape(300, -1)), torch.from_numpy(test.reshape(200, -1))
    assert torch.equal(data.test_images, again.test_images) and torch.equal(data.train_images, again.train_images)
    if mode == "none":
        assert torch.equal(data.test_images, grey_test) and torch.equal(data.train_images, grey_train)
        return
    # the same test images for dynamic and static, and for any run: the fixed seed and draw
    assert torch.equal(data.test_images, binarize_images(grey_test, STATIC_SEED, TEST_DRAW))
    assert set(data.test_images.unique().tolist()) == {0, 255}
    if mode == "dynamic":  # the training step draws the training pixels afresh each epoch
        assert torch.equal(data.train_images, grey_train)
    else:
        assert torch.equal(data.train_images, binarize_images(grey_train, STATIC_SEED, STATIC_DRAW))
        assert set(data.train_images.unique().tolist()) == {0, 255}
        assert abs(data.train_images.float().mean() - grey_train.float().mean()) < 3


def test_a_binarized_dataset_is_binarized_image_by_image_as_the_step_does():
    images = torch.randint(0, 256, (5000, 30), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    whole = binarize_images(images, 9, 4)  # in chunks of 4096 images
    assert torch.equal(whole, (bernoulli_pixels(images, torch.arange(5000), 4, 9) * 255).to(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_pixels_drawn_in_a_cuda_graph_are_the_cpus():
    """As the training step draws them: captured once, replayed with the epoch changed in its device tensor."""
    images = torch.randint(0, 256, (64, 784), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    indices = torch.randperm(60000, generator=torch.Generator().manual_seed(6))[:64]
    gpu_images, gpu_indices = images.cuda(), indices.cuda()
    epoch = torch.zeros((), dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bernoulli_pixels(gpu_images, gpu_indices, epoch, 8)  # warm-up outside the capture, as torch asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bernoulli_pixels(gpu_images, gpu_indices, epoch, 8)
    for e in (1, 2, 7):
        epoch.fill_(e)
        graph.replay()
        assert torch.equal(out.cpu(), bernoulli_pixels(images, indices, e, 8))


def test_fashion_mnist_is_fetched_with_torchvision_when_its_mirror_answers(tmp_path, monkeypatch):
    """torchvision's download, served from this machine: an HTTP server on the Debian files stands in for the
    mirror (their .gz differ from the originals torchvision pins, so its md5s of them are swapped in); the files
    land under their names, the rest of the download is left out, and nothing is taken from Debian's folder."""
    import functools
    import http.server
    import threading

    from torchvision.datasets import FashionMNIST

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fashion_mnist.DEBIAN_DIR))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(FashionMNIST, "resources", [
            (f"{name}.gz", hashlib.md5((fashion_mnist.DEBIAN_DIR / f"{name}.gz").read_bytes()).hexdigest())
            for name in FASHION_MNIST_FILES])
        monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "not-installed")
        messages = []
        data = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), say=messages.append)
    finally:
        server.shutdown()
        server.server_close()
    assert [m.split("; fetching it ")[1] for m in messages] == ["with torchvision ..."]
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(FASHION_MNIST_FILES)
    assert data.class_names == FASHION_CLASSES and torch.bincount(data.test_labels).tolist() == [1000] * 10
