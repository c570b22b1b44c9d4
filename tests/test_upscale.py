"""samserve.upscale against SAM's own postprocess_masks on the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samserve import upscale
from samserve.upscale import axis_map, tokens_read, upscale_masks


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
    windows = upscale_masks(logits, input_size, original_size, padded)
    expected, values = reference(logits, input_size, original_size, padded)
    for window, mask, value in zip(windows, expected, values, strict=True):
        got = window.dense()
        assert got.shape == original_size
        differ = got != mask
        # Only float rounding may differ: pixels whose logit is within a hair of 0.
        assert np.all(np.abs(value[differ]) < 1e-4), value[differ]
        assert differ.mean() <= 1e-5
        # Column-major, the order COCO RLE reads: no transposing copy before pycocotools.
        assert window.window.flags.f_contiguous


def test_all_negative_logits_give_empty_masks_without_work():
    windows = upscale_masks(torch.full((3, 64, 64), -1.0), (200, 256), (300, 384), 256)
    for window in windows:
        assert window.window.size == 0
        assert not window.dense().any() and window.dense().shape == (300, 384)


def test_positive_cells_in_the_padding_do_not_make_pixels():
    logits = torch.full((1, 64, 64), -5.0)
    logits[0, 60:, :] = 5.0  # rows that only cover the padding below a wide image
    (window,) = upscale_masks(logits, (128, 256), (300, 600), 256)
    expected, _ = reference(logits, (128, 256), (300, 600), 256)
    np.testing.assert_array_equal(window.dense(), expected[0])
    assert not expected.any()


def test_axis_map_weights_are_convex_and_ordered():
    axis = axis_map(256, 1024, 768, 1500)
    weight = axis.weight.double()
    assert torch.all(weight >= 0)
    np.testing.assert_allclose(weight.sum(dim=1).numpy(), 1.0, atol=1e-6)
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
        assert (a.top, a.left, a.size) == (b.top, b.left, b.size)
        np.testing.assert_array_equal(a.window, b.window)


@pytest.mark.parametrize("step_values", [1, 1500 * 7, 1500 * 333, 1 << 30])
def test_column_steps_of_any_size_give_the_same_bits(monkeypatch, step_values):
    """One column per step, steps that leave a remainder, and the whole window at once."""
    logits = torch.cat([blobs(256, 4, seed=9), torch.randn(2, 256, 256)])  # and noise masks
    whole = upscale_masks(logits, (768, 1024), (1500, 2000), 1024)
    monkeypatch.setattr(upscale, "COLUMN_STEP_VALUES", step_values)
    stepped = upscale_masks(logits, (768, 1024), (1500, 2000), 1024)
    for a, b in zip(whole, stepped, strict=True):
        assert (a.top, a.left, a.size) == (b.top, b.left, b.size)
        np.testing.assert_array_equal(a.window, b.window)
        assert b.window.flags.f_contiguous


@pytest.mark.parametrize(
    "input_size, original_size",
    [
        ((768, 1024), (1500, 2000)),
        ((1024, 576), (1920, 1080)),
        ((1024, 1024), (600, 600)),
        ((341, 1024), (100, 300)),
    ],
)
def test_tokens_read_are_the_cells_with_weight(input_size, original_size):
    """The tokens beyond ``tokens_read`` hold only cells of weight 0 in every pixel, and
    the last token read holds a cell of some weight: no tighter bound is right."""
    read = tokens_read((64, 64), input_size, original_size, 1024)
    for axis, cropped, length in zip(read, input_size, original_size):
        weights = torch.zeros(256, dtype=torch.float64)
        amap = axis_map(256, 1024, cropped, length)
        weights.index_add_(0, amap.index.flatten(), amap.weight.flatten().double())
        assert not weights[4 * axis :].any()
        assert weights[4 * (axis - 1) : 4 * axis].any()
