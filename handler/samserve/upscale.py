"""Low-res mask logits to full-size masks, computed only where a mask pixel can be set.

``Sam.postprocess_masks`` upsamples low-res logits bilinearly to the padded input square,
crops the unpadded input and upsamples bilinearly again to the original size; SAM then
thresholds at ``mask_threshold``. Both steps are separable linear maps whose weights are
non-negative and sum to one, so every output pixel is a convex combination of a few
low-res cells: where all of them are <= the threshold, so is the pixel. This module
composes the two steps into one small map per axis (built by running ``F.interpolate``
itself on an identity in float64, so the sampling rules are PyTorch's) and evaluates it
only on the rows and columns that some cell above the threshold reaches. The result
equals thresholding ``postprocess_masks`` except at pixels within float rounding of the
threshold (PyTorch's float32 interpolation rounds its sample positions, which moves
values by up to ~1e-4 on logits of a few units; the composed maps, built in float64, are
closer to exact), at a cost that scales with the mask's extent instead of the image's
size.

A mask never exists as pixels: one compiled pass (numba) makes its values a column at a
time and keeps only where they cross the threshold, as COCO RLE's run lengths, which
pycocotools compresses at once (``MaskRuns``). Found in the pixels instead, the runs
cost more than making the values.
"""

from __future__ import annotations

import functools
import math
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

from .masks import Mapper, MaskRuns


@dataclass(frozen=True)
class AxisMap:
    """One axis of SAM's two-step upsampling, from ``low`` cells to ``length`` pixels.

    ``index`` and ``weight`` are ``length x K``: pixel ``i`` is the sum over ``k`` of
    ``weight[i, k] * cell[index[i, k]]``, summed in order of ``k`` (weight 0 pads rows
    with fewer cells); int64 and float32. ``first`` and ``last`` (``length``,
    non-decreasing) are the lowest and highest cells with a non-zero weight for each pixel.
    """

    index: np.ndarray
    weight: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def pixels_reached(self, low_cell: int, high_cell: int) -> tuple[int, int]:
        """The half-open pixel range [start, stop) whose cells meet [low_cell, high_cell]."""
        start = int(np.searchsorted(self.last, low_cell, side="left"))
        stop = int(np.searchsorted(self.first, high_cell, side="right"))
        return start, max(start, stop)


@functools.lru_cache(maxsize=64)
def axis_map(low: int, padded: int, cropped: int, length: int) -> AxisMap:
    """The composed map ``low`` -> ``padded`` (bilinear), crop ``cropped``, -> ``length``."""
    eye = torch.eye(low, dtype=torch.float64)[None]  # 1 x low channels x low samples
    up = F.interpolate(eye, size=padded, mode="linear", align_corners=False)[..., :cropped]
    up = F.interpolate(up, size=length, mode="linear", align_corners=False)[0].T  # length x low
    nonzero = up > 0
    first = nonzero.int().argmax(dim=1)
    last = low - 1 - nonzero.flip(1).int().argmax(dim=1)
    width = int((last - first).max()) + 1
    index = first[:, None] + torch.arange(width)
    valid = index <= last[:, None]
    index = index.clamp(max=low - 1)
    weight = torch.where(valid, up.gather(1, index), 0.0).float()
    return AxisMap(index.numpy(), weight.numpy(), first.numpy(), last.numpy())


def upscale_masks(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    padded_size: int,
    threshold: float = 0.0,
    map_fn: Mapper = map,
    rle: bool = True,
) -> list[MaskRuns]:
    """Threshold ``Sam.postprocess_masks(low_res) > threshold`` without the full-size pass.

    The pass and pycocotools' compression run without the GIL, so a thread pool's
    ``map_fn`` makes many masks side by side (``samserve.service``).

    Arguments:
      low_res (torch.Tensor): Cxhxw logits in the padded input frame (h = w = 4 x the
        embedding side), one prompt's or several prompts' masks.
      input_size (tuple(int, int)): (H', W') of the resized image inside the padded
        square, before padding.
      original_size (tuple(int, int)): (H, W) of the image as decoded.
      padded_size (int): the side of the model's square input (``img_size``).
      threshold (float): SAM's ``mask_threshold``.
      map_fn (Mapper): ``map``, or a thread pool's; makes one mask per item.
      rle (bool): make each mask's COCO RLE as soon as its runs are found (while they
        are in cache); else box and area only.

    Returns:
      (list(MaskRuns)): C masks of HxW in the original frame, in the order of
        ``low_res``.
    """
    low_res = low_res.float().cpu().numpy()
    rows = axis_map(low_res.shape[-2], padded_size, input_size[0], original_size[0])
    cols = axis_map(low_res.shape[-1], padded_size, input_size[1], original_size[1])
    return list(
        map_fn(
            lambda logits: _upscale_one(logits, rows, cols, original_size, threshold, rle),
            low_res,
        )
    )


def compile_mask_pass() -> None:
    """Compile the mask pass now (or load it from numba's cache beside this module), so
    that the first request does not wait for the compiler."""
    upscale_masks(torch.ones(1, 4, 4), (4, 4), (4, 4), 4)


def _upscale_one(
    logits: np.ndarray,
    rows: AxisMap,
    cols: AxisMap,
    original_size: tuple[int, int],
    threshold: float,
    rle: bool,
) -> MaskRuns:
    """One hxw logits map to its HxW mask's runs (see ``upscale_masks``)."""
    above = logits > threshold
    hit_rows = np.flatnonzero(above.any(axis=1))
    hit_cols = np.flatnonzero(above.any(axis=0))
    if len(hit_rows) == 0:
        return MaskRuns.empty(original_size, rle)
    top, bottom = rows.pixels_reached(int(hit_rows[0]), int(hit_rows[-1]))
    left, right = cols.pixels_reached(int(hit_cols[0]), int(hit_cols[-1]))
    if top == bottom or left == right:
        return MaskRuns.empty(original_size, rle)
    runs = _buffer("runs", ((bottom - top + 2) * (right - left) + 2,), np.uint32)
    lines = _buffer("lines", (logits.shape[1], bottom - top), np.float32)
    count, box, area = _mask_runs(
        np.ascontiguousarray(logits),
        (rows.index, rows.weight),
        (cols.index, cols.weight),
        (top, bottom, left, right),
        (original_size[0], original_size[1]),
        np.float32(threshold),
        (runs, lines),
    )
    return MaskRuns.of_runs(runs[:count], original_size, box.tolist(), int(area), rle)


_buffers = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """This thread's C-contiguous ``shape`` array ``name`` (uninitialised), kept for its
    next mask: the pass's row sums (``lines``) and a mask's runs (``runs``), which go
    from there straight into their RLE, are written and read in memory still in cache,
    where a fresh array per mask would be new memory each time. Pages are touched only
    as far as a mask reaches."""
    size = math.prod(shape)
    buffer = getattr(_buffers, name, None)
    if buffer is None or buffer.size < size:
        # A mapping of its own, so that only the pages a mask reaches become resident: a
        # heap block brings the pages that freed tensors left resident (the runs' buffer
        # is sized for the worst case, about one count per pixel of the mask's window).
        memory = mmap.mmap(-1, size * np.dtype(dtype).itemsize)
        buffer = np.frombuffer(memory, dtype=dtype)
        setattr(_buffers, name, buffer)
    return buffer[:size].reshape(shape)


# Multiplied by a 64-bit word of 0/1 bytes, this puts byte k's bit at bit 56 + k (the
# products of the other pairs land on distinct lower bits or past bit 63).
_GATHER_BYTES = np.uint64(0x0102040810204080)


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled by numba to run without the GIL, its machine code cached
    beside its module (or in ``NUMBA_CACHE_DIR``); where no such directory can be written
    (numba refuses to cache then), compiled anew in each process."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(function)


@compiled
def _mask_runs(
    logits: np.ndarray,
    row_map: tuple[np.ndarray, np.ndarray],
    col_map: tuple[np.ndarray, np.ndarray],
    window: tuple[int, int, int, int],
    size: tuple[int, int],
    threshold: np.float32,
    buffers: tuple[np.ndarray, np.ndarray],
) -> tuple[int, np.ndarray, int]:
    """The HxW mask ``values > threshold``, whose values are the axis maps' weighted sums
    of hxw ``logits`` inside its window, 0 outside: its COCO RLE counts (column-major runs
    from a run of 0s), its box ([x, y, w, h] of the set pixels, 0s if none) and area.

    Arguments:
      logits (np.ndarray): hxw float32 low-res logits.
      row_map, col_map (tuple(np.ndarray, np.ndarray)): each axis map's ``index`` and
        ``weight`` (``AxisMap``).
      window (tuple(int, int, int, int)): rows [top, bottom) and columns [left, right)
        of the HxW mask that some cell above the threshold reaches.
      size (tuple(int, int)): (H, W).
      threshold (np.float32): SAM's ``mask_threshold``.
      buffers (tuple(np.ndarray, np.ndarray)): uint32 ``counts``, at least
        ``(bottom - top + 2) * (right - left) + 2`` long, where the counts are written,
        and float32 ``lines``, w x (bottom - top) for w logits columns, for the row sums.

    Returns:
      (int): how many counts were written.
      (np.ndarray): the box, int64.
      (int): the area (pixels set).

    Rows first: each window row's h-long sums over the row map, stored transposed (one
    h-cell line per logits column); then per pixel column its values over the column
    map, compared at once. Every sum is the float32 products added in map order, as
    ``F.embedding_bag`` adds them: the same bits as upsampling with it. A column's
    threshold bits are packed 64 rows to a word; where they change is ``word ^ (word <<
    1 | carry)``, and each change is found by its trailing zeros, so the pass costs
    about one step per 8 pixels plus one per run (with no branch on each 8 pixels).
    """
    row_index, row_weight = row_map
    col_index, col_weight = col_map
    top, bottom, left, right = window
    height, width = size
    counts, lines = buffers
    rows = bottom - top
    low_cols = logits.shape[1]
    row_taps = row_index.shape[1]
    col_taps = col_index.shape[1]
    line = np.empty(low_cols, dtype=np.float32)
    for i in range(rows):
        line[:] = 0.0
        for k in range(row_taps):
            weight = row_weight[top + i, k]
            source = row_index[top + i, k]
            for b in range(low_cols):
                line[b] += weight * logits[source, b]
        for b in range(low_cols):
            lines[b, i] = line[b]

    one = np.uint64(1)
    words = (rows + 63) // 64
    bits = np.zeros(64 * words, dtype=np.uint8)  # one column's bits, a byte each
    octets = bits.view(np.uint64)
    packed = np.zeros(words, dtype=np.uint64)
    values = np.empty(rows, dtype=np.float32)
    last_rows = rows - 64 * (words - 1)  # rows in the last word
    last_word = ~np.uint64(0) if last_rows == 64 else (one << np.uint64(last_rows)) - one
    x0, y0, x1, y1 = width, height, -1, -1  # the set pixels' extremes
    runs = 0
    last = 0  # where the current run began
    value = np.uint64(0)  # the current run's value
    for j in range(left, right):
        column = j * height
        if top > 0 and value == one:  # rows above the window are 0
            counts[runs] = column - last
            runs += 1
            last, value = column, np.uint64(0)
        if col_taps == 3:  # bilinear upsampling's usual width: sum and compare in one pass
            w0, w1, w2 = col_weight[j, 0], col_weight[j, 1], col_weight[j, 2]
            a, b, c = lines[col_index[j, 0]], lines[col_index[j, 1]], lines[col_index[j, 2]]
            for i in range(rows):
                bits[i] = (w0 * a[i] + w1 * b[i]) + w2 * c[i] > threshold
        else:
            values[:] = 0.0
            for t in range(col_taps):
                weight = col_weight[j, t]
                source = lines[col_index[j, t]]
                for i in range(rows):
                    values[i] += weight * source[i]
            for i in range(rows):
                bits[i] = values[i] > threshold
        for w in range(words):
            word = np.uint64(0)
            for k in range(8):
                word |= ((octets[8 * w + k] * _GATHER_BYTES) >> np.uint64(56)) << np.uint64(8 * k)
            packed[w] = word
        start = column + top
        carry = value  # the pixel before the window's first, in column-major order
        first_set, last_set = -1, -1  # window rows
        for w in range(words):
            word = packed[w]
            if word:
                if first_set < 0:
                    first_set = 64 * w + np.int64(trailing_zeros(word))
                last_set = 64 * w + 63 - np.int64(leading_zeros(word))
            change = word ^ ((word << one) | carry)
            carry = word >> np.uint64(63)
            if w == words - 1:
                change &= last_word
            at = start + 64 * w
            while change:
                position = at + np.int64(trailing_zeros(change))
                counts[runs] = position - last
                runs += 1
                last = position
                change &= change - one
        value = (packed[words - 1] >> np.uint64(last_rows - 1)) & one
        if first_set >= 0:
            x0, x1 = min(x0, j), j
            y0, y1 = min(y0, top + first_set), max(y1, top + last_set)
        if bottom < height and value == one:  # rows below the window are 0
            counts[runs] = column + bottom - last
            runs += 1
            last, value = column + bottom, np.uint64(0)
    if value == one and right < width:  # columns right of the window are 0
        counts[runs] = right * height - last
        runs += 1
        last = right * height
    counts[runs] = height * width - last
    area = 0
    for k in range(1, runs + 1, 2):
        area += np.int64(counts[k])
    box = np.zeros(4, dtype=np.int64)
    if x1 >= 0:
        box[0], box[1], box[2], box[3] = x0, y0, x1 - x0 + 1, y1 - y0 + 1
    return runs + 1, box, area
