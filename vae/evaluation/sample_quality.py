"""Sample quality that needs no download: the Fréchet classifier distance (FCD).

FID (Heusel et al., 2017) fits a Gaussian to Inception-v3 features of generated images and one to those of real
images and reports the Fréchet distance between the two. On 28x28 grey digits Inception's ImageNet features mean
little, and its weights cannot be fetched offline. FCD is the same distance over the features of a small CNN
trained on the dataset itself (its penultimate layer, FEATURE_SIZE numbers per image). Lower is better; 0 means
the two feature distributions have the same mean and covariance. It is not Inception-FID: its values are not
comparable with published FIDs, nor between datasets (each has its own classifier).

The classifier is trained on first use, on the CPU with one thread and a fixed seed (the same weights on a rerun on
the same machine, whatever the process's thread count), and cached under <cache dir>/<dataset key>/ as
classifier.safetensors plus classifier.json (test accuracy, seed, the weights' sha256, the dataset key, image
shape, feature size, torch version). A load checks the sha256 and the record; a mismatch retrains, with one line
saying why. The dataset key (`dataset_key`) hashes the training images and labels, so changed data never reuses a
stale classifier. One writer per folder at a time (a lock file); the files are written atomically.

    classifier, accuracy = classifier_for(cache_dir, key, train_images, train_labels, test_images, test_labels,
                                          image_shape, num_classes)
    score = fcd(classifier, samples, reference)   # float pixels in [0, 1], [N, D] and [M, D]

Command: `python -m vae.evaluation.sample_quality --data-root data` trains or loads MNIST's classifier and prints
its test accuracy, where its weights are, and the FCD of the test set against training images and against uniform
noise.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import re
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from ..console import OneLineArgumentParser
from ..errors import HarnessError, exit_now, run_entry_point
from ..storage.checkpoint import atomic_write_bytes, atomic_write_text
from ..storage.files import file_in_the_way, open_append

# The training recipe. RECIPE is recorded with the weights: bump it whenever anything here or in
# FeatureClassifier changes, so that weights trained another way are retrained instead of reused.
RECIPE = 1
SEED = 0
EPOCHS = 5
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
FEATURE_SIZE = 128
# One thread: a CPU reduction's order depends on the thread count (accelerate launch sets OMP_NUM_THREADS=1,
# a plain run uses every core), and on a shared machine one thread also trains several times faster than two
# that wait for each other at every operator.
TRAIN_THREADS = 1
MIN_SIDE = 8  # two stride-2 convolutions leave at least 2x2
MAX_GRID = 8  # the feature map is average-pooled down to at most 8x8 before the linear layer (large images)

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
LOCK_FILE = ".lock"
# A dataset key names a folder: no separators, no leading dot.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SampleQualityError(HarnessError):
    """Input the sample-quality score cannot use (shapes, pixel range, dataset key, cache folder); one line."""


class FeatureClassifier(nn.Module):
    """conv 5x5/2 (16) -> ReLU -> conv 3x3/2 (32) -> ReLU -> [average pool to at most 8x8] -> linear
    (FEATURE_SIZE) -> ReLU -> linear (classes). `features` is the output of the first linear layer's ReLU: the
    penultimate layer. Input: float pixels in [0, 1] as rows [B, C*H*W]."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = check_image_shape(image_shape)
        self.image_shape, self.num_classes = (channels, height, width), int(num_classes)
        after = (_halved(_halved(height)), _halved(_halved(width)))
        grid = (min(after[0], MAX_GRID), min(after[1], MAX_GRID))
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(grid) if grid != after else nn.Identity(),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(32 * grid[0] * grid[1], FEATURE_SIZE), nn.ReLU())
        self.head = nn.Linear(FEATURE_SIZE, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body((x * 2 - 1).view(-1, *self.image_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _halved(side: int) -> int:
    return (side + 1) // 2  # a stride-2 convolution with "same" padding


def check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise SampleQualityError(f"image shape {image_shape!r}: must be (channels, height, width), three positive "
                                 f"integers")
    if min(shape[1:]) < MIN_SIDE:
        raise SampleQualityError(f"image shape {shape}: the FCD classifier needs images of at least "
                                 f"{MIN_SIDE}x{MIN_SIDE} pixels")
    return shape


# ---------------------------------------------------------------------------------------------------------
# The Fréchet distance


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein) distance between Gaussians fitted to feature rows a [N, F] and b [M, F]:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), in float64, unbiased covariances.

    tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2) (the same eigenvalues as S_a S_b): symmetric eigendecompositions only, no general
    matrix square root, whose complex round-off on nearly singular covariances is what makes FID code fragile."""
    for name, rows in (("a", a), ("b", b)):
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or len(rows) < 2:
            raise SampleQualityError(f"frechet_distance: {name} must be a tensor of feature rows [N, F] with N >= 2 "
                                     f"(got {_describe(rows)})")
        if not torch.isfinite(rows).all():
            raise SampleQualityError(f"frechet_distance: {name} holds NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise SampleQualityError(f"frechet_distance: a has {a.shape[1]} features per row, b {b.shape[1]}")
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    root_a = _psd_sqrt(cov_a)
    cross = root_a @ cov_b @ root_a
    # Round-off leaves tiny negative eigenvalues on singular covariances (dead features): they are zeros.
    trace_root = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0).sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return max(float(distance), 0.0)  # identical sets give +-1e-12, not a negative distance


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {list(value.shape)}"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------------
# Features and the score


def unit_pixels(images: torch.Tensor, image_shape: tuple[int, int, int], name: str = "images") -> torch.Tensor:
    """Rows [N, D] as float32 pixels in [0, 1]: uint8 grey levels are divided by 255, floats must already be in
    [0, 1] (Bernoulli means: torch.sigmoid of a decoder's logits, not the logits)."""
    pixels = math.prod(image_shape)
    if not isinstance(images, torch.Tensor) or images.dim() != 2 or images.shape[1] != pixels or len(images) == 0:
        raise SampleQualityError(f"{name}: expected image rows [N, {pixels}] (image shape {tuple(image_shape)}), got "
                                 f"{_describe(images)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255
    if not images.is_floating_point():
        raise SampleQualityError(f"{name}: expected float pixels in [0, 1] or uint8, got {images.dtype}")
    low, high = images.min().item(), images.max().item()
    if not (0.0 <= low and high <= 1.0):  # also catches NaN
        raise SampleQualityError(f"{name}: pixel values must lie in [0, 1], found {low:.4g} to {high:.4g} (decoder "
                                 f"logits? pass torch.sigmoid(logits))")
    return images.to(torch.float32)


@torch.no_grad()
def features(classifier: FeatureClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The classifier's penultimate-layer features of images [N, D] (float in [0, 1], or uint8), as float64 rows
    [N, FEATURE_SIZE] on the CPU. Runs on whatever device the classifier is on, batch_size images at a time."""
    if batch_size < 1:
        raise SampleQualityError(f"batch size must be >= 1 (got {batch_size})")
    images = unit_pixels(images, classifier.image_shape)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    # In float32 even inside a caller's autocast (a mixed-precision evaluation): bf16 features would move the score.
    with torch.autocast(device.type, enabled=False):
        rows = [classifier.features(images[start:start + batch_size].to(device)).to("cpu", torch.float64)
                for start in range(0, len(images), batch_size)]
    classifier.train(was_training)
    return torch.cat(rows)


def fcd(classifier: FeatureClassifier, samples: torch.Tensor, reference: torch.Tensor, batch_size: int = 500) -> float:
    """The Fréchet classifier distance between samples [N, D] and reference images [M, D] (float pixels in
    [0, 1]; uint8 also taken). Lower is better."""
    return frechet_distance(features(classifier, samples, batch_size), features(classifier, reference, batch_size))


# ---------------------------------------------------------------------------------------------------------
# Training


def dataset_key(name: str, train_images: torch.Tensor, train_labels: torch.Tensor) -> str:
    """`<name>-<16 hex digits>`: the name and a sha256 of the training images (with their shape) and labels. Any
    change to the data, a subset, a binarization, gives another key and so another classifier."""
    if not _KEY.fullmatch(name):
        raise SampleQualityError(f"dataset name {name!r}: letters, digits, '.', '_' and '-' only")
    digest = hashlib.sha256()
    for tensor in (train_images, train_labels):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return f"{name}-{digest.hexdigest()[:16]}"


def accuracy(classifier: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """The share of images whose most likely class is their label."""
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = unit_pixels(images[start:start + batch_size], classifier.image_shape).to(device)
            correct += (classifier(x).argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum().item()
    return correct / len(images)


@torch.enable_grad()  # also when the caller scores under no_grad (evaluate.py trains it on first use)
def train_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, image_shape: tuple[int, int, int], num_classes: int, *,
                     seed: int = SEED) -> tuple[FeatureClassifier, float, float]:
    """A FeatureClassifier trained on the CPU: Adam, the learning rate falling linearly to 0 over EPOCHS epochs,
    batches in an order drawn from `seed`, the initial weights too (the global random state is left as it was).
    Returns (classifier in eval mode, test accuracy, seconds of training)."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        classifier = _initialized(image_shape, num_classes, seed)
        images, labels = train_images.cpu(), train_labels.cpu()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=LEARNING_RATE)
        steps = EPOCHS * -(-len(images) // BATCH_SIZE)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        order_generator = torch.Generator().manual_seed(seed)
        classifier.train()
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(images), generator=order_generator).split(BATCH_SIZE):
                loss = F.cross_entropy(classifier(images[batch].to(torch.float32) / 255), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        seconds = time.perf_counter() - started
        return classifier.eval(), accuracy(classifier, test_images, test_labels), seconds
    finally:
        torch.set_num_threads(threads)


def _initialized(image_shape: tuple[int, int, int], num_classes: int, seed: int) -> FeatureClassifier:
    """A classifier with its initial weights drawn from `seed`; the caller's global random state is left as it
    was (evaluate.py draws its samples from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureClassifier(image_shape, num_classes)


# ---------------------------------------------------------------------------------------------------------
# The cache


def weights_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / key / WEIGHTS_FILE


def classifier_for(cache_dir: str | Path, dataset_key: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, image_shape: tuple[int, int, int],
                   num_classes: int, say=print, *, seed: int = SEED) -> tuple[FeatureClassifier, float]:
    """The dataset's FCD classifier and its test accuracy: loaded from <cache_dir>/<dataset_key>/ when its record
    fits and its weights match their sha256, else trained (a minute or so for MNIST) and cached there. On the CPU,
    in eval mode; move it with .to(device). `classifier.weights_sha256` names its weights (for a metrics file: two
    FCDs are comparable only when made with the same weights). Several processes may call this at once: one
    trains, the others wait and load. A cache folder that cannot be written only means the classifier is trained
    for this process alone."""
    image_shape = check_image_shape(image_shape)
    if not isinstance(dataset_key, str) or not _KEY.fullmatch(dataset_key):
        raise SampleQualityError(f"dataset key {dataset_key!r}: letters, digits, '.', '_' and '-' only (it names "
                                 f"a folder); see vae.evaluation.sample_quality.dataset_key")
    _check_labelled(train_images, train_labels, image_shape, num_classes, "training")
    _check_labelled(test_images, test_labels, image_shape, num_classes, "test")
    folder = Path(cache_dir) / dataset_key
    if (blocker := file_in_the_way(folder)) is not None:
        raise SampleQualityError(f"classifier cache {folder}: {blocker} is a file, not a folder; pass another "
                                 f"cache folder")
    expected = {"dataset_key": dataset_key, "image_shape": list(image_shape), "num_classes": int(num_classes),
                "feature_size": FEATURE_SIZE, "recipe": RECIPE, "seed": seed}
    with _locked(folder) as writable:
        cached = _load_cached(folder, expected, say)
        if cached is not None:
            return cached
        say(f"training the FCD classifier for {dataset_key} ({len(train_images)} images, {EPOCHS} epochs on one "
            f"CPU thread) ...")
        classifier, test_accuracy, seconds = train_classifier(train_images, train_labels, test_images, test_labels,
                                                              image_shape, num_classes, seed=seed)
        say(f"FCD classifier for {dataset_key}: test accuracy {test_accuracy:.2%} after {seconds:.0f} s")
        record = {**expected, "test_accuracy": test_accuracy, "training_seconds": round(seconds, 1),
                  "train_images": len(train_images), "test_images": len(test_images),
                  "torch_version": torch.__version__,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        data = safetensors.torch.save({name: value.contiguous() for name, value in classifier.state_dict().items()})
        classifier.weights_sha256 = hashlib.sha256(data).hexdigest()
        if writable:
            _save(folder, data, {**record, "weights_sha256": classifier.weights_sha256}, say)
        else:
            say(f"cannot write into {folder}: the FCD classifier is used for this run only (trained again next time)")
        return classifier, test_accuracy


def _check_labelled(images, labels, image_shape, num_classes: int, which: str) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise SampleQualityError(f"number of classes must be an integer >= 2 (got {num_classes!r})")
    pixels = math.prod(image_shape)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 2 \
            or images.shape[1] != pixels or len(images) == 0:
        raise SampleQualityError(f"{which} images: expected uint8 rows [N, {pixels}] (image shape "
                                 f"{tuple(image_shape)}), got {_describe(images)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),) or labels.is_floating_point():
        raise SampleQualityError(f"{which} labels: expected integers [{len(images)}], got {_describe(labels)}")
    if labels.min().item() < 0 or labels.max().item() >= num_classes:
        raise SampleQualityError(f"{which} labels: must lie in 0..{num_classes - 1}, found {labels.min().item()} "
                                 f"to {labels.max().item()}")


@contextlib.contextmanager
def _locked(folder: Path):
    """Holds <folder>/.lock (flock) while the cache is read and written, so that one of several racing processes
    trains and the others then load its files. Yields whether the folder is writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open_append(folder / LOCK_FILE)
    except OSError:
        lock = None
    if lock is None:
        yield False  # a read-only cache (a shared data root): read what is there, cache nothing
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (Lustre's noflock, some NFS): atomic files still hold
            pass
        yield True


def _load_cached(folder: Path, expected: dict, say) -> tuple[FeatureClassifier, float] | None:
    """The cached classifier, or None (with one line saying why, unless nothing is cached yet)."""
    record_path, weights = folder / RECORD_FILE, folder / WEIGHTS_FILE
    if not record_path.exists() and not weights.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
        data = weights.read_bytes()  # hashed and loaded from the same bytes: no file swapped in between
    except (OSError, ValueError) as e:
        say(f"the cached FCD classifier in {folder} cannot be read ({type(e).__name__}: {e}); retraining it")
        return None
    if not isinstance(record, dict):
        say(f"{record_path} is not a classifier record; retraining the FCD classifier")
        return None
    differing = [key for key, value in expected.items() if record.get(key) != value]
    if differing:
        say(f"the cached FCD classifier in {folder} was made for another "
            f"{', '.join(f'{key} ({record.get(key)!r}, now {expected[key]!r})' for key in differing)}; retraining it")
        return None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("weights_sha256"):
        say(f"{weights} fails its checksum (sha256 {digest[:16]}, recorded {str(record.get('weights_sha256'))[:16]}); "
            f"retraining the FCD classifier")
        return None
    classifier = _initialized(tuple(expected["image_shape"]), expected["num_classes"], expected["seed"])
    try:
        classifier.load_state_dict(safetensors.torch.load(data))
    except Exception as e:  # a file of the right checksum that safetensors or the model refuses: retrain, too
        say(f"{weights} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); retraining the FCD "
            f"classifier")
        return None
    classifier.weights_sha256 = digest
    return classifier.eval(), float(record["test_accuracy"])


def _save(folder: Path, data: bytes, record: dict, say) -> None:
    """The weights (safetensors bytes), then the record holding their sha256, each written atomically. A failure
    (a full disk) leaves the classifier usable for this run and is said in one line."""
    record = {**record, "weights_file": WEIGHTS_FILE}
    try:
        atomic_write_bytes(folder / WEIGHTS_FILE, lambda f: f.write(data))
        atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=1) + "\n")
    except OSError as e:
        say(f"could not cache the FCD classifier in {folder} ({e.strerror}); it is used for this run only")


# ---------------------------------------------------------------------------------------------------------
# The command


def report(data_root: str, dataset: str, cache_dir: str | None, count: int, batch_size: int, say=print) -> dict:
    """The classifier of `dataset` (trained or loaded), its test accuracy, and the FCD of the test set against
    the first `count` training images and against `count` images of uniform noise. Returns the numbers."""
    from ..config import DataConfig
    from ..datasets import load_dataset

    if count < 2:
        raise SampleQualityError(f"--images must be >= 2 (got {count})")
    if batch_size < 1:
        raise SampleQualityError(f"--batch-size must be >= 1 (got {batch_size})")
    data = load_dataset(DataConfig(name=dataset, root=data_root), say)
    cache = Path(cache_dir) if cache_dir else Path(data_root) / "classifiers"
    key = dataset_key(dataset, data.train_images, data.train_labels)
    classifier, test_accuracy = classifier_for(cache, key, data.train_images, data.train_labels, data.test_images,
                                               data.test_labels, data.image_shape, len(data.class_names), say)
    say(f"FCD classifier: test accuracy {test_accuracy:.2%}; weights {weights_path(cache, key)}")
    reference = features(classifier, data.test_images, batch_size)
    count = min(count, len(data.train_images))
    noise = torch.rand(count, math.prod(data.image_shape), generator=torch.Generator().manual_seed(0))
    results = {"dataset_key": key, "test_accuracy": test_accuracy,
               "fcd_train": frechet_distance(features(classifier, data.train_images[:count], batch_size), reference),
               "fcd_noise": frechet_distance(features(classifier, noise, batch_size), reference)}
    say(f"FCD of the test set ({len(data.test_images)} images) against the first {count} training images: "
        f"{results['fcd_train']:.3f}")
    say(f"FCD of the test set against {count} images of uniform noise: {results['fcd_noise']:.1f}")
    return results


class _Parser(OneLineArgumentParser):
    # argparse wraps a long usage over several lines (at the terminal's width); the error must stay one line.
    def format_usage(self) -> str:
        return " ".join(super().format_usage().split()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m vae.evaluation.sample_quality",
        description="Train (first use) or load a dataset's FCD classifier; print its test accuracy, where its "
                    "weights are, and the FCD of the test set against training images and against noise.")
    parser.add_argument("--data-root", default="data", help="folder holding the datasets (default: data)")
    parser.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    parser.add_argument("--cache-dir", default=None, help="classifier cache (default: <data root>/classifiers)")
    parser.add_argument("--images", type=int, default=10000,
                        help="training images, and noise images, compared with the test set (default: 10000)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default: 500)")
    args = parser.parse_args(argv)
    return run_entry_point(
        lambda: report(args.data_root, args.dataset, args.cache_dir, args.images, args.batch_size),
        "the cache is written atomically: run the same command again")


if __name__ == "__main__":
    exit_now(main())
