"""The benchmark's naive handler (scripts/naive_handler.py) answers with the server's
mask records, made by pycocotools from its dense masks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import coco_rle, runs_of
from naive_handler import mask_records
from samclient.masks import decode_segmentation
from samserve.masks import OUTPUT_FORMATS, encode_masks, mask_to_png


def predicted_masks() -> tuple[np.ndarray, np.ndarray]:
    """CxHxW bool masks and C float32 scores, as ``SamPredictor.predict`` returns them,
    with an empty, a full and a last-pixel-only mask and tied scores."""
    rng = np.random.default_rng(4)
    masks = rng.random((6, 23, 37)) < rng.random((6, 1, 1))
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, -1, -1] = True
    scores = np.array([0.3, 0.9, 0.3, 0.5, 0.1, 0.9], dtype=np.float32)
    return masks, scores


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_records_are_the_servers_for_the_same_masks(output):
    masks, scores = predicted_masks()
    records = mask_records(masks, scores, output)
    assert records == encode_masks([runs_of(mask) for mask in masks], scores, output)
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.9, 0.5, 0.3, 0.3, 0.1])
    assert all(type(r["score"]) is float and type(r["area"]) is int for r in records)


@pytest.mark.parametrize("output", ["rle", "png"])
def test_records_carry_pycocotools_rle_and_the_png_of_each_mask(output):
    masks, scores = predicted_masks()
    order = np.argsort(-scores, kind="stable")
    for record, index in zip(mask_records(masks, scores, output), order, strict=True):
        np.testing.assert_array_equal(decode_segmentation(record), masks[index])
        if output == "rle":
            counts = coco_rle(masks[index])["counts"].decode("ascii")
            assert record["segmentation"] == {"size": [23, 37], "counts": counts}
        else:
            assert record["png"] == mask_to_png(masks[index])


def test_no_masks_no_records():
    assert mask_records(np.zeros((0, 5, 7), dtype=bool), np.zeros(0, np.float32), "rle") == []
