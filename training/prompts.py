"""Prompts drawn from ground-truth masks, shared by training and evaluation.

Masks are HxW bool in some frame; points come back as pixel centres ``[x, y]`` and boxes
as ``[x0, y0, x1, y1]`` in that frame.
"""

from __future__ import annotations

import numpy as np
import torch


def random_pixel(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    """Centre [x, y] of a uniformly drawn pixel of a non-empty HxW bool mask."""
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(xs))
    return [float(xs[i]) + 0.5, float(ys[i]) + 0.5]


def mask_box(mask: np.ndarray) -> list[float]:
    """The tight XYXY box of a non-empty HxW bool mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def jittered_box(mask: np.ndarray, rng: np.random.Generator) -> list[float]:
    """``mask_box`` with SAM's training noise (std 10% of the side, at most 20 px), clipped."""
    box = np.array(mask_box(mask))
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    noise = np.clip(rng.normal(0, 0.1, 4) * sides, -20, 20)
    height, width = mask.shape
    return np.clip(box + noise, 0, [width, height, width, height]).tolist()


def corrective_click(
    pred: np.ndarray, truth: np.ndarray, rng: np.random.Generator
) -> tuple[list[float], int]:
    """A click in the larger error region of ``pred`` vs ``truth`` (HxW bool): a missed
    pixel with label 1, or a wrongly added one with label 0. Without errors, a click on
    the object (or anywhere, if the object is empty at this resolution), label 1."""
    missed, extra = truth & ~pred, pred & ~truth
    if missed.any() or extra.any():
        if missed.sum() >= extra.sum():
            return random_pixel(missed, rng), 1
        return random_pixel(extra, rng), 0
    return random_pixel(truth if truth.any() else np.ones_like(truth), rng), 1


def choose_instances(
    labels: torch.Tensor, count: int, min_pixels: int, generator: torch.Generator
) -> torch.Tensor | None:
    """``count`` instance labels of an image drawn uniformly with replacement among those
    with at least ``min_pixels`` pixels.

    Arguments:
      labels (torch.Tensor): HxW uint8 instance labels (0: background).
      count (int): how many prompts the image gets.
      min_pixels (int): the smallest instance worth a prompt.
      generator (torch.Generator): the step's generator.
    Returns:
      (torch.Tensor | None): (count,) int64 labels, or None when no instance is large enough.
    """
    areas = torch.bincount(labels.flatten().long(), minlength=256)[1:]
    present = torch.nonzero(areas >= min_pixels)[:, 0] + 1
    if len(present) == 0:
        return None
    return present[torch.randint(len(present), (count,), generator=generator)]


def random_points(masks: torch.Tensor, generator: torch.Generator, tries: int = 32) -> torch.Tensor:
    """Centre (x, y) of one uniformly drawn pixel of each mask, all masks at once.

    Candidates are drawn uniformly in each mask's box and the first inside the mask is
    kept (uniform over the mask's pixels, without scanning them); the rare mask that
    fills too little of its box for any of ``tries`` candidates to land is drawn from a
    running count of its pixels instead.

    Arguments:
      masks (torch.Tensor): KxHxW bool, each non-empty.
      generator (torch.Generator): the step's generator.
      tries (int): candidates per mask.
    Returns:
      (torch.Tensor): Kx2 float32 pixel centres in the masks' frame.
    """
    rows = torch.arange(len(masks))
    boxes = mask_boxes(masks)
    u = torch.rand(len(masks), tries, 2, generator=generator)
    # float32 rounds u * side up to the side itself for u just below 1: clamp to the box.
    last = boxes[:, None, 2:].long() - 1
    xs = (boxes[:, None, 0] + u[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0])).long()
    ys = (boxes[:, None, 1] + u[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1])).long()
    xs, ys = torch.minimum(xs, last[..., 0]), torch.minimum(ys, last[..., 1])
    inside = masks[rows[:, None], ys, xs]
    first = inside.float().argmax(dim=1)
    points = torch.stack([xs[rows, first], ys[rows, first]], dim=1)
    missed = torch.nonzero(~inside.any(dim=1))[:, 0]
    if len(missed):
        width = masks.shape[-1]
        counts = masks[missed].flatten(1).cumsum(1, dtype=torch.int32)
        draw = torch.rand(len(missed), generator=generator) * counts[:, -1]
        rank = draw.int().clamp(max=counts[:, -1] - 1) + 1
        index = torch.searchsorted(counts, rank[:, None])[:, 0]
        points[missed] = torch.stack([index % width, index // width], dim=1)
    return points.float() + 0.5


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight XYXY box of each non-empty mask of KxHxW bool ``masks``: Kx4 float32."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1:]
    top = rows.float().argmax(dim=1)
    bottom = height - rows.flip(1).float().argmax(dim=1)
    left = cols.float().argmax(dim=1)
    right = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([left, top, right, bottom], dim=1).float()


def jitter_boxes(
    boxes: torch.Tensor, size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """``jittered_box`` for Kx4 XYXY ``boxes`` at once (SAM's noise: std 10 % of the side,
    at most 20 px), clipped to the image's unpadded ``size`` (h, w)."""
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.randn(boxes.shape, generator=generator) * 0.1 * sides).clamp(-20, 20)
    height, width = size
    bound = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum((boxes + noise).clamp(min=0), bound)


def error_clicks(
    pred: torch.Tensor, truth: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``corrective_click`` for K masks at once, on their grid.

    Arguments:
      pred, truth (torch.Tensor): KxHxW bool predicted and true masks.
      generator (torch.Generator): the step's generator.
    Returns:
      (tuple): Kx2 float32 (x, y) cell centres and K int32 labels: a missed cell (1) where
        the misses outnumber the additions, else a wrongly added one (0); without errors a
        cell of the object (or anywhere, if it is empty), label 1.
    """
    missed, extra = truth & ~pred, pred & ~truth
    add = missed.sum(dim=(1, 2)) >= extra.sum(dim=(1, 2))
    region = torch.where(add[:, None, None], missed, extra)
    empty = ~region.flatten(1).any(dim=1)
    fallback = torch.where(truth.flatten(1).any(dim=1)[:, None, None], truth, True)
    region = torch.where(empty[:, None, None], fallback, region)
    labels = (add | empty).int()
    return random_points(region, generator), labels
