"""scripts/gpu_bench.py (run by scripts/gpu_check.sh): its pure functions and a smoke run."""

from __future__ import annotations

import json

import pytest
import torch

import gpu_bench


def test_summarize_and_throughput():
    summary = gpu_bench.summarize([30.0, 10.0, 20.0])
    assert summary["n"] == 3 and summary["p50"] == 20.0 and summary["min"] == 10.0
    assert gpu_bench.summarize([]) == {"n": 0}
    assert gpu_bench.images_per_second(8, [400.0, 500.0, 600.0]) == 16.0


def test_click_body_by_id_or_with_the_image():
    body = gpu_bench.click_body("abc", [[1.0, 2.0], [3.0, 4.0]])
    assert body["image_id"] == "abc" and "image" not in body
    assert body["prompts"] == [
        {"points": [[1.0, 2.0]], "labels": [1]},
        {"points": [[3.0, 4.0]], "labels": [1]},
    ]
    assert (body["multimask"], body["output"]) == (True, "rle")
    with_image = gpu_bench.click_body("", [[1.0, 2.0]], b"\xff\xd8")
    assert with_image["image"] == "/9g=" and "image_id" not in with_image


def test_result_name_of_a_cpu():
    assert gpu_bench.result_name(torch.device("cpu")) == "cpu"


def test_quick_counts_are_smaller():
    full, quick = gpu_bench.Counts(), gpu_bench.Counts.quick()
    assert full.batches == (1, 4, 8) and full.everything_points == 32
    assert max(quick.batches) < max(full.batches)
    assert quick.click_repeats < full.click_repeats


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    code = gpu_bench.main(
        ["--device", "cpu", "--quick", "--models", "sam_micro", "--out", str(tmp_path)]
    )
    assert code == 0
    result = json.loads((tmp_path / "gpu-cpu.json").read_text())
    model = result["models"]["sam_micro"]
    assert set(model["encoder"]) == {"1", "2"}
    assert all(entry["images_per_s"] > 0 for entry in model["encoder"].values())
    assert {
        "cold click (image + 1 prompt)",
        "warm click, 1 prompt",
        "warm click, 16 prompts",
        "warm request, 64 prompts",
        "segment everything, 8x8 points",
    } == set(model["requests"])
    report = (tmp_path / "gpu-cpu.md").read_text()
    assert "CPU smoke run, not GPU numbers" in report and "## sam_micro" in report


def test_a_cuda_run_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_bench.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
