"""The shared store (samserve.store) against real TorchServes: the workers of one host
share embeddings through the default disk store, two hosts share embeddings and
``mask_input`` logits through Redis, and a store that dies, comes back, or holds damaged
or foreign entries costs misses, never a failed or wrong answer.

Each server gets its store through ``SAMSERVE_STORE_URL`` at its start (its workers
inherit the frontend's environment), pointing at a store of the test's own, so no run
and no other test shares its entries.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest

from conftest import MODEL, REDIS_SERVER, RedisServer, make_image, micro_server, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.errors import SamServeError
from samclient.grpc_client import GrpcClient
from samclient.resend import IMAGE_NOT_CACHED, ResendOptions
from samclient.rest_client import RestClient
from samclient.server import TorchServe
from samserve.store import STORE_URL_ENV, StoreOptions, open_store
from samserve.store_codec import EMBEDDING, Entry, EntrySpec

pytestmark = pytest.mark.integration

# Port deltas of this file's servers (conftest.micro_server): the 4-worker host, hosts A and B.
ONE_HOST_DELTA, HOST_A_DELTA, HOST_B_DELTA = 400, 460, 520
CLICKS = 40
HEIGHT, WIDTH = 72, 96
# A client that never resends an image: an image_not_cached reaches the test as an error.
NO_RESEND = ResendOptions(memory_bytes=0)
# Generous store calls: on the shared 2-core test machine a call can stall past the 50 ms
# default, which would turn a hit into a miss; these tests are about answers, not latency.
REDIS_QUERY = "?timeout_ms=2000&backoff_s=1"


def prompts(index: int) -> list[dict[str, Any]]:
    """Click ``index``: one point at a place of its own, and a background point on every
    third."""
    points, labels = [[4 + (index * 7) % (WIDTH - 8), 4 + (index * 5) % (HEIGHT - 8)]], [1]
    if index % 3 == 2:
        points.append([WIDTH - 1 - points[0][0], HEIGHT - 1 - points[0][1]])
        labels.append(0)
    return [point_prompt(points, labels)]


def click(image_id: str, index: int) -> dict[str, Any]:
    """Click ``index`` on an image by ``image_id``."""
    return segment_request(image_id=image_id, prompts=prompts(index))


def answer(response: dict[str, Any]) -> list[tuple]:
    """What must not change between workers and hosts: per prompt, each mask's COCO RLE
    and score, and the ``logits_id`` (a hash of the image id and the exact logits)."""
    return [
        (
            [
                (m["segmentation"]["size"], m["segmentation"]["counts"], m["score"])
                for m in r["masks"]
            ],
            r.get("logits_id"),
        )
        for r in response["results"]
    ]


def rest_client(server: TorchServe, resend: ResendOptions = NO_RESEND) -> RestClient:
    return RestClient(
        server.inference_url, server.management_url, server.key_source(), resend=resend
    )


def grpc_client(server: TorchServe, resend: ResendOptions = NO_RESEND) -> GrpcClient:
    assert server.ports is not None
    return GrpcClient(
        "127.0.0.1",
        server.ports.grpc_inference,
        server.ports.grpc_management,
        keys=server.key_source(),
        token_url=server.management_url,
        resend=resend,
    )


def counters(server: TorchServe) -> dict[str, Any]:
    """The model's describe ``?customized=true`` counters (``workers`` and ``total``)."""
    return rest_client(server).describe_model(MODEL, customized=True)[0]["customizedMetadata"]


def model_log(server: TorchServe) -> str:
    return (server.log_dir / "model_log.log").read_text(errors="replace")


def server_errors(server: TorchServe) -> list[str]:
    """The requests TorchServe logged as answered 5xx (access_log.log: ``"POST
    /predictions/sam HTTP/1.1" 500``), whichever client sent them."""
    log = (server.log_dir / "access_log.log").read_text(errors="replace")
    return re.findall(r'"[A-Z]+ \S+ HTTP/1\.1" 5\d\d ', log)


# One host, four workers, the default disk store.


def test_four_workers_of_one_host_share_each_embedding_through_the_disk_store(
    tmp_path, checkpoints, monkeypatch
):
    """A server started as the README starts one (config.properties, one worker), then
    scaled to 4 workers through the management API, with no other setting than the store:
    the default backend (disk), in a directory of this test's own (so that runs share no
    entries). The image is sent once; the single worker answers 40 clicks by ``image_id``
    (the reference); the same 40 clicks then go to the 4 workers, over REST and gRPC from
    4 threads at once, by clients that never resend. Every click is answered (no
    ``image_not_cached``), with the reference's masks, scores and ``logits_id``; the
    encoder ran once over all 4 workers, and the workers that had not seen the image read
    it from the shared store (its hits)."""
    store_dir = tmp_path / "store"
    monkeypatch.setenv(STORE_URL_ENV, f"disk://{store_dir}")
    with micro_server(tmp_path / "host", checkpoints["sam_micro"], ONE_HOST_DELTA) as server:
        rest = rest_client(server)
        sent = rest.predict(MODEL, segment_request(png_bytes(make_image(HEIGHT, WIDTH, seed=11))))
        image_id = sent["image_id"]
        reference = [answer(rest.predict(MODEL, click(image_id, i))) for i in range(CLICKS)]

        assert "scaled" in rest.scale_workers(MODEL, 4).lower()
        assert [w["status"] for w in rest.describe_model(MODEL)[0]["workers"]] == ["READY"] * 4

        answers: dict[int, list[tuple]] = {}
        errors: dict[int, Exception] = {}

        def send(lane: int) -> None:
            # Two lanes over REST, two over gRPC, each with its own client (connection).
            client = rest_client(server) if lane < 2 else grpc_client(server)
            try:
                for index in range(lane, CLICKS, 4):
                    try:
                        answers[index] = answer(client.predict(MODEL, click(image_id, index)))
                    except Exception as error:  # any failure is the test's, not the thread's
                        errors[index] = error
            finally:
                client.close()

        lanes = [threading.Thread(target=send, args=(lane,)) for lane in range(4)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()

        stats = counters(server)
    print(
        f"4 workers: {len(answers)} clicks answered, {len(errors)} errors, encoder runs "
        f"{[w['encoder_runs'] for w in stats['workers']]}, shared store "
        f"{[(w.get('shared_store') or {}).get('hits') for w in stats['workers']]} hits"
    )
    not_cached = [i for i, e in errors.items() if getattr(e, "code", None) == IMAGE_NOT_CACHED]
    assert not_cached == [], f"{len(not_cached)} clicks answered image_not_cached"
    assert errors == {}
    wrong = [i for i in range(CLICKS) if answers[i] != reference[i]]
    assert wrong == [], f"clicks {wrong} differ from the single worker's answers"
    workers, total = stats["workers"], stats["total"]
    assert len(workers) == 4
    assert {w["shared_store"]["store"] for w in workers} == {f"disk://{store_dir}"}
    assert total["encoder_runs"] == 1, [w["encoder_runs"] for w in workers]
    # Each worker that had not seen the image read it from the store once, then kept it.
    assert 1 <= total["shared_store"]["hits"] <= 3, total["shared_store"]
    assert total["shared_store"]["invalid"] == total["shared_store"]["errors"] == 0


# Two hosts on one Redis.


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A private redis-server for the module's two hosts (maxmemory + allkeys-lru, no
    persistence: a restarted server starts empty)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, checkpoints, redis) -> Iterator[tuple[TorchServe, TorchServe]]:
    """Two TorchServe instances, A and B, as two hosts: own ports, own working
    directories, one worker each, and the same Redis as their shared store."""
    with ExitStack() as stack:
        servers = []
        for name, delta in (("a", HOST_A_DELTA), ("b", HOST_B_DELTA)):
            with pytest.MonkeyPatch.context() as patch:
                # Read once, at the frontend's start: its workers inherit it.
                patch.setenv(STORE_URL_ENV, redis.url(REDIS_QUERY))
                root = tmp_path_factory.mktemp(f"host_{name}")
                servers.append(
                    stack.enter_context(micro_server(root, checkpoints["sam_micro"], delta))
                )
        yield servers[0], servers[1]


def fresh_image(seed: int) -> bytes:
    """A PNG no server has seen (this module's seeds are its own)."""
    return png_bytes(make_image(HEIGHT, WIDTH, seed=seed))


def refine(image_id: str, logits_id: str) -> dict[str, Any]:
    """A corrective click fed SAM's logits of an earlier answer (``mask_input``)."""
    prompt = {**point_prompt([[30, 40], [70, 20]], [1, 0]), "mask_input": logits_id}
    return segment_request(image_id=image_id, prompts=[prompt])


def test_two_hosts_share_embeddings_and_mask_input_logits_through_redis(hosts, redis):
    """An image sent to A alone: B answers a click by ``image_id`` (REST and gRPC) with
    A's masks and scores for the same click, and a refinement whose ``mask_input`` is
    A's ``logits_id`` with A's answer to the same refinement: B found the embedding and
    the logits in Redis (its store hits), and never ran the encoder."""
    a, b = hosts
    rest_a, rest_b = rest_client(a), rest_client(b)
    before_b = counters(b)["total"]
    first = rest_a.predict(MODEL, segment_request(fresh_image(21), prompts=prompts(0)))
    image_id, logits_id = first["image_id"], first["results"][0]["logits_id"]
    on_a = [answer(rest_a.predict(MODEL, click(image_id, i))) for i in range(3)]
    refined_on_a = answer(rest_a.predict(MODEL, refine(image_id, logits_id)))

    # The refinement first: B has not made these logits itself, so they come from Redis.
    refined_on_b = answer(rest_b.predict(MODEL, refine(image_id, logits_id)))
    rest_on_b = [answer(rest_b.predict(MODEL, click(image_id, i))) for i in (0, 1)]
    with grpc_client(b) as grpc_b:
        grpc_on_b = answer(grpc_b.predict(MODEL, click(image_id, 2)))

    assert answer(first) == on_a[0]
    assert refined_on_b == refined_on_a
    assert rest_on_b == on_a[:2]
    assert grpc_on_b == on_a[2]
    stats_b = counters(b)
    after_b = stats_b["total"]
    assert stats_b["workers"][0]["shared_store"]["store"] == redis.url()
    assert after_b["encoder_runs"] == before_b["encoder_runs"]
    # The embedding and the logits: one hit each.
    assert after_b["shared_store"]["hits"] - before_b["shared_store"]["hits"] == 2


def entry_key(redis: RedisServer, image_id: str) -> str:
    """The Redis key of the embedding entry of ``image_id`` (SharedStore.key:
    ``samserve:v<format>:<model>:embedding:<image_id>``): there must be exactly one."""
    keys = list(redis.client().scan_iter(match=f"samserve:v*:*:{EMBEDDING}:{image_id}"))
    assert len(keys) == 1, keys
    return keys[0].decode()


def assert_store_miss_then_right_answer(
    a: TorchServe, b: TorchServe, image: bytes, image_id: str, expected: list[tuple]
) -> None:
    """B counts an ``invalid`` store read and answers a click by ``image_id`` with
    ``image_not_cached`` (a miss); sent with the image, the click gets A's answer."""
    rest_b = rest_client(b)
    before = counters(b)["total"]["shared_store"]
    with pytest.raises(SamServeError) as refused:
        rest_b.predict(MODEL, click(image_id, 5))
    assert refused.value.code == IMAGE_NOT_CACHED and refused.value.status == 404
    after = counters(b)["total"]["shared_store"]
    assert after["invalid"] - before["invalid"] == 1
    assert after["hits"] == before["hits"]
    with_image = segment_request(image, prompts=prompts(5))
    assert answer(rest_b.predict(MODEL, with_image)) == expected
    assert answer(rest_b.predict(MODEL, click(image_id, 5))) == expected


def test_a_corrupted_entry_is_an_invalid_miss_never_a_wrong_answer(hosts, redis):
    """One byte of an embedding entry flipped in Redis (SETRANGE, in the array's bytes):
    the entry's checksum fails, so B counts it ``invalid`` and answers as if it were not
    there; the answer it then gives is A's."""
    a, b = hosts
    image = fresh_image(31)
    rest_a = rest_client(a)
    image_id = rest_a.predict(MODEL, segment_request(image))["image_id"]
    expected = answer(rest_a.predict(MODEL, click(image_id, 5)))
    client, key = redis.client(), entry_key(redis, image_id)
    offset = client.strlen(key) // 2
    flipped = bytes([client.getrange(key, offset, offset)[0] ^ 0x10])
    client.setrange(key, offset, flipped)

    assert_store_miss_then_right_answer(a, b, image, image_id, expected)


def test_a_foreign_models_entry_is_an_invalid_miss(hosts, redis, micro_sam):
    """An entry of the right shape written by another model identity (random values),
    copied onto our model's key for the same image id: well formed, but B counts it
    ``invalid`` (its model is not ours) and never answers from it."""
    a, b = hosts
    image = fresh_image(41)
    rest_a = rest_client(a)
    image_id = rest_a.predict(MODEL, segment_request(image))["image_id"]
    expected = answer(rest_a.predict(MODEL, click(image_id, 5)))
    channels = micro_sam.prompt_encoder.embed_dim
    height, width = micro_sam.prompt_encoder.image_embedding_size
    shape = (1, channels, height, width)
    spec = EntrySpec(
        {"embedding": (shape, "float32")}, {"input_size": "pair", "original_size": "pair"}
    )
    ours = entry_key(redis, image_id)
    other = open_store(StoreOptions.from_url(redis.url(REDIS_QUERY)), "other-model")
    assert other is not None
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    entry = Entry({"embedding": values}, {"input_size": (192, 256), "original_size": (72, 96)})
    assert other.put_embedding(image_id, entry)
    assert other.get_embedding(image_id, spec) is not None  # well formed for its own model
    other.close()
    assert redis.client().copy(other.key(EMBEDDING, image_id), ours, replace=True)

    assert_store_miss_then_right_answer(a, b, image, image_id, expected)


class ClickLoad:
    """A thread that sends clicks until stopped: a fresh image with a click to A, then
    the same click by ``image_id`` to B, whose answer must be A's. B's client shares A's
    sent images, so a click B answers ``image_not_cached`` goes again with the image, as
    a client of two hosts would send it (samclient.resend)."""

    def __init__(self, a: TorchServe, b: TorchServe) -> None:
        self.rest_a = rest_client(a, ResendOptions())
        self.rest_b = rest_client(b, ResendOptions())
        self.rest_b.sent_images = self.rest_a.sent_images
        self.done: list[tuple[float, bool]] = []  # (time answered, answer equal to A's)
        self.failures: list[tuple[float, Exception]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seed = 1000
        while not self._stop.is_set():
            seed += 1
            try:
                image = fresh_image(seed)
                first = self.rest_a.predict(MODEL, segment_request(image, prompts=prompts(seed)))
                on_b = self.rest_b.predict(MODEL, click(first["image_id"], seed))
                self.done.append((time.monotonic(), answer(on_b) == answer(first)))
            except Exception as error:  # any failure is the test's, not the thread's
                self.failures.append((time.monotonic(), error))

    def __enter__(self) -> ClickLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def answered(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(since <= t < until for t, _ in self.done)

    def wait_answers(self, count: int, since: float, timeout: float = 60) -> None:
        """Wait until ``count`` clicks were answered after ``since``."""
        deadline = time.monotonic() + timeout
        while self.answered(since) < count:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"{self.answered(since)} of {count} clicks"
            time.sleep(0.05)


def test_redis_killed_mid_load_and_restarted_fails_no_click(hosts, redis):
    """Clicks go on continuously while Redis is killed (SIGKILL) and later restarted on
    the same port: no click fails (no 5xx, no error of any kind) and every answer is A's
    for its click. While Redis is down, B answers a click by ``image_id`` on an image it
    never saw ``image_not_cached`` and the client resends the image; each worker warns
    once and counts the store's errors. After the restart and the back-off the store is
    used again: the empty new Redis fills with entries, A writes and B reads them."""
    a, b = hosts
    with ClickLoad(a, b) as load:
        load.wait_answers(5, since=0)
        redis.kill()
        killed = time.monotonic()
        resends_before = load.rest_b.sent_images.resends
        load.wait_answers(5, since=killed)
        time.sleep(max(0.0, killed + 2 - time.monotonic()))  # past a back-off or two
        resends_down = load.rest_b.sent_images.resends - resends_before
        redis.start()
        restarted = time.monotonic()
        at_restart = counters(a)["total"]["shared_store"], counters(b)["total"]["shared_store"]
        # The back-off (1 s) passes, then B finds A's new entries again.
        time.sleep(3)
        load.wait_answers(5, since=time.monotonic())
    after = counters(a)["total"]["shared_store"], counters(b)["total"]["shared_store"]

    print(
        f"Redis killed mid-load: {load.answered(0, killed)} clicks before, "
        f"{load.answered(killed, restarted)} while down ({resends_down} resent), "
        f"{load.answered(restarted)} after; failures {load.failures}; store at restart "
        f"{at_restart}, at the end {after}"
    )
    assert load.failures == []
    assert server_errors(a) == server_errors(b) == []
    assert all(equal for _, equal in load.done), "an answer on B differed from A's"
    assert load.answered(killed, restarted) >= 5  # clicks went on while Redis was down
    assert resends_down >= 1
    for stats in after:
        assert stats["errors"] >= 1
    assert after[0]["writes"] > at_restart[0]["writes"]
    assert after[1]["hits"] > at_restart[1]["hits"]
    assert redis.client().dbsize() > 0
    for server in hosts:
        log = model_log(server)
        assert "requests go on without it" in log
        assert "is available again" in log
