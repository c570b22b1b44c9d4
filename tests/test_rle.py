"""samserve.rle: pycocotools' own C compressor without the GIL, byte for byte its encode."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import coco_rle, column_runs
from samserve import rle
from samserve.rle import rle_of_counts


def test_this_pycocotools_is_called_without_the_gil():
    # The fast path is the point of the module: a pycocotools that hides its C symbols
    # would still give right answers (the fallback), but this test says it went slow.
    assert rle._COCO_API is not None


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (64, 65), (301, 37)])
def test_counts_compress_as_pycocotools_encodes_the_mask(monkeypatch, shape, density, fast):
    """Runs (as ``samserve.upscale`` makes them) give the bytes pycocotools gives the
    pixels, through its C function or, where that is not found, through its Python API."""
    if not fast:
        monkeypatch.setattr(rle, "_COCO_API", None)
    rng = np.random.default_rng(shape[0] * 100 + int(density * 10))
    for trial in range(5):
        mask = rng.random(shape) < density
        if trial == 1:
            mask[:, shape[1] // 2 :] = True  # runs across column ends
        if trial == 2:
            mask[-1, -1] = True  # the last pixel
        got = rle_of_counts(column_runs(mask), shape)
        assert got == coco_rle(mask)
        assert type(got["size"][0]) is int and isinstance(got["counts"], bytes)


def test_masks_compressed_in_threads_are_each_their_own():
    rng = np.random.default_rng(2)
    masks = [rng.random((300, 400)) < p for p in np.linspace(0.05, 0.95, 16)]
    expected = [coco_rle(m) for m in masks]
    with ThreadPoolExecutor(4) as pool:
        runs = [column_runs(m) for m in masks]
        assert list(pool.map(rle_of_counts, runs, [m.shape for m in masks])) == expected


def test_another_thread_runs_while_counts_are_compressed():
    # A thread woken as the call starts gets the GIL at once while the compressor runs;
    # with the GIL held, it would run only once the call is over.
    # Contiguous uint32 counts already, so no copy: only the compressor's call itself.
    counts = np.random.default_rng(3).integers(1, 4, 8_000_000, dtype=np.uint32)
    size = (int(counts.sum()), 1)  # one column: any counts are a mask's
    go = threading.Event()
    woke: list[float] = []
    other = threading.Thread(target=lambda: (go.wait(), woke.append(time.perf_counter())))
    other.start()
    started = time.perf_counter()
    go.set()
    rle_of_counts(counts, size)
    ended = time.perf_counter()
    other.join()
    assert woke[0] - started < 0.5 * (ended - started), (woke[0] - started, ended - started)
