"""A naive SAM handler, the benchmark's baseline: ``set_image`` on every request.

This is what the TorchServe SAM examples and most user handlers do: decode the image,
run ``SamPredictor.set_image`` (the ViT image encoder), then ``predict`` each prompt.
Nothing is cached, so every click pays for the encoder. It speaks the samserve request
format (``image`` + ``prompts``; ``image_id`` alone is not supported) and answers with
the same mask records, so ``scripts/bench.py`` can time both servers with one client.
Its masks are dense, as ``predict`` returns them, and pycocotools encodes them as most
handlers do (``mask_records``); the server makes its masks as runs instead.

Built into an archive by ``build_mar.build_archive(..., handler=NAIVE_HANDLER)``; it
reads ``spec`` and ``torch_threads`` from the archive's ``model-config.yaml``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from ts.torch_handler.base_handler import BaseHandler

from samserve import matmul
from samserve.archive import ArchiveConfig
from samserve.errors import RequestError
from samserve.images import decode_image
from samserve.masks import mask_to_png
from samserve.models import build_sam
from samserve.protocol import Limits, SegmentRequest, parse_request
from samserve.timing import ms_since


class NaiveSamHandler(BaseHandler):
    """Decode, encode the image, decode the prompts: all of it for every request."""

    def initialize(self, context: Any) -> None:
        """Build the model from the archive's spec and checkpoint; CUDA when given a GPU."""
        archive = ArchiveConfig.read(
            getattr(context, "model_yaml_config", None),
            context.system_properties,
            context.manifest,
        )
        self.settings, self.device = archive.settings, archive.device
        if self.device.type == "cpu":
            torch.set_num_threads(self.settings.torch_threads or os.cpu_count() or 1)
            matmul.set_backend(self.settings.cpu_matmul)  # the same products as the server's
        sam = build_sam(archive.spec, archive.checkpoint).to(self.device)
        self.predictor = SamPredictor(sam)
        self.limits = Limits.from_settings(self.settings)
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """One JSON body per request; a bad request gets its own 4xx, the rest go on."""
        self.context = context
        out = []
        for index, row in enumerate(data):
            body = row.get("body", row.get("data"))
            content_type = "application/json" if isinstance(body, dict) else None
            try:
                reply = self._segment(parse_request(body, content_type, self.limits))
            except RequestError as err:
                reply = err.to_dict()
                context.set_response_status(err.status, err.code, index)
            context.set_response_content_type(index, "application/json")
            out.append(json.dumps(reply, separators=(",", ":")).encode("utf-8"))
        return out

    @torch.inference_mode()
    def _segment(self, request: SegmentRequest) -> dict[str, Any]:
        """``set_image`` then ``predict`` per prompt; the samserve response body."""
        if request.image is None:
            raise RequestError(400, "missing_image", "the naive handler needs 'image'")
        timing: dict[str, float] = {}
        started = tic = time.perf_counter()
        image = decode_image(
            request.image, self.settings.max_image_bytes, self.settings.max_image_pixels
        )
        timing["decode"] = ms_since(tic)
        tic = time.perf_counter()
        self.predictor.set_image(image)  # HxWx3 uint8 RGB: the image encoder runs
        timing["encoder"] = ms_since(tic)
        results = []
        timing["decoder"] = timing["encode_masks"] = 0.0
        for prompt in request.prompts:
            tic = time.perf_counter()
            masks, scores, _ = self.predictor.predict(
                point_coords=prompt.points,
                point_labels=prompt.labels,
                box=prompt.box,
                multimask_output=request.multimask,
            )  # CxHxW bool masks in the original frame, C scores
            timing["decoder"] += ms_since(tic)
            tic = time.perf_counter()
            results.append({"masks": mask_records(masks, scores, request.output)})
            timing["encode_masks"] += ms_since(tic)
        timing["total"] = ms_since(started)
        height, width = image.shape[:2]
        return {
            "width": width,
            "height": height,
            "cached": False,
            "results": results,
            "timing_ms": {k: round(v, 2) for k, v in timing.items()},
        }


def mask_records(masks: np.ndarray, scores: np.ndarray, output: str) -> list[dict[str, Any]]:
    """Mask records, as samserve sends them, of one prompt's dense masks.

    Arguments:
      masks (np.ndarray): CxHxW bool masks in the original frame (``SamPredictor.predict``).
      scores (np.ndarray): their C predicted IoUs.
      output (str): ``rle``, ``png`` or ``none`` (``parse_request`` checked it).

    Returns:
      (list(dict)): C records, best score first (ties in input order): ``score``,
        ``area`` and ``bbox`` ([x, y, w, h], integer pixels), plus ``segmentation``
        (``{"size": [H, W], "counts": str}``) for ``rle`` or ``png`` (base64 1-bit PNG)
        for ``png``, as ``samserve.masks.encode_masks`` writes them.
    """
    records = []
    for index in np.argsort(-np.asarray(scores), kind="stable"):
        mask = masks[index]
        # pycocotools reads masks column by column: Fortran-order uint8, as it asks.
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        record: dict[str, Any] = {
            "score": float(scores[index]),
            "area": int(mask_utils.area(rle)),
            "bbox": [int(v) for v in mask_utils.toBbox(rle)],
        }
        if output == "rle":
            record["segmentation"] = {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
        elif output == "png":
            record["png"] = mask_to_png(mask)
        records.append(record)
    return records
