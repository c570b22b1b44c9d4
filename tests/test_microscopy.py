"""Microscopy images through a real TorchServe: 12-bit data segments like 8-bit data.

A fluorescence camera writes 12 bits per sample into 16-bit files. The server must keep
that signal: with the shipped model, box prompts on 12-bit cells score within
``TOLERANCE`` mean IoU of the same data stretched to 8 bits by the client.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from build_mar import build_archive
from samclient.body import segment_request
from samclient.errors import SamServeError
from samclient.masks import decode_segmentation
from samserve.models import spec_by_name
from training.evaluate import iou
from training.prompts import mask_box

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "sam_small_shapes.pth"
MODEL = "sam_microscopy"
TOLERANCE = 0.03
IMAGES = 6
BRIGHT = (2000.0, 4000.0)  # cell intensity over a background of 100, 12-bit
DIM = (250.0, 600.0)


def cells(seed: int, intensity: tuple[float, float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 384x512 12-bit fluorescence-like image (uint16) and its cells' HxW bool masks:
    six non-overlapping ellipses of ``intensity`` over a noisy background."""
    rng = np.random.default_rng(seed)
    height, width = 384, 512
    yy, xx = np.mgrid[0:height, 0:width]
    image = rng.normal(100.0, 15.0, (height, width))
    masks: list[np.ndarray] = []
    taken = np.zeros((height, width), dtype=bool)
    while len(masks) < 6:
        cy, cx = rng.uniform(40, height - 40), rng.uniform(40, width - 40)
        ry, rx = rng.uniform(15, 40, 2)
        angle = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
        mask = u * u + v * v <= 1
        if (mask & taken).any():
            continue
        taken |= mask
        level = rng.uniform(*intensity)
        image[mask] += level - 100.0 + rng.normal(0.0, 0.05 * intensity[0], mask.sum())
        masks.append(mask)
    return np.clip(image, 0, 4095).round().astype(np.uint16), masks


def stretched(image: np.ndarray) -> np.ndarray:
    """The client's own 8-bit version: minimum to 0, maximum to 255."""
    low, high = float(image.min()), float(image.max())
    return ((image - low) * 255.0 / (high - low)).round().astype(np.uint8)


def png(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format="PNG")
    return buffer.getvalue()


def box_ious(rest, data: bytes, masks: list[np.ndarray]) -> list[float]:
    body = segment_request(data, prompts=[{"box": mask_box(m)} for m in masks], multimask=False)
    results = rest.predict(MODEL, body)["results"]
    return [iou(decode_segmentation(r["masks"][0]), m) for r, m in zip(results, masks)]


@pytest.fixture(scope="module")
def microscopy_model(server, rest):
    build_archive(spec_by_name("sam_small"), SHIPPED, server.model_store, MODEL)
    rest.register_model(f"{MODEL}.mar", MODEL, initial_workers=1)
    yield MODEL
    rest.unregister_model(MODEL)


@pytest.mark.parametrize(("name", "intensity"), [("bright", BRIGHT), ("dim", DIM)])
def test_12_bit_cells_segment_as_well_as_8_bit(microscopy_model, rest, name, intensity):
    twelve, eight = [], []
    for seed in range(IMAGES):
        image, masks = cells(seed, intensity)
        assert Image.open(io.BytesIO(png(image))).mode.startswith("I")  # 16-bit on disk
        twelve += box_ious(rest, png(image), masks)
        eight += box_ious(rest, png(stretched(image)), masks)
    print(f"{name} cells: 12-bit {np.mean(twelve):.3f}, stretched 8-bit {np.mean(eight):.3f}")
    assert np.mean(eight) > 0.8, "the model itself must segment these cells"
    assert np.mean(twelve) >= np.mean(eight) - TOLERANCE


def test_a_page_of_a_12_bit_stack_is_segmented_and_clicked_by_its_id(microscopy_model, rest):
    image, masks = cells(0, BRIGHT)
    blank = np.full_like(image, 100)
    pages = [Image.fromarray(p) for p in (blank, image, blank)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    stack = buffer.getvalue()

    first = rest.predict(MODEL, segment_request(stack, page=1))
    assert first["width"] == 512 and first["height"] == 384
    assert first["image_id"] != rest.predict(MODEL, segment_request(stack))["image_id"]
    boxes = [{"box": mask_box(m)} for m in masks]
    click = rest.predict(
        MODEL, segment_request(image_id=first["image_id"], prompts=boxes, multimask=False)
    )
    assert click["cached"] is True
    ious = [iou(decode_segmentation(r["masks"][0]), m) for r, m in zip(click["results"], masks)]
    assert np.mean(ious) > 0.8, ious
    with pytest.raises(SamServeError) as caught:
        rest.predict(MODEL, segment_request(stack, page=3))
    assert caught.value.status == 400 and caught.value.code == "page_out_of_range"


def test_segment_py_reads_the_page_and_draws_it(microscopy_model, server, tmp_path):
    image, masks = cells(1, DIM)
    pages = [Image.fromarray(p) for p in (np.full_like(image, 100), image)]
    stack = tmp_path / "stack.tif"
    pages[0].save(stack, format="TIFF", save_all=True, append_images=pages[1:])
    box = ",".join(str(round(v)) for v in mask_box(masks[0]))
    out = tmp_path / "overlay.png"
    command = [
        sys.executable, str(REPO / "scripts" / "segment.py"), str(stack), "--page", "1",
        "--box", box, "--model", MODEL, "--workdir", str(server.workdir),
        "--config", str(server.workdir / "config.properties"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    response = json.loads(out.with_suffix(".json").read_text())
    assert iou(decode_segmentation(response["results"][0]["masks"][0]), masks[0]) > 0.8
    drawn = np.asarray(Image.open(out).convert("L"))
    assert drawn.shape == (384, 512)
    # The overlay's picture is page 1 stretched (another, unprompted cell stands out from
    # the background), not the blank page 0.
    background = ~np.logical_or.reduce(masks)
    assert drawn[masks[1]].mean() > np.median(drawn[background]) + 50
