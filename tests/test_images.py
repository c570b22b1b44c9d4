"""Tests for samserve.images: real Pillow encoders make every input, no mocks."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from samclient.overlay import picture
from samserve.errors import RequestError
from samserve.images import DecodeOptions, decode_image, image_id_of, stretch_to_8_bits

BIG = 1 << 40  # a limit that never triggers
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return decode_image(data, max_bytes=BIG, max_pixels=BIG)


def assert_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)
    assert array.flags.c_contiguous


def random_rgb(height: int = 13, width: int = 21, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def blocky_rgb() -> np.ndarray:
    """64 wide x 32 high: blue, with a red 16x16 top-left corner (JPEG-friendly)."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[:16, :16] = (255, 0, 0)
    return pixels


def expect_error(data: bytes, status: int, code: str, **limits) -> RequestError:
    limits = {"max_bytes": BIG, "max_pixels": BIG, **limits}
    with pytest.raises(RequestError) as info:
        decode_image(data, **limits)
    assert info.value.status == status
    assert info.value.code == code
    assert info.value.to_dict() == {"error": {"code": code, "message": info.value.message}}
    return info.value


# --- lossless and lossy formats --------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_deflate"}),
        ("BMP", {}),
    ],
)
def test_lossless_formats_decode_exactly(fmt, params):
    pixels = random_rgb()
    result = decode(encode(Image.fromarray(pixels), fmt, **params))
    assert_rgb(result, 13, 21)
    np.testing.assert_array_equal(result, pixels)


def test_jpeg_decodes_approximately():
    pixels = blocky_rgb()
    result = decode(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert_rgb(result, 32, 64)
    error = np.abs(result.astype(int) - pixels.astype(int))
    assert error.mean() < 4
    # Away from block edges the colours are essentially exact.
    assert np.abs(result[4:12, 4:12].astype(int) - (255, 0, 0)).max() <= 8
    assert np.abs(result[20:28, 40:56].astype(int) - (0, 0, 255)).max() <= 8


def test_lossy_webp_decodes_approximately():
    pixels = blocky_rgb()
    result = decode(encode(Image.fromarray(pixels), "WEBP", quality=95))
    assert_rgb(result, 32, 64)
    assert np.abs(result[4:12, 4:12].astype(int) - (255, 0, 0)).max() <= 16
    assert np.abs(result[20:28, 40:56].astype(int) - (0, 0, 255)).max() <= 16


def test_non_square_image_keeps_height_and_width():
    pixels = random_rgb(height=5, width=40, seed=3)
    result = decode(encode(Image.fromarray(pixels), "PNG"))
    assert_rgb(result, 5, 40)
    np.testing.assert_array_equal(result, pixels)


# --- EXIF orientation -------------------------------------------------------------------


def jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(Image.fromarray(blocky_rgb()), "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[ORIENTATION] == orientation  # precondition
    return data


def red(region: np.ndarray) -> bool:
    mean = region.reshape(-1, 3).mean(axis=0)
    return bool(mean[0] > 200 and mean[2] < 55)


def blue(region: np.ndarray) -> bool:
    mean = region.reshape(-1, 3).mean(axis=0)
    return bool(mean[2] > 200 and mean[0] < 55)


def test_exif_orientation_6_rotates_clockwise():
    # Stored 64 wide x 32 high with a red top-left corner; orientation 6 means "rotate
    # 90 degrees clockwise to display": 32 wide x 64 high, red corner at the top right.
    result = decode(jpeg_with_orientation(6))
    assert_rgb(result, 64, 32)
    assert red(result[2:14, 18:30])
    assert blue(result[2:14, 2:14])
    assert blue(result[50:62, 2:14])
    assert blue(result[50:62, 18:30])


def test_exif_orientation_8_rotates_counterclockwise():
    # Orientation 8: rotate 90 degrees counter-clockwise; the red corner ends bottom left.
    result = decode(jpeg_with_orientation(8))
    assert_rgb(result, 64, 32)
    assert red(result[50:62, 2:14])
    assert blue(result[2:14, 2:14])
    assert blue(result[2:14, 18:30])
    assert blue(result[50:62, 18:30])


def test_exif_orientation_1_leaves_the_image_alone():
    result = decode(jpeg_with_orientation(1))
    assert_rgb(result, 32, 64)
    assert red(result[2:14, 2:14])
    assert blue(result[2:14, 50:62])


def test_exif_orientation_in_png_is_applied_exactly():
    pixels = random_rgb(height=4, width=7, seed=5)
    exif = Image.Exif()
    exif[ORIENTATION] = 3  # rotate 180 degrees
    result = decode(encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert_rgb(result, 4, 7)
    np.testing.assert_array_equal(result, pixels[::-1, ::-1])


# --- modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_grayscale_is_replicated_to_three_channels(fmt):
    gray = np.random.default_rng(1).integers(0, 256, (6, 11), dtype=np.uint8)
    image = Image.fromarray(gray)
    assert image.mode == "L"
    result = decode(encode(image, fmt))
    assert_rgb(result, 6, 11)
    np.testing.assert_array_equal(result, np.repeat(gray[..., None], 3, axis=2))


def test_bilevel_image_becomes_black_and_white():
    bits = np.zeros((4, 9), dtype=bool)
    bits[1:3, 2:7] = True
    result = decode(encode(Image.fromarray(bits), "PNG"))
    assert_rgb(result, 4, 9)
    np.testing.assert_array_equal(result, np.where(bits[..., None], 255, 0).repeat(3, axis=2))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF"])
def test_palette_image_uses_its_palette_colours(fmt):
    palette = np.array([[255, 0, 0], [0, 200, 0], [10, 20, 250], [123, 45, 67]], np.uint8)
    indices = np.random.default_rng(2).integers(0, len(palette), (7, 10), dtype=np.uint8)
    image = Image.frombytes("P", (10, 7), indices.tobytes())
    image.putpalette(palette.flatten().tolist())
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == "P"
    result = decode(data)
    assert_rgb(result, 7, 10)
    np.testing.assert_array_equal(result, palette[indices])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_rgba_drops_alpha_and_keeps_colour(fmt):
    rgb = random_rgb(height=5, width=8, seed=7)
    alpha = np.zeros((5, 8, 1), dtype=np.uint8)
    alpha[:, 4:] = 255  # left half fully transparent: its colour must survive as is
    image = Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    assert image.mode == "RGBA"
    params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    result = decode(encode(image, fmt, **params))
    assert_rgb(result, 5, 8)
    np.testing.assert_array_equal(result, rgb)


def test_gray_with_alpha_keeps_gray():
    gray = np.array([[0, 50, 100], [150, 200, 255]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128], [0, 255, 7]], dtype=np.uint8)
    image = Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA")
    result = decode(encode(image, "PNG"))
    assert_rgb(result, 2, 3)
    np.testing.assert_array_equal(result, np.repeat(gray[..., None], 3, axis=2))


CMYK_TO_RGB = [
    ((0, 0, 0, 0), (255, 255, 255)),
    ((255, 0, 0, 0), (0, 255, 255)),
    ((0, 255, 0, 0), (255, 0, 255)),
    ((0, 0, 255, 0), (255, 255, 0)),
    ((0, 0, 0, 255), (0, 0, 0)),
]


def cmyk_image() -> tuple[Image.Image, np.ndarray]:
    """16 wide x 40 high: five 8-row stripes, one per CMYK_TO_RGB entry."""
    cmyk = np.zeros((40, 16, 4), dtype=np.uint8)
    rgb = np.zeros((40, 16, 3), dtype=np.uint8)
    for stripe, (ink, colour) in enumerate(CMYK_TO_RGB):
        cmyk[stripe * 8 : stripe * 8 + 8] = ink
        rgb[stripe * 8 : stripe * 8 + 8] = colour
    return Image.fromarray(cmyk, mode="CMYK"), rgb


def test_cmyk_tiff_becomes_rgb():
    image, rgb = cmyk_image()
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode(data)
    assert_rgb(result, 40, 16)
    np.testing.assert_array_equal(result, rgb)


def test_cmyk_jpeg_becomes_rgb_approximately():
    image, rgb = cmyk_image()
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode(data)
    assert_rgb(result, 40, 16)
    for stripe in range(len(CMYK_TO_RGB)):
        inner = slice(stripe * 8 + 2, stripe * 8 + 6)
        diff = np.abs(result[inner, 2:14].astype(int) - rgb[inner, 2:14].astype(int))
        assert diff.max() <= 12, stripe


# A 12-bit camera's samples (0..4095) stored in 16 bits: dark background, a bright and a
# faint object, and one hot pixel.
TWELVE_BIT = np.full((40, 50), 100, dtype=np.uint16)
TWELVE_BIT[5:15, 5:15] = 3000  # bright: 2% of the pixels
TWELVE_BIT[20:30, 20:30] = 300  # faint
TWELVE_BIT[39, 49] = 4095  # hot pixel


def percentile_stretch(samples: np.ndarray) -> np.ndarray:
    """The documented normalisation, written out plainly: percentiles 1 and 99.8 of all
    samples map to 0 and 255."""
    low, high = np.percentile(samples.astype(np.float64), [1.0, 99.8])
    return np.clip((samples - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)


def gray3(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[..., None], 3, axis=2)


def test_16_bit_grayscale_png_is_stretched_by_its_percentiles():
    data = encode(Image.fromarray(TWELVE_BIT), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    result = decode(data)
    assert_rgb(result, 40, 50)
    np.testing.assert_array_equal(result, gray3(percentile_stretch(TWELVE_BIT)))
    # Faint signal keeps its contrast (dividing by 257 made it 0 against 1), and the hot
    # pixel does not set the scale: the bright object saturates, not the single pixel.
    assert result[0, 0, 0] == 0
    assert result[25, 25, 0] >= 8
    assert result[10, 10, 0] == 255


def test_16_bit_big_endian_tiff_with_an_intensity_range_is_scaled_by_it():
    image = Image.fromarray(TWELVE_BIT.astype(">u2"))
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    result = decode_image(data, BIG, BIG, DecodeOptions(intensity_range=(0.0, 4095.0)))
    expected = (TWELVE_BIT.astype(np.float64) * 255 / 4095).round().astype(np.uint8)
    np.testing.assert_array_equal(result, gray3(expected))


def test_intensity_range_clips_outside_values():
    data = encode(Image.fromarray(TWELVE_BIT), "PNG")
    result = decode_image(data, BIG, BIG, DecodeOptions(intensity_range=(200.0, 400.0)))
    assert result[0, 0, 0] == 0  # 100, below the range
    assert result[25, 25, 0] == 128  # 300, the middle
    assert result[10, 10, 0] == 255  # 3000, above


def test_16_bit_png_with_exif_orientation_is_rotated_and_scaled():
    pixels = np.zeros((2, 4), dtype=np.uint16)
    pixels[0, 0] = 65535
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    result = decode(encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert_rgb(result, 4, 2)
    expected = np.zeros((4, 2), dtype=np.uint8)
    expected[0, 1] = 255  # top-left went to top-right
    np.testing.assert_array_equal(result[..., 0], expected)


def test_signed_16_bit_tiff_keeps_its_negative_values():
    signed = (TWELVE_BIT.astype(np.int32) - 2000).astype(np.int16)
    data = encode(Image.fromarray(signed), "TIFF")
    result = decode(data)
    np.testing.assert_array_equal(result, gray3(percentile_stretch(signed)))
    assert result[0, 0, 0] < result[25, 25, 0] < result[10, 10, 0]  # -1900 < -1700 < 1000


def test_32_bit_integer_tiff_is_stretched():
    wide = TWELVE_BIT.astype(np.int32) * 1000
    data = encode(Image.fromarray(wide), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode(data), gray3(percentile_stretch(wide)))


def test_32_bit_float_tiff_with_unit_range_is_scaled_to_8_bits():
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.1]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    result = decode_image(data, BIG, BIG, DecodeOptions(intensity_range=(0.0, 1.0)))
    assert_rgb(result, 2, 3)
    expected = np.array([[0, 64, 128], [191, 255, 26]], dtype=np.uint8)
    np.testing.assert_array_equal(result, gray3(expected))


def test_float_tiff_with_nan_and_infinity_decodes():
    values = np.linspace(-5.0, 5.0, 60, dtype=np.float32).reshape(6, 10)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    result = decode(encode(Image.fromarray(values), "TIFF"))
    assert_rgb(result, 6, 10)
    assert result[0, 0, 0] == 0 and result[0, 1, 0] == 255 and result[0, 2, 0] == 0
    assert result[5, 9, 0] == 255 and result[1, 0, 0] < result[4, 0, 0]


def test_constant_16_bit_image_is_black():
    data = encode(Image.fromarray(np.full((4, 4), 1234, dtype=np.uint16)), "PNG")
    np.testing.assert_array_equal(decode(data), np.zeros((4, 4, 3), dtype=np.uint8))


def test_16_bit_colour_png_keeps_its_low_bits():
    # Pillow cuts 16-bit colour to its high byte (a 12-bit image to 0..15); OpenCV reads it.
    rgb = np.stack([TWELVE_BIT, TWELVE_BIT // 2, TWELVE_BIT // 4], axis=-1)
    ok, buffer = cv2.imencode(".png", rgb[:, :, ::-1])  # OpenCV writes BGR
    assert ok and Image.open(io.BytesIO(buffer.tobytes())).mode == "RGB"  # precondition
    result = decode(buffer.tobytes())
    np.testing.assert_array_equal(result, percentile_stretch(rgb))
    # One scale for all channels keeps the colour: green is half of red, blue a quarter.
    red, green, blue = result[10, 10].tolist()
    assert red == 255 and abs(green - 128) <= 2 and abs(blue - 64) <= 2
    assert result[25, 25, 0] > result[0, 0, 0]


def test_16_bit_colour_tiff_page_is_read():
    rgb = np.stack([TWELVE_BIT, TWELVE_BIT // 2, TWELVE_BIT // 4], axis=-1)
    ok, buffer = cv2.imencodemulti(".tiff", [rgb[:, :, ::-1] // 2, rgb[:, :, ::-1]])
    assert ok
    options = DecodeOptions(page=1, intensity_range=(0.0, 4095.0))
    result = decode_image(buffer.tobytes(), BIG, BIG, options)
    expected = (rgb.astype(np.float64) * 255 / 4095).round().astype(np.uint8)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    ("fmt", "params"), [("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]
)
def test_multi_frame_image_gives_its_first_frame_by_default(fmt, params):
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # precondition
    result = decode(data)
    assert_rgb(result, 4, 6)
    np.testing.assert_array_equal(result, np.full((4, 6, 3), (255, 0, 0), dtype=np.uint8))


def z_stack() -> bytes:
    """A 3-page 16-bit TIFF whose page k is filled with 1000 * (k + 1)."""
    pages = [Image.fromarray(np.full((4, 5), 1000 * (k + 1), dtype=np.uint16)) for k in range(3)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


@pytest.mark.parametrize("page", [0, 1, 2])
def test_page_of_a_multi_page_tiff_is_chosen(page):
    options = DecodeOptions(page=page, intensity_range=(0.0, 4000.0))
    result = decode_image(z_stack(), BIG, BIG, options)
    expected = round(1000 * (page + 1) * 255 / 4000)
    np.testing.assert_array_equal(result, np.full((4, 5, 3), expected, dtype=np.uint8))


def test_page_past_the_last_is_refused():
    error = expect_error(z_stack(), 400, "page_out_of_range", options=DecodeOptions(page=3))
    assert "3 page(s)" in error.message
    expect_error(small_png(), 400, "page_out_of_range", options=DecodeOptions(page=1))


def test_stretch_of_an_empty_range_is_black_below_and_white_above():
    samples = np.array([[1.0, 2.0, 3.0]])
    assert stretch_to_8_bits(samples, (2.0, 2.0)).tolist() == [[0, 0, 255]]


# --- limits and errors ------------------------------------------------------------------


def small_png() -> bytes:
    return encode(Image.fromarray(random_rgb(height=10, width=10, seed=9)), "PNG")


def test_byte_limit_is_inclusive():
    data = small_png()
    assert_rgb(decode_image(data, max_bytes=len(data), max_pixels=BIG), 10, 10)
    error = expect_error(data, 413, "image_too_large", max_bytes=len(data) - 1)
    assert str(len(data) - 1) in error.message


def test_byte_limit_is_checked_before_parsing():
    # Garbage that would be a 400 is a 413 when it is too big: nothing was parsed.
    expect_error(b"\x00" * 101, 413, "image_too_large", max_bytes=100)


def test_pixel_limit_is_inclusive():
    data = small_png()
    assert_rgb(decode_image(data, max_bytes=BIG, max_pixels=100), 10, 10)
    error = expect_error(data, 413, "image_too_large", max_pixels=99)
    assert "10x10" in error.message
    assert "99" in error.message


def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to declare width x height (CRC fixed)."""
    data = bytearray(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header_quickly():
    data = png_declaring(50_000, 50_000)
    assert len(data) < 200
    assert Image.open(io.BytesIO(data)).size == (50_000, 50_000)  # header really says so
    started = time.perf_counter()
    error = expect_error(data, 413, "image_too_large", max_pixels=64_000_000)
    assert time.perf_counter() - started < 1.0
    assert "50000x50000" in error.message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not an image at all",
        bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n",  # the signature alone
        b"GIF89a",
    ],
    ids=["empty", "text", "noise", "png-signature-only", "gif-magic-only"],
)
def test_unreadable_bytes_are_invalid_image(data):
    expect_error(data, 400, "invalid_image")


def test_truncated_png_is_invalid_image():
    data = encode(Image.fromarray(random_rgb(height=64, width=64, seed=11)), "PNG")
    assert len(data) > 4000  # random pixels do not compress: cutting loses image data
    expect_error(data[: len(data) // 2], 400, "invalid_image")


def test_truncated_jpeg_is_invalid_image():
    data = encode(Image.fromarray(random_rgb(height=64, width=64, seed=12)), "JPEG")
    expect_error(data[: len(data) // 2], 400, "invalid_image")


def test_png_with_corrupt_image_data_is_invalid_image():
    data = bytearray(encode(Image.fromarray(random_rgb(height=32, width=32, seed=13)), "PNG"))
    start = data.index(b"IDAT") + 4
    for offset in range(start + 10, start + 60):
        data[offset] ^= 0xFF
    expect_error(bytes(data), 400, "invalid_image")


def test_plugin_that_raises_an_unusual_exception_is_invalid_image():
    """A DDS header with unknown pixel-format flags makes Pillow raise NotImplementedError."""
    data = bytearray(encode(Image.fromarray(random_rgb(height=8, width=8, seed=14)), "DDS"))
    assert data[:4] == b"DDS "
    data[80:84] = struct.pack("<I", 0x4000)  # DDS_PIXELFORMAT.dwFlags: no known format
    with pytest.raises(NotImplementedError):
        Image.open(io.BytesIO(bytes(data)))
    expect_error(bytes(data), 400, "invalid_image")


# --- image_id_of ------------------------------------------------------------------------


def test_image_id_is_sha256_hex_of_the_bytes():
    data = small_png()
    image_id = image_id_of(data)
    assert image_id == hashlib.sha256(data).hexdigest()
    assert len(image_id) == 64
    assert set(image_id) <= set("0123456789abcdef")
    assert image_id_of(bytes(data)) == image_id  # deterministic


def test_image_id_differs_for_different_bytes():
    data = small_png()
    changed = data[:-1] + bytes([data[-1] ^ 1])
    assert image_id_of(changed) != image_id_of(data)
    assert image_id_of(b"") == hashlib.sha256(b"").hexdigest()


def test_image_id_of_another_page_or_range_is_another_key():
    data = z_stack()
    default = image_id_of(data)
    assert default == hashlib.sha256(data).hexdigest()
    assert image_id_of(data, DecodeOptions()) == default
    keys = {
        default,
        image_id_of(data, DecodeOptions(page=1)),
        image_id_of(data, DecodeOptions(page=2)),
        image_id_of(data, DecodeOptions(intensity_range=(0.0, 4095.0))),
        image_id_of(data, DecodeOptions(page=1, intensity_range=(0.0, 4095.0))),
    }
    assert len(keys) == 5
    assert all(len(key) == 64 for key in keys)
    assert image_id_of(data, DecodeOptions(page=1)) == image_id_of(data, DecodeOptions(page=1))


@pytest.mark.parametrize(
    ("samples", "page"),
    [
        (TWELVE_BIT, 0),
        ((TWELVE_BIT.astype(np.int32) - 2000).astype(np.int16), 0),
        (TWELVE_BIT.astype(np.float32) / 4095, 0),
        (np.full((4, 4), 7, dtype=np.uint16), 0),
        (TWELVE_BIT, 1),
    ],
)
def test_the_clients_picture_is_the_image_the_server_segments(samples, page):
    """samclient draws its overlays on its own reading of the image (the client does not
    install the server): it must be the server's, or masks land on another picture."""
    pages = [Image.fromarray(samples), Image.fromarray(samples[::-1].copy())]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    served = decode_image(data, BIG, BIG, DecodeOptions(page=page))
    np.testing.assert_array_equal(picture(data, page=page), served)
