#!/usr/bin/env python
"""Benchmark samserve against the in-process floor and a naive TorchServe handler.

In one run on one machine, for each model: ``SamPredictor.predict`` in-process (the
floor), a naive handler that runs ``set_image`` on every request (scripts/naive_handler.py),
and this project served by TorchServe (cold, warm by ``image_id`` over REST and gRPC,
1-64 prompts per request, concurrent clients, response sizes, worker memory vs cached
embeddings, segment everything against SAM's own generator), plus the decoder's FLOPs
against this machine's matmul rate. Writes
``<out>/<label>.json``, ``.md`` (tables and the "must show" checks) and ``.png``::

    python scripts/bench.py                              # sam_small and vit_b, minutes
    python scripts/bench.py --quick --models sam_small   # smoke run

The ``shared-cache`` section (``--sections shared-cache``, alone or after ``main``)
measures the shared embedding store on a TorchServe of its own: clicks by ``image_id``
with 1, 2 and 4 workers, store on and off, and a click served from the shared tier
against one from the worker's own cache (``disk://`` and ``redis://``, a private
redis-server). Alone it writes ``<out>/<label>-shared.json`` and ``.md``::

    python scripts/bench.py --sections shared-cache      # sam_small and vit_b

Times are milliseconds, sizes bytes (MiB where named), rates GFLOP/s.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from bench_report import (
    OUTPUT_FORMATS,
    checks,
    derived,
    hit_rate,
    plot,
    ratio,
    render_markdown,
)
from build_mar import HANDLER, build_archive
from samclient.body import point_prompt, segment_request
from samclient.errors import SamServeError
from samclient.grpc_client import GrpcClient
from samclient.resend import ResendOptions, SentImages
from samclient.rest_client import RestClient
from samclient.server import Ports, TorchServe
from samserve import matmul
from samserve.engine import CPU_CALL_SIZES, SamEngine
from samserve.images import decode_image
from samserve.models import SamSpec, build_sam, random_checkpoint, spec_by_name
from samserve.process import tune_process
from samserve.service import parallel_parts, part_size, prompt_work
from samserve.store import DEFAULT_DISK_ROOT, STORE_URL_ENV
from samserve_cli.store_server import StoreServer
from training.prompts import random_pixel
from training.synthetic import make_sample

REPO = Path(__file__).resolve().parent.parent

TRAINED = {"sam_small": REPO / "models" / "sam_small_shapes.pth"}
NAIVE_HANDLER = REPO / "scripts" / "naive_handler.py"


@dataclass(frozen=True)
class Counts:
    """How much of each measurement a run does."""

    warm: int = 50  # warm clicks timed: floor, REST, gRPC (after `warmup` untimed)
    warmup: int = 3
    cold: int = 4  # distinct images sent cold; the first also warms the worker up
    naive: int = 5  # naive requests timed (each runs the image encoder)
    prompt_repeats: int = 7  # requests per prompt count, the counts taking turns
    prompt_counts: tuple[int, ...] = (1, 4, 16, 64)
    concurrency: tuple[int, ...] = (1, 2, 4)
    seconds: float = 10.0  # per concurrency level
    size_images: int = 4  # images whose response sizes are measured
    max_cached: int = 8  # memory: RSS up to this many cached embeddings
    matmul_repeats: int = 5
    everything_side: int = 8  # segment everything: a grid of side x side points (SAM's
    everything_repeats: int = 2  # generator decodes 64 in one batch)


QUICK = Counts(
    warm=5, warmup=1, cold=2, naive=2, prompt_repeats=1, concurrency=(1, 2), seconds=2.0,
    size_images=2, max_cached=2, matmul_repeats=3, everything_side=4, everything_repeats=1,
)  # fmt: skip


# -- small pure helpers --------------------------------------------------------------------


def summarize(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99, mean and min of latencies in ms, and their count ``n``."""
    if not values_ms:
        return {"n": 0}
    values = np.asarray(values_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "n": len(values),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean()), 3),
        "min": round(float(values.min()), 3),
    }


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of ``call()``."""
    tic = time.perf_counter()
    result = call()
    return (time.perf_counter() - tic) * 1000.0, result


def server_timing(responses: Sequence[dict[str, Any]]) -> dict[str, float]:
    """p50 of each server-side ``timing_ms`` stage over ``responses`` (ms)."""
    stages: dict[str, list[float]] = {}
    for response in responses:
        for stage, ms in response.get("timing_ms", {}).items():
            stages.setdefault(stage, []).append(ms)
    return {stage: round(float(np.median(v)), 3) for stage, v in stages.items()}


def decoder_streams(prompts: int, pixels_per_prompt: int, threads: int, work: int) -> int:
    """Decoder calls of a ``prompts``-click request (each click ``pixels_per_prompt``
    full-size mask pixels) that run side by side in a worker with ``threads`` mask threads
    (the default) on a model of ``prompt_work`` ``work``, as ``samserve.service`` splits
    it on a CPU: its ``timing_ms`` stages are summed over them."""
    size = part_size(pixels_per_prompt, CPU_CALL_SIZES.decoder)
    return parallel_parts(math.ceil(prompts / size), threads, work)


def rss_mib(pid: int) -> float:
    """Resident set size (VmRSS) of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _mask_data(record: dict[str, Any]) -> str:
    """The bulky part of a mask record: RLE counts, base64 PNG, or nothing."""
    if "segmentation" in record:
        return record["segmentation"]["counts"]
    return record.get("png", "")


# -- machine and workload ------------------------------------------------------------------


def machine_facts(threads: int, device: torch.device) -> dict[str, Any]:
    """CPU, cores, versions, thread settings, GPU and date of this run."""
    info = matmul.cpu_info()
    return {
        "cpu": info.get("model name", "unknown"),
        "cpu_family": info.get("cpu family"),
        "cpu_model": info.get("model"),
        "microarchitecture": microarchitecture(info),
        "avx512": "avx512f" in info.get("flags", "").split(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torchserve": importlib.metadata.version("torchserve"),
        "python": platform.python_version(),
        "torch_threads_in_process": torch.get_num_threads(),
        "cpu_matmul": matmul.backend(),  # in process and in the workers (cpu_matmul auto)
        "torch_threads_per_worker": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


CPU_LABELS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
"""CPU vendor ids as result labels: the two run different matmul libraries (samserve.matmul)."""


def microarchitecture(info: dict[str, str]) -> str | None:
    """AMD's core generation (``zen3``, ``zen4``, ``zen5``, ...) from ``/proc/cpuinfo``
    fields (``samserve.matmul.cpu_info``), or None (other vendors, unknown families).

    Cloud hosts name every EPYC "AMD EPYC", yet Zen 5 cores multiply twice as fast as Zen
    4's (full-width 512-bit FMA units where Zen 4 splits each in two), which moves every
    share of the matmul rate: results of the two must not share a label."""
    if info.get("vendor_id") != "AuthenticAMD":
        return None
    try:
        family, model = int(info["cpu family"]), int(info["model"])
    except (KeyError, ValueError):
        return None
    if family == 0x1A:
        return "zen5"
    if family == 0x19:
        zen4 = 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF
        return "zen4" if zen4 else "zen3"
    if family == 0x17:
        return "zen2" if model >= 0x30 else "zen1"
    return None


def cpu_label(cores: int) -> str:
    """``cpu-<vendor>[-<microarchitecture>]-<cores>core``: the name of this CPU's results."""
    info = matmul.cpu_info()
    parts = [CPU_LABELS.get(info.get("vendor_id", ""), "other"), microarchitecture(info)]
    return "-".join(["cpu", *filter(None, parts), f"{cores}core"])


def matmul_gflops(device: torch.device, repeats: int) -> dict[str, Any]:
    """Best dense fp32 rate of an NxN by NxN product (N 2048 on CPU, 8192 on GPU): of
    ``torch.mm``, and on a CPU also of oneDNN's float32 product (``samserve.matmul``;
    on AMD CPUs torch's MKL runs AVX2 code at under half of it). ``gflops`` is the
    faster library's."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    products = {"torch_mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        weight = b.t()  # a @ b as F.linear(a, b.T)
        products["onednn"] = lambda: matmul.onednn_linear(a, weight)
    out: dict[str, Any] = {"n": n}
    for name, product in products.items():
        best = float("inf")
        for _ in range(repeats + 1):  # the first one warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            product()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - tic)
        out[name] = round(2 * n**3 / best / 1e9, 2)
    out["gflops"] = max(out[name] for name in products)
    return out


@dataclass(frozen=True)
class BenchImage:
    """A synthetic shapes image: ``jpeg`` bytes as sent, ``pixels`` HxWx3 uint8 RGB as
    the server decodes them, ``masks`` NxHxW bool objects (clicks go inside them)."""

    jpeg: bytes
    pixels: np.ndarray
    masks: np.ndarray

    def clicks(self, count: int, seed: int = 0) -> list[list[float]]:
        """``count`` clicks [x, y] (pixels), cycling over the objects, each inside one."""
        rng = np.random.default_rng([seed, count])
        return [random_pixel(self.masks[i % len(self.masks)], rng) for i in range(count)]


def bench_images(count: int, height: int, width: int) -> list[BenchImage]:
    """``count`` HxW images from ``training.synthetic`` (seed 7), JPEG quality 90."""
    images = []
    for index in range(count):
        sample = make_sample(np.random.default_rng([7, index]), height, width, 6)
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="JPEG", quality=90)
        jpeg = buffer.getvalue()
        images.append(BenchImage(jpeg, decode_image(jpeg, 1 << 30, 1 << 30), sample.masks))
    return images


def click_prompts(clicks: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """One foreground-click prompt per click."""
    return [point_prompt([click], [1]) for click in clicks]


def checkpoint_for(name: str, cache: Path) -> tuple[SamSpec, Path, str]:
    """(spec, checkpoint, weights description): trained where shipped, else random."""
    spec = spec_by_name(name)
    if name in TRAINED:
        return spec, TRAINED[name], f"trained ({TRAINED[name].relative_to(REPO)})"
    path = cache / "checkpoints" / f"{name}_random.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        random_checkpoint(spec, path)
    return spec, path, "random (seed 0)"


# -- in process ----------------------------------------------------------------------------


def flop_counter() -> Any:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts in-place ``baddbmm_``
    (``samserve.decoder`` adds a residual in place where autograd is off; the counter
    knows only the out-of-place op) and oneDNN's ``_linear_pointwise`` (``samserve.matmul``)."""
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
        (batch, rows, inner), cols = a_shape, b_shape[-1]
        return 2 * batch * rows * inner * cols  # as the counter's own baddbmm formula

    def linear_flop(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]  # x @ w.T, w is NxK

    mapping = {torch.ops.aten.baddbmm_: baddbmm_flop}
    if torch.backends.mkldnn.is_available():
        mapping[torch.ops.mkldnn._linear_pointwise] = linear_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def floor_predictor(
    sam: Sam, image: BenchImage, device: torch.device
) -> tuple[SamPredictor, dict[str, Any]]:
    """The floor: a ``SamPredictor`` with ``image`` set once, and what it cost: the
    encoder ms and the FLOPs of one click prompt (prompt encoder + mask decoder, 3 masks)
    as SAM's own decoder counts them (the reference for GFLOP/s) and as samserve's
    decoder executes them (``samserve.decoder`` moves projections onto the prompt side,
    and makes the first block's image-side ones once per image)."""
    predictor = SamPredictor(sam)
    encoder_ms, _ = timed(lambda: predictor.set_image(image.pixels))
    coords = predictor.transform.apply_coords(np.array(image.clicks(1)), predictor.original_size)
    points = (
        torch.as_tensor(coords[None], dtype=torch.float, device=device),  # 1x1x2
        torch.ones((1, 1), dtype=torch.int, device=device),
    )
    with torch.inference_mode(), flop_counter() as reference:
        predictor.predict_torch(*points, multimask_output=True, return_logits=True)
    engine = SamEngine(sam)
    features = predictor.features
    cached = engine.image_embedding(features, predictor.input_size, predictor.original_size)
    with torch.inference_mode(), flop_counter() as executed:
        # As the engine decodes a click: the image's projections made once, beforehand.
        engine.predict_torch(cached, points)
    return predictor, {
        "encoder_ms": round(encoder_ms, 3),
        "decoder_flops_per_prompt": int(reference.get_total_flops()),
        "executed_flops_per_prompt": int(executed.get_total_flops()),
        "cached_image_mib": round(cached.nbytes / 2**20, 3),
    }


def sam_generator(predictor: SamPredictor, counts: Counts) -> dict[str, Any]:
    """``SamAutomaticMaskGenerator`` as SAM runs it, on ``predictor``'s image (already set:
    the encoder is not timed, as a cached image's is not): ms and masks found."""
    sam = predictor.model
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=counts.everything_side, output_mode="coco_rle"
    )
    generator.predictor = predictor
    features = predictor.features

    def keep_image(image: np.ndarray, image_format: str = "RGB") -> None:
        predictor.features, predictor.is_image_set = features, True  # the image it has

    predictor.set_image = keep_image  # type: ignore[method-assign]
    image = np.zeros((*predictor.original_size, 3), dtype=np.uint8)  # sizes only: not read
    times, found = [], 0
    for _ in range(counts.everything_repeats):
        ms, records = timed(lambda: generator.generate(image))
        times.append(ms)
        found = len(records)
    return summarize(times) | {"masks": found}


# -- served --------------------------------------------------------------------------------


class Served:
    """Drives one registered model on a running TorchServe over REST and gRPC."""

    def __init__(self, server: TorchServe, model: str) -> None:
        self.server = server
        self.model = model
        self.rest = self._rest()
        ports = server.ports
        self.grpc = GrpcClient(
            server.host, ports.grpc_inference, ports.grpc_management, keys=server.keys()
        )

    def _rest(self) -> RestClient:
        return RestClient(
            self.server.inference_url, self.server.management_url, keys=self.server.keys()
        )

    def worker_pid(self) -> int:
        """PID of the model's (single) worker process."""
        worker = self.rest.describe_model(self.model)[0]["workers"][0]
        pids = self.server.worker_pids()
        pid = pids.get(int(worker["id"])) or worker.get("pid")
        if not pid:
            raise RuntimeError(f"no worker process found for {self.model}: {worker}, {pids}")
        return int(pid)

    def predict(self, body: dict[str, Any], grpc: bool = False) -> tuple[float, dict[str, Any]]:
        """(client-side ms, response) of one request."""
        client = self.grpc if grpc else self.rest
        return timed(lambda: client.predict(self.model, body))

    def repeat(self, body: dict[str, Any], times: int) -> tuple[list[float], list[dict]]:
        """One untimed warm-up request, then ``times`` timed ones: (ms, responses)."""
        self.predict(body)
        timings = [self.predict(body) for _ in range(times)]
        return [ms for ms, _ in timings], [response for _, response in timings]

    def cold_and_memory(self, images: Sequence[BenchImage]) -> tuple[dict[str, Any], list[str]]:
        """Send each image once with one click (the encoder runs), reading the worker's RSS
        before and after each; returns the cold latencies, RSS vs N and the image ids."""
        pid = self.worker_pid()
        rss = [{"cached": 0, "rss_mib": round(rss_mib(pid), 1)}]
        times, responses, ids = [], [], []
        for index, image in enumerate(images):
            body = segment_request(image.jpeg, prompts=click_prompts(image.clicks(1)))
            ms, response = self.predict(body)
            if response["cached"]:
                raise RuntimeError("a fresh image came back cached: the worker was not fresh")
            times.append(ms)
            responses.append(response)
            ids.append(response["image_id"])
            rss.append({"cached": index + 1, "rss_mib": round(rss_mib(pid), 1)})
        cold = {
            "first_request_ms": round(times[0], 3),
            "latency": summarize(times[1:]),
            "server_ms": server_timing(responses[1:]),
            "image_bytes": int(np.mean([len(i.jpeg) for i in images])),
        }
        return {"cold": cold, "memory": {"worker_pid": pid, "rss": rss}}, ids

    def warm(
        self, predictor: SamPredictor, image: BenchImage, image_id: str, counts: Counts
    ) -> dict[str, dict[str, Any]]:
        """One click per request by ``image_id`` (multimask, RLE) over REST and gRPC, and
        the same click on the in-process ``predictor``: interleaved, click by click, so
        that all three see the same machine load."""
        times: dict[str, list[float]] = {"in_process": [], "warm_rest": [], "warm_grpc": []}
        responses: dict[str, list[dict[str, Any]]] = {"warm_rest": [], "warm_grpc": []}
        for index, click in enumerate(image.clicks(counts.warm + counts.warmup)):
            coords, labels = np.array([click]), np.array([1])  # 1x2 XY pixels, 1 label
            ms, _ = timed(lambda c=coords, y=labels: predictor.predict(c, y, multimask_output=True))
            timing = {"in_process": ms}
            body = segment_request(image_id=image_id, prompts=click_prompts([click]))
            for path in responses:
                timing[path], response = self.predict(body, grpc=path == "warm_grpc")
                if index >= counts.warmup:
                    responses[path].append(response)
            if index >= counts.warmup:
                for path, ms in timing.items():
                    times[path].append(ms)
        out = {}
        for path, values in times.items():
            out[path] = summarize(values) | {"samples": [round(t, 3) for t in values]}
            if path in responses:
                out[path]["server_ms"] = server_timing(responses[path])
        return out

    def prompts(
        self,
        image: BenchImage,
        image_id: str,
        counts: Counts,
        threads: int,
        work: int,
        best_only: bool = False,
        matmul_rate: Callable[[], float] | None = None,
    ) -> list[dict[str, Any]]:
        """Requests with 1, 4, 16, 64 click prompts on one cached image: three masks per
        click, or with ``best_only`` the best-scoring one; ``threads`` are the worker's mask
        threads and ``work`` the model's ``prompt_work`` (see ``decoder_streams``).

        The counts take turns (1, 4, 16, 64, 1, 4, ...): this machine's speed drifts by
        tens of percent over minutes, and the ratios between counts should not. For the
        same reason ``matmul_rate`` (GFLOP/s), when given, is measured before each round,
        and every request's row keeps the rate of its round (``rounds``)."""
        bodies = {
            count: segment_request(
                image_id=image_id,
                prompts=click_prompts(image.clicks(count, seed=1)),
                best_only=best_only,
            )
            for count in counts.prompt_counts
        }
        for body in bodies.values():
            self.predict(body)  # warm-up, untimed
        masks_per_click = 1 if best_only else 3  # requests are multimask
        pixels_per_prompt = masks_per_click * image.pixels.shape[0] * image.pixels.shape[1]
        timed_runs: dict[int, list[tuple[float, dict[str, Any], float | None]]] = {
            c: [] for c in bodies
        }
        for _ in range(counts.prompt_repeats):
            rate = matmul_rate() if matmul_rate else None
            for count, body in bodies.items():
                timed_runs[count].append((*self.predict(body), rate))
        rows = []
        for count, runs in timed_runs.items():
            latency = summarize([ms for ms, _, _ in runs])
            responses = [response for _, response, _ in runs]
            row = {
                "prompts": count,
                "latency": latency,
                "per_prompt_ms": round(latency["p50"] / count, 3),
                "server_ms": server_timing(responses),
                "decoder_streams": decoder_streams(count, pixels_per_prompt, threads, work),
            }
            if matmul_rate:
                row["rounds"] = [
                    {"matmul_gflops": rate, "ms": round(ms, 3),
                     "decoder_ms": response["timing_ms"].get("decoder")}
                    for ms, response, rate in runs
                ]  # fmt: skip
            rows.append(row)
        return rows

    def concurrency(
        self, image_ids: Sequence[str], clicks: Sequence[list[float]], clients: int, seconds: float
    ) -> dict[str, Any]:
        """``clients`` threads, each on its own cached image, clicking for ``seconds``."""
        latencies: list[list[float]] = [[] for _ in range(clients)]
        errors: list[str] = []
        start = threading.Barrier(clients + 1)

        def click_loop(slot: int) -> None:
            rest = self._rest()
            image_id = image_ids[slot % len(image_ids)]
            start.wait()
            deadline = time.perf_counter() + seconds
            index = 0
            while time.perf_counter() < deadline:
                prompt = click_prompts([clicks[index % len(clicks)]])
                body = segment_request(image_id=image_id, prompts=prompt)
                try:
                    ms, _ = timed(lambda b=body: rest.predict(self.model, b))
                    latencies[slot].append(ms)
                except Exception as err:  # reported, not fatal
                    errors.append(f"{type(err).__name__}: {err}")
                index += 1

        threads = [threading.Thread(target=click_loop, args=(s,)) for s in range(clients)]
        for thread in threads:
            thread.start()
        start.wait()
        tic = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - tic
        every = [ms for slot in latencies for ms in slot]
        return {
            "clients": clients,
            "requests": len(every),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "seconds": round(elapsed, 3),
            "requests_per_s": round(len(every) / elapsed, 2),
            "latency": summarize(every),
        }

    def sizes(self, images: Sequence[BenchImage], image_ids: Sequence[str]) -> dict[str, Any]:
        """Bytes per mask of each output format: one click per object, multimask."""
        totals = {f: {"payload": 0, "response": 0, "masks": 0} for f in OUTPUT_FORMATS}
        pixels = 0
        for image, image_id in zip(images, image_ids):
            prompts = click_prompts(image.clicks(len(image.masks), seed=2))
            for output in OUTPUT_FORMATS:
                body = segment_request(image_id=image_id, prompts=prompts, output=output)
                _, response = self.predict(body)
                masks = [m for r in response["results"] for m in r["masks"]]
                total = totals[output]
                total["masks"] += len(masks)
                # The server sends compact JSON: the same bytes as this re-encoding.
                total["response"] += len(json.dumps(response, separators=(",", ":")))
                total["payload"] += sum(len(_mask_data(m)) for m in masks)
            pixels += image.pixels.shape[0] * image.pixels.shape[1] * len(prompts) * 3
        masks = totals["rle"]["masks"]
        raw_bool = pixels / masks
        out: dict[str, Any] = {"raw_packed": raw_bool / 8, "raw_bool": raw_bool}
        for output, total in totals.items():
            payload, response = total["payload"] / masks, total["response"] / masks
            out[output] = {
                "payload_per_mask": round(payload, 1),
                "response_per_mask": round(response, 1),
                "response_vs_packed": round(response / (raw_bool / 8), 5),
                "response_vs_bool": round(response / raw_bool, 5),
            }
        return out

    def everything(self, image_id: str, counts: Counts) -> dict[str, Any]:
        """Segment everything on a cached image over REST, SAM's default thresholds."""
        body = segment_request(
            image_id=image_id, everything={"points_per_side": counts.everything_side}
        )
        times, responses = self.repeat(body, counts.everything_repeats)
        return summarize(times) | {
            "server_ms": server_timing(responses),
            "masks": responses[-1]["everything"]["count"],
        }

    def naive(self, image: BenchImage, counts: Counts) -> dict[str, Any]:
        """Image + one click per request: the naive handler encodes every time."""
        body = segment_request(image.jpeg, prompts=click_prompts(image.clicks(1)))
        times, responses = self.repeat(body, counts.naive)
        return summarize(times) | {"server_ms": server_timing(responses)}

    def stats(self) -> dict[str, Any]:
        """The handler's describe counters (device, cache)."""
        description = self.rest.describe_model(self.model, customized=True)[0]
        custom = description.get("customizedMetadata")
        return json.loads(custom) if isinstance(custom, str) else (custom or {})

    def scale(self, workers: int, timeout: float = 600.0) -> None:
        """Scale the model to ``workers`` through the management API and wait until every
        one of them is READY."""
        self.rest.scale_workers(self.model, workers)
        deadline = time.monotonic() + timeout
        while True:
            listed = self.rest.describe_model(self.model)[0]["workers"]
            if len(listed) == workers and all(w.get("status") == "READY" for w in listed):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.model}: not {workers} READY workers: {listed}")
            time.sleep(0.5)

    def close(self) -> None:
        self.grpc.close()


# -- one model -----------------------------------------------------------------------------


def bench_model(
    name: str,
    server: TorchServe,
    cache: Path,
    images: list[BenchImage],
    counts: Counts,
    threads: int,
    device: torch.device,
) -> dict[str, Any]:
    """Every measurement of one model. The served model and the naive one run alone (each
    registered only while measured); the in-process floor is timed beside warm clicks."""
    spec, checkpoint, weights = checkpoint_for(name, cache)
    result: dict[str, Any] = {"model": name, "weights": weights}
    try:
        sam = build_sam(spec, checkpoint).to(device)
    except RuntimeError as err:
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise RuntimeError(
            f"checkpoint {checkpoint.relative_to(REPO)} does not fit spec {name!r} of "
            f"samserve/models.py: {details} ..."
        ) from err
    result["parameters"] = sum(p.numel() for p in sam.parameters())
    result["embedding_mib"] = round(spec.prompt_embed_dim * spec.embedding_size**2 * 4 / 2**20, 3)
    predictor, result["in_process"] = floor_predictor(sam, images[0], device)
    # What the cache holds per image: the embedding and its first-block projections.
    result["cached_image_mib"] = result["in_process"].pop("cached_image_mib")
    for archive, handler, settings in (
        (f"samserve_{name}", HANDLER, {"torch_threads": threads}),
        (f"naive_{name}", NAIVE_HANDLER, {"torch_threads": threads}),
    ):
        build_archive(spec, checkpoint, server.model_store, archive, settings=settings,
                      archive_format="no-archive", handler=handler)  # fmt: skip

    with registered(server, f"samserve_{name}") as served:
        print(f"[{name}] cold requests and worker memory", flush=True)
        cold_memory, ids = served.cold_and_memory(images)
        result.update(cold_memory)
        print(f"[{name}] warm clicks: in-process, REST, gRPC", flush=True)
        warm = served.warm(predictor, images[0], ids[0], counts)
        result["in_process"]["predict"] = warm.pop("in_process")
        result.update(warm)
        print(f"[{name}] segment everything: SAM's generator in-process, REST", flush=True)
        result["everything"] = {
            "points": counts.everything_side**2,
            "sam_generator": sam_generator(predictor, counts),
            "served_rest": served.everything(ids[0], counts),
        }
        del predictor, sam
        gc.collect()
        print(f"[{name}] prompts per request {counts.prompt_counts}", flush=True)

        def rate() -> float:
            return matmul_gflops(device, counts.matmul_repeats)["gflops"]

        work = prompt_work((1, spec.prompt_embed_dim, spec.embedding_size, spec.embedding_size))
        result["prompts"] = served.prompts(
            images[0], ids[0], counts, threads, work, matmul_rate=rate
        )
        print(f"[{name}] prompts per request, best mask only", flush=True)
        result["prompts_best"] = served.prompts(
            images[0], ids[0], counts, threads, work, best_only=True, matmul_rate=rate
        )
        print(f"[{name}] concurrent clients {counts.concurrency}", flush=True)
        clicks = images[0].clicks(64, seed=3)
        result["concurrency"] = [
            served.concurrency(ids, clicks, clients, counts.seconds)
            for clients in counts.concurrency
        ]
        print(f"[{name}] response sizes", flush=True)
        result["sizes"] = served.sizes(images[: counts.size_images], ids)
        result["server_stats"] = served.stats()
    with registered(server, f"naive_{name}") as naive:
        print(f"[{name}] naive handler", flush=True)
        result["naive"] = naive.naive(images[0], counts)
    return result


@contextmanager
def registered(server: TorchServe, model: str) -> Iterator[Served]:
    """Register archive ``model`` (a folder in the model store) with one worker; unregister
    it afterwards, so that each model runs alone on the machine."""
    served = Served(server, model)
    try:
        served.rest.register_model(model, model, initial_workers=1)
        yield served
    finally:
        with suppress(SamServeError):  # not registered: the error above says why
            served.rest.unregister_model(model)
        served.close()


# -- the shared embedding store ------------------------------------------------------------

SECTIONS = ("main", "shared-cache")
"""The benchmark's sections: ``main`` (everything above, one worker per model) and
``shared-cache`` (the shared embedding store, on a TorchServe of its own)."""


@dataclass(frozen=True)
class SharedCounts:
    """How much of the shared-cache section a run does."""

    clicks: int = 40  # clicks by image_id after the image is sent once, per configuration
    workers: tuple[int, ...] = (1, 2, 4)
    rounds: int = 20  # tiers: rounds of two images, each clicked from the store then its LRU
    warmup_rounds: int = 1


SHARED_QUICK = SharedCounts(clicks=8, rounds=3)

# The tier run's worker cache, in cached images: room for one, never for two, so that a
# click on the other image evicts this one.
LRU_IMAGES = 1.5
# The private redis-server's bound: the section's entries (two embeddings and a click's
# logits each) many times over, with eviction on as deploy/ configures it.
REDIS_MAXMEMORY_MB = 256


def parse_sections(text: str) -> tuple[str, ...]:
    """The sections named in ``text`` (comma-separated), in run order.

    Raises:
      ValueError: for an unknown name, or none at all.
    """
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SECTIONS)
    if unknown or not names:
        raise ValueError(f"sections must be some of {SECTIONS}, got {text!r}")
    return tuple(name for name in SECTIONS if name in names)


def result_label(base: str, sections: Sequence[str], quick: bool) -> str:
    """The name of a run's results: ``base``, ``-shared`` when the shared-cache section ran
    alone (its results must not replace a full run's), ``-quick`` for smoke runs."""
    shared = "-shared" if tuple(sections) == ("shared-cache",) else ""
    return base + shared + ("-quick" if quick else "")


def one_image_cache_mb(cached_image_bytes: int) -> float:
    """An ``embedding_cache_mb`` that holds one cached image of ``cached_image_bytes`` (its
    embedding and projections) and never two."""
    return round(LRU_IMAGES * cached_image_bytes / 2**20, 3)


def requests_per_worker(workers: Sequence[dict[str, Any]]) -> list[int]:
    """Requests each worker served, from its describe counters: every request looks its
    image up in the worker's own cache once (a hit or a miss)."""
    return [w["embedding_cache"]["hits"] + w["embedding_cache"]["misses"] for w in workers]


def counter_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How far each number of ``after`` (nested counters, as describe's ``total``) moved
    from ``before``; anything not a number in both is left out."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = counter_deltas(old, value)
        elif _number(value) and _number(old):
            out[key] = round(value - old, 6)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_ms(seconds: float | None, count: int | None) -> float | None:
    """Milliseconds per call of ``count`` calls that took ``seconds`` in all; None for none."""
    if not count or seconds is None:
        return None
    return round(seconds * 1000.0 / count, 3)


def default_store_root(cache: Path) -> Path:
    """Where the section's private disk stores go: beside the default store's directory
    (a tmpfs, as ``samserve.store`` picks), else under ``cache``."""
    if os.path.isdir(DEFAULT_DISK_ROOT):
        return Path(DEFAULT_DISK_ROOT) / f"samserve-bench-{os.getuid()}"
    return cache / "stores"


class CountingSentImages(SentImages):
    """The client's resend memory, also counting the requests on which it attached an image
    after a resend (``attached``; ``resends`` counts the ``image_not_cached`` answers)."""

    def __init__(self, options: ResendOptions) -> None:
        super().__init__(options)
        self.attached = 0

    def prepare(self, body: Any) -> Any:
        prepared = super().prepare(body)
        self.attached += prepared is not body
        return prepared


@contextmanager
def environment(name: str, value: str | None) -> Iterator[str | None]:
    """The block runs with environment variable ``name`` set to ``value`` (unset for None;
    a server started in it inherits that); yields the value it had, put back afterwards."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield saved
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(directory: Path, maxmemory_mb: int) -> Iterator[str]:
    """A private redis-server on a free loopback port, the one ``samserve-serve start
    --redis`` runs (``maxmemory`` with ``allkeys-lru``, a password, no persistence);
    yields its URL, stops it afterwards."""
    server = StoreServer(directory, free_port(), maxmemory_mb=maxmemory_mb)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def cached_image_bytes(spec: SamSpec, checkpoint: Path, original_size: tuple[int, int]) -> int:
    """Bytes one image of ``original_size`` takes in a worker's cache (its embedding and
    first-block projections), as the engine makes them from an encoder output."""
    engine = SamEngine(build_sam(spec, checkpoint))
    side = spec.embedding_size
    features = torch.zeros(1, spec.prompt_embed_dim, side, side)
    with torch.inference_mode():
        cached = engine.image_embedding(features, engine.input_size(original_size), original_size)
    return cached.nbytes


@contextmanager
def store_archive(
    server: TorchServe, spec: SamSpec, checkpoint: Path, archive: str, settings: dict[str, Any]
) -> Iterator[Served]:
    """Archive ``archive`` with handler ``settings``, registered with one worker while the
    block runs, and removed afterwards (a vit_b archive holds its 360 MB checkpoint)."""
    build_archive(spec, checkpoint, server.model_store, archive, settings=settings,
                  archive_format="no-archive")  # fmt: skip
    try:
        with registered(server, archive) as served:
            # The project's client, counting the requests it sent with the image.
            served.rest.sent_images = CountingSentImages(ResendOptions())
            yield served
    finally:
        shutil.rmtree(server.model_store / archive, ignore_errors=True)


def send_image(served: Served, image: BenchImage) -> tuple[float, dict[str, Any]]:
    """The image with one click, its first request: (ms, response); the encoder runs."""
    ms, response = served.predict(
        segment_request(image.jpeg, prompts=click_prompts(image.clicks(1)))
    )
    if response["cached"]:
        raise RuntimeError(
            f"{served.model}: a fresh image came back cached: the store was not empty"
        )
    return ms, response


def clicks_by_image_id(
    server: TorchServe, archive: str, settings: dict[str, Any], spec: SamSpec,
    checkpoint: Path, workers: int, image: BenchImage, clicks: int,
) -> dict[str, Any]:  # fmt: skip
    """``image`` sent once, then ``clicks`` clicks by ``image_id``, one after another, on
    the model scaled to ``workers``: image_not_cached answers (the project's client sends
    the click again with its image, and the image with its next few requests), the
    workers' encoder runs and store hits (describe's totals), latency."""
    with store_archive(server, spec, checkpoint, archive, settings) as served:
        served.scale(workers)
        sent = served.rest.sent_images
        cold_ms, cold = send_image(served, image)
        times, responses = [], []
        for click in image.clicks(clicks, seed=4):
            body = segment_request(image_id=cold["image_id"], prompts=click_prompts([click]))
            ms, response = served.predict(body)
            times.append(ms)
            responses.append(response)
        stats = served.stats()
    total = stats.get("total", {})
    store = total.get("shared_store") or {}
    return {
        "store_url": settings["store_url"],
        "workers": workers,
        "clicks": clicks,
        "image_not_cached": sent.resends,
        "hit_rate": hit_rate(clicks, sent.resends),
        "requests_with_image": sent.resends + sent.attached,
        "encoder_runs": total.get("encoder_runs"),
        "store_hits": store.get("hits"),
        "requests_per_worker": requests_per_worker(stats.get("workers", [])),
        "image_ms": round(cold_ms, 3),
        "image_server_ms": cold["timing_ms"],
        "latency": summarize(times) | {"samples": [round(ms, 3) for ms in times]},
        "server_ms": server_timing(responses),
    }


def tier_clicks(
    server: TorchServe, archive: str, settings: dict[str, Any], spec: SamSpec,
    checkpoint: Path, images: Sequence[BenchImage], counts: SharedCounts,
) -> dict[str, Any]:  # fmt: skip
    """One worker whose own cache holds one image; two images take turns, each clicked
    twice with the same click: the first click finds it in the shared store (the other
    image's clicks evicted it from the worker's cache), the second in the worker's own
    cache. Both kinds alternate click by click, so they see the same machine load; the
    describe counters over the timed rounds show where each click was served from."""
    with store_archive(server, spec, checkpoint, archive, settings) as served:
        sent = served.rest.sent_images
        sent_images = [send_image(served, image) for image in images[:2]]
        ids = [response["image_id"] for _, response in sent_images]
        rounds = counts.warmup_rounds + counts.rounds
        clicks = [image.clicks(rounds, seed=5) for image in images[:2]]
        times: dict[str, list[float]] = {"shared": [], "own": []}
        responses: dict[str, list[dict[str, Any]]] = {"shared": [], "own": []}
        before: dict[str, Any] = {}
        for index in range(rounds):
            if index == counts.warmup_rounds:
                before = served.stats().get("total", {})
            for image_id, image_clicks in zip(ids, clicks):
                body = segment_request(
                    image_id=image_id, prompts=click_prompts([image_clicks[index]])
                )
                for tier in ("shared", "own"):
                    ms, response = served.predict(body)
                    if index >= counts.warmup_rounds:
                        times[tier].append(ms)
                        responses[tier].append(response)
        moved = counter_deltas(before, served.stats().get("total", {}))
    store = moved.get("shared_store", {})
    tiers = {
        tier: summarize(times[tier])
        | {"samples": [round(ms, 3) for ms in times[tier]],
           "server_ms": server_timing(responses[tier])}
        for tier in times
    }  # fmt: skip
    return {
        "store_url": settings["store_url"],
        **tiers,
        "served_from": {
            "own_cache_hits": moved.get("embedding_cache", {}).get("hits"),
            "store_hits": store.get("hits"),
            "store_misses": store.get("misses"),
            "encoder_runs": moved.get("encoder_runs"),
        },
        "store_get_ms": mean_ms(store.get("get_seconds"), store.get("gets")),
        "store_put_ms": mean_ms(store.get("put_seconds"), store.get("puts")),
        "store_puts_per_click": ratio(store.get("puts"), len(times["own"]) * 2),
        "image_not_cached": sent.resends,
        "image_ms": [round(ms, 3) for ms, _ in sent_images],
        "encoder_ms": [response["timing_ms"].get("encoder") for _, response in sent_images],
    }


def bench_shared_cache(
    name: str, server: TorchServe, cache: Path, store_root: Path,
    images: Sequence[BenchImage], counts: SharedCounts, threads: int,
) -> dict[str, Any]:  # fmt: skip
    """The shared-cache section for one model: clicks by image_id with each worker count,
    store on (a private, empty ``disk://`` directory each time) and off; then the shared
    tier against the worker's own cache, with ``disk://`` and a private ``redis://``."""
    spec, checkpoint, weights = checkpoint_for(name, cache)
    root = store_root / name
    shutil.rmtree(root, ignore_errors=True)  # a store left by an interrupted run: not empty
    out: dict[str, Any] = {"weights": weights, "clicks": counts.clicks, "runs": []}
    for store in ("disk", "none"):
        for workers in counts.workers:
            url = f"disk://{root / f'store-{workers}'}" if store == "disk" else "none"
            print(f"[{name}] shared cache: {workers} workers, store {url}", flush=True)
            settings = {"torch_threads": threads, "store_url": url}
            out["runs"].append(
                clicks_by_image_id(server, f"shared_{name}_{store}_{workers}w", settings, spec,
                                   checkpoint, workers, images[0], counts.clicks)
            )  # fmt: skip
    size = cached_image_bytes(spec, checkpoint, images[0].pixels.shape[:2])
    cache_mb = one_image_cache_mb(size)
    tiers: dict[str, Any] = {
        "cached_image_mib": round(size / 2**20, 3),
        "embedding_cache_mb": cache_mb,
        "rounds": counts.rounds,
        "backends": {},
    }
    for backend in ("disk", "redis"):
        store_server = (
            redis_server(root / "redis", REDIS_MAXMEMORY_MB)
            if backend == "redis"
            else nullcontext()
        )
        with store_server as redis_url:
            url = redis_url or f"disk://{root / 'store-tiers'}"
            print(f"[{name}] shared tier vs own cache: store {backend}", flush=True)
            settings = {"torch_threads": threads, "store_url": url, "embedding_cache_mb": cache_mb}
            tiers["backends"][backend] = tier_clicks(
                server, f"shared_{name}_tiers_{backend}", settings, spec, checkpoint, images,
                counts,
            )  # fmt: skip
    out["tiers"] = tiers
    shutil.rmtree(root, ignore_errors=True)
    return out


def shared_cache_section(
    args: argparse.Namespace, models: Sequence[str], images: Sequence[BenchImage],
    counts: SharedCounts, results: dict[str, Any],
) -> None:  # fmt: skip
    """Run the shared-cache section for ``models`` on a TorchServe of its own, started
    without ``SAMSERVE_STORE_URL`` (which would override every archive's store), and add
    each model's results (``shared_cache``) to ``results["models"]``."""
    store_root = (args.store_root or default_store_root(args.cache)).resolve()
    server = TorchServe(
        args.cache / "run-shared", args.cache / "model_store", Ports.offset(args.port_offset + 100)
    )
    server.stop()  # a leftover from an interrupted run of ours
    server.model_store.mkdir(parents=True, exist_ok=True)
    with environment(STORE_URL_ENV, None) as ignored:
        if ignored is not None:
            print(f"shared cache: {STORE_URL_ENV}={ignored} ignored: the section sets each "
                  "archive's store", flush=True)  # fmt: skip
        server.start()
    try:
        for name in models:
            result = results["models"].setdefault(name, {"model": name})
            try:
                shared = bench_shared_cache(name, server, args.cache, store_root, images,
                                            counts, args.threads)  # fmt: skip
                result.setdefault("weights", shared["weights"])
                print(f"[{name}] shared cache done", flush=True)
            except Exception as err:
                print(f"[{name}] shared cache FAILED: {type(err).__name__}: {err}",
                      file=sys.stderr)  # fmt: skip
                shared = {"error": f"{type(err).__name__}: {err}"}
            result["shared_cache"] = shared
    finally:
        server.stop()
        with suppress(OSError):  # each model removed its own stores; others' files stay
            store_root.rmdir()


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        help="comma-separated specs (default sam_small,vit_b; "
        "--quick: sam_small); sam_small uses the trained checkpoint, "
        "others random weights",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--label", help="output name (default "
                        "cpu-<vendor>[-<zen gen>]-<cores>core or gpu-<name>)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--repeats", type=int, help="warm clicks timed (default 50)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads in-process and per worker (CPU)",
    )
    parser.add_argument("--image-size", default="1500x2000", help="HxW of benchmark images")
    parser.add_argument("--max-cached", type=int, help="memory: up to N cached embeddings")
    parser.add_argument(
        "--cache",
        type=Path,
        default=REPO / "build" / "bench",
        help="checkpoints, archives and the server's workdir",
    )
    parser.add_argument("--port-offset", type=int, default=15000)
    parser.add_argument(
        "--sections",
        default="main",
        help=f"comma-separated, of {', '.join(SECTIONS)} (default main): shared-cache "
        "measures the shared embedding store; alone, its results are <label>-shared",
    )
    parser.add_argument(
        "--store-root",
        type=Path,
        help="shared-cache: the private disk stores' directory (default: beside the default "
        "store's, on its tmpfs)",
    )
    args = parser.parse_args(argv)
    try:
        sections = parse_sections(args.sections)
    except ValueError as err:
        parser.error(str(err))

    counts = QUICK if args.quick else Counts()
    if args.repeats:
        counts = replace(counts, warm=args.repeats)
    if args.max_cached:
        counts = replace(counts, max_cached=args.max_cached)
    models = (args.models or ("sam_small" if args.quick else "sam_small,vit_b")).split(",")
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tune_process(device, args.threads)  # as the handler tunes a worker (cpu_matmul auto)
    label = args.label or result_label(
        f"gpu-{torch.cuda.get_device_name(0).split()[-1].lower()}"
        if device.type == "cuda"
        else cpu_label(os.cpu_count() or 1),
        sections,
        args.quick,
    )
    shared_counts = SHARED_QUICK if args.quick else SharedCounts()

    n_images = 2  # the shared-cache section's two images
    if "main" in sections:
        n_images = max(counts.cold, counts.max_cached, max(counts.concurrency), counts.size_images)
    print(f"bench {label}: {models}, {n_images} images of {height}x{width}", flush=True)
    images = bench_images(n_images, height, width)
    results: dict[str, Any] = {
        "label": label,
        "machine": machine_facts(args.threads, device),
        "counts": asdict(counts),
        "image_size": f"{height}x{width}",
        "matmul": matmul_gflops(device, counts.matmul_repeats),
        "models": {},
    }
    if "shared-cache" in sections:
        results["shared_counts"] = asdict(shared_counts)
    # The rate this machine gives varies by tens of percent over a run (shared host), so
    # it is measured around every model and the highest is the reference: the
    # conservative one for "share of the matmul rate".
    rates = [results["matmul"]["gflops"]]
    print(f"matmul: {rates[0]} GFLOP/s", flush=True)

    if "main" in sections:
        main_section(args, models, images, counts, device, results, rates)
    if "shared-cache" in sections:
        shared_cache_section(args, models, images, shared_counts, results)
    results["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    results["checks"] = checks(results)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{label}.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render_markdown(results)
    (args.out / f"{label}.md").write_text(markdown + "\n")
    if "main" in sections:
        plot(results, args.out / f"{label}.png")
    print(markdown)
    print(f"wrote {args.out / label}.json, .md" + (", .png" if "main" in sections else ""))
    failed = any(
        "error" in r or "error" in r.get("shared_cache", {}) for r in results["models"].values()
    )
    return 1 if failed else 0


def main_section(
    args: argparse.Namespace, models: Sequence[str], images: list[BenchImage], counts: Counts,
    device: torch.device, results: dict[str, Any], rates: list[float],
) -> None:  # fmt: skip
    """Every model's main measurements on one TorchServe, the matmul rate after each
    (appended to ``rates``), and their ratios (``derived``)."""
    server = TorchServe(
        args.cache / "run", args.cache / "model_store", Ports.offset(args.port_offset)
    )
    server.stop()  # a leftover from an interrupted run of ours
    server.model_store.mkdir(parents=True, exist_ok=True)
    # The shipped default, the disk store, but empty: entries of an earlier run would make
    # a "cold" request warm. A store the environment names (none, for an A/B) is kept.
    store = os.environ.get(STORE_URL_ENV)
    if not store:
        directory = default_store_root(args.cache) / "main"
        shutil.rmtree(directory, ignore_errors=True)
        store = f"disk://{directory}"
    results["machine"]["store"] = store
    with environment(STORE_URL_ENV, store):
        server.start()
    try:
        for name in models:
            try:
                result = bench_model(name, server, args.cache, images, counts, args.threads,
                                     device)  # fmt: skip
                print(f"[{name}] done", flush=True)
            except Exception as err:
                print(f"[{name}] FAILED: {type(err).__name__}: {err}", file=sys.stderr)
                result = {"model": name, "error": f"{type(err).__name__}: {err}"}
            results["models"][name] = result
            rates.append(matmul_gflops(device, counts.matmul_repeats)["gflops"])
            print(f"matmul: {rates[-1]} GFLOP/s", flush=True)
    finally:
        server.stop()
    results["matmul"] |= {"gflops": max(rates), "samples": rates}
    for result in results["models"].values():
        if "error" not in result:
            result["derived"] = derived(result, results["matmul"]["gflops"])


if __name__ == "__main__":
    sys.exit(main())
