"""COCO RLE of whole masks by pycocotools' own C encoder, called without the GIL.

``pycocotools.mask.encode`` runs its C encoder (``rleEncode`` and ``rleToString`` of the
COCO API's ``maskApi.c``) while holding the GIL, so masks encoded in several threads take
turns: a 1500x2000 mask of fine structure costs about 3 ms, and one click's three masks
use one core of many. The same two functions are exported by pycocotools' extension
module; called through ``ctypes`` (which releases the GIL for the call) they give the
same bytes, and masks can be encoded side by side. Where the symbols are not found (an
unusual build of pycocotools), ``encode_rle`` is ``pycocotools.mask.encode`` itself.
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
    api, free = _COCO_API
    height, width = pixels.shape
    rle = _Rle()
    api.rleEncode(ctypes.byref(rle), pixels.ctypes.data, height, width, 1)
    try:
        text = api.rleToString(ctypes.byref(rle))
        try:
            counts = ctypes.string_at(text)
        finally:
            free(text)
    finally:
        api.rleFree(ctypes.byref(rle))
    return {"size": [height, width], "counts": counts}
