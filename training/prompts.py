"""Prompts drawn from ground-truth masks, shared by training and evaluation.

Masks are HxW bool in some frame; points come back as pixel centres ``[x, y]`` and boxes
as ``[x0, y0, x1, y1]`` in that frame.
"""

from __future__ import annotations

import numpy as np


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
