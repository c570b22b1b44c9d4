"""One batch of requests in, one reply per request out: protocol -> engine -> masks.

This is everything the TorchServe handler does, without TorchServe: the handler only
hands over bodies and content types and copies statuses back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import ImageEmbedding, Prompt, SamEngine
from .errors import RequestError
from .images import decode_image, image_id_of
from .masks import encode_masks
from .protocol import Limits, PromptRequest, SegmentRequest, parse_request
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """An HTTP status and the JSON body to send for one request."""

    status: int
    body: dict[str, Any]


@dataclass
class _Job:
    """A request on its way through a batch, with its timings so far."""

    request: SegmentRequest
    started: float
    image_id: str | None = None
    image: np.ndarray | None = None
    embedding: ImageEmbedding | None = None
    cached: bool = False
    timing_ms: dict[str, float] = field(default_factory=dict)


class SegmentService:
    """Serves batches of segmentation requests with one ``SamEngine``."""

    def __init__(self, engine: SamEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = Limits(settings.max_prompts, settings.max_points_per_prompt)

    def handle(self, requests: list[tuple[Any, str | None]]) -> list[Reply]:
        """Serve ``(body, content_type)`` pairs; a bad request fails alone, not the batch.

        Requests in one batch that carry the same image share one encoder run, and all
        images the cache lacks are encoded together.
        """
        replies: list[Reply | None] = [None] * len(requests)
        jobs: dict[int, _Job] = {}
        for index, (body, content_type) in enumerate(requests):
            started = time.perf_counter()
            with _replying(replies, index):
                jobs[index] = self._load(parse_request(body, content_type, self.limits), started)

        try:
            self._embed_missing(list(jobs.values()))
        except Exception:
            logger.exception("image encoder failed")
            for index, job in list(jobs.items()):
                if job.embedding is None:
                    replies[index] = Reply(500, _INTERNAL.to_dict())
                    del jobs[index]

        for index, job in jobs.items():
            with _replying(replies, index):
                replies[index] = Reply(200, self._segment(job))
        return replies  # type: ignore[return-value]

    def _load(self, request: SegmentRequest, started: float) -> _Job:
        """Decode the request's image, or find its cached embedding by ``image_id``."""
        job = _Job(request, started)
        if request.image is not None:
            tic = time.perf_counter()
            job.image_id = image_id_of(request.image)
            if request.image_id is not None and request.image_id != job.image_id:
                raise RequestError(
                    400,
                    "image_id_mismatch",
                    f"image_id {request.image_id!r} is not the id of the image sent "
                    f"({job.image_id}); send one or the other",
                )
            job.embedding = self.engine.cached_embedding(job.image_id)
            if job.embedding is None:
                job.image = decode_image(
                    request.image, self.settings.max_image_bytes, self.settings.max_image_pixels
                )
            job.timing_ms["decode"] = _ms_since(tic)
        else:
            job.image_id = request.image_id
            job.embedding = self.engine.cached_embedding(request.image_id)
            if job.embedding is None:
                raise RequestError(
                    404,
                    "image_not_cached",
                    f"image_id {request.image_id!r} is not cached (never sent, or evicted); "
                    "resend the request with 'image'",
                )
        job.cached = job.embedding is not None
        return job

    def _embed_missing(self, jobs: list[_Job]) -> None:
        """Run the encoder once per distinct uncached image in the batch."""
        missing = {j.image_id: j.image for j in jobs if j.embedding is None}
        if not missing:
            return
        tic = time.perf_counter()
        embeddings = self.engine.embed(missing)
        encoder_ms = _ms_since(tic)
        for job in jobs:
            if job.embedding is None:
                job.embedding = embeddings[job.image_id]
                job.image = None
                job.timing_ms["encoder"] = encoder_ms

    def _segment(self, job: _Job) -> dict[str, Any]:
        """Decode the job's prompts and build its response body."""
        embedding = job.embedding
        height, width = embedding.original_size
        prompts = [
            self._to_prompt(p, f"prompts[{i}]", job.image_id, width, height)
            for i, p in enumerate(job.request.prompts)
        ]
        results = []
        if prompts:
            tic = time.perf_counter()
            predictions = self.engine.predict(embedding, prompts, job.request.multimask)
            job.timing_ms["decoder"] = _ms_since(tic)
            tic = time.perf_counter()
            for prediction in predictions:
                best = int(np.argmax(prediction.scores))
                results.append(
                    {
                        "masks": encode_masks(
                            prediction.masks, prediction.scores, job.request.output
                        ),
                        "logits_id": self.engine.store_logits(
                            job.image_id, prediction.low_res_logits[best]
                        ),
                    }
                )
            job.timing_ms["encode_masks"] = _ms_since(tic)
        job.timing_ms["total"] = _ms_since(job.started)
        return {
            "image_id": job.image_id,
            "cached": job.cached,
            "width": width,
            "height": height,
            "results": results,
            "timing_ms": {k: round(v, 2) for k, v in job.timing_ms.items()},
        }

    def _to_prompt(
        self, prompt: PromptRequest, where: str, image_id: str, width: int, height: int
    ) -> Prompt:
        """Check a prompt against its image and resolve ``mask_input`` to logits."""
        if prompt.points is not None:
            outside = (
                (prompt.points[:, 0] < 0)
                | (prompt.points[:, 0] > width)
                | (prompt.points[:, 1] < 0)
                | (prompt.points[:, 1] > height)
            )
            if outside.any():
                first = prompt.points[int(np.argmax(outside))].tolist()
                raise RequestError(
                    400,
                    "point_outside_image",
                    f"{where}: point {first} is outside the {width}x{height} image",
                )
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise RequestError(
                    400,
                    "box_outside_image",
                    f"{where}: box {prompt.box.tolist()} is outside the {width}x{height} image",
                )
        mask_input = None
        if prompt.mask_input is not None:
            stored = self.engine.stored_logits(prompt.mask_input)
            if stored is None:
                raise RequestError(
                    404,
                    "logits_not_cached",
                    f"{where}.mask_input {prompt.mask_input!r} is not cached (never returned, "
                    "or evicted); send the prompt without it",
                )
            if stored.image_id != image_id:
                raise RequestError(
                    400,
                    "mask_input_mismatch",
                    f"{where}.mask_input comes from image {stored.image_id}, not {image_id}",
                )
            mask_input = stored.logits
        return Prompt(prompt.points, prompt.labels, prompt.box, mask_input)

    def stats(self) -> dict[str, Any]:
        """Cache counters and encoder runs, for the management API's describe call."""
        return {
            "encoder_runs": self.engine.encoder_runs,
            "embedding_cache": vars(self.engine.embeddings.stats()),
            "logits_cache": vars(self.engine.logits.stats()),
            "device": str(self.engine.device),
        }


_INTERNAL = RequestError(
    500, "internal_error", "the server failed on this request; see the model log"
)


@contextmanager
def _replying(replies: list[Reply | None], index: int) -> Iterator[None]:
    """Turn an exception inside the block into request ``index``'s error reply."""
    try:
        yield
    except RequestError as err:
        replies[index] = Reply(err.status, err.to_dict())
    except Exception:
        logger.exception("request %d of the batch failed", index)
        replies[index] = Reply(500, _INTERNAL.to_dict())


def _ms_since(tic: float) -> float:
    return (time.perf_counter() - tic) * 1000.0
