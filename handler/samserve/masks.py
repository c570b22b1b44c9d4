"""Encode binary masks for the wire: COCO RLE (pycocotools), PNG, or none."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

OUTPUT_FORMATS = ("rle", "png", "none")


def encode_masks(
    masks: np.ndarray, scores: np.ndarray, output: str = "rle"
) -> list[dict[str, Any]]:
    """Mask records for CxHxW bool ``masks`` with C ``scores``, best score first.

    Each record has ``score`` (predicted IoU), ``area`` (pixels) and ``bbox``
    ([x, y, w, h], integer pixels), plus ``segmentation`` (COCO RLE with string counts,
    as pycocotools writes it) for ``rle``, or ``png`` (base64 1-bit PNG) for ``png``;
    ``none`` carries no mask data.
    """
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")
    order = np.argsort(-scores, kind="stable")
    rles = mask_utils.encode(np.asfortranarray(masks[order].transpose(1, 2, 0), dtype=np.uint8))
    areas = mask_utils.area(rles)
    boxes = mask_utils.toBbox(rles)
    records = []
    for rank, index in enumerate(order):
        record: dict[str, Any] = {
            "score": float(scores[index]),
            "area": int(areas[rank]),
            "bbox": [int(v) for v in boxes[rank]],
        }
        if output == "rle":
            rle = rles[rank]
            record["segmentation"] = {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
        elif output == "png":
            record["png"] = mask_to_png(masks[index])
        records.append(record)
    return records


def mask_to_png(mask: np.ndarray) -> str:
    """Base64 of a 1-bit PNG of an HxW bool mask (decoders read it as 0/255 grayscale)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_segmentation(record: dict[str, Any]) -> np.ndarray:
    """HxW bool mask from a record's ``segmentation`` (RLE) or ``png``: the client side."""
    if "segmentation" in record:
        rle = dict(record["segmentation"])
        rle["counts"] = rle["counts"].encode("ascii")
        return mask_utils.decode(rle).astype(bool)
    if "png" in record:
        image = Image.open(io.BytesIO(base64.b64decode(record["png"])))
        return np.asarray(image.convert("L")) > 0
    raise ValueError("record carries no mask (output was 'none')")
