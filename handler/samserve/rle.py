"""COCO RLE by pycocotools' own C functions, called without the GIL.

``pycocotools.mask.encode`` runs its C encoder (``rleEncode`` and ``rleToString`` of the
COCO API's ``maskApi.c``) while holding the GIL, so masks encoded in several threads take
turns, and one click's three masks use one core of many. The same two functions are
exported by pycocotools' extension
module; called through ``ctypes`` (which releases the GIL for the call) they give the
same bytes, and masks can be encoded side by side. Masks made as run lengths
(``samserve.upscale``) go to ``rleToString`` the same way. Where the
symbols are not found (an unusual build of pycocotools), the functions here call
``pycocotools.mask`` itself.
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
        rle_p, size = ctypes.POINTER(_Rle), ctypes.c_size_t
        api.rleEncode.argtypes = [rle_p, ctypes.c_void_p, size, size, size]  # R, M, h, w, n
        api.rleEncode.restype = None
        api.rleToString.argtypes = [rle_p]
        api.rleToString.restype = ctypes.c_void_p  # malloc'd char *: freed below
        api.rleFree.argtypes = [rle_p]
        api.rleFree.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free.restype = None
        return api, libc.free
    except (OSError, AttributeError, TypeError):
        return None


_COCO_API = _load_coco_api()


def releases_gil() -> bool:
    """Whether ``encode_rle`` runs pycocotools' encoder without holding the GIL."""
    return _COCO_API is not None


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """``pycocotools.mask.encode`` of one HxW bool (or 0/1 uint8) mask, in any memory
    order: ``{"size": [H, W], "counts": bytes}``, compressed counts as pycocotools
    writes them. Column-major (Fortran-order) masks are read without a copy."""
    pixels = np.asfortranarray(mask).view(np.uint8)
    if _COCO_API is None:
        return mask_utils.encode(pixels)
    api, _ = _COCO_API
    height, width = pixels.shape
    rle = _Rle()
    api.rleEncode(ctypes.byref(rle), pixels.ctypes.data, height, width, 1)
    try:
        return {"size": [height, width], "counts": _compressed(rle)}
    finally:
        api.rleFree(ctypes.byref(rle))


def rle_of_counts(counts: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """COCO RLE, as ``encode_rle`` returns it, of an HxW (``size``) mask given by its
    uncompressed ``counts`` (column-major run lengths from a run of 0s)."""
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
