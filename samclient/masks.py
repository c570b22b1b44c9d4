"""A response's mask records back into arrays."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def decode_segmentation(record: dict[str, Any]) -> np.ndarray:
    """The mask a record of a response carries.

    Arguments:
      record (dict): one entry of a result's ``masks`` (or of ``everything``'s), holding
        ``segmentation`` (COCO RLE: ``size`` [H, W] and compressed ``counts``) or ``png``
        (base64 of a 1-bit PNG), as the request's ``output`` asked.

    Returns:
      (np.ndarray): HxW bool in the frame of the segmented image.

    Raises:
      ValueError: the record carries no mask (the request asked for ``output`` "none").
    """
    if "segmentation" in record:
        rle = dict(record["segmentation"])
        rle["counts"] = rle["counts"].encode("ascii")
        return mask_utils.decode(rle).astype(bool)
    if "png" in record:
        image = Image.open(io.BytesIO(base64.b64decode(record["png"])))
        return np.asarray(image.convert("L")) > 0
    raise ValueError("record carries no mask (output was 'none')")
