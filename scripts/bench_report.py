"""Turn the results of ``scripts/bench.py`` into ratios, "must show" checks, Markdown and a plot.

Pure functions of the results dict (as written to ``docs/bench/<label>.json``): times in
ms, sizes in bytes, rates in GFLOP/s. Nothing here measures anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUTPUT_FORMATS = ("rle", "png", "none")
# The "must show" checks: (key in derived ratios, bound, True if at most).
TARGETS = {
    "warm_rest_vs_floor": (1.2, True),
    "naive_vs_warm_rest": (100.0, False),  # applies to vit_b only
    "per_prompt_vs_single": (0.8, True),
    "achieved_vs_matmul": (0.6, False),
    "rle_vs_packed": (0.05, True),
    "shared_vs_own": (1.5, True),  # applies to vit_b only
    "workers_not_cached": (0, True),
    "workers_encoder_runs": (1, True),
}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 4 decimals; None if either is missing or 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def hit_rate(clicks: int, not_cached: int) -> float | None:
    """The share of ``clicks`` by ``image_id`` answered without ``image_not_cached``, to 4
    decimals; None without clicks."""
    if clicks <= 0:
        return None
    return round((clicks - not_cached) / clicks, 4)


# The series of requests with 1..64 prompts: key in the results, words in the report.
PROMPT_SERIES = {"prompts": "3 masks per click", "prompts_best": "best mask only"}


def derived(result: dict[str, Any], matmul_gflops: float) -> dict[str, Any]:
    """One model's ratios: warm vs floor, naive vs warm, RLE size, and for each prompt
    series (``PROMPT_SERIES``) per-prompt cost vs a 1-prompt request and achieved GFLOP/s
    (server decoder time and end-to-end) vs matmul."""
    warm = result["warm_rest"]["p50"]
    flops = result["in_process"]["decoder_flops_per_prompt"]
    out: dict[str, Any] = {
        "warm_rest_vs_floor": ratio(warm, result["in_process"]["predict"]["p50"]),
        "naive_vs_warm_rest": ratio(result["naive"]["p50"], warm),
        "rle_vs_packed": result["sizes"]["rle"]["response_vs_packed"],
    }
    for series in PROMPT_SERIES:
        if series in result:
            out[series] = _series_ratios(result[series], flops, matmul_gflops)
    return out


def decoder_ms(row: dict[str, Any], ms: float | None) -> float | None:
    """A prompt-count row's server decoder ms ``ms`` per core: summed over the decoder
    calls that ran side by side (``decoder_streams``), divided by their number."""
    return None if ms is None else ms / row.get("decoder_streams", 1)


def _series_ratios(
    series: Sequence[dict[str, Any]], flops: float, matmul_gflops: float
) -> dict[str, Any]:
    """Per-prompt time vs the 1-prompt request, and GFLOP/s, for one series of requests:
    against the run's fastest matmul rate, and (rows with ``rounds``) the median over
    rounds of each request's rate against the matmul rate measured just before it."""
    rows = {str(row["prompts"]): row for row in series}  # str keys, as in JSON
    single = rows["1"]["latency"]["p50"] if "1" in rows else None
    achieved = {}
    for count, row in rows.items():
        work = flops * row["prompts"] / 1e6  # GFLOP x 1000: over ms gives GFLOP/s
        decoder = ratio(work, decoder_ms(row, row["server_ms"].get("decoder")))
        end_to_end = ratio(work, row["latency"]["p50"])
        achieved[count] = {
            "gflops_decoder": decoder,
            "gflops_end_to_end": end_to_end,
            "vs_matmul_decoder": ratio(decoder, matmul_gflops),
            "vs_matmul_end_to_end": ratio(end_to_end, matmul_gflops),
        }
        if row.get("rounds"):
            for kind, key in (("decoder", "decoder_ms"), ("end_to_end", "ms")):
                shares = []
                for r in row["rounds"]:
                    ms = decoder_ms(row, r.get(key)) if kind == "decoder" else r.get(key)
                    if ms:
                        shares.append(work / ms / r["matmul_gflops"])
                achieved[count][f"vs_round_matmul_{kind}"] = (
                    round(statistics.median(shares), 4) if shares else None
                )
    return {
        "per_prompt_vs_single": {
            count: ratio(row["per_prompt_ms"], single)
            for count, row in rows.items()
            if count != "1"
        },
        "achieved": achieved,
    }


def shared_derived(shared: dict[str, Any]) -> dict[str, Any]:
    """The shared-cache section's figures of one model: per store backend, the p50 of a
    click from the shared tier over one from the worker's own cache, and the encoder's
    time over a shared-tier click; and the run with the store on and the most workers
    (``most_workers``: its worker count, image_not_cached answers and encoder runs)."""
    out: dict[str, Any] = {"shared_vs_own": {}, "encoder_vs_shared": {}}
    tiers = shared.get("tiers", {})
    for backend, tier in tiers.get("backends", {}).items():
        out["shared_vs_own"][backend] = ratio(tier["shared"].get("p50"), tier["own"].get("p50"))
        out["encoder_vs_shared"][backend] = ratio(
            _median(tier.get("encoder_ms", [])), tier["shared"].get("p50")
        )
    with_store = [run for run in shared.get("runs", []) if run["store_url"] != "none"]
    if with_store:
        most = max(with_store, key=lambda run: run["workers"])
        out["most_workers"] = {
            key: most[key] for key in ("workers", "image_not_cached", "encoder_runs")
        }
    return out


def _shared_items(shared: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The shared-cache section's "must show" rows: (check, target key, value)."""
    d = shared_derived(shared)
    items = [
        (f"click from the shared store ({backend}) p50 / from the worker's own cache p50",
         "shared_vs_own", value)
        for backend, value in d["shared_vs_own"].items()
    ]  # fmt: skip
    if "most_workers" in d:
        most = d["most_workers"]
        words = f"{most['workers']} workers, clicks by image_id, store on"
        items += [
            (f"{words}: image_not_cached answers", "workers_not_cached", most["image_not_cached"]),
            (f"{words}: encoder runs, all workers", "workers_encoder_runs", most["encoder_runs"]),
        ]
    return items


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The "must show" rows of every measured model: value, target, pass (None: n/a)."""
    rows = []
    for name, result in results["models"].items():
        d = result.get("derived")
        items = []
        if d:
            items += _main_items(d)
        shared = result.get("shared_cache")
        if shared and "error" not in shared:
            items += _shared_items(shared)
        for check, key, value in items:
            bound, at_most = TARGETS[key]
            applies = _applies(key, name, result)
            passed = None
            if applies and value is not None:
                passed = value <= bound if at_most else value >= bound
            target = f"{'<=' if at_most else '>='} {bound:g}"
            rows.append(
                {"check": check, "model": name, "value": value, "target": target, "pass": passed}
            )
    return rows


def _main_items(d: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The main section's "must show" rows of one model's ratios: (check, target key, value)."""
    items = [
        ("warm REST p50 / in-process floor p50", "warm_rest_vs_floor", d["warm_rest_vs_floor"]),
        ("naive p50 / warm REST p50", "naive_vs_warm_rest", d["naive_vs_warm_rest"]),
    ]
    for series, words in PROMPT_SERIES.items():
        if series not in d:
            continue
        achieved = d[series]["achieved"].get("16", {})
        items += [
            (f"per-prompt time: {count} prompts / 1-prompt request, {words}",
             "per_prompt_vs_single", v)
            for count, v in d[series]["per_prompt_vs_single"].items()
        ]  # fmt: skip
        items += [
            (f"16 prompts: achieved / {rate} GFLOP/s, {kind.replace('_', '-')}, {words}",
             "achieved_vs_matmul", achieved.get(f"vs_{key}_{kind}"))
            for kind in ("decoder", "end_to_end")
            for key, rate in (("matmul", "fastest matmul"),
                              ("round_matmul", "same-round matmul"))
            if key == "matmul" or f"vs_{key}_{kind}" in achieved
        ]  # fmt: skip
    items.append(
        ("RLE response bytes / raw packed bitmask bytes", "rle_vs_packed", d["rle_vs_packed"])
    )
    return items


def _applies(key: str, name: str, result: dict[str, Any]) -> bool:
    """Whether a target is about this model: the naive ratio and the GFLOP/s rate are set
    for the vit_b-sized decoder (3.6 GFLOP per prompt) and encoder; mask sizes need real
    masks, which random weights do not make. The shared tier's target is set for vit_b's
    4 MiB embeddings against its tens-of-milliseconds click."""
    if key in ("naive_vs_warm_rest", "achieved_vs_matmul", "shared_vs_own"):
        return name == "vit_b"
    if key == "rle_vs_packed":
        return not str(result.get("weights", "")).startswith("random")
    return True


def fmt(value: Any) -> str:
    """A table cell: '-' for None, 3 significant digits below 100, thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines (and a blank line after)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


STAGES = ("encoder", "decoder", "upscale", "encode_masks", "total")


def _latency_row(path: str, stats: dict[str, Any]) -> list[Any]:
    server = stats.get("server_ms", {})
    return [path, stats.get("p50"), stats.get("p95"), stats["n"], *map(server.get, STAGES)]


def model_section(name: str, r: dict[str, Any], image_size: str) -> list[str]:
    """One model's tables: latency, prompts per request, throughput, sizes, memory; and
    the shared embedding store's, where that section ran."""
    out = [f"## {name}", ""]
    if "error" in r:
        out += [f"**Not measured**: {r['error']}", ""]
    elif "warm_rest" in r:
        out += _main_tables(r, image_size)
    if "shared_cache" in r:
        out += shared_section(r["shared_cache"], image_size)
    return out


def _main_tables(r: dict[str, Any], image_size: str) -> list[str]:
    """The main section's tables of one model."""
    random = r["weights"].startswith("random")
    note = " Random weights give noise masks: their sizes say little." if random else ""
    out = [
        f"{r['weights']} weights, {r['parameters']:,} parameters, image embedding "
        f"{r['embedding_mib']} MiB ({r.get('cached_image_mib', '-')} MiB cached per image, with "
        f"its first-block projections); {image_size} JPEG images "
        f"(~{r['cold']['image_bytes']:,} bytes).{note}",
        "",
        "### One click (ms, client-side; server stages p50)",
        "",
    ]
    cold = r["cold"]["latency"] | {"server_ms": r["cold"]["server_ms"]}
    out += table(
        ["path", "p50", "p95", "n", *(f"server {s}" for s in STAGES)],
        [
            _latency_row("in-process floor: SamPredictor.predict", r["in_process"]["predict"]),
            _latency_row("naive handler: image + click, set_image every time", r["naive"]),
            _latency_row("samserve cold: new image + click", cold),
            _latency_row("samserve warm: image_id + click, REST", r["warm_rest"]),
            _latency_row("samserve warm: image_id + click, gRPC", r["warm_grpc"]),
        ],
    )
    out += [
        f"In-process `set_image`: {r['in_process']['encoder_ms']:,.0f} ms; the first served "
        f"request (worker warm-up + encoder): {r['cold']['first_request_ms']:,.0f} ms.",
        "",
    ]
    d = r["derived"]
    flops = r["in_process"]["decoder_flops_per_prompt"]
    executed = r["in_process"].get("executed_flops_per_prompt")
    out += [f"### Prompts per request ({flops / 1e9:.3g} GFLOP per prompt)", ""]
    if executed:
        out += [
            f"GFLOP/s counts SAM's decoder work, {flops / 1e9:.3g} GFLOP per prompt "
            "(`torch.utils.flop_counter` on `SamPredictor.predict_torch`); samserve's "
            f"decoder does the same work in {executed / 1e9:.3g} GFLOP "
            "(`samserve/decoder.py`). The GFLOP/s columns are p50 rates; the shares of "
            "the same-round matmul rate are the median, over the rounds, of each request's "
            "rate divided by the matmul rate measured just before its round. Server stage "
            "times are summed over the decoder calls that ran side by side (each on one "
            "core); the decoder's GFLOP/s divides its time by their number. The server's "
            "total is the handler's wall time; outside it, the response moves through the "
            "worker's socket, the frontend and the client, one after another.",
            "",
        ]
    for series, words in PROMPT_SERIES.items():
        if series not in r:
            continue
        rows = []
        for p in r[series]:
            count = str(p["prompts"])
            achieved = d[series]["achieved"][count]
            rows.append(
                [count, p["latency"]["p50"], p["per_prompt_ms"],
                 d[series]["per_prompt_vs_single"].get(count), p["server_ms"].get("decoder"),
                 p["server_ms"].get("upscale"), p["server_ms"].get("encode_masks"),
                 p["server_ms"].get("total"), _outside(p),
                 p.get("decoder_streams", 1), achieved["gflops_decoder"],
                 achieved["gflops_end_to_end"],
                 achieved.get("vs_round_matmul_decoder"),
                 achieved.get("vs_round_matmul_end_to_end")]
            )  # fmt: skip
        out += [f"One click per prompt, {words}:", ""]
        out += table(
            ["prompts", "request p50 ms", "ms per prompt", "per prompt / 1-prompt request",
             "server decoder ms", "server upscale ms", "server encode_masks ms",
             "server total ms", "outside the handler ms", "decoder calls side by side",
             "GFLOP/s decoder", "GFLOP/s end-to-end", "share of same-round matmul, decoder",
             "share of same-round matmul, end-to-end"],
            rows,
        )  # fmt: skip
    if "everything" in r:  # runs before 2026-12-03 did not measure it
        every = r["everything"]
        sam, served = every["sam_generator"], every["served_rest"]
        out += [
            f"### Segment everything: {every['points']} points on a cached image, SAM's "
            "default thresholds (ms)",
            "",
        ]
        out += table(
            ["path", "p50", "n", "masks found"],
            [["SAM's generator in-process (image already set)", sam["p50"], sam["n"],
              sam["masks"]],
             ["samserve, REST", served["p50"], served["n"], served["masks"]]],
        )  # fmt: skip
    out += ["### Throughput: concurrent clients, each clicking on its own cached image", ""]
    out += table(
        ["clients", "requests", "errors", "requests/s", "p50 ms", "p95 ms", "p99 ms"],
        [[c["clients"], c["requests"], c["errors"], c["requests_per_s"],
          *map(c["latency"].get, ("p50", "p95", "p99"))] for c in r["concurrency"]],
    )  # fmt: skip
    sizes = r["sizes"]
    out += [
        f"### Bytes per mask (raw bitmask: {sizes['raw_packed']:,.0f} packed, "
        f"{sizes['raw_bool']:,.0f} as bool)",
        "",
    ]
    out += table(
        ["output", "mask data", "whole response", "response / packed", "response / bool"],
        [[f, *map(sizes[f].get, ("payload_per_mask", "response_per_mask", "response_vs_packed",
                                 "response_vs_bool"))] for f in OUTPUT_FORMATS],
    )  # fmt: skip
    out += ["### Worker memory vs cached embeddings", ""]
    out += table(
        ["cached embeddings", "worker RSS MiB"],
        [[m["cached"], m["rss_mib"]] for m in r["memory"]["rss"]],
    )
    return out


def shared_section(shared: dict[str, Any], image_size: str) -> list[str]:
    """The shared-cache section's tables of one model: clicks by image_id with 1-4
    workers, store on and off; a click from the shared tier against one from the worker's
    own cache, per store backend."""
    out = ["### The shared embedding store", ""]
    if "error" in shared:
        return [*out, f"**Not measured**: {shared['error']}", ""]
    d = shared_derived(shared)
    out += [
        f"{shared['weights']} weights, {image_size} JPEG images. One image sent once (with "
        f"a click: the encoder runs), then {shared['clicks']} clicks by `image_id` from one "
        "client, one after another; the model registered with one worker and scaled through "
        "the management API; the store `disk://` in a private, empty directory, or `none`. "
        "A click answered `image_not_cached` is sent again with its image by the project's "
        "client, which also attaches the image to its next requests on it (`ResendOptions`); "
        "its latency counts both. Encoder runs and store hits are describe's totals over "
        "the workers; requests per worker come from each worker's own-cache lookups.",
        "",
    ]
    out += table(
        ["store", "workers", "image_not_cached", "hit rate", "requests carrying the image",
         "encoder runs", "store hits", "requests per worker", "click p50 ms", "click p99 ms",
         "image sent: ms"],
        [[run["store_url"].split(":", 1)[0], run["workers"], run["image_not_cached"],
          run["hit_rate"], run["requests_with_image"], run["encoder_runs"], run["store_hits"],
          " / ".join(map(str, run["requests_per_worker"])), run["latency"].get("p50"),
          run["latency"].get("p99"), run["image_ms"]] for run in shared["runs"]],
    )  # fmt: skip
    tiers = shared.get("tiers")
    if not tiers:
        return out
    out += [
        f"A click from the shared tier against one from the worker's own cache: one worker "
        f"whose cache holds one image ({tiers['embedding_cache_mb']:g} MB for "
        f"{tiers['cached_image_mib']:g} MiB per image), two images taking turns, each "
        "clicked twice with the same click: the first finds it in the store (the other "
        "image's clicks evicted it from the worker's cache) and rebuilds its projections, "
        f"the second in the worker's cache; {tiers['rounds']} rounds after one untimed. "
        "Store read and write: mean ms per call over the timed rounds (every click "
        "writes its low-res logits).",
        "",
    ]
    rows = []
    for backend, tier in tiers["backends"].items():
        own, shared_tier, served = tier["own"], tier["shared"], tier["served_from"]
        rows.append(
            [backend, own.get("p50"), own.get("p99"), shared_tier.get("p50"),
             shared_tier.get("p99"), d["shared_vs_own"][backend], own["n"],
             own["server_ms"].get("total"), shared_tier["server_ms"].get("total"),
             tier["store_get_ms"], tier["store_put_ms"],
             f"{served['own_cache_hits']} / {served['store_hits']}", tier["image_not_cached"],
             _median(tier["encoder_ms"]), d["encoder_vs_shared"][backend]]
        )  # fmt: skip
    out += table(
        ["store", "own cache p50 ms", "own p99", "shared tier p50 ms", "shared p99",
         "shared / own p50", "clicks each", "server total own", "server total shared",
         "store read ms", "store write ms", "own-cache / store hits", "image_not_cached",
         "encoder ms (server)", "encoder / shared-tier click"],
        rows,
    )  # fmt: skip
    return out


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None; None if none are."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _outside(row: dict[str, Any]) -> float | None:
    """A prompts row's request p50 less the handler's total p50 (ms): moving the response
    through the worker's socket, the frontend and the client."""
    total = row["server_ms"].get("total")
    return None if total is None else round(row["latency"]["p50"] - total, 3)


def render_markdown(results: dict[str, Any]) -> str:
    """The report: machine, the "must show" checks, then each model's tables."""
    matmul = results["matmul"]
    out = [f"# samserve benchmark: {results['label']}", ""]
    out += table(["machine", ""], list(results["machine"].items()))
    onednn = "onednn" in matmul  # measured beside torch.mm (samserve.matmul)
    libraries = (
        f" (at the start: `torch.mm` {matmul['torch_mm']:,.1f}, oneDNN {matmul['onednn']:,.1f}; "
        "the faster counts)"
        if onednn
        else ""
    )
    out += [
        f"Dense fp32 matmul ({matmul['n']}x{matmul['n']}{'' if onednn else ' `torch.mm`'}, best "
        f"of {results['counts']['matmul_repeats']}{libraries}): **{matmul['gflops']:,.1f} GFLOP/s**"
        + (
            f", the highest of {len(matmul['samples'])} measurements (at the start and after "
            f"each model: {', '.join(f'{g:,.1f}' for g in matmul['samples'])}); the shares "
            "below divide by it."
            if "samples" in matmul
            else "."
        ),
        "",
    ]
    samples = matmul.get("samples", [])
    if samples and min(samples) < STABLE_HOST * max(samples):
        out += [
            f"**Unstable host**: the slowest matmul measurement was "
            f"{min(samples) / max(samples):.2f} of the fastest (under {STABLE_HOST}): the "
            "machine's speed changed during the run. Shares divide by the fastest rate, so "
            "they err low; numbers taken minutes apart (the two models, say) compare "
            "poorly. A quieter machine gives steadier numbers.",
            "",
        ]
    out += ["## Must show", ""]
    verdict = {True: "pass", False: "**fail**", None: "n/a"}
    out += table(
        ["check", "model", "value", "target", "result"],
        [[*map(c.get, ("check", "model", "value", "target")), verdict[c["pass"]]]
         for c in results["checks"]],
    )  # fmt: skip
    for name, result in results["models"].items():
        out += model_section(name, result, results["image_size"])
    return "\n".join(out)


STABLE_HOST = 0.8
"""The lowest slowest-to-fastest matmul rate ratio within one run that counts as a
stable host. This project's shared host often drifts by 20 % over minutes, and by half
under its neighbours' load."""


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels, one series per model: click latency by path (log), ms per prompt vs
    prompts per request, worker RSS vs cached embeddings, requests/s vs clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    models = {n: r for n, r in results["models"].items() if "error" not in r}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    lat, per, mem, thr = axes.flat
    labels = ["floor", "naive", "cold", "warm REST", "warm gRPC"]
    width = 0.8 / max(1, len(models))
    for i, (name, r) in enumerate(models.items()):
        stats = [r["in_process"]["predict"], r["naive"], r["cold"]["latency"], r["warm_rest"],
                 r["warm_grpc"]]  # fmt: skip
        p50 = np.array([s.get("p50", np.nan) for s in stats])
        p95 = np.array([s.get("p95", np.nan) for s in stats])
        x = np.arange(len(labels)) + i * width
        lat.bar(x, p50, width, label=name)
        lat.errorbar(x, p50, yerr=[0 * p50, p95 - p50], fmt="none", ecolor="k", capsize=3)
        counts = [p["prompts"] for p in r["prompts"]]
        per.plot(counts, [p["per_prompt_ms"] for p in r["prompts"]], "o-", label=f"{name} request")
        if "prompts_best" in r:
            best = [p["per_prompt_ms"] for p in r["prompts_best"]]
            per.plot(counts, best, "^:", label=f"{name} request, best mask only")
        decoder = [decoder_ms(p, p["server_ms"].get("decoder", np.nan)) / p["prompts"]
                   for p in r["prompts"]]  # fmt: skip
        per.plot(counts, decoder, "s--", label=f"{name} server decoder")
        rss = r["memory"]["rss"]
        mem.plot([m["cached"] for m in rss], [m["rss_mib"] for m in rss], "o-", label=name)
        levels = r["concurrency"]
        thr.plot([c["clients"] for c in levels], [c["requests_per_s"] for c in levels], "o-",
                 label=name)  # fmt: skip
    lat.set_xticks(np.arange(len(labels)) + width * (len(models) - 1) / 2, labels)
    lat.set(yscale="log", ylabel="ms per click (p50, whisker to p95)", title="One click")
    per.set(xscale="log", yscale="log", xlabel="prompts per request", ylabel="ms per prompt (p50)",
            title="Many prompts in one request")  # fmt: skip
    ticks = sorted({p["prompts"] for r in models.values() for p in r["prompts"]})
    per.set_xticks(ticks, [str(t) for t in ticks])
    mem.set(xlabel="cached embeddings", ylabel="worker RSS (MiB)", title="Worker memory")
    thr.set(xlabel="concurrent clients", ylabel="requests/s (one click each)", title="Throughput")
    for ax in (mem, thr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (lat, mem, thr):
        ax.legend(fontsize=8)
    # Headroom above the lines for the legend's two columns (log scale: a factor).
    per.set_ylim(top=per.get_ylim()[1] * 8)
    per.legend(fontsize=8, ncol=2, loc="upper right")
    machine = results["machine"]
    fig.suptitle(f"samserve {results['label']}: {machine['gpu'] or machine['cpu']}, "
                 f"{machine['torch_threads_per_worker']} threads per worker, "
                 f"{results['image_size']} images", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
