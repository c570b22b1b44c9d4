"""The benchmark's pure pieces (scripts/bench.py, scripts/bench_report.py), no timing asserted,
and ``TorchServe.worker_pids`` against the session's real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import (
    CountingSentImages,
    bench_images,
    counter_deltas,
    cpu_label,
    decoder_streams,
    mean_ms,
    microarchitecture,
    one_image_cache_mb,
    parse_sections,
    redis_server,
    requests_per_worker,
    result_label,
    summarize,
)
from bench_report import checks, derived, fmt, hit_rate, plot, render_markdown, shared_derived
from conftest import MODEL


def test_summarize_percentiles() -> None:
    stats = summarize([float(v) for v in range(1, 101)])
    assert stats["n"] == 100
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["min"] == 1.0
    assert summarize([]) == {"n": 0}


def test_decoder_streams_follow_the_service() -> None:
    """A request of up to one decoder call (4 prompts) runs alone; more run one call per
    mask thread side by side, for a model as large as SAM's decoder; where masks are
    large, calls take fewer prompts. A small decoder's calls run one after another."""
    from samserve.service import MASK_PIXELS_PER_CALL, prompt_work

    small = 3 * 100 * 100
    sam = prompt_work((1, 256, 64, 64))
    assert [decoder_streams(n, small, 2, sam) for n in (1, 4, 5, 16, 64)] == [1, 1, 2, 2, 2]
    assert [decoder_streams(n, small, 1, sam) for n in (1, 16)] == [1, 1]
    assert decoder_streams(12, small, 4, sam) == 3
    # One prompt's masks fill half a call: 4 prompts are 2 calls.
    assert decoder_streams(4, MASK_PIXELS_PER_CALL // 2, 4, sam) == 2
    assert decoder_streams(64, small, 2, prompt_work((1, 96, 32, 32))) == 1


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"cpu family": "25", "model": "17"}, "zen4"),  # EPYC 9004 (Genoa)
        ({"cpu family": "25", "model": "160"}, "zen4"),  # Bergamo (Zen 4c)
        ({"cpu family": "25", "model": "1"}, "zen3"),  # EPYC 7003 (Milan)
        ({"cpu family": "26", "model": "2"}, "zen5"),  # EPYC 9005 (Turin)
        ({"cpu family": "23", "model": "49"}, "zen2"),  # EPYC 7002 (Rome)
        ({"cpu family": "25"}, None),
        ({"cpu family": "25", "model": "x"}, None),
    ],
)
def test_microarchitecture_of_amd_cpus(fields, expected) -> None:
    assert microarchitecture({"vendor_id": "AuthenticAMD", **fields}) == expected


def test_other_vendors_have_no_microarchitecture_in_their_label(monkeypatch) -> None:
    from samserve import matmul

    intel = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"}
    assert microarchitecture(intel) is None
    monkeypatch.setattr(matmul, "cpu_info", lambda: intel)
    assert cpu_label(2) == "cpu-intel-2core"
    monkeypatch.setattr(
        matmul, "cpu_info", lambda: {"vendor_id": "AuthenticAMD", "cpu family": "26", "model": "2"}
    )
    assert cpu_label(4) == "cpu-amd-zen5-4core"
    monkeypatch.setattr(matmul, "cpu_info", lambda: {})
    assert cpu_label(2) == "cpu-other-2core"


def test_clicks_fall_inside_objects() -> None:
    (image,) = bench_images(1, 64, 96)
    assert image.pixels.shape == (64, 96, 3)
    clicks = image.clicks(10)
    assert clicks == image.clicks(10)  # deterministic
    for index, (x, y) in enumerate(clicks):
        assert image.masks[index % len(image.masks), int(y), int(x)]


def _stats(p50: float) -> dict:
    return {"n": 3, "p50": p50, "p95": p50 * 1.5, "p99": p50 * 2, "server_ms": {"decoder": 1.0}}


def _fake_result(warm_ms: float) -> dict:
    """A result with every field the report reads; 1 GFLOP per prompt."""
    # Three rounds: the machine at full speed, at half speed (matmul and requests alike),
    # and a request slowed alone (4x) while the matmul rate held.
    prompts = [
        {"prompts": n, "latency": _stats(10.0 * n**0.5), "per_prompt_ms": 10.0 / n**0.5,
         "server_ms": {"decoder": 5.0 * n**0.5, "encode_masks": 1.0, "total": 9.0 * n**0.5},
         "decoder_streams": 2 if n > 4 else 1,
         "rounds": [{"matmul_gflops": rate, "ms": slow * 10.0 * n**0.5,
                     "decoder_ms": slow * 5.0 * n**0.5}
                    for rate, slow in ((100.0, 1), (50.0, 2), (100.0, 4))]}
        for n in (1, 4, 16, 64)
    ]  # fmt: skip
    # Best mask only: a 1-prompt request in 8 ms, 7 ms per prompt in larger ones.
    prompts_best = [
        {"prompts": n, "latency": _stats(8.0 if n == 1 else 7.0 * n),
         "per_prompt_ms": 8.0 if n == 1 else 7.0, "server_ms": {"decoder": 4.0 * n}}
        for n in (1, 4, 16, 64)
    ]  # fmt: skip
    sizes = {"raw_packed": 1000.0, "raw_bool": 8000.0}
    for output, size in (("rle", 20.0), ("png", 80.0), ("none", 5.0)):
        sizes[output] = {"payload_per_mask": size, "response_per_mask": size + 5,
                         "response_vs_packed": (size + 5) / 1000,
                         "response_vs_bool": 0.0}  # fmt: skip
    return {
        "weights": "random (seed 0)", "parameters": 10, "embedding_mib": 4.0,
        "in_process": {"encoder_ms": 9000.0, "decoder_flops_per_prompt": 10**9,
                       "predict": _stats(10.0)},
        "cold": {"first_request_ms": 1.0, "latency": _stats(9000.0), "server_ms": {},
                 "image_bytes": 100},
        "naive": _stats(9000.0), "warm_rest": _stats(warm_ms), "warm_grpc": _stats(warm_ms),
        "prompts": prompts,
        "prompts_best": prompts_best,
        "concurrency": [{"clients": 1, "requests": 5, "errors": 0, "requests_per_s": 2.0,
                         "latency": _stats(5.0)}],
        "sizes": sizes,
        "memory": {"rss": [{"cached": 0, "rss_mib": 500.0}, {"cached": 1, "rss_mib": 504.0}]},
        "everything": {"points": 64, "sam_generator": _stats(9000.0) | {"masks": 3},
                       "served_rest": _stats(700.0) | {"masks": 3}},
    }  # fmt: skip


def test_report_checks_markdown_and_plot(tmp_path: Path) -> None:
    results = {
        "label": "test", "image_size": "64x96",
        "matmul": {"n": 2048, "gflops": 100.0, "samples": [100.0, 90.0]},
        "counts": {"matmul_repeats": 3}, "machine": {"cpu": "test", "gpu": None,
                                                     "torch_threads_per_worker": 2},
        "models": {"vit_b": _fake_result(11.0), "sam_small": _fake_result(30.0),
                   "broken": {"error": "RuntimeError: checkpoint does not fit"}},
    }  # fmt: skip
    for name in ("vit_b", "sam_small"):
        results["models"][name]["derived"] = derived(results["models"][name], 100.0)
    vit_b = results["models"]["vit_b"]["derived"]
    assert vit_b["warm_rest_vs_floor"] == pytest.approx(1.1)
    assert vit_b["prompts"]["per_prompt_vs_single"]["16"] == pytest.approx(0.25)
    # 16 GFLOP in 20 ms of decoder summed over 2 calls side by side: 1600 GFLOP/s, 16x
    # the matmul rate; 4 prompts in one call: 4 GFLOP in 10 ms.
    assert vit_b["prompts"]["achieved"]["16"]["gflops_decoder"] == pytest.approx(1600.0)
    assert vit_b["prompts"]["achieved"]["4"]["gflops_decoder"] == pytest.approx(400.0)
    # Each request's rate over its own round's matmul rate, median over rounds: 4x and 16x.
    assert vit_b["prompts"]["achieved"]["16"]["vs_round_matmul_end_to_end"] == 4.0
    assert vit_b["prompts"]["achieved"]["16"]["vs_round_matmul_decoder"] == 16.0
    assert "vs_round_matmul_end_to_end" not in vit_b["prompts_best"]["achieved"]["16"]
    assert vit_b["prompts_best"]["per_prompt_vs_single"]["16"] == pytest.approx(7 / 8)
    # 16 GFLOP in 112 ms end to end: 143 GFLOP/s.
    best_16 = vit_b["prompts_best"]["achieved"]["16"]
    assert best_16["gflops_end_to_end"] == pytest.approx(16e3 / 112, rel=1e-3)

    results["checks"] = checks(results)
    verdicts = {(c["model"], c["check"]): c["pass"] for c in results["checks"]}
    assert verdicts[("vit_b", "warm REST p50 / in-process floor p50")] is True
    assert verdicts[("sam_small", "warm REST p50 / in-process floor p50")] is False
    assert verdicts[("vit_b", "naive p50 / warm REST p50")] is True
    assert verdicts[("sam_small", "naive p50 / warm REST p50")] is None  # vit_b only
    three, best = "3 masks per click", "best mask only"
    assert verdicts[("vit_b", f"per-prompt time: 16 prompts / 1-prompt request, {three}")] is True
    assert verdicts[("vit_b", f"per-prompt time: 16 prompts / 1-prompt request, {best}")] is False
    e2e = "16 prompts: achieved / {} GFLOP/s, end-to-end, {}"
    assert verdicts[("vit_b", e2e.format("fastest matmul", best))] is True
    assert verdicts[("vit_b", e2e.format("same-round matmul", three))] is True
    assert ("vit_b", e2e.format("same-round matmul", best)) not in verdicts  # no rounds

    markdown = render_markdown(results)
    row = "| warm REST p50 / in-process floor p50 | sam_small | 3 | <= 1.2 | **fail** |"
    assert row in markdown
    assert "**Not measured**: RuntimeError: checkpoint does not fit" in markdown
    assert "One click per prompt, 3 masks per click:" in markdown
    assert "One click per prompt, best mask only:" in markdown
    assert "### Segment everything: 64 points on a cached image" in markdown
    assert "| samserve, REST | 700 | 3 | 3 |" in markdown
    del results["models"]["sam_small"]["everything"]  # a run from before it was measured
    assert render_markdown(results).count("### Segment everything") == 1
    # Request 40 ms, the handler's total 36: 4 ms outside it (rows without a total: "-").
    assert "| 16 | 40 | 2.5 | 0.25 | 20 | - | 1 | 36 | 4 | 2 | 1,600 | 400 | 16 | 4 |" in markdown
    assert "| 16 | 112 | 7 | 0.875 | 64 | - | - | - | - | 1 |" in markdown
    assert (
        "**100.0 GFLOP/s**, the highest of 2 measurements (at the start and after each "
        "model: 100.0, 90.0)" in markdown
    )
    assert "Unstable host" not in markdown  # 90 of 100: within this host's usual drift
    assert "oneDNN" not in markdown
    results["matmul"] |= {"torch_mm": 40.0, "onednn": 100.0}
    assert "best of 3 (at the start: `torch.mm` 40.0, oneDNN 100.0; the faster counts)" in (
        render_markdown(results)
    )
    results["matmul"]["samples"] = [100.0, 60.0]
    assert "**Unstable host**: the slowest matmul measurement was 0.60 of the fastest" in (
        render_markdown(results)
    )
    pytest.importorskip("matplotlib")
    plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_fmt() -> None:
    assert [fmt(None), fmt(1234567), fmt(0.012345), fmt(12.345), fmt(1234.5)] == [
        "-", "1,234,567", "0.0123", "12.3", "1,234",
    ]  # fmt: skip


@pytest.mark.integration
def test_worker_pids_match_describe(server, rest) -> None:
    workers = rest.describe_model(MODEL)[0]["workers"]
    pids = server.worker_pids()
    for worker in workers:
        pid = pids[int(worker["id"])]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"model_service_worker" in cmdline
        assert worker.get("pid") in (None, pid)
    assert pids


def test_flop_counter_counts_the_decoder_the_same_with_and_without_autograd(micro_sam):
    """samserve's decoder adds a residual in place (baddbmm_) only where autograd is off;
    the benchmark's count of the work it executes must not depend on that."""
    import torch

    from bench import flop_counter
    from samserve import matmul
    from samserve.decoder import predict_masks

    decoder = micro_sam.mask_decoder
    side = micro_sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, decoder.transformer_dim, *side)
    sparse = torch.randn(3, 2, decoder.transformer_dim)
    counts = []
    for backend in ("torch", "onednn"):  # nor on the library that multiplies
        matmul.set_backend(backend)
        for mode in (torch.enable_grad, torch.inference_mode):
            with mode(), flop_counter() as counter:
                predict_masks(decoder, embedding, embedding, sparse, embedding)
            counts.append(counter.get_total_flops())
    assert counts == [counts[0]] * 4 and counts[0] > 0


def test_matmul_rate_is_the_faster_librarys() -> None:
    import torch

    from bench import matmul_gflops

    rate = matmul_gflops(torch.device("cpu"), repeats=1)
    libraries = ["torch_mm"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
    assert rate["n"] == 2048 and set(rate) == {"n", "gflops", *libraries}
    assert rate["gflops"] == max(rate[name] for name in libraries) > 0


# -- the shared-cache section ----------------------------------------------------------------


def test_hit_rate_counts_clicks_answered_without_image_not_cached() -> None:
    assert hit_rate(40, 0) == 1.0
    assert hit_rate(40, 39) == 0.025
    assert hit_rate(3, 1) == 0.6667
    assert hit_rate(0, 0) is None


def test_sections_and_their_label() -> None:
    assert parse_sections("main") == ("main",)
    assert parse_sections(" shared-cache , main") == ("main", "shared-cache")  # run order
    for bad in ("shared", "main,workers", "", ","):
        with pytest.raises(ValueError, match="sections must be some of"):
            parse_sections(bad)
    # Alone, the section's results must not replace a full run's files.
    assert result_label("cpu-intel-2core", ("shared-cache",), False) == "cpu-intel-2core-shared"
    assert result_label("cpu-intel-2core", ("main",), True) == "cpu-intel-2core-quick"
    both = ("main", "shared-cache")
    assert result_label("cpu-intel-2core", both, False) == "cpu-intel-2core"


@pytest.mark.parametrize("image_bytes", [983_040, 10_485_760, 10_485_760 + 12_345, 1000])
def test_one_image_cache_holds_one_image_and_never_two(image_bytes: int) -> None:
    """The tier run's worker cache, as the service sizes it from embedding_cache_mb: a
    second image evicts the first."""
    from samserve.cache import LRUCache
    from samserve.process import MIB

    cache = LRUCache(int(one_image_cache_mb(image_bytes) * MIB), lambda size: size)
    assert cache.put("a", image_bytes)
    assert cache.put("b", image_bytes)
    assert "a" not in cache and "b" in cache


def test_requests_per_worker_and_counter_deltas() -> None:
    workers = [
        {"pid": 1, "embedding_cache": {"hits": 9, "misses": 1}},
        {"pid": 2, "embedding_cache": {"hits": 10, "misses": 0}},
    ]
    assert requests_per_worker(workers) == [10, 10]
    before = {
        "encoder_runs": 2,
        "device": "cpu",
        "embedding_cache": {"hits": 3},
        "shared_store": {"hits": 1, "get_seconds": 0.5, "available": True},
    }
    after = {"encoder_runs": 2, "device": "cpu", "embedding_cache": {"hits": 43},
             "shared_store": {"hits": 41, "get_seconds": 0.9, "available": True},
             "new": 5}  # fmt: skip
    assert counter_deltas(before, after) == {
        "encoder_runs": 0, "embedding_cache": {"hits": 40},
        "shared_store": {"hits": 40, "get_seconds": 0.4},
    }  # fmt: skip
    assert mean_ms(0.4, 40) == 10.0
    assert mean_ms(None, 40) is None and mean_ms(0.4, 0) is None


def test_counting_sent_images_counts_resends_and_attached_requests() -> None:
    from samclient.errors import SamServeError
    from samclient.resend import ResendOptions

    sent = CountingSentImages(ResendOptions(attach_after_resend=2))
    sent.remember("abc", b"jpeg")
    body = {"image_id": "abc", "prompts": []}
    assert sent.prepare(body) is body and sent.attached == 0
    assert "image" in sent.recover(body, SamServeError("image_not_cached", "not here"))
    assert [("image" in sent.prepare(body)) for _ in range(3)] == [True, True, False]
    assert (sent.resends, sent.attached) == (1, 2)


def test_private_redis_server_starts_and_stops(tmp_path: Path) -> None:
    import shutil
    import socket

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    import redis

    with redis_server(tmp_path, 16) as url:
        port = redis.connection.parse_url(url)["port"]
        client = redis.Redis.from_url(url)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        client.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)


def _tier(own_p50: float, shared_p50: float) -> dict:
    return {
        "store_url": "disk:///tmp/s",
        "own": _stats(own_p50) | {"server_ms": {"total": own_p50 - 5}},
        "shared": _stats(shared_p50) | {"server_ms": {"total": shared_p50 - 5}},
        "served_from": {"own_cache_hits": 3, "store_hits": 3, "store_misses": 0,
                        "encoder_runs": 0},
        "store_get_ms": 2.5, "store_put_ms": 1.0, "store_puts_per_click": 1.0,
        "image_not_cached": 0, "image_ms": [8000.0, 7000.0], "encoder_ms": [7000.0, None],
    }  # fmt: skip


def _run(store: str, workers: int, not_cached: int, encoder_runs: int) -> dict:
    return {
        "store_url": "none" if store == "none" else f"disk:///tmp/store-{workers}",
        "workers": workers, "clicks": 40, "image_not_cached": not_cached,
        "hit_rate": hit_rate(40, not_cached), "requests_with_image": not_cached * 4,
        "encoder_runs": encoder_runs, "store_hits": None if store == "none" else workers - 1,
        "requests_per_worker": [41 // workers] * workers, "image_ms": 7500.0,
        "image_server_ms": {"encoder": 7000.0}, "latency": _stats(40.0), "server_ms": {},
    }  # fmt: skip


def _shared_result(shared_p50: dict[str, float], encoder_runs_4: int = 1) -> dict:
    """A shared-cache section's result: own-cache clicks at 40 ms."""
    return {
        "weights": "random (seed 0)", "clicks": 40,
        "runs": [_run("disk", 1, 0, 1), _run("disk", 4, 0, encoder_runs_4),
                 _run("none", 2, 1, 2), _run("none", 4, 3, 4)],
        "tiers": {"cached_image_mib": 10.0, "embedding_cache_mb": 15.0, "rounds": 3,
                  "backends": {b: _tier(40.0, p50) for b, p50 in shared_p50.items()}},
    }  # fmt: skip


def test_shared_cache_checks_and_report() -> None:
    """The section's "must show" rows beside the main ones, in a run of both sections and
    of the section alone (no main measurements: no ratios, no plot)."""
    shared = _shared_result({"disk": 50.0, "redis": 70.0})
    d = shared_derived(shared)
    assert d["shared_vs_own"] == {"disk": 1.25, "redis": 1.75}
    assert d["encoder_vs_shared"]["disk"] == 140.0  # the encoders that ran: 7000 ms
    assert d["most_workers"] == {"workers": 4, "image_not_cached": 0, "encoder_runs": 1}

    both = {
        "label": "test", "image_size": "64x96", "counts": {"matmul_repeats": 3},
        "matmul": {"n": 2048, "gflops": 100.0}, "machine": {"cpu": "test"},
        "models": {"vit_b": _fake_result(11.0) | {"shared_cache": shared},
                   "sam_small": {"model": "sam_small", "weights": "trained",
                                 "shared_cache": _shared_result({"disk": 90.0}, 2)},
                   "broken": {"model": "broken", "shared_cache": {"error": "OSError: x"}}},
    }  # fmt: skip
    both["models"]["vit_b"]["derived"] = derived(both["models"]["vit_b"], 100.0)
    both["checks"] = checks(both)
    verdicts = {(c["model"], c["check"]): (c["value"], c["pass"]) for c in both["checks"]}
    own = "p50 / from the worker's own cache p50"
    assert verdicts[("vit_b", f"click from the shared store (disk) {own}")] == (1.25, True)
    assert verdicts[("vit_b", f"click from the shared store (redis) {own}")] == (1.75, False)
    # The tier target is set for vit_b sizes; the worker checks hold for every model.
    assert verdicts[("sam_small", f"click from the shared store (disk) {own}")] == (2.25, None)
    words = "4 workers, clicks by image_id, store on"
    assert verdicts[("vit_b", f"{words}: image_not_cached answers")] == (0, True)
    assert verdicts[("vit_b", f"{words}: encoder runs, all workers")] == (1, True)
    assert verdicts[("sam_small", f"{words}: encoder runs, all workers")] == (2, False)
    assert ("vit_b", "warm REST p50 / in-process floor p50") in verdicts  # main rows kept
    assert not [c for c in both["checks"] if c["model"] == "broken"]

    markdown = render_markdown(both)
    assert markdown.count("### The shared embedding store") == 3
    assert "### One click (ms, client-side; server stages p50)" in markdown  # vit_b's main
    assert "**Not measured**: OSError: x" in markdown
    assert "| none | 4 | 3 | 0.925 | 12 | 4 | - | 10 / 10 / 10 / 10 | 40 |" in markdown
    assert "| redis | 40 | 80 | 70 | 140 | 1.75 | 3 | 35 | 65 | 2.5 | 1 | 3 / 3 | 0 | 7,000 |" in (
        markdown
    )
    row = "| 4 workers, clicks by image_id, store on: encoder runs, all workers | sam_small | 2 |"
    assert f"{row} <= 1 | **fail** |" in markdown
