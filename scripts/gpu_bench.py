#!/usr/bin/env python
"""Benchmark the serving path on one device, in process, through ``SegmentService``.

``SegmentService`` is the code the TorchServe handler runs (without the frontend): for
each model, built from its trained checkpoint where the repository ships one
(``TRAINED``), else from a random checkpoint of its spec (``random_checkpoint``), as the
handler builds it (``build_sam(...).to(device)``, ``SegmentService.for_model``), it
measures

- the image encoder's images/s at batch 1, 4 and 8 (``engine.embed`` on decoded
  images, the device synchronised; the batch is ``encoder_batch_size``),
- a cold request (image + one click: decode, encode, decode prompts, RLE),
- warm clicks by ``image_id`` with 1 and 16 prompts and one 64-prompt request
  (multimask, RLE) on a 1500x2000 JPEG,
- segment everything with 32x32 points,
- the masks of its encoder as served (on CUDA by default bfloat16 autocast and SDPA)
  against those of a float32 encoder with the same weights: the fraction of mask pixels
  on which they agree, for a click and a box in turn on the objects of a few images
  (``mask_agreement``), beside the fraction of those pixels that are foreground,

and writes ``<out>/gpu-<name>.json`` and ``.md``::

    python scripts/gpu_bench.py                         # CUDA: vit_h and vit_b
    python scripts/gpu_bench.py --device cpu --quick    # smoke run on a CPU
    python scripts/gpu_bench.py --device cpu --quick --agreement-only --models vit_b \\
        --encoder-dtype bfloat16 --encoder-attention sdpa  # CUDA's encoder, on a CPU

Random weights make masks of arbitrary extent, so mask work (upscale, RLE) differs
from a trained model's; the encoder's and decoder's work does not. Times are
milliseconds. Random weights are PyTorch's default initialisation
(``random_checkpoint``): their masks cover part of each image, neither none nor all of
it, and change with the encoder's weights, so their agreement is not high by default;
the report gives the masks' foreground and its IoU beside it, because small objects (a
trained model's) make the pixel agreement high on the background alone.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from PIL import Image

from samserve import matmul
from samserve.encoder import EncoderOptions
from samserve.engine import Prompt, SamEngine
from samserve.models import build_sam, random_checkpoint, spec_by_name
from samserve.process import tune_process
from samserve.service import SegmentService
from samserve.settings import Settings
from training.prompts import mask_box, random_pixel
from training.synthetic import make_sample

IMAGE_SIZE = (1500, 2000)  # (H, W) of the benchmark's photo-sized image
REPO = Path(__file__).resolve().parent.parent
TRAINED = {"sam_small": REPO / "models" / "sam_small_shapes.pth"}
"""The models whose trained weights the repository ships; others get random weights."""


@dataclass(frozen=True)
class Counts:
    """How much to run: batch sizes of the encoder, timed repeats of each measurement,
    images and prompts of the mask agreement."""

    batches: tuple[int, ...] = (1, 4, 8)
    encoder_repeats: int = 5
    click_repeats: int = 30
    request_repeats: int = 5
    everything_repeats: int = 2
    everything_points: int = 32  # points per side (SAM's default)
    agreement: tuple[int, int] = (4, 8)  # images, prompts on each

    @classmethod
    def quick(cls) -> Counts:
        """A smoke run's counts: every measurement once or twice, small batches, 8x8
        points for segment everything, 4 prompts on each of 2 images for the agreement."""
        return cls((1, 2), 1, 3, 1, 1, 8, (2, 4))


@dataclass(frozen=True)
class Agreement:
    """How one engine's full-size masks compare with a reference engine's, for the same
    prompts on the same images (``mask_agreement``).

    Arguments:
      agreement (float): the fraction of mask pixels on which the two engines agree.
      foreground (float): the fraction of the reference's mask pixels that are on: near 0
        or 1, masks agree by being nearly constant, and ``agreement`` says little.
      foreground_range (tuple[float, float]): the least and the greatest fraction of one
        reference mask's pixels that are on.
      iou (float): intersection over union of the two engines' foreground, over all masks
        together (1.0 where both are empty).
      images (int): the images prompted.
      prompts (int): the prompts on all images; each makes three masks (multimask).
    """

    agreement: float
    foreground: float
    foreground_range: tuple[float, float]
    iou: float
    images: int
    prompts: int


def object_prompts(
    masks: np.ndarray, rng: np.random.Generator, count: int | None = None
) -> list[Prompt]:
    """Prompts on the objects of one image: a click inside the first object, its tight
    box, then the same on the next object, and so on.

    Arguments:
      masks (np.ndarray): NxHxW bool masks of the image's objects, none empty.
      rng (np.random.Generator): draws each click's pixel.
      count (int or None): how many prompts, going round the objects again past 2N; None:
        2N (a click and a box on each object).

    Returns:
      (list(Prompt)): the prompts, in the image's frame.
    """
    prompts = []
    for index in range(2 * len(masks) if count is None else count):
        mask = masks[index // 2 % len(masks)]
        if index % 2 == 0:
            click = np.array([random_pixel(mask, rng)])
            prompts.append(Prompt(point_coords=click, point_labels=np.array([1])))
        else:
            prompts.append(Prompt(box=np.array(mask_box(mask))))
    return prompts


def mask_agreement(
    engine: SamEngine,
    reference: SamEngine,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    prompts: int | None = None,
    seed: int = 0,
) -> Agreement:
    """Compare the full-size masks (all three of each prompt) that two engines make for
    the same ``object_prompts`` on the same images.

    Arguments:
      engine (SamEngine): the engine measured.
      reference (SamEngine): the engine it is measured against; its masks give the
        foreground.
      samples (Sequence): (HxWx3 uint8 RGB image, NxHxW bool object masks) pairs; both
        engines embed each image.
      prompts (int or None): prompts on each image (``object_prompts``' ``count``).
      seed (int): seeds the clicks' pixels, the same for both engines.

    Returns:
      (Agreement): the agreement, the reference's foreground and the foreground's IoU.
    """
    rng = np.random.default_rng(seed)
    equal = on = both = either = total = count = 0
    fractions: list[float] = []
    for index, (image, masks) in enumerate(samples):
        key = f"agreement-{index}"
        asked = object_prompts(masks, rng, prompts)
        count += len(asked)
        got, expected = (
            [p.dense_masks() for p in each.predict(each.embed({key: image})[key], asked)]
            for each in (engine, reference)
        )
        for mine, theirs in zip(got, expected):
            equal += int((mine == theirs).sum())
            on += int(theirs.sum())
            both += int((mine & theirs).sum())
            either += int((mine | theirs).sum())
            total += theirs.size
            fractions += theirs.mean(axis=(1, 2)).tolist()
    return Agreement(
        agreement=equal / total,
        foreground=on / total,
        foreground_range=(min(fractions), max(fractions)),
        iou=both / either if either else 1.0,
        images=len(samples),
        prompts=count,
    )


def encoder_label(engine: SamEngine) -> str:
    """How ``engine``'s image encoder computes on its device: ``bfloat16 autocast,
    sdpa``, ``float32, sliced`` and so on."""
    options = engine.encoder_options
    dtype = options.autocast_dtype(engine.device)
    precision = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    return f"{precision}, {'sdpa' if options.uses_sdpa(engine.device) else 'sliced'}"


def summarize(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90, mean and min of latencies (ms), and their count ``n``."""
    if not values_ms:
        return {"n": 0}
    values = np.asarray(values_ms, dtype=np.float64)
    p50, p90 = np.percentile(values, [50, 90])
    return {
        "n": len(values),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "mean": round(float(values.mean()), 3),
        "min": round(float(values.min()), 3),
    }


def images_per_second(batch: int, times_ms: Sequence[float]) -> float:
    """Encoder throughput of ``batch`` images per call at the median call time."""
    return round(batch * 1000.0 / float(np.median(times_ms)), 3)


def click_body(
    image_id: str, clicks: Sequence[Sequence[float]], image: bytes | None = None
) -> dict[str, Any]:
    """A request with one foreground-click prompt per click (multimask, RLE), by
    ``image_id``, or with the ``image`` itself (then ``image_id`` is not sent)."""
    body: dict[str, Any] = {
        "prompts": [{"points": [list(c)], "labels": [1]} for c in clicks],
        "multimask": True,
        "output": "rle",
    }
    if image is None:
        body["image_id"] = image_id
    else:
        body["image"] = base64.b64encode(image).decode("ascii")
    return body


def result_name(device: torch.device) -> str:
    """A file-name label for the device: ``cpu``, or the GPU's name in lower case with
    runs of other characters as one dash (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def agreement_markdown(entry: dict[str, Any]) -> list[str]:
    """Lines of the Markdown report on one model's mask agreement.

    Arguments:
      entry (dict): the model's ``agreement`` in the result (``bench_model``).

    Returns:
      (list[str]): a sentence that says what was compared, and a table.
    """
    least, most = entry["foreground_range"]
    return [
        f"Masks of the encoder as served ({entry['encoder']}) against a float32 encoder "
        f"with the same weights ({entry['reference']}): {entry['prompts']} prompts "
        f"(clicks and boxes) on {entry['images']} images, three full-size masks each; "
        "foreground is the float32 masks' share of pixels that are on.",
        "",
        "| pixels that agree | foreground | foreground of one mask | foreground IoU |",
        "|---|---|---|---|",
        f"| {entry['agreement']:.5f} | {entry['foreground']:.3f} | {least:.3f}-{most:.3f} "
        f"| {entry['iou']:.5f} |",
        "",
    ]


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown report: the machine, then per model a table of timings
    and the mask agreement."""
    facts = result["machine"]
    lines = [f"# In-process serving benchmark: {facts['device_name']}", ""]
    if facts["device"] == "cpu":
        lines += [
            "**CPU smoke run, not GPU numbers**: `scripts/gpu_bench.py --device cpu` checks "
            "that the GPU benchmark runs end to end; its figures are this CPU's, with "
            "small counts.",
            "",
        ]
    lines += [
        f"- device: {facts['device']} ({facts['device_name']}), torch {facts['torch']}, "
        f"Python {facts['python']}, {facts['date']}",
        f"- encoder: {result['encoder']}; counts: {result['counts']}",
        f"- image {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} (WxH) JPEG, through "
        "`SegmentService.handle`; times in ms",
        "",
    ]
    for name, model in result["models"].items():
        lines += [f"## {name}", "", f"weights: {model['weights']}", ""]
        if "encoder" in model:
            lines += ["| measurement | p50 ms | p90 ms | n | note |", "|---|---|---|---|---|"]
        for batch, entry in model.get("encoder", {}).items():
            lines.append(
                f"| encoder, batch {batch} | {entry['call_ms']['p50']} | "
                f"{entry['call_ms']['p90']} | {entry['call_ms']['n']} | "
                f"{entry['images_per_s']} images/s |"
            )
        for key, entry in model.get("requests", {}).items():
            note = entry.get("note", "")
            lines.append(
                f"| {key} | {entry['ms'].get('p50')} | {entry['ms'].get('p90')} | "
                f"{entry['ms']['n']} | {note} |"
            )
        if "peak_gpu_mib" in model:
            lines.append(f"\npeak GPU memory: {model['peak_gpu_mib']} MiB")
        if "encoder" in model:
            lines.append("")
        lines += agreement_markdown(model["agreement"])
    return "\n".join(lines)


def synchronized(device: torch.device) -> Callable[[], None]:
    """A call that waits for ``device``'s queued work (nothing on a CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_ms(call: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    """(milliseconds, result) of ``call()``, the device synchronised after it."""
    tic = time.perf_counter()
    result = call()
    sync()
    return (time.perf_counter() - tic) * 1000.0, result


def jpeg_image(seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A synthetic ``IMAGE_SIZE`` image: its JPEG bytes, its HxWx3 pixels and its
    NxHxW object masks (clicks go inside them)."""
    sample = make_sample(np.random.default_rng([7, seed]), *IMAGE_SIZE, 6)
    buffer = io.BytesIO()
    Image.fromarray(sample.image).save(buffer, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return buffer.getvalue(), decoded, sample.masks


def handle(service: SegmentService, body: dict[str, Any], strict: bool = True) -> Any:
    """One request through ``SegmentService.handle`` (JSON bytes, as TorchServe hands
    them over), its reply encoded as sent: the reply's body, raising on any status but
    200; not ``strict``: (status, body)."""
    reply = service.handle([(orjson.dumps(body), "application/json")])[0]
    reply.encode()
    if not strict:
        return reply.status, reply.body
    if reply.status != 200:
        raise RuntimeError(f"status {reply.status}: {reply.body}")
    return reply.body


def weights(name: str, folder: Path) -> tuple[Path, str]:
    """The checkpoint of model ``name``: the repository's trained one where it ships one,
    else random weights of its spec written to ``folder``.

    Arguments:
      name (str): a spec's name (``spec_by_name``).
      folder (Path): where a random checkpoint is written.

    Returns:
      (tuple[Path, str]): the checkpoint, and what its weights are (``trained (...)`` or
        ``random``).
    """
    if name in TRAINED:
        return TRAINED[name], f"trained ({TRAINED[name].relative_to(REPO)})"
    checkpoint = folder / f"{name}.pth"
    random_checkpoint(spec_by_name(name), checkpoint)
    return checkpoint, "random"


def bench_model(
    name: str,
    device: torch.device,
    settings: Settings,
    counts: Counts,
    folder: Path,
    timings: bool = True,
) -> dict[str, Any]:
    """Every measurement of one model (see the module docstring).

    Arguments:
      name (str): the model's spec (``spec_by_name``).
      device (torch.device): where the model runs.
      settings (Settings): the handler settings its services are made with.
      counts (Counts): how much to run.
      folder (Path): where random weights are written (and removed once loaded).
      timings (bool): time the encoder and requests; else only the mask agreement.

    Returns:
      (dict): ``weights``, ``encoder`` and ``requests`` timings (with ``timings``),
        ``agreement`` (``Agreement``'s fields and both engines' ``encoder_label``) and
        ``peak_gpu_mib`` on CUDA.
    """
    spec = spec_by_name(name)
    checkpoint, made_of = weights(name, folder)
    model = build_sam(spec, checkpoint).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {"weights": made_of}
    if timings:
        out.update(time_model(model, device, settings, counts))
        if device.type == "cuda":
            out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    # Loaded after the timings, so that their peak memory is one model's.
    reference = build_sam(spec, checkpoint).to(device)
    if checkpoint.parent == folder:
        checkpoint.unlink()
    engine = SegmentService.for_model(model, settings).engine
    float32 = SamEngine(reference, encoder=EncoderOptions("float32"))
    images, prompts = counts.agreement
    samples = [jpeg_image(seed)[1:] for seed in range(images)]
    agreement = mask_agreement(engine, float32, samples, prompts)
    out["agreement"] = {
        "encoder": encoder_label(engine),
        "reference": encoder_label(float32),
        **dataclasses.asdict(agreement),
    }
    return out


def time_model(
    model: torch.nn.Module, device: torch.device, settings: Settings, counts: Counts
) -> dict[str, Any]:
    """The encoder's and the requests' timings of one model (see the module docstring).

    Arguments:
      model (torch.nn.Module): the SAM model, on ``device``.
      device (torch.device): where it runs.
      settings (Settings): the handler settings its services are made with.
      counts (Counts): how many of each measurement.

    Returns:
      (dict): ``encoder``: per batch size its call times and images/s; ``requests``: per
        request kind its times (and a note).
    """
    sync = synchronized(device)
    out: dict[str, Any] = {"encoder": {}, "requests": {}}
    jpeg, pixels, masks = jpeg_image(0)

    # Encoder throughput: one service per batch size (encoder_batch_size), as served.
    for batch in counts.batches:
        service = SegmentService.for_model(
            model, dataclasses.replace(settings, encoder_batch_size=batch)
        )
        engine = service.engine
        images = {f"b{batch}-{i}": pixels for i in range(batch)}  # embed always encodes
        engine.embed(images)  # warm-up
        sync()
        times = [
            timed_ms(lambda e=engine, i=images: e.embed(i), sync)[0]
            for _ in range(counts.encoder_repeats)
        ]
        out["encoder"][str(batch)] = {
            "call_ms": summarize(times),
            "images_per_s": images_per_second(batch, times),
        }

    service = SegmentService.for_model(model, settings)
    rng = np.random.default_rng(0)
    clicks = [random_pixel(masks[i % len(masks)], rng) for i in range(64)]
    requests = out["requests"]

    # Cold: an image with one click (decode, encode, prompts, RLE), a new image each time
    # (the first one a warm-up).
    cold = []
    for seed in range(1, counts.request_repeats + 2):
        other, _, other_masks = jpeg_image(seed)
        click = [random_pixel(other_masks[0], rng)]
        body = click_body("", click, other)
        cold.append(timed_ms(lambda b=body: handle(service, b), sync)[0])
    requests["cold click (image + 1 prompt)"] = {"ms": summarize(cold[1:])}
    image_id = handle(service, {"image": base64.b64encode(jpeg).decode("ascii")})["image_id"]

    for prompts, repeats in ((1, counts.click_repeats), (16, counts.click_repeats)):
        handle(service, click_body(image_id, clicks[:prompts]))  # warm-up
        times = [
            timed_ms(lambda p=prompts: handle(service, click_body(image_id, clicks[:p])), sync)[0]
            for _ in range(repeats)
        ]
        requests[f"warm click, {prompts} prompt{'s' if prompts > 1 else ''}"] = {
            "ms": summarize(times)
        }
    times = [
        timed_ms(lambda: handle(service, click_body(image_id, clicks)), sync)[0]
        for _ in range(counts.request_repeats)
    ]
    requests["warm request, 64 prompts"] = {"ms": summarize(times)}

    side = counts.everything_points
    everything = {"image_id": image_id, "everything": {"points_per_side": side}}
    times, notes = [], set()
    for _ in range(counts.everything_repeats):
        # Random weights may keep many masks: a reply over the serving limits (time,
        # mask pixels) is recorded as such, not raised.
        ms, (status, body) = timed_ms(lambda: handle(service, everything, strict=False), sync)
        times.append(ms)
        if status == 200:
            notes.add(f"{body['everything']['count']} masks kept")
        else:
            notes.add(f"status {status} {body['error']['code']}")
    requests[f"segment everything, {side}x{side} points"] = {
        "ms": summarize(times),
        "note": "; ".join(sorted(notes)),
    }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    parser.add_argument("--models", default=None, help="specs, comma-separated")
    parser.add_argument("--out", default=os.environ.get("OUT", "build/gpu-bench"))
    parser.add_argument("--quick", action="store_true", help="small counts (smoke run)")
    parser.add_argument("--encoder-dtype", default="auto")
    parser.add_argument("--encoder-attention", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--agreement-only", action="store_true", help="only the masks' agreement, no timings"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    models = args.models or ("sam_small" if device.type == "cpu" else "vit_h,vit_b")
    counts = Counts.quick() if args.quick else Counts()
    threads = torch.get_num_threads()
    encoder = EncoderOptions(args.encoder_dtype, args.encoder_attention, args.compile)
    tuning = tune_process(device, threads, "auto")
    settings = Settings(
        encoder_dtype=encoder.dtype,
        encoder_attention=encoder.attention,
        compile=encoder.compile,
    )
    result: dict[str, Any] = {
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else matmul.cpu_info().get("model name", "cpu"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpu_threads": threads,
            "cpu_matmul": tuning.cpu_matmul,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "encoder": {
            "dtype": args.encoder_dtype,
            "attention": args.encoder_attention,
            "compile": args.compile,
        },
        "counts": counts.__dict__,
        "models": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{result_name(device)}"
    with tempfile.TemporaryDirectory() as folder:
        for name in models.split(","):
            tic = time.perf_counter()
            result["models"][name] = bench_model(
                name, device, settings, counts, Path(folder), not args.agreement_only
            )
            print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)
            # Written after each model: a run cut short keeps the models done.
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            stem.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
