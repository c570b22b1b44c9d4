"""samserve.upscale against SAM's own postprocess_masks on the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from samserve.upscale import axis_map, upscale_masks


def blobs(low: int, count: int, seed: int) -> torch.Tensor:
    """count x low x low logits: a few smooth bumps above a negative floor, like a decoder's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:low, 0:low] / low
    out = np.full((count, low, low), -8.0)
    for c in range(count):
        for _ in range(rng.integers(0, 4)):
            cy, cx, r = rng.random(), rng.random(), 0.02 + 0.2 * rng.random()
            out[c] += 16 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[c] += rng.normal(0, 0.5, (low, low))
    return torch.as_tensor(out, dtype=torch.float32)


def reference(
    logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], padded: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sam.postprocess_masks's two interpolations, thresholded at 0, and the logits."""
    up = torch.nn.functional.interpolate(
        logits[None], (padded, padded), mode="bilinear", align_corners=False
    )
    up = up[..., : input_size[0], : input_size[1]]
    up = torch.nn.functional.interpolate(up, original_size, mode="bilinear", align_corners=False)
    return (up[0] > 0).numpy(), up[0].numpy()


@pytest.mark.parametrize(
    "original_size,padded,low",
    [
        ((1500, 2000), 1024, 256),
        ((480, 640), 1024, 256),
        ((37, 301), 256, 64),
        ((640, 480), 384, 96),
        ((256, 256), 256, 64),
        ((5, 3), 1024, 256),
    ],  # fmt: skip
)
def test_matches_postprocess_masks(original_size, padded, low):
    scale = padded / max(original_size)
    input_size = tuple(int(s * scale + 0.5) for s in original_size)
    logits = blobs(low, 6, seed=sum(original_size))
    masks = upscale_masks(logits, input_size, original_size, padded)
    expected, values = reference(logits, input_size, original_size, padded)
    for runs, mask, value in zip(masks, expected, values, strict=True):
        got = runs.dense()
        assert got.shape == original_size
        differ = got != mask
        # Only float rounding may differ: pixels whose logit is within a hair of 0.
        assert np.all(np.abs(value[differ]) < 1e-4), value[differ]
        assert differ.mean() <= 1e-5
        # The runs' RLE, area and box are pycocotools' own of those pixels.
        coco = mask_utils.encode(np.asfortranarray(got, dtype=np.uint8))
        assert runs.rle() == coco
        assert runs.area == int(mask_utils.area(coco)) == got.sum()
        assert runs.bbox == [int(v) for v in mask_utils.toBbox(coco)]


def test_all_negative_logits_give_empty_masks_without_work():
    masks = upscale_masks(torch.full((3, 64, 64), -1.0), (200, 256), (300, 384), 256)
    empty = mask_utils.encode(np.zeros((300, 384), dtype=np.uint8, order="F"))
    for runs in masks:
        assert runs.rle() == empty
        assert not runs.dense().any() and runs.dense().shape == (300, 384)
        assert runs.area == 0 and runs.bbox == [0, 0, 0, 0]


def test_positive_cells_in_the_padding_do_not_make_pixels():
    logits = torch.full((1, 64, 64), -5.0)
    logits[0, 60:, :] = 5.0  # rows that only cover the padding below a wide image
    (runs,) = upscale_masks(logits, (128, 256), (300, 600), 256)
    expected, _ = reference(logits, (128, 256), (300, 600), 256)
    np.testing.assert_array_equal(runs.dense(), expected[0])
    assert not expected.any()


def test_axis_map_weights_are_convex_and_ordered():
    axis = axis_map(256, 1024, 768, 1500)
    weight = axis.weight.astype(np.float64)
    assert np.all(weight >= 0)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(np.diff(axis.first) >= 0) and np.all(np.diff(axis.last) >= 0)
    assert axis.index.shape[1] <= 4


def test_masks_made_in_a_thread_pool_are_the_same_bits():
    from concurrent.futures import ThreadPoolExecutor

    logits = blobs(256, 8, seed=5)
    alone = upscale_masks(logits, (768, 1024), (1500, 2000), 1024)
    with ThreadPoolExecutor(3) as pool:
        pooled = upscale_masks(logits, (768, 1024), (1500, 2000), 1024, map_fn=pool.map)
    assert len(pooled) == len(alone) == 8
    for a, b in zip(alone, pooled, strict=True):
        assert a.size == b.size
        assert a.counts == b.counts and a.counts is not None


def test_masks_made_one_after_another_in_a_thread_keep_their_own_runs():
    """A thread's masks reuse one buffer for their runs: a mask of many runs, then one of
    few, then a larger frame (the buffer grows) and the first again give each its own."""
    noise = torch.randn(1, 256, 256, generator=torch.Generator().manual_seed(4))
    smooth = blobs(256, 1, seed=6)
    order = [(noise, (1500, 2000)), (smooth, (1500, 2000)), (noise, (3000, 4000)),
             (smooth, (600, 800)), (noise, (1500, 2000))]  # fmt: skip
    for logits, size in order:
        input_size = tuple(int(s * 1024 / max(size) + 0.5) for s in size)
        (runs,) = upscale_masks(logits, input_size, size, 1024)
        expected = weighted_sums(logits, input_size, size, 1024, 0.0)[0]
        assert runs.rle() == mask_utils.encode(np.asfortranarray(expected, dtype=np.uint8))


def test_masks_without_rle_carry_box_and_area_only():
    logits = torch.cat([blobs(256, 3, seed=2), torch.full((1, 256, 256), -1.0)])
    made = upscale_masks(logits, (768, 1024), (1500, 2000), 1024)
    bare = upscale_masks(logits, (768, 1024), (1500, 2000), 1024, rle=False)
    for full, box_only in zip(made, bare, strict=True):
        assert box_only.counts is None
        assert (box_only.size, box_only.bbox, box_only.area) == (full.size, full.bbox, full.area)
        with pytest.raises(ValueError, match="box and area only"):
            box_only.rle()


def weighted_sums(
    logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    padded: int,
    threshold: float,
) -> np.ndarray:
    """Cxhxw logits' HxW masks made with torch: the axis maps' sums of products, added in
    map order (``F.embedding_bag``), rows first, over the whole frame, thresholded."""
    rows = axis_map(logits.shape[-2], padded, input_size[0], original_size[0])
    cols = axis_map(logits.shape[-1], padded, input_size[1], original_size[1])

    def apply(axis, source):
        index, weight = torch.from_numpy(axis.index), torch.from_numpy(axis.weight)
        return F.embedding_bag(index, source, per_sample_weights=weight, mode="sum")

    return np.stack(
        [(apply(cols, apply(rows, x).T.contiguous()).T > threshold).numpy() for x in logits]
    )


@pytest.mark.parametrize(
    "original_size,padded,low,threshold",
    [
        ((1500, 2000), 1024, 256, 0.0),
        ((2000, 1500), 1024, 256, 0.0),
        ((480, 640), 1024, 256, 0.0),
        ((37, 301), 256, 64, 0.0),
        ((640, 480), 384, 96, 1.5),
        ((300, 300), 1024, 256, -0.5),
        ((5, 3), 1024, 256, 0.0),
        ((2, 1), 1024, 256, 0.0),  # 2 cells per pixel: the pass's general column loop
        ((1, 1), 1024, 256, 0.0),
    ],  # fmt: skip
)
def test_runs_are_the_same_bits_as_the_maps_sums_made_by_torch(
    original_size, padded, low, threshold
):
    """Every pixel as torch's weighted sums make it: smooth masks, noise masks (runs in
    nearly every column), masks that fill the frame or touch its edges, and no mask."""
    scale = padded / max(original_size)
    input_size = tuple(int(s * scale + 0.5) for s in original_size)
    generator = torch.Generator().manual_seed(sum(original_size))
    edges = torch.full((4, low, low), -3.0)
    edges[0] = 3.0  # every pixel set
    edges[1, :, :2] = 3.0  # the left edge, down the whole height
    edges[2, -8:, -8:] = 3.0  # the bottom right corner of the padded frame
    edges[3, :2, :] = 3.0  # the top edge
    logits = torch.cat(
        [blobs(low, 4, seed=3), torch.randn(3, low, low, generator=generator), edges]
    )
    masks = upscale_masks(logits, input_size, original_size, padded, threshold)
    expected = weighted_sums(logits, input_size, original_size, padded, threshold)
    for runs, mask in zip(masks, expected, strict=True):
        coco = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        assert runs.rle() == coco
        assert runs.area == mask.sum()
        assert runs.bbox == [int(v) for v in mask_utils.toBbox(coco)]


def test_the_pass_compiles_where_numba_cannot_cache_it():
    """numba refuses to cache a function whose source file has no writable cache
    directory (here: source with no file at all); such a function is compiled without a
    cache, not left failing at import."""
    from samserve.upscale import compiled

    namespace: dict = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)
    assert compiled(namespace["twice"])(21) == 42
