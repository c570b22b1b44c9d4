"""Shared fixtures: small SAM models with deterministic random weights, test images."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
for path in (REPO / "handler", REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from samserve.models import build_sam, random_checkpoint, spec_by_name  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Deterministic random checkpoints of the small specs."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in ("sam_micro", "sam_tiny"):
        out[name] = folder / f"{name}.pth"
        random_checkpoint(spec_by_name(name), out[name], seed=0)
    return out


@pytest.fixture(scope="session")
def micro_sam(checkpoints):
    return build_sam(spec_by_name("sam_micro"), checkpoints["sam_micro"])


@pytest.fixture(scope="session")
def tiny_sam(checkpoints):
    return build_sam(spec_by_name("sam_tiny"), checkpoints["sam_tiny"])


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image with smooth structure plus noise (not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [
            (xx * 255 // max(width - 1, 1)),
            (yy * 255 // max(height - 1, 1)),
            ((xx + yy) % 128) * 2,
        ],
        axis=-1,
    ).astype(np.int32)
    cy, cx, r = height // 2, width // 3, min(height, width) // 5
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (230, 40, 40)
    image += rng.integers(-20, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
