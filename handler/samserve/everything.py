"""Segment everything: every instance in an image, by SAM's automatic mask generator.

The method is ``segment_anything.SamAutomaticMaskGenerator``'s own (a grid of point
prompts, predicted-IoU and stability filters, box NMS, optional crop layers and small
region removal), run by that class itself, and then, only when a request asks for it,
an NMS by mask IoU (``mask_nms``). Three changes, none to the method:

* When the generator asks for the embedding of the whole image and the engine has it
  cached, it gets the cached one instead of running the image encoder again (crops are
  new images to the encoder, as in SAM).
* Its batch step (``_EngineGenerator``) decodes the points with the engine's mask decoder
  (``samserve.decoder``: SAM's logits to float rounding, a few prompts per call), where
  SAM's repeats the embedding for every point of a batch of 64, and decodes every copy.
* It drops the masks the predicted-IoU filter drops before making their full-size
  logits, not after.

So the records are SAM's but for float rounding: a mask whose predicted IoU, stability
score or box overlap lies within rounding of a threshold may go either way.

Before the generator starts, ``plan_everything`` checks the parameters together against
the image (SAM's generator divides by zero or crops nothing on some combinations) and
bounds the work (``EverythingLimits``); while it runs, the batch step keeps to a deadline
and a bound on the full-size mask pixels it makes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    uncrop_masks,
)

from .engine import ImageEmbedding, SamEngine
from .errors import RequestError


def _sam_default(name: str) -> Any:
    """The default of ``SamAutomaticMaskGenerator``'s parameter ``name``, read from SAM's
    own signature so that the two cannot drift apart."""
    return inspect.signature(SamAutomaticMaskGenerator).parameters[name].default


@dataclass(frozen=True)
class EverythingParams:
    """The ``SamAutomaticMaskGenerator`` parameters a request may set, with SAM's defaults,
    and ``mask_nms_thresh``, samserve's own: after SAM's generator, a mask whose mask IoU
    with a kept mask of higher predicted IoU exceeds it is dropped (``mask_nms``); the
    default 1.0 drops nothing, so the records stay SAM's."""

    points_per_side: int = _sam_default("points_per_side")
    points_per_batch: int = _sam_default("points_per_batch")
    pred_iou_thresh: float = _sam_default("pred_iou_thresh")
    stability_score_thresh: float = _sam_default("stability_score_thresh")
    stability_score_offset: float = _sam_default("stability_score_offset")
    box_nms_thresh: float = _sam_default("box_nms_thresh")
    crop_n_layers: int = _sam_default("crop_n_layers")
    crop_nms_thresh: float = _sam_default("crop_nms_thresh")
    crop_overlap_ratio: float = _sam_default("crop_overlap_ratio")
    crop_n_points_downscale_factor: int = _sam_default("crop_n_points_downscale_factor")
    min_mask_region_area: int = _sam_default("min_mask_region_area")
    mask_nms_thresh: float = 1.0

    @classmethod
    def is_integer(cls, name: str) -> bool:
        """Whether parameter ``name`` takes an integer."""
        return {f.name: f.type for f in dataclasses.fields(cls)}[name] == "int"

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SamAutomaticMaskGenerator`` (SAM's parameters only)."""
        sams = inspect.signature(SamAutomaticMaskGenerator).parameters
        return {k: v for k, v in dataclasses.asdict(self).items() if k in sams}


def mask_nms(records: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The records left after greedy NMS by mask IoU, in their order.

    SAM's generator suppresses by box IoU, so a second mask of the same object escapes it
    when a few stray pixels elsewhere stretch its box; counting needs it gone, and the
    masks themselves say so.

    Arguments:
      records (list[dict]): SAM's records, ``segmentation`` as COCO RLE.
      threshold (float): a mask whose IoU with a kept mask of higher ``predicted_iou``
        exceeds it is dropped; 1.0 drops nothing.
    Returns:
      (list[dict]): the kept records.
    """
    if threshold >= 1.0 or len(records) < 2:
        return records
    order = sorted(range(len(records)), key=lambda i: -records[i]["predicted_iou"])
    rles = [records[i]["segmentation"] for i in order]
    overlaps = mask_utils.iou(rles, rles, [0] * len(rles))
    kept: list[int] = []
    for rank in range(len(order)):
        if not kept or overlaps[rank, kept].max() <= threshold:
            kept.append(rank)
    return [records[i] for i in sorted(order[rank] for rank in kept)]


@dataclass(frozen=True)
class EverythingLimits:
    """Bounds on the work of one segment-everything request, named as the handler
    settings that set them (their error messages name the setting).

    Arguments:
      max_everything_points (int): point prompts decoded, over all crops.
      max_everything_crops (int): crops encoded anew (the full image's embedding is the
        cached one).
      max_mask_pixels (int): full-size mask pixels made: each mask that passes
        ``pred_iou_thresh`` is made at its crop's size.
      max_everything_seconds (float): wall time from the first crop on; checked between
        batches of points, so one batch or one crop's encoder run may pass it.
    """

    max_everything_points: int
    max_everything_crops: int
    max_mask_pixels: int
    max_everything_seconds: float


@dataclass(frozen=True)
class EverythingWork:
    """What a segment-everything request asks of the model, known before it runs.

    Arguments:
      points (int): point prompts decoded, over all crops.
      crop_encoder_runs (int): crops that run the image encoder.
    """

    points: int
    crop_encoder_runs: int


def plan_everything(
    engine: SamEngine,
    params: EverythingParams,
    original_size: tuple[int, int],
    limits: EverythingLimits | None = None,
) -> EverythingWork:
    """Check ``params`` together against an image of ``original_size`` (H, W) and
    ``limits``, before any work, as SAM's generator will crop and sample it.

    Raises:
      RequestError: 400 ``invalid_request`` for parameters SAM's generator cannot run
        on this image (a crop layer without points, an empty crop, a crop too narrow to
        resize to the model's input); 400 ``too_much_work`` past ``limits``.

    Returns:
      (EverythingWork): the points and crop encoder runs the request takes.
    """
    # SAM's build_all_layer_point_grids: int(points_per_side / factor**layer) per side.
    per_side = [
        int(params.points_per_side / params.crop_n_points_downscale_factor**layer)
        for layer in range(params.crop_n_layers + 1)
    ]
    if per_side[-1] < 1:
        raise _invalid_everything(
            f"points_per_side {params.points_per_side} / crop_n_points_downscale_factor "
            f"{params.crop_n_points_downscale_factor}^{params.crop_n_layers} leaves no "
            f"point in crop layer {params.crop_n_layers}: fewer crop_n_layers, a smaller "
            "crop_n_points_downscale_factor or more points_per_side"
        )
    boxes, layers = generate_crop_boxes(
        original_size, params.crop_n_layers, params.crop_overlap_ratio
    )
    points = encoder_runs = 0
    for box, layer in zip(boxes, layers):
        x0, y0, x1, y1 = box
        size = (y1 - y0, x1 - x0)
        if min(size) < 1:
            raise _invalid_everything(
                f"crop_n_layers {params.crop_n_layers} on a {original_size[1]}x"
                f"{original_size[0]} image makes an empty crop {box}: fewer crop_n_layers"
            )
        try:
            engine.input_size(size)
        except ValueError as err:
            raise _invalid_everything(
                f"crop {box} of crop layer {layer} cannot be encoded ({err}): fewer "
                "crop_n_layers or a smaller crop_overlap_ratio"
            ) from err
        points += per_side[layer] ** 2
        if size != tuple(original_size):  # the full image's embedding is the cached one
            encoder_runs += 1
    work = EverythingWork(points, encoder_runs)
    if limits is not None:
        _check_work(work, params, limits)
    return work


def _check_work(work: EverythingWork, params: EverythingParams, limits: EverythingLimits) -> None:
    """400 ``too_much_work`` when ``work`` passes ``limits``, naming the bound."""
    asked = (
        f"points_per_side {params.points_per_side}, crop_n_layers {params.crop_n_layers}, "
        f"crop_n_points_downscale_factor {params.crop_n_points_downscale_factor}"
    )
    if work.points > limits.max_everything_points:
        raise RequestError(
            400,
            "too_much_work",
            f"segment everything with {asked} decodes {work.points} points over its "
            f"crops; at most {limits.max_everything_points} (max_everything_points): fewer "
            "points_per_side or crop_n_layers, or a larger crop_n_points_downscale_factor",
        )
    if work.crop_encoder_runs > limits.max_everything_crops:
        raise RequestError(
            400,
            "too_much_work",
            f"segment everything with {asked} encodes {work.crop_encoder_runs} crops; at "
            f"most {limits.max_everything_crops} (max_everything_crops): fewer crop_n_layers",
        )


def _invalid_everything(message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"everything: {message}")


class _Budget:
    """The running bounds of one request: a deadline, and the full-size mask pixels made.

    Arguments:
      limits (EverythingLimits): the bounds.
      points (int): the request's points over all crops (for its messages).
    """

    def __init__(self, limits: EverythingLimits, points: int) -> None:
        self.limits = limits
        self.points = points
        self.deadline = time.monotonic() + limits.max_everything_seconds
        self.points_done = 0
        self.mask_pixels = 0

    def check_time(self) -> None:
        """413 ``time_budget_exceeded`` once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise RequestError(
                413,
                "time_budget_exceeded",
                f"segment everything ran past its time budget of "
                f"{self.limits.max_everything_seconds} s (max_everything_seconds) with "
                f"{self.points_done} of its {self.points} points decoded: fewer "
                "points_per_side or crop_n_layers, or a higher pred_iou_thresh",
            )

    def add_masks(self, count: int, crop_pixels: int) -> None:
        """Count ``count`` masks to be made at a crop's size; 400 ``too_many_mask_pixels``
        before they would pass ``max_mask_pixels``."""
        self.mask_pixels += count * crop_pixels
        if self.mask_pixels > self.limits.max_mask_pixels:
            raise RequestError(
                400,
                "too_many_mask_pixels",
                f"segment everything would make more than {self.limits.max_mask_pixels} "
                f"full-size mask pixels (max_mask_pixels) with {self.points_done} of its "
                f"{self.points} points decoded: a higher pred_iou_thresh, or fewer "
                "points_per_side or crop_n_layers",
            )


class _CachedPredictor(SamPredictor):
    """A ``SamPredictor`` that takes a known embedding for images of its original size and
    decodes points with the engine's decoder.

    ``SamAutomaticMaskGenerator`` calls ``set_image`` once per crop; the full-image crop
    has the original size and gets ``embedding``; other crops run the encoder.
    """

    def __init__(self, engine: SamEngine, embedding: ImageEmbedding) -> None:
        super().__init__(engine.model)
        self.engine = engine
        self.cached = embedding
        self.embedding = embedding
        self.encoder_runs = 0

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if tuple(image.shape[:2]) != tuple(self.cached.original_size):
            self.encoder_runs += 1
            super().set_image(image, image_format)
            self.embedding = self.engine.image_embedding(
                self.features, self.input_size, self.original_size
            )
            return
        self.reset_image()
        self.original_size = tuple(self.cached.original_size)
        self.input_size = tuple(self.cached.input_size)
        self.features = self.cached.embedding
        self.embedding = self.cached
        self.is_image_set = True

    @torch.inference_mode()
    def decode_points(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx3xhxw low-res logits and Bx3 predicted IoUs of B single foreground points
        (Bx2, in the model's input frame), as SAM's ``predict_torch`` makes them with
        multimask output: ``decoder_batch_size`` points per decoder call on a CPU, all B
        in one call on a GPU."""
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        # A CPU call's image-side tensors outgrow the caches past a few prompts; a GPU
        # keeps all of the generator's batch (points_per_batch) busy in one call.
        on_cpu = coords.device.type == "cpu"
        step = self.engine.decoder_batch_size if on_cpu else max(1, coords.shape[0])
        parts = [
            self.engine.predict_torch(
                self.embedding,
                (coords[start : start + step, None, :], labels[start : start + step]),
            )
            for start in range(0, coords.shape[0], step)
        ]
        return torch.cat([low for low, _ in parts]), torch.cat([iou for _, iou in parts])


class _EngineGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` whose batch step decodes with the engine
    (``_CachedPredictor.decode_points``) and makes full-size logits only for the masks
    that pass the predicted-IoU filter, ``UPSCALE_BATCH`` at a time.

    SAM's ``_process_batch`` upsamples all 3 x ``points_per_batch`` masks to the image's
    size before that filter, which reads only the decoder's scores: 3 x
    ``points_per_batch`` float logit maps of the crop's size, most of them dropped. Here the
    filter runs on the low-res logits; the upsampling (SAM's) treats each mask alone, and
    every later step is SAM's, in SAM's order.
    """

    budget: _Budget | None = None

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        crop_layer_idx: int,
        orig_size: tuple[int, ...],
    ) -> MaskData:
        if self.budget is not None:
            self.budget.check_time()  # before the crop's encoder run
        data = super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
        if len(data["rles"]) == 0:
            # SAM makes a crop without masks a crop_boxes of shape (0,), on which its
            # NMS across crops fails when no crop has any; boxes are Nx4.
            data["crop_boxes"] = torch.zeros((0, 4), dtype=torch.int64)
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        budget = self.budget
        if budget is not None:
            budget.check_time()
        predictor = self.predictor
        coords = torch.as_tensor(
            predictor.transform.apply_coords(points, im_size),
            dtype=torch.float,
            device=predictor.device,
        )
        low_res, iou_preds = predictor.decode_points(coords)
        candidates = MaskData(
            low_res=low_res.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(low_res.shape[1], axis=0)),
        )
        del low_res
        if self.pred_iou_thresh > 0.0:
            candidates.filter(candidates["iou_preds"] > self.pred_iou_thresh)
        if budget is not None:
            budget.points_done += len(points)
            budget.add_masks(len(candidates["iou_preds"]), math.prod(im_size))
        data = MaskData()
        # At least one part, maybe empty: SAM's later steps read the batch's fields.
        for start in range(0, max(len(candidates["iou_preds"]), 1), UPSCALE_BATCH):
            if budget is not None and start:
                budget.check_time()
            part = slice(start, start + UPSCALE_BATCH)
            data.cat(self._full_size(candidates, part, predictor, crop_box, orig_size))
        return data

    def _full_size(
        self,
        candidates: MaskData,
        part: slice,
        predictor: SamPredictor,
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        """The rest of SAM's ``_process_batch`` for the ``part`` of the ``candidates`` (the
        masks that passed the predicted-IoU filter)."""
        orig_h, orig_w = orig_size
        model = predictor.model
        logits = model.postprocess_masks(
            candidates["low_res"][part, None], predictor.input_size, predictor.original_size
        )[:, 0]
        data = MaskData(
            masks=logits, iou_preds=candidates["iou_preds"][part], points=candidates["points"][part]
        )
        data["stability_score"] = calculate_stability_score(
            data["masks"], model.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > model.mask_threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep_mask = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep_mask):
            data.filter(keep_mask)
        data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
        data["rles"] = mask_to_rle_pytorch(data["masks"])
        del data["masks"]
        return data


UPSCALE_BATCH = 8
"""Masks whose full-size logits ``_EngineGenerator`` makes at a time: eight float maps
of the crop's size, whatever the batch of points."""


@dataclass(frozen=True)
class EverythingResult:
    """What segment everything found: SAM's records (``segmentation`` as COCO RLE with
    string counts, ``area``, ``bbox`` XYWH, ``predicted_iou``, ``point_coords``,
    ``stability_score``, ``crop_box`` XYWH), how many point prompts ran, the extra
    encoder runs (crops), and the generator's wall time."""

    records: list[dict[str, Any]]
    points: int
    encoder_runs: int
    seconds: float


def segment_everything(
    engine: SamEngine,
    embedding: ImageEmbedding,
    params: EverythingParams,
    image: np.ndarray | None = None,
    limits: EverythingLimits | None = None,
) -> EverythingResult:
    """Every instance in the image of ``embedding``, by SAM's automatic mask generator
    with the engine's decoder.

    Arguments:
      engine (SamEngine): the engine that decodes (and encodes crops).
      embedding (ImageEmbedding): the whole image's embedding, HxW original size.
      params (EverythingParams): the generator's parameters, checked first
        (``plan_everything``).
      image (np.ndarray or None): the HxWx3 uint8 RGB image; needed only with crop
        layers, whose crops are encoded anew (without crops the cached embedding is all
        the generator uses).
      limits (EverythingLimits or None): bounds on the work, checked up front and while
        it runs.

    Returns:
      (EverythingResult): SAM's records, in the original image frame, and what ran.

    Raises:
      RequestError: as ``plan_everything``; 413 ``time_budget_exceeded`` and 400
        ``too_many_mask_pixels`` while it runs.
    """
    if image is None:
        if params.crop_n_layers > 0:
            raise ValueError("crop layers need the image itself, not only its embedding")
        height, width = embedding.original_size
        image = np.broadcast_to(np.zeros(3, dtype=np.uint8), (height, width, 3))
    work = plan_everything(engine, params, image.shape[:2], limits)
    generator = _EngineGenerator(engine.model, output_mode="coco_rle", **params.as_kwargs())
    predictor = _CachedPredictor(engine, embedding)
    generator.predictor = predictor
    if limits is not None:
        generator.budget = _Budget(limits, work.points)
    started = time.perf_counter()
    records = mask_nms(generator.generate(image), params.mask_nms_thresh)
    seconds = time.perf_counter() - started
    for record in records:  # plain JSON types
        record["bbox"] = [int(v) for v in record["bbox"]]
        record["area"] = int(record["area"])
        record["predicted_iou"] = float(record["predicted_iou"])
        record["stability_score"] = float(record["stability_score"])
        record["crop_box"] = [int(v) for v in record["crop_box"]]
        record["point_coords"] = [[float(x), float(y)] for x, y in record["point_coords"]]
    return EverythingResult(records, work.points, predictor.encoder_runs, seconds)
