#!/usr/bin/env python
"""Where a mask-decoder call's time goes, op by op, as the worker runs it.

Times every aten op of ``SamEngine.decode`` (prompt encoder and mask decoder, the image's
first-block projections made beforehand and the logits over the padding deferred, as the
worker decodes) on one cached embedding, and splits the time into matrix products
(whose FLOPs ``torch.utils.flop_counter`` counts, so their GFLOP/s can be set against this
machine's matmul rate) and everything else (norms, pointwise ops, softmax, copies)::

    python scripts/profile_decoder.py                           # vit_b size, 4 prompts, 1 thread
    python scripts/profile_decoder.py --threads 2 --prompts 16 --best-only
    python scripts/profile_decoder.py --model sam_small --json out/profile.json

One thread and 4 prompts is how a 16-click request's decoder calls run in the worker (one
call per mask thread, each on one torch thread). The decoder's cost does not depend on
the weights, so models without a trained checkpoint get random ones. Times are per
prompt, in ms; timing each op adds a few microseconds to it (the report gives the call's
time without the timers beside the sum of the timed ops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import checkpoint_for, flop_counter, matmul_gflops
from samserve import matmul
from samserve.engine import ImageEmbedding, MaskOptions, SamEngine
from samserve.models import build_sam
from samserve.process import tune_process

REPO = Path(__file__).resolve().parent.parent

MATMUL_OPS = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "baddbmm_", "matmul", "linear", "einsum", "mv",
     "_linear_pointwise"}
)  # fmt: skip
"""aten (and oneDNN: ``samserve.matmul``) ops, overload dropped, whose time is matrix
products."""


def op_name(func: Any) -> str:
    """``aten.addmm.default`` -> ``addmm``."""
    return str(func).split(".")[1]


@dataclass
class OpTimes(TorchDispatchMode):
    """Wall seconds and calls per (aten op, input shapes), summed over what runs under it.

    An op that calls other ops is timed as one: the mode is off inside its own handler,
    so nested ops are not counted twice."""

    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        tic = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        shapes = " ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor))
        key = (op_name(func), shapes)
        self.seconds[key] += time.perf_counter() - tic
        self.calls[key] += 1
        return out


def cached_embedding(
    engine: SamEngine, image_size: tuple[int, int], seed: int = 0
) -> ImageEmbedding:
    """A random embedding of an image of ``image_size`` (H, W), as the engine caches one
    (with its projections): the decoder does the same work whatever the features."""
    sam = engine.model
    generator = torch.Generator().manual_seed(seed)
    grid = sam.prompt_encoder.image_embedding_size
    features = torch.randn(1, sam.prompt_encoder.embed_dim, *grid, generator=generator)
    input_size = engine.transform.get_preprocess_shape(*image_size, sam.image_encoder.img_size)
    return engine.image_embedding(features.to(engine.device), input_size, image_size)


def profile(
    engine: SamEngine,
    embedding: ImageEmbedding,
    prompts: int,
    best_only: bool,
    repeats: int,
) -> dict[str, Any]:
    """Per-prompt ms of a decoder call of ``prompts`` one-click prompts (three masks each,
    or with ``best_only`` the best), the median of ``repeats`` calls: untimed, and op by
    op; and the FLOPs its matrix products execute."""
    generator = torch.Generator().manual_seed(1)
    points = (
        torch.rand(prompts, 1, 2, generator=generator) * torch.tensor(embedding.input_size[::-1]),
        torch.ones(prompts, 1, dtype=torch.int),
    )

    def call() -> None:
        with torch.inference_mode():
            engine.predict_torch(embedding, points, options=MaskOptions(best_only=best_only))

    for _ in range(3):
        call()
    untimed = []
    for _ in range(repeats):
        tic = time.perf_counter()
        call()
        untimed.append(time.perf_counter() - tic)
    with flop_counter() as counter:
        call()
    runs = []
    for _ in range(repeats):
        with OpTimes() as ops:
            call()
        runs.append(ops)
    # Medians over the calls: this host's speed has spikes that a sum would carry.
    per_prompt = 1000.0 / prompts
    rows = [
        {"op": name, "shapes": shapes, "calls": runs[0].calls[(name, shapes)],
         "ms": round(statistics.median(run.seconds[(name, shapes)] for run in runs)
                     * per_prompt, 4),
         "matmul": name in MATMUL_OPS}
        for name, shapes in runs[0].seconds
    ]  # fmt: skip
    rows.sort(key=lambda row: -row["ms"])
    matmul_ms = sum(row["ms"] for row in rows if row["matmul"])
    flops = counter.get_total_flops() / prompts
    return {
        "prompts": prompts,
        "best_only": best_only,
        "repeats": repeats,
        "untimed_ms": round(statistics.median(untimed) * per_prompt, 3),
        "timed_ms": round(sum(row["ms"] for row in rows), 3),
        "matmul_ms": round(matmul_ms, 3),
        "matmul_flops": int(flops),
        "matmul_gflops": round(flops / matmul_ms / 1e6, 1) if matmul_ms else None,
        "ops": rows,
    }


def render(result: dict[str, Any], top: int) -> str:
    """The profile as a Markdown table of the ``top`` costliest ops and a summary."""
    timed = result["timed_ms"]
    lines = [
        f"{result['model']}, {result['prompts']} prompts per call, "
        f"{'best mask' if result['best_only'] else 'three masks'}, "
        f"torch threads: {result['threads']}; ms per prompt",
        "",
        "| ms | share | calls | op | input shapes |",
        "| ---: | ---: | ---: | --- | --- |",
    ]
    for row in result["ops"][:top]:
        lines.append(
            f"| {row['ms']:.3f} | {row['ms'] / timed:.1%} | {row['calls']} | {row['op']} | "
            f"{row['shapes']} |"
        )
    other = timed - result["matmul_ms"]
    lines += [
        "",
        f"call: {result['untimed_ms']:.2f} ms per prompt untimed, {timed:.2f} op by op",
        f"matrix products: {result['matmul_ms']:.2f} ms ({result['matmul_ms'] / timed:.0%}), "
        f"{result['matmul_flops'] / 1e9:.3f} GFLOP, {result['matmul_gflops']} GFLOP/s "
        f"(this machine's dense matmul, same threads: {result['matmul_rate_gflops']} GFLOP/s)",
        f"everything else: {other:.2f} ms ({other / timed:.0%})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b", help="spec name (default vit_b)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per decoder call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--best-only", action="store_true", help="the best mask of each click")
    parser.add_argument("--repeats", type=int, default=10, help="calls timed")
    parser.add_argument("--image-size", default="1500x2000", help="HxW of the image")
    parser.add_argument("--top", type=int, default=25, help="ops listed")
    parser.add_argument("--json", type=Path, help="also write the whole profile here")
    parser.add_argument("--cpu-matmul", choices=matmul.BACKENDS, default="auto",
                        help="matrix products on a CPU, as the handler setting")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "bench",
                        help="where random checkpoints are kept")  # fmt: skip
    args = parser.parse_args(argv)

    # As the handler tunes a CPU worker: its heap, torch threads and matmul backend.
    backend = tune_process(torch.device("cpu"), args.threads, args.cpu_matmul).cpu_matmul
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    spec, checkpoint, weights = checkpoint_for(args.model, args.cache)
    engine = SamEngine(build_sam(spec, checkpoint))
    embedding = cached_embedding(engine, (height, width))
    result = {"model": args.model, "weights": weights, "threads": args.threads,
              "cpu_matmul": backend}  # fmt: skip
    result |= profile(engine, embedding, args.prompts, args.best_only, args.repeats)
    result["matmul_rate_gflops"] = matmul_gflops(engine.device, 3)["gflops"]
    print(render(result, args.top))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
