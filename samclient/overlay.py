"""Draw masks and prompts over an image, for people to look at."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

# The samples of more than 8 bits that become black and white when a request names no
# intensity range: the server's defaults, so the picture looks as the model saw it.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8

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


def picture(
    data: bytes, page: int = 0, intensity_range: tuple[float, float] | None = None
) -> np.ndarray:
    """An encoded image as the server segments it, to draw masks on.

    Arguments:
      data (bytes): the encoded image the request sent.
      page (int): the frame of a multi-page image, from 0.
      intensity_range (tuple(float, float) or None): the sample values shown black and
        white in an image of more than 8 bits per sample; None: its own
        ``LOW_PERCENTILE`` and ``HIGH_PERCENTILE``.

    Returns:
      (np.ndarray): HxWx3 uint8 RGB, upright as the EXIF orientation says: the frame the
        masks and prompts are in.
    """
    image = Image.open(io.BytesIO(data))
    image.seek(page)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        samples = _to_8_bits(np.asarray(image, dtype=np.float32), intensity_range)
        return np.repeat(samples[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def _to_8_bits(samples: np.ndarray, intensity_range: tuple[float, float] | None) -> np.ndarray:
    """HxW samples mapped linearly from ``intensity_range`` (or their percentiles) to uint8."""
    if intensity_range is None:
        finite = samples[np.isfinite(samples)]
        percentiles = [LOW_PERCENTILE, HIGH_PERCENTILE]
        intensity_range = tuple(np.percentile(finite, percentiles)) if finite.size else (0, 0)
        if finite.size and intensity_range[1] <= intensity_range[0]:  # mostly one value
            intensity_range = (finite.min(), finite.max())
    low, high = intensity_range
    samples = np.nan_to_num(samples, nan=low)
    if not high > low:
        return np.where(samples > low, 255, 0).astype(np.uint8)
    return np.clip((samples - low) * (255.0 / (high - low)), 0, 255).round().astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Mask shrunk by one pixel (4-neighbourhood), to find its outline."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out
