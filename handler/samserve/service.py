"""One batch of requests in, one reply per request out: protocol -> engine -> masks.

This is everything the TorchServe handler does, without TorchServe: the handler only
hands over bodies and content types and copies statuses back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch
from segment_anything.modeling import Sam

from . import matmul
from .encoder import EncoderOptions
from .engine import ImageEmbedding, MaskOptions, Prediction, Prompt, SamEngine, StoredLogits
from .errors import RequestError, quote
from .everything import EverythingLimits, plan_everything, segment_everything
from .images import decode_image, image_id_of
from .masks import Mapper, encode_mask_groups, record_payload
from .process import MIB, release_freed_memory
from .protocol import Limits, PromptRequest, SegmentRequest, parse_request
from .settings import Settings
from .store import SharedStore
from .timing import ms_since, stage, timed_stages

logger = logging.getLogger(__name__)


# Full-size mask pixels decoded in one engine call: bounds the worker's memory whatever
# the number of prompts (each mask a call returns may be as large as the image).
MASK_PIXELS_PER_CALL = 1 << 27

# The smallest prompt_work whose decoder calls run side by side, between sam_small's
# and SAM's. Below it a call is mostly Python between short ops, held under the GIL, and
# two threads only take turns at it: such calls run in turn, each on all threads.
MIN_PARALLEL_PROMPT_WORK = 1 << 26


@dataclass
class Reply:
    """An HTTP status and the JSON body to send for one request."""

    status: int
    body: dict[str, Any]
    _encoded: bytes | None = field(default=None, repr=False, compare=False)

    def encode(self) -> bytes:
        """The body as compact UTF-8 JSON, as sent (computed once). orjson: the same bytes
        as ``json.dumps`` with compact separators, much faster on MBs of RLE, and NaN as
        null (valid JSON)."""
        if self._encoded is None:
            self._encoded = orjson.dumps(self.body)
        return self._encoded


@dataclass(frozen=True)
class _DecodedPart:
    """Some prompts of a job, done: per prompt, its mask records and its best mask's
    low-res logits (kept for ``logits_id``); the stages' milliseconds."""

    records: list[list[dict[str, Any]]]
    logits: list[StoredLogits]
    timing_ms: dict[str, float]


_Predicted = tuple[list[Prediction], dict[str, float]]
"""Predictions of some prompts, in order, and the milliseconds of the ``decoder`` and
``upscale`` stages that made them."""


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
        self.limits = Limits.from_settings(settings)
        self.everything_limits = EverythingLimits(
            settings.max_everything_points,
            settings.max_everything_crops,
            settings.max_mask_pixels,
            settings.max_everything_seconds,
        )
        # Masks are made and encoded side by side: upscaling (torch), pycocotools' RLE
        # (samserve.rle) and Pillow's PNG run without the GIL, and each is a few
        # memory-bound passes that torch's intra-op threads barely speed up.
        threads = torch.get_num_threads()  # also fixes this thread's count before the pool's
        self.prompt_threads = settings.prompt_threads or threads
        self.prompt_work = prompt_work(tuple(engine.image_pe.shape))
        self._prompt_pool = ThreadPoolExecutor(
            self.prompt_threads, "samserve-prompts", initializer=_one_torch_thread
        )
        # A GPU sits idle in small decoder calls and pays each one's kernel launches, so
        # there a batch's prompts on one image are decoded together (``_decode_merged``);
        # a CPU keeps its requests' parts (``_decode_batch``).
        self.merge_decoder_calls = engine.device.type == "cuda"

    @classmethod
    def for_model(
        cls, model: Sam, settings: Settings, store: SharedStore | None = None
    ) -> SegmentService:
        """A service for ``model`` with an engine sized by ``settings`` whose second cache
        tier is ``store`` (none: this process's caches only)."""
        engine = SamEngine(
            model,
            embedding_cache_bytes=int(settings.embedding_cache_mb * MIB),
            logits_cache_bytes=int(settings.logits_cache_mb * MIB),
            encoder_batch_size=settings.encoder_batch_size,
            decoder_batch_size=settings.decoder_batch_size,
            store=store,
            encoder=EncoderOptions(
                settings.encoder_dtype, settings.encoder_attention, settings.compile
            ),
        )
        return cls(engine, settings)

    def handle(self, requests: list[tuple[Any, str | None]]) -> list[Reply]:
        """Serve ``(body, content_type)`` pairs; a bad request fails alone, not the batch.

        Requests in one batch that carry the same image share one encoder run, and all
        images the cache lacks are encoded together; an image that cannot be encoded
        fails only the requests that carry it. With ``merge_decoder_calls`` (CUDA) their
        prompts share decoder calls too. Every reply, error or not, is at most
        ``max_response_bytes`` long.
        """
        replies: list[Reply | None] = [None] * len(requests)
        jobs: dict[int, _Job] = {}
        encoder_runs = self.engine.encoder_runs
        for index, (body, content_type) in enumerate(requests):
            started = time.perf_counter()
            with _replying(replies, index):
                jobs[index] = self._load(parse_request(body, content_type, self.limits), started)

        failures = self._embed_missing(list(jobs.values()))
        for index, job in list(jobs.items()):
            if job.image_id in failures and job.embedding is None:
                replies[index] = _error_reply(failures[job.image_id], index)
                del jobs[index]

        planned: dict[int, tuple[_Job, list[list[Prompt]]]] = {}
        for index, job in jobs.items():
            with _replying(replies, index):
                if job.request.everything is not None:
                    replies[index] = Reply(200, self._segment_everything(job))
                else:
                    planned[index] = (job, self._parts(job))
        decode = self._decode_merged if self.merge_decoder_calls else self._decode_batch
        for index, done in decode(planned):
            with _replying(replies, index), closing(done):
                replies[index] = Reply(200, self._results(planned[index][0], done))
        if self.engine.encoder_runs != encoder_runs:
            release_freed_memory()
        return [self._bounded(reply, index) for index, reply in enumerate(replies)]

    def _bounded(self, reply: Reply | None, index: int) -> Reply:
        """``reply``, encoded, if it is at most ``max_response_bytes`` long, else the 413
        that says so: a response over TorchServe's ``max_response_size`` would make the
        frontend drop the worker."""
        if reply is None:  # every path sets a reply; this one is a bug, not the client's
            logger.error("request %d of the batch got no reply", index)
            return Reply(500, _INTERNAL.to_dict())
        try:
            size = len(reply.encode())
        except Exception:
            logger.exception("the reply to request %d of the batch cannot be encoded", index)
            return Reply(500, _INTERNAL.to_dict())
        if size > self.settings.max_response_bytes:
            return Reply(413, self._response_too_large().to_dict())
        return reply

    def _load(self, request: SegmentRequest, started: float) -> _Job:
        """Decode the request's image, or find its cached embedding by ``image_id``."""
        job = _Job(request, started)
        if request.image is not None:
            tic = time.perf_counter()
            job.image_id = image_id_of(request.image, request.decode)
            if request.image_id is not None and request.image_id != job.image_id:
                raise RequestError(
                    400,
                    "image_id_mismatch",
                    f"image_id {quote(request.image_id)} is not the id of the image sent "
                    f"({job.image_id}); send one or the other",
                )
            job.embedding = self.engine.cached_embedding(job.image_id)
            if job.embedding is None or _needs_image(request):
                job.image = decode_image(
                    request.image,
                    self.settings.max_image_bytes,
                    self.settings.max_image_pixels,
                    request.decode,
                )
                self._check_encodable(job.image.shape[:2])
            job.timing_ms["decode"] = ms_since(tic)
        else:
            job.image_id = request.image_id
            if _needs_image(request):
                raise RequestError(
                    400,
                    "image_required",
                    "segment everything with crop layers encodes each crop: send 'image', "
                    "not only 'image_id'",
                )
            job.embedding = self.engine.cached_embedding(request.image_id)
            if job.embedding is None:
                raise RequestError(
                    404,
                    "image_not_cached",
                    f"image_id {quote(request.image_id)} is not cached (never sent, or "
                    "evicted); resend the request with 'image'",
                )
        job.cached = job.embedding is not None
        if request.everything is not None:  # before the encoder runs for it
            size = job.embedding.original_size if job.image is None else job.image.shape[:2]
            plan_everything(self.engine, request.everything, size, self.everything_limits)
        return job

    def _check_encodable(self, size: tuple[int, int]) -> None:
        """400 ``image_too_narrow`` for an image of ``size`` (H, W) that SAM's resize to
        the encoder's input would leave without a row or a column."""
        try:
            self.engine.input_size(size)
        except ValueError as err:
            raise RequestError(
                400,
                "image_too_narrow",
                f"the image cannot be encoded: {err}; crop or pad it to a less elongated shape",
            ) from err

    def _embed_missing(self, jobs: list[_Job]) -> dict[str, Exception]:
        """Run the encoder once per distinct uncached image in the batch; returns the
        exception of each image that could not be encoded, by ``image_id`` (its jobs
        keep no embedding)."""
        missing = {j.image_id: j.image for j in jobs if j.embedding is None}
        failures: dict[str, Exception] = {}
        if not missing:
            return failures
        tic = time.perf_counter()
        embeddings = self.engine.embed(missing, failures)
        encoder_ms = ms_since(tic)
        for job in jobs:
            if job.embedding is None and job.image_id in embeddings:
                job.embedding = embeddings[job.image_id]
                job.timing_ms["encoder"] = encoder_ms
            if not _needs_image(job.request):
                job.image = None
        return failures

    def _parts(self, job: _Job) -> list[list[Prompt]]:
        """The job's prompts, checked against its image, in parts of one decoder call."""
        embedding = job.embedding
        height, width = embedding.original_size
        prompts = [
            self._to_prompt(p, f"prompts[{i}]", job.image_id, width, height)
            for i, p in enumerate(job.request.prompts)
        ]
        masks_per_prompt = _mask_options(job.request).masks_per_prompt
        mask_pixels = len(prompts) * masks_per_prompt * width * height
        if mask_pixels > self.settings.max_mask_pixels:
            raise RequestError(
                400,
                "too_many_mask_pixels",
                f"{len(prompts)} prompts x {masks_per_prompt} masks x {width}x{height} pixels "
                f"= {mask_pixels} mask pixels; at most {self.settings.max_mask_pixels} per "
                "request: send fewer prompts per request, multimask false, best_only true, "
                "or a smaller image",
            )
        # A decoder call's worth of prompts per part, its masks encoded before the part is
        # done: then only a few parts' full-size masks are alive (and in cache).
        chunk = self._part_size(job)
        return [prompts[start : start + chunk] for start in range(0, len(prompts), chunk)]

    def _part_size(self, job: _Job) -> int:
        """Prompts per decoder call on the job's image (``part_size``) for its masks."""
        height, width = job.embedding.original_size
        pixels_per_prompt = _mask_options(job.request).masks_per_prompt * width * height
        return part_size(pixels_per_prompt, self.engine.decoder_batch_size)

    def _results(self, job: _Job, parts: Iterator[_DecodedPart]) -> dict[str, Any]:
        """The job's response body from its decoded ``parts``, in order."""
        results = []
        size = 0
        stages = {"decoder": 0.0, "upscale": 0.0, "encode_masks": 0.0}
        for part in parts:
            for masks, logits in zip(part.records, part.logits):
                size += sum(len(record_payload(m)) for m in masks)
                results.append({"masks": masks, "logits_id": self.engine.store_logits(logits)})
            for name, ms in part.timing_ms.items():
                stages[name] += ms
            self._check_response_size(size)  # give up early, before all the work
        if results:
            job.timing_ms.update(stages)
        return _response(job, results=results)

    def _decode_batch(
        self, planned: dict[int, tuple[_Job, list[list[Prompt]]]]
    ) -> Iterator[tuple[int, Iterator[_DecodedPart]]]:
        """Each planned job's index and its parts decoded, masks encoded, in order.

        Where the batch holds several parts (of one request or of several), they run side
        by side on the mask pool's threads, each on one torch thread with its masks made
        one by one: one part's decoder runs while another's masks are made, and no op
        waits for an OpenMP team. A single part, and every part of a small model's
        (``parallel_parts``), runs here on all torch threads, its masks in the pool.
        A job that fails cancels its own parts not yet started.

        Arguments:
          planned (dict(int, tuple(_Job, list(list(Prompt))))): by request index in the
            batch, the job and its prompts in parts of one decoder call (``_parts``).

        Returns:
          (Iterator(tuple(int, Iterator(_Part)))): per job, in the order of ``planned``,
            its index and its parts' results in order; closing a job's iterator early
            cancels its parts not yet started.
        """
        total = sum(len(parts) for _, parts in planned.values())
        if parallel_parts(total, self.prompt_threads, self.prompt_work) == 1:
            for index, (job, parts) in planned.items():
                yield index, (self._decode_part(job, self._prompt_pool.map, p) for p in parts)
            return
        submitted = {
            index: [self._prompt_pool.submit(self._decode_part, job, map, p) for p in parts]
            for index, (job, parts) in planned.items()
        }
        for index, futures in submitted.items():
            yield index, _outcomes(futures)

    def _decode_part(self, job: _Job, map_fn: Mapper, prompts: list[Prompt]) -> _DecodedPart:
        """Decode ``prompts`` on the job's image and encode their masks, made by ``map_fn``."""
        return _encoded_part(job, *self._predict(job, prompts, map_fn), map_fn)

    def _predict(
        self, job: _Job, prompts: list[Prompt], map_fn: Mapper, batch_size: int | None = None
    ) -> _Predicted:
        """``SamEngine.predict`` of ``prompts`` on the job's image, for its masks, timed.

        Arguments:
          job (_Job): the job whose embedding and ``MaskOptions`` the prompts are decoded
            with.
          prompts (list(Prompt)): the checked prompts (``_parts``), of this job or of jobs
            that share its image and options.
          map_fn (Mapper): makes the full-size masks, one per item.
          batch_size (int or None): prompts per decoder call at most; None: the engine's
            ``decoder_batch_size``.

        Returns:
          (list(Prediction)): per prompt, in order, its masks, scores and logits.
          (dict(str, float)): milliseconds of the ``decoder`` and ``upscale`` stages.
        """
        options = _mask_options(job.request)
        with timed_stages({"decoder": 0.0, "upscale": 0.0}) as stages:
            predictions = self.engine.predict(job.embedding, prompts, options, map_fn, batch_size)
        return predictions, stages

    def _decode_merged(
        self, planned: dict[int, tuple[_Job, list[list[Prompt]]]]
    ) -> Iterator[tuple[int, Iterator[_DecodedPart]]]:
        """Each planned job's index and its prompts decoded, masks encoded, with the
        prompts of all jobs on one image that ask the same ``MaskOptions`` in one
        ``SamEngine.predict`` list: fewer, larger decoder calls, each prompt signature's
        prompts of the whole batch together.

        Calls keep at most a part's prompts (``_part_size``), so a call's masks are as
        bounded as on a CPU. Each job's masks are encoded in its own output format, and
        its ``decoder`` and ``upscale`` stages are those of the calls it shared.

        Arguments:
          planned (dict(int, tuple(_Job, list(list(Prompt))))): by request index in the
            batch, the job and its checked prompts in parts (``_parts``; joined here).

        Returns:
          (Iterator(tuple(int, Iterator(_DecodedPart)))): per job, group by group, its
            index and one part with all its prompts' results, which raises instead
            where its prompts failed the decoder.
        """
        for indices in _decoder_groups(planned).values():
            jobs = [planned[index][0] for index in indices]
            prompts = [[p for part in planned[index][1] for p in part] for index in indices]
            for index, job, outcome in zip(indices, jobs, self._predict_together(jobs, prompts)):
                yield index, _merged_part(job, outcome, self._prompt_pool.map)

    def _predict_together(
        self, jobs: list[_Job], prompts: list[list[Prompt]]
    ) -> list[_Predicted | Exception]:
        """The prompts of ``jobs`` (one image, one ``MaskOptions``) through one
        ``SamEngine.predict`` list, split back per job; where that fails, each job's
        prompts alone.

        Arguments:
          jobs (list(_Job)): jobs on one image that ask the same masks.
          prompts (list(list(Prompt))): per job, its checked prompts.

        Returns:
          (list(tuple(list(Prediction), dict(str, float)) or Exception)): per job, its
            predictions in order and the stages of the calls that made them, or the
            exception its own prompts failed with.
        """
        size = self._part_size(jobs[0])
        if len(jobs) > 1:
            merged = [prompt for each in prompts for prompt in each]
            together = self._try_predict(jobs[0], merged, size)
            if not isinstance(together, Exception):
                return _split(together, [len(each) for each in prompts])
        # Run again per job, as the encoder does: bad prompts fail only their own request.
        return [self._try_predict(job, each, size) for job, each in zip(jobs, prompts)]

    def _try_predict(
        self, job: _Job, prompts: list[Prompt], batch_size: int
    ) -> _Predicted | Exception:
        """``_predict`` with the masks made on the prompt pool, or the exception it raised."""
        try:
            return self._predict(job, prompts, self._prompt_pool.map, batch_size)
        except Exception as err:
            return err

    def _check_response_size(self, size: int) -> None:
        """413 ``response_too_large`` once a response passes ``max_response_bytes``."""
        if size > self.settings.max_response_bytes:
            raise self._response_too_large()

    def _response_too_large(self) -> RequestError:
        return RequestError(
            413,
            "response_too_large",
            f"the response would be over {self.settings.max_response_bytes} bytes "
            f"(max_response_bytes); ask for fewer prompts per request, multimask false, "
            "or output 'none'",
        )

    def _segment_everything(self, job: _Job) -> dict[str, Any]:
        """Every instance in the job's image, by SAM's automatic mask generator."""
        result = segment_everything(
            self.engine, job.embedding, job.request.everything, job.image, self.everything_limits
        )
        self.engine.encoder_runs += result.encoder_runs
        job.timing_ms["everything"] = result.seconds * 1000
        everything = {
            "masks": result.records,
            "count": len(result.records),
            "points": result.points,
            "crop_encoder_runs": result.encoder_runs,
        }
        return _response(job, everything=everything)

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
                    f"{where}.mask_input {quote(prompt.mask_input)} is not cached (never "
                    "returned, or evicted); send the prompt without it",
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
        """Cache counters, encoder runs, device and CPU matmul backend, for the management
        API's describe call."""
        return {
            "encoder_runs": self.engine.encoder_runs,
            "embedding_cache": vars(self.engine.embeddings.stats()),
            "logits_cache": vars(self.engine.logits.stats()),
            "shared_store": None if self.engine.store is None else self.engine.store.stats(),
            "device": str(self.engine.device),
            "cpu_matmul": matmul.backend(),
        }


_INTERNAL = RequestError(
    500, "internal_error", "the server failed on this request; see the model log"
)


def part_size(pixels_per_prompt: int, decoder_batch_size: int) -> int:
    """Prompts per part (one decoder call) of a request whose prompts each make
    ``pixels_per_prompt`` full-size mask pixels: ``decoder_batch_size``, fewer where the
    masks are large (``MASK_PIXELS_PER_CALL``)."""
    return max(1, min(MASK_PIXELS_PER_CALL // pixels_per_prompt, decoder_batch_size))


def prompt_work(embedding_shape: tuple[int, ...]) -> int:
    """A mask-decoder prompt's size, for scheduling: the multiply-adds of one CxC
    projection of a 1xCxhxw embedding's image tokens (a prompt's image-side products are
    about three of these): 2.7e8 at SAM's sizes, 9.4e6 for sam_small."""
    _, channels, height, width = embedding_shape
    return height * width * channels * channels


def parallel_parts(parts: int, prompt_threads: int, work: int) -> int:
    """How many of a batch's ``parts`` (decoder calls, see ``SegmentService._decode_batch``)
    run at once with ``prompt_threads``, for a model of ``prompt_work`` ``work``: up to one per
    thread when there are several and ``work`` is at least ``MIN_PARALLEL_PROMPT_WORK``, else one.
    A request's ``timing_ms`` stages are summed over its parts."""
    return min(parts, prompt_threads) if parts > 1 and work >= MIN_PARALLEL_PROMPT_WORK else 1


def _one_torch_thread() -> None:
    """Run this (pool) thread's torch ops on one intra-op thread: the pool is the
    parallelism, and an OpenMP team of all cores per pool thread would oversubscribe them.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL thread counts; it
    also becomes the count of threads that run their first torch op later, which is why
    ``SegmentService`` reads its own thread's count (and so fixes it) first."""
    torch.get_num_threads()  # this thread's first parallel op would reset the count
    torch.set_num_threads(1)


@contextmanager
def _replying(replies: list[Reply | None], index: int) -> Iterator[None]:
    """Turn an exception inside the block into request ``index``'s error reply."""
    try:
        yield
    except Exception as err:
        replies[index] = _error_reply(err, index)


def _error_reply(error: Exception, index: int) -> Reply:
    """The reply to request ``index`` of a batch that failed with ``error``: its own 4xx
    for a ``RequestError``, else a 500 whose cause goes to the log, not the client."""
    if isinstance(error, RequestError):
        return Reply(error.status, error.to_dict())
    logger.error("request %d of the batch failed", index, exc_info=error)
    return Reply(500, _INTERNAL.to_dict())


def _encoded_part(
    job: _Job, predictions: list[Prediction], stages: dict[str, float], map_fn: Mapper
) -> _DecodedPart:
    """The job's ``predictions`` as a done part: their masks encoded in the job's output
    format by ``map_fn`` (timed into ``stages``, beside the decoder's) and the best mask's
    logits of each."""
    with timed_stages(stages), stage("encode_masks"):
        records = encode_mask_groups(
            [(p.masks, p.scores) for p in predictions], job.request.output, map_fn
        )
    logits = [p.logits_to_store(job.image_id) for p in predictions]
    return _DecodedPart(records, logits, stages)


def _merged_part(
    job: _Job, outcome: _Predicted | Exception, map_fn: Mapper
) -> Iterator[_DecodedPart]:
    """The job's one part from its share of merged decoder calls, encoded when asked
    for (so that a failure to encode is the job's own), or its decoder error raised."""
    if isinstance(outcome, Exception):
        raise outcome
    yield _encoded_part(job, *outcome, map_fn)


def _split(predicted: _Predicted, counts: list[int]) -> list[_Predicted]:
    """``predicted``'s predictions in consecutive runs of ``counts``, each with a copy of
    its stages (each job adds its own ``encode_masks``)."""
    predictions, stages = predicted
    runs, start = [], 0
    for count in counts:
        runs.append((predictions[start : start + count], dict(stages)))
        start += count
    return runs


def _decoder_groups(
    planned: dict[int, tuple[_Job, list[list[Prompt]]]],
) -> dict[tuple[str, MaskOptions], list[int]]:
    """The planned jobs' indices by what one decoder call's prompts share: the image and
    the ``MaskOptions``."""
    groups: dict[tuple[str, MaskOptions], list[int]] = {}
    for index, (job, _) in planned.items():
        groups.setdefault((job.image_id, _mask_options(job.request)), []).append(index)
    return groups


def _outcomes(futures: list[Future[_DecodedPart]]) -> Iterator[_DecodedPart]:
    """The futures' results in order; closed early, it cancels those not yet started."""
    try:
        for future in futures:
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


def _response(job: _Job, **content: Any) -> dict[str, Any]:
    """The response body: the image's id, cache hit and size, ``content`` (``results``
    or ``everything``) and the job's stage timings, ending with ``total``."""
    job.timing_ms["total"] = ms_since(job.started)
    height, width = job.embedding.original_size
    return {
        "image_id": job.image_id,
        "cached": job.cached,
        "width": width,
        "height": height,
        **content,
        "timing_ms": {k: round(v, 2) for k, v in job.timing_ms.items()},
    }


def _mask_options(request: SegmentRequest) -> MaskOptions:
    """What ``request`` asks of the decoder and its masks."""
    return MaskOptions(request.multimask, request.best_only, rle=request.output != "none")


def _needs_image(request: SegmentRequest) -> bool:
    """Whether serving ``request`` needs the decoded image beyond its embedding (crops)."""
    return request.everything is not None and request.everything.crop_n_layers > 0
