"""The worker's cache and timing metrics, for TorchServe's metrics API: what changed between
two ``SegmentService.stats()`` snapshots, and each request's encoder and decoder time.

The handler (``sam_handler.py``) sends these after every batch through its context's
metrics cache; ``metrics.yaml`` (beside config.properties, ``metrics_config``) declares
them, as TorchServe 0.12's frontend drops a model metric its metrics config does not name
(unless ``model_metrics_auto_detect``). On the Prometheus endpoint (``/metrics`` on the
metrics port, ``metrics_mode=prometheus``) each has the labels ModelName, Level (``Model``)
and then its own, with Hostname added by the frontend:

| metric | type | own labels | what |
| --- | --- | --- | --- |
| SamEncoderRuns | counter | | images through the image encoder |
| SamCacheHits | counter | Tier | lookups found in a cache tier |
| SamCacheMisses | counter | Tier | lookups not found there |
| SamCacheEvictions | counter | Tier | entries a worker cache dropped for room |
| SamStoreWrites | counter | | entries the shared store took |
| SamStoreInvalid | counter | | store entries read but rejected (misses not in SamCacheMisses) |
| SamStoreErrors | counter | | shared-store calls that failed |
| SamStoreSkipped | counter | | shared-store calls not made during a back-off |
| SamStoreCalls | counter | Op | shared-store calls that returned |
| SamStoreSeconds | counter | Op | their time; / SamStoreCalls is the mean latency |
| SamEncoderSeconds | histogram | | per request that ran the encoder, its time |
| SamDecoderSeconds | histogram | | per request with prompts, its mask-decoder time |

Tier is ``embedding_cache`` or ``logits_cache`` (each worker's own caches, named as in
describe's counters) or ``shared_store`` (the store the workers share; no evictions); Op
is ``get`` or ``put``. Counters are sums over the model's workers; the shared-store
metrics are absent while a model has no store. Times are seconds, the unit of the
Prometheus client's default histogram buckets, which TorchServe uses. The encoder time is
that of the batch's encoder call, which every request whose image it encoded waited for;
likewise on CUDA, where a batch's requests on one image share decoder calls, each of them
reports the decoder time of the calls it shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A worker's counters, as ``SegmentService.stats`` makes them.
Stats = Mapping[str, Any]

# The dimensions TorchServe's own model metrics carry, first in every metric here.
MODEL_DIMENSIONS = ("ModelName", "Level")
MODEL_LEVEL = "Model"


@dataclass(frozen=True)
class MetricSpec:
    """One metric as TorchServe's metrics config declares it under ``model_metrics``."""

    name: str
    kind: str  # counter, gauge or histogram: a ts.metrics.metric_type_enum.MetricTypes value
    unit: str
    labels: tuple[str, ...] = ()  # its own dimensions, after MODEL_DIMENSIONS

    @property
    def dimensions(self) -> tuple[str, ...]:
        """All its dimension names, in the order their values are sent."""
        return (*MODEL_DIMENSIONS, *self.labels)


@dataclass(frozen=True)
class Sample:
    """A value to send: an increment for a counter, an observation for a histogram."""

    metric: MetricSpec
    value: float
    labels: tuple[str, ...] = ()  # values of ``metric.labels``, in order
    request: int | None = None  # the request's index in its batch; None: the batch's

    def dimension_values(self, model_name: str) -> tuple[str, ...]:
        """Values of ``metric.dimensions`` for model ``model_name``."""
        return (model_name, MODEL_LEVEL, *self.labels)


ENCODER_RUNS = MetricSpec("SamEncoderRuns", "counter", "Count")
CACHE_HITS = MetricSpec("SamCacheHits", "counter", "Count", ("Tier",))
CACHE_MISSES = MetricSpec("SamCacheMisses", "counter", "Count", ("Tier",))
CACHE_EVICTIONS = MetricSpec("SamCacheEvictions", "counter", "Count", ("Tier",))
STORE_WRITES = MetricSpec("SamStoreWrites", "counter", "Count")
STORE_INVALID = MetricSpec("SamStoreInvalid", "counter", "Count")
STORE_ERRORS = MetricSpec("SamStoreErrors", "counter", "Count")
STORE_SKIPPED = MetricSpec("SamStoreSkipped", "counter", "Count")
STORE_CALLS = MetricSpec("SamStoreCalls", "counter", "Count", ("Op",))
STORE_SECONDS = MetricSpec("SamStoreSeconds", "counter", "Seconds", ("Op",))
ENCODER_SECONDS = MetricSpec("SamEncoderSeconds", "histogram", "Seconds")
DECODER_SECONDS = MetricSpec("SamDecoderSeconds", "histogram", "Seconds")

METRICS = (
    ENCODER_RUNS,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_EVICTIONS,
    STORE_WRITES,
    STORE_INVALID,
    STORE_ERRORS,
    STORE_SKIPPED,
    STORE_CALLS,
    STORE_SECONDS,
    ENCODER_SECONDS,
    DECODER_SECONDS,
)

# Each counter's source in the stats: (metric, its label values, section or None for the
# top level, key).
_COUNTERS: tuple[tuple[MetricSpec, tuple[str, ...], str | None, str], ...] = (
    (ENCODER_RUNS, (), None, "encoder_runs"),
    (CACHE_HITS, ("embedding_cache",), "embedding_cache", "hits"),
    (CACHE_MISSES, ("embedding_cache",), "embedding_cache", "misses"),
    (CACHE_EVICTIONS, ("embedding_cache",), "embedding_cache", "evictions"),
    (CACHE_HITS, ("logits_cache",), "logits_cache", "hits"),
    (CACHE_MISSES, ("logits_cache",), "logits_cache", "misses"),
    (CACHE_EVICTIONS, ("logits_cache",), "logits_cache", "evictions"),
    (CACHE_HITS, ("shared_store",), "shared_store", "hits"),
    (CACHE_MISSES, ("shared_store",), "shared_store", "misses"),
    (STORE_WRITES, (), "shared_store", "writes"),
    (STORE_INVALID, (), "shared_store", "invalid"),
    (STORE_ERRORS, (), "shared_store", "errors"),
    (STORE_SKIPPED, (), "shared_store", "skipped"),
    (STORE_CALLS, ("get",), "shared_store", "gets"),
    (STORE_CALLS, ("put",), "shared_store", "puts"),
    (STORE_SECONDS, ("get",), "shared_store", "get_seconds"),
    (STORE_SECONDS, ("put",), "shared_store", "put_seconds"),
)

# The reply's ``timing_ms`` stages sent per request.
_STAGES = (("encoder", ENCODER_SECONDS), ("decoder", DECODER_SECONDS))


def counter_samples(before: Stats | None, after: Stats, zeros: bool = False) -> list[Sample]:
    """The counters' increments from ``before`` to ``after``.

    Arguments:
      before (Stats or None): the snapshot last reported; None: none yet, so each counter
        counts from zero.
      after (Stats): the current snapshot.
      zeros (bool): also send counters that did not change (a worker's first report, so
        that every series exists from its start); otherwise they are left out.

    Returns:
      (list(Sample)): one per counter ``after`` has. A counter that
        went down (its counters started again) counts from zero; a non-numeric one, or a
        tier ``after`` lacks (no shared store), is left out.
    """
    samples = []
    for metric, labels, section, key in _COUNTERS:
        now = _number(after, section, key)
        if now is None:
            continue
        then = _number(before, section, key) if before is not None else None
        delta = now if then is None or now < then else now - then
        if delta > 0 or zeros:
            samples.append(Sample(metric, delta, labels))
    return samples


def request_samples(bodies: Sequence[Mapping[str, Any] | None]) -> list[Sample]:
    """Each request's encoder and decoder seconds, from its reply body's ``timing_ms``.

    Arguments:
      bodies (list(dict or None)): the batch's reply bodies, in request order.

    Returns:
      (list(Sample)): per request with the stage (an error reply has none), its time.
    """
    samples = []
    for index, body in enumerate(bodies):
        timing = body.get("timing_ms") if isinstance(body, Mapping) else None
        if not isinstance(timing, Mapping):
            continue
        for stage, metric in _STAGES:
            ms = timing.get(stage)
            if _is_number(ms) and ms >= 0:
                samples.append(Sample(metric, ms / 1000.0, request=index))
    return samples


def _number(stats: Stats, section: str | None, key: str) -> int | float | None:
    """``stats[section][key]`` (``stats[key]`` at the top level) if it is a number."""
    table = stats if section is None else stats.get(section)
    value = table.get(key) if isinstance(table, Mapping) else None
    return value if _is_number(value) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
