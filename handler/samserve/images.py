"""Decode encoded image bytes into the HxWx3 uint8 RGB arrays SAM expects."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

# Limits are enforced here (before any pixel is decoded), so Pillow's own
# decompression-bomb guard is left to ours.
Image.MAX_IMAGE_PIXELS = None


def image_id_of(data: bytes) -> str:
    """The cache key of an encoded image: sha256 of its bytes, hex (64 chars)."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/WebP/TIFF/... bytes into an HxWx3 uint8 RGB array.

    EXIF orientation is applied, so the array is upright as a viewer shows it and
    prompt coordinates refer to that frame. Grayscale, palette, RGBA (alpha dropped),
    CMYK and 16-bit images become 8-bit RGB; of multi-frame files the first frame.

    Raises:
      RequestError: 413 ``image_too_large`` past ``max_bytes`` or ``max_pixels``
        (checked from the header, before decoding); 400 ``invalid_image`` when the
        bytes are not a complete image Pillow can read.
    """
    if len(data) > max_bytes:
        raise RequestError(
            413, "image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except MemoryError:
        raise
    except UnidentifiedImageError as err:
        raise RequestError(
            400, "invalid_image", "not a readable image: no known image format recognises it"
        ) from err
    except Exception as err:  # any failure of a format plugin on the client's bytes
        # Plugins raise more than OSError/ValueError on malformed files (a DDS header with
        # unknown pixel format flags raises NotImplementedError): all of it is a bad image.
        raise RequestError(
            400, "invalid_image", f"not a readable image: {type(err).__name__}: {err}"
        ) from err
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            413,
            "image_too_large",
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    if width < 1 or height < 1:
        raise RequestError(400, "invalid_image", f"image has no pixels ({width}x{height})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except MemoryError:
        raise
    except Exception as err:  # truncated or corrupt data, in any plugin
        raise RequestError(
            400, "invalid_image", f"image could not be decoded: {type(err).__name__}: {err}"
        ) from err


def _to_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 from any Pillow mode; high bit depths are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(pixels / 257.0, 0, 255).round().astype(np.uint8))
    elif image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        high = pixels.max() if pixels.size and pixels.max() > 1.0 else 1.0
        image = Image.fromarray((np.clip(pixels / high, 0, 1) * 255).round().astype(np.uint8))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
