"""SegmentService: the request flow without TorchServe (cache, errors, batches)."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import orjson
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from conftest import make_image, png_bytes
from samclient.masks import decode_segmentation
from samserve import service as service_module
from samserve.engine import CPU_CALL_SIZES, CUDA_CALL_SIZES, SamEngine, default_call_sizes
from samserve.service import SegmentService
from samserve.settings import MIN_RESPONSE_BYTES, Settings

EMBEDDING_BYTES = 64 * 16 * 16 * 4 + 3 * 256 * 32 * 4  # sam_micro: embedding, projections


@pytest.fixture()
def service(micro_sam) -> SegmentService:
    return SegmentService(SamEngine(micro_sam), Settings())


def _request(image: bytes | None = None, **fields) -> tuple[dict, str]:
    body = dict(fields)
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    return body, "application/json"


POINT = {"points": [[60, 50]], "labels": [1]}
J = "application/json"


@pytest.fixture(params=["in turn", "side by side", "merged"])
def schedule(request, monkeypatch) -> str:
    """Run the test with decoder calls in turn (as for small models), side by side (as
    for SAM-sized ones) and merged across requests (as on CUDA: the test sets
    ``merge_decoder_calls`` when the schedule is "merged")."""
    if request.param == "side by side":
        _as_large_as_sam(monkeypatch)
    return request.param


def _decoder_calls(service: SegmentService, monkeypatch) -> list[tuple[int, str, int]]:
    """The service's decoder calls from now on, as they happen: (prompts, the calling
    thread's name, its torch threads)."""
    calls = []
    real_predict = service.engine.predict

    def predict(embedding, chunk, *args, **kwargs):
        calls.append((len(chunk), threading.current_thread().name, torch.get_num_threads()))
        return real_predict(embedding, chunk, *args, **kwargs)

    monkeypatch.setattr(service.engine, "predict", predict)
    return calls


def _as_large_as_sam(monkeypatch) -> None:
    """Schedule sam_micro's decoder calls as a SAM-sized model's: side by side."""
    monkeypatch.setattr(service_module, "MIN_PARALLEL_PROMPT_WORK", 0)


def test_second_request_does_not_run_encoder(service):
    image = png_bytes(make_image(120, 160))
    first = service.handle([_request(image, prompts=[POINT])])[0]
    assert first.status == 200 and first.body["cached"] is False
    assert service.engine.encoder_runs == 1
    second = service.handle([_request(image, prompts=[POINT])])[0]
    assert second.status == 200 and second.body["cached"] is True
    assert service.engine.encoder_runs == 1
    assert second.body["results"] == first.body["results"]
    assert "encoder" not in second.body["timing_ms"]


def test_precompute_then_prompt_by_image_id(service):
    image = png_bytes(make_image(120, 160))
    pre = service.handle([_request(image)])[0]
    assert pre.status == 200 and pre.body["results"] == []
    assert (pre.body["width"], pre.body["height"]) == (160, 120)
    raw = service.handle([(image, "image/png")])[0]
    assert raw.body["image_id"] == pre.body["image_id"] and raw.body["cached"] is True
    by_id = service.handle([_request(image_id=pre.body["image_id"], prompts=[POINT])])[0]
    assert by_id.status == 200 and by_id.body["cached"] is True
    assert service.engine.encoder_runs == 1
    masks = by_id.body["results"][0]["masks"]
    assert len(masks) == 3
    assert [m["score"] for m in masks] == sorted((m["score"] for m in masks), reverse=True)
    assert decode_segmentation(masks[0]).shape == (120, 160)


def test_image_id_after_eviction_is_404(micro_sam):
    service = SegmentService(
        SamEngine(micro_sam, embedding_cache_bytes=EMBEDDING_BYTES), Settings()
    )
    first = service.handle([_request(png_bytes(make_image(64, 64, seed=1)))])[0]
    assert (
        service.handle([_request(image_id=first.body["image_id"], prompts=[POINT])])[0].status
        == 200
    )
    service.handle([_request(png_bytes(make_image(64, 64, seed=2)))])
    gone = service.handle([_request(image_id=first.body["image_id"], prompts=[POINT])])[0]
    assert gone.status == 404
    assert gone.body["error"]["code"] == "image_not_cached"
    assert "resend" in gone.body["error"]["message"]
    assert service.engine.embeddings.stats().evictions == 1


def test_masks_match_predictor_through_protocol(micro_sam, service):
    array = make_image(150, 200, seed=5)
    predictor = SamPredictor(micro_sam)
    predictor.set_image(array)
    box = [20, 30, 120, 140]
    masks, scores, _ = predictor.predict(box=np.array(box), multimask_output=False)
    reply = service.handle([_request(png_bytes(array), prompts=[{"box": box}], multimask=False)])[0]
    record = reply.body["results"][0]["masks"][0]
    assert abs(record["score"] - float(scores[0])) < 1e-4
    assert (decode_segmentation(record) == masks[0]).mean() >= 0.9999
    assert record["area"] == int(decode_segmentation(record).sum())


def test_mask_input_round_trip(service):
    image = png_bytes(make_image(100, 100))
    first = service.handle([_request(image, prompts=[POINT])])[0].body
    logits_id = first["results"][0]["logits_id"]
    refine = {"points": [[60, 50], [10, 10]], "labels": [1, 0], "mask_input": logits_id}
    second = service.handle([_request(image_id=first["image_id"], prompts=[refine])])[0]
    assert second.status == 200 and len(second.body["results"]) == 1
    missing = dict(refine, mask_input="0" * 32)
    third = service.handle([_request(image_id=first["image_id"], prompts=[missing])])[0]
    assert third.status == 404 and third.body["error"]["code"] == "logits_not_cached"
    other = service.handle([_request(png_bytes(make_image(100, 100, seed=9)), prompts=[refine])])[0]
    assert other.status == 400 and other.body["error"]["code"] == "mask_input_mismatch"


@pytest.mark.parametrize("height,width", [(120, 200), (200, 120)])
def test_refining_with_logits_id_matches_predictor(micro_sam, service, height, width):
    """A click, then a corrective click with its ``logits_id`` on a landscape or portrait
    image (the stored logits over the padding are made only when read): SamPredictor's
    masks and scores for both, the second fed the predictor's own best low-res logits."""
    array = make_image(height, width, seed=height)
    predictor = SamPredictor(micro_sam)
    predictor.set_image(array)
    click = {"points": [[width * 0.4, height * 0.5]], "labels": [1]}
    masks, scores, logits = predictor.predict(np.array(click["points"]), np.array([1]))
    first = service.handle([_request(png_bytes(array), prompts=[click])])[0].body
    refine = {
        "points": [[width * 0.4, height * 0.5], [width * 0.9, height * 0.1]],
        "labels": [1, 0],
    }
    expected = predictor.predict(
        np.array(refine["points"]), np.array([1, 0]), mask_input=logits[np.argmax(scores)][None]
    )
    refine["mask_input"] = first["results"][0]["logits_id"]
    stored = service.engine.stored_logits(refine["mask_input"])
    np.testing.assert_allclose(stored.logits[0], logits[np.argmax(scores)], atol=1e-3)
    second = service.handle([_request(image_id=first["image_id"], prompts=[refine])])[0].body
    _assert_predictor_masks(first["results"][0]["masks"], masks, scores)
    _assert_predictor_masks(second["results"][0]["masks"], *expected[:2])


def _assert_predictor_masks(records: list[dict], masks: np.ndarray, scores: np.ndarray) -> None:
    """Mask records (best first) are SamPredictor's CxHxW ``masks`` with C ``scores``."""
    order = np.argsort(-scores, kind="stable")
    assert [m["score"] for m in records] == pytest.approx(scores[order].tolist(), abs=1e-4)
    for record, index in zip(records, order):
        assert (decode_segmentation(record) == masks[index]).mean() >= 0.9999


def test_batch_shares_encoder_and_isolates_errors(service):
    image = png_bytes(make_image(90, 120))
    replies = service.handle(
        [
            _request(image, prompts=[POINT]),
            (b"{not json", "application/json"),
            _request(image, prompts=[{"box": [0, 0, 50, 50]}], output="png"),
            _request(image_id="f" * 64, prompts=[POINT]),
            _request(image, prompts=[{"points": [[500, 5]], "labels": [1]}]),
        ]
    )
    assert [r.status for r in replies] == [200, 400, 200, 404, 400]
    assert service.engine.encoder_runs == 1
    assert replies[1].body["error"]["code"] == "invalid_json"
    assert replies[4].body["error"]["code"] == "point_outside_image"
    assert "png" in replies[2].body["results"][0]["masks"][0]
    assert replies[0].body["image_id"] == replies[2].body["image_id"]


def test_output_none_and_order_of_results(service):
    image = png_bytes(make_image(80, 80))
    prompts = [POINT, {"box": [5, 5, 40, 40]}, {"points": [[10, 70]], "labels": [1]}]
    together = service.handle([_request(image, prompts=prompts, output="none")])[0].body
    assert len(together["results"]) == 3
    for prompt, result in zip(prompts, together["results"]):
        alone = service.handle([_request(image, prompts=[prompt], output="none")])[0].body
        assert [m["score"] for m in result["masks"]] == pytest.approx(
            [m["score"] for m in alone["results"][0]["masks"]], abs=1e-4
        )
        assert all("segmentation" not in m and "png" not in m for m in result["masks"])


def test_output_none_records_are_the_rle_records_without_their_masks(service):
    """Masks made for ``none`` skip their RLE; their scores, areas and boxes stay."""
    image = png_bytes(make_image(80, 80))
    prompts = [POINT, {"box": [5, 5, 40, 40]}]
    bare = service.handle([_request(image, prompts=prompts, output="none")])[0].body
    full = service.handle([_request(image, prompts=prompts)])[0].body
    for bare_result, full_result in zip(bare["results"], full["results"], strict=True):
        expected = [
            {key: m[key] for key in ("score", "area", "bbox")} for m in full_result["masks"]
        ]
        assert bare_result["masks"] == expected


@pytest.mark.parametrize("multimask", [True, False])
def test_best_only_returns_the_best_of_the_masks_multimask_gives(service, monkeypatch, multimask):
    image = png_bytes(make_image(120, 160, seed=3))
    prompts = [POINT, {"box": [5, 5, 90, 70]}, {"points": [[20, 100]], "labels": [1]}]
    every = service.handle([_request(image, prompts=prompts, multimask=multimask)])[0].body
    made = []
    real_predict = service.engine.predict

    def predict(*args, **kwargs):
        answers = real_predict(*args, **kwargs)
        made.extend(len(answer.masks) for answer in answers)
        return answers

    monkeypatch.setattr(service.engine, "predict", predict)
    best = service.handle(
        [_request(image_id=every["image_id"], prompts=prompts, multimask=multimask, best_only=True)]
    )[0].body
    assert made == [1] * len(prompts)  # the other masks were never made full-size
    for all_masks, only in zip(every["results"], best["results"], strict=True):
        (record,) = only["masks"]
        assert record == all_masks["masks"][0]  # the best-scoring one, as sent first
        assert only["logits_id"] == all_masks["logits_id"]


def test_exif_rotated_upload_uses_upright_frame(service):
    array = make_image(60, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif)
    body = service.handle([_request(buffer.getvalue())])[0].body
    assert (body["width"], body["height"]) == (60, 100)


def test_bad_image_and_limits(micro_sam):
    settings = Settings(max_image_pixels=100 * 100)
    service = SegmentService(SamEngine(micro_sam), settings)
    big = service.handle([_request(png_bytes(make_image(101, 100)))])[0]
    assert big.status == 413 and big.body["error"]["code"] == "image_too_large"
    junk = service.handle([_request(b"definitely not an image")])[0]
    assert junk.status == 400 and junk.body["error"]["code"] == "invalid_image"
    mismatch = service.handle([_request(png_bytes(make_image(10, 10)), image_id="abc")])[0]
    assert mismatch.status == 400 and mismatch.body["error"]["code"] == "image_id_mismatch"
    assert service.engine.encoder_runs == 0


def test_stats(service):
    reply = service.handle([_request(png_bytes(make_image(100, 100)), prompts=[POINT])])[0]
    assert reply.status == 200
    stats = service.stats()
    assert stats["encoder_runs"] == 1
    assert stats["embedding_cache"]["entries"] == 1
    assert stats["logits_cache"]["entries"] == 1


def test_unexpected_failure_is_a_json_500_for_that_request_only(micro_sam, monkeypatch, schedule):
    """Merged, the broken request's prompts fail the others' call too: each request then
    runs alone, and only the broken one fails."""
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    service.merge_decoder_calls = schedule == "merged"
    image = png_bytes(make_image(100, 100))
    good = _request(image, prompts=[POINT])
    broken = _request(image, prompts=[{"box": [1, 1, 50, 50]}])
    real_predict = service.engine.predict

    def predict(embedding, prompts, *args, **kwargs):
        if any(prompt.box is not None for prompt in prompts):
            raise RuntimeError("simulated decoder bug")
        return real_predict(embedding, prompts, *args, **kwargs)

    monkeypatch.setattr(service.engine, "predict", predict)
    replies = service.handle([good, broken, good])
    assert [r.status for r in replies] == [200, 500, 200]
    assert replies[1].body["error"]["code"] == "internal_error"
    assert replies[0].body["results"] == replies[2].body["results"]


def test_encoder_failure_fails_only_requests_that_need_it(service, monkeypatch):
    cached = png_bytes(make_image(100, 100, seed=1))
    service.handle([_request(cached)])
    monkeypatch.setattr(service.engine, "_encode", lambda images: 1 / 0)
    replies = service.handle([_request(png_bytes(make_image(100, 100, seed=2))),
                              _request(cached, prompts=[POINT])])  # fmt: skip
    assert [r.status for r in replies] == [500, 200]


def test_many_prompts_on_a_large_image_are_decoded_in_chunks(micro_sam, monkeypatch):
    """Only a bounded number of full-size masks is alive at once: a decoder call's worth
    of prompts, fewer where the masks are large; answers are unchanged."""
    from samserve import service as service_module

    service = SegmentService(SamEngine(micro_sam, decoder_batch_size=8), Settings())
    image = png_bytes(make_image(200, 300))
    prompts = [{"points": [[10 + 9 * k, 20 + 5 * k]], "labels": [1]} for k in range(12)]
    calls = []
    real_predict = service.engine.predict

    def predict(embedding, chunk, *args, **kwargs):
        calls.append(len(chunk))
        return real_predict(embedding, chunk, *args, **kwargs)

    monkeypatch.setattr(service.engine, "predict", predict)
    whole = service.handle([_request(image, prompts=prompts, output="none")])[0]
    assert whole.status == 200 and calls == [8, 4]
    calls.clear()
    monkeypatch.setattr(service_module, "MASK_PIXELS_PER_CALL", 5 * 3 * 200 * 300)
    chunked = service.handle([_request(image, prompts=prompts, output="none")])[0]
    assert calls == [5, 5, 2]
    assert set(chunked.body["timing_ms"]) >= {"decoder", "upscale", "encode_masks"}
    # Matmuls of 8 and 5 prompts may round differently (BLAS picks kernels by shape):
    # a pixel whose logit is within rounding of the threshold may flip (seen: 1 of 36,780).
    for a, b in zip(whole.body["results"], chunked.body["results"]):
        assert [m["area"] for m in a["masks"]] == pytest.approx(
            [m["area"] for m in b["masks"]], abs=5
        )
        assert [m["score"] for m in a["masks"]] == pytest.approx(
            [m["score"] for m in b["masks"]], abs=1e-4
        )


def test_mask_pixel_and_response_size_limits(micro_sam):
    image = png_bytes(make_image(100, 100))
    prompts = [POINT, {"box": [5, 5, 40, 40]}]
    limited = SegmentService(SamEngine(micro_sam), Settings(max_mask_pixels=2 * 3 * 100 * 100 - 1))
    reply = limited.handle([_request(image, prompts=prompts)])[0]
    assert reply.status == 400 and reply.body["error"]["code"] == "too_many_mask_pixels"
    assert "2 prompts x 3 masks x 100x100" in reply.body["error"]["message"]
    single = limited.handle([_request(image, prompts=prompts, multimask=False)])[0]
    assert single.status == 200

    full = SegmentService(SamEngine(micro_sam), Settings()).handle(
        [_request(image, prompts=prompts, output="png")]
    )[0]
    size = len(full.encode())
    small = SegmentService(SamEngine(micro_sam), Settings(max_response_bytes=size - 100))
    replies = small.handle(
        [_request(image, prompts=prompts, output="png"), _request(image, prompts=[POINT])]
    )
    assert [r.status for r in replies] == [413, 200]
    assert replies[0].body["error"]["code"] == "response_too_large"
    exact = SegmentService(SamEngine(micro_sam), Settings(max_response_bytes=size + 100))
    assert exact.handle([_request(image, prompts=prompts, output="png")])[0].status == 200


def test_segment_script_asks_three_masks_for_a_click_and_one_for_a_box(service):
    """scripts/segment.py splits prompts by kind; results come back in the order given."""
    from segment import segment

    bodies = []

    def predict(body: dict) -> dict:
        bodies.append(body)
        reply = service.handle([(body, "application/json")])[0]
        assert reply.status == 200, reply.body
        return reply.body

    prompts = [
        {"box": [5.0, 5.0, 40.0, 30.0]},
        {"points": [[20.0, 20.0]], "labels": [1]},
        {"points": [[10.0, 10.0], [30.0, 20.0]], "labels": [1, 0]},
    ]
    response = segment(predict, png_bytes(make_image(48, 64, seed=3)), prompts)
    assert [b["multimask"] for b in bodies] == [False, True]
    assert "image" in bodies[0] and bodies[1]["image_id"] == response["image_id"]
    assert [len(r["masks"]) for r in response["results"]] == [1, 3, 1]
    single = predict({"image_id": response["image_id"], "prompts": prompts[2:], "multimask": False})
    assert response["results"][2]["masks"] == single["results"][0]["masks"]


def test_prompt_threads_run_torch_single_threaded_and_leave_the_caller_alone(micro_sam):
    """The pool is the parallelism: its threads' torch ops run on one intra-op thread
    each, and the thread that serves requests (the decoder's) keeps all of its own."""
    before = torch.get_num_threads()
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    counts = set(service._prompt_pool.map(lambda _: torch.get_num_threads(), range(8)))
    assert counts == {1}
    assert torch.get_num_threads() == before
    image = png_bytes(make_image(64, 80, seed=6))
    assert (
        service.handle([_request(image, prompts=[{"points": [[9, 9]], "labels": [1]}])])[0].status
        == 200
    )
    assert torch.get_num_threads() == before


def test_parts_of_a_request_run_side_by_side_on_the_pool_in_order(micro_sam, monkeypatch):
    """More prompts than one decoder call takes: each call's part runs on a pool thread
    (one torch thread), results stay in the prompts' order; one part runs on the caller."""
    _as_large_as_sam(monkeypatch)
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    image = png_bytes(make_image(120, 160, seed=8))
    prompts = [{"points": [[10 + 13 * k, 15 + 9 * k]], "labels": [1]} for k in range(10)]
    calls = _decoder_calls(service, monkeypatch)
    together = service.handle([_request(image, prompts=prompts)])[0]
    assert together.status == 200
    assert sorted(n for n, _, _ in calls) == [2, 4, 4]
    assert all(name.startswith("samserve-prompts") and threads == 1 for _, name, threads in calls)
    assert set(together.body["timing_ms"]) >= {"decoder", "upscale", "encode_masks"}
    image_id = together.body["image_id"]
    for prompt, result in zip(prompts, together.body["results"]):
        calls.clear()
        alone = service.handle([_request(image_id=image_id, prompts=[prompt])])[0].body
        assert calls == [(1, threading.current_thread().name, torch.get_num_threads())]
        assert [m["score"] for m in result["masks"]] == pytest.approx(
            [m["score"] for m in alone["results"][0]["masks"]], abs=1e-4
        )
        assert [m["area"] for m in result["masks"]] == pytest.approx(
            [m["area"] for m in alone["results"][0]["masks"]], abs=5
        )
        stored = service.engine.stored_logits(result["logits_id"])
        assert stored is not None and stored.image_id == image_id


def test_small_decoders_calls_run_in_turn_on_the_caller(micro_sam, monkeypatch):
    """A model whose decoder calls are short (sam_micro) decodes a batch's parts one after
    another on the serving thread, on all its torch threads: side by side, two threads
    would take turns at their Python under the GIL."""
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    calls = _decoder_calls(service, monkeypatch)
    images = [png_bytes(make_image(90, 120, seed=s)) for s in (11, 12)]
    prompts = [{"points": [[10 + 9 * k, 15 + 7 * k]], "labels": [1]} for k in range(6)]
    replies = service.handle(
        [_request(images[0], prompts=prompts), _request(images[1], prompts=[POINT])]
    )
    assert [r.status for r in replies] == [200, 200]
    me = (threading.current_thread().name, torch.get_num_threads())
    assert [(n, name, threads) for n, name, threads in calls] == [(4, *me), (2, *me), (1, *me)]


def test_batch_of_clicks_on_different_images_runs_side_by_side(micro_sam, monkeypatch):
    """Concurrent clients' clicks, batched by TorchServe, each on its own cached image:
    each request's decoder call runs on a pool thread (one torch thread) beside the
    others', and every reply is the one that request gets alone, in the batch's order."""
    _as_large_as_sam(monkeypatch)
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    images = [png_bytes(make_image(90 + 10 * s, 120, seed=20 + s)) for s in range(3)]
    ids = [service.handle([_request(image)])[0].body["image_id"] for image in images]
    clicks = [{"points": [[30 + 20 * s, 40]], "labels": [1]} for s in range(3)]
    requests = [_request(image_id=i, prompts=[c]) for i, c in zip(ids, clicks)]
    alone = [service.handle([r])[0].body for r in requests]
    calls = _decoder_calls(service, monkeypatch)
    together = service.handle(requests)
    assert [r.status for r in together] == [200, 200, 200]
    assert len(calls) == 3
    assert all(name.startswith("samserve-prompts") and threads == 1 for _, name, threads in calls)
    for reply, single, image_id in zip(together, alone, ids):
        assert reply.body["image_id"] == image_id
        assert (reply.body["height"], reply.body["width"]) == (single["height"], single["width"])
        got, want = reply.body["results"][0]["masks"], single["results"][0]["masks"]
        assert [m["score"] for m in got] == pytest.approx([m["score"] for m in want], abs=1e-4)
        assert [m["area"] for m in got] == pytest.approx([m["area"] for m in want], abs=5)


def test_response_too_large_while_parts_run_side_by_side(micro_sam, monkeypatch):
    """A 413 found after the first parts stops the request, not the batch's others; the
    service keeps serving."""
    _as_large_as_sam(monkeypatch)
    service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=2))
    image = png_bytes(make_image(120, 160, seed=9))
    prompts = [{"points": [[10 + 13 * k, 15 + 9 * k]], "labels": [1]} for k in range(12)]
    full = service.handle([_request(image, prompts=prompts, output="png")])[0]
    assert full.status == 200
    small = SegmentService(
        SamEngine(micro_sam), Settings(prompt_threads=2, max_response_bytes=len(full.encode()) // 3)
    )
    reply, beside = small.handle(
        [_request(image, prompts=prompts, output="png"), _request(image, prompts=prompts[:2])]
    )
    assert reply.status == 413 and reply.body["error"]["code"] == "response_too_large"
    assert beside.status == 200 and len(beside.body["results"]) == 2
    after = small.handle([_request(image, prompts=prompts[:1], output="png")])[0]
    assert after.status == 200 and len(after.body["results"]) == 1


def test_a_request_given_up_cancels_its_parts_not_yet_started():
    """Closing a request's parts early (as a 413 found in its first part's masks does)
    cancels its parts still queued on the pool; the one already running finishes."""
    from concurrent.futures import ThreadPoolExecutor

    running, release = threading.Event(), threading.Event()
    ran = []

    def part(k: int) -> int:
        ran.append(k)
        if k == 1:
            running.set()
            release.wait(10)
        return k

    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(part, k) for k in range(4)]
        parts = service_module._outcomes(futures)
        assert next(parts) == 0
        assert running.wait(10)  # part 1 holds the pool's thread; 2 and 3 wait
        parts.close()
        release.set()
    assert ran == [0, 1]
    assert [f.cancelled() for f in futures] == [False, False, True, True]


def test_prompt_threads_encode_the_same_records(micro_sam):
    image = png_bytes(make_image(200, 300, seed=4))
    prompts = [{"points": [[20 + 23 * k, 30 + 13 * k]], "labels": [1]} for k in range(7)]
    bodies = {}
    for threads in (1, 3):
        service = SegmentService(SamEngine(micro_sam), Settings(prompt_threads=threads))
        assert service.prompt_threads == threads
        for output in ("rle", "png"):
            reply = service.handle([_request(image, prompts=prompts, output=output)])[0]
            assert reply.status == 200
            bodies[threads, output] = reply.body["results"]
    assert bodies[1, "rle"] == bodies[3, "rle"] and bodies[1, "png"] == bodies[3, "png"]
    default = SegmentService(SamEngine(micro_sam), Settings())
    assert default.prompt_threads == torch.get_num_threads()
    with pytest.raises(ValueError, match="unknown handler settings"):
        Settings.from_dict({"mask_thread": 2})


def test_replies_are_compact_json_with_nan_as_null(micro_sam):
    import json

    from samserve.service import Reply

    service = SegmentService(SamEngine(micro_sam), Settings())
    image = png_bytes(make_image(64, 80, seed=8))
    reply = service.handle([_request(image, prompts=[{"points": [[9, 9]], "labels": [1]}])])[0]
    assert reply.encode() == json.dumps(reply.body, separators=(",", ":")).encode()
    assert (
        Reply(200, {"score": float("nan"), "bbox": [1, 2]}).encode()
        == b'{"score":null,"bbox":[1,2]}'
    )


# --- one request never fails another (issue 32) ----------------------------------------


def _alone(micro_sam, request: tuple) -> dict:
    """The body a fresh service answers ``request`` with, alone in its batch."""
    reply = SegmentService(SamEngine(micro_sam), Settings()).handle([request])[0]
    assert reply.status == 200, reply.body
    return reply.body


def _same_results(got: dict, want: dict) -> None:
    """The same answer, but for float rounding where images are encoded together."""
    assert got["image_id"] == want["image_id"] and got["cached"] == want["cached"]
    assert len(got["results"]) == len(want["results"])
    for result, expected in zip(got["results"], want["results"]):
        assert [m["score"] for m in result["masks"]] == pytest.approx(
            [m["score"] for m in expected["masks"]], abs=1e-4
        )
        assert [m["area"] for m in result["masks"]] == pytest.approx(
            [m["area"] for m in expected["masks"]], abs=5
        )


def test_a_mixed_batch_answers_each_request_as_if_alone(micro_sam):
    """Bad requests of every kind beside cold valid ones: each bad one gets its own 4xx
    naming the problem, the valid ones their answer alone (their images encoded in the
    same batch as the bad ones)."""
    service = SegmentService(SamEngine(micro_sam), Settings(encoder_batch_size=2))
    click = _request(png_bytes(make_image(70, 90, seed=31)), prompts=[POINT])
    box = _request(png_bytes(make_image(80, 60, seed=32)), prompts=[{"box": [5, 5, 50, 60]}])
    with_bom = b"\xef\xbb\xbf" + json.dumps(
        {"image": base64.b64encode(png_bytes(make_image(40, 50, seed=33))).decode(),
         "prompts": [{"points": [[20, 20]], "labels": [1]}], "multimask": None}
    ).encode()  # fmt: skip
    image = base64.b64encode(png_bytes(make_image(50, 60, seed=34))).decode()
    bad = {
        "narrow": (_request(png_bytes(np.zeros((2, 3000, 3), np.uint8))), 400,
                   "image_too_narrow", "3000x2"),
        "huge box": (_request(image_id="a", prompts=[{"box": [1e15] * 1_000_000}]), 400,
                     "invalid_request", "prompts[0].box"),
        "no points in a crop layer": (
            ({"image": image, "everything": {"points_per_side": 4, "crop_n_layers": 1,
                                             "crop_n_points_downscale_factor": 8}}, J),
            400, "invalid_request", "leaves no point"),
        "empty crop": (
            ({"image": base64.b64encode(png_bytes(np.ones((1, 1, 3), np.uint8))).decode(),
              "everything": {"crop_n_layers": 1}}, J), 400, "invalid_request", "empty crop"),
        "too much work": (
            ({"image": image, "everything": {"points_per_side": 64, "crop_n_layers": 2}}, J),
            400, "too_much_work", "max_everything_points"),
        "text/plain": ((json.dumps({"image": image}), "text/plain"), 415,
                       "unsupported_media_type", "text/plain"),
    }  # fmt: skip
    requests = [click, *(case[0] for case in bad.values()), (with_bom, J), box]
    replies = service.handle(requests)
    for reply, (name, (_, status, code, names)) in zip(replies[1:], bad.items()):
        assert (reply.status, reply.body["error"]["code"]) == (status, code), name
        assert names in reply.body["error"]["message"], name
        assert len(reply.encode()) < 1000, name
    _same_results(replies[0].body, _alone(micro_sam, click))
    _same_results(replies[-2].body, _alone(micro_sam, (with_bom, J)))
    _same_results(replies[-1].body, _alone(micro_sam, box))
    assert service.engine.encoder_runs == 3  # only the valid requests' images


def test_an_image_the_encoder_fails_on_fails_only_the_requests_that_carry_it(
    micro_sam, monkeypatch
):
    service = SegmentService(SamEngine(micro_sam), Settings(encoder_batch_size=2))
    real_encode = service.engine._encode

    def encode(images):
        if any(image.shape[0] == 77 for image in images):
            raise RuntimeError("simulated encoder failure on one image")
        return real_encode(images)

    monkeypatch.setattr(service.engine, "_encode", encode)
    failing = png_bytes(make_image(77, 90, seed=41))
    good = _request(png_bytes(make_image(60, 90, seed=42)), prompts=[POINT])
    replies = service.handle(
        [_request(failing, prompts=[POINT]), good, _request(failing), (b"{", J)]
    )
    assert [r.status for r in replies] == [500, 200, 500, 400]
    assert replies[0].body["error"]["code"] == "internal_error"
    _same_results(replies[1].body, _alone(micro_sam, good))
    assert service.engine.encoder_runs == 1


def test_the_time_budget_fails_segment_everything_alone(micro_sam):
    settings = Settings(
        max_everything_points=100_000, max_everything_crops=20, max_everything_seconds=0.3
    )
    service = SegmentService(SamEngine(micro_sam), settings)
    image = png_bytes(make_image(120, 160, seed=43))
    everything = {"points_per_side": 64, "crop_n_layers": 1, "pred_iou_thresh": 0.0,
                  "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}  # fmt: skip
    click = _request(png_bytes(make_image(60, 80, seed=44)), prompts=[POINT])
    replies = service.handle([_request(image, everything=everything), click])
    assert [r.status for r in replies] == [413, 200]
    assert replies[0].body["error"]["code"] == "time_budget_exceeded"
    assert "max_everything_seconds" in replies[0].body["error"]["message"]
    _same_results(replies[1].body, _alone(micro_sam, click))


def test_no_reply_is_longer_than_max_response_bytes(micro_sam):
    limit = MIN_RESPONSE_BYTES
    service = SegmentService(SamEngine(micro_sam), Settings(max_response_bytes=limit))
    image = png_bytes(make_image(100, 120, seed=45))
    everything = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                  "box_nms_thresh": 1.0}  # fmt: skip
    requests = [
        _request(image, prompts=[POINT] * 8),
        _request(image, everything=everything),
        _request(image, prompts=[{"box": [0, 0, 1, "x" * 100_000]}]),
        ({"image_id": "a", **{"\ud800" * 1000 + str(i): 1 for i in range(1000)}}, J),
        (b"{" * 10_000, J),
        _request(image, prompts=[POINT], output="none"),
    ]
    replies = service.handle(requests)
    assert [r.status for r in replies] == [413, 413, 400, 400, 400, 200]
    assert all(len(r.encode()) <= limit for r in replies)
    with pytest.raises(ValueError, match="max_response_bytes"):
        Settings(max_response_bytes=limit - 1)


def _stack(pages: list[np.ndarray]) -> bytes:
    """A multi-page TIFF of HxWx3 uint8 ``pages``."""
    frames = [Image.fromarray(page) for page in pages]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def test_each_page_of_a_stack_is_its_own_image(service):
    pages = [make_image(48, 64, seed=s) for s in range(3)]
    data = _stack(pages)
    replies = service.handle([_request(data, page=p) for p in range(3)] + [_request(data)])
    assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
    ids = [r.body["image_id"] for r in replies]
    assert len(set(ids[:3])) == 3 and ids[3] == ids[0]  # page 0 is the default
    assert service.engine.encoder_runs == 3
    # The page's embedding is the one its own pixels give.
    alone = service.handle([_request(png_bytes(pages[2]))])[0].body["image_id"]
    assert service.engine.cached_embedding(ids[2]).embedding.equal(
        service.engine.cached_embedding(alone).embedding
    )


def test_a_page_past_the_last_fails_alone_in_its_batch(service):
    data = _stack([make_image(48, 64, seed=s) for s in range(2)])
    bad, good = service.handle([_request(data, page=2), _request(data, page=1)])
    assert bad.status == 400 and bad.body["error"]["code"] == "page_out_of_range"
    assert "2 page(s)" in bad.body["error"]["message"]
    assert good.status == 200


# --- a batch's decoder calls merged per image (CUDA's schedule, forced on here) ---------


def _merged(service: SegmentService) -> SegmentService:
    """``service`` with its decoder calls merged, as on CUDA."""
    service.merge_decoder_calls = True
    return service


def _clicks(count: int, seed: int) -> list[dict]:
    """``count`` one-point prompts inside a 160x120 image."""
    return [{"points": [[10 + 30 * k + seed, 20 + 20 * k]], "labels": [1]} for k in range(count)]


def _without_timing(body: dict) -> bytes:
    """The reply body as sent, less its timings (which differ from run to run)."""
    return orjson.dumps({k: v for k, v in body.items() if k != "timing_ms"})


def test_call_sizes_and_merging_follow_the_device(micro_sam):
    assert (Settings().encoder_batch_size, Settings().decoder_batch_size) == (0, 0)
    service = SegmentService.for_model(micro_sam, Settings())
    assert not service.merge_decoder_calls
    assert service.engine.encoder_batch_size == CPU_CALL_SIZES.encoder == 2
    assert service.engine.decoder_batch_size == CPU_CALL_SIZES.decoder == 4
    given = SegmentService.for_model(
        micro_sam, Settings(encoder_batch_size=3, decoder_batch_size=7)
    )
    assert (given.engine.encoder_batch_size, given.engine.decoder_batch_size) == (3, 7)
    assert default_call_sizes(torch.device("cuda")) == CUDA_CALL_SIZES
    assert (CUDA_CALL_SIZES.encoder, CUDA_CALL_SIZES.decoder) == (8, 64)
    for name in ("encoder_batch_size", "decoder_batch_size"):
        with pytest.raises(ValueError, match=name):
            Settings.from_dict({name: -1})


def test_merged_decoder_calls_answer_byte_for_byte_as_parts_do(micro_sam, monkeypatch):
    """Requests on one image that ask the same masks share engine calls, each request's
    masks in its own format; another image, other mask options and a bad prompt keep
    to themselves. Every decoder call holds the same prompts either way (four a call,
    one signature), so the replies and stored logits are the same bytes."""
    image = png_bytes(make_image(120, 160, seed=51))
    boxes = [{"box": [5 + 9 * k, 6 + 7 * k, 90 + 9 * k, 80 + 5 * k]} for k in range(4)]
    requests = [
        _request(image, prompts=_clicks(4, 0)),
        _request(image, prompts=boxes, output="png"),
        _request(image, prompts=_clicks(4, 5), output="png"),
        _request(png_bytes(make_image(90, 120, seed=52)), prompts=[POINT]),
        _request(image, prompts=[{"points": [[500, 20]], "labels": [1]}]),
        _request(image, prompts=_clicks(1, 9), output="none"),
    ]
    replies, calls, logits = {}, {}, {}
    for merge in (False, True):
        service = SegmentService(SamEngine(micro_sam), Settings())
        service.merge_decoder_calls = merge
        calls[merge] = _decoder_calls(service, monkeypatch)
        replies[merge] = service.handle(requests)
        ids = [r["logits_id"] for reply in replies[merge] for r in reply.body.get("results", [])]
        logits[merge] = [service.engine.stored_logits(i).logits for i in ids]
    assert [n for n, _, _ in calls[False]] == [4, 4, 4, 1, 1]
    assert [n for n, _, _ in calls[True]] == [12, 1, 1]
    assert [r.status for r in replies[True]] == [200, 200, 200, 200, 400, 200]
    assert replies[True][4].body["error"]["code"] == "point_outside_image"
    for merged, parts in zip(replies[True], replies[False]):
        assert merged.status == parts.status
        assert _without_timing(merged.body) == _without_timing(parts.body)
    assert len(logits[True]) == 14
    assert all(np.array_equal(a, b) for a, b in zip(logits[True], logits[False], strict=True))
    for reply in replies[True][:4]:
        assert set(reply.body["timing_ms"]) >= {"decoder", "upscale", "encode_masks"}
    assert "png" in replies[True][1].body["results"][0]["masks"][0]


def test_a_merged_request_too_large_fails_alone(micro_sam, monkeypatch):
    """The response limit holds per request where requests share decoder calls."""
    image = png_bytes(make_image(120, 160, seed=9))
    prompts = [{"points": [[10 + 13 * k, 15 + 9 * k]], "labels": [1]} for k in range(12)]
    full = SegmentService(SamEngine(micro_sam), Settings()).handle(
        [_request(image, prompts=prompts, output="png")]
    )[0]
    limit = len(full.encode()) // 3
    service = _merged(SegmentService(SamEngine(micro_sam), Settings(max_response_bytes=limit)))
    calls = _decoder_calls(service, monkeypatch)
    reply, beside = service.handle(
        [_request(image, prompts=prompts, output="png"), _request(image, prompts=prompts[:2])]
    )
    assert [n for n, _, _ in calls] == [14]
    assert reply.status == 413 and reply.body["error"]["code"] == "response_too_large"
    assert beside.status == 200 and len(beside.body["results"]) == 2
