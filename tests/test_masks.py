"""Tests for samserve.masks with real pycocotools and Pillow."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import column_runs
from samclient.masks import decode_segmentation
from samserve.masks import (
    OUTPUT_FORMATS,
    MaskRuns,
    MaskWindow,
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


def coco_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_records_are_sorted_by_score_descending(output):
    masks, scores = three_masks()
    records = encode_masks(masks, scores, output)
    assert len(records) == 3
    got = [r["score"] for r in records]
    assert got == sorted(got, reverse=True)
    assert got == pytest.approx([0.9, 0.5, 0.2])
    assert all(type(s) is float for s in got)


@pytest.mark.parametrize("output", ["rle", "png"])
def test_each_mask_travels_with_its_own_score(output):
    masks, scores = three_masks()
    records = encode_masks(masks, scores, output)
    for record, index in zip(records, EXPECTED_ORDER, strict=True):
        assert record["score"] == pytest.approx(float(scores[index]))
        decoded = decode_segmentation(record)
        assert decoded.dtype == bool
        assert decoded.shape == (H, W)
        np.testing.assert_array_equal(decoded, masks[index])


def test_rle_is_exactly_what_pycocotools_writes_with_string_counts():
    masks, scores = three_masks()
    records = encode_masks(masks, scores, "rle")
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
    records = {round(r["score"], 1): r for r in encode_masks(masks, scores, "none")}
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
    empty, full = encode_masks(masks, np.array([0.7, 0.3]), output)
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
    records = encode_masks(masks, scores, "none")
    for record in records:
        assert set(record) == {"score", "area", "bbox"}
        with pytest.raises(ValueError):
            decode_segmentation(record)
    assert [r["area"] for r in records] == [int(masks[i].sum()) for i in EXPECTED_ORDER]


def test_output_formats_carry_the_right_key_only():
    masks, scores = three_masks()
    for record in encode_masks(masks, scores, "rle"):
        assert "segmentation" in record and "png" not in record
    for record in encode_masks(masks, scores, "png"):
        assert "png" in record and "segmentation" not in record


@pytest.mark.parametrize("output", ["RLE", "jpeg", "", "mask"])
def test_invalid_output_raises_value_error(output):
    masks, scores = three_masks()
    with pytest.raises(ValueError, match="output"):
        encode_masks(masks, scores, output)


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_records_are_json_serialisable(output):
    masks, scores = three_masks()
    records = encode_masks(masks, scores, output)
    assert json.loads(json.dumps(records)) == records


def test_default_output_is_rle():
    masks, scores = three_masks()
    assert encode_masks(masks, scores) == encode_masks(masks, scores, "rle")


def test_equal_scores_keep_input_order():
    # 40 masks (one distinct pixel each) in 4 tied groups: enough that an unstable
    # sort (numpy's quicksort/SIMD sorts beyond 16 elements) would reorder ties.
    count = 40
    masks = np.zeros((count, H * W), dtype=bool)
    masks[np.arange(count), np.arange(count)] = True
    masks = masks.reshape(count, H, W)
    scores = np.array([0.1, 0.9, 0.5, 0.3] * 10, dtype=np.float32)
    records = encode_masks(masks, scores, "rle")
    expected = sorted(range(count), key=lambda i: -scores[i])  # Python's sort is stable
    got = [int(np.flatnonzero(decode_segmentation(r))[0]) for r in records]
    assert got == expected


def test_single_mask_and_no_masks():
    mask = np.zeros((1, H, W), dtype=bool)
    mask[0, 2:4, 5:8] = True
    (record,) = encode_masks(mask, np.array([0.42], dtype=np.float32), "rle")
    assert record["area"] == 6 and record["bbox"] == [5, 2, 3, 2]
    np.testing.assert_array_equal(decode_segmentation(record), mask[0])
    assert encode_masks(np.zeros((0, H, W), dtype=bool), np.zeros(0), "rle") == []


def test_tall_image_keeps_orientation():
    tall = np.zeros((1, 40, 3), dtype=bool)  # H=40, W=3
    tall[0, 35:, 0] = True
    for output in ("rle", "png"):
        (record,) = encode_masks(tall, np.array([1.0]), output)
        decoded = decode_segmentation(record)
        assert decoded.shape == (40, 3)
        np.testing.assert_array_equal(decoded, tall[0])
        assert record["bbox"] == [0, 35, 1, 5]
    (record,) = encode_masks(tall, np.array([1.0]), "rle")
    assert record["segmentation"]["size"] == [40, 3]


def test_random_masks_roundtrip_exactly():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 17, 31)) < 0.4
    scores = rng.random(4)
    order = np.argsort(-scores)
    for output in ("rle", "png"):
        records = encode_masks(masks, scores, output)
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


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(17, 31), (1, 1), (40, 3), (3, 40), (25, 160)])
def test_mask_window_rle_is_what_pycocotools_encodes(shape, density):
    rng = np.random.default_rng(int(density * 100) + shape[0])
    for trial in range(20):
        mask = rng.random(shape) < density
        if trial % 4 == 1:  # runs that cross column ends: full-height columns
            mask[:, shape[1] // 2 :] = True
        if trial % 4 == 2:
            mask[-1, -1] = True  # the last pixel
        if trial % 4 == 3:  # a narrow window: runs found in the window, not by pycocotools
            mask[:, : shape[1] // 2] = False
            mask[:, shape[1] // 2 + 2 :] = False
        window = MaskWindow.of(mask)
        assert window.rle() == coco_rle(mask)
        np.testing.assert_array_equal(window.dense(), mask)
        assert window.window.sum() == mask.sum()
        column_major = MaskWindow.of(np.asfortranarray(mask))  # read without transposing
        assert column_major.rle() == coco_rle(mask)
        np.testing.assert_array_equal(column_major.dense(), mask)


def test_mask_window_is_tight_and_placed():
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:20, 30:33] = True
    mask[15, 45] = True
    window = MaskWindow.of(mask)
    assert (window.top, window.left, window.window.shape) == (10, 30, (10, 16))
    (record,) = encode_masks([window], np.array([0.5]), "rle")
    assert record["bbox"] == [30, 10, 16, 10] and record["area"] == 31
    np.testing.assert_array_equal(decode_segmentation(record), mask)


def test_mask_window_keeps_no_view_of_the_callers_mask():
    mask = np.ones((6, 5), dtype=bool)
    window = MaskWindow.of(mask)
    mask[:] = False
    assert window.window.all() and window.rle() == coco_rle(np.ones((6, 5), dtype=bool))


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_groups_encode_as_each_alone_whatever_the_map(output):
    rng = np.random.default_rng(5)
    groups = []
    for count in (3, 1, 0, 3):
        masks = rng.random((count, 30, 41)) < rng.random((count, 1, 1))
        scores = rng.random(count).astype(np.float32)
        # Both kinds of input: CxHxW arrays and windows (as the engine makes them).
        groups.append((masks if count != 1 else [MaskWindow.of(m) for m in masks], scores))
    expected = [encode_masks(masks, scores, output) for masks, scores in groups]
    assert encode_mask_groups(groups, output) == expected
    with ThreadPoolExecutor(3) as pool:
        assert encode_mask_groups(groups, output, pool.map) == expected
    with pytest.raises(ValueError, match="output must be one of"):
        encode_mask_groups(groups, "jpeg")


def runs_of(mask: np.ndarray) -> MaskRuns:
    """``MaskRuns`` of an HxW bool mask: its column-major run lengths, found by numpy."""
    box = [int(v) for v in mask_utils.toBbox(coco_rle(mask))]
    return MaskRuns.of_runs(column_runs(mask), mask.shape, box, int(mask.sum()))


@pytest.mark.parametrize("output", OUTPUT_FORMATS)
def test_mask_runs_encode_as_their_pixels(output):
    """Records of masks given as runs (as ``upscale`` makes them) are those of the same
    masks given as pixels: RLE, PNG, area and box."""
    rng = np.random.default_rng(8)
    masks = rng.random((5, 30, 41)) < rng.random((5, 1, 1))
    masks[0] = False
    masks[1] = True
    masks[2, :, :] = False
    masks[2, -1, -1] = True  # only the last pixel
    scores = rng.random(5).astype(np.float32)
    runs = [runs_of(mask) for mask in masks]
    assert encode_masks(runs, scores, output) == encode_masks(masks, scores, output)
    for run, mask in zip(runs, masks):
        np.testing.assert_array_equal(run.dense(), mask)
    assert MaskRuns.empty((30, 41)).rle() == coco_rle(np.zeros((30, 41), dtype=bool))
    assert MaskRuns.empty((30, 41), rle=False).counts is None


def test_window_of_a_mask_set_on_all_four_edges_keeps_it_whole():
    mask = np.zeros((30, 40), dtype=bool, order="F")
    mask[0, 5] = mask[29, 7] = mask[12, 0] = mask[3, 39] = True
    window = MaskWindow.of(mask)
    assert window.window.shape == mask.shape and window.window.flags.f_contiguous
    assert not np.shares_memory(window.window, mask)
    assert (window.top, window.left, window.size) == (0, 0, (30, 40))
    np.testing.assert_array_equal(window.dense(), mask)
    for edge in ((0, 5), (29, 7), (12, 0), (3, 39)):  # one edge empty: cropped
        partial = mask.copy(order="F")
        partial[edge] = False
        cropped = MaskWindow.of(partial)
        assert cropped.window.shape != mask.shape and cropped.window.flags.f_contiguous
        np.testing.assert_array_equal(cropped.dense(), partial)
