"""COCO RLE's compressed counts by pycocotools' own C function, called without the GIL.

Masks made as run lengths (``samserve.upscale``) need only their counts compressed:
``rleToString`` of the COCO API's ``maskApi.c``, which pycocotools' extension module
exports. Its Python API holds the GIL while it runs C code, so masks compressed in
several threads would take turns; called through ``ctypes`` (which releases the GIL for
the call), the same function gives the same bytes, and masks are compressed side by
side. Where the symbol is not found (an unusual build of pycocotools), ``rle_of_counts``
calls ``pycocotools.mask`` itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import numpy as np
from pycocotools import _mask as coco_c
from pycocotools import mask as mask_utils


class _Rle(ctypes.Structure):
    """``RLE`` of maskApi.h: ``siz h, w, m; uint *cnts``."""

    _fields_ = [
        ("h", ctypes.c_size_t),
        ("w", ctypes.c_size_t),
        ("m", ctypes.c_size_t),
        ("cnts", ctypes.POINTER(ctypes.c_uint)),
    ]


def _load_coco_api() -> tuple[Any, Any] | None:
    """(pycocotools' extension as a ctypes library, libc's ``free``), or None."""
    try:
        api = ctypes.CDLL(coco_c.__file__)
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        api.rleToString.argtypes = [ctypes.POINTER(_Rle)]
        api.rleToString.restype = ctypes.c_void_p  # malloc'd char *: freed below
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free.restype = None
        return api, libc.free
    except (OSError, AttributeError, TypeError):
        return None


_COCO_API = _load_coco_api()


def rle_of_counts(counts: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """COCO RLE, as ``pycocotools.mask.encode`` returns it, of a mask given by its runs.

    Arguments:
      counts (np.ndarray): the mask's uncompressed COCO counts, uint32: the lengths of
        alternate runs of 0s and 1s over its pixels in column-major order, from a run of
        0s (maybe empty).
      size (tuple(int, int)): the mask's (H, W).

    Returns:
      (dict): ``{"size": [H, W], "counts": bytes}``, the counts compressed as pycocotools
        writes them.
    """
    height, width = size
    if _COCO_API is None:
        return mask_utils.frPyObjects(
            {"size": [height, width], "counts": counts.tolist()}, height, width
        )
    counts = np.ascontiguousarray(counts, dtype=np.uint32)  # alive until the call returns
    return {"size": [height, width], "counts": _compressed(_borrowed(counts, size))}


def _borrowed(counts: np.ndarray, size: tuple[int, int]) -> _Rle:
    """An ``RLE`` struct over contiguous uint32 ``counts``, which the caller keeps alive
    while it is used (neither copied nor freed here)."""
    cnts = counts.ctypes.data_as(ctypes.POINTER(ctypes.c_uint))
    return _Rle(size[0], size[1], len(counts), cnts)


def _compressed(rle: _Rle) -> bytes:
    """``rleToString`` of one RLE: COCO's compressed counts."""
    api, free = _COCO_API
    text = api.rleToString(ctypes.byref(rle))
    try:
        return ctypes.string_at(text)
    finally:
        free(text)
