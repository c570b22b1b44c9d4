"""Tests for samserve.protocol: request parsing and validation at the edge."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from samserve.errors import MAX_MESSAGE_BYTES, MAX_QUOTE_CHARS, RequestError
from samserve.everything import EverythingParams
from samserve.images import DEFAULT_DECODE, DecodeOptions
from samserve.protocol import (
    EVERYTHING_BOUNDS,
    Limits,
    PromptRequest,
    SegmentRequest,
    parse_json,
    parse_request,
)
from samserve.settings import Settings

LIMITS = Limits.from_settings(Settings())
IMAGE = b"\x89PNG\r\n\x1a\n some image bytes \x00\xff"
IMAGE_B64 = base64.b64encode(IMAGE).decode("ascii")

FULL = {
    "image": IMAGE_B64,
    "prompts": [
        {"points": [[10, 20.5], [30, 40]], "labels": [1, 0]},
        {"box": [1, 2, 300.5, 400]},
        {"points": [[5, 6]], "labels": [1], "box": [0, 0, 10, 10], "mask_input": "logits-abc"},
    ],
    "multimask": False,
    "output": "png",
}


def check_full(request: SegmentRequest) -> None:
    assert isinstance(request, SegmentRequest)
    assert request.image == IMAGE
    assert request.image_id is None
    assert request.multimask is False
    assert request.output == "png"
    assert len(request.prompts) == 3
    assert all(isinstance(p, PromptRequest) for p in request.prompts)

    first, second, third = request.prompts
    assert first.points.shape == (2, 2) and first.points.dtype == np.float64
    np.testing.assert_array_equal(first.points, [[10.0, 20.5], [30.0, 40.0]])
    assert first.labels.shape == (2,) and first.labels.dtype == np.int64
    np.testing.assert_array_equal(first.labels, [1, 0])
    assert first.box is None and first.mask_input is None

    assert second.points is None and second.labels is None and second.mask_input is None
    assert second.box.shape == (4,) and second.box.dtype == np.float64
    np.testing.assert_array_equal(second.box, [1.0, 2.0, 300.5, 400.0])

    assert third.points.shape == (1, 2) and third.labels.shape == (1,)
    np.testing.assert_array_equal(third.box, [0.0, 0.0, 10.0, 10.0])
    assert third.mask_input == "logits-abc"


def expect_error(
    body: Any,
    code: str,
    *,
    status: int = 400,
    content_type: str | None = "application/json",
    limits: Limits = LIMITS,
    names: str | None = None,
) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body, content_type, limits)
    error = info.value
    assert (error.status, error.code) == (status, code), error.message
    assert error.message
    if names is not None:
        assert names in error.message
    return error


def with_prompts(*prompts: Any, **extra: Any) -> dict[str, Any]:
    return {"image_id": "img-1", "prompts": list(prompts), **extra}


# --- valid requests -------------------------------------------------------------------


def test_full_request_as_dict():
    check_full(parse_request(FULL, "application/json", LIMITS))


def test_full_request_as_bytes_without_content_type_as_grpc_sends_it():
    check_full(parse_request(json.dumps(FULL).encode("utf-8"), None, LIMITS))


def test_full_request_as_bytearray():
    check_full(parse_request(bytearray(json.dumps(FULL).encode()), "application/json", LIMITS))


def test_full_request_as_a_string_as_torchserve_may_hand_it_over():
    check_full(parse_request(json.dumps(FULL), "application/json", LIMITS))


@pytest.mark.parametrize("body", [b"\xef\xbb\xbf", "\ufeff"], ids=["bytes", "text"])
def test_a_utf8_byte_order_mark_before_the_json_is_ignored(body):
    text = json.dumps(FULL)
    raw = body + text.encode() if isinstance(body, bytes) else body + text
    check_full(parse_request(raw, "application/json", LIMITS))
    check_full(parse_request(raw, None, LIMITS))


def test_a_byte_order_mark_alone_is_an_empty_body():
    expect_error(b"\xef\xbb\xbf", "invalid_json", names="empty")


def test_content_type_parameters_and_case_are_ignored():
    body = json.dumps(FULL).encode()
    check_full(parse_request(body, "Application/JSON; charset=utf-8", LIMITS))


def test_parse_json_directly():
    check_full(parse_json(FULL, LIMITS))


def test_defaults_multimask_true_output_rle_no_prompts():
    request = parse_request({"image_id": "abc"}, "application/json", LIMITS)
    assert request == SegmentRequest(image_id="abc")
    assert request.multimask is True
    assert request.best_only is False
    assert request.output == "rle"
    assert request.prompts == ()
    assert request.image is None


def test_null_prompts_mean_no_prompts():
    assert parse_json({"image_id": "abc", "prompts": None}, LIMITS).prompts == ()


def test_null_is_absent_for_every_field():
    """One rule for null: a field sent as null takes its default, as if left out."""
    nulls = {name: None for name in ("image", "prompts", "multimask", "best_only", "output")}
    assert parse_json({"image_id": "abc", **nulls, "everything": None}, LIMITS) == parse_json(
        {"image_id": "abc"}, LIMITS
    )
    prompt = {"points": None, "labels": None, "box": [0, 0, 1, 1], "mask_input": None}
    (parsed,) = parse_json(with_prompts(prompt), LIMITS).prompts
    assert parsed.points is None and parsed.labels is None and parsed.mask_input is None
    np.testing.assert_array_equal(parsed.box, [0, 0, 1, 1])
    params = {name: None for name in EVERYTHING_BOUNDS}
    request = parse_json({"image_id": "abc", "everything": params}, LIMITS)
    assert request.everything == EverythingParams()


@pytest.mark.parametrize("output", ["rle", "png", "none"])
def test_each_output_format_is_accepted(output):
    assert parse_json({"image_id": "abc", "output": output}, LIMITS).output == output


def test_image_as_data_url():
    request = parse_json({"image": f"data:image/png;base64,{IMAGE_B64}"}, LIMITS)
    assert request.image == IMAGE


def test_image_and_image_id_together():
    request = parse_json({"image": IMAGE_B64, "image_id": "abc"}, LIMITS)
    assert (request.image, request.image_id) == (IMAGE, "abc")


def test_points_only_prompt_and_integer_coordinates_become_floats():
    request = parse_json(with_prompts({"points": [[1, 2]], "labels": [0]}), LIMITS)
    (prompt,) = request.prompts
    assert prompt.points.dtype == np.float64
    np.testing.assert_array_equal(prompt.points, [[1.0, 2.0]])
    np.testing.assert_array_equal(prompt.labels, [0])


def test_degenerate_box_is_allowed():
    (prompt,) = parse_json(with_prompts({"box": [5, 5, 5, 5]}), LIMITS).prompts
    np.testing.assert_array_equal(prompt.box, [5, 5, 5, 5])


def test_limits_are_inclusive():
    limits = Limits(max_prompts=2, max_points_per_prompt=3)
    prompt = {"points": [[0, 0], [1, 1], [2, 2]], "labels": [1, 1, 0]}
    request = parse_json(with_prompts(prompt, prompt), limits)
    assert len(request.prompts) == 2
    assert request.prompts[0].points.shape == (3, 2)


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "IMAGE/WEBP; q=1"])
def test_raw_image_body_is_image_bytes_without_prompts(content_type):
    request = parse_request(IMAGE, content_type, LIMITS)
    assert request == SegmentRequest(image=IMAGE)
    assert request.prompts == ()
    assert request.image_id is None


def test_raw_image_body_is_not_parsed_as_json():
    body = json.dumps({"image_id": "abc"}).encode()
    assert parse_request(body, "image/png", LIMITS).image == body


# --- errors: body and media type ------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"{not json", "{'single': 'quotes'}", b'{"image_id": "a"', b"", "   ", b"\xff\xfe{}"]
)
def test_malformed_json_is_invalid_json(body):
    expect_error(body, "invalid_json", content_type=None)


def test_integer_past_the_digit_limit_is_invalid_json_not_a_crash():
    body = '{"image_id": "a", "prompts": [{"box": [0, 0, 1, ' + "9" * 5000 + "]}]}"
    expect_error(body, "invalid_json")


def test_deeply_nested_json_is_invalid_json_not_a_crash():
    expect_error("[" * 100_000 + "]" * 100_000, "invalid_json")


@pytest.mark.parametrize("body", [[1, 2], "[1, 2]", "42", '"text"', "null", "true"])
def test_non_object_json_is_rejected(body):
    expect_error(body, "invalid_request", names="request")


@pytest.mark.parametrize("body,kind", [(42, "int"), (2.5, "float"), (True, "bool")])
def test_already_decoded_json_scalar_names_its_type(body, kind):
    expect_error(body, "invalid_request", names=f"got {kind}")


def test_unsupported_content_type():
    error = expect_error(
        b"\x00\x01", "unsupported_media_type", status=415, content_type="application/octet-stream"
    )
    assert "application/octet-stream" in error.message


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/xml", "text/plain", "text/json"]
)
def test_other_content_types_are_unsupported(content_type):
    expect_error(b"{}", "unsupported_media_type", status=415, content_type=content_type)
    expect_error("{}", "unsupported_media_type", status=415, content_type=content_type)


@pytest.mark.parametrize("body", [b"", None, "text body", {"image_id": "a"}])
def test_empty_or_non_bytes_raw_image_body_is_missing_image(body):
    expect_error(body, "missing_image", content_type="image/png")


# --- errors: fields -------------------------------------------------------------------


def test_unknown_top_level_field():
    error = expect_error({"image_id": "a", "imageid": "b"}, "unknown_field", names="imageid")
    assert "request" in error.message


def test_unknown_prompt_field_names_the_prompt():
    body = with_prompts({"box": [0, 0, 1, 1]}, {"box": [0, 0, 1, 1], "point": [[1, 2]]})
    error = expect_error(body, "unknown_field", names="prompts[1]")
    assert "point" in error.message


@pytest.mark.parametrize(
    "body", [{}, {"prompts": []}, {"image": None, "image_id": None}, {"multimask": True}]
)
def test_missing_image_and_image_id(body):
    expect_error(body, "missing_image")


def test_empty_base64_image_is_missing_image():
    expect_error({"image": ""}, "missing_image")


@pytest.mark.parametrize(
    "image",
    [
        "not base64!",
        "aGVsbG8=x",  # data after padding
        "aGVsb",  # a length no base64 has
        "data:image/png;base64,%%%",
        base64.urlsafe_b64encode(b"\xfb\xff\xfe").decode(),  # '-' and '_' are not base64
    ],
)
def test_invalid_base64(image):
    expect_error({"image": image}, "invalid_base64", names="image")


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"image": 123}, "image"),
        ({"image": ["a"]}, "image"),
        ({"image_id": 5}, "image_id"),
        ({"image_id": ""}, "image_id"),
        ({"image_id": "x" * 129}, "image_id"),
        ({"image_id": "a", "prompts": {"box": [0, 0, 1, 1]}}, "prompts"),
        ({"image_id": "a", "prompts": "box"}, "prompts"),
        ({"image_id": "a", "multimask": "true"}, "multimask"),
        ({"image_id": "a", "multimask": 1}, "multimask"),
        ({"image_id": "a", "best_only": "yes"}, "best_only"),
        ({"image_id": "a", "best_only": 0}, "best_only"),
        ({"image_id": "a", "output": "jpeg"}, "output"),
        ({"image_id": "a", "output": "RLE"}, "output"),
        ({"image_id": "a", "output": ["rle"]}, "output"),
        ({"image_id": "a", "output": {"rle": 1}}, "output"),
        ({"image_id": "a", "prompts": ["box"]}, "prompts[0]"),
        ({"image_id": "a", "prompts": [None]}, "prompts[0]"),
    ],
)
def test_wrong_types_are_invalid_request(body, names):
    expect_error(body, "invalid_request", names=names)


def test_image_id_of_maximum_length_is_accepted():
    assert parse_json({"image_id": "x" * 128}, LIMITS).image_id == "x" * 128


@pytest.mark.parametrize(
    ("prompt", "names"),
    [
        ({"points": [[1, 2]]}, "prompts[0]"),  # points without labels
        ({"labels": [1]}, "prompts[0]"),  # labels without points
        ({"points": [[1, 2]], "labels": 1}, "prompts[0]"),
        ({"points": [[1, 2], [3, 4]], "labels": [1]}, "prompts[0]"),  # length mismatch
        ({"points": [], "labels": []}, "prompts[0].points"),
        ({"points": [[1, 2]], "labels": [2]}, "prompts[0].labels[0]"),
        ({"points": [[1, 2]], "labels": [-1]}, "prompts[0].labels[0]"),
        ({"points": [[1, 2]], "labels": [True]}, "prompts[0].labels[0]"),
        ({"points": [[1, 2]], "labels": ["1"]}, "prompts[0].labels[0]"),
        ({"points": [[1, 2], [3, 4]], "labels": [1, None]}, "prompts[0].labels[1]"),
        ({"points": [[1, float("nan")]], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [[float("inf"), 1]], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [[1, 2], ["3", 4]], "labels": [1, 1]}, "prompts[0].points[1]"),
        ({"points": [[1, True]], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [[1, 2, 3]], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [[1]], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [{"x": 1, "y": 2}], "labels": [1]}, "prompts[0].points[0]"),
        ({"points": [[1, 10**400]], "labels": [1]}, "prompts[0].points[0]"),  # > float range
        ({"box": [1, 2, 3]}, "prompts[0].box"),
        ({"box": [1, 2, 3, 4, 5]}, "prompts[0].box"),
        ({"box": "1,2,3,4"}, "prompts[0].box"),
        ({"box": [0, 0, float("-inf"), 1]}, "prompts[0].box"),
        ({"box": [10, 0, 5, 5]}, "prompts[0].box"),  # x1 < x0
        ({"box": [0, 10, 5, 5]}, "prompts[0].box"),  # y1 < y0
        ({"box": [0, 0, 1, 1], "mask_input": 7}, "prompts[0].mask_input"),
        ({"box": [0, 0, 1, 1], "mask_input": ""}, "prompts[0].mask_input"),
    ],
)
def test_invalid_prompts(prompt, names):
    expect_error(with_prompts(prompt), "invalid_request", names=names)


def test_error_names_the_offending_prompt_index():
    good = {"box": [0, 0, 1, 1]}
    bad = {"box": [0, 0, 1]}
    error = expect_error(with_prompts(good, good, bad), "invalid_request")
    assert "prompts[2]" in error.message
    assert "prompts[0]" not in error.message


@pytest.mark.parametrize("coordinate", ["NaN", "Infinity", "-Infinity", '"12"', "1e400"], ids=str)
def test_non_finite_and_string_coordinates_in_json_text(coordinate):
    body = '{"image_id": "a", "prompts": [{"points": [[1, ' + coordinate + ']], "labels": [1]}]}'
    expect_error(body, "invalid_request", content_type=None, names="prompts[0].points[0]")


@pytest.mark.parametrize(
    "prompt", [{}, {"mask_input": "logits-1"}, {"points": None, "labels": None, "box": None}]
)
def test_empty_prompt(prompt):
    expect_error(with_prompts(prompt), "empty_prompt", names="prompts[0]")


def test_too_many_prompts():
    limits = Limits(max_prompts=2, max_points_per_prompt=3)
    prompt = {"box": [0, 0, 1, 1]}
    error = expect_error(with_prompts(prompt, prompt, prompt), "too_many_prompts", limits=limits)
    assert "3" in error.message and "2" in error.message


def test_too_many_points():
    limits = Limits(max_prompts=2, max_points_per_prompt=3)
    prompt = {"points": [[0, 0]] * 4, "labels": [1] * 4}
    error = expect_error(
        with_prompts({"box": [0, 0, 1, 1]}, prompt), "too_many_points", limits=limits
    )
    assert "prompts[1]" in error.message


def test_error_to_dict_shape():
    error = expect_error(
        with_prompts({"box": [0, 0, 1, 1]}, {"points": [[1, 2]], "labels": [3]}),
        "invalid_request",
    )
    body = error.to_dict()
    assert body == {"error": {"code": "invalid_request", "message": error.message}}
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert "prompts[1]" in body["error"]["message"]
    assert json.loads(json.dumps(body)) == body
    assert str(error) == error.message


@pytest.mark.parametrize("image", ["aGVsbG8", "aGVs\nbG8=", "aGVs bG8=\n", "aGVsbG8=\r\n"])
def test_wrapped_and_unpadded_base64_is_accepted(image):
    assert parse_json({"image": image}, LIMITS).image == b"hello"


@pytest.mark.parametrize("label", [1.0, 0.0, "1", None])
def test_label_must_be_an_integer(label):
    with pytest.raises(RequestError) as caught:
        parse_json({"image_id": "a", "prompts": [{"points": [[1, 2]], "labels": [label]}]}, LIMITS)
    assert caught.value.code == "invalid_request" and "labels[0]" in caught.value.message


def test_best_only_is_parsed():
    request = parse_request({"image_id": "a", "best_only": True}, "application/json", LIMITS)
    assert request.best_only is True


# --- errors quote a short prefix of what was sent ---------------------------------------

HUGE = [1e15] * 1_000_000


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (with_prompts({"box": HUGE}), "prompts[0].box"),
        (with_prompts({"box": [0, 0, 1, HUGE]}), "prompts[0].box"),
        (with_prompts({"points": [HUGE], "labels": [1]}), "prompts[0].points[0]"),
        (with_prompts({"points": [[1, 2]], "labels": [HUGE]}), "prompts[0].labels[0]"),
        (with_prompts({"box": [30, 0, 10, "x" * 1_000_000]}), "prompts[0].box"),
        ({"image_id": "a", "output": HUGE}, "output"),
        ({"image_id": "a", "output": "x" * 1_000_000}, "output"),
        ({"image_id": "a", "everything": {"points_per_side": HUGE}}, "points_per_side"),
        ({"image_id": "a", "everything": {"box_nms_thresh": [[[[HUGE]]]]}}, "box_nms_thresh"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_errors_quote_a_short_prefix_of_a_huge_value(body, names):
    error = expect_error(body, "invalid_request", names=names)
    assert len(error.message) < MAX_QUOTE_CHARS + 200, error.message


def test_a_huge_value_is_quoted_with_its_first_items_and_length():
    error = expect_error({"image_id": "a", "output": HUGE}, "invalid_request")
    assert "[1000000000000000.0, 1000000000000000.0," in error.message
    assert "(1000000 items)" in error.message


@pytest.mark.parametrize(
    "body",
    [
        {"image_id": "a", **{f"unknown_{i}": 1 for i in range(100_000)}},
        {"image_id": "a", "x" * 1_000_000: 1},
        with_prompts({"box": [0, 0, 1, 1], "y" * 1_000_000: 1}),
        {"image_id": "a", "everything": {"z" * 1_000_000: 1}},
    ],
    ids=["many", "long", "prompt", "everything"],
)
def test_unknown_fields_are_quoted_short(body):
    error = expect_error(body, "unknown_field")
    assert len(error.message.encode()) <= MAX_MESSAGE_BYTES


def test_a_long_content_type_is_quoted_short():
    error = expect_error(
        b"{}", "unsupported_media_type", status=415, content_type="text/" + "a" * 100_000
    )
    assert len(error.message) < MAX_QUOTE_CHARS + 200


def test_lone_surrogates_in_a_value_are_escaped_in_the_message():
    error = expect_error({"image_id": "a", "output": "\ud800"}, "invalid_request")
    assert "\\ud800" in error.message
    error.message.encode("utf-8")  # encodable: a JSON encoder takes it


# --- how the image is read: page and intensity range --------------------------------------


def test_page_and_intensity_range_default_to_the_first_page_and_own_percentiles():
    assert parse_json({"image": IMAGE_B64}, LIMITS).decode == DEFAULT_DECODE


def test_page_and_intensity_range_are_parsed():
    body = {"image": IMAGE_B64, "page": 3, "intensity_range": [100, 4095.5]}
    assert parse_json(body, LIMITS).decode == DecodeOptions(3, (100.0, 4095.5))
    nulls = {"image": IMAGE_B64, "page": None, "intensity_range": None}
    assert parse_json(nulls, LIMITS).decode == DEFAULT_DECODE


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"page": -1}, "page"),
        ({"page": 1.5}, "page"),
        ({"page": True}, "page"),
        ({"page": "2"}, "page"),
        ({"page": 10**12}, "page"),
        ({"intensity_range": [5, 5]}, "intensity_range"),
        ({"intensity_range": [9, 1]}, "intensity_range"),
        ({"intensity_range": [0]}, "intensity_range"),
        ({"intensity_range": [0, "x"]}, "intensity_range"),
        ({"intensity_range": "0,1"}, "intensity_range"),
    ],
)
def test_bad_page_or_intensity_range_is_invalid_request(fields, name):
    with pytest.raises(RequestError) as info:
        parse_json({"image": IMAGE_B64, **fields}, LIMITS)
    assert info.value.status == 400 and info.value.code == "invalid_request"
    assert info.value.message.startswith(name)


@pytest.mark.parametrize("fields", [{"page": 1}, {"intensity_range": [0, 10]}])
def test_page_or_intensity_range_without_image_is_refused(fields):
    with pytest.raises(RequestError) as info:
        parse_json({"image_id": "abc", **fields}, LIMITS)
    assert info.value.code == "invalid_request" and "image_id" in info.value.message
