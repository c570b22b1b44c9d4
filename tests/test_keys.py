"""Keys that expire: the key file, its re-reading, and renewal through TorchServe's token API.

The integration tests start a real TorchServe whose keys expire within seconds
(``token_expiration_min`` is a fraction of a minute: TorchServe 0.12's
``ConfigManager.getTimeToExpiration`` parses it as a Double), wait past the expiry, and
show REST and gRPC clients, inference and management calls, going on.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import MODEL, make_image, micro_server, png_bytes
from samclient.body import point_prompt, segment_request
from samclient.errors import AuthError
from samclient.grpc_client import GrpcClient
from samclient.keys import KEY_FILE_ENV, Keys, KeySource, find_key_file, read_keys
from samclient.rest_client import RestClient
from samclient.server import TorchServe

EXPIRY_MIN = 0.2  # keys live 12 s
# TorchServe 0.12's key file, as TokenAuthorization.generateKeyFile writes it (Gson,
# pretty-printed; Instant.toString() times).
KEY_FILE = {
    "management": {"key": "m4M-5IBY", "expiration time": "2024-02-16T21:12:24.801167Z"},
    "inference": {"key": "gNRuA7dS", "expiration time": "2024-02-16T21:12:24.801148Z"},
    "API": {"key": "yv9uQajP"},
}
CLICK = [point_prompt([[40, 30]], [1])]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


# --- the key file, without a server ------------------------------------------------------


def test_read_keys_reads_torchserves_key_file(tmp_path):
    path = tmp_path / "key_file.json"
    write_json(path, KEY_FILE)
    keys = read_keys(path)
    assert (keys.inference, keys.management, keys.api) == ("gNRuA7dS", "m4M-5IBY", "yv9uQajP")
    assert keys.inference_expires == datetime(2024, 2, 16, 21, 12, 24, 801148, timezone.utc)
    assert keys.expired("inference") and keys.expired("management")
    assert not keys.expired("inference", datetime(2024, 2, 16, 21, 12, tzinfo=timezone.utc))


def test_read_keys_waits_out_a_half_written_file(tmp_path):
    """TorchServe rewrites the file in place (Files.write): a reader may find it cut."""
    path = tmp_path / "key_file.json"
    text = json.dumps(KEY_FILE)
    path.write_text(text[: len(text) // 2])
    writer = threading.Timer(0.2, lambda: path.write_text(text))
    writer.start()
    try:
        assert read_keys(path).inference == "gNRuA7dS"
    finally:
        writer.join()


def test_a_refused_key_is_replaced_by_the_newer_one_in_the_file(tmp_path):
    """Another client renewed: the file's key, not yet expired, is taken without asking
    the token API (there is no token URL to ask)."""
    path = tmp_path / "key_file.json"
    write_json(path, KEY_FILE)
    source = KeySource(path)
    fresh = {"key": "fresh", "expiration time": "2999-01-01T00:00:00.000000Z"}
    write_json(path, {**KEY_FILE, "inference": fresh})
    assert source.refresh("inference", "gNRuA7dS", token_url=None).inference == "fresh"
    assert source.keys.inference == "fresh"


def test_only_the_inference_key_and_it_expired_says_so_and_how_to_get_another(tmp_path):
    path = tmp_path / "client_keys.json"
    write_json(path, {"inference": KEY_FILE["inference"]})
    with pytest.raises(AuthError) as caught:
        KeySource(path).refresh("inference", "gNRuA7dS", token_url="http://127.0.0.1:1")
    message = str(caught.value)
    assert "expired" in message and "no API key" in message and str(path) in message
    assert "renew-key --api inference" in message and "GET /token?type=inference" in message


def test_fixed_keys_cannot_be_renewed(tmp_path):
    with pytest.raises(AuthError, match="expired .* no key file"):
        KeySource(keys=Keys("old", "old")).refresh("management", "old", "http://127.0.0.1:1")


def test_the_key_file_is_searched_for_in_the_documented_order(tmp_path, monkeypatch):
    """$SAMSERVE_KEY_FILE, the server directory given, ./run, then the current directory;
    never a path beside the installed package."""
    here, server, elsewhere = tmp_path / "here", tmp_path / "server", tmp_path / "elsewhere"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert find_key_file(server) is None
    for folder in (here, here / "run", server, elsewhere):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "key_file.json", KEY_FILE)
    monkeypatch.chdir(here)
    assert find_key_file() == here / "run" / "key_file.json"
    (here / "run" / "key_file.json").unlink()
    assert find_key_file() == here / "key_file.json"
    assert find_key_file(server) == server / "key_file.json"
    monkeypatch.setenv(KEY_FILE_ENV, str(elsewhere / "key_file.json"))
    assert find_key_file(server) == elsewhere / "key_file.json"
    assert KeySource(server / "key_file.json").path == server / "key_file.json"


# --- a real TorchServe whose keys expire --------------------------------------------------


@pytest.fixture(scope="module")
def short_keys(tmp_path_factory, checkpoints):
    """A TorchServe of its own (ports and directory) whose keys expire after EXPIRY_MIN,
    serving sam_micro as ``sam``."""
    root = tmp_path_factory.mktemp("short_keys")
    overrides = {"token_expiration_min": str(EXPIRY_MIN)}
    with micro_server(root, checkpoints["sam_micro"], 880, overrides=overrides) as server:
        yield server


def wait_past_expiry(keys: Keys) -> None:
    """Sleep until both keys of ``keys`` have expired (TorchServe's clock is ours)."""
    ends = [t for t in (keys.inference_expires, keys.management_expires) if t is not None]
    assert ends, "the key file has no expiration times"
    time.sleep(max(0.0, (max(ends) - datetime.now(timezone.utc)).total_seconds()) + 0.5)


def grpc_client(server: TorchServe, keys: Keys | KeySource) -> GrpcClient:
    ports = server.ports
    return GrpcClient(
        "127.0.0.1", ports.grpc_inference, ports.grpc_management, keys=keys,
        token_url=server.management_url,
    )  # fmt: skip


@pytest.mark.integration
def test_rest_and_grpc_clients_renew_expired_keys(short_keys):
    server = short_keys
    rest = RestClient(server.inference_url, server.management_url, server.key_source())
    grpc = grpc_client(server, server.key_source())
    image_id = rest.predict(MODEL, segment_request(png_bytes(make_image(60, 80))))["image_id"]
    by_id = segment_request(image_id=image_id, prompts=CLICK)
    first = read_keys(server.key_file)
    wait_past_expiry(first)

    # Expired means refused, and the key file did not change by itself: without renewal
    # a client that re-reads it stays locked out (fixed keys: nothing to re-read).
    assert read_keys(server.key_file) == first
    with pytest.raises(AuthError):
        RestClient(server.inference_url, server.management_url, keys=first).ping()
    with pytest.raises(AuthError):
        RestClient(server.inference_url, server.management_url, keys=first).list_models()
    with grpc_client(server, first) as stale:
        with pytest.raises(AuthError):
            stale.predict(MODEL, by_id)
        with pytest.raises(AuthError):
            stale.describe_model(MODEL)

    # REST renews both keys through the token API; the API key stays.
    assert len(rest.predict(MODEL, by_id)["results"][0]["masks"]) == 3
    assert rest.describe_model(MODEL)[0]["modelName"] == MODEL
    second = read_keys(server.key_file)
    assert second.inference not in (None, first.inference)
    assert second.management not in (None, first.management)
    assert second.api == first.api

    # gRPC renews them once they expired again.
    wait_past_expiry(second)
    assert len(grpc.predict(MODEL, by_id)["results"][0]["masks"]) == 3
    assert grpc.describe_model(MODEL)[0]["modelName"] == MODEL
    third = read_keys(server.key_file)
    assert third.inference not in (first.inference, second.inference)
    assert third.management not in (first.management, second.management)

    # The REST client's keys were replaced meanwhile: it takes the file's, renews nothing.
    assert rest.ping() == "Healthy"
    assert rest.list_models()["models"][0]["modelName"] == MODEL
    assert read_keys(server.key_file) == third
    grpc.close()


@pytest.mark.integration
def test_a_client_with_only_the_inference_key_rereads_it(short_keys, tmp_path):
    """The key source of a client that was handed only the inference key (a copy of
    that section of the key file): once the key expired, the client reads it again; if
    it is still the old one, it says so; once the operator renewed and handed out the
    new key, the same client goes on."""
    server = short_keys
    handed = tmp_path / "inference_key.json"

    def hand_out() -> str:
        section = json.loads(server.key_file.read_text())["inference"]
        write_json(handed, {"inference": section})
        return section["key"]

    KeySource(server.key_file).renew("inference", server.management_url)
    old = hand_out()
    client = RestClient(server.inference_url, server.management_url, keys=KeySource(handed))
    assert client.ping() == "Healthy"
    wait_past_expiry(read_keys(server.key_file))

    with pytest.raises(AuthError, match="refused the inference key") as caught:
        client.ping()
    assert str(handed) in str(caught.value) and "renew-key" in str(caught.value)
    assert read_keys(server.key_file).inference == old  # it could not renew, and did not

    KeySource(server.key_file).renew("inference", server.management_url)
    assert hand_out() != old
    assert client.ping() == "Healthy"


@pytest.mark.integration
def test_clients_work_on_past_the_default_expiry_step_of_one_minute(tmp_path_factory, checkpoints):
    """The server as an operator would set it, ``token_expiration_min=1``: one wait past
    the expiry, then gRPC renews the inference key and REST the management key, and each
    client takes the other's renewal from the key file."""
    root = tmp_path_factory.mktemp("one_minute_keys")
    overrides = {"token_expiration_min": "1"}
    with micro_server(root, checkpoints["sam_micro"], 640, overrides=overrides) as server:
        rest = RestClient(server.inference_url, server.management_url, server.key_source())
        image_id = rest.predict(MODEL, segment_request(png_bytes(make_image(60, 80))))["image_id"]
        by_id = segment_request(image_id=image_id, prompts=CLICK)
        first = read_keys(server.key_file)
        with grpc_client(server, server.key_source()) as grpc:
            wait_past_expiry(first)
            with pytest.raises(AuthError):
                RestClient(server.inference_url, server.management_url, keys=first).ping()
            assert len(grpc.predict(MODEL, by_id)["results"][0]["masks"]) == 3
            assert rest.describe_model(MODEL)[0]["modelName"] == MODEL
            renewed = read_keys(server.key_file)
            assert renewed.inference != first.inference
            assert renewed.management != first.management
            assert len(rest.predict(MODEL, by_id)["results"][0]["masks"]) == 3
            assert grpc.describe_model(MODEL)[0]["modelName"] == MODEL
            assert read_keys(server.key_file) == renewed  # nothing renewed twice
