"""samserve.device_masks: masks made on the logits' device give upscale_masks' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samserve.device_masks import upscale_masks_on_device, window_runs
from samserve.masks import MaskRuns
from samserve.upscale import upscale_masks
from test_upscale import blobs

# (original size, padded input side, low-res side, input size inside the padded square)
FRAMES = [
    ((1500, 2000), 1024, 256, (768, 1024)),
    ((480, 640), 1024, 256, (768, 1024)),
    ((37, 301), 256, 64, (31, 256)),
    ((640, 480), 384, 96, (384, 288)),
    ((256, 256), 256, 64, (256, 256)),
    ((5, 3), 1024, 256, (1024, 614)),
]


def _logits(low: int, seed: int) -> torch.Tensor:
    """Bumps, plus a mask with no pixel and one with every pixel set."""
    logits = blobs(low, 8, seed)
    logits[0], logits[1] = -5.0, 5.0
    return logits


@pytest.mark.parametrize("original_size, padded, low, input_size", FRAMES)
@pytest.mark.parametrize("rle", [True, False])
def test_the_same_masks_as_upscale_masks_bit_for_bit(original_size, padded, low, input_size, rle):
    for seed in range(3):
        logits = _logits(low, seed)
        expected = upscale_masks(logits, input_size, original_size, padded, rle=rle)
        got = upscale_masks_on_device(logits, (input_size, original_size, padded), rle=rle)
        assert got == expected  # runs (compressed), box and area


def test_window_runs_of_whole_columns_join_across_columns():
    bits = np.ones((3, 4), dtype=bool)  # three whole columns of a 4-row image
    runs = window_runs(bits, (0, 4, 1, 4), (4, 5))
    assert runs == MaskRuns.of_runs(np.array([4, 12, 4], np.uint32), (4, 5), [1, 0, 3, 4], 12)


def test_nothing_set_is_the_empty_mask():
    bits = np.zeros((2, 3), dtype=bool)
    assert window_runs(bits, (1, 4, 2, 4), (6, 6)) == MaskRuns.empty((6, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("original_size, padded, low, input_size", FRAMES[:3])
def test_cuda_masks_are_upscale_masks_bit_for_bit(original_size, padded, low, input_size):
    logits = _logits(low, 0)
    expected = upscale_masks(logits, input_size, original_size, padded)
    frame = (input_size, original_size, padded)
    assert upscale_masks_on_device(logits.cuda(), frame) == expected
