"""The public JSON protocol: parse and validate requests, once, at the edge.

Request (``Content-Type: application/json``, or the same JSON as gRPC input ``body``)::

    {"image": "<base64>", "image_id": "<id>", "prompts": [{"points": [[x, y]], "labels": [1],
     "box": [x0, y0, x1, y1], "mask_input": "<logits_id>"}], "multimask": true,
     "output": "rle"}

A raw image body (``Content-Type: image/*``) is a pre-compute request. A field whose
value is ``null`` is treated as absent, as JSON APIs usually do. Everything below the
protocol receives typed, checked values and never parses JSON; error messages quote
what was sent only through ``errors.quote``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import RequestError, quote
from .everything import EverythingParams
from .images import DEFAULT_DECODE, DecodeOptions
from .masks import OUTPUT_FORMATS
from .settings import Settings

REQUEST_FIELDS = frozenset(
    {
        "image",
        "image_id",
        "page",
        "intensity_range",
        "prompts",
        "multimask",
        "best_only",
        "output",
        "everything",
    }
)
PROMPT_FIELDS = frozenset({"points", "labels", "box", "mask_input"})
MAX_ID_LENGTH = 128
# Past any page count a real stack has; bounds the number a client can make us seek to.
MAX_PAGE = 1_000_000


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (the handler settings of the same names)."""

    max_prompts: int
    max_points_per_prompt: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits ``settings`` set."""
        return cls(settings.max_prompts, settings.max_points_per_prompt)


@dataclass(frozen=True)
class PromptRequest:
    """One prompt as the client sent it (protocol names, original-image pixels).

    ``points`` is Nx2 float64 (X, Y) with ``labels`` N int64 in {0, 1}; ``box`` is
    4 float64 (X0, Y0, X1, Y1); ``mask_input`` is a ``logits_id`` from an earlier result.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: str | None = None


@dataclass(frozen=True)
class SegmentRequest:
    """A parsed request: an image (encoded bytes, decoded as ``decode`` says) or the
    ``image_id`` of a cached one."""

    image: bytes | None = None
    image_id: str | None = None
    decode: DecodeOptions = DEFAULT_DECODE
    prompts: tuple[PromptRequest, ...] = ()
    multimask: bool = True
    best_only: bool = False
    output: str = "rle"
    everything: EverythingParams | None = None


# Bounds of each segment-everything parameter a request may set (inclusive).
EVERYTHING_BOUNDS: dict[str, tuple[float, float]] = {
    "points_per_side": (1, 64),
    "points_per_batch": (1, 256),
    "pred_iou_thresh": (0.0, 1.0),
    "stability_score_thresh": (0.0, 1.0),
    "stability_score_offset": (0.0, 10.0),
    "box_nms_thresh": (0.0, 1.0),
    "crop_n_layers": (0, 2),
    "crop_nms_thresh": (0.0, 1.0),
    "crop_overlap_ratio": (0.0, 0.9),
    "crop_n_points_downscale_factor": (1, 8),
    "min_mask_region_area": (0, 100_000_000),
    "mask_nms_thresh": (0.0, 1.0),
}


def parse_request(body: Any, content_type: str | None, limits: Limits) -> SegmentRequest:
    """Parse one request body as TorchServe hands it over.

    ``body`` is a dict (TorchServe already decoded JSON), ``bytes``/``str`` (JSON that
    TorchServe did not decode, gRPC input, or a raw image), per ``content_type``:
    ``image/*`` means raw image bytes; ``application/json`` or no content type (gRPC)
    means JSON, UTF-8 with or without a byte-order mark.

    Raises:
      RequestError: 400 for malformed or invalid requests, 415 for other media types.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type.startswith("image/"):
        if not isinstance(body, (bytes, bytearray)) or not body:
            raise RequestError(
                400, "missing_image", "an image/* body must be non-empty image bytes"
            )
        return SegmentRequest(image=bytes(body))
    if media_type not in ("", "application/json"):
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {quote(content_type)} is not supported; send application/json "
            "or a raw image with Content-Type image/*",
        )
    return parse_json(_load_json(body), limits)


def _load_json(body: Any) -> Any:
    if isinstance(body, (dict, list, bool, int, float)):  # already decoded
        return body
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(400, "invalid_json", f"body is not UTF-8 text: {err}") from err
    if isinstance(body, str):
        # RFC 8259 lets a parser ignore a byte-order mark, and Windows tools write one.
        body = body.removeprefix("\ufeff")
    if not isinstance(body, str) or not body.strip():
        raise RequestError(400, "invalid_json", "the request body is empty")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:
        # ValueError covers JSONDecodeError and integers past Python's digit limit;
        # RecursionError, arrays/objects nested too deeply to parse.
        raise RequestError(400, "invalid_json", f"body is not valid JSON: {err}") from err


def parse_json(data: Any, limits: Limits) -> SegmentRequest:
    """Validate a decoded JSON request object into a ``SegmentRequest``."""
    if not isinstance(data, dict):
        raise _invalid("request", f"must be a JSON object, got {_type_name(data)}")
    _reject_unknown(data, REQUEST_FIELDS, "request")
    image = _field(data, "image", None)
    image = None if image is None else _parse_image(image)
    image_id = _field(data, "image_id", None)
    if image_id is not None and (
        not isinstance(image_id, str) or not image_id or len(image_id) > MAX_ID_LENGTH
    ):
        raise _invalid("image_id", f"must be a non-empty string of at most {MAX_ID_LENGTH} chars")
    if image is None and image_id is None:
        raise RequestError(400, "missing_image", "send 'image' (base64) or 'image_id'")
    decode = _parse_decode(data)
    if image is None and decode != DEFAULT_DECODE:
        raise _invalid(
            "request",
            "'page' and 'intensity_range' say how to read 'image'; an image_id already "
            "names one page and range",
        )

    prompts_data = _field(data, "prompts", [])
    if not isinstance(prompts_data, list):
        raise _invalid("prompts", f"must be a list, got {_type_name(prompts_data)}")
    if len(prompts_data) > limits.max_prompts:
        raise RequestError(
            400,
            "too_many_prompts",
            f"{len(prompts_data)} prompts; at most {limits.max_prompts} per request",
        )
    prompts = tuple(_parse_prompt(p, f"prompts[{i}]", limits) for i, p in enumerate(prompts_data))

    multimask = _flag(data, "multimask", True)
    best_only = _flag(data, "best_only", False)
    output = _field(data, "output", "rle")
    if not isinstance(output, str) or output not in OUTPUT_FORMATS:
        raise _invalid("output", f"must be one of {list(OUTPUT_FORMATS)}, got {quote(output)}")
    everything = _parse_everything(_field(data, "everything", None))
    if everything is not None and prompts:
        raise _invalid("request", "send 'prompts' or 'everything', not both")
    return SegmentRequest(
        image, image_id, decode, prompts, multimask, best_only, output, everything
    )


def _parse_decode(data: dict[str, Any]) -> DecodeOptions:
    """The request's ``page`` (an integer from 0) and ``intensity_range`` ([low, high],
    low < high), each absent or null for its default."""
    page = _field(data, "page", 0)
    if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page <= MAX_PAGE:
        raise _invalid("page", f"must be an integer in [0, {MAX_PAGE}], got {quote(page)}")
    value = _field(data, "intensity_range", None)
    if value is None:
        return DecodeOptions(page)
    low, high = _numbers(value, 2, "intensity_range")
    if not low < high:
        raise _invalid(
            "intensity_range", f"must be [low, high] with low < high, got {quote(value)}"
        )
    return DecodeOptions(page, (low, high))


def _field(data: dict[str, Any], name: str, default: Any) -> Any:
    """The value of field ``name`` of a JSON object, or ``default`` when it is absent or
    null: the one rule for null in the protocol."""
    value = data.get(name)
    return default if value is None else value


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    """The request's true/false field ``name``, or ``default`` when absent or null."""
    value = _field(data, name, default)
    if not isinstance(value, bool):
        raise _invalid(name, f"must be true or false, got {_type_name(value)}")
    return value


def _parse_everything(value: Any) -> EverythingParams | None:
    """Segment-everything parameters (``SamAutomaticMaskGenerator``'s), each bounded."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("everything", f"must be an object of parameters, got {_type_name(value)}")
    _reject_unknown(value, frozenset(EVERYTHING_BOUNDS), "everything")
    params = {}
    for name, given in value.items():
        if given is None:
            continue
        low, high = EVERYTHING_BOUNDS[name]
        where = f"everything.{name}"
        integer = EverythingParams.is_integer(name)
        if integer and (isinstance(given, bool) or not isinstance(given, int)):
            raise _invalid(where, f"must be an integer, got {quote(given)}")
        (number,) = _numbers([given], 1, where)
        if not low <= number <= high:
            raise _invalid(where, f"must be in [{low}, {high}], got {quote(given)}")
        params[name] = int(given) if integer else number
    return EverythingParams(**params)


def _parse_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _invalid("image", f"must be a base64 string, got {_type_name(value)}")
    if value.startswith("data:") and "," in value:  # data URL, as browsers produce
        value = value.split(",", 1)[1]
    try:
        # Line-wrapped (base64 tool, encodebytes) and unpadded base64 are common; accept them.
        compact = "".join(value.split())
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, "invalid_base64", f"'image' is not valid base64: {err}") from err
    if not data:
        raise RequestError(400, "missing_image", "'image' is empty")
    return data


def _parse_prompt(data: Any, where: str, limits: Limits) -> PromptRequest:
    if not isinstance(data, dict):
        raise _invalid(where, f"must be an object, got {_type_name(data)}")
    _reject_unknown(data, PROMPT_FIELDS, where)
    points = labels = box = None
    if data.get("points") is not None or data.get("labels") is not None:
        points, labels = _parse_points(data.get("points"), data.get("labels"), where, limits)
    if data.get("box") is not None:
        box = _parse_box(data["box"], f"{where}.box")
    if points is None and box is None:
        raise RequestError(
            400, "empty_prompt", f"{where} needs 'points' with 'labels', a 'box', or both"
        )
    mask_input = data.get("mask_input")
    if mask_input is not None and (
        not isinstance(mask_input, str) or not mask_input or len(mask_input) > MAX_ID_LENGTH
    ):
        raise _invalid(f"{where}.mask_input", "must be a logits_id string from an earlier result")
    return PromptRequest(points, labels, box, mask_input)


def _parse_points(
    points: Any, labels: Any, where: str, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(points, list) or not isinstance(labels, list):
        raise _invalid(where, "'points' and 'labels' must be given together, as lists")
    if not points:
        raise _invalid(f"{where}.points", "must not be empty")
    if len(points) != len(labels):
        raise _invalid(where, f"{len(points)} points but {len(labels)} labels")
    if len(points) > limits.max_points_per_prompt:
        raise RequestError(
            400,
            "too_many_points",
            f"{where} has {len(points)} points; at most {limits.max_points_per_prompt}",
        )
    coords = np.array(
        [_numbers(p, 2, f"{where}.points[{i}]") for i, p in enumerate(points)], dtype=np.float64
    )
    for i, label in enumerate(labels):
        if type(label) is not int or label not in (0, 1):
            raise _invalid(
                f"{where}.labels[{i}]", f"must be 1 (foreground) or 0, got {quote(label)}"
            )
    return coords, np.array(labels, dtype=np.int64)


def _parse_box(value: Any, where: str) -> np.ndarray:
    x0, y0, x1, y1 = _numbers(value, 4, where)
    if x1 < x0 or y1 < y0:
        raise _invalid(
            where, f"must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {quote(value)}"
        )
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def _numbers(value: Any, count: int, where: str) -> list[float]:
    """``count`` finite JSON numbers (not booleans) from a list."""
    if not isinstance(value, list) or len(value) != count:
        raise _invalid(where, f"must be a list of {count} numbers, got {quote(value)}")
    numbers = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _invalid(where, f"must contain finite numbers, got {quote(v)}")
        try:
            number = float(v)  # an int too large for a float raises OverflowError
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _invalid(where, f"must contain finite numbers, got {quote(v)}")
        numbers.append(number)
    return numbers


def _reject_unknown(data: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(
            400,
            "unknown_field",
            f"{where} has unknown field(s) {quote(unknown)}; allowed: {sorted(allowed)}",
        )


def _invalid(where: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"{where}: {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
