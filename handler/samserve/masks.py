"""Mask records for the wire: COCO RLE (pycocotools), PNG, or none.

The server makes its full-size masks as their runs, never as pixels (``MaskRuns``, found
by ``samserve.upscale``); a mask's RLE is then its compressed runs, and only PNG output
decodes it to pixels.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .rle import rle_of_counts

OUTPUT_FORMATS = ("rle", "png", "none")


@dataclass(frozen=True)
class MaskRuns:
    """An HxW bool mask made from its runs, never as pixels (``samserve.upscale``).

    ``counts`` is its COCO RLE's compressed counts (bytes, as pycocotools writes them),
    or None for a mask made for its box and area only; ``size`` is (H, W), ``bbox`` [x,
    y, w, h] of the set pixels (integer pixels; [0, 0, 0, 0] if none), as
    ``pycocotools.mask.toBbox`` gives it, and ``area`` the pixels set.
    """

    counts: bytes | None
    size: tuple[int, int]
    bbox: list[int]
    area: int

    @classmethod
    def of_runs(
        cls, runs: np.ndarray, size: tuple[int, int], bbox: list[int], area: int,
        rle: bool = True,
    ) -> MaskRuns:  # fmt: skip
        """The mask whose uncompressed COCO counts are ``runs`` (uint32: the lengths of
        alternate runs of 0s and 1s over the pixels in column-major order, from a run of 0s,
        maybe empty); compressed only with ``rle``, else for its box and area only."""
        size = (int(size[0]), int(size[1]))
        return cls(rle_of_counts(runs, size)["counts"] if rle else None, size, bbox, area)

    @classmethod
    def empty(cls, size: tuple[int, int], rle: bool = True) -> MaskRuns:
        """A mask of ``size`` with no pixel set (``rle``: as in ``of_runs``)."""
        runs = np.array([int(size[0]) * int(size[1])], dtype=np.uint32)
        return cls.of_runs(runs, size, [0] * 4, 0, rle)

    def rle(self) -> dict[str, Any]:
        """COCO RLE (compressed, as ``pycocotools.mask.encode`` returns it)."""
        if self.counts is None:
            raise ValueError("this mask was made for its box and area only (rle=False)")
        return {"size": list(self.size), "counts": self.counts}

    def dense(self) -> np.ndarray:
        """The full HxW bool mask (column-major: the order COCO RLE reads)."""
        return mask_utils.decode(self.rle()).view(bool)


Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
"""``map`` or its like (``ThreadPoolExecutor.map``): results in the order of the items."""


def encode_masks(
    masks: Sequence[MaskRuns], scores: np.ndarray, output: str = "rle"
) -> list[dict[str, Any]]:
    """Mask records, as the protocol sends them, for one prompt's masks.

    Arguments:
      masks (Sequence(MaskRuns)): C masks of HxW.
      scores (np.ndarray): their C predicted IoUs.
      output (str): ``rle``, ``png`` or ``none``.

    Returns:
      (list(dict)): C records, best score first. Each has ``score`` (predicted IoU),
        ``area`` (pixels) and ``bbox`` ([x, y, w, h], integer pixels), plus
        ``segmentation`` (COCO RLE with string counts, as pycocotools writes it) for
        ``rle``, or ``png`` (base64 1-bit PNG) for ``png``; ``none`` carries no mask data.
    """
    return encode_mask_groups([(masks, scores)], output)[0]


def encode_mask_groups(
    groups: Sequence[tuple[Sequence[MaskRuns], np.ndarray]],
    output: str = "rle",
    map_fn: Mapper = map,
) -> list[list[dict[str, Any]]]:
    """``encode_masks`` of several prompts' (masks, scores) at once: one ``map_fn`` over
    every mask of every group, so that a pool's threads share all of them (Pillow's PNG
    encoder releases the GIL)."""
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")
    jobs = []
    for group, (masks, scores) in enumerate(groups):
        for index in np.argsort(-np.asarray(scores), kind="stable"):
            jobs.append((group, masks[index], float(scores[index])))
    records: list[list[dict[str, Any]]] = [[] for _ in groups]
    for (group, _, _), record in zip(jobs, map_fn(lambda job: _record(*job[1:], output), jobs)):
        records[group].append(record)
    return records


def _record(mask: MaskRuns, score: float, output: str) -> dict[str, Any]:
    """One mask's record (see ``encode_masks``)."""
    record: dict[str, Any] = {"score": score, "area": mask.area, "bbox": mask.bbox}
    if output == "rle":
        rle = mask.rle()
        record["segmentation"] = {
            "size": [int(s) for s in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        }
    elif output == "png":
        record["png"] = mask_to_png(mask.dense())
    return record


def mask_to_png(mask: np.ndarray) -> str:
    """Base64 of a 1-bit PNG of an HxW bool mask (decoders read it as 0/255 grayscale)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def record_payload(record: dict[str, Any]) -> str:
    """The bulky part of a mask record (see ``encode_masks``): its RLE counts or its PNG,
    '' for ``none``."""
    if "segmentation" in record:
        return record["segmentation"]["counts"]
    return record.get("png", "")
