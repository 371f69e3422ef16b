"""evaluate.py on a real (briefly) trained checkpoint: metrics, their bound properties, process-count
independence, figures, and every bad input as a one-line error."""

import json
import pickle

import pytest
import torch

from vae.storage.checkpoint import load_model_file

from .conftest import accelerate_launch, assert_ok, python, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_root):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    assert_ok(python(*train_cmd(run_dir, mnist_root, "log.figures=false")))
    return run_dir


def _evaluate(*args, launcher=None):
    result = (accelerate_launch(*launcher, "evaluate.py", *args) if launcher else python("evaluate.py", *args))
    return result


def test_metrics_figures_and_bound(trained_run, tmp_path):
    out = tmp_path / "m.json"
    result = _evaluate("--ckpt", str(trained_run), "--iwae-k", "50", "--out", str(out), "--out-dir",
                       str(tmp_path / "figs"))
    assert_ok(result)
    m = json.loads(out.read_text())
    assert m["n_images"] == 10000 and m["iwae_k"] == 50 and m["checkpoint_epoch"] == 1
    assert m["checkpoint"].endswith("best.pt")
    assert m["nelbo"] == pytest.approx(m["recon"] + m["kl"], rel=1e-6)
    assert sum(m["kl_per_dim"]) == pytest.approx(m["kl"], rel=1e-5)
    assert len(m["kl_per_dim"]) == 2 and 0 <= m["active_units"] <= 2
    assert m["iwae_nll"] < m["nelbo"]
    for name in ("reconstructions.png", "samples.png", "latent.png", "manifold.png", "interpolation.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 10_000, name
    assert "IWAE NLL (k=50)" in result.stdout
    # The Fréchet classifier distance of 10,000 prior samples: a model of 40 steps is far from the test set (its
    # blurred averages score about 1,650 here, worse than uniform noise's 1,360; the training images score 5)
    assert m["fcd_samples"] == 10000 and 100 < m["fcd"] < 5000, m["fcd"]
    assert m["fcd_classifier"]["test_accuracy"] >= 0.985 and len(m["fcd_classifier"]["weights_sha256"]) == 64
    assert "FCD (10,000 samples)" in result.stdout


def test_iwae_tightens_with_k_and_is_seeded(trained_run, tmp_path):
    values = {}
    for k in (1, 5, 25):  # IWAE's cost grows with k: 25 importance samples tighten the bound clearly
        out = tmp_path / f"k{k}.json"
        assert_ok(_evaluate("--ckpt", str(trained_run / "last.pt"), "--iwae-k", str(k), "--out", str(out),
                            "--no-figures"))
        values[k] = json.loads(out.read_text())
    # k=1 is a single-sample -ELBO with other draws: equal up to Monte-Carlo noise
    assert values[1]["iwae_nll"] == pytest.approx(values[1]["nelbo"], abs=0.5)
    assert values[25]["iwae_nll"] < values[5]["iwae_nll"] < values[1]["iwae_nll"]
    again = tmp_path / "again.json"
    assert_ok(_evaluate("--ckpt", str(trained_run / "last.pt"), "--iwae-k", "5", "--out", str(again),
                        "--no-figures"))
    repeat = json.loads(again.read_text())
    for key in ("nelbo", "iwae_nll", "recon", "kl"):
        assert repeat[key] == values[5][key]


def test_three_processes_give_the_one_process_numbers(trained_run, tmp_path):
    # --batch-size 500 over 3 processes: shares of 3,334 / 3,333 / 3,333 images in batches of 166
    one, three = tmp_path / "one.json", tmp_path / "three.json"
    assert_ok(_evaluate("--ckpt", str(trained_run), "--iwae-k", "20", "--out", str(one), "--no-figures"))
    assert_ok(_evaluate("--ckpt", str(trained_run), "--iwae-k", "20", "--out", str(three), "--no-figures", "--cpu",
                        "--batch-size", "500", "--dist-backend", "gloo",
                        launcher=["--multi_gpu", "--num_processes", "3"]))
    a, b = json.loads(one.read_text()), json.loads(three.read_text())
    assert b["num_processes"] == 3 and b["n_images"] == 10000
    for key in ("nelbo", "recon", "kl", "iwae_nll"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert b["active_units"] == a["active_units"]


def test_n_processes_that_would_each_run_alone_are_refused(trained_run, tmp_path):
    """Without --cpu on a machine without GPUs, the launcher starts 2 processes that each think they are alone."""
    result = _evaluate("--ckpt", str(trained_run), "--out", str(tmp_path / "m.json"), "--no-figures",
                       launcher=["--multi_gpu", "--num_processes", "2"])
    assert result.returncode != 0
    assert "launched as 2 processes but Accelerate sees only one" in result.stderr and "--cpu" in result.stderr
    assert not (tmp_path / "m.json").exists()


def _write_evil_checkpoint(path, marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump({"kind": "vae-mnist-model", "payload": Evil()}, f)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "not_a_checkpoint", "truncated", "old_version",
                                  "pickle_with_code", "iwae_k_zero", "shape_mismatch", "out_is_a_folder",
                                  "out_dir_is_a_file", "data_root_is_a_file", "nccl_on_cpu"])
def test_bad_inputs_are_one_line_errors(case, trained_run, tmp_path):
    marker = tmp_path / "code-ran"
    args = ["--iwae-k", "2", "--no-figures"]
    if case == "missing":
        ckpt = tmp_path / "nope.pt"
        expected = "does not exist"
    elif case == "empty_dir":
        ckpt = tmp_path
        expected = "no checkpoint in directory"
    elif case == "not_a_checkpoint":
        ckpt = tmp_path / "notes.pt"
        ckpt.write_text("hello")
        expected = "not a readable checkpoint"
    elif case == "truncated":
        ckpt = tmp_path / "cut.pt"
        ckpt.write_bytes((trained_run / "last.pt").read_bytes()[:5000])
        expected = "not a readable checkpoint"
    elif case == "old_version":
        payload = load_model_file(trained_run / "last.pt")
        payload["format_version"] = 0
        ckpt = tmp_path / "old.pt"
        torch.save(payload, ckpt)
        expected = "format version 0"
    elif case == "pickle_with_code":
        ckpt = tmp_path / "evil.pt"
        _write_evil_checkpoint(ckpt, marker)
        expected = "refused by the safe loader"
    elif case == "iwae_k_zero":
        ckpt = trained_run
        args = ["--iwae-k", "0"]
        expected = "--iwae-k: must be >= 1"
    elif case == "nccl_on_cpu":
        ckpt, args = trained_run, ["--iwae-k", "100000", "--dist-backend", "nccl", "--cpu"]
        expected = "--dist-backend: nccl needs CUDA GPUs (this run is on cpu); use gloo or auto"
    elif case in ("out_is_a_folder", "out_dir_is_a_file", "data_root_is_a_file"):
        # refused before the scoring, which --iwae-k 100000 would make minutes long
        ckpt, args = trained_run, ["--iwae-k", "100000"]
        (tmp_path / "a-file").write_text("mine")
        args += {"out_is_a_folder": ["--out", str(tmp_path)],
                 "out_dir_is_a_file": ["--out-dir", str(tmp_path / "a-file")],
                 "data_root_is_a_file": ["--data-root", str(tmp_path / "a-file" / "mnist")]}[case]
        expected = {"out_is_a_folder": f"--out {tmp_path} is a folder; pass a file name",
                    "out_dir_is_a_file": f"{tmp_path / 'a-file'} is a file, not a folder",
                    "data_root_is_a_file": f"--data-root {tmp_path / 'a-file' / 'mnist'} cannot be a folder"}[case]
    else:
        payload = load_model_file(trained_run / "last.pt")
        payload["config"]["model"]["z_dim"] = 5
        ckpt = tmp_path / "mismatch.pt"
        torch.save(payload, ckpt)
        expected = "weights do not fit its model config"
    result = _evaluate("--ckpt", str(ckpt), *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists(), "loading a checkpoint ran code from it"


@pytest.mark.parametrize("args", [["--ckpt", "x", "--dist-backend", "foo"], ["--bogus"]])
def test_usage_mistakes_are_one_line_however_long_the_usage(args):
    """evaluate.py's usage is longer than a terminal line: argparse wraps it, the error must not."""
    result = python("evaluate.py", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "usage: evaluate.py [-h] --ckpt CKPT" in result.stderr
