"""The Fréchet classifier distance (vae.evaluation.sample_quality), tested for sense on real MNIST: the distance
itself against closed forms, the score's order (test set vs training set < trained models < noise, a better model
below a worse one), the classifier's accuracy, its cache (load, checksum, dataset key, racing callers) and its
determinism.

One classifier, trained on all of MNIST, is shared by the module (`mnist_classifier`); the cache tests train
small ones on 2,000 images (a few seconds each)."""

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vae.datasets.mnist import load_mnist
from vae.evaluation import sample_quality as sq

from .conftest import python

MNIST_SHAPE = (1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist(mnist_root):
    train_images, train_labels = load_mnist(mnist_root, train=True)
    test_images, test_labels = load_mnist(mnist_root, train=False)
    return train_images, train_labels, test_images, test_labels


@pytest.fixture(scope="module")
def mnist_classifier(mnist, mnist_root):
    """(classifier, test accuracy, the test set's features, the cache folder): MNIST's classifier, trained as
    classifier_for trains it on first use, in the cache evaluate.py uses (<data root>/classifiers/): the suite
    trains it once."""
    train_images, train_labels, test_images, test_labels = mnist
    key = sq.dataset_key("mnist", train_images, train_labels)
    cache = Path(mnist_root) / "classifiers"
    classifier, accuracy = sq.classifier_for(cache, key, *mnist, MNIST_SHAPE, 10, say=lambda line: None)
    return classifier, accuracy, sq.features(classifier, test_images), cache


def small(mnist, train: int = 2000, test: int = 500):
    """A small labelled MNIST: the cache tests' classifiers train on it in about a second."""
    train_images, train_labels, test_images, test_labels = mnist
    return train_images[:train], train_labels[:train], test_images[:test], test_labels[:test]


def cached(cache_dir, key, data, lines=None):
    say = (lambda line: lines.append(line)) if lines is not None else (lambda line: None)
    return sq.classifier_for(cache_dir, key, *data, MNIST_SHAPE, 10, say=say)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)


# ---------------------------------------------------------------------------------------------------------
# The Fréchet distance


def test_frechet_distance_of_identical_feature_sets_is_zero():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(500, 20, generator=generator, dtype=torch.float64) @ torch.randn(20, 20, generator=generator,
                                                                                        dtype=torch.float64) + 3
    assert sq.frechet_distance(rows, rows.clone()) == pytest.approx(0.0, abs=1e-6)
    assert sq.frechet_distance(rows, rows + 0.5) == pytest.approx(20 * 0.25, rel=1e-9)  # the mean term alone


def _with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n rows whose sample mean and (unbiased) sample covariance are exactly `mean` and `cov`."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T  # whitened: sample covariance I
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_two_gaussians_equals_the_closed_form():
    # 2x2, any covariances: tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    m1, m2 = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    cross = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(torch.det(s1) * torch.det(s2)))
    expected = float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * cross)
    got = sq.frechet_distance(_with_moments(m1, s1, 400, 1), _with_moments(m2, s2, 300, 2))
    assert got == pytest.approx(expected, rel=1e-9)
    # 16 dimensions, covariances sharing their eigenvectors: sum of (sqrt(l1) - sqrt(l2))^2 over eigenvalues.
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    l1 = torch.linspace(0.1, 4.0, 16, dtype=torch.float64)
    l2 = torch.linspace(2.0, 0.05, 16, dtype=torch.float64)
    m1, m2 = torch.zeros(16, dtype=torch.float64), torch.full((16,), 0.25, dtype=torch.float64)
    expected = float((m1 - m2).square().sum() + (l1.sqrt() - l2.sqrt()).square().sum())
    got = sq.frechet_distance(_with_moments(m1, q @ torch.diag(l1) @ q.T, 1000, 4),
                              _with_moments(m2, q @ torch.diag(l2) @ q.T, 800, 5))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_refuses_rows_it_cannot_score_in_one_line():
    rows = torch.randn(10, 4)
    for a, b, words in [(rows, torch.randn(10, 5), "features per row"), (rows[:1], rows, "N >= 2"),
                        (rows.flatten(), rows, "[N, F]"), (rows, rows.masked_fill(rows > 1, math.nan), "NaN")]:
        with pytest.raises(sq.SampleQualityError, match=r"frechet_distance") as error:
            sq.frechet_distance(a, b)
        assert words in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# The score on MNIST


@pytest.mark.slow
def test_the_classifier_reaches_its_accuracy(mnist_classifier):
    assert mnist_classifier[1] >= 0.985


@pytest.fixture(scope="module")
def reference_scores(mnist, mnist_classifier) -> dict:
    """FCD against the test set of the first 10,000 training images and of 10,000 images of uniform noise."""
    classifier, _, reference, _ = mnist_classifier
    noise = torch.rand(10000, 784, generator=torch.Generator().manual_seed(0))
    return {"real": sq.frechet_distance(sq.features(classifier, mnist[0][:10000]), reference),
            "noise": sq.frechet_distance(sq.features(classifier, noise), reference)}


@pytest.mark.slow
def test_the_test_set_against_training_images_scores_near_zero(mnist_classifier, reference_scores):
    # Seen: 5.15, against a total feature variance tr(S_test) of 1240; two disjoint sets of 10,000 training
    # images score 3.1 (the floor set by 10,000 samples of 128 features).
    assert reference_scores["real"] < 15, reference_scores
    assert reference_scores["real"] < reference_scores["noise"] / 50, reference_scores


@pytest.mark.slow
def test_noise_scores_far_above_real_images(reference_scores):
    # Seen: 1360 against 5.15.
    assert reference_scores["noise"] > 100 * max(reference_scores["real"], 0.01), reference_scores


def _train_vae(images: torch.Tensor, steps: int, z_dim: int = 8, batch: int = 100):
    """The harness's MLP VAE (784-400-z), trained in-process for `steps` Adam steps on -ELBO."""
    from vae.models import MLPVAE as VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VAE(z_dim=z_dim, hidden=(400,))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = images[torch.randint(len(images), (batch,), generator=generator)].float() / 255
            logits, mu, logvar = model(x, torch.randn(batch, z_dim, generator=generator))
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum()
            optimizer.zero_grad()
            ((recon + kl) / batch).backward()
            optimizer.step()
    return model


@torch.no_grad()
def _samples(model, count: int, z_dim: int = 8) -> torch.Tensor:
    decode = getattr(model, "decode", None) or model.decoder
    return torch.sigmoid(decode(torch.randn(count, z_dim, generator=torch.Generator().manual_seed(1))))


@pytest.mark.slow
def test_a_better_model_scores_lower_and_trained_models_lie_between_real_images_and_noise(
        mnist, mnist_classifier, reference_scores):
    classifier, _, reference, _ = mnist_classifier
    scores = dict(reference_scores)
    for name, steps in (("worse", 200), ("better", 800)):
        scores[name] = sq.frechet_distance(sq.features(classifier, _samples(_train_vae(mnist[0], steps), 10000)),
                                           reference)
    # Seen: real 5.15 < better 384 < worse 689 < noise 1360.
    assert scores["real"] < scores["better"] < scores["worse"] < scores["noise"], scores
    # A clear order, not a tie within noise: each at least 1.4 times the one before.
    assert scores["better"] > 1.4 * scores["real"] and scores["worse"] > 1.4 * scores["better"], scores


@pytest.mark.slow
def test_fcd_takes_pixels_in_0_1_in_float32_and_refuses_logits(mnist, mnist_classifier):
    classifier = mnist_classifier[0]
    images = mnist[2][:500]
    assert sq.fcd(classifier, images.float() / 255, images) == pytest.approx(0.0, abs=1e-6)  # uint8 = /255
    plain = sq.features(classifier, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision caller: the features stay float32
        assert torch.equal(sq.features(classifier, images), plain)
    with pytest.raises(sq.SampleQualityError, match=r"must lie in \[0, 1\].*sigmoid"):
        sq.fcd(classifier, torch.logit(images.float() / 255, eps=1e-3), images)
    with pytest.raises(sq.SampleQualityError, match=r"expected image rows \[N, 784\]"):
        sq.fcd(classifier, images.float()[:, :700] / 255, images)


# ---------------------------------------------------------------------------------------------------------
# The cache and determinism


def test_a_second_call_loads_the_cached_classifier_without_training(mnist, tmp_path):
    data, lines = small(mnist), []
    first, accuracy = cached(tmp_path, "mnist-small", data, lines)
    assert any(line.startswith("training the FCD classifier") for line in lines)
    record = json.loads((tmp_path / "mnist-small" / sq.RECORD_FILE).read_text())
    weights = (tmp_path / "mnist-small" / sq.WEIGHTS_FILE).read_bytes()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest() == first.weights_sha256
    assert record["test_accuracy"] == accuracy and record["seed"] == sq.SEED and record["feature_size"] == 128
    assert record["dataset_key"] == "mnist-small" and record["image_shape"] == [1, 28, 28]
    lines.clear()
    started = time.perf_counter()
    second, again = cached(tmp_path, "mnist-small", data, lines)
    assert lines == [] and again == accuracy and same_weights(first, second)
    assert second.weights_sha256 == record["weights_sha256"]
    assert time.perf_counter() - started < 0.5 * record["training_seconds"] + 0.2


def test_a_tampered_weights_file_is_detected_by_its_checksum_and_retrained(mnist, tmp_path):
    data = small(mnist)
    original, _ = cached(tmp_path, "mnist-small", data)
    path = tmp_path / "mnist-small" / sq.WEIGHTS_FILE
    tampered = bytearray(path.read_bytes())
    tampered[-5] ^= 0x01  # one bit of the last weight: the file still loads, only the checksum tells
    path.write_bytes(bytes(tampered))
    lines = []
    retrained, _ = cached(tmp_path, "mnist-small", data, lines)
    checksum = [line for line in lines if "fails its checksum" in line]
    assert len(checksum) == 1 and str(path) in checksum[0] and "retraining" in checksum[0], lines
    assert any(line.startswith("training the FCD classifier") for line in lines)
    assert same_weights(original, retrained)  # deterministic: the same weights again, and the file restored
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        json.loads((tmp_path / "mnist-small" / sq.RECORD_FILE).read_text())["weights_sha256"]


def test_a_different_dataset_key_trains_a_new_classifier(mnist, tmp_path):
    train_images, train_labels, test_images, test_labels = small(mnist)
    key = sq.dataset_key("mnist", train_images, train_labels)
    changed = train_images.clone()
    changed[0, 400] ^= 0xFF  # one pixel of one image
    assert sq.dataset_key("mnist", changed, train_labels) != key
    assert sq.dataset_key("mnist", train_images, train_labels.roll(1)) != key
    assert sq.dataset_key("fashion_mnist", train_images, train_labels) != key
    assert sq.dataset_key("mnist", train_images.clone(), train_labels.clone()) == key
    cached(tmp_path, key, small(mnist))
    lines = []
    cached(tmp_path, sq.dataset_key("mnist", changed, train_labels), (changed, train_labels, test_images,
                                                                       test_labels), lines)
    assert any(line.startswith("training the FCD classifier") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key, sq.dataset_key("mnist", changed,
                                                                                        train_labels)])


def test_racing_callers_train_once_and_share_the_weights(mnist, tmp_path):
    data, lines, results = small(mnist), [], []
    callers = [threading.Thread(target=lambda: results.append(cached(tmp_path, "mnist-small", data, lines)))
               for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(results) == 3
    assert sum(line.startswith("training the FCD classifier") for line in lines) == 1, lines
    assert all(same_weights(results[0][0], other) for other, _ in results[1:])


def test_two_trainings_with_the_same_seed_give_identical_weights(mnist):
    data = small(mnist, train=1000, test=200)
    first, accuracy, _ = sq.train_classifier(*data, MNIST_SHAPE, 10)
    second, again, _ = sq.train_classifier(*data, MNIST_SHAPE, 10)
    assert same_weights(first, second) and accuracy == again
    other, _, _ = sq.train_classifier(*data, MNIST_SHAPE, 10, seed=1)
    assert not same_weights(first, other)  # the seed is what fixes them


def test_a_caller_scoring_under_no_grad_still_gets_a_trained_classifier(mnist):
    """evaluate.py scores under torch.no_grad(); the first evaluation of a dataset trains its classifier there."""
    data = small(mnist, train=1000, test=200)
    with torch.no_grad():
        classifier, accuracy, _ = sq.train_classifier(*data, MNIST_SHAPE, 10)
    assert accuracy > 0.5


def test_any_image_shape_of_at_least_8x8(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 32, 32), (1, 8, 8), (2, 9, 40), (1, 64, 64)]:
        pixels = math.prod(shape)
        images = torch.randint(0, 256, (64, pixels), generator=generator, dtype=torch.uint8)
        labels = torch.arange(64) % 3
        classifier, _ = sq.classifier_for(tmp_path, f"shape-{'x'.join(map(str, shape))}", images, labels, images,
                                          labels, shape, 3, say=lambda line: None)
        assert sq.features(classifier, images, batch_size=10).shape == (64, sq.FEATURE_SIZE)
    with pytest.raises(sq.SampleQualityError, match=r"at least 8x8"):
        sq.classifier_for(tmp_path, "tiny", images[:, :49], labels, images[:, :49], labels, (1, 7, 7), 3)


def test_bad_input_is_one_line(mnist, tmp_path):
    data = small(mnist, train=10, test=10)
    for key in ("../up", ".hidden", "a/b", ""):
        with pytest.raises(sq.SampleQualityError, match="dataset key"):
            cached(tmp_path, key, data)
    images, labels = data[0], data[1]
    with pytest.raises(sq.SampleQualityError, match=r"training labels: must lie in 0\.\.9"):
        cached(tmp_path, "k", (images, labels + 10, *data[2:]))
    with pytest.raises(sq.SampleQualityError, match=r"training images: expected uint8 rows"):
        cached(tmp_path, "k", (images.float(), labels, *data[2:]))
    (tmp_path / "file").write_text("")
    with pytest.raises(sq.SampleQualityError, match=r"is a file, not a folder"):
        sq.classifier_for(tmp_path / "file", "k", *data, MNIST_SHAPE, 10)


def test_the_command_answers_bad_arguments_in_one_line(tmp_path, capsys):
    assert sq.main(["--images", "1", "--data-root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: --images must be >= 2 (got 1)\n"
    with pytest.raises(SystemExit) as stopped:
        sq.main(["--dataset", "cifar"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: argument --dataset: invalid choice")
    assert len(err.splitlines()) == 1 and "usage: python -m vae.evaluation.sample_quality" in err


@pytest.mark.slow
def test_the_command_prints_the_accuracy_the_weights_and_both_scores(mnist_root, mnist_classifier, reference_scores):
    """`python -m vae.evaluation.sample_quality` on the cache the module's classifier is in: it loads, does not
    train."""
    cache = mnist_classifier[3]
    result = python("-m", "vae.evaluation.sample_quality", "--data-root", str(mnist_root), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert "training the FCD classifier" not in result.stdout, result.stdout
    assert f"test accuracy {mnist_classifier[1]:.2%}; weights {cache}/mnist-" in result.stdout, result.stdout
    train_line, noise_line = result.stdout.splitlines()[-2:]
    assert train_line.startswith("FCD of the test set (10000 images) against the first 10000 training images: ")
    assert noise_line.startswith("FCD of the test set against 10000 images of uniform noise: ")
    assert float(train_line.rsplit(" ", 1)[1]) == pytest.approx(reference_scores["real"], abs=1e-3)
    assert float(noise_line.rsplit(" ", 1)[1]) == pytest.approx(reference_scores["noise"], abs=0.1)
