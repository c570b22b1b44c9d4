"""Robustness against a real TorchServe (issue 5): bad input, load, a killed worker,
bounded memory, and tokens on every API.

Everything goes through the real Java frontend and Python worker of the session's server
(``server`` in conftest.py). Expected answers come from the same model run in-process
(``SegmentService`` on ``sam_micro``), never from a stand-in for TorchServe. The tests
print their counts and timings straight to the terminal (also without ``-s``).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from build_mar import build_archive
from conftest import MODEL, PORTS, REPO, make_image, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.errors import AuthError, SamServeError
from samclient.grpc_client import GrpcClient
from samclient.keys import Keys
from samclient.masks import decode_segmentation
from samclient.rest_client import RestClient
from samserve.engine import MIB
from samserve.models import random_checkpoint, spec_by_name
from samserve.service import SegmentService
from samserve.settings import MIN_RESPONSE_BYTES, Settings

pytestmark = pytest.mark.integration

DEFAULTS = Settings()


# --- shared helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(micro_sam) -> SegmentService:
    """The served model, in this process: the expected answer to any legal request."""
    return SegmentService.for_model(micro_sam, Settings())


def expected_answer(reference: SegmentService, body: bytes | dict, content_type: str) -> dict:
    reply = reference.handle([(body, content_type)])[0]
    assert reply.status == 200, reply.body
    return reply.body


def answer_mismatch(got: dict, want: dict) -> str | None:
    """Why ``got`` is not the answer ``want`` (None when it is).

    Masks may differ in a few threshold pixels (the server batches encoder runs), scores
    by float rounding; an answer to another image or prompt differs far more.
    """
    if got.get("image_id") != want["image_id"]:
        return f"image_id {got.get('image_id')} != {want['image_id']}"
    if (got["width"], got["height"]) != (want["width"], want["height"]):
        return f"size {got['width']}x{got['height']} != {want['width']}x{want['height']}"
    if "everything" in want:
        found = [(m["bbox"], round(m["predicted_iou"], 3)) for m in got["everything"]["masks"]]
        wanted = [(m["bbox"], round(m["predicted_iou"], 3)) for m in want["everything"]["masks"]]
        return None if found == wanted else f"everything: {found} != {wanted}"
    if len(got["results"]) != len(want["results"]):
        return f"{len(got['results'])} results != {len(want['results'])}"
    for i, (result, expected) in enumerate(zip(got["results"], want["results"])):
        if len(result["masks"]) != len(expected["masks"]):
            return f"results[{i}]: {len(result['masks'])} masks != {len(expected['masks'])}"
        for j, (mask, mask_want) in enumerate(zip(result["masks"], expected["masks"])):
            if abs(mask["score"] - mask_want["score"]) > 1e-3:
                return f"results[{i}].masks[{j}].score {mask['score']} != {mask_want['score']}"
            pixels = mask_want["segmentation"]["size"] if "segmentation" in mask_want else None
            if pixels is not None:
                same = (decode_segmentation(mask) == decode_segmentation(mask_want)).mean()
                if same < 0.999:
                    return f"results[{i}].masks[{j}]: only {same:.4f} of the pixels agree"
            elif abs(mask["area"] - mask_want["area"]) > 1e-3 * max(mask_want["area"], 1000):
                return f"results[{i}].masks[{j}].area {mask['area']} != {mask_want['area']}"
    return None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noisy(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def worker_process(server, rest: RestClient, model: str) -> tuple[int, str]:
    """PID and id of the model's one worker, checked to be TorchServe's Python worker:
    a child of the Java frontend whose command line is model_service_worker.py on the
    worker's own socket (``.ts.sock.<id>``)."""
    workers = rest.describe_model(model)[0]["workers"]
    assert len(workers) == 1, workers
    pid, worker_id = int(workers[0]["pid"]), str(workers[0]["id"])
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"model_service_worker.py") for part in command), command
    assert any(part.endswith(f".ts.sock.{worker_id}".encode()) for part in command), command
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == server.pid(), (parent, server.pid())
    return pid, worker_id


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process (``VmHWM``: its peak), from /proc/<pid>/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """``condition()``'s first truthy value, polled until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout}s")


def archive_in_store(server, checkpoint: Path, name: str, settings: dict, spec=None) -> str:
    """Build ``<name>.mar`` into the server's model store (once); the name to register."""
    if not (server.model_store / f"{name}.mar").exists():
        build_archive(
            spec or spec_by_name("sam_micro"),
            checkpoint,
            server.model_store,
            name,
            settings=settings,
        )
    return f"{name}.mar"


@pytest.fixture()
def registered(server, rest):
    """Register archives for one test; unregistered at its end, whatever happens."""
    names = []

    def register(archive: str, name: str) -> str:
        assert "registered" in rest.register_model(archive, name, initial_workers=1)
        names.append(name)
        return name

    yield register
    for name in names:
        rest.unregister_model(name)


# --- 1. the bad-input matrix -------------------------------------------------------------

SMALL = make_image(50, 60, seed=21)  # 60 wide, 50 high
SMALL_PNG = png_bytes(SMALL)
ONE_PIXEL_PNG = encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")
POINT = point_prompt([[20, 25]], [1])
LIMITS_MODEL = "sam_limits"
LIMITS = {
    "max_image_bytes": 20_000,
    "max_image_pixels": 100 * 100,
    "max_prompts": 4,
    "max_points_per_prompt": 3,
    "max_mask_pixels": 2 * 3 * 60 * 60,  # two multimask prompts on a 60x60 image
    "max_response_bytes": MIN_RESPONSE_BYTES,
}


def json_body(image: bytes | None = SMALL_PNG, **fields: Any) -> bytes:
    """A JSON body: the small test image (unless ``image=None``) plus ``fields``."""
    body = dict(fields)
    if image is not None:
        body["image"] = b64(image)
    return json.dumps(body).encode()


def with_prompt(prompt: Any, **fields: Any) -> bytes:
    return json_body(prompts=[prompt], **fields)


@functools.cache
def truncated_png() -> bytes:
    data = png_bytes(noisy(64, 64, seed=1))
    return data[: len(data) // 2]


@functools.cache
def truncated_jpeg() -> bytes:
    data = encoded(Image.fromarray(noisy(64, 64, seed=2)), "JPEG")
    return data[: len(data) // 2]


@functools.cache
def corrupt_png() -> bytes:
    data = bytearray(png_bytes(noisy(32, 32, seed=3)))
    start = data.index(b"IDAT") + 4
    for offset in range(start + 10, start + 60):
        data[offset] ^= 0xFF
    return bytes(data)


@functools.cache
def unknown_dds() -> bytes:
    """A DDS header whose pixel format flags Pillow does not know: NotImplementedError."""
    data = bytearray(encoded(Image.fromarray(noisy(8, 8, seed=4)), "DDS"))
    data[80:84] = struct.pack("<I", 0x4000)
    return bytes(data)


@functools.cache
def header_bomb() -> bytes:
    """A 4x4 PNG whose IHDR is rewritten to declare 50000 x 50000 pixels (about 80 bytes)."""
    data = bytearray(encoded(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    data[16:24] = struct.pack(">II", 50_000, 50_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@functools.cache
def real_bomb() -> bytes:
    """A complete, valid 1-bit PNG of 50000 x 50000 black pixels in about 300 KB: decoding
    it would take 2.5 GB as Pillow's 1-byte-per-pixel image, 7.5 GB as RGB."""
    width = height = 50_000
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


@functools.cache
def one_pixel_over() -> bytes:
    return encoded(Image.new("1", (8001, 8000)), "PNG")


@functools.cache
def huge_legal() -> bytes:
    """8000 x 8000 = exactly max_image_pixels (the limit is inclusive), with a square."""
    image = Image.new("L", (8000, 8000), 20)
    image.paste(230, (1000, 1500, 5000, 6000))
    return encoded(image, "PNG")


@functools.cache
def over_image_bytes() -> bytes:
    """One byte over max_image_bytes (32 MiB), under max_request_size even as base64."""
    return b"\x89PNG\r\n\x1a\n" + bytes(DEFAULTS.max_image_bytes + 1 - 8)


@functools.cache
def oversized_body() -> bytes:
    """Over TorchServe's max_request_size (64 MiB in config.properties)."""
    return b'{"image": "' + b"A" * (65 * MIB) + b'"}'


def mask_input_from_another_image(rest: RestClient) -> bytes:
    other = rest.predict(
        MODEL, segment_request(png_bytes(make_image(40, 40, seed=22)), prompts=[POINT])
    )
    logits_id = other["results"][0]["logits_id"]
    return with_prompt(dict(POINT, mask_input=logits_id))


@dataclass(frozen=True)
class Case:
    """One input and what must come back.

    ``body`` is bytes, or a function of the REST client that builds them when the case
    runs. ``status`` is the HTTP status (REST) or gRPC status name; ``code`` the error
    code in the JSON body, or None for a legal request, whose answer is compared with
    the in-process model. ``names``: text the error message must contain.
    """

    name: str
    body: bytes | Callable[[RestClient], bytes]
    status: int | str
    code: str | None
    names: str = ""
    content_type: str | None = "application/json"
    over: str = "rest"
    model: str = MODEL
    frontend: bool = False  # answered by TorchServe's frontend, never reaching the handler


J = "application/json"
# fmt: off
CASES = [
    # The body itself.
    Case("malformed_json", b"{not json", 400, "invalid_json", "not valid JSON"),
    Case("truncated_json", b'{"image_id": "a"', 400, "invalid_json", "not valid JSON"),
    Case("body_not_utf8", b"\xff\xfe{}", 400, "invalid_json", "UTF-8"),
    Case("empty_body", b"", 400, "invalid_json", "empty"),
    Case("json_array", b"[1, 2]", 400, "invalid_request", "got list"),
    Case("json_null", b"null", 400, "invalid_request", "got null"),
    Case("json_number", b"42", 400, "invalid_request", "got int"),
    Case("json_string", b'"abc"', 400, "invalid_request", "got str"),
    Case("deeply_nested_json", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", "depth"),
    Case("integer_of_5000_digits", b'{"image_id": "a", "prompts": [{"box": [0, 0, 1, '
         + b"9" * 5000 + b"]}]}", 400, "invalid_json", "digits"),
    # The image.
    Case("no_image_nor_image_id", b'{"prompts": []}', 400, "missing_image", "image_id"),
    Case("image_and_id_null", b'{"image": null, "image_id": null}', 400, "missing_image"),
    Case("image_empty_string", b'{"image": ""}', 400, "missing_image", "empty"),
    Case("image_not_a_string", b'{"image": 123}', 400, "invalid_request", "image"),
    Case("image_id_not_a_string", b'{"image_id": 5}', 400, "invalid_request", "image_id"),
    Case("image_id_too_long", json_body(None, image_id="a" * 200), 400, "invalid_request",
         "image_id"),
    Case("invalid_base64", b'{"image": "%%%"}', 400, "invalid_base64", "base64"),
    Case("base64_of_text", json_body(b"hello, not an image"), 400, "invalid_image", "readable"),
    Case("raw_body_not_an_image", b"\x00\x01garbage", 400, "invalid_image", "readable",
         content_type="image/png"),
    Case("raw_body_empty", b"", 400, "missing_image", "non-empty", content_type="image/png"),
    Case("truncated_png", lambda _: json_body(truncated_png()), 400, "invalid_image", "truncated"),
    Case("truncated_jpeg_raw", lambda _: truncated_jpeg(), 400, "invalid_image", "truncated",
         content_type="image/jpeg"),
    Case("corrupt_png_data", lambda _: json_body(corrupt_png()), 400, "invalid_image", "decoded"),
    Case("dds_unknown_pixel_format", lambda _: json_body(unknown_dds()), 400, "invalid_image",
         "NotImplementedError"),
    Case("bomb_header_50000x50000", lambda _: json_body(header_bomb()), 413, "image_too_large",
         "50000x50000"),
    Case("bomb_real_1bit_png_50000x50000", lambda _: json_body(real_bomb()), 413,
         "image_too_large", "50000x50000"),
    Case("one_pixel_over_max_pixels", lambda _: json_body(one_pixel_over()), 413,
         "image_too_large", "8001x8000"),
    Case("over_max_image_bytes", lambda _: json_body(over_image_bytes()), 413, "image_too_large",
         str(DEFAULTS.max_image_bytes)),
    Case("over_max_image_bytes_raw", lambda _: over_image_bytes(), 413, "image_too_large",
         str(DEFAULTS.max_image_bytes), content_type="image/png"),
    Case("image_id_mismatch", json_body(image_id="0" * 64), 400, "image_id_mismatch", "0" * 64),
    Case("image_id_not_cached", json_body(None, image_id="f" * 64, prompts=[POINT]), 404,
         "image_not_cached", "resend"),
    # Legal edge cases: answered, and the answer is the model's.
    Case("one_pixel_image", json_body(ONE_PIXEL_PNG, prompts=[point_prompt([[0, 0]], [1]),
                                                            {"box": [0, 0, 1, 1]}]),
         200, None),
    Case("huge_legal_image_8000x8000", lambda _: json_body(huge_legal(), prompts=[
        {"box": [1000, 1500, 5000, 6000]}], multimask=False, output="none"), 200, None),
    Case("max_prompts_times_huge_image", lambda _: json_body(huge_legal(), prompts=[
        {"box": [1000, 1500, 5000, 6000]}] * DEFAULTS.max_prompts, output="none"), 400,
         "too_many_mask_pixels", "256 prompts x 3 masks x 8000x8000"),
    Case("empty_prompt_list", json_body(prompts=[]), 200, None),
    Case("data_url_image", json.dumps({"image": "data:image/png;base64," + b64(SMALL_PNG),
                                       "prompts": [POINT]}).encode(), 200, None),
    Case("no_content_type_is_json", with_prompt(POINT), 200, None, content_type=None),
    Case("point_on_the_far_edge", with_prompt(point_prompt([[60, 50]], [1])), 200, None),
    # Prompts.
    Case("prompts_not_a_list", json_body(prompts={"box": [0, 0, 1, 1]}), 400, "invalid_request",
         "prompts"),
    Case("prompt_not_an_object", json_body(prompts=[[1, 2]]), 400, "invalid_request",
         "prompts[0]"),
    Case("prompt_empty_object", json_body(prompts=[{}]), 400, "empty_prompt", "prompts[0]"),
    Case("thousands_of_prompts", json_body(prompts=[{"box": [0, 0, 1, 1]}] * 5000), 400,
         "too_many_prompts", "5000 prompts; at most 256"),
    Case("too_many_points", with_prompt(point_prompt([[1, 1]] * 65, [1] * 65)), 400,
         "too_many_points", "at most 64"),
    # Coordinates.
    Case("nan_coordinate", b'{"image_id": "a", "prompts": [{"points": [[NaN, 1]], '
         b'"labels": [1]}]}', 400, "invalid_request", "finite"),
    Case("infinity_coordinate", b'{"image_id": "a", "prompts": [{"points": [[1, Infinity]],'
         b' "labels": [1]}]}', 400, "invalid_request", "finite"),
    Case("overflowing_coordinate", b'{"image_id": "a", "prompts": [{"box": [0, 0, 1, 1e999]}]}',
         400, "invalid_request", "finite"),
    Case("negative_coordinate", with_prompt(point_prompt([[-1, 5]], [1])), 400,
         "point_outside_image", "60x50"),
    Case("point_outside_image", with_prompt(point_prompt([[500, 5]], [1])), 400,
         "point_outside_image", "[500.0, 5.0]"),
    Case("coordinate_as_string", with_prompt({"points": [["1", 2]], "labels": [1]}), 400,
         "invalid_request", "points[0]"),
    Case("coordinate_as_bool", with_prompt({"points": [[True, 2]], "labels": [1]}), 400,
         "invalid_request", "points[0]"),
    Case("point_with_three_numbers", with_prompt({"points": [[1, 2, 3]], "labels": [1]}), 400,
         "invalid_request", "points[0]"),
    Case("points_without_labels", with_prompt({"points": [[1, 2]]}), 400, "invalid_request",
         "together"),
    Case("labels_length_mismatch", with_prompt({"points": [[1, 2]], "labels": [1, 0]}), 400,
         "invalid_request", "1 points but 2 labels"),
    Case("label_2", with_prompt(point_prompt([[1, 2]], [2])), 400, "invalid_request",
         "labels[0]"),
    Case("label_negative", with_prompt(point_prompt([[1, 2]], [-1])), 400, "invalid_request",
         "labels[0]"),
    Case("label_float", with_prompt({"points": [[1, 2]], "labels": [1.0]}), 400,
         "invalid_request", "labels[0]"),
    # Boxes.
    Case("box_three_numbers", with_prompt({"box": [0, 0, 1]}), 400, "invalid_request", "box"),
    Case("box_inverted", with_prompt({"box": [30, 0, 10, 20]}), 400, "invalid_request",
         "x0 <= x1"),
    Case("box_as_object", with_prompt({"box": {"x0": 0}}), 400, "invalid_request", "box"),
    Case("box_outside_image", with_prompt({"box": [0, 0, 61, 50]}), 400, "box_outside_image",
         "60x50"),
    Case("box_negative", with_prompt({"box": [-5, 0, 10, 10]}), 400, "box_outside_image"),
    # mask_input.
    Case("mask_input_unknown", with_prompt(dict(POINT, mask_input="0" * 32)), 404,
         "logits_not_cached", "mask_input"),
    Case("mask_input_not_a_string", with_prompt(dict(POINT, mask_input=7)), 400,
         "invalid_request", "mask_input"),
    Case("mask_input_of_another_image", mask_input_from_another_image, 400,
         "mask_input_mismatch", "mask_input"),
    # Other fields.
    Case("unknown_field", json_body(extra=1), 400, "unknown_field", "extra"),
    Case("unknown_prompt_field", with_prompt({"point": [[1, 2]], "box": [0, 0, 1, 1]}), 400,
         "unknown_field", "prompts[0]"),
    Case("multimask_not_bool", json_body(multimask="yes"), 400, "invalid_request", "multimask"),
    Case("output_unknown", json_body(output="jpeg"), 400, "invalid_request", "output"),
    # Content types.
    Case("content_type_xml", b"<a/>", 415, "unsupported_media_type", "application/xml",
         content_type="application/xml"),
    Case("content_type_octet_stream", SMALL_PNG, 415, "unsupported_media_type",
         "octet-stream", content_type="application/octet-stream"),
    Case("content_type_form", b"image=abc", 415, "unsupported_media_type", "form",
         content_type="application/x-www-form-urlencoded"),
    Case("content_type_multipart", b'--XX\r\nContent-Disposition: form-data; name="body"\r\n\r\n'
         b"{}\r\n--XX--\r\n", 415, "unsupported_media_type", "multipart",
         content_type="multipart/form-data; boundary=XX"),
    Case("json_sent_as_image_png", with_prompt(POINT), 400, "invalid_image",
         content_type="image/png"),
    # JSON's edges (issue 32): null is absent, a byte-order mark is allowed, text is not JSON.
    Case("json_with_byte_order_mark", b"\xef\xbb\xbf" + with_prompt(POINT), 200, None),
    Case("grpc_json_with_byte_order_mark", b"\xef\xbb\xbf" + with_prompt(POINT), "OK", None,
         over="grpc"),
    Case("null_fields_are_absent", json_body(prompts=[dict(POINT, box=None, mask_input=None)],
                                             multimask=None, best_only=None, output=None,
                                             everything=None, image_id=None), 200, None),
    Case("content_type_text_plain", with_prompt(POINT), 415, "unsupported_media_type",
         "text/plain", content_type="text/plain"),
    Case("unknown_field_named_by_a_megabyte", json_body(**{"x" * 1_000_000: 1}), 400,
         "unknown_field", "unknown field(s) ['xxxxxxxxxx"),
    Case("box_of_100000_numbers", with_prompt({"box": list(range(100_000))}), 400,
         "invalid_request", "(100000 items)"),
    Case("image_1x600", json_body(png_bytes(np.zeros((1, 600, 3), np.uint8))), 400,
         "image_too_narrow", "600x1"),
    Case("everything_crop_layer_of_no_masks", json_body(everything={"crop_n_layers": 1,
                                                                    "points_per_side": 4}),
         200, None),
    # Refused by TorchServe's frontend before the handler: these bodies are the frontend's.
    Case("oversized_body_65_mib", lambda _: oversized_body(), 413, None, frontend=True),
    Case("unknown_model", with_prompt(POINT), 404, None, "no_such_model", model="no_such_model",
         frontend=True),
    # Configured limits (the sam_limits archive's handler: section) through the server.
    Case("limits_image_bytes", lambda _: json_body(png_bytes(noisy(90, 90, seed=5))), 413,
         "image_too_large", "the limit is 20000", model=LIMITS_MODEL),
    Case("limits_image_pixels", lambda _: json_body(encoded(Image.new("L", (101, 100)), "PNG")),
         413, "image_too_large", "the limit is 10000", model=LIMITS_MODEL),
    Case("limits_prompts", json_body(prompts=[POINT] * 5), 400, "too_many_prompts", "at most 4",
         model=LIMITS_MODEL),
    Case("limits_points", with_prompt(point_prompt([[1, 1]] * 4, [1] * 4)), 400,
         "too_many_points", "at most 3", model=LIMITS_MODEL),
    Case("limits_mask_pixels", lambda _: json_body(png_bytes(make_image(60, 60, seed=6)),
                                                 prompts=[POINT] * 3), 400,
         "too_many_mask_pixels", "at most 21600", model=LIMITS_MODEL),
    Case("limits_response_bytes", lambda _: json_body(png_bytes(make_image(60, 60, seed=6)),
                                                    prompts=[POINT] * 2), 413,
         "response_too_large", str(MIN_RESPONSE_BYTES), model=LIMITS_MODEL),
    Case("limits_prompts_exactly", json_body(prompts=[{"box": [k, 0, 59, 49]} for k in range(
        LIMITS["max_prompts"])], multimask=False, output="none"), 200, None, model=LIMITS_MODEL),
    Case("limits_within_all", lambda _: json_body(png_bytes(make_image(60, 60, seed=6)),
                                                prompts=[POINT] * 2, output="none"), 200, None,
         model=LIMITS_MODEL),
    # Over gRPC: the handler's JSON arrives as the prediction whatever its status.
    Case("grpc_malformed_json", b"{broken", "OK", "invalid_json", over="grpc"),
    Case("grpc_json_null", b"null", "OK", "invalid_request", "got null", over="grpc"),
    Case("grpc_missing_image", b'{"prompts": []}', "OK", "missing_image", over="grpc"),
    Case("grpc_invalid_base64", b'{"image": "%%%"}', "OK", "invalid_base64", over="grpc"),
    Case("grpc_bomb", lambda _: json_body(header_bomb()), "OK", "image_too_large", "50000x50000",
         over="grpc"),
    Case("grpc_thousands_of_prompts", json_body(prompts=[POINT] * 3000), "OK",
         "too_many_prompts", over="grpc"),
    Case("grpc_nan_coordinate", b'{"image_id": "a", "prompts": [{"box": [NaN, 0, 1, 1]}]}',
         "OK", "invalid_request", "finite", over="grpc"),
    Case("grpc_one_pixel_image", json_body(ONE_PIXEL_PNG, prompts=[{"box": [0, 0, 1, 1]}]),
         "OK", None, over="grpc"),
    Case("grpc_oversized_message", lambda _: oversized_body(), "CANCELLED", None, over="grpc",
         frontend=True),
]
# fmt: on

MATRIX_LOG: list[dict[str, Any]] = []  # one entry per case run: name, as_expected, server_error


@pytest.fixture(scope="module")
def limits_model(server, rest, checkpoints):
    """sam_micro with tight limits in its archive's handler: section."""
    archive = archive_in_store(server, checkpoints["sam_micro"], LIMITS_MODEL, LIMITS)
    rest.register_model(archive, LIMITS_MODEL, initial_workers=1)
    yield LIMITS_MODEL
    rest.unregister_model(LIMITS_MODEL)


@pytest.fixture(scope="module")
def matrix_worker(server, rest) -> int:
    """The PID of the ``sam`` worker when the matrix starts: it must survive the matrix."""
    return worker_process(server, rest, MODEL)[0]


def run_case(case: Case, data: bytes, server, grpc_client: GrpcClient) -> tuple:
    """(status, content type, raw body) of one case over its transport."""
    if case.over == "grpc":
        client = grpc_client
        if case.frontend:  # let the client send it, so the server is what refuses it
            client = GrpcClient(
                "127.0.0.1",
                PORTS.grpc_inference,
                PORTS.grpc_management,
                keys=server.keys(),
                max_message_bytes=128 * MIB,
            )
        try:
            return "OK", None, client.predict_raw(case.model, data)
        except SamServeError as err:
            return err.code, None, str(err).encode()
        finally:
            if client is not grpc_client:
                client.close()
    headers = dict(server.keys().header("inference"))
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    response = requests.post(
        f"{server.inference_url}/predictions/{case.model}",
        data=data,
        headers=headers,
        timeout=300,
    )
    return response.status_code, response.headers.get("content-type"), response.content


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_matrix(case, server, rest, grpc_client, reference, matrix_worker, request):
    if case.model == LIMITS_MODEL:
        request.getfixturevalue("limits_model")
    entry = {"name": case.name, "as_expected": False, "server_error": False}
    MATRIX_LOG.append(entry)
    data = case.body(rest) if callable(case.body) else case.body
    peak_before = rss_bytes(matrix_worker, "VmHWM")
    status, content_type, raw = run_case(case, data, server, grpc_client)
    if "bomb" in case.name:  # refused from the header: the worker's peak memory is unmoved
        assert rss_bytes(matrix_worker, "VmHWM") - peak_before < 256 * MIB
    entry["server_error"] = (
        (isinstance(status, int) and status >= 500)
        or status in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS")
        or b'"internal_error"' in raw
    )
    assert status == case.status, raw[:500]

    if case.name.startswith("oversized_body"):
        # TorchServe's frontend refuses a body over max_request_size with a bare 413: no
        # JSON can come back, the handler never sees the request (docs/protocol.md).
        assert raw == b""
    elif case.over == "grpc" and case.frontend:
        assert b"RST_STREAM" in raw  # gRPC's own refusal: the stream is reset
    elif case.frontend:  # TorchServe's JSON error: {"code", "type", "message"}
        error = json.loads(raw)
        assert error["code"] == case.status and case.names in error["message"]
    else:
        if case.over == "rest":
            assert content_type == J
        body = json.loads(raw)
        if case.code is None:
            want = expected_answer(reference, data, case.content_type or J)
            assert answer_mismatch(body, want) is None, answer_mismatch(body, want)
        else:
            assert set(body) == {"error"}, body
            assert len(raw) < 2048, len(raw)  # messages quote a short prefix of any value
            assert body["error"]["code"] == case.code, body
            assert case.names in body["error"]["message"], body["error"]["message"]
    entry["as_expected"] = True


def test_after_the_matrix_the_server_is_healthy_and_correct(
    server, rest, reference, matrix_worker, capsys
):
    ran = len(MATRIX_LOG)
    good = sum(e["as_expected"] for e in MATRIX_LOG)
    errors = [e["name"] for e in MATRIX_LOG if e["server_error"]]
    with capsys.disabled():
        print(f"\nbad-input matrix: {ran} cases, {good} as expected, {len(errors)} 5xx")
    assert len(CASES) >= 30
    assert not errors, errors
    assert good == ran
    # Same worker process as before the matrix: nothing crashed or restarted it.
    assert worker_process(server, rest, MODEL)[0] == matrix_worker
    assert rest.ping() == "Healthy"
    body = segment_request(
        png_bytes(make_image(90, 120, seed=23)),
        prompts=[point_prompt([[40, 50]], [1]), {"box": [10, 10, 100, 80]}],
    )
    got = rest.predict(MODEL, body)
    assert answer_mismatch(got, expected_answer(reference, body, J)) is None


# --- 2. concurrency ----------------------------------------------------------------------

CLIENTS, REQUESTS_EACH = 6, 8


def test_concurrent_clients_get_their_own_correct_answers(server, rest, reference, capsys):
    """CLIENTS threads x REQUESTS_EACH requests, cold (new image), warm by image_id and
    warm by image bytes, each answer checked against the in-process model."""
    plans = []  # per client: [(body, expected answer)]
    for c in range(CLIENTS):
        images = [
            png_bytes(make_image(70 + 3 * c, 90 + 2 * k, seed=100 + 10 * c + k)) for k in range(2)
        ]
        ids = [hashlib.sha256(image).hexdigest() for image in images]
        plan = []
        for j in range(REQUESTS_EACH):
            k = j % 2
            prompt = point_prompt([[5 + 4 * c + j, 9 + 3 * j]], [1])
            if j >= 2 and j % 4 in (2, 3):
                body = segment_request(image_id=ids[k], prompts=[prompt])  # warm, by id
            else:
                body = segment_request(images[k], prompts=[prompt])  # cold first, then warm
            want = expected_answer(reference, segment_request(images[k], prompts=[prompt]), J)
            plan.append((body, want))
        plans.append(plan)

    answers: list[list[Any]] = [[None] * REQUESTS_EACH for _ in range(CLIENTS)]
    sessions = [
        RestClient(server.inference_url, server.management_url, keys=server.keys())
        for _ in range(CLIENTS)
    ]

    def client(c: int) -> None:
        for j, (body, _) in enumerate(plans[c]):
            try:
                answers[c][j] = sessions[c].predict(MODEL, body)
            except Exception as err:  # counted as lost below
                answers[c][j] = err

    _, elapsed = run_at_once([functools.partial(client, c) for c in range(CLIENTS)])
    lost = [
        (c, j, a)
        for c in range(CLIENTS)
        for j, a in enumerate(answers[c])
        if not isinstance(a, dict)
    ]
    wrong = [
        (c, j, answer_mismatch(a, plans[c][j][1]))
        for c in range(CLIENTS)
        for j, a in enumerate(answers[c])
        if isinstance(a, dict) and answer_mismatch(a, plans[c][j][1])
    ]
    with capsys.disabled():
        print(
            f"\nconcurrency: {CLIENTS} x {REQUESTS_EACH}, {len(lost)} lost, "
            f"{len(wrong)} wrong ({elapsed:.1f} s)"
        )
    assert not lost, lost
    assert not wrong, wrong
    for c in range(CLIENTS):  # the cold requests encoded, every later one hit the cache
        assert [answers[c][j]["cached"] for j in range(REQUESTS_EACH)] == [False, False] + [
            True
        ] * (REQUESTS_EACH - 2)


# --- 3. a killed worker ------------------------------------------------------------------


def test_killed_worker_is_restarted_and_requests_succeed_again(
    server, rest, reference, registered, capsys
):
    model = registered("sam.mar", "sam_faults")
    jobs = []
    for k in range(6):
        image = png_bytes(make_image(60 + 5 * k, 80, seed=200 + k))
        body = segment_request(image, prompts=[point_prompt([[10 + k, 20]], [1])])
        jobs.append((body, expected_answer(reference, body, J)))
    log: list[dict[str, Any]] = []  # start, end, ok, error per request
    lock = threading.Lock()
    stop = threading.Event()

    def load(offset: int) -> None:
        session = RestClient(server.inference_url, server.management_url, keys=server.keys())
        n = offset
        while not stop.is_set():
            body, want = jobs[n % len(jobs)]
            n += 1
            entry = {"start": time.monotonic()}
            try:
                got = session.predict(model, body)
                entry["ok"] = True
                entry["wrong"] = answer_mismatch(got, want)
            except SamServeError as err:
                entry["ok"], entry["error"] = False, f"{type(err).__name__}: {err}"
            entry["end"] = time.monotonic()
            with lock:
                log.append(entry)

    def successes(after: float) -> int:
        with lock:
            return sum(1 for e in log if e["ok"] and e["start"] > after)

    pid, worker_id = worker_process(server, rest, model)
    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: successes(0) >= 4, 120, "load running")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        poll(lambda: not Path(f"/proc/{pid}").exists(), 30, "killed worker gone")

        def new_worker_ready():
            workers = rest.describe_model(model)[0]["workers"]
            ready = [w for w in workers if w["status"] == "READY" and int(w["pid"]) != pid]
            return ready[0] if ready else None

        new = poll(new_worker_ready, 120, "worker restarted", interval=0.1)
        ready_at = time.monotonic()
        poll(lambda: successes(ready_at) >= 4, 120, "requests succeed after restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    new_pid, _ = worker_process(server, rest, model)
    # Recovery: the first answer to a request sent after the kill (the new worker's).
    first_success = min(e["end"] for e in log if e["ok"] and e["start"] > killed_at)
    failed = [e for e in log if not e["ok"]]
    open_at_kill = [e for e in log if e["start"] < killed_at < e["end"]]
    wrong = [e["wrong"] for e in log if e["ok"] and e["wrong"]]
    with capsys.disabled():
        print(
            f"\nworker kill: SIGKILL to worker {worker_id} (pid {pid}) with {len(open_at_kill)} "
            f"requests open; TorchServe restarted it as pid {new_pid}, READY after "
            f"{ready_at - killed_at:.2f} s, first answer to a new request after "
            f"{first_success - killed_at:.2f} s; {len(failed)} failed (the batch the worker held), "
            f"{len(open_at_kill) - len(failed)} queued ones answered after the restart; "
            f"{sum(e['ok'] for e in log)} of {len(log)} requests succeeded, {len(wrong)} wrong"
        )
    assert new_pid == int(new["pid"]) != pid
    # Errors only for requests the kill caught: in flight when the worker died, or sent in
    # the moment before the frontend noticed (it still hands those to the dead worker's
    # batch: 507 "Worker died", seen once in CI); none once the new worker was READY.
    assert all(killed_at < e["end"] and e["start"] < ready_at for e in failed), failed
    assert len(failed) <= len(threads)
    # Every answer, before and after the restart, is the right one.
    assert not wrong, wrong
    assert rest.describe_model(model)[0]["workers"][0]["status"] == "READY"


# --- 4. bounded memory -------------------------------------------------------------------

# sam_micro with 8-pixel patches and 256 channels: 1 MiB embeddings (official SAM's are
# 4 MiB) that still take only ~60 ms to encode, so the cache's bound dominates growth.
# The cache holds each with its first-block projections: 2.5 MiB per image, 4 images.
WIDE = dataclasses.replace(
    spec_by_name("sam_micro"), name="sam_micro_wide", patch_size=8, prompt_embed_dim=256
)
CACHE_MB, LOGITS_MB = 10, 1
WARMUP, DISTINCT = 12, 40  # images before measuring (caches full); per phase, 10x the cache


def test_worker_memory_stays_within_the_cache_bound(
    server, rest, registered, tmp_path_factory, capsys
):
    checkpoint = tmp_path_factory.mktemp("wide") / "sam_micro_wide.pth"
    random_checkpoint(WIDE, checkpoint, seed=0)
    archive = archive_in_store(
        server,
        checkpoint,
        "sam_mem",
        # One torch thread: fewer malloc arenas, so less allocator noise in the RSS.
        {"embedding_cache_mb": CACHE_MB, "logits_cache_mb": LOGITS_MB, "torch_threads": 1},
        spec=WIDE,
    )
    model = registered(archive, "sam_mem")
    pid, _ = worker_process(server, rest, model)

    def stats() -> dict:
        return rest.describe_model(model, customized=True)[0]["customizedMetadata"]

    def send(seed: int) -> None:
        """A new image; every other one with a click, whose logits the server keeps."""
        image = png_bytes(make_image(48, 64, seed=seed))
        prompts = [POINT] if seed % 2 == 0 else []
        answer = rest.predict(model, segment_request(image, prompts=prompts))
        assert answer["cached"] is False and len(answer["results"]) == len(prompts)

    def phase(first_seed: int) -> list[int]:
        """DISTINCT new images; the worker's RSS after each (caches checked every 8)."""
        samples = []
        for seed in range(first_seed, first_seed + DISTINCT):
            send(seed)
            samples.append(rss_bytes(pid))
            if seed % 8 == 7:
                cache = stats()["embedding_cache"]
                assert cache["bytes"] <= cache["max_bytes"] and cache["entries"] <= capacity
        return samples

    # Warm-up fills the caches. Then two phases of as many new images each: an unbounded
    # cache would add DISTINCT embeddings per phase; a bounded one levels off, so the
    # second phase must stay within the first one's band (the allocator makes the RSS
    # wobble by a few MiB, and may settle in steps during the first phase).
    for seed in range(WARMUP):
        send(1000 + seed)
    embedding_bytes = stats()["embedding_cache"]["bytes"] // stats()["embedding_cache"]["entries"]
    capacity = stats()["embedding_cache"]["max_bytes"] // embedding_bytes
    first, second = phase(2000), phase(3000)
    final = stats()
    growth = max(second) - max(first)
    overhead = 16 * MIB  # allocator noise allowed on top of the full caches
    unbounded = DISTINCT * embedding_bytes  # what keeping every embedding would add per phase
    with capsys.disabled():
        print(
            f"\nmemory: {WARMUP + 2 * DISTINCT} distinct images ({2 * DISTINCT / capacity:.0f}x "
            f"the cache's {capacity} x {embedding_bytes // 1024} KiB); worker RSS "
            f"{min(first) / MIB:.1f}-{max(first) / MIB:.1f} MiB over the first {DISTINCT} "
            f"after warm-up, {min(second) / MIB:.1f}-{max(second) / MIB:.1f} MiB over the "
            f"next {DISTINCT} ({growth / MIB:+.1f} MiB, allowed {overhead / MIB:.0f} MiB; "
            f"unbounded would add {unbounded / MIB:.0f} MiB); cache "
            f"{final['embedding_cache']['bytes']} of {final['embedding_cache']['max_bytes']} "
            f"bytes, {final['embedding_cache']['evictions']} evictions"
        )
    assert embedding_bytes == 256 * 32 * 32 * 4 + 3 * 32 * 32 * 128 * 4 and capacity == 4
    assert DISTINCT >= 10 * capacity
    assert final["embedding_cache"]["evictions"] >= 2 * DISTINCT
    assert final["logits_cache"]["bytes"] <= final["logits_cache"]["max_bytes"]
    assert final["logits_cache"]["evictions"] > 0
    assert final["encoder_runs"] == WARMUP + 2 * DISTINCT
    assert unbounded > 2 * overhead  # the check below would catch an unbounded cache
    assert growth <= overhead


# --- 5. tokens ---------------------------------------------------------------------------


def refused(response: requests.Response) -> bool:
    return response.status_code == 400 and "InvalidKeyException" in response.text


def test_every_api_refuses_missing_and_wrong_tokens(server, rest, grpc_client, capsys):
    keys = server.keys()
    wrong = {"Authorization": "Bearer not-the-key"}
    inference_only = keys.header("inference")
    management_only = keys.header("management")
    inf, mgmt = server.inference_url, server.management_url
    body = json_body(prompts=[POINT])
    calls = [  # (method, url, params, headers that must be refused)
        ("GET", f"{inf}/ping", None, [{}, wrong, management_only]),
        ("POST", f"{inf}/predictions/{MODEL}", None, [{}, wrong, management_only]),
        ("GET", f"{mgmt}/models", None, [{}, wrong, inference_only]),
        ("GET", f"{mgmt}/models/{MODEL}", None, [{}, wrong, inference_only]),
        (
            "POST",
            f"{mgmt}/models",
            {"url": "sam.mar", "model_name": "intruder", "initial_workers": 1},
            [{}, wrong, inference_only],
        ),
        ("PUT", f"{mgmt}/models/{MODEL}", {"min_worker": 3}, [{}, wrong, inference_only]),
        ("PUT", f"{mgmt}/models/{MODEL}/1.0/set-default", None, [{}, wrong, inference_only]),
        ("DELETE", f"{mgmt}/models/{MODEL}", None, [{}, wrong, inference_only]),
        # The token API (regenerates keys) takes a third key of its own.
        (
            "GET",
            f"{mgmt}/token",
            {"type": "inference"},
            [{}, wrong, inference_only, management_only],
        ),
    ]
    count = 0
    for method, url, params, header_sets in calls:
        for headers in header_sets:
            response = requests.request(
                method,
                url,
                params=params,
                timeout=60,
                data=body,
                headers={**headers, "Content-Type": J},
            )
            assert refused(response), (method, url, headers, response.status_code, response.text)
            count += 1

    anonymous = Keys()
    bad = Keys("wrong-inference", "wrong-management")
    swapped = Keys(inference=keys.management, management=keys.inference)
    for grpc_keys in (anonymous, bad, swapped):
        with GrpcClient(
            "127.0.0.1", PORTS.grpc_inference, PORTS.grpc_management, keys=grpc_keys
        ) as g:
            for call in (
                g.ping,
                lambda g=g: g.predict(MODEL, body),
                g.list_models,
                lambda g=g: g.describe_model(MODEL),
                lambda g=g: g.register_model("sam.mar", "intruder"),
                lambda g=g: g.scale_workers(MODEL, 3),
                lambda g=g: g.unregister_model(MODEL),
            ):
                with pytest.raises(AuthError):
                    call()
                count += 1

    # Nothing the refused calls asked for happened.
    names = [m["modelName"] for m in rest.list_models()["models"]]
    assert MODEL in names and "intruder" not in names
    assert len(rest.describe_model(MODEL)[0]["workers"]) == 1
    assert grpc_client.ping() == "Healthy" and rest.ping() == "Healthy"

    # TorchServe 0.12's metrics API takes no token (its one open API): config.properties
    # keeps it on loopback, with every other listener.
    metrics = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert metrics.status_code == 200
    config = (REPO / "config.properties").read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.search(rf"^{key}=http://127\.0\.0\.1:\d+$", config, re.MULTILINE), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert re.search(rf"^{key}=127\.0\.0\.1$", config, re.MULTILINE), key
    settings = dict(
        line.split("=", 1) for line in config.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings.get("disable_token_authorization", "false") == "false"
    assert settings["enable_model_api"] == "true" and settings["allowed_urls"] == "^$"
    with capsys.disabled():
        print(
            f"\ntokens: {count} calls without, with a wrong or with the other API's token, "
            "all refused (REST inference, management and token API; gRPC inference and "
            "management); the metrics API is token-free in TorchServe 0.12, on loopback"
        )


def test_registration_only_from_the_model_store(server, rest):
    """allowed_urls matches no URL: with the management key, still no download and no
    archive from elsewhere on disk; a bare name in model_store registers (conftest)."""
    outside = server.workdir / "elsewhere" / "sam.mar"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes((server.model_store / "sam.mar").read_bytes())
    for url in (
        "https://example.com/sam.mar",
        "http://127.0.0.1:1/sam.mar",
        f"file://{outside}",
        f"file://{server.model_store / 'sam.mar'}",
        "../elsewhere/sam.mar",
    ):
        with pytest.raises(SamServeError) as caught:
            rest.register_model(url, "intruder", initial_workers=1)
        assert caught.value.status == 404, (url, caught.value)
    assert "intruder" not in [m["modelName"] for m in rest.list_models()["models"]]


# --- 6. one request cannot kill a worker or fail its batch-mates (issue 32) -------------

BATCH_MODEL, BUDGET_MODEL = "sam_batch", "sam_budget"
# The frontend takes a batch's first request, then waits up to maxBatchDelay for the rest
# of batchSize (Model.pollInferJob in pytorch/serve's frontend/server/.../wlm/Model.java):
# BATCH_SIZE requests sent together and answered well within the delay shared a batch.
BATCH_SIZE, BATCH_DELAY_MS = 2, 30_000
BUDGET = {
    "max_everything_points": 1_000_000,
    "max_everything_crops": 100,
    "max_everything_seconds": 2.0,
}
UNBOUNDED_EVERYTHING = {  # issue 32's request that held a worker past the response timeout
    "points_per_side": 64,
    "crop_n_layers": 2,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}
NAIVE_HANDLER = REPO / "scripts" / "naive_handler.py"


@pytest.fixture(scope="module")
def batch_models(server, rest, grpc_client, checkpoints):
    """``sam.mar`` as ``sam_batch`` and a time-budget archive as ``sam_budget``, both
    registered with batches of BATCH_SIZE and a BATCH_DELAY_MS wait to fill them (the
    registration's values win over the archive's, ModelManager.createModel)."""
    budget = archive_in_store(server, checkpoints["sam_micro"], BUDGET_MODEL, BUDGET)
    for archive, name in (("sam.mar", BATCH_MODEL), (budget, BUDGET_MODEL)):
        grpc_client.register_model(
            archive, name, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS
        )
    try:
        for name in (BATCH_MODEL, BUDGET_MODEL):
            (description,) = rest.describe_model(name)
            assert (description["batchSize"], description["maxBatchDelay"]) == (
                BATCH_SIZE,
                BATCH_DELAY_MS,
            )
        yield
    finally:
        for name in (BATCH_MODEL, BUDGET_MODEL):
            rest.unregister_model(name)


Outcome = tuple[Any, bytes]  # (HTTP status or gRPC status name, the raw body)


def rest_send(server, model: str, data: bytes, content_type: str = J) -> Outcome:
    response = requests.post(
        f"{server.inference_url}/predictions/{model}",
        data=data,
        headers={**server.keys().header("inference"), "Content-Type": content_type},
        timeout=300,
    )
    return response.status_code, response.content


def grpc_send(grpc_client: GrpcClient, model: str, data: bytes) -> Outcome:
    return "OK", grpc_client.predict_raw(model, data, timeout=300)


def stream_predictions(server, grpc_client: GrpcClient, model: str, data: bytes) -> list[bytes]:
    """The messages of one gRPC ``StreamPredictions`` call (``grpc.RpcError`` if it fails)."""
    stubs = grpc_client.stubs
    options = [("grpc.max_receive_message_length", 128 * MIB)]
    with grpc.insecure_channel(f"127.0.0.1:{PORTS.grpc_inference}", options=options) as channel:
        stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = stubs.inference_pb2.PredictionsRequest(model_name=model, input={"body": data})
        call = stub.StreamPredictions(
            request, metadata=server.keys().metadata("inference"), timeout=120
        )
        return [bytes(reply.prediction) for reply in call]


def stream_send(server, grpc_client: GrpcClient, model: str, data: bytes) -> Outcome:
    (message,) = stream_predictions(server, grpc_client, model, data)  # exactly one, last
    return "OK", message


def run_at_once(tasks: list[Callable[[], Any]]) -> tuple[list[Any], float]:
    """Start ``tasks`` together, one thread each, behind a barrier; what each returned or
    raised, and the seconds from the first start to the last end."""
    outcomes: list[Any] = [None] * len(tasks)
    start = threading.Barrier(len(tasks))

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = tasks[i]()
        except Exception as err:  # the caller's asserts report it
            outcomes[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tasks))]
    tic = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outcomes, time.monotonic() - tic


def in_one_batch(sends: list[Callable[[], Outcome]]) -> list[Outcome]:
    """Run ``sends`` (BATCH_SIZE of them) at once; their outcomes, checked to have come
    back well within the batch delay, so from one batch."""
    assert len(sends) == BATCH_SIZE
    outcomes, elapsed = run_at_once(sends)
    assert all(isinstance(o, tuple) for o in outcomes), outcomes
    assert elapsed < BATCH_DELAY_MS / 1000 / 2, f"{elapsed:.1f} s: not one batch"
    return outcomes


def cold_click(seed: int) -> bytes:
    """A valid request on an image no test sent before (its encoder runs in the batch)."""
    image = png_bytes(make_image(60 + seed % 7, 80, seed=seed))
    return json.dumps(segment_request(image, prompts=[point_prompt([[30, 20]], [1])])).encode()


def numbers(count: int, number: bytes = b"1e15") -> bytes:
    """A JSON array of ``count`` copies of ``number``, written directly: 6 bytes each."""
    return b"[" + b", ".join([number] * count) + b"]"


@functools.cache
def huge_box_body() -> bytes:
    """Issue 32's 24 MB body: a box of 4 million numbers, each quoted back as 20 chars."""
    return b'{"image_id": "a", "prompts": [{"box": ' + numbers(4_000_000) + b"}]}"


@functools.cache
def huge_output_body() -> bytes:
    return b'{"image_id": "a", "output": ' + numbers(4_000_000) + b"}"


def everything_body(image: bytes, params: dict) -> bytes:
    return json.dumps({"image": b64(image), "everything": params}).encode()


@dataclass(frozen=True)
class BatchCase:
    """A request that once failed its worker or its batch (issue 32), and its 4xx now.

    ``over``: "rest", "grpc" or "stream" (gRPC StreamPredictions); ``names``: text the
    error message must contain."""

    name: str
    body: Callable[[], bytes]
    status: int
    code: str
    names: str
    over: str = "rest"
    content_type: str = J
    model: str = BATCH_MODEL


NARROW_PNG = png_bytes(np.zeros((2, 3000, 3), dtype=np.uint8))
BATCH_CASES = [
    BatchCase("huge_box_rest", huge_box_body, 400, "invalid_request", "(4000000 items)"),
    BatchCase("huge_output_grpc", huge_output_body, 400, "invalid_request", "output", over="grpc"),
    BatchCase(
        "image_2x3000",
        lambda: json_body(NARROW_PNG, prompts=[POINT]),
        400,
        "image_too_narrow",
        "3000x2",
    ),
    BatchCase(
        "image_2x3000_grpc",
        lambda: json_body(NARROW_PNG),
        400,
        "image_too_narrow",
        "3000x2",
        over="grpc",
    ),
    BatchCase(
        "everything_crop_layer_without_points",
        lambda: everything_body(
            SMALL_PNG,
            {"points_per_side": 4, "crop_n_layers": 1, "crop_n_points_downscale_factor": 8},
        ),
        400,
        "invalid_request",
        "leaves no point",
    ),
    BatchCase(
        "everything_empty_crop_of_1x1",
        lambda: everything_body(ONE_PIXEL_PNG, {"crop_n_layers": 1}),
        400,
        "invalid_request",
        "empty crop",
    ),
    BatchCase(
        "everything_unbounded",
        lambda: everything_body(png_bytes(make_image(480, 640, seed=24)), UNBOUNDED_EVERYTHING),
        400,
        "too_much_work",
        "max_everything_points",
    ),
    BatchCase(
        "everything_past_the_time_budget",
        lambda: everything_body(png_bytes(make_image(480, 640, seed=24)), UNBOUNDED_EVERYTHING),
        413,
        "time_budget_exceeded",
        "2.0 s (max_everything_seconds)",
        model=BUDGET_MODEL,
    ),
    BatchCase(
        "text_plain",
        lambda: with_prompt(POINT),
        415,
        "unsupported_media_type",
        "text/plain",
        content_type="text/plain",
    ),
    BatchCase(
        "malformed_json_stream", lambda: b"{broken", 400, "invalid_json", "JSON", over="stream"
    ),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c.name for c in BATCH_CASES])
def test_a_bad_request_fails_alone_and_its_worker_lives(
    case, server, rest, grpc_client, reference, batch_models
):
    seed = 300 + BATCH_CASES.index(case)
    good = cold_click(seed)
    want = expected_answer(reference, good, J)
    pid, _ = worker_process(server, rest, case.model)
    bad = case.body()
    sends = {
        "rest": lambda: rest_send(server, case.model, bad, case.content_type),
        "grpc": lambda: grpc_send(grpc_client, case.model, bad),
        "stream": lambda: stream_send(server, grpc_client, case.model, bad),
    }
    (status, raw), (good_status, good_raw) = in_one_batch(
        [sends[case.over], lambda: rest_send(server, case.model, good)]
    )
    assert status == (case.status if case.over == "rest" else "OK"), raw[:300]
    assert len(raw) < 2048, len(raw)
    error = json.loads(raw)["error"]
    assert error["code"] == case.code and case.names in error["message"], error
    assert good_status == 200, good_raw[:300]
    assert answer_mismatch(json.loads(good_raw), want) is None
    assert worker_process(server, rest, case.model)[0] == pid  # the same worker, alive


def test_a_request_past_its_time_budget_holds_the_worker_only_that_long(
    server, rest, reference, batch_models, capsys
):
    """Clicks sent while an unbounded segment everything runs are answered once its time
    budget is spent (not after the response timeout, not image_not_cached), by the same
    worker, its cache intact."""
    model = BUDGET_MODEL
    image = png_bytes(make_image(480, 640, seed=25))
    precompute = rest.predict(model, segment_request(image))
    pid, _ = worker_process(server, rest, model)
    everything = everything_body(image, UNBOUNDED_EVERYTHING)
    clicks = [
        json.dumps(
            segment_request(image_id=precompute["image_id"], prompts=[point_prompt([[x, 90]], [1])])
        ).encode()
        for x in (100, 300)
    ]
    expected = [
        expected_answer(
            reference, segment_request(image, prompts=[point_prompt([[x, 90]], [1])]), J
        )
        for x in (100, 300)
    ]
    first: list[Outcome] = []
    tic = time.monotonic()
    runs = threading.Thread(
        target=lambda: first.extend(
            in_one_batch(
                [
                    lambda: rest_send(server, model, everything),
                    lambda: rest_send(server, model, cold_click(400)),
                ]
            )
        )
    )
    runs.start()
    time.sleep(0.5)  # the everything request's batch is running
    answers = in_one_batch([lambda body=body: rest_send(server, model, body) for body in clicks])
    waited = time.monotonic() - tic
    runs.join(timeout=300)
    (status, raw), (click_status, _) = first
    assert status == 413 and json.loads(raw)["error"]["code"] == "time_budget_exceeded"
    assert click_status == 200
    for (status, raw), want in zip(answers, expected):
        assert status == 200, raw[:300]
        got = json.loads(raw)
        assert got["cached"] is True and answer_mismatch(got, want) is None
    assert worker_process(server, rest, model)[0] == pid
    with capsys.disabled():
        print(
            f"\ntime budget: clicks sent during an unbounded segment everything answered "
            f"after {waited:.1f} s (budget {BUDGET['max_everything_seconds']} s), by the "
            "same worker, from its cache"
        )


def test_stream_predictions_answers_once_marked_last_and_the_worker_lives(
    server, rest, grpc_client, reference
):
    """Every reply to a gRPC request carries ts_stream_next "false": a StreamPredictions
    call gets one message, the whole answer, and ends; a REST reply carries no such header
    (on REST it would turn the reply into a chunked stream, RestJob.responseInference)."""
    body = cold_click(500)
    want = expected_answer(reference, body, J)
    pid, _ = worker_process(server, rest, MODEL)
    messages = stream_predictions(server, grpc_client, MODEL, body)
    assert len(messages) == 1
    assert answer_mismatch(json.loads(messages[0]), want) is None
    (error,) = stream_predictions(server, grpc_client, MODEL, b'{"image_id": "0"}')
    assert json.loads(error)["error"]["code"] == "image_not_cached"
    assert answer_mismatch(json.loads(grpc_client.predict_raw(MODEL, body)), want) is None
    status, raw = rest_send(server, MODEL, body)
    assert status == 200 and answer_mismatch(json.loads(raw), want) is None
    response = requests.post(
        f"{server.inference_url}/predictions/{MODEL}",
        data=body,
        headers={**server.keys().header("inference"), "Content-Type": J},
        timeout=60,
    )
    assert response.status_code == 200 and "ts_stream_next" not in response.headers
    assert worker_process(server, rest, MODEL)[0] == pid


def test_torchserve_drops_a_worker_whose_stream_reply_lacks_ts_stream_next(
    server, rest, grpc_client, checkpoints, registered
):
    """The fact the handler's header rests on: TorchServe 0.12's frontend reads a
    StreamPredictions reply's ts_stream_next without a check
    (frontend/server/src/main/java/org/pytorch/serve/job/GRPCJob.java, ``response``), so
    a handler that does not set it (the benchmark's naive one) loses its worker."""
    if not (server.model_store / "sam_naive.mar").exists():
        build_archive(
            spec_by_name("sam_micro"),
            checkpoints["sam_micro"],
            server.model_store,
            "sam_naive",
            handler=NAIVE_HANDLER,
        )
    model = registered("sam_naive.mar", "sam_naive")
    pid, _ = worker_process(server, rest, model)
    with pytest.raises(grpc.RpcError):
        stream_predictions(server, grpc_client, model, cold_click(600))
    poll(lambda: not Path(f"/proc/{pid}").exists(), 60, "the naive worker dropped")
