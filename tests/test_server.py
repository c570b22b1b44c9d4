"""samclient.server and samserve-serve (samserve_cli.serve): a server listens where its
config.properties says, and samserve-serve renews keys."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import requests

from conftest import CONFIG, PORTS, free_port
from samclient.keys import read_keys
from samclient.server import Addresses, Ports, TorchServe
from samserve.store import STORE_URL_ENV
from samserve_cli import serve
from samserve_cli.store_server import StoreServer


def test_addresses_follow_the_config_and_reach_wildcard_binds_through_loopback():
    addresses = Addresses.from_properties(
        {
            "inference_address": "http://0.0.0.0:9080",
            "management_address": "https://10.0.0.5:9081",
            "grpc_inference_address": "0.0.0.0",
            "grpc_inference_port": "9070",
        }
    )
    assert addresses.inference_url == "http://127.0.0.1:9080"
    assert addresses.management_url == "https://10.0.0.5:9081"
    assert addresses.metrics_url == "http://127.0.0.1:8082"  # TorchServe's default
    assert (addresses.grpc_inference_host, addresses.grpc_inference_port) == ("127.0.0.1", 9070)
    assert addresses.grpc_management_port == 7071


def test_a_client_finds_the_config_it_is_given_else_the_default_if_any(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9080\n")
    assert Addresses.find(config).inference_url == "http://127.0.0.1:9080"
    assert Addresses.find(None, config).inference_url == "http://127.0.0.1:9080"
    assert Addresses.find(None, tmp_path / "missing.properties") == Addresses()
    with pytest.raises(FileNotFoundError):
        Addresses.find(tmp_path / "missing.properties")


def test_without_ports_of_its_own_an_instance_keeps_the_configs_addresses(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text(
        CONFIG.read_text().replace(
            "inference_address=http://127.0.0.1:8080", "inference_address=http://10.0.0.5:8080"
        )
    )
    written = TorchServe(tmp_path / "run", tmp_path / "store", config=config)
    (tmp_path / "run").mkdir()
    assert "inference_address=http://10.0.0.5:8080" in written.write_config().read_text()
    assert written.inference_url == "http://10.0.0.5:8080"
    own = TorchServe(tmp_path / "run", tmp_path / "store", Ports.offset(100), config=config)
    assert "inference_address=http://127.0.0.1:8180" in own.write_config().read_text()


@pytest.mark.integration
def test_serve_script_listens_where_the_config_says_and_renews_keys(tmp_path, monkeypatch):
    ports = Ports.offset(PORTS.inference - 8080 + 820)
    config = tmp_path / "config.properties"
    config.write_text(
        CONFIG.read_text()
        .replace(":8080", f":{ports.inference}")
        .replace(":8081", f":{ports.management}")
        .replace(":8082", f":{ports.metrics}")
        .replace("=7070", f"={ports.grpc_inference}")
        .replace("=7071", f"={ports.grpc_management}")
        .replace("=9000", f"={ports.worker}")
    )
    # The metrics config the copy names, beside it: without it no worker could start.
    shutil.copy(CONFIG.parent / "metrics.yaml", tmp_path / "metrics.yaml")
    args = ["--config", str(config), "--workdir", str(tmp_path / "run")]
    args += ["--model-store", str(tmp_path / "store")]
    (tmp_path / "store").mkdir()
    # --redis sets the store URL in this process's environment, which the server inherits.
    monkeypatch.setenv(STORE_URL_ENV, "none")
    redis_port = free_port()
    assert serve.main(["start", "--redis", "--redis-port", str(redis_port), *args]) == 0
    try:
        url = (tmp_path / "run" / "store_url").read_text().strip()
        assert url.startswith("redis://:") and url.endswith(f"@127.0.0.1:{redis_port}/0")
        frontend = TorchServe(tmp_path / "run", tmp_path / "store", config=config).pid()
        environ = Path(f"/proc/{frontend}/environ").read_bytes().split(b"\0")
        assert f"{STORE_URL_ENV}={url}".encode() in environ
        keys = read_keys(tmp_path / "run" / "key_file.json")
        ping = requests.get(
            f"http://127.0.0.1:{ports.inference}/ping",
            headers={"Authorization": f"Bearer {keys.inference}"},
            timeout=10,
        )
        assert ping.json() == {"status": "Healthy"}
        assert serve.main(["status", *args]) == 0
        assert serve.main(["renew-key", "--api", "management", *args]) == 0
        renewed = read_keys(tmp_path / "run" / "key_file.json")
        assert renewed.management != keys.management and renewed.inference == keys.inference
    finally:
        assert serve.main(["stop", *args]) == 0
    assert not (tmp_path / "run" / "store_url").exists()  # the Redis server stopped too
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_store_server_runs_as_deploy_runs_redis_and_stops(tmp_path):
    """samserve-serve --redis's server: a password, maxmemory with allkeys-lru, no
    persistence, its URL readable by this user only; stop ends it."""
    import redis

    server = StoreServer(tmp_path / "run", free_port(), maxmemory_mb=64)
    url = server.start()
    try:
        assert (tmp_path / "run" / "store_url").read_text().strip() == url
        assert (tmp_path / "run" / "store_url").stat().st_mode & 0o077 == 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        client = redis.Redis.from_url(url)
        assert client.ping()
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "allkeys-lru"
        assert int(config["maxmemory"]) == 64 * 2**20
        assert config["save"] == "" and config["appendonly"] == "no"
        client.close()
    finally:
        assert server.stop()
    assert not server.stop()  # nothing left to stop
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
