"""scripts/profile_decoder.py on sam_micro: what it reports adds up (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from profile_decoder import OpTimes, main, op_name


def test_op_name_drops_namespace_and_overload() -> None:
    assert op_name(torch.ops.aten.addmm.default) == "addmm"
    assert op_name(torch.ops.aten.baddbmm_.default) == "baddbmm_"


def test_op_times_count_each_op_once() -> None:
    a, b = torch.randn(8, 4), torch.randn(4, 3)
    with OpTimes() as ops:
        torch.relu(a @ b)
        torch.relu(a @ b)
    names = {name: calls for (name, _), calls in ops.calls.items()}
    assert names == {"mm": 2, "relu": 2}  # mm's own kernels are not counted again
    assert all(seconds > 0 for seconds in ops.seconds.values())


FLOPS: dict[str, int] = {}  # matrix-product FLOPs per prompt of the first backend's profile
PRODUCT_OP = {"torch": "linear", "onednn": "_linear_pointwise"}
"""The upscaling's products, as each ``--cpu-matmul`` backend runs them."""


@pytest.mark.parametrize(
    "backend", ["torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
)
def test_profile_of_sam_micro_adds_up(
    tmp_path: Path, capsys: pytest.CaptureFixture, backend: str
) -> None:
    out = tmp_path / "profile.json"
    args = ["--model", "sam_micro", "--prompts", "2", "--repeats", "2", "--image-size", "60x80",
            "--json", str(out), "--cache", str(tmp_path), "--cpu-matmul", backend]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    ops = result["ops"]
    assert result["timed_ms"] == pytest.approx(sum(row["ms"] for row in ops), abs=1e-3)
    assert result["matmul_ms"] == pytest.approx(
        sum(row["ms"] for row in ops if row["matmul"]), abs=1e-3
    )
    names = {row["op"] for row in ops}
    assert {"layer_norm", "softmax", PRODUCT_OP[backend]} <= names
    assert result["cpu_matmul"] == backend
    # The FLOPs are counted whichever library multiplies (bench.flop_counter knows both).
    assert result["matmul_flops"] == FLOPS.setdefault("sam_micro", result["matmul_flops"])
    assert all(row["calls"] >= 1 for row in ops)
    assert [row["ms"] for row in ops] == sorted((row["ms"] for row in ops), reverse=True)
    assert result["matmul_flops"] > 0 and result["matmul_gflops"] > 0
    printed = capsys.readouterr().out
    assert "sam_micro, 2 prompts per call, three masks" in printed
    assert f"{result['matmul_flops'] / 1e9:.3f} GFLOP" in printed
