"""Full-size masks made on the model's device, encoded on the CPU from packed bits.

``samserve.upscale`` makes each mask on the CPU from its low-res logits, which a GPU
must first hand over; here the same window of each mask (``AxisMap.pixels_reached``) is
upsampled and thresholded where the logits are, by torch ops with ``upscale``'s sums in
the same order (the same float32 bits), and only its pixels' bits, eight to a byte,
cross to the CPU, which finds the COCO runs in them. ``upscale_masks_on_device`` gives
the same ``MaskRuns`` as ``upscale_masks`` (tested bit for bit); the engine uses it on
CUDA only, where it spares the CPU the pass.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .masks import Mapper, MaskRuns
from .upscale import AxisMap, axis_map

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' order: first bit highest


@functools.lru_cache(maxsize=64)
def _device_map(
    sizes: tuple[int, int, int, int], device: torch.device
) -> tuple[AxisMap, torch.Tensor, torch.Tensor]:
    """``axis_map(*sizes)``, and its ``index`` and ``weight`` on ``device`` (kept for
    later masks)."""
    axis = axis_map(*sizes)
    return axis, torch.from_numpy(axis.index).to(device), torch.from_numpy(axis.weight).to(device)


def _weighted_sum(source: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_k weight[i, k] * source[index[i, k]]`` over dim 0 of ``source``, its float32
    products added in order of ``k`` from the first, as ``upscale._mask_runs`` adds them."""
    shape = (-1,) + (1,) * (source.dim() - 1)
    total = weight[:, 0].reshape(shape) * source[index[:, 0]]
    for k in range(1, index.shape[1]):
        total = total + weight[:, k].reshape(shape) * source[index[:, k]]
    return total


def _window_bits(
    logits: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor],
    cols: tuple[torch.Tensor, torch.Tensor],
    window: tuple[int, int, int, int],
    threshold: float,
) -> torch.Tensor:
    """One mask's window, thresholded, as packed bits in column-major order.

    Arguments:
      logits (torch.Tensor): hxw float32 low-res logits, on the device.
      rows, cols (tuple(torch.Tensor, torch.Tensor)): each axis map's ``index`` and
        ``weight`` on the device.
      window (tuple(int, int, int, int)): rows [top, bottom) and columns [left, right).
      threshold (float): SAM's ``mask_threshold``.

    Returns:
      (torch.Tensor): uint8, ceil((bottom - top) x (right - left) / 8) bytes: the window's
        pixels column by column, eight to a byte, first pixel in the highest bit.
    """
    top, bottom, left, right = window
    # Rows first (each window row's sums over the row map), then columns, as upscale.
    lines = _weighted_sum(logits, rows[0][top:bottom], rows[1][top:bottom])  # R x w
    values = _weighted_sum(lines.T, cols[0][left:right], cols[1][left:right])  # C x R
    bits = (values > threshold).flatten()
    padding = (-len(bits)) % 8
    if padding:
        bits = torch.cat([bits, bits.new_zeros(padding)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def window_runs(
    bits: np.ndarray,
    window: tuple[int, int, int, int],
    size: tuple[int, int],
    rle: bool = True,
) -> MaskRuns:
    """The HxW mask that is ``bits`` inside ``window`` and 0 outside, as ``MaskRuns``.

    Arguments:
      bits (np.ndarray): (right - left) x (bottom - top) bool, the window column by column.
      window (tuple(int, int, int, int)): rows [top, bottom) and columns [left, right).
      size (tuple(int, int)): (H, W).
      rle (bool): make the mask's COCO RLE; else its box and area only.

    Returns:
      (MaskRuns): the mask, with ``upscale_masks``' runs, box and area.
    """
    top, _, left, _ = window
    height, width = size
    columns, rows = bits.shape
    area = int(bits.sum())
    if area == 0:
        return MaskRuns.of_runs(np.array([height * width], np.uint32), size, [0] * 4, 0, rle)
    # Each window column between a 0 above and a 0 below: every run starts and ends in it.
    padded = np.zeros((columns, rows + 2), dtype=np.int8)
    padded[:, 1:-1] = bits
    column, row = np.nonzero(np.diff(padded, axis=1))
    changes = (left + column).astype(np.int64) * height + top + row
    # A run that ends at a column's last row and goes on at the next column's first (a
    # window of whole columns) changes nowhere: both its ends fall on the same pixel.
    position, count = np.unique(changes, return_counts=True)
    changes = position[(count % 2 == 1) & (position < height * width)]  # the end is no change
    runs = np.diff(changes, prepend=0, append=height * width).astype(np.uint32)
    set_columns = np.flatnonzero(bits.any(axis=1))
    set_rows = np.flatnonzero(bits.any(axis=0))
    x0, y0 = left + int(set_columns[0]), top + int(set_rows[0])
    box = [x0, y0, left + int(set_columns[-1]) - x0 + 1, top + int(set_rows[-1]) - y0 + 1]
    return MaskRuns.of_runs(runs, size, box, area, rle)


Frame = tuple[tuple[int, int], tuple[int, int], int]
"""A mask's frames: (H', W') of the resized image inside the padded square, (H, W) of the
image as decoded, and the side of the model's square input (``img_size``)."""


def upscale_masks_on_device(
    low_res: torch.Tensor, frame: Frame, threshold: float = 0.0, map_fn: Mapper = map,
    rle: bool = True,
) -> list[MaskRuns]:  # fmt: skip
    """``upscale_masks`` with each mask made where ``low_res`` is (see the module
    docstring): the same masks.

    Arguments:
      low_res (torch.Tensor): Cxhxw logits in the padded input frame, on any device.
      frame (Frame): the input size, original size and padded size, as ``upscale_masks``
        takes them one by one.
      threshold (float): SAM's ``mask_threshold``.
      map_fn (Mapper): ``map``, or a thread pool's; finds one mask's runs per item.
      rle (bool): make each mask's COCO RLE; else box and area only.

    Returns:
      (list(MaskRuns)): C masks of HxW in the original frame, in the order of ``low_res``.
    """
    input_size, original_size, padded_size = frame
    low_res = low_res.float()
    device = low_res.device
    row_map, *rows = _device_map(
        (low_res.shape[-2], padded_size, input_size[0], original_size[0]), device
    )
    col_map, *cols = _device_map(
        (low_res.shape[-1], padded_size, input_size[1], original_size[1]), device
    )
    above = low_res > threshold
    # Which low-res rows and columns each mask has above the threshold: one small copy.
    hit_rows, hit_cols = above.any(dim=2).cpu().numpy(), above.any(dim=1).cpu().numpy()
    windows: list[tuple[int, int, int, int] | None] = []
    for mask_rows, mask_cols in zip(hit_rows, hit_cols):
        window = None
        if mask_rows.any():
            low_rows, low_cols = np.flatnonzero(mask_rows), np.flatnonzero(mask_cols)
            top, bottom = row_map.pixels_reached(int(low_rows[0]), int(low_rows[-1]))
            left, right = col_map.pixels_reached(int(low_cols[0]), int(low_cols[-1]))
            if top < bottom and left < right:
                window = (top, bottom, left, right)
        windows.append(window)
    packed = [
        _window_bits(logits, tuple(rows), tuple(cols), window, threshold)
        for logits, window in zip(low_res, windows)
        if window is not None
    ]
    # All the masks' bits cross to the CPU in one copy.
    every = torch.cat(packed).cpu().numpy() if packed else np.zeros(0, np.uint8)
    parts, start = [], 0
    for window in windows:
        if window is None:
            parts.append(None)
            continue
        top, bottom, left, right = window
        pixels = (bottom - top) * (right - left)
        stop = start + (pixels + 7) // 8
        parts.append((every[start:stop], window, pixels))
        start = stop

    def encode(part: tuple[np.ndarray, tuple[int, int, int, int], int] | None) -> MaskRuns:
        if part is None:
            return MaskRuns.empty(original_size, rle)
        data, (top, bottom, left, right), pixels = part
        bits = np.unpackbits(data, count=pixels).view(bool).reshape(right - left, bottom - top)
        return window_runs(bits, (top, bottom, left, right), original_size, rle)

    return list(map_fn(encode, parts))
