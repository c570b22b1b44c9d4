"""Segment everything: every instance in an image, by SAM's automatic mask generator.

The method is ``segment_anything.SamAutomaticMaskGenerator``'s own (a grid of point
prompts, predicted-IoU and stability filters, box NMS, optional crop layers and small
region removal), run by that class itself, so results match it. The one change: when
the generator asks for the embedding of the whole image and the engine has it cached,
it gets the cached one instead of running the image encoder again. Crops are new
images to the encoder, as in SAM.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import generate_crop_boxes

from .engine import ImageEmbedding


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
    """A ``SamPredictor`` that takes a known embedding for images of its original size.

    ``SamAutomaticMaskGenerator`` calls ``set_image`` once per crop; the full-image crop
    has the original size and gets ``embedding``; other crops run the encoder.
    """

    def __init__(self, model: Sam, embedding: ImageEmbedding) -> None:
        super().__init__(model)
        self.cached = embedding
        self.encoder_runs = 0

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if tuple(image.shape[:2]) != tuple(self.cached.original_size):
            self.encoder_runs += 1
            super().set_image(image, image_format)
            return
        self.reset_image()
        self.original_size = tuple(self.cached.original_size)
        self.input_size = tuple(self.cached.input_size)
        self.features = self.cached.embedding
        self.is_image_set = True


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
    model: Sam,
    embedding: ImageEmbedding,
    params: EverythingParams,
    image: np.ndarray | None = None,
) -> EverythingResult:
    """Every instance in the image of ``embedding`` (HxW original size).

    ``image`` (HxWx3 uint8 RGB) is only needed with crop layers, whose crops are encoded
    anew; without crops the cached embedding is all the generator uses.
    """
    if image is None:
        if params.crop_n_layers > 0:
            raise ValueError("crop layers need the image itself, not only its embedding")
        height, width = embedding.original_size
        image = np.broadcast_to(np.zeros(3, dtype=np.uint8), (height, width, 3))
    generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **params.as_kwargs())
    predictor = _CachedPredictor(model, embedding)
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
