"""Held-out mIoU of a SAM model on synthetic shapes, through the served protocol.

Evaluation talks JSON requests and responses (docs/protocol.md), so the same code
measures a model in-process (``SegmentService``) and a real TorchServe (``RestClient``):
every transform and encoding step is inside what is measured.

    python scripts/evaluate.py --checkpoint models/sam_small_shapes.pth --spec sam_small
    python scripts/evaluate.py --checkpoint training/runs/NAME/checkpoint.pth --out-of-family 50

``--out-of-family N`` also measures N images of ``training.shapes.out_of_family``: shape
families, textures and backgrounds that training never draws (the number that predicts how
a model does on what it has never seen), prompt metrics and object counts reported apart.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samclient.body import segment_request
from samclient.masks import decode_segmentation

from .checkpoints import model_state
from .prompts import corrective_click, mask_box, random_pixel
from .shapes import OUT_OF_FAMILY_SEED, out_of_family
from .synthetic import HELDOUT_SEED, VALIDATION_SEED, Sample, dataset

Predict = Callable[[dict[str, Any]], dict[str, Any]]
HELDOUT_COUNT = 100
HELDOUT_LONG_SIDE = (300, 900)


def heldout(count: int = HELDOUT_COUNT) -> list[Sample]:
    """The fixed held-out set: seed ``HELDOUT_SEED``, never used in training."""
    return list(dataset(HELDOUT_SEED, count, HELDOUT_LONG_SIDE))


def validation(count: int) -> list[Sample]:
    """The validation set (seed ``VALIDATION_SEED``) settings are tuned on; drawn like
    the held-out set, disjoint from it and from training."""
    return list(dataset(VALIDATION_SEED, count, HELDOUT_LONG_SIDE))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two HxW bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


NEAR_BEST = 0.02
"""IoU within which the picked mask counts as near the best of three: masks that close differ
by a few edge pixels, which a strict "best" counts as a miss."""


def evaluate_sample(predict: Predict, sample: Sample, rng: np.random.Generator) -> dict[str, list]:
    """Per-instance scores for one image: four requests, one prompt per instance each."""
    truths = list(sample.masks)
    points = [random_pixel(m, rng) for m in truths]
    boxes = [mask_box(m) for m in truths]

    first = predict(
        segment_request(
            _png(sample.image), prompts=[{"points": [p], "labels": [1]} for p in points]
        )
    )
    image_id = first["image_id"]
    out: dict[str, list] = {k: [] for k in ("point", "oracle", "best_is_best", "near_best",
                                            "box", "point_box", "refine")}  # fmt: skip
    refine_prompts = []
    for truth, point, result in zip(truths, points, first["results"]):
        masks = [decode_segmentation(m) for m in result["masks"]]  # best score first
        ious = [iou(m, truth) for m in masks]
        out["point"].append(ious[0])
        out["oracle"].append(max(ious))
        out["best_is_best"].append(float(ious[0] >= max(ious) - 1e-9))
        out["near_best"].append(float(ious[0] >= max(ious) - NEAR_BEST))
        click, label = corrective_click(masks[0], truth, rng)
        refine_prompts.append(
            {"points": [point, click], "labels": [1, label], "mask_input": result["logits_id"]}
        )

    for key, prompts in (
        ("box", [{"box": b} for b in boxes]),
        ("point_box", [{"points": [p], "labels": [1], "box": b} for p, b in zip(points, boxes)]),
        ("refine", refine_prompts),
    ):
        response = predict(segment_request(image_id=image_id, prompts=prompts, multimask=False))
        for truth, result in zip(truths, response["results"]):
            out[key].append(iou(decode_segmentation(result["masks"][0]), truth))
    return out


def evaluate(predict: Predict, samples: list[Sample], seed: int = HELDOUT_SEED) -> dict[str, Any]:
    """mIoU over every instance of ``samples`` for each prompt kind.

    ``point`` is one foreground click with the best-scoring of three masks (``oracle``:
    the best of the three by IoU; ``best_score_is_best_mask``: how often they agree;
    ``best_score_near_best_mask``: how often the picked one is within ``NEAR_BEST`` of it);
    ``box`` the exact box; ``point_box`` both; ``refine_round1``/``refine_round2`` a
    second click in the error region of the first answer, with its logits as
    ``mask_input``.
    """
    rng = np.random.default_rng([seed, 1])
    totals: dict[str, list] = {}
    for sample in samples:
        for key, values in evaluate_sample(predict, sample, rng).items():
            totals.setdefault(key, []).extend(values)
    mean = {k: round(float(np.mean(v)), 4) for k, v in totals.items()}
    return {
        "images": len(samples),
        "instances": len(totals["point"]),
        "point": mean["point"],
        "point_oracle": mean["oracle"],
        "box": mean["box"],
        "point_box": mean["point_box"],
        "refine_round1": mean["point"],
        "refine_round2": mean["refine"],
        "best_score_is_best_mask": mean["best_is_best"],
        "best_score_near_best_mask": mean["near_best"],
    }


COUNT_PARAMS: dict[str, Any] = {
    "points_per_side": 16,
    "pred_iou_thresh": 0.7,
    "stability_score_thresh": 0.9,
    "box_nms_thresh": 0.5,
    "min_mask_region_area": 20,
    "mask_nms_thresh": 0.8,
}
"""Segment-everything parameters for counting with the small shipped model, the three
thresholds chosen by ``tune_count`` on 30 validation images (docs/model_card.md). SAM's
defaults, 0.88 / 0.95 and no mask NMS, suit the official checkpoints."""


def count_objects(
    predict: Predict, samples: list[Sample], params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Object counts by segment everything against ground truth, over ``samples``.

    ``exact_count_rate`` is the share of images whose mask count equals the number of
    instances; masks are also matched one-to-one to instances at IoU >= 0.5 (greedy,
    best IoU first) for ``recall`` and ``precision``.
    """
    params = COUNT_PARAMS if params is None else params
    found = [
        [decode_segmentation(m) for m in _everything(predict, sample, params)]
        for sample in samples
    ]
    return {"images": len(samples), "params": params, **_count_scores(found, samples)}


def _everything(predict: Predict, sample: Sample, params: dict[str, Any]) -> list[dict]:
    """The segment-everything records of ``sample``'s image."""
    return predict(segment_request(_png(sample.image), everything=params))["everything"]["masks"]


def _count_scores(found: list[list[np.ndarray]], samples: list[Sample]) -> dict[str, float]:
    """``count_objects``' scores of the masks ``found`` in each of ``samples``."""
    exact, errors, matched, truths = 0, [], 0, 0
    for masks, sample in zip(found, samples, strict=True):
        exact += len(masks) == len(sample.masks)
        errors.append(abs(len(masks) - len(sample.masks)))
        matched += _matches(masks, list(sample.masks))
        truths += len(sample.masks)
    return {
        "exact_count_rate": round(exact / len(samples), 4),
        "mean_abs_count_error": round(float(np.mean(errors)), 4),
        "recall": round(matched / max(truths, 1), 4),
        "precision": round(matched / max(sum(map(len, found)), 1), 4),
    }


COUNT_GRID: dict[str, list[Any]] = {
    "pred_iou_thresh": [0.5, 0.6, 0.7],
    "stability_score_thresh": [0.85, 0.9, 0.95],
    "mask_nms_thresh": [1.0, 0.8, 0.6],
}
"""What ``tune_count`` tries; the other ``COUNT_PARAMS`` stay as they are."""


def tune_count(
    predict: Predict, samples: list[Sample], grid: dict[str, list[Any]] | None = None
) -> list[dict[str, Any]]:
    """``count_objects`` for every combination of ``grid`` on ``samples`` (use the
    validation set), best first: highest exact-count rate, then lowest count error.

    Mask NMS only drops records, so each image runs once per combination of the other
    parameters, and every ``mask_nms_thresh`` is applied to those records here, by the
    server's own ``mask_nms``.
    """
    from samserve.everything import mask_nms

    grid = COUNT_GRID if grid is None else grid
    thresholds = grid.get("mask_nms_thresh", [COUNT_PARAMS["mask_nms_thresh"]])
    others = {name: values for name, values in grid.items() if name != "mask_nms_thresh"}
    results = []
    for values in itertools.product(*others.values()):
        params = {**COUNT_PARAMS, **dict(zip(others, values))}
        records = [_everything(predict, s, {**params, "mask_nms_thresh": 1.0}) for s in samples]
        for threshold in thresholds:
            found = [[decode_segmentation(m) for m in mask_nms(r, threshold)] for r in records]
            results.append({
                "images": len(samples),
                "params": {**params, "mask_nms_thresh": threshold},
                **_count_scores(found, samples),
            })  # fmt: skip
    return sorted(results, key=lambda r: (-r["exact_count_rate"], r["mean_abs_count_error"]))


def grid_ceiling(samples: list[Sample], image_size: int) -> dict[str, float]:
    """The best mask IoU a SAM of ``image_size`` input could reach, bounded by its grid alone.

    SAM's decoder predicts masks on a grid 4x its token grid (``image_size / 4`` a side),
    which ``Sam.postprocess_masks`` upsamples bilinearly to the input frame and then to the
    image. Each true mask goes the same way with its area share on that grid as the logit
    (above 0.5 is inside): what is lost is lost to the grid's resolution, not to the weights.

    Returns:
      (dict): mean IoU over every instance (``all``) and per shape kind.
    """
    import torch
    import torch.nn.functional as F
    from segment_anything.utils.transforms import ResizeLongestSide

    low = image_size // 4
    ious: dict[str, list[float]] = {}
    for sample in samples:
        h, w = sample.image.shape[:2]
        fh, fw = ResizeLongestSide.get_preprocess_shape(h, w, image_size)
        for mask, kind in zip(sample.masks, sample.kinds, strict=True):
            frame = torch.zeros(1, 1, image_size, image_size)
            truth = torch.from_numpy(mask.astype(np.float32))[None, None]
            frame[..., :fh, :fw] = F.interpolate(truth, (fh, fw), mode="area")
            grid = F.interpolate(frame, (low, low), mode="area")
            up = F.interpolate(grid, (image_size, image_size), mode="bilinear")[..., :fh, :fw]
            back = F.interpolate(up, (h, w), mode="bilinear")[0, 0].numpy() > 0.5
            ious.setdefault(kind, []).append(iou(back, mask))
    every = [v for values in ious.values() for v in values]
    return {"all": round(float(np.mean(every)), 4)} | {
        kind: round(float(np.mean(values)), 4) for kind, values in sorted(ious.items())
    }


def _matches(masks: list[np.ndarray], truths: list[np.ndarray]) -> int:
    """Greedy one-to-one matches at IoU >= 0.5 between predicted and true masks."""
    pairs = sorted(
        ((iou(m, t), i, j) for i, m in enumerate(masks) for j, t in enumerate(truths)),
        reverse=True,
    )
    used_masks, used_truths = set(), set()
    for overlap, i, j in pairs:
        if overlap < 0.5:
            break
        if i not in used_masks and j not in used_truths:
            used_masks.add(i)
            used_truths.add(j)
    return len(used_masks)


def in_process_predictor(spec_name: str | None, checkpoint: Path | None) -> Predict:
    """A ``Predict`` backed by ``SegmentService`` in this process (no TorchServe).

    Arguments:
      spec_name (str | None): the model's spec; None to take it from a training checkpoint.
      checkpoint (Path | None): a state dict (``models/*.pth``), a training checkpoint
        (``training/runs/*/checkpoint.pth``, full or compact) or None for random weights.
    Returns:
      (Predict): JSON request -> JSON response.
    """
    from samserve.models import SamSpec, build_sam, spec_by_name
    from samserve.service import SegmentService
    from samserve.settings import Settings

    spec_dict, state = model_state(checkpoint) if checkpoint is not None else (None, None)
    if spec_name is None and spec_dict is None:
        raise ValueError(f"{checkpoint} names no spec: pass --spec")
    spec = SamSpec.from_dict(spec_dict) if spec_name is None else spec_by_name(spec_name)
    sam = build_sam(spec)
    if state is not None:
        sam.load_state_dict(state)
    # Measuring must not fail on a busy machine: segment everything gets all the time it needs.
    service = SegmentService.for_model(sam, Settings(max_everything_seconds=3600.0))

    def predict(body: dict[str, Any]) -> dict[str, Any]:
        reply = service.handle([(body, "application/json")])[0]
        if reply.status != 200:
            raise RuntimeError(f"request failed: {reply.body}")
        return reply.body

    return predict


def main(argv: list[str] | None = None) -> int:
    """Command line: held-out metrics, out-of-family metrics, or counting thresholds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("models/sam_small_shapes.pth"),
        help="a state dict, or a training checkpoint (which names its own spec)",
    )
    parser.add_argument("--spec", default=None, help="default: sam_small, or the checkpoint's")
    parser.add_argument(
        "--count", type=int, default=HELDOUT_COUNT, help="held-out images (0: none)"
    )
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    parser.add_argument(
        "--count-objects",
        type=int,
        default=0,
        metavar="N",
        help="also count objects by segment everything on N held-out images",
    )
    parser.add_argument(
        "--out-of-family",
        type=int,
        default=0,
        metavar="N",
        help="also prompt metrics and object counts on N out-of-family held-out images",
    )
    parser.add_argument(
        "--tune-count",
        type=int,
        default=0,
        metavar="N",
        help="only choose counting thresholds (COUNT_GRID) on N validation images",
    )
    parser.add_argument(
        "--grid-ceiling",
        type=int,
        default=0,
        metavar="SIZE",
        help="only the IoU ceiling of a SIZE-input model's mask grid (no model), on the held-out"
        " and out-of-family images",
    )
    args = parser.parse_args(argv)
    if args.grid_ceiling:
        ceilings = {"heldout": grid_ceiling(heldout(args.count), args.grid_ceiling)}
        if args.out_of_family:
            samples = out_of_family(args.out_of_family)
            ceilings["out_of_family"] = grid_ceiling(samples, args.grid_ceiling)
        print(json.dumps(ceilings, indent=2))
        return 0
    spec = args.spec
    if spec is None and model_state(args.checkpoint)[0] is None:
        spec = "sam_small"
    predict = in_process_predictor(spec, args.checkpoint)
    if args.tune_count:
        for result in tune_count(predict, validation(args.tune_count)):
            print(json.dumps(result), flush=True)
        return 0
    metrics: dict[str, Any] = {}
    if args.count:
        metrics = evaluate(predict, heldout(args.count))
    if args.count_objects:
        metrics["count_objects"] = count_objects(predict, heldout(args.count_objects))
    if args.out_of_family:
        samples = out_of_family(args.out_of_family)
        metrics["out_of_family"] = {
            **evaluate(predict, samples, OUT_OF_FAMILY_SEED),
            "count_objects": count_objects(predict, samples),
        }
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
