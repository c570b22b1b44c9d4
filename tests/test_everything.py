"""Segment everything against SamAutomaticMaskGenerator, on the shipped trained model.

samserve decodes with its own decoder (SAM's logits to float rounding), so records are
compared as masks that agree to a few boundary pixels, not as bytes."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import generate_crop_boxes

from conftest import coco_rle
from samserve.engine import SamEngine
from samserve.errors import RequestError
from samserve.everything import (
    EverythingLimits,
    EverythingParams,
    mask_nms,
    plan_everything,
    segment_everything,
)
from samserve.models import build_sam, spec_by_name
from training.synthetic import make_sample

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "sam_small_shapes.pth"


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """samserve's records are SAM's generator's, in its order, to float rounding: each
    mask covers the same pixels but for a few on its boundary, its predicted IoU agrees to
    1e-4, and its stability score (a ratio of pixel counts at logit thresholds +-1) to 1e-3
    or two pixels' worth of its area, since a logit rounded across a threshold moves a pixel."""
    assert len(got) == len(want) > 0
    for mine, sams in zip(got, want, strict=True):
        overlap = mask_utils.iou([mine["segmentation"]], [sams["segmentation"]], [False])
        assert overlap[0, 0] > 0.999, overlap
        assert abs(mine["area"] - sams["area"]) <= max(2, sams["area"] // 1000)
        assert np.abs(np.subtract(mine["bbox"], sams["bbox"])).max() <= 1
        assert mine["predicted_iou"] == pytest.approx(float(sams["predicted_iou"]), abs=1e-4)
        pixels = 2 / max(sams["area"], 1)
        assert mine["stability_score"] == pytest.approx(
            float(sams["stability_score"]), abs=max(1e-3, pixels)
        )
        assert mine["point_coords"] == [[float(x), float(y)] for x, y in sams["point_coords"]]


@pytest.fixture(scope="module")
def shapes_sam():
    return build_sam(spec_by_name("sam_small"), SHIPPED)


@pytest.mark.parametrize(
    "params",
    [
        EverythingParams(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.6),
        EverythingParams(
            points_per_side=6,
            points_per_batch=10,
            pred_iou_thresh=0.2,
            stability_score_thresh=0.5,
            box_nms_thresh=0.5,
            min_mask_region_area=40,
        ),
    ],
    ids=["grid8", "grid6-small-regions"],
)
def test_matches_automatic_mask_generator_and_reuses_the_embedding(shapes_sam, params):
    sample = make_sample(np.random.default_rng([20_000, 3]), 300, 420, 6)
    engine = SamEngine(shapes_sam)
    embedding = engine.embed({"a": sample.image})["a"]
    result = segment_everything(engine, embedding, params)
    expected = SamAutomaticMaskGenerator(
        shapes_sam, output_mode="coco_rle", **params.as_kwargs()
    ).generate(sample.image)
    assert result.encoder_runs == 0 and engine.encoder_runs == 1
    assert result.points == params.points_per_side**2
    assert_same_records(result.records, expected)


def test_no_mask_above_the_predicted_iou_filter_gives_no_records(shapes_sam):
    """Every mask dropped by the first filter, before any is made full size: no records,
    as SAM's generator gives."""
    sample = make_sample(np.random.default_rng([20_000, 4]), 200, 260, 4)
    engine = SamEngine(shapes_sam)
    embedding = engine.embed({"a": sample.image})["a"]
    params = EverythingParams(points_per_side=4, pred_iou_thresh=1.5)
    assert segment_everything(engine, embedding, params).records == []
    expected = SamAutomaticMaskGenerator(shapes_sam, **params.as_kwargs()).generate(sample.image)
    assert expected == []


def test_crop_layers_need_the_image_and_encode_each_crop(shapes_sam):
    sample = make_sample(np.random.default_rng([20_000, 2]), 200, 260, 3)
    engine = SamEngine(shapes_sam)
    embedding = engine.embed({"a": sample.image})["a"]
    params = EverythingParams(
        points_per_side=4, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    with pytest.raises(ValueError, match="crop layers need the image"):
        segment_everything(engine, embedding, params)
    result = segment_everything(engine, embedding, params, image=sample.image)
    assert result.encoder_runs == 4  # the four layer-1 crops; the full image was cached
    assert result.points == 16 + 4 * 16
    expected = SamAutomaticMaskGenerator(
        shapes_sam, output_mode="coco_rle", **params.as_kwargs()
    ).generate(sample.image)
    assert_same_records(result.records, expected)
    assert [r["crop_box"] for r in result.records] == [e["crop_box"] for e in expected]


def test_everything_through_the_protocol(shapes_sam):
    from conftest import png_bytes
    from samserve.service import SegmentService
    from samserve.settings import Settings

    service = SegmentService.for_model(shapes_sam, Settings())
    sample = make_sample(np.random.default_rng([20_000, 3]), 300, 420, 6)
    params = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
    first = service.handle([({"image": base64.b64encode(png_bytes(sample.image)).decode(),
                              "everything": params}, "application/json")])[0]  # fmt: skip
    assert first.status == 200, first.body
    expected = SamAutomaticMaskGenerator(
        shapes_sam, output_mode="coco_rle", **EverythingParams(**params).as_kwargs()
    ).generate(sample.image)
    body = first.body["everything"]
    assert body["count"] == len(expected) == len(body["masks"]) and body["points"] == 64
    assert_same_records(body["masks"], expected)
    image_id = first.body["image_id"]
    again = service.handle([({"image_id": image_id, "everything": params}, "application/json")])
    assert again[0].status == 200 and again[0].body["cached"]
    assert again[0].body["everything"]["masks"] == body["masks"]
    assert service.engine.encoder_runs == 1

    crops = service.handle(
        [({"image_id": image_id, "everything": {"crop_n_layers": 1}}, "application/json")]
    )[0]
    assert crops.status == 400 and crops.body["error"]["code"] == "image_required"
    both = service.handle(
        [
            (
                {"image_id": image_id, "everything": {}, "prompts": [{"box": [0, 0, 9, 9]}]},
                "application/json",
            )
        ]  # fmt: skip
    )[0]
    assert both.status == 400 and "not both" in both.body["error"]["message"]


# --- parameters checked together, work bounded (issue 32) -------------------------------

UNBOUNDED = EverythingLimits(
    max_everything_points=10**9,
    max_everything_crops=10**9,
    max_mask_pixels=10**18,
    max_everything_seconds=3600.0,
)


@pytest.mark.parametrize(
    ("size", "params"),
    [
        ((300, 420), EverythingParams(points_per_side=8)),
        ((300, 420), EverythingParams(points_per_side=8, crop_n_layers=1)),
        (
            (300, 420),
            EverythingParams(points_per_side=9, crop_n_layers=2, crop_n_points_downscale_factor=2),
        ),  # fmt: skip
        ((40, 30), EverythingParams(points_per_side=5, crop_n_layers=2, crop_overlap_ratio=0.9)),
    ],
)
def test_plan_counts_the_points_and_crops_sams_generator_runs(micro_sam, size, params):
    work = plan_everything(SamEngine(micro_sam), params, size)
    generator = SamAutomaticMaskGenerator(micro_sam, **params.as_kwargs())
    boxes, layers = generate_crop_boxes(size, params.crop_n_layers, params.crop_overlap_ratio)
    assert work.points == sum(len(generator.point_grids[layer]) for layer in layers)
    full = [0, 0, size[1], size[0]]
    assert work.crop_encoder_runs == sum(box != full for box in boxes)


def test_a_crop_layer_without_points_is_an_invalid_request_not_a_division_by_zero(micro_sam):
    params = EverythingParams(points_per_side=4, crop_n_layers=1, crop_n_points_downscale_factor=8)
    with pytest.raises(ZeroDivisionError):  # what SAM's generator does with them
        SamAutomaticMaskGenerator(micro_sam, **params.as_kwargs())
    with pytest.raises(RequestError) as caught:
        plan_everything(SamEngine(micro_sam), params, (50, 60))
    assert (caught.value.status, caught.value.code) == (400, "invalid_request")
    assert "crop_n_points_downscale_factor 8^1 leaves no point" in caught.value.message


def test_an_empty_crop_is_an_invalid_request(micro_sam):
    params = EverythingParams(points_per_side=2, crop_n_layers=1)
    image = np.full((1, 1, 3), 200, dtype=np.uint8)
    with pytest.raises(ValueError):  # SAM's generator resizes a crop of no pixels
        SamAutomaticMaskGenerator(micro_sam, **params.as_kwargs()).generate(image)
    engine = SamEngine(micro_sam)
    embedding = engine.embed({"a": image})["a"]
    with pytest.raises(RequestError) as caught:
        segment_everything(engine, embedding, params, image)
    assert caught.value.code == "invalid_request" and "empty crop" in caught.value.message


def test_a_crop_too_narrow_to_encode_is_an_invalid_request(micro_sam):
    """A 1100x3 image encodes (256 input: 256x1), but two of its layer-1 crops are
    550x1, which would resize to no rows."""
    params = EverythingParams(points_per_side=2, crop_n_layers=1, crop_overlap_ratio=0.0)
    engine = SamEngine(micro_sam)
    assert engine.input_size((3, 1100)) == (1, 256)
    with pytest.raises(RequestError) as caught:
        plan_everything(engine, params, (3, 1100))
    assert caught.value.code == "invalid_request" and "cannot be encoded" in caught.value.message


def test_work_past_the_limits_is_refused_up_front_naming_the_setting(micro_sam):
    engine = SamEngine(micro_sam)
    params = EverythingParams(points_per_side=64, crop_n_layers=2)
    for limits, setting in [
        (dataclasses.replace(UNBOUNDED, max_everything_points=4096), "max_everything_points"),
        (dataclasses.replace(UNBOUNDED, max_everything_crops=4), "max_everything_crops"),
    ]:
        with pytest.raises(RequestError) as caught:
            plan_everything(engine, params, (480, 640), limits)
        assert (caught.value.status, caught.value.code) == (400, "too_much_work")
        assert setting in caught.value.message
    work = plan_everything(engine, params, (480, 640), UNBOUNDED)
    assert (work.points, work.crop_encoder_runs) == (64 * 64 * 21, 20)


def test_the_time_budget_stops_the_generator_between_batches(micro_sam):
    engine = SamEngine(micro_sam)
    image = make_sample(np.random.default_rng([20_000, 5]), 120, 160, 3).image
    embedding = engine.embed({"a": image})["a"]
    params = EverythingParams(points_per_side=64, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    limits = dataclasses.replace(UNBOUNDED, max_everything_seconds=0.2)
    with pytest.raises(RequestError) as caught:
        segment_everything(engine, embedding, params, limits=limits)
    assert (caught.value.status, caught.value.code) == (413, "time_budget_exceeded")
    message = caught.value.message
    assert "0.2 s (max_everything_seconds)" in message
    done = int(message.split(" with ")[1].split(" of ")[0])
    assert done < 64 * 64  # it stopped, and said how far it had come


def test_full_size_masks_past_max_mask_pixels_stop_the_generator(micro_sam):
    engine = SamEngine(micro_sam)
    image = make_sample(np.random.default_rng([20_000, 6]), 100, 100, 3).image
    embedding = engine.embed({"a": image})["a"]
    params = EverythingParams(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0)
    # Room for the first batch's 48 masks, not the second's.
    limits = dataclasses.replace(UNBOUNDED, max_mask_pixels=60 * 100 * 100)
    with pytest.raises(RequestError) as caught:
        segment_everything(engine, embedding, params, limits=limits)
    assert (caught.value.status, caught.value.code) == (400, "too_many_mask_pixels")
    assert "max_mask_pixels" in caught.value.message and "with 32 of its 64" in caught.value.message


def test_crop_layers_where_no_mask_passes_give_no_records(micro_sam):
    """SAM's generator fails on its NMS across crops when no crop kept a mask."""
    image = make_sample(np.random.default_rng([20_000, 7]), 80, 100, 3).image
    params = EverythingParams(points_per_side=4, crop_n_layers=1, pred_iou_thresh=1.5)
    with pytest.raises(IndexError):
        SamAutomaticMaskGenerator(micro_sam, **params.as_kwargs()).generate(image)
    engine = SamEngine(micro_sam)
    embedding = engine.embed({"a": image})["a"]
    result = segment_everything(engine, embedding, params, image, UNBOUNDED)
    assert result.records == [] and result.encoder_runs == 4


def test_everything_params_default_to_sams_generator():
    """The parameters a request may set take SamAutomaticMaskGenerator's own defaults, and
    the protocol bounds exactly those parameters."""
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    from samserve.protocol import EVERYTHING_BOUNDS

    signature = inspect.signature(SamAutomaticMaskGenerator).parameters
    params = EverythingParams().as_kwargs()
    assert params == {name: signature[name].default for name in params}
    # every parameter but samserve's own mask NMS is SAM's, and the protocol bounds them all
    names = {f.name for f in dataclasses.fields(EverythingParams)}
    assert names - set(params) == {"mask_nms_thresh"}
    assert set(EVERYTHING_BOUNDS) == names
    assert EverythingParams.is_integer("points_per_side")
    assert not EverythingParams.is_integer("pred_iou_thresh")


def _record(mask: np.ndarray, predicted_iou: float) -> dict:
    rle = coco_rle(mask)
    rle["counts"] = rle["counts"].decode()
    return {"segmentation": rle, "predicted_iou": predicted_iou, "bbox": mask_utils.toBbox(rle)}


def test_mask_nms_drops_a_duplicate_whose_stray_pixels_escaped_box_nms():
    square = np.zeros((100, 100), dtype=bool)
    square[10:40, 10:40] = True
    stray = square.copy()
    stray[90:93, 90:93] = True  # nine pixels far away: the box grows, the mask barely
    other = np.zeros_like(square)
    other[50:80, 60:90] = True
    records = [_record(square, 0.80), _record(stray, 0.90), _record(other, 0.70)]
    boxes = np.array([r["bbox"] for r in records[:2]])
    # SAM's box NMS keeps both copies at its default 0.7: their boxes overlap far less
    assert mask_utils.iou(boxes[:1], boxes[1:], [0])[0, 0] < 0.7
    kept = mask_nms(records, 0.8)
    assert kept == [records[1], records[2]]  # the higher predicted IoU stays, order kept
    assert mask_nms(records, 1.0) == records
    assert mask_nms(records, 0.995) == records  # the copies' mask IoU is 900/909


def test_everything_with_mask_nms_keeps_a_subset_of_sams_records(shapes_sam):
    from conftest import png_bytes
    from samserve.service import SegmentService
    from samserve.settings import Settings

    service = SegmentService.for_model(shapes_sam, Settings())
    sample = make_sample(np.random.default_rng([20_000, 3]), 300, 420, 6)
    image = base64.b64encode(png_bytes(sample.image)).decode()
    params = {"points_per_side": 8, "pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}

    def everything(extra: dict) -> dict:
        reply = service.handle(
            [({"image": image, "everything": {**params, **extra}}, "application/json")]
        )[0]
        assert reply.status == 200, reply.body
        return reply.body["everything"]

    sams, thinned = everything({}), everything({"mask_nms_thresh": 0.3})
    assert 0 < thinned["count"] == len(thinned["masks"]) < sams["count"]
    assert all(record in sams["masks"] for record in thinned["masks"])
    rles = [record["segmentation"] for record in thinned["masks"]]
    overlaps = mask_utils.iou(rles, rles, [0] * len(rles))
    assert (overlaps[~np.eye(len(rles), dtype=bool)] <= 0.3).all()
    bad = service.handle(
        [({"image": image, "everything": {"mask_nms_thresh": 1.5}}, "application/json")]
    )[0]
    assert bad.status == 400 and "mask_nms_thresh" in bad.body["error"]["message"]
