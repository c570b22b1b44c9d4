"""Decode encoded image bytes into the HxWx3 uint8 RGB arrays SAM expects."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

# Limits are enforced here (before any pixel is decoded), so Pillow's own
# decompression-bomb guard is left to ours.
Image.MAX_IMAGE_PIXELS = None

# Sample values at these percentiles of an image of more than 8 bits per sample map to 0
# and 255: the normalisation microscopy tools use (CSBDeep's and StarDist's
# ``normalize(x, 1, 99.8)``), so faint signal in a 12-bit range is not squeezed into a
# few grey levels and a few hot pixels do not set the scale.
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8

# Pillow's modes whose samples are wider than 8 bits (one channel each).
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "F"})


@dataclass(frozen=True)
class DecodeOptions:
    """How a request's image bytes become SAM's 8-bit RGB input.

    Arguments:
      page (int): the frame of a multi-page image (a TIFF z-stack or time series, an
        animated GIF/WebP/PNG), from 0.
      intensity_range (tuple(float, float) or None): for images of more than 8 bits per
        sample, the sample values (low, high) mapped to 0 and 255, so that frames of a
        series share one scale; None: the image's own ``LOW_PERCENTILE`` and
        ``HIGH_PERCENTILE``. 8-bit images are never rescaled.
    """

    page: int = 0
    intensity_range: tuple[float, float] | None = None


DEFAULT_DECODE = DecodeOptions()


def image_id_of(data: bytes, options: DecodeOptions = DEFAULT_DECODE) -> str:
    """The cache key of an encoded image as ``options`` decode it (64 hex chars).

    With the default options it is the sha256 of the bytes, so a client can compute it;
    another page or intensity range of the same file is another image, with its own key.
    """
    digest = hashlib.sha256(data)
    if options != DEFAULT_DECODE:
        digest.update(b"\0samserve.DecodeOptions\0")
        digest.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    return digest.hexdigest()


def decode_image(
    data: bytes, max_bytes: int, max_pixels: int, options: DecodeOptions = DEFAULT_DECODE
) -> np.ndarray:
    """Decode PNG/JPEG/WebP/TIFF/... bytes into an HxWx3 uint8 RGB array.

    EXIF orientation is applied, so the array is upright as a viewer shows it and
    prompt coordinates refer to that frame. Grayscale, palette, RGBA (alpha dropped) and
    CMYK images become RGB. Images of more than 8 bits per sample (16-bit and 32-bit
    integers, signed or not, and floats; grayscale or colour) are scaled linearly from
    ``options.intensity_range`` or their own percentiles to 0..255.

    Arguments:
      data (bytes): the encoded image.
      max_bytes (int): the largest ``data`` accepted.
      max_pixels (int): the largest width x height accepted, read from the header.
      options (DecodeOptions): the page and the intensity range.

    Returns:
      (np.ndarray): HxWx3 uint8, C-contiguous.

    Raises:
      RequestError: 413 ``image_too_large`` past ``max_bytes`` or ``max_pixels``
        (checked from the header, before decoding); 400 ``invalid_image`` when the
        bytes are not a complete image Pillow can read; 400 ``page_out_of_range``.
    """
    if len(data) > max_bytes:
        raise RequestError(
            413, "image_too_large", f"image is {len(data)} bytes; the limit is {max_bytes}"
        )
    image = _open(data)
    _seek(image, options.page)
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
        samples = _samples(image, data, options.page)
    except MemoryError:
        raise
    except RequestError:
        raise
    except Exception as err:  # truncated or corrupt data, in any plugin
        raise RequestError(
            400, "invalid_image", f"image could not be decoded: {type(err).__name__}: {err}"
        ) from err
    if samples.dtype != np.uint8:
        samples = stretch_to_8_bits(samples, options.intensity_range)
    if samples.ndim == 2:
        samples = np.repeat(samples[:, :, None], 3, axis=2)
    return np.ascontiguousarray(samples)


def stretch_to_8_bits(
    samples: np.ndarray, intensity_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Map samples of any numeric dtype linearly onto uint8, clipping outside the range.

    Arguments:
      samples (np.ndarray): HxW or HxWxC samples; NaN and infinities count as the low end.
      intensity_range (tuple(float, float) or None): the values (low, high) that become
        0 and 255; None: the finite samples' ``LOW_PERCENTILE`` and ``HIGH_PERCENTILE``
        over all channels (one scale keeps the colours' balance), or their minimum and
        maximum where those percentiles coincide.

    Returns:
      (np.ndarray): uint8 of ``samples``' shape; all 0 where the range is empty.
    """
    values = samples.astype(np.float32, copy=False)
    if intensity_range is None:
        finite = values[np.isfinite(values)]
        low, high = _percentile_range(finite) if finite.size else (0.0, 0.0)
    else:
        low, high = intensity_range
    if not high > low:
        return np.where(np.nan_to_num(values, nan=low, neginf=low) > low, 255, 0).astype(np.uint8)
    scaled = (values - np.float32(low)) * np.float32(255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _percentile_range(finite: np.ndarray) -> tuple[float, float]:
    """``LOW_PERCENTILE`` and ``HIGH_PERCENTILE`` of 1-D ``finite``, or its extremes when
    they coincide (an image that is mostly one value, with a few objects)."""
    low, high = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        low, high = finite.min(), finite.max()
    return float(low), float(high)


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy image of ``data``: only the header is read."""
    try:
        return Image.open(io.BytesIO(data))
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


def _seek(image: Image.Image, page: int) -> None:
    """Move ``image`` to frame ``page``, or refuse a page the file does not have."""
    pages = getattr(image, "n_frames", 1)
    if not 0 <= page < pages:
        raise RequestError(
            400,
            "page_out_of_range",
            f"page {page} asked of an image of {pages} page(s); pages count from 0",
        )
    if page:
        try:
            image.seek(page)
        except EOFError as err:
            raise RequestError(400, "invalid_image", f"page {page} could not be read") from err


def _samples(image: Image.Image, data: bytes, page: int) -> np.ndarray:
    """The upright samples of ``image``'s current page: HxW (wide grayscale) or HxWx3.

    uint8 RGB for 8-bit images; the stored dtype for wider ones, which Pillow either
    keeps (one channel) or, for colour, cuts to 8 bits: those are read by OpenCV.
    """
    if image.mode in ("RGB", "RGBA") and _has_16_bit_samples(image):  # before any load
        orientation = image.getexif().get(_ORIENTATION, 1)
        return _transposed(_decode_wide_colour(data, page), orientation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        return np.asarray(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


_ORIENTATION = 0x0112

# EXIF orientation -> the numpy steps that make the stored pixels upright (Pillow's
# ImageOps.exif_transpose, for arrays it cannot hold).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _transposed(samples: np.ndarray, orientation: int) -> np.ndarray:
    """``samples`` (HxW or HxWxC) turned upright for EXIF ``orientation``."""
    upright = _UPRIGHT.get(orientation)
    return upright(samples) if upright else samples


def _has_16_bit_samples(image: Image.Image) -> bool:
    """Whether the file stores ``image``'s colour samples in 16 bits (PNG, TIFF)."""
    for tile in image.tile:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        if any(isinstance(arg, str) and ";16" in arg for arg in args):
            return True
    return False


def _decode_wide_colour(data: bytes, page: int) -> np.ndarray:
    """HxWx3 RGB samples of page ``page`` of a 16-bit colour PNG or TIFF, as stored."""
    ok, pages = cv2.imdecodemulti(
        np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED, [], (page, page + 1)
    )
    if not ok or not pages:
        raise RequestError(400, "invalid_image", "16-bit colour image could not be decoded")
    samples = pages[0]
    if samples.ndim == 2:
        return samples
    return samples[:, :, 2::-1]  # OpenCV's BGR(A) -> RGB, alpha dropped
