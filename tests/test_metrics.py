"""The handler's metrics: the increments between two stats snapshots and the per-request
times (samserve.metrics), metrics.yaml against them and TorchServe's defaults, the lines
the handler makes through TorchServe's own metrics cache, and a real TorchServe that
publishes them on its Prometheus endpoint."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from pathlib import Path

import pytest
import requests
import ts
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from conftest import MODEL, REPO, make_image, micro_server, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.rest_client import RestClient
from samclient.server import TorchServe, read_properties
from samserve import metrics
from samserve.metrics import MetricSpec, Sample, counter_samples, request_samples
from samserve.service import SegmentService
from samserve.settings import Settings
from samserve.store import STORE_URL_ENV, StoreOptions, open_store

METRICS_YAML = REPO / "metrics.yaml"
TS_DEFAULT_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"

# A worker's stats with every counter (samserve.service.SegmentService.stats).
STATS = {
    "encoder_runs": 2,
    "embedding_cache": {
        "hits": 5, "misses": 2, "evictions": 1, "entries": 1, "bytes": 10, "max_bytes": 20
    },
    "logits_cache": {
        "hits": 1, "misses": 0, "evictions": 0, "entries": 3, "bytes": 30, "max_bytes": 40
    },
    "shared_store": {
        "store": "disk", "available": True, "hits": 1, "misses": 1, "invalid": 1,
        "writes": 4, "errors": 1, "skipped": 2, "gets": 3, "puts": 4,
        "get_seconds": 0.25, "put_seconds": 0.5,
    },
    "device": "cpu",
    "cpu_matmul": "torch",
}  # fmt: skip


def by_key(samples: list[Sample]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.metric.name, s.labels): s.value for s in samples}


def test_first_report_counts_from_zero_and_sends_every_counter():
    fresh = copy.deepcopy(STATS)
    fresh["logits_cache"]["evictions"] = 0
    samples = by_key(counter_samples(None, fresh, zeros=True))
    assert samples == {
        ("SamEncoderRuns", ()): 2,
        ("SamCacheHits", ("embedding_cache",)): 5,
        ("SamCacheMisses", ("embedding_cache",)): 2,
        ("SamCacheEvictions", ("embedding_cache",)): 1,
        ("SamCacheHits", ("logits_cache",)): 1,
        ("SamCacheMisses", ("logits_cache",)): 0,
        ("SamCacheEvictions", ("logits_cache",)): 0,
        ("SamCacheHits", ("shared_store",)): 1,
        ("SamCacheMisses", ("shared_store",)): 1,
        ("SamStoreWrites", ()): 4,
        ("SamStoreInvalid", ()): 1,
        ("SamStoreErrors", ()): 1,
        ("SamStoreSkipped", ()): 2,
        ("SamStoreCalls", ("get",)): 3,
        ("SamStoreCalls", ("put",)): 4,
        ("SamStoreSeconds", ("get",)): 0.25,
        ("SamStoreSeconds", ("put",)): 0.5,
    }
    # Without zeros, the counters still at zero are left out.
    assert set(by_key(counter_samples(None, fresh))) == set(samples) - {
        ("SamCacheMisses", ("logits_cache",)),
        ("SamCacheEvictions", ("logits_cache",)),
    }


def test_later_reports_send_only_what_changed_since_the_last():
    after = copy.deepcopy(STATS)
    after["encoder_runs"] += 1
    after["embedding_cache"]["hits"] += 3
    after["embedding_cache"]["entries"] += 1  # a level, not a counter: never sent
    after["shared_store"]["gets"] += 2
    after["shared_store"]["get_seconds"] += 0.125
    assert by_key(counter_samples(STATS, after)) == {
        ("SamEncoderRuns", ()): 1,
        ("SamCacheHits", ("embedding_cache",)): 3,
        ("SamStoreCalls", ("get",)): 2,
        ("SamStoreSeconds", ("get",)): 0.125,
    }
    assert counter_samples(STATS, STATS) == []
    assert {s.value for s in counter_samples(STATS, STATS, zeros=True)} == {0}


def test_a_counter_that_went_down_counts_again_from_zero():
    after = copy.deepcopy(STATS)
    after["embedding_cache"]["misses"] = 1  # below the last report's 2: started again
    assert by_key(counter_samples(STATS, after)) == {("SamCacheMisses", ("embedding_cache",)): 1}


def test_no_shared_store_no_store_metrics_and_odd_values_are_skipped():
    after = {**copy.deepcopy(STATS), "shared_store": None}
    names = {s.metric.name for s in counter_samples(None, after, zeros=True)}
    assert names == {"SamEncoderRuns", "SamCacheHits", "SamCacheMisses", "SamCacheEvictions"}
    tiers = {s.labels for s in counter_samples(None, after, zeros=True)} - {()}
    assert tiers == {("embedding_cache",), ("logits_cache",)}
    # A store appearing later counts from zero; non-numbers (flags, names) are never sent.
    odd = {"encoder_runs": True, "embedding_cache": "n/a", "shared_store": {"hits": "7"}}
    assert counter_samples(after, odd, zeros=True) == []
    assert by_key(counter_samples(after, STATS))[("SamStoreWrites", ())] == 4


def test_request_samples_are_each_requests_encoder_and_decoder_seconds():
    bodies = [
        {"timing_ms": {"decode": 1.0, "encoder": 450.0, "decoder": 35.5, "total": 500.0}},
        {"error": {"code": "bad_request", "message": "no"}},
        None,
        {"timing_ms": {"decoder": 12.0, "upscale": 3.0}},
        {"timing_ms": {"everything": 900.0}},
        {"timing_ms": {"encoder": -1, "decoder": "fast"}},
    ]
    samples = request_samples(bodies)
    assert [(s.metric.name, s.request, s.value) for s in samples] == [
        ("SamEncoderSeconds", 0, 0.45),
        ("SamDecoderSeconds", 0, 0.0355),
        ("SamDecoderSeconds", 3, 0.012),
    ]
    assert all(s.labels == () for s in samples)


def test_sample_dimension_values_follow_the_declared_dimensions():
    sample = Sample(metrics.CACHE_HITS, 3, ("shared_store",))
    assert metrics.CACHE_HITS.dimensions == ("ModelName", "Level", "Tier")
    assert sample.dimension_values("sam") == ("sam", "Model", "shared_store")
    names = [m.name for m in metrics.METRICS]
    assert len(set(names)) == len(names) and all(n.startswith("Sam") for n in names)


# --- metrics.yaml -------------------------------------------------------------------------


def declared(path: Path, section: str = "model_metrics") -> dict[str, MetricSpec]:
    """The metrics a TorchServe metrics config declares in ``section``, by name."""
    parsed = yaml.safe_load(path.read_text())
    out = {}
    for kind, entries in (parsed.get(section) or {}).items():
        for entry in entries or []:
            dims = tuple(entry["dimensions"])
            out[entry["name"]] = MetricSpec(entry["name"], kind, entry["unit"], dims[2:])
            assert dims[:2] == metrics.MODEL_DIMENSIONS or section != "model_metrics", entry
    return out


def test_metrics_yaml_is_torchserves_default_plus_the_handlers_metrics():
    ours, default = (
        yaml.safe_load(METRICS_YAML.read_text()),
        yaml.safe_load(TS_DEFAULT_YAML.read_text()),
    )
    assert ours["dimensions"] == default["dimensions"]
    assert ours["ts_metrics"] == default["ts_metrics"]
    model = declared(METRICS_YAML)
    defaults = declared(TS_DEFAULT_YAML)
    assert {name: model[name] for name in defaults} == defaults
    assert {name: spec for name, spec in model.items() if name not in defaults} == {
        m.name: m for m in metrics.METRICS
    }


def test_config_properties_names_metrics_yaml_and_prometheus():
    config = read_properties(REPO / "config.properties")
    assert (REPO / config["metrics_config"]).resolve() == METRICS_YAML
    assert config["metrics_mode"] == "prometheus"
    assert "model_metrics_auto_detect" not in config  # the set is metrics.yaml's, explicit


def test_an_instance_reads_metrics_config_from_beside_its_config(tmp_path):
    """TorchServe resolves a relative metrics_config from its working directory (the
    instance's), so samclient.server writes it absolute, from the config's directory."""
    written = TorchServe(tmp_path / "run", tmp_path / "store", config=REPO / "config.properties")
    (tmp_path / "run").mkdir()
    assert read_properties(written.write_config())["metrics_config"] == str(METRICS_YAML)
    config = tmp_path / "elsewhere" / "config.properties"
    config.parent.mkdir()
    config.write_text("metrics_config=/etc/samserve/metrics.yaml\n")
    absolute = TorchServe(tmp_path / "run", tmp_path / "store", config=config)
    assert (
        read_properties(absolute.write_config())["metrics_config"] == "/etc/samserve/metrics.yaml"
    )
    overrides = {"metrics_config": "/opt/m.yaml"}
    overridden = TorchServe(
        tmp_path / "run", tmp_path / "store", config=config, overrides=overrides
    )
    assert read_properties(overridden.write_config())["metrics_config"] == "/opt/m.yaml"
    config.write_text("metrics_mode=prometheus\n")  # none named: TorchServe's default
    assert "metrics_config" not in read_properties(absolute.write_config())


# --- the handler, in-process, through TorchServe's metrics cache --------------------------

# The frontend's pattern for a metric line after "[METRICS]" (org.pytorch.serve.metrics.Metric)
FRONTEND_LINE = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),"
    r"([^,]+)(,(.*))?"
)


def metric_lines(text: str) -> list[tuple[str, float, dict[str, str], str | None]]:
    """(name, value, dimensions, type) of each metric line in a log, read as the frontend
    reads them; a line it could not read fails the test."""
    out = []
    for line in text.splitlines():
        if "[METRICS]" not in line:
            continue
        match = FRONTEND_LINE.fullmatch(line.split("[METRICS]", 1)[1])
        assert match, line
        dims = dict(pair.split(":", 1) for pair in match.group(4).split(","))
        out.append((match.group(1), float(match.group(3)), dims, match.group(6)))
    return out


@pytest.fixture()
def handler(micro_sam, tmp_path, monkeypatch):
    """A SamHandler serving sam_micro with a disk store, as initialize would make it."""
    monkeypatch.syspath_prepend(str(REPO / "handler"))
    import sam_handler

    handler = sam_handler.SamHandler()
    store = open_store(StoreOptions.from_url(f"disk://{tmp_path / 'store'}"), "metrics-test")
    handler.service = SegmentService.for_model(micro_sam, Settings(), store)
    handler.stats_dir = tmp_path / "stats"
    handler.initialized = True
    return handler


@pytest.fixture()
def context(tmp_path) -> Context:
    """A TorchServe worker context whose metrics cache is metrics.yaml's, as the worker
    makes it from ``--metrics-config``."""
    cache = MetricsCacheYamlImpl(str(METRICS_YAML))
    cache.initialize_cache()
    cache.model_name = MODEL
    return Context(MODEL, str(tmp_path), {}, 1, None, "0.12.0", metrics=cache)


def run_batch(handler, context: Context, bodies: list[dict]) -> list[dict]:
    """One batch through ``handle`` as TorchServe's worker calls it."""
    ids = {i: f"request-{i}" for i in range(len(bodies))}
    context.request_ids = ids
    context.metrics.request_ids = ids
    context.request_processor = [
        RequestProcessor({"Content-Type": "application/json"}) for _ in bodies
    ]
    out = handler.handle([{"body": body} for body in bodies], context)
    return [json.loads(reply) for reply in out]


def test_the_handler_sends_lines_the_frontend_reads_with_declared_dimensions(
    handler, context, caplog
):
    image = png_bytes(make_image(48, 64))
    click = [point_prompt([[20, 30]], [1])]
    with caplog.at_level(logging.INFO):
        first = run_batch(handler, context, [segment_request(image, prompts=click)])
    image_id = first[0]["image_id"]
    lines = metric_lines(caplog.text)
    declarations = declared(METRICS_YAML)
    for name, _, dims, kind in lines:
        if name.startswith("Sam"):
            assert list(dims) == list(declarations[name].dimensions), (name, dims)
            assert kind == declarations[name].kind.upper()
            assert (dims["ModelName"], dims["Level"]) == (MODEL, "Model")
    sent = {(n, tuple(d.items())[2:]): v for n, v, d, _ in lines if n.startswith("Sam")}
    # The first report sends every counter, those still at zero too.
    assert sent[("SamEncoderRuns", ())] == 1
    assert sent[("SamCacheMisses", (("Tier", "embedding_cache"),))] == 1
    assert sent[("SamCacheHits", (("Tier", "embedding_cache"),))] == 0
    assert sent[("SamCacheMisses", (("Tier", "shared_store"),))] == 1
    assert sent[("SamStoreErrors", ())] == 0
    assert sent[("SamStoreCalls", (("Op", "put"),))] >= 1
    assert 0 < sent[("SamEncoderSeconds", ())] < 60
    assert ("SamDecoderSeconds", ()) in sent

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_batch(handler, context, [segment_request(image_id=image_id, prompts=click)] * 2)
    sam = [(n, d.get("Tier"), v) for n, v, d, _ in metric_lines(caplog.text) if "Sam" in n]
    # Only what changed: two embedding-cache hits, two decoder times, no encoder run.
    assert ("SamCacheHits", "embedding_cache", 2) in sam
    assert [n for n, _, _ in sam].count("SamDecoderSeconds") == 2
    assert not any(
        n in ("SamEncoderRuns", "SamEncoderSeconds", "SamStoreErrors") for n, _, _ in sam
    )


class RaisingMetrics:
    """A metrics cache whose every call fails."""

    request_ids = None

    def add_metric(self, *args, **kwargs):
        raise RuntimeError("metrics backend is broken")

    def add_time(self, *args, **kwargs):
        pass  # TorchServe's own HandlerTime, sent by BaseHandler.handle outside ours


def test_a_failing_metrics_cache_fails_no_request_and_is_logged(handler, context, caplog):
    context.metrics = RaisingMetrics()
    image = png_bytes(make_image(48, 64))
    with caplog.at_level(logging.WARNING):
        replies = run_batch(
            handler, context, [segment_request(image, prompts=[point_prompt([[9, 9]], [1])])]
        )
        again = run_batch(handler, context, [segment_request(image_id=replies[0]["image_id"])])
    assert "results" in replies[0] and again[0]["image_id"] == replies[0]["image_id"]
    failures = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert failures and all(r.levelno == logging.WARNING for r in failures)
    assert "metrics backend is broken" in failures[0].getMessage()
    # The traceback comes once per metric, not on every batch.
    traced = [r.getMessage().split()[1] for r in failures if r.exc_info]
    assert len(traced) == len(set(traced))
    # The counters moved on: nothing failed is sent twice once the cache works again.
    assert handler._reported is not None


def test_a_failing_delta_fails_no_request(handler, context, caplog, monkeypatch):
    monkeypatch.setattr("sam_handler.counter_samples", _raise)
    with caplog.at_level(logging.WARNING):
        replies = run_batch(handler, context, [segment_request(png_bytes(make_image(40, 40)))])
    assert "image_id" in replies[0]
    assert "metrics of this batch not sent" in caplog.text


def _raise(*args, **kwargs):
    raise ValueError("no")


# --- a real TorchServe ----------------------------------------------------------------------

CLICKS = 3
PROMETHEUS_LINE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """The Prometheus endpoint's samples: (name, labels) -> value."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        match = PROMETHEUS_LINE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def sam_values(samples, name: str, **labels: str) -> float | None:
    """The value of ``name`` for model ``sam`` with ``labels`` (and only those besides
    ModelName, Level and Hostname), or None."""
    for (sample, have), value in samples.items():
        own = {k: v for k, v in have if k not in ("ModelName", "Level", "Hostname")}
        if sample == name and own == labels and ("ModelName", MODEL) in have:
            assert ("Level", "Model") in have and any(k == "Hostname" for k, _ in have)
            return value
    return None


@pytest.mark.integration
def test_torchserve_publishes_the_handlers_metrics(tmp_path, checkpoints, monkeypatch):
    """sam_micro with a disk store: an image, then clicks by its image_id; the Prometheus
    endpoint has every Sam* metric, equal to the worker's own counters (describe)."""
    monkeypatch.setenv(STORE_URL_ENV, f"disk://{tmp_path / 'store'}")
    with micro_server(tmp_path, checkpoints["sam_micro"], 580) as server:
        rest = RestClient(server.inference_url, server.management_url, server.key_source())
        click = [point_prompt([[20, 30]], [1])]
        image_id = rest.predict(
            MODEL, segment_request(png_bytes(make_image(48, 64)), prompts=click)
        )["image_id"]
        for i in range(CLICKS):
            rest.predict(
                MODEL, segment_request(image_id=image_id, prompts=[point_prompt([[8 + i, 9]], [1])])
            )
        stats = rest.describe_model(MODEL, customized=True)[0]["customizedMetadata"]
        # The frontend reads the worker's lines as they come: wait for the last batch's.
        deadline = time.monotonic() + 30
        while True:
            samples = scrape(server)
            hits = sam_values(samples, "SamCacheHits", Tier="embedding_cache")
            if hits == CLICKS or time.monotonic() > deadline:
                break
            time.sleep(0.25)

    def counter(name: str, **labels: str) -> float | None:
        # TorchServe 0.12's Prometheus client names a counter's sample as declared (no _total).
        return sam_values(samples, name, **labels)

    assert counter("SamEncoderRuns") == stats["encoder_runs"] == 1
    assert counter("SamCacheHits", Tier="embedding_cache") == CLICKS
    assert counter("SamCacheMisses", Tier="embedding_cache") == 1
    for tier in ("embedding_cache", "logits_cache"):
        assert counter("SamCacheHits", Tier=tier) == stats[tier]["hits"]
        assert counter("SamCacheMisses", Tier=tier) == stats[tier]["misses"]
        assert counter("SamCacheEvictions", Tier=tier) == stats[tier]["evictions"]
    store = stats["shared_store"]
    assert counter("SamCacheHits", Tier="shared_store") == store["hits"]
    assert counter("SamCacheMisses", Tier="shared_store") == store["misses"] >= 1
    assert counter("SamStoreWrites") == store["writes"] >= 1
    assert counter("SamStoreInvalid") == store["invalid"] == 0
    assert counter("SamStoreErrors") == store["errors"] == 0
    assert counter("SamStoreSkipped") == store["skipped"] == 0
    for op in ("get", "put"):
        assert counter("SamStoreCalls", Op=op) == store[f"{op}s"]
        assert math.isclose(counter("SamStoreSeconds", Op=op), store[f"{op}_seconds"], rel_tol=1e-6)
    assert sam_values(samples, "SamEncoderSeconds_count") == 1
    assert 0 < sam_values(samples, "SamEncoderSeconds_sum") < 60
    assert sam_values(samples, "SamDecoderSeconds_count") == 1 + CLICKS
    # TorchServe's own model metrics are still there beside them.
    assert any(name == "ts_inference_requests_total" for name, _ in samples)
