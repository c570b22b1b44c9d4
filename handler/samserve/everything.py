"""Segment everything: every instance in an image, by SAM's automatic mask generator.

The method is ``segment_anything.SamAutomaticMaskGenerator``'s own (a grid of point
prompts, predicted-IoU and stability filters, box NMS, optional crop layers and small
region removal), run by that class itself. Three changes, none to the method:

* When the generator asks for the embedding of the whole image and the engine has it
  cached, it gets the cached one instead of running the image encoder again (crops are
  new images to the encoder, as in SAM).
* Its batch step (``_EngineGenerator``) decodes the points with the engine's mask decoder
  (``samserve.decoder``: SAM's logits to float rounding, a few prompts per call), where
  SAM's repeats the embedding for every point of a batch of 64 (on a CPU, a ``vit_b``
  sized decoder then took 144 instead of about 20 ms per point).
* It drops the masks the predicted-IoU filter drops before making their full-size
  logits, not after.

So the records are SAM's but for float rounding: a mask whose predicted IoU, stability
score or box overlap lies within rounding of a threshold may go either way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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


@dataclass(frozen=True)
class EverythingParams:
    """``SamAutomaticMaskGenerator``'s parameters, with its defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SamAutomaticMaskGenerator``."""
        return dataclasses.asdict(self)


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
        multimask output; ``decoder_batch_size`` points per decoder call."""
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        step = self.engine.decoder_batch_size
        parts = [
            self.engine.decode(
                self.embedding,
                (coords[start : start + step, None, :], labels[start : start + step]),
                multimask=True,
                defer_padding=True,  # no full-size pixel reads the padding's logits
            )[:2]
            for start in range(0, coords.shape[0], step)
        ]
        return torch.cat([low for low, _ in parts]), torch.cat([iou for _, iou in parts])


class _EngineGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` whose batch step decodes with the engine
    (``_CachedPredictor.decode_points``) and makes full-size logits only for the masks
    that pass the predicted-IoU filter, ``UPSCALE_BATCH`` at a time.

    SAM's ``_process_batch`` upsamples all 3 x ``points_per_batch`` masks to the image's
    size before that filter, which reads only the decoder's scores: 2.3 GB of float
    logits per batch of 64 points on a 1500x2000 image, most of them dropped. Here the
    filter runs on the low-res logits; the upsampling (SAM's) treats each mask alone, and
    every later step is SAM's, in SAM's order.
    """

    def _process_batch(
        self,
        points: np.ndarray,
        im_size: tuple[int, ...],
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        predictor = self.predictor
        coords = torch.as_tensor(
            predictor.transform.apply_coords(points, im_size),
            dtype=torch.float,
            device=predictor.device,
        )
        low_res, iou_preds = predictor.decode_points(coords)
        kept = MaskData(
            low_res=low_res.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(low_res.shape[1], axis=0)),
        )
        del low_res
        if self.pred_iou_thresh > 0.0:
            kept.filter(kept["iou_preds"] > self.pred_iou_thresh)
        data = MaskData()
        # At least one part, maybe empty: SAM's later steps read the batch's fields.
        for start in range(0, max(len(kept["iou_preds"]), 1), UPSCALE_BATCH):
            part = slice(start, start + UPSCALE_BATCH)
            data.cat(self._full_size(kept, part, predictor, crop_box, orig_size))
        return data

    def _full_size(
        self,
        kept: MaskData,
        part: slice,
        predictor: SamPredictor,
        crop_box: list[int],
        orig_size: tuple[int, ...],
    ) -> MaskData:
        """The rest of SAM's ``_process_batch`` for the ``part`` of the masks ``kept``."""
        orig_h, orig_w = orig_size
        model = predictor.model
        logits = model.postprocess_masks(
            kept["low_res"][part, None], predictor.input_size, predictor.original_size
        )[:, 0]
        data = MaskData(
            masks=logits, iou_preds=kept["iou_preds"][part], points=kept["points"][part]
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
"""Masks whose full-size logits ``_EngineGenerator`` makes at a time (1500x2000: 96 MB of
float logits)."""


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
) -> EverythingResult:
    """Every instance in the image of ``embedding`` (HxW original size), decoded by
    ``engine``.

    ``image`` (HxWx3 uint8 RGB) is only needed with crop layers, whose crops are encoded
    anew; without crops the cached embedding is all the generator uses.
    """
    if image is None:
        if params.crop_n_layers > 0:
            raise ValueError("crop layers need the image itself, not only its embedding")
        height, width = embedding.original_size
        image = np.broadcast_to(np.zeros(3, dtype=np.uint8), (height, width, 3))
    generator = _EngineGenerator(engine.model, output_mode="coco_rle", **params.as_kwargs())
    predictor = _CachedPredictor(engine, embedding)
    generator.predictor = predictor
    started = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - started
    _, layers = generate_crop_boxes(
        image.shape[:2], params.crop_n_layers, params.crop_overlap_ratio
    )
    points = sum(len(generator.point_grids[layer]) for layer in layers)
    for record in records:  # plain JSON types
        record["bbox"] = [int(v) for v in record["bbox"]]
        record["area"] = int(record["area"])
        record["predicted_iou"] = float(record["predicted_iou"])
        record["stability_score"] = float(record["stability_score"])
        record["crop_box"] = [int(v) for v in record["crop_box"]]
        record["point_coords"] = [[float(x), float(y)] for x, y in record["point_coords"]]
    return EverythingResult(records, points, predictor.encoder_runs, seconds)
