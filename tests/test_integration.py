"""End to end: a real TorchServe (Java frontend, Python worker) serving the real .mar.

The server (the ``server`` fixture in conftest.py) is started once per test session from
the project's config.properties, on a block of ports of its own and in its own
directory, and the archive is registered through the management API as a user would.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from segment_anything import SamPredictor

from conftest import MODEL, OTHER_CPU_MATMUL, PORTS, make_image, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.errors import AuthError, SamServeError
from samclient.grpc_client import GrpcClient
from samclient.keys import Keys
from samclient.masks import decode_segmentation
from samclient.resend import ResendOptions
from samclient.rest_client import RestClient
from samclient.server import WORKER_SPIN_COUNT
from samserve import matmul

pytestmark = pytest.mark.integration


def _encoder_runs(rest: RestClient, model: str = MODEL) -> int:
    return rest.describe_model(model, customized=True)[0]["customizedMetadata"]["encoder_runs"]


def _without_timing(response: dict) -> dict:
    return {k: v for k, v in response.items() if k != "timing_ms"}


def test_every_api_needs_its_token(server, rest):
    assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code == 400
    anonymous = RestClient(server.inference_url, server.management_url, keys=Keys())
    with pytest.raises(AuthError):
        anonymous.ping()
    with pytest.raises(AuthError):
        anonymous.list_models()
    wrong = RestClient(server.inference_url, server.management_url, keys=Keys("x", "y"))
    with pytest.raises(AuthError):
        wrong.predict(MODEL, {"image_id": "a"})
    with GrpcClient("127.0.0.1", PORTS.grpc_inference, PORTS.grpc_management, keys=Keys()) as g:
        with pytest.raises(AuthError):
            g.ping()
        with pytest.raises(AuthError):
            g.list_models()
    assert rest.ping() == "Healthy"


def test_frontend_runs_with_the_configured_jvm_options(server):
    """config.properties' vmargs reach java (the instance's tmpdir is added to them)."""
    args = Path(f"/proc/{server.pid()}/cmdline").read_bytes().decode().split("\0")
    assert "-XX:+UseParallelGC" in args
    assert f"-Djava.io.tmpdir={server.tmpdir}" in args


def test_workers_start_with_a_short_openmp_spin(server):
    """The launcher sets GOMP_SPINCOUNT (samclient.server.WORKER_SPIN_COUNT), and the
    frontend hands it on to the Python workers it starts."""
    pids = server.worker_pids().values()
    assert pids
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"GOMP_SPINCOUNT={WORKER_SPIN_COUNT}".encode() in environ


def test_registered_through_management_api(rest):
    names = [m["modelName"] for m in rest.list_models()["models"]]
    assert MODEL in names
    description = rest.describe_model(MODEL)[0]
    assert [w["status"] for w in description["workers"]] == ["READY"]
    assert description["batchSize"] == 4
    assert description["maxBatchDelay"] == 1


def test_segment_matches_predictor_over_rest(rest, micro_sam):
    image = make_image(300, 420, seed=11)
    prompts = [point_prompt([[100, 150]], [1]), {"box": [50, 40, 300, 260]}]
    response = rest.predict(MODEL, segment_request(png_bytes(image), prompts=prompts))
    assert (response["width"], response["height"]) == (420, 300)
    predictor = SamPredictor(micro_sam)
    predictor.set_image(image)
    expected = [
        predictor.predict(np.array([[100, 150]]), np.array([1])),
        predictor.predict(box=np.array([50, 40, 300, 260])),
    ]
    for (masks, scores, _), result in zip(expected, response["results"]):
        order = np.argsort(-scores)
        got = [m["score"] for m in result["masks"]]
        np.testing.assert_allclose(got, scores[order], atol=1e-4)
        for record, index in zip(result["masks"], order):
            assert (decode_segmentation(record) == masks[index]).mean() >= 0.9999


def test_cached_image_skips_encoder(rest):
    image = png_bytes(make_image(200, 260, seed=12))
    before = _encoder_runs(rest)
    first = rest.predict_image(MODEL, image)
    assert first["cached"] is False and first["results"] == []
    assert _encoder_runs(rest) == before + 1
    click = segment_request(image_id=first["image_id"], prompts=[point_prompt([[40, 50]], [1])])
    second = rest.predict(MODEL, click)
    assert second["cached"] is True and len(second["results"]) == 1
    again = rest.predict(MODEL, segment_request(image, prompts=click["prompts"]))
    assert again["cached"] is True
    assert _encoder_runs(rest) == before + 1
    refine = point_prompt([[40, 50], [5, 5]], [1, 0]) | {
        "mask_input": second["results"][0]["logits_id"]
    }
    refined = rest.predict(MODEL, segment_request(image_id=first["image_id"], prompts=[refine]))
    assert len(refined["results"][0]["masks"]) == 3


def test_rest_and_grpc_give_the_same_answer(rest, grpc_client):
    assert grpc_client.ping() == "Healthy"
    image = png_bytes(make_image(240, 320, seed=13))
    image_id = rest.predict_image(MODEL, image)["image_id"]
    for output in ("rle", "png"):
        body = segment_request(
            image_id=image_id,
            prompts=[point_prompt([[100, 100]], [1], box=[20, 20, 200, 180])],
            multimask=False,
            output=output,
        )
        over_rest = rest.predict(MODEL, body)
        over_grpc = grpc_client.predict(MODEL, body)
        assert _without_timing(over_grpc) == _without_timing(over_rest)
    click = [point_prompt([[100, 100]], [1])]
    every = rest.predict(MODEL, segment_request(image_id=image_id, prompts=click))
    best = segment_request(image_id=image_id, prompts=click, best_only=True)
    for answer in (rest.predict(MODEL, best), grpc_client.predict(MODEL, best)):
        (mask,) = answer["results"][0]["masks"]
        assert mask == every["results"][0]["masks"][0]
    grpc_first = grpc_client.predict(MODEL, segment_request(png_bytes(make_image(99, 101))))
    assert grpc_first["cached"] is False and (grpc_first["width"], grpc_first["height"]) == (
        101,
        99,
    )


def test_eviction_gives_image_not_cached(rest):
    # A client that keeps no images: the test's own client would resend the evicted one.
    rest = RestClient(
        rest.inference_url, rest.management_url, rest.key_source, resend=ResendOptions(0)
    )
    rest.register_model("sam_small_cache.mar", "sam_small_cache", initial_workers=1)
    try:
        first = rest.predict_image("sam_small_cache", png_bytes(make_image(64, 64, seed=1)))
        by_id = segment_request(image_id=first["image_id"], prompts=[point_prompt([[9, 9]], [1])])
        assert rest.predict("sam_small_cache", by_id)["cached"] is True
        rest.predict_image("sam_small_cache", png_bytes(make_image(64, 64, seed=2)))
        with pytest.raises(SamServeError) as caught:
            rest.predict("sam_small_cache", by_id)
        assert caught.value.status == 404 and caught.value.code == "image_not_cached"
        stats = rest.describe_model("sam_small_cache", customized=True)[0]["customizedMetadata"]
        assert stats["embedding_cache"]["evictions"] == 1
        assert stats["embedding_cache"]["bytes"] <= stats["embedding_cache"]["max_bytes"]
    finally:
        rest.unregister_model("sam_small_cache")


def test_workers_multiply_with_the_archives_cpu_matmul(rest):
    """The handler setting reaches the worker: ``sam`` leaves it at ``auto``,
    ``sam_small_cache.mar`` asks for the other backend (which falls back to torch where
    this torch has no oneDNN)."""
    stats = rest.describe_model(MODEL, customized=True)[0]["customizedMetadata"]
    assert stats["cpu_matmul"] == matmul.set_backend("auto")
    rest.register_model("sam_small_cache.mar", "sam_small_cache", initial_workers=1)
    try:
        stats = rest.describe_model("sam_small_cache", customized=True)[0]["customizedMetadata"]
        assert stats["cpu_matmul"] == matmul.set_backend(OTHER_CPU_MATMUL)
    finally:
        rest.unregister_model("sam_small_cache")


BAD_REQUESTS = [
    (b"{not json", "application/json", 400, "invalid_json"),
    (b'{"prompts": []}', "application/json", 400, "missing_image"),
    (b'{"image": "%%%"}', "application/json", 400, "invalid_base64"),
    (b'{"image": "aGVsbG8="}', "application/json", 400, "invalid_image"),
    (
        b'{"image_id": "nope", "prompts": [{"box": [0, 0, 1, 1]}]}',
        "application/json",
        404,
        "image_not_cached",
    ),  # fmt: skip
    (b'{"image_id": "x", "extra": 1}', "application/json", 400, "unknown_field"),
    (b"\x00\x01", "application/octet-stream", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("body,content_type,status,code", BAD_REQUESTS)
def test_bad_request_gets_json_error(server, rest, body, content_type, status, code):
    response = requests.post(
        f"{server.inference_url}/predictions/{MODEL}",
        data=body,
        headers={**server.keys().header("inference"), "Content-Type": content_type},
        timeout=60,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert rest.ping() == "Healthy"


def test_server_answers_after_bad_requests(rest, grpc_client):
    with pytest.raises(SamServeError) as caught:
        grpc_client.predict(MODEL, b"{broken")
    assert caught.value.code == "invalid_json"
    outside = segment_request(
        png_bytes(make_image(50, 50)), prompts=[point_prompt([[500, 5]], [1])]
    )
    with pytest.raises(SamServeError) as caught:
        rest.predict(MODEL, outside)
    assert caught.value.status == 400 and caught.value.code == "point_outside_image"
    good = rest.predict(MODEL, segment_request(png_bytes(make_image(50, 50)),
                                               prompts=[point_prompt([[5, 5]], [1])]))  # fmt: skip
    assert len(good["results"][0]["masks"]) == 3
    assert [w["status"] for w in rest.describe_model(MODEL)[0]["workers"]] == ["READY"]


def test_manage_over_rest(rest):
    assert "registered" in rest.register_model("sam.mar", "sam_rest", initial_workers=1)
    try:
        rest.scale_workers("sam_rest", 2)
        workers = rest.describe_model("sam_rest")[0]["workers"]
        assert len(workers) == 2
        body = segment_request(png_bytes(make_image(80, 80)), prompts=[{"box": [10, 10, 60, 60]}])
        assert rest.predict("sam_rest", body)["results"]
    finally:
        rest.unregister_model("sam_rest")
    assert "sam_rest" not in [m["modelName"] for m in rest.list_models()["models"]]


def test_manage_over_grpc(grpc_client):
    assert "registered" in grpc_client.register_model("sam.mar", "sam_grpc", initial_workers=1)
    try:
        names = [m["modelName"] for m in grpc_client.list_models()["models"]]
        assert "sam_grpc" in names
        grpc_client.scale_workers("sam_grpc", 2)
        assert len(grpc_client.describe_model("sam_grpc")[0]["workers"]) == 2
        body = segment_request(
            png_bytes(make_image(70, 90)), prompts=[point_prompt([[30, 30]], [1])]
        )
        response = grpc_client.predict("sam_grpc", body)
        assert json.loads(json.dumps(response))["results"][0]["masks"][0]["segmentation"][
            "size"
        ] == [
            70,
            90,
        ]
    finally:
        grpc_client.unregister_model("sam_grpc")
    assert "sam_grpc" not in [m["modelName"] for m in grpc_client.list_models()["models"]]


def test_large_photo_round_trip(rest):
    """A 12-megapixel photo as JPEG fits the configured size limits both ways."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    photo = make_image(3000, 4000, seed=4).astype(np.int16) + rng.integers(-30, 30, (3000, 4000, 3))
    buffer = io.BytesIO()
    Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    assert len(buffer.getvalue()) > 6_553_500  # over TorchServe's default request limit
    body = {
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "prompts": [{"box": [0, 0, 4000, 3000]}],
    }
    response = rest.predict(MODEL, body)
    assert (response["width"], response["height"]) == (4000, 3000)
    assert decode_segmentation(response["results"][0]["masks"][0]).shape == (3000, 4000)


def test_concurrent_requests_are_batched_without_mixing_answers(rest, server):
    """Requests arriving together share TorchServe batches; each still gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    images = [png_bytes(make_image(120 + 10 * k, 160, seed=30 + k)) for k in range(4)]
    jobs = []
    for k, image in enumerate(images):
        jobs.append((k, segment_request(image, prompts=[point_prompt([[20 + k, 30]], [1])])))
        jobs.append((k, segment_request(image, prompts=[{"box": [5, 5, 100, 100 + k]}])))
    jobs.append((None, {"image": "not base64!"}))
    clients = [RestClient(server.inference_url, server.management_url, keys=server.keys())
               for _ in jobs]  # fmt: skip

    def call(index):
        k, body = jobs[index]
        try:
            return k, clients[index].predict(MODEL, body)
        except SamServeError as err:
            return k, err

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, range(len(jobs))))
    for k, answer in answers:
        if k is None:
            assert isinstance(answer, SamServeError) and answer.code == "invalid_base64"
            continue
        assert not isinstance(answer, Exception), answer
        assert answer["height"] == 120 + 10 * k
        assert answer["image_id"] == rest.predict_image(MODEL, images[k])["image_id"]
