"""Draw masks and prompts over an image, for people to look at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [
    (255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 190, 40),
    (200, 90, 255), (40, 220, 220), (255, 120, 200), (160, 160, 60),
]  # fmt: skip


def draw_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    prompts: Sequence[dict[str, Any]] = (),
    alpha: float = 0.45,
) -> Image.Image:
    """HxWx3 uint8 ``image`` with each HxW bool mask tinted in its own colour.

    Prompts (protocol dicts) are drawn on top: foreground points green, background
    points red, boxes as outlines.
    """
    canvas = image.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - alpha) + colour * alpha
        edge = mask ^ _eroded(mask)
        canvas[edge] = colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    radius = max(3, min(out.size) // 100)
    for prompt in prompts:
        if prompt.get("box") is not None:
            draw.rectangle(prompt["box"], outline=(255, 255, 0), width=max(2, radius // 2))
        for (x, y), label in zip(prompt.get("points", []), prompt.get("labels", [])):
            fill = (0, 255, 0) if label == 1 else (255, 0, 0)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill,
                         outline=(0, 0, 0))  # fmt: skip
    return out


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Mask shrunk by one pixel (4-neighbourhood), to find its outline."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out
