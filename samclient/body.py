"""Request and response bodies of the samserve protocol (docs/protocol.md), client side."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import orjson

from .errors import InvalidResponseError


def point_prompt(
    points: Sequence[Sequence[float]], labels: Sequence[int], box: Sequence[float] | None = None
) -> dict[str, Any]:
    """A prompt from XY points (original-image pixels) with labels 1/0, and maybe a box."""
    prompt: dict[str, Any] = {"points": [list(p) for p in points], "labels": list(labels)}
    if box is not None:
        prompt["box"] = list(box)
    return prompt


def segment_request(
    image: bytes | None = None,
    image_id: str | None = None,
    prompts: Sequence[dict[str, Any]] | None = None,
    multimask: bool = True,
    output: str = "rle",
    everything: dict[str, Any] | None = None,
    best_only: bool = False,
    page: int | None = None,
    intensity_range: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A JSON request: encoded image bytes (sent as base64) or an ``image_id``, and prompts
    or ``everything`` (segment-everything parameters, ``{}`` for SAM's defaults).

    With neither it is a pre-compute request that only caches the embedding. ``page``
    (of a multi-page TIFF) and ``intensity_range`` (the [low, high] sample values that
    become black and white in an image of more than 8 bits per sample) say how the
    server reads ``image``.
    """
    if (image is None) == (image_id is None):
        raise ValueError("give exactly one of image and image_id")
    body: dict[str, Any] = {"multimask": multimask, "output": output}
    if best_only:
        body["best_only"] = True
    if image is not None:
        body["image"] = base64.b64encode(image).decode("ascii")
    else:
        body["image_id"] = image_id
    if page is not None:
        body["page"] = page
    if intensity_range is not None:
        body["intensity_range"] = list(intensity_range)
    if prompts:
        body["prompts"] = list(prompts)
    if everything is not None:
        body["everything"] = dict(everything)
    return body


def decode_response(data: bytes | str, what: str) -> Any:
    """A response body's JSON; ``InvalidResponseError`` (code ``INVALID_JSON``, naming
    ``what``) if it is not JSON. orjson: an 8 MB list of masks decodes in 7 ms, not 9."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        preview = data[:200] if isinstance(data, str) else data[:200].decode(errors="replace")
        raise InvalidResponseError("INVALID_JSON", f"{what}: not JSON: {preview!r}") from exc
