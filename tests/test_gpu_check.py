"""scripts/gpu_bench.py (run by scripts/gpu_check.sh): its pure functions and a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gpu_bench
from samserve import matmul
from samserve.engine import SamEngine
from samserve.models import build_sam, random_checkpoint, spec_by_name
from training.evaluate import heldout


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


def test_object_prompts_alternate_a_click_and_a_box_on_each_object():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 5:7, 5:8] = True
    prompts = gpu_bench.object_prompts(masks, np.random.default_rng(0))
    assert [p.box is None for p in prompts] == [True, False, True, False]
    assert prompts[1].box.tolist() == [1, 1, 4, 3] and prompts[3].box.tolist() == [5, 5, 8, 7]
    for prompt, mask in ((prompts[0], masks[0]), (prompts[2], masks[1])):
        (x, y), label = prompt.point_coords[0], prompt.point_labels[0]
        assert mask[int(y), int(x)] and label == 1
    more = gpu_bench.object_prompts(masks, np.random.default_rng(0), 5)
    assert len(more) == 5 and masks[0][tuple(more[4].point_coords[0, ::-1].astype(int))]


def _micro_engine(checkpoint, threshold: float = 0.0) -> SamEngine:
    """An engine of its own sam_micro model (the session's is shared) from ``checkpoint``,
    its masks thresholded at ``threshold``."""
    model = build_sam(spec_by_name("sam_micro"), checkpoint)
    model.mask_threshold = threshold
    return SamEngine(model)


@pytest.fixture(scope="module")
def two_images():
    return [(sample.image, sample.masks) for sample in heldout(2)]


def test_engines_with_the_same_weights_agree_on_every_mask_pixel(checkpoints, two_images):
    first, second = (_micro_engine(checkpoints["sam_micro"]) for _ in range(2))
    same = gpu_bench.mask_agreement(first, second, two_images, prompts=3)
    assert (same.agreement, same.iou, same.images, same.prompts) == (1.0, 1.0, 2, 6)
    least, most = same.foreground_range
    assert 0.0 < least <= same.foreground <= most < 1.0  # random weights: neither none nor all


def test_another_threshold_or_other_weights_agree_less(checkpoints, two_images, tmp_path):
    reference = _micro_engine(checkpoints["sam_micro"])
    same = gpu_bench.mask_agreement(reference, reference, two_images, prompts=3)
    higher = _micro_engine(checkpoints["sam_micro"], threshold=0.01)
    stricter = gpu_bench.mask_agreement(higher, reference, two_images, prompts=3)
    assert 0.0 < stricter.agreement < 1.0 and 0.0 < stricter.iou < 1.0
    assert stricter.foreground == same.foreground  # the reference's masks, unchanged
    other = tmp_path / "seed1.pth"
    random_checkpoint(spec_by_name("sam_micro"), other, seed=1)
    unrelated = gpu_bench.mask_agreement(_micro_engine(other), reference, two_images, prompts=3)
    assert unrelated.agreement < 0.9 and unrelated.iou < 0.9


def test_encoder_label_says_how_the_encoder_computes(checkpoints):
    assert gpu_bench.encoder_label(_micro_engine(checkpoints["sam_micro"])) == "float32, sliced"


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
    agreement = model["agreement"]
    assert (agreement["encoder"], agreement["reference"]) == ("float32, sliced",) * 2
    assert agreement["agreement"] == 1.0 and (agreement["images"], agreement["prompts"]) == (2, 8)
    report = (tmp_path / "gpu-cpu.md").read_text()
    assert "CPU smoke run, not GPU numbers" in report and "## sam_micro" in report
    assert "| pixels that agree |" in report


def test_agreement_only_run_of_the_cuda_encoder_on_a_cpu(tmp_path, monkeypatch):
    """The CUDA encoder's defaults, bfloat16 autocast and SDPA, run on a CPU: its masks
    are compared with float32's, without timings."""
    monkeypatch.setattr(matmul, "_onednn", matmul._onednn)  # the run sets the process's
    args = ["--device", "cpu", "--quick", "--models", "sam_micro", "--out", str(tmp_path)]
    args += ["--agreement-only", "--encoder-dtype", "bfloat16", "--encoder-attention", "sdpa"]
    assert gpu_bench.main(args) == 0
    result = json.loads((tmp_path / "gpu-cpu.json").read_text())
    model = result["models"]["sam_micro"]
    assert set(model) == {"weights", "agreement"} and model["weights"] == "random"
    assert model["agreement"]["encoder"] == "bfloat16 autocast, sdpa"
    assert 0.5 < model["agreement"]["agreement"] <= 1.0


def test_a_cuda_run_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_bench.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_the_check_script_runs_on_a_cpu_into_a_folder_it_makes(tmp_path):
    """``gpu_check.sh run`` as the device tool runs it, with DEVICE=cpu: it makes $OUT
    and leaves there the versions, the CUDA tests' log and the benchmark's results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "not" / "there"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable}
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "run"], cwd=repo, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "No such file" not in done.stdout + done.stderr
    for name in ("versions.txt", "pytest.log", "bench.log", "gpu-cpu.json", "gpu-cpu.md"):
        assert (out / name).stat().st_size > 0, name
