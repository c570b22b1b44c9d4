"""Several workers of one model on a real TorchServe: the archive does not pin their
number, each takes its share of the cores, and clicks by ``image_id`` succeed whichever
worker answers, though each worker has its own cache."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from conftest import PORTS, make_image, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.grpc_client import GrpcClient
from samclient.rest_client import RestClient
from samclient.server import TorchServe

pytestmark = pytest.mark.integration

PAIR = "sam_pair"
CLICKS = 20


@pytest.fixture(scope="module")
def pair(server: TorchServe, rest: RestClient) -> Iterator[str]:
    """The sam_micro archive registered again, as ``sam_pair``, with two workers."""
    assert "registered" in rest.register_model("sam.mar", PAIR, initial_workers=2)
    try:
        yield PAIR
    finally:
        rest.unregister_model(PAIR)


def clicks(image_id: str) -> list[dict]:
    """CLICKS single-click requests by ``image_id``, each at its own point."""
    return [
        segment_request(image_id=image_id, prompts=[point_prompt([[8 + 4 * i, 20 + i]], [1])])
        for i in range(CLICKS)
    ]


def not_cached_answers(server: TorchServe, model: str) -> int:
    """REST requests to ``model`` that TorchServe logged as answered 404 (access_log.log:
    ``"POST /predictions/<model> HTTP/1.1" 404``): the handler's ``image_not_cached``."""
    log = (server.log_dir / "access_log.log").read_text()
    return len(re.findall(rf'"POST /predictions/{model} HTTP/1\.1" 404 ', log))


def test_registering_two_workers_gives_two(rest, pair):
    """The archive's model-config.yaml pins no worker count, which in TorchServe 0.12
    would override the registration's ``initial_workers``."""
    description = rest.describe_model(pair)[0]
    assert (description["minWorkers"], description["maxWorkers"]) == (2, 2)
    assert [w["status"] for w in description["workers"]] == ["READY", "READY"]


def test_each_worker_takes_its_share_of_the_cores(server, rest, pair):
    """The handler's default torch threads: the cores divided among the model's workers
    (the worker logs its count: "SAM <spec> on cpu, <n> torch threads")."""
    worker_ids = [str(w["id"]) for w in rest.describe_model(pair)[0]["workers"]]
    log = (server.log_dir / "model_log.log").read_text()
    threads = {
        worker: int(m.group(1))
        for worker in worker_ids
        for m in re.finditer(rf"W-{worker}-{pair}_.*?on cpu, (\d+) torch threads", log)
    }
    assert threads == {worker: max(1, (os.cpu_count() or 1) // 2) for worker in worker_ids}


def test_rest_clicks_by_image_id_all_succeed_on_two_workers(server, pair):
    client = RestClient(server.inference_url, server.management_url, server.key_source())
    image_id = client.predict(pair, segment_request(png_bytes(make_image(72, 96, seed=3))))[
        "image_id"
    ]
    refused_before = not_cached_answers(server, pair)

    answers = [client.predict(pair, body) for body in clicks(image_id)]

    assert all(len(a["results"][0]["masks"]) == 3 for a in answers)
    # The other worker had not seen the image: TorchServe logged its 404s, and each was
    # answered by sending the image again.
    refused = not_cached_answers(server, pair) - refused_before
    assert refused >= 1
    assert client.sent_images.resends == refused


def test_grpc_clicks_by_image_id_all_succeed_on_two_workers(server, pair):
    with GrpcClient(
        "127.0.0.1", PORTS.grpc_inference, PORTS.grpc_management, keys=server.key_source(),
        token_url=server.management_url,
    ) as client:  # fmt: skip
        image = png_bytes(make_image(72, 96, seed=4))
        image_id = client.predict(pair, segment_request(image))["image_id"]
        # The image alone is cached in the worker that answered: by id, the other one
        # answers image_not_cached (over gRPC, as a normal prediction).
        raw = [client.predict_raw(pair, segment_request(image_id=image_id)) for _ in range(2)]
        assert any(b'"image_not_cached"' in body for body in raw), raw

        answers = [client.predict(pair, body) for body in clicks(image_id)]

        assert all(len(a["results"][0]["masks"]) == 3 for a in answers)
        assert client.sent_images.resends >= 1
