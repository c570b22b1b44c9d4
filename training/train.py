"""Train a small SAM on synthetic shapes, the way SAM itself was trained.

Each step embeds a batch of images once (the costly part) and decodes many prompts per
image against those embeddings (the cheap part): single foreground points (multimask,
loss on the best of the three masks), jittered boxes and points + boxes (single mask),
then a refinement round that adds a point from the error region and feeds the previous
low-res logits back as ``mask_input``. The loss is SAM's: focal + dice on the masks,
plus MSE between the predicted and the actual IoU. SAM weighs focal 20:1; here the
objects cover 0.2-5% of the image and that weight held the model in the all-background
plateau far longer (measured), so the default is 1:1. AdamW with linear warm-up and
cosine decay.

    python scripts/train.py --minutes 60 --out models/sam_small_shapes.pth
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from samserve.engine import decode_prompts
from samserve.models import SamSpec, assemble_sam, spec_by_name

from .prompts import corrective_click, jittered_box, random_pixel
from .stopwatch import OFF, Stopwatch
from .synthetic import TRAIN_SEED, make_sample, sample_size


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved next to the checkpoint)."""

    spec: str = "sam_small"
    steps: int = 3000
    minutes: float = 0.0  # > 0: stop at this wall time (the schedule then follows time)
    images_per_step: int = 4
    prompts_per_image: int = 8  # of one kind per image and step
    long_side: tuple[int, int] = (300, 900)
    max_objects: int = 6
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    focal_weight: float = 1.0
    focal_alpha: float = 0.25  # weight of foreground pixels in the focal loss; < 0: none
    iou_weight: float = 1.0  # weight of the IoU-prediction MSE (SAM: 1)
    refine: bool = True
    seed: int = TRAIN_SEED
    threads: int = 0
    init: str = ""  # a checkpoint to start from (fine-tuning); "": fresh weights
    image_size: int = 0  # > 0: the spec's encoder input size replaced by this one
    freeze_encoder: bool = False  # train the prompt encoder and mask decoder only
    device: str = ""  # "": CUDA when there is a GPU, else the CPU
    bf16: bool = True  # bf16 autocast on CUDA (the CPU always runs float32)
    workers: int = 0  # > 0: processes that draw the next steps' images ahead (for a GPU)


@dataclass
class Batch:
    """Images in the model's input frame and their instance masks, for one step.

    ``inputs`` is Bx3xSxS normalised and padded (S = encoder input size); per image,
    ``masks`` is NxS'xS' float targets on the low-res logits grid (S' = S / 4 x ...),
    ``full`` is Nxhxw bool in the resized (unpadded) input frame, for sampling prompts.
    """

    inputs: torch.Tensor
    masks: list[torch.Tensor]
    full: list[np.ndarray]


Drawn = tuple[list[torch.Tensor], list[torch.Tensor], list[np.ndarray]]
"""One step's images, mask targets and full masks as ``draw_images`` makes them."""


def draw_images(rng: np.random.Generator, config: TrainConfig, size: int, low: int) -> Drawn:
    """One step's images, on the CPU and without the model: ``images_per_step`` 3xhxw uint8
    images resized so the long side is ``size``, their Nxlowxlow float mask targets (the
    padded ``size`` square pooled to the low-res grid) and Nxhxw bool masks."""
    transform = ResizeLongestSide(size)
    images, targets, fulls = [], [], []
    for _ in range(config.images_per_step):
        height, width = sample_size(rng, config.long_side)
        sample = make_sample(rng, height, width, config.max_objects)
        image = transform.apply_image(sample.image)
        images.append(torch.as_tensor(image).permute(2, 0, 1).contiguous())
        h, w = image.shape[:2]
        masks = torch.as_tensor(sample.masks, dtype=torch.float32)[:, None]
        resized = F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)
        padded = F.pad(resized, (0, size - w, 0, size - h))
        targets.append(F.adaptive_avg_pool2d(padded, (low, low))[:, 0])
        fulls.append(resized[:, 0].numpy() > 0.5)
    return images, targets, fulls


def to_model(sam: Sam, drawn: Drawn) -> Batch:
    """``draw_images``'s output on the model's device, images normalised and padded."""
    images, targets, fulls = drawn
    device = sam.device
    inputs = [sam.preprocess(image.to(device)[None].float())[0] for image in images]
    return Batch(torch.stack(inputs), [t.to(device) for t in targets], fulls)


def _draw_step(
    config: TrainConfig, step: int, size: int, low: int
) -> tuple[Drawn, np.random.Generator]:
    """Step ``step``'s images and the step's generator after drawing them (it goes on to
    draw the prompts), as the training loop would make them: for worker processes."""
    rng = np.random.default_rng([config.seed, step])
    return draw_images(rng, config, size, low), rng


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextmanager
def step_draws(
    config: TrainConfig, size: int, low: int
) -> Iterator[Iterator[tuple[Drawn, np.random.Generator]]]:
    """The steps' images and generators, in step order: drawn in the loop, or with
    ``workers`` processes up to two steps per worker ahead of it. Either way step ``s``
    gets exactly what ``np.random.default_rng([seed, s])`` draws."""
    if config.workers <= 0:
        yield (_draw_step(config, step, size, low) for step in itertools.count())
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_one_thread) as pool:
        ahead: collections.deque[Future] = collections.deque()

        def draws() -> Iterator[tuple[Drawn, np.random.Generator]]:
            step = 0
            while True:
                while len(ahead) < 2 * config.workers:
                    ahead.append(pool.submit(_draw_step, config, step + len(ahead), size, low))
                yield ahead.popleft().result()
                step += 1

        try:
            yield draws()
        finally:
            for future in ahead:
                future.cancel()


def mask_losses(
    logits: torch.Tensor, target: torch.Tensor, focal_weight: float, focal_alpha: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask loss (focal x weight + dice) and actual IoU, for KxCxhxw logits vs Kxhxw
    (float32 whatever the logits' type: bf16 sums over a mask's pixels are too coarse)."""
    logits = logits.float()
    target = target[:, None].expand_as(logits)
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = bce * (1 - p_t) ** 2
    if focal_alpha >= 0:
        focal = focal * (focal_alpha * target + (1 - focal_alpha) * (1 - target))
    focal = focal.mean(dim=(-2, -1))
    inter = (prob * target).sum(dim=(-2, -1))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1)) + 1)
    with torch.no_grad():
        pred = logits > 0
        hard = target > 0.5
        union = (pred | hard).sum(dim=(-2, -1)).float()
        iou = torch.where(union > 0, (pred & hard).sum(dim=(-2, -1)) / union.clamp(min=1), 1.0)
    return focal_weight * focal + dice, iou


def _iou_loss(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """MSE between the IoU head's predictions and the masks' actual IoUs, in float32."""
    return F.mse_loss(predicted.float(), actual)


PROMPT_KINDS = ("point", "box", "point_box")


def step_loss(
    sam: Sam,
    embeddings: torch.Tensor,
    batch: Batch,
    rng: np.random.Generator,
    config: TrainConfig,
    watch: Stopwatch = OFF,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one step over every image and prompt of the batch, and its parts.

    ``embeddings`` are the batch's image embeddings (BxCxhxw), made by the caller so that
    it can run the encoder's backward pass apart from the decoder's.

    Each image gets ``prompts_per_image`` prompts of one kind drawn at random (a single
    foreground point, a jittered box, or both), decoded in one call; a refinement round
    then adds a corrective click and feeds the first answer's logits back as mask_input.
    Decoder calls, not prompts, set the cost of a step, so one kind per image keeps steps
    cheap and lets the run take more optimizer steps in the same time.
    """
    device = batch.inputs.device
    total = embeddings.new_zeros((), dtype=torch.float32)
    parts: dict[str, list[float]] = {k: [] for k in (*PROMPT_KINDS, "refine")}
    for b, (targets, full) in enumerate(zip(batch.masks, batch.full)):
        with watch.phase("prompts"):
            chosen = rng.integers(len(targets), size=config.prompts_per_image)
            chosen = np.array([i for i in chosen if full[i].any()], dtype=np.int64)
            if len(chosen) == 0:
                continue
            kind = PROMPT_KINDS[rng.integers(len(PROMPT_KINDS))]
            target = targets[torch.as_tensor(chosen, device=device)]
            rows = torch.arange(len(chosen), device=device)
            coords = torch.tensor(
                [[random_pixel(full[i], rng)] for i in chosen], dtype=torch.float, device=device
            )
            labels = torch.ones(len(chosen), 1, dtype=torch.int, device=device)
            points = None if kind == "box" else (coords, labels)
            boxes = None
            if kind != "point":
                boxes = torch.tensor(
                    [jittered_box(full[i], rng) for i in chosen], dtype=torch.float, device=device
                )
        # A single point is ambiguous: three masks, and only the best one's loss counts.
        multimask = kind == "point"
        embedding = embeddings[b : b + 1]
        with watch.phase("decoder_forward"):
            logits, iou_pred, _ = decode_prompts(sam, embedding, points, boxes, None, multimask)
        with watch.phase("loss"):
            loss, iou = mask_losses(logits, target, config.focal_weight, config.focal_alpha)
            best = loss.argmin(dim=1)
            total = total + loss[rows, best].mean() + config.iou_weight * _iou_loss(iou_pred, iou)
            parts[kind].append(float(iou[rows, best].mean()))

        if config.refine:
            with watch.phase("prompts"):
                previous = logits[rows, best].detach()
                extra, extra_labels = _error_points(previous, target, rng)
                coords2 = torch.cat([coords, extra.to(device)[:, None]], dim=1)
                labels2 = torch.cat([labels, extra_labels.to(device)[:, None]], dim=1)
            with watch.phase("decoder_forward"):
                logits_r, iou_pred_r, _ = decode_prompts(
                    sam, embedding, (coords2, labels2), boxes, previous[:, None], False
                )
            with watch.phase("loss"):
                loss_r, iou_r = mask_losses(
                    logits_r, target, config.focal_weight, config.focal_alpha
                )
                total = total + loss_r.mean() + config.iou_weight * _iou_loss(iou_pred_r, iou_r)
                parts["refine"].append(float(iou_r.mean()))
    return total / len(batch.masks), {k: float(np.mean(v)) for k, v in parts.items() if v}


def _error_points(
    logits: torch.Tensor, target: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective click per prompt from Kxhxw low-res ``logits`` vs ``target``, in the
    input frame (low-res cells are 4 input pixels wide)."""
    pred, truth = (logits > 0).cpu().numpy(), (target > 0.5).cpu().numpy()
    clicks = [corrective_click(p, t, rng) for p, t in zip(pred, truth)]
    points = torch.tensor([point for point, _ in clicks], dtype=torch.float) * 4
    return points, torch.tensor([label for _, label in clicks], dtype=torch.int)


def resized_state(state: dict[str, torch.Tensor], sam: Sam) -> dict[str, torch.Tensor]:
    """``state`` (float32) fitted to ``sam``, whose encoder may take a larger input.

    Only the encoder's position terms depend on its input size: the absolute position
    embedding (1xHxWxC, bicubic) and the relative position tables of the global-attention
    blocks ((2H-1)xC, linear) are resized to ``sam``'s token grid; every other weight is
    size-free and kept. A model trained at 256 and resized to 512 keeps what it learned
    and sees objects on a token grid twice as fine (docs/model_card.md, stage 3).
    """
    target = sam.state_dict()
    fitted = {}
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        shape = target[key].shape
        if value.shape != shape and key.endswith("pos_embed"):
            value = F.interpolate(value.permute(0, 3, 1, 2), size=shape[1:3], mode="bicubic")
            value = value.permute(0, 2, 3, 1)
        elif value.shape != shape and "rel_pos" in key:
            value = F.interpolate(value.T[None], size=shape[0], mode="linear")[0].T
        fitted[key] = value
    return fitted


def learning_rate(progress: float, config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr + (config.lr - config.min_lr) * cosine


@dataclass
class Prepared:
    """A model ready to train: the model on its device, what is trained and how."""

    sam: Sam
    spec: SamSpec
    device: torch.device
    trained: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast


def prepare(config: TrainConfig) -> Prepared:
    """Threads, seed, model (from ``init`` if given), optimizer and autocast for ``config``.

    Arguments:
      config (TrainConfig): the run's settings.
    Returns:
      (Prepared): the model in training mode on its device, with its AdamW optimizer.
    """
    torch.set_num_threads(config.threads or torch.get_num_threads())
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = spec_by_name(config.spec)
    if config.image_size:
        spec = dataclasses.replace(spec, image_size=config.image_size)
    sam = assemble_sam(spec)
    if config.init:
        sam.load_state_dict(resized_state(torch.load(config.init, weights_only=True), sam))
    sam.to(device).train()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=config.bf16 and device.type == "cuda")
    # A frozen encoder builds no autograd graph: its forward is all a step pays for it.
    sam.image_encoder.requires_grad_(not config.freeze_encoder)
    trained = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    return Prepared(sam, spec, device, trained, optimizer, autocast)


def train(config: TrainConfig, out: Path, log=print) -> Sam:
    """Run training and write ``out`` (fp16 state dict) and ``out.with_suffix('.json')``."""
    run = prepare(config)
    sam, spec, optimizer = run.sam, run.spec, run.optimizer
    params = sum(p.numel() for p in sam.parameters())
    log(
        f"training {spec.name} on {run.device}: {params / 1e6:.2f} M parameters "
        f"({sum(p.numel() for p in run.trained) / 1e6:.2f} M trained), config {asdict(config)}"
    )
    history: list[dict[str, float]] = []
    step = 0
    low = sam.prompt_encoder.mask_input_size[0]
    with step_draws(config, spec.image_size, low) as draws:
        started = time.monotonic()
        for drawn, rng in draws:
            elapsed = time.monotonic() - started
            progress = elapsed / (60 * config.minutes) if config.minutes else step / config.steps
            if progress >= 1:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(progress, config, step)
            loss, parts = train_step(run, drawn, rng, config)
            history.append({"step": step, "loss": loss.item(), **parts})
            if step % 50 == 0:
                _log_progress(log, step, elapsed, optimizer, history[-50:])
            step += 1
    sam.eval()
    save_checkpoint(sam, out)
    summary = {
        "spec": spec.to_dict(),
        "config": asdict(config),
        "device": str(run.device),
        "steps": step,
        "minutes": (time.monotonic() - started) / 60,
        "parameters": params,
        "final": history[-1] if history else {},
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {out} after {step} steps")
    return sam


def train_step(
    run: Prepared,
    drawn: Drawn,
    rng: np.random.Generator,
    config: TrainConfig,
    watch: Stopwatch = OFF,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step on one step's drawn images; returns the loss and its parts.

    The decoder's backward pass stops at a copy of the embeddings, and the encoder's runs
    from there: the same gradients as one pass, timed apart.
    """
    sam, optimizer, autocast = run.sam, run.optimizer, run.autocast
    with watch.phase("batch"):
        batch = to_model(sam, drawn)
    with watch.phase("encoder_forward"), autocast:
        embeddings = sam.image_encoder(batch.inputs)
    detached = embeddings.detach().requires_grad_(embeddings.requires_grad)
    with autocast:
        loss, parts = step_loss(sam, detached, batch, rng, config, watch)
    with watch.phase("decoder_backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if detached.grad is not None:
        with watch.phase("encoder_backward"):
            embeddings.backward(detached.grad)
    with watch.phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(run.trained, 1.0)
        optimizer.step()
    return loss, parts


def _log_progress(
    log, step: int, elapsed: float, optimizer: torch.optim.Optimizer, recent: list[dict]
) -> None:
    """One line: the step, time, learning rate and the recent steps' mean loss and IoUs."""
    keys = {k for h in recent for k in h}
    means = {k: np.mean([h[k] for h in recent if k in h]) for k in keys}
    log(
        f"step {step:5d}  {elapsed / 60:5.1f} min  lr {optimizer.param_groups[0]['lr']:.2e}"
        f"  loss {means['loss']:.3f}  train IoU point {means.get('point', 0):.3f}"
        f"  box {means.get('box', 0):.3f}  point+box {means.get('point_box', 0):.3f}"
        f"  refine {means.get('refine', 0):.3f}"
    )


def save_checkpoint(sam: Sam, path: Path) -> None:
    """An fp16 state dict: half the bytes; ``build_sam`` loads it back as float32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().half() if v.is_floating_point() else v.cpu()
        for k, v in sam.state_dict().items()
    }
    torch.save(state, path)


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/sam_small_shapes.pth"))
    for name, value in asdict(defaults).items():
        if isinstance(value, tuple):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs=2, default=value)
        elif isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=lambda s: s == "true",
                                default=value)  # fmt: skip
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args["long_side"] = tuple(args["long_side"])
    train(TrainConfig(**args), out, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
