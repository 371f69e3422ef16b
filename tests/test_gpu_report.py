"""The GPU check's report, rendered on the CPU from the files a real H200 check wrote (docs/gpu/): what the next
GPU check will show must not first break on the GPU machine, where every minute counts."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_report  # noqa: E402

H200 = REPO / "docs" / "gpu"


@pytest.fixture
def report():
    report = json.loads((H200 / "report-h200-2026-11-28.json").read_text())
    report["step_profile"] = json.loads((H200 / "step-profile-h200-2026-11-28.json").read_text())
    return report


def _by_target(report) -> dict:
    return {t["target"].split(":")[0]: t for t in gpu_report.targets(report)}


def test_the_h200_targets_read_as_measured(report):
    targets = _by_target(report)
    assert targets["batch 50"]["measured"] == "1.8x plain, 18.5x CUDA graph" and targets["batch 50"]["met"] == "no"
    assert targets["z2 CUDA graph"]["measured"] == "6.98 s" and targets["z2 CUDA graph"]["met"] == "no"
    assert targets["z20 bf16"]["met"] == "not measured"  # that check's budget ran out during the bf16 run


def test_the_graph_target_reads_only_the_harness_graph_step_not_the_compiled_experiment(report):
    graph = _by_target(report)["CUDA graph"]
    assert graph["measured"] == "batch 50: 1.05x, batch 1024: 1.11x" and graph["met"] == "yes"


def test_the_step_profile_shows_launch_cost_every_variant_and_the_costliest_kernels(report):
    text = "\n".join(gpu_report._md_step_profile(report))
    assert "One tiny kernel on this machine: 11.2 us launched eagerly from Python, 0.85 us inside a CUDA graph" in text
    for variant in ("eager", "graph", "compiled", "compiled + graph"):
        assert f"| 50 | {variant} |" in text and f"| 1024 | {variant} |" in text
    assert "| 50 | graph | 250.4 | 237.5 | 1.05 | 79 | 199,697 |" in text
    assert text.count("Costliest device operations") == 8 and "multi_tensor_apply_kernel" in text


def test_a_variant_that_failed_is_a_row_of_its_own_and_the_whole_report_still_renders(report):
    report["step_profile"]["rows"].append({"batch_size": 50, "variant": "compiled + graph", "error": "no Triton"})
    assert "| 50 | compiled + graph | failed: no Triton |" in "\n".join(gpu_report._md_step_profile(report))
    markdown = gpu_report.render_markdown(report)
    assert markdown.startswith("# GPU check: NVIDIA H200") and "## Targets" in markdown
