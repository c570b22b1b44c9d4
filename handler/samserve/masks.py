"""Encode binary masks for the wire: COCO RLE (pycocotools), PNG, or none."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .rle import encode_rle, rle_of_counts

OUTPUT_FORMATS = ("rle", "png", "none")


@dataclass(frozen=True)
class MaskWindow:
    """An HxW bool mask kept as the window that holds its set pixels.

    ``window`` is an hxw bool array whose top-left pixel is (``top``, ``left``) of the
    full mask; every pixel outside it is False. ``size`` is (H, W). Masks of small
    objects in large images stay small, and so does the work of encoding them. A window
    may be column-major (Fortran order): COCO RLE reads masks column by column, and such
    windows reach pycocotools without a transposing copy. (Masks made from low-res
    logits never exist as pixels: ``MaskRuns``.)
    """

    window: np.ndarray
    top: int
    left: int
    size: tuple[int, int]

    @classmethod
    def empty(cls, size: tuple[int, int]) -> MaskWindow:
        """A mask of ``size`` with no pixel set."""
        return cls(np.zeros((0, 0), dtype=bool), 0, 0, (int(size[0]), int(size[1])))

    @classmethod
    def of(cls, mask: np.ndarray) -> MaskWindow:
        """The tight window of a full HxW bool (or 0/1) mask, in its memory order; a copy:
        later changes to ``mask`` stay out."""
        mask = np.asarray(mask, dtype=bool)
        size = (int(mask.shape[0]), int(mask.shape[1]))
        if mask.size and all(edge.any() for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1])):
            return cls(mask.copy(order="K"), 0, 0, size)  # tight already: no pass over it all
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0:
            return cls.empty(size)
        cols = np.flatnonzero(mask.any(axis=0))
        window = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy(order="K")
        return cls(window, int(rows[0]), int(cols[0]), size)

    @property
    def area(self) -> int:
        """Pixels set."""
        return int(np.count_nonzero(self.window))

    @property
    def bbox(self) -> list[int]:
        """[x, y, w, h] of the set pixels (integer pixels); [0, 0, 0, 0] if none."""
        if not self.window.size:
            return [0] * 4
        return [self.left, self.top, *self.window.shape[::-1]]

    def dense(self) -> np.ndarray:
        """The full HxW bool mask (column-major: the order COCO RLE reads)."""
        mask = np.zeros(self.size, dtype=bool, order="F")
        height, width = self.window.shape
        mask[self.top : self.top + height, self.left : self.left + width] = self.window
        return mask

    def rle(self) -> dict[str, Any]:
        """COCO RLE (compressed, as ``pycocotools.mask.encode`` returns it) of the full mask.

        Small windows: runs are found in the window only (column-major transitions,
        placed at their offsets in the full frame) and pycocotools compresses the counts
        (``rle_of_counts``).
        Windows over a quarter of the frame: pycocotools' own pass over the full mask is
        faster (and runs without the GIL, ``samserve.rle``).
        """
        height, width = self.size
        rows, cols = self.window.shape
        if 4 * rows * cols > height * width:
            return encode_rle(self.window if self.window.shape == self.size else self.dense())
        columns = np.zeros((cols, rows + 2), dtype=bool)  # window columns, padded above/below
        columns[:, 1:-1] = self.window.T
        change = np.flatnonzero(columns[:, 1:] != columns[:, :-1])
        col, row = np.divmod(change, rows + 1)
        starts = (self.left + col) * height + self.top + row
        if rows == height:
            # A run that leaves the bottom of one column and enters the top of the next
            # is one run in column-major order: its end and start coincide and cancel.
            starts, repeats = np.unique(starts, return_counts=True)
            starts = starts[repeats % 2 == 1]
        counts = np.diff(np.concatenate(([0], starts, [height * width])))
        if len(counts) > 1 and counts[-1] == 0:  # the mask ends on the last pixel
            counts = counts[:-1]
        return rle_of_counts(counts, self.size)


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


Mask = MaskWindow | MaskRuns
"""A mask as ``encode_masks`` takes it."""

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
"""``map`` or its like (``ThreadPoolExecutor.map``): results in the order of the items."""


def encode_masks(
    masks: Sequence[Mask] | np.ndarray, scores: np.ndarray, output: str = "rle"
) -> list[dict[str, Any]]:
    """Mask records, as the protocol sends them, for one prompt's masks.

    Arguments:
      masks (Sequence(Mask) or np.ndarray): C masks of HxW, each a ``Mask``, or a
        CxHxW bool array.
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
    groups: Sequence[tuple[Sequence[Mask] | np.ndarray, np.ndarray]],
    output: str = "rle",
    map_fn: Mapper = map,
) -> list[list[dict[str, Any]]]:
    """``encode_masks`` of several prompts' (masks, scores) at once: one ``map_fn`` over
    every mask of every group, so that a pool's threads share all of them (RLE and PNG
    encoding release the GIL)."""
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")
    jobs = []
    for group, (masks, scores) in enumerate(groups):
        if isinstance(masks, np.ndarray):
            masks = [MaskWindow.of(mask) for mask in masks]
        for index in np.argsort(-np.asarray(scores), kind="stable"):
            jobs.append((group, masks[index], float(scores[index])))
    records: list[list[dict[str, Any]]] = [[] for _ in groups]
    for (group, _, _), record in zip(jobs, map_fn(lambda job: _record(*job[1:], output), jobs)):
        records[group].append(record)
    return records


def _record(mask: Mask, score: float, output: str) -> dict[str, Any]:
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
