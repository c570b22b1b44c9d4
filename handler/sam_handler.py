"""TorchServe handler for SAM: a thin adapter from TorchServe's contract to samserve.

All model, cache and protocol logic lives in the ``samserve`` package (which travels
inside the archive); this module is the only one that imports ``ts``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from samserve import worker_stats
from samserve.archive import ArchiveConfig
from samserve.metrics import Sample, Stats, counter_samples, request_samples
from samserve.models import build_sam
from samserve.process import release_freed_memory, tune_process
from samserve.service import Reply, SegmentService
from samserve.settings import Settings
from samserve.store import SharedStore, StoreOptions, open_store, resolve_store_url

logger = logging.getLogger(__name__)

JSON = "application/json"
# The response header by which TorchServe's frontend ends a streamed gRPC call
# (RequestInput.TS_STREAM_NEXT in pytorch/serve's frontend).
STREAM_NEXT = "ts_stream_next"
# Where in the model's directory its workers publish their counters (samserve.worker_stats).
STATS_DIR = ".samserve-workers"


class SamHandler(BaseHandler):
    """initialize / preprocess / inference / postprocess around ``SegmentService``."""

    # The counters last sent as metrics (None: none yet), and the metrics whose sending
    # failed and was logged with its traceback (later failures are logged briefly).
    _reported: Stats | None = None
    _metric_failures: frozenset[str] = frozenset()

    def initialize(self, context: Any) -> None:
        """Tune the process (``samserve.process.tune_process``), then build the model from
        the archive's spec and checkpoint, on CUDA when present."""
        archive = ArchiveConfig.read(
            getattr(context, "model_yaml_config", None),
            context.system_properties,
            context.manifest,
        )
        settings, self.device = archive.settings, archive.device
        threads = settings.torch_threads or _default_threads(context)
        tuning = tune_process(self.device, threads, settings.cpu_matmul, os.environ)

        sam = build_sam(archive.spec, archive.checkpoint).to(self.device)
        store = _open_store(settings, archive)
        self.service = SegmentService.for_model(sam, settings, store)
        # Loading the checkpoint freed a copy of its weights into the heap, which keeps
        # freed blocks: the worker would hold that copy until its first encoder run.
        release_freed_memory()
        self.model = sam
        self.manifest = context.manifest
        # The model's workers share its directory: each publishes its counters there.
        self.stats_dir = Path(context.system_properties["model_dir"]) / STATS_DIR
        worker_stats.publish(self.stats_dir, os.getpid(), self.service.stats())
        self.initialized = True
        shared = "none" if store is None else store.name
        logger.info(
            "SAM %s on %s, %s, shared store %s, settings %s",
            archive.spec.name, self.device, tuning, shared, settings,
        )  # fmt: skip
        if tuning.openmp_warning:
            logger.warning(tuning.openmp_warning)

    def preprocess(self, data: list[dict[str, Any]]) -> list[tuple[Any, str | None]]:
        """(body, content type) of each request in the batch."""
        requests = []
        for index, row in enumerate(data):
            name = "body" if "body" in row else "data" if "data" in row else next(iter(row), None)
            body = row.get(name) if name is not None else None
            content_type = self._content_type(index, name)
            if content_type == JSON and not isinstance(body, (dict, list, bytes, bytearray)):
                # TorchServe has already decoded this JSON body, to something that is not
                # an object (a string, number, true/false or null): hand back JSON text so
                # the protocol reports the body's real type ("got null", not "empty").
                body = json.dumps(body)
            requests.append((body, content_type))
        return requests

    def inference(self, data: list[tuple[Any, str | None]], *args: Any, **kwargs: Any) -> list:
        replies = self.service.handle(data)
        stats = self.service.stats()
        worker_stats.publish(self.stats_dir, os.getpid(), stats)
        self._report_metrics(stats, replies)
        return replies

    def _report_metrics(self, stats: Stats, replies: list[Reply]) -> None:
        """Send the counters' increments since the last batch and each request's encoder
        and decoder time (``samserve.metrics``) through TorchServe's metrics API. Nothing
        here raises: a metric that cannot be sent is logged, and the batch's replies go."""
        try:
            first = self._reported is None
            samples = counter_samples(self._reported, stats, zeros=first)
            # Moved on before sending, so that a failed send is lost, never counted twice.
            self._reported = stats
            samples += request_samples([reply.body for reply in replies])
            model_name = self.context.model_name
        except Exception:
            logger.warning("metrics of this batch not sent", exc_info=True)
            return
        for sample in samples:
            try:
                self._send_metric(sample, model_name)
            except Exception as error:
                name = sample.metric.name
                known = name in self._metric_failures
                self._metric_failures |= {name}
                logger.warning(
                    "metric %s not sent: %s: %s", name, type(error).__name__, error,
                    exc_info=not known,
                )  # fmt: skip

    def _send_metric(self, sample: Sample, model_name: str) -> None:
        """One sample to the context's metrics cache, its dimensions named and ordered as
        metrics.yaml declares them (the frontend reads their values by position)."""
        metric = sample.metric
        values = sample.dimension_values(model_name)
        self.context.metrics.add_metric(
            metric.name,
            sample.value,
            metric.unit,
            idx=sample.request,
            dimensions=[Dimension(n, v) for n, v in zip(metric.dimensions, values)],
            metric_type=MetricTypes(metric.kind),
        )

    def postprocess(self, data: list[Reply]) -> list[bytes]:
        """Compact JSON bodies; each request's own status (4xx for bad input); over gRPC,
        each reply marked as the last of its stream."""
        out = []
        for index, reply in enumerate(data):
            self.context.set_response_content_type(index, JSON)
            if reply.status != 200:
                error = reply.body["error"]
                self.context.set_response_status(reply.status, error["code"], index)
            if self._over_grpc(index):
                # TorchServe's frontend ends a StreamPredictions call on the reply whose
                # ts_stream_next is "false", and drops the worker when a reply to one has
                # none (GRPCJob.response reads it unchecked). The worker cannot tell a
                # StreamPredictions call from a Predictions one, which ignores the header,
                # so every gRPC reply is a whole answer marked last.
                self.context.set_response_header(index, STREAM_NEXT, "false")
            out.append(reply.encode())
        return out

    def describe_handle(self) -> str:
        """Counters shown by describe with ``?customized=true``: this worker's (cache tiers,
        encoder runs, device), every running worker's as last published (``workers``),
        and their sums (``total``)."""
        stats = self.service.stats()
        worker_stats.publish(self.stats_dir, os.getpid(), stats)
        workers = worker_stats.collect(self.stats_dir)
        total = worker_stats.summed(workers)
        return json.dumps({**stats, "pid": os.getpid(), "workers": workers, "total": total})

    def _over_grpc(self, index: int) -> bool:
        """Whether request ``index`` came through TorchServe's gRPC inference API: its
        frontend passes no headers with those (InferenceImpl.prediction), while a REST
        request carries at least its Content-Length (Netty's HttpObjectAggregator)."""
        processor = self.context.request_processor[index]
        properties = processor.get_request_properties() if processor else {}
        return not any(isinstance(value, str) for value in properties.values())

    def _content_type(self, index: int, name: str | None) -> str | None:
        """Content type of the request's input: per-parameter first, then the header."""
        processor = self.context.request_processor[index]
        properties = processor.get_request_properties() if processor else {}
        per_input = properties.get(name) if name else None
        if isinstance(per_input, dict) and per_input.get("content-type"):
            return per_input["content-type"]
        for key, value in properties.items():
            if key.lower() == "content-type" and isinstance(value, str):
                return value
        return None


def _open_store(settings: Settings, archive: ArchiveConfig) -> SharedStore | None:
    """The shared store the settings (or ``SAMSERVE_STORE_URL``) name for this archive's
    model; None when it is ``none`` or the weights are not fixed by a checkpoint."""
    options = StoreOptions.from_url(resolve_store_url(settings.store_url, os.environ))
    model_id = archive.model_id() if options.backend != "none" else None
    return None if model_id is None else open_store(options, model_id)


def _default_threads(context: Any) -> int:
    """The machine's cores shared among the model's running workers (at least one each).

    TorchServe tells a worker nothing about how many workers its model has (neither its
    load request, its environment nor its context; ``ts/model_service_worker.py``), but
    starts every worker of a model in the model's directory (``WorkerLifeCycle.java``):
    the workers are TorchServe's Python worker processes found running there. Workers
    started together (registration, or restart) count each other; one added later by
    the scale API counts those before it, which keep their threads.
    """
    model_dir = os.path.realpath(context.system_properties.get("model_dir") or os.getcwd())
    workers = 0
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            in_model_dir = os.readlink(f"/proc/{pid}/cwd") == model_dir
            command = Path(f"/proc/{pid}/cmdline").read_bytes() if in_model_dir else b""
        except OSError:  # gone meanwhile, or another user's
            continue
        workers += b"model_service_worker" in command
    return max(1, (os.cpu_count() or 1) // max(1, workers))
