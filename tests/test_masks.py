"""Tests for samserve.masks with real pycocotools and Pillow.

The server's masks are ``MaskRuns`` (``samserve.upscale`` finds their runs); here they
are made from dense masks (``runs_of``), so that each record can be checked against what
pycocotools and Pillow make of the same pixels.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import coco_rle, runs_of
from samclient.masks import decode_segmentation
from samserve.masks import (
    OUTPUT_FORMATS,
    MaskRuns,
    encode_mask_groups,
    encode_masks,
    mask_to_png,
)

H, W = 6, 9  # non-square on purpose: a transposed mask cannot pass


def three_masks() -> tuple[np.ndarray, np.ndarray]:
    """Three distinct CxHxW masks and scores whose order is not the input order."""
    masks = np.zeros((3, H, W), dtype=bool)
    masks[0, 1:4, 2:7] = True  # rectangle: x 2..6, y 1..3 -> bbox [2, 1, 5, 3], area 15
    masks[1, 0, W - 1] = True  # one pixel in the top-right corner
    masks[2, :, :3] = True  # left three columns, full height
    masks[2, H - 1, :] = True  # and the bottom row: an L shape
    scores = np.array([0.2, 0.9, 0.5], dtype=np.float32)
    return masks, scores


EXPECTED_ORDER = [1, 2, 0]  # by score: 0.9, 0.5, 0.2


def as_runs(masks: np.ndarray) -> list[MaskRuns]:
    """``runs_of`` each mask of a CxHxW bool array."""
    return [runs_of(mask) for mask in masks]


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_records_are_sorted_by_score_descending(output):
    masks, scores = three_masks()
    records = encode_masks(as_runs(masks), scores, output)
    assert len(records) == 3
    got = [r["score"] for r in records]
    assert got == sorted(got, reverse=True)
    assert got == pytest.approx([0.9, 0.5, 0.2])
    assert all(type(s) is float for s in got)


@pytest.mark.parametrize("output", ["rle", "png"])
def test_each_mask_travels_with_its_own_score(output):
    masks, scores = three_masks()
    records = encode_masks(as_runs(masks), scores, output)
    for record, index in zip(records, EXPECTED_ORDER, strict=True):
        assert record["score"] == pytest.approx(float(scores[index]))
        decoded = decode_segmentation(record)
        assert decoded.dtype == bool
        assert decoded.shape == (H, W)
        np.testing.assert_array_equal(decoded, masks[index])


def test_rle_is_exactly_what_pycocotools_writes_with_string_counts():
    masks, scores = three_masks()
    records = encode_masks(as_runs(masks), scores, "rle")
    for record, index in zip(records, EXPECTED_ORDER, strict=True):
        expected = coco_rle(masks[index])
        segmentation = record["segmentation"]
        assert set(segmentation) == {"size", "counts"}
        assert isinstance(segmentation["counts"], str)
        assert segmentation["counts"] == expected["counts"].decode("ascii")
        assert segmentation["size"] == [H, W]
        assert all(type(v) is int for v in segmentation["size"])
        # pycocotools itself reads it back (counts as bytes, the way it wrote them).
        back = mask_utils.decode({"size": [H, W], "counts": segmentation["counts"].encode()})
        np.testing.assert_array_equal(back.astype(bool), masks[index])


def test_area_and_bbox_of_known_shapes():
    masks, scores = three_masks()
    records = {round(r["score"], 1): r for r in encode_masks(as_runs(masks), scores, "none")}
    rectangle, pixel, ell = records[0.2], records[0.9], records[0.5]
    assert rectangle["area"] == 15
    assert rectangle["bbox"] == [2, 1, 5, 3]
    assert pixel["area"] == 1
    assert pixel["bbox"] == [W - 1, 0, 1, 1]
    assert ell["area"] == 3 * H + (W - 3)
    assert ell["bbox"] == [0, 0, W, H]
    for record in records.values():
        assert type(record["area"]) is int
        assert all(type(v) is int for v in record["bbox"])


@pytest.mark.parametrize("output", ["rle", "png"])
def test_empty_and_full_masks(output):
    masks = np.zeros((2, H, W), dtype=bool)
    masks[1] = True
    empty, full = encode_masks(as_runs(masks), np.array([0.7, 0.3]), output)
    assert empty["score"] == pytest.approx(0.7)
    assert empty["area"] == 0
    assert empty["bbox"] == [0, 0, 0, 0]
    assert not decode_segmentation(empty).any()
    assert decode_segmentation(empty).shape == (H, W)
    assert full["area"] == H * W
    assert full["bbox"] == [0, 0, W, H]
    assert decode_segmentation(full).all()


def test_none_output_carries_no_mask_data():
    masks, scores = three_masks()
    records = encode_masks(as_runs(masks), scores, "none")
    for record in records:
        assert set(record) == {"score", "area", "bbox"}
        with pytest.raises(ValueError):
            decode_segmentation(record)
    assert [r["area"] for r in records] == [int(masks[i].sum()) for i in EXPECTED_ORDER]
    # The server makes masks for 'none' without their RLE: the records are the same.
    box_only = [MaskRuns(None, run.size, run.bbox, run.area) for run in as_runs(masks)]
    assert encode_masks(box_only, scores, "none") == records


def test_output_formats_carry_the_right_key_only():
    masks, scores = three_masks()
    for record in encode_masks(as_runs(masks), scores, "rle"):
        assert "segmentation" in record and "png" not in record
    for record in encode_masks(as_runs(masks), scores, "png"):
        assert "png" in record and "segmentation" not in record


@pytest.mark.parametrize("output", ["RLE", "jpeg", "", "mask"])
def test_invalid_output_raises_value_error(output):
    masks, scores = three_masks()
    with pytest.raises(ValueError, match="output"):
        encode_masks(as_runs(masks), scores, output)


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_records_are_json_serialisable(output):
    masks, scores = three_masks()
    records = encode_masks(as_runs(masks), scores, output)
    assert json.loads(json.dumps(records)) == records


def test_default_output_is_rle():
    masks, scores = three_masks()
    assert encode_masks(as_runs(masks), scores) == encode_masks(as_runs(masks), scores, "rle")


def test_equal_scores_keep_input_order():
    # 40 masks (one distinct pixel each) in 4 tied groups: enough that an unstable
    # sort (numpy's quicksort/SIMD sorts beyond 16 elements) would reorder ties.
    count = 40
    masks = np.zeros((count, H * W), dtype=bool)
    masks[np.arange(count), np.arange(count)] = True
    masks = masks.reshape(count, H, W)
    scores = np.array([0.1, 0.9, 0.5, 0.3] * 10, dtype=np.float32)
    records = encode_masks(as_runs(masks), scores, "rle")
    expected = sorted(range(count), key=lambda i: -scores[i])  # Python's sort is stable
    got = [int(np.flatnonzero(decode_segmentation(r))[0]) for r in records]
    assert got == expected


def test_single_mask_and_no_masks():
    mask = np.zeros((1, H, W), dtype=bool)
    mask[0, 2:4, 5:8] = True
    (record,) = encode_masks(as_runs(mask), np.array([0.42], dtype=np.float32), "rle")
    assert record["area"] == 6 and record["bbox"] == [5, 2, 3, 2]
    np.testing.assert_array_equal(decode_segmentation(record), mask[0])
    assert encode_masks([], np.zeros(0), "rle") == []


def test_tall_image_keeps_orientation():
    tall = np.zeros((1, 40, 3), dtype=bool)  # H=40, W=3
    tall[0, 35:, 0] = True
    for output in ("rle", "png"):
        (record,) = encode_masks(as_runs(tall), np.array([1.0]), output)
        decoded = decode_segmentation(record)
        assert decoded.shape == (40, 3)
        np.testing.assert_array_equal(decoded, tall[0])
        assert record["bbox"] == [0, 35, 1, 5]
    (record,) = encode_masks(as_runs(tall), np.array([1.0]), "rle")
    assert record["segmentation"]["size"] == [40, 3]


def test_random_masks_roundtrip_exactly():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 17, 31)) < 0.4
    scores = rng.random(4)
    order = np.argsort(-scores)
    for output in ("rle", "png"):
        records = encode_masks(as_runs(masks), scores, output)
        for record, index in zip(records, order, strict=True):
            np.testing.assert_array_equal(decode_segmentation(record), masks[index])
            assert record["area"] == int(masks[index].sum())


def test_mask_to_png_is_a_one_bit_png_of_the_mask():
    masks, _ = three_masks()
    mask = masks[2]
    data = base64.b64decode(mask_to_png(mask), validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.mode == "1"
    assert image.size == (W, H)
    gray = np.asarray(image.convert("L"))
    assert set(np.unique(gray)) <= {0, 255}
    np.testing.assert_array_equal(gray == 255, mask)


def test_mask_to_png_accepts_non_bool_zero_one_masks():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[3, 4] = 1
    data = base64.b64decode(mask_to_png(mask))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0
    np.testing.assert_array_equal(decoded, mask.astype(bool))


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_groups_encode_as_each_alone_whatever_the_map(output):
    rng = np.random.default_rng(5)
    groups = []
    for count in (3, 1, 0, 3):
        masks = rng.random((count, 30, 41)) < rng.random((count, 1, 1))
        scores = rng.random(count).astype(np.float32)
        groups.append((as_runs(masks), scores))
    expected = [encode_masks(masks, scores, output) for masks, scores in groups]
    assert encode_mask_groups(groups, output) == expected
    with ThreadPoolExecutor(3) as pool:
        assert encode_mask_groups(groups, output, pool.map) == expected
    with pytest.raises(ValueError, match="output must be one of"):
        encode_mask_groups(groups, "jpeg")


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
@pytest.mark.parametrize("shape", [(30, 41), (1, 1), (40, 3), (3, 40)])
def test_records_of_runs_are_what_pycocotools_and_pillow_make_of_the_pixels(output, shape):
    """Each record of a mask given as runs (as ``upscale`` makes them) carries the RLE
    pycocotools encodes, and the PNG Pillow writes, of the same mask's pixels."""
    rng = np.random.default_rng(8 + shape[0])
    masks = rng.random((6, *shape)) < rng.random((6, 1, 1))
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, -1, -1] = True  # only the last pixel
    masks[3, :, shape[1] // 2 :] = True  # runs across column ends: full-height columns
    scores = rng.random(6).astype(np.float32)
    runs = as_runs(masks)
    records = encode_masks(runs, scores, output)
    for record, index in zip(records, np.argsort(-scores, kind="stable"), strict=True):
        mask = masks[index]
        coco = coco_rle(mask)
        assert record["area"] == int(mask_utils.area(coco))
        assert record["bbox"] == [int(v) for v in mask_utils.toBbox(coco)]
        if output == "rle":
            assert record["segmentation"] == {
                "size": list(shape),
                "counts": coco["counts"].decode("ascii"),
            }
        if output == "png":
            assert record["png"] == mask_to_png(mask)
    for run, mask in zip(runs, masks, strict=True):
        np.testing.assert_array_equal(run.dense(), mask)


def test_empty_mask_runs():
    assert MaskRuns.empty((30, 41)).rle() == coco_rle(np.zeros((30, 41), dtype=bool))
    assert MaskRuns.empty((30, 41), rle=False).counts is None
    (record,) = encode_masks([MaskRuns.empty((30, 41))], np.array([0.5]), "rle")
    assert record["area"] == 0 and record["bbox"] == [0, 0, 0, 0]
    assert not decode_segmentation(record).any()
