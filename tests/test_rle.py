"""samserve.rle: pycocotools' own C encoder without the GIL, byte for byte its encode."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import column_runs
from samserve import rle
from samserve.rle import encode_rle, releases_gil, rle_of_counts


def coco_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_this_pycocotools_is_called_without_the_gil():
    # The fast path is the point of the module: a pycocotools that hides its C symbols
    # would still give right answers (the fallback), but this test says it went slow.
    assert releases_gil()


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (64, 65), (301, 37)])
def test_same_bytes_as_pycocotools(shape, density):
    rng = np.random.default_rng(shape[0] * 100 + int(density * 10))
    for trial in range(5):
        mask = rng.random(shape) < density
        if trial == 1:
            mask[:, shape[1] // 2 :] = True  # runs across column ends
        if trial == 2:
            mask[-1, -1] = True  # the last pixel
        expected = coco_rle(mask)
        for layout in (mask, np.asfortranarray(mask), mask.astype(np.uint8)):
            got = encode_rle(layout)
            assert got == expected
            assert type(got["size"][0]) is int and isinstance(got["counts"], bytes)


@pytest.mark.parametrize("fast", [True, False])
def test_counts_compress_as_pycocotools_encodes_the_mask(monkeypatch, fast):
    """Runs (as ``samserve.upscale`` makes them) give the bytes pycocotools gives the
    pixels, through its C function or, where that is not found, through its Python API."""
    if not fast:
        monkeypatch.setattr(rle, "_COCO_API", None)
    rng = np.random.default_rng(3)
    for shape, density in (((7, 3), 0.5), ((64, 65), 0.02), ((30, 41), 1.0), ((5, 9), 0.0)):
        mask = rng.random(shape) < density
        assert rle_of_counts(column_runs(mask), shape) == coco_rle(mask)


def test_a_transposed_view_is_encoded_as_the_mask_it_shows():
    mask = np.random.default_rng(1).random((40, 90)) < 0.3
    assert encode_rle(mask.T) == coco_rle(mask.T)
    assert encode_rle(mask[::2, 5:]) == coco_rle(mask[::2, 5:])


def test_masks_encoded_in_threads_are_each_their_own():
    rng = np.random.default_rng(2)
    masks = [rng.random((500, 700)) < p for p in np.linspace(0.05, 0.95, 16)]
    expected = [coco_rle(m) for m in masks]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(encode_rle, masks)) == expected


def test_another_thread_runs_while_a_mask_is_encoded():
    # A thread woken as the call starts gets the GIL at once while the encoder runs; with
    # the GIL held, it would run only once the call is over.
    # Column-major already, so no copy (numpy releases the GIL while copying): only the
    # encoder's call itself, about 0.1 s.
    mask = np.asfortranarray(np.random.default_rng(3).random((4000, 4000)) < 0.5)
    go = threading.Event()
    woke: list[float] = []
    other = threading.Thread(target=lambda: (go.wait(), woke.append(time.perf_counter())))
    other.start()
    started = time.perf_counter()
    go.set()
    encode_rle(mask)
    ended = time.perf_counter()
    other.join()
    assert woke[0] - started < 0.5 * (ended - started), (woke[0] - started, ended - started)
