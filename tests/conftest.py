"""Shared fixtures: small SAM models with deterministic random weights, test images."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

# build_mar is a script: pytest finds scripts/ through pyproject.toml's ``pythonpath``.
from build_mar import build_archive
from samclient.grpc_client import GrpcClient
from samclient.rest_client import RestClient
from samclient.server import Ports, TorchServe
from samserve import matmul
from samserve.masks import MaskRuns
from samserve.models import build_sam, random_checkpoint, spec_by_name
from samserve.store import STORE_URL_ENV
from samserve_cli.store_server import wait_until_answering

REPO = Path(__file__).resolve().parent.parent
# The project's server settings, wherever pytest runs from (clients read the current
# directory's by default).
CONFIG = REPO / "config.properties"

torch.set_num_threads(2)

MODEL = "sam"
# 19080-19082, gRPC 18070-18071, workers from 20000; two test runs side by side need
# different offsets (SAMSERVE_TEST_PORT_OFFSET).
PORTS = Ports.offset(int(os.environ.get("SAMSERVE_TEST_PORT_OFFSET", "11000")))
# sam_small_cache.mar multiplies with the backend "auto" does not pick on this host.
OTHER_CPU_MATMUL = {"onednn": "torch", "torch": "onednn"}[matmul.resolve_backend("auto")]
SMALL_CACHE_MB = 0.2  # holds one sam_micro image (64 KiB embedding, 96 KiB projections), not two


def pytest_configure(config: pytest.Config) -> None:
    """Test servers keep embeddings to their own workers unless a test gives them a store:
    the default one-host store would carry embeddings from one test (and one run) into
    the next, and counts of encoder runs and cache misses would depend on test order."""
    os.environ.setdefault(STORE_URL_ENV, "none")


@pytest.fixture(autouse=True)
def _restore_cpu_matmul():
    """Tests may switch samserve.matmul's process-wide backend; each starts on ``auto``,
    as a worker with default settings does (importing samserve sets none)."""
    matmul.set_backend("auto")
    yield
    matmul.set_backend("auto")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Deterministic random checkpoints of the small specs."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in ("sam_micro", "sam_tiny"):
        out[name] = folder / f"{name}.pth"
        random_checkpoint(spec_by_name(name), out[name], seed=0)
    return out


@pytest.fixture(scope="session")
def micro_sam(checkpoints):
    return build_sam(spec_by_name("sam_micro"), checkpoints["sam_micro"])


@pytest.fixture(scope="session")
def tiny_sam(checkpoints):
    return build_sam(spec_by_name("sam_tiny"), checkpoints["sam_tiny"])


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image with smooth structure plus noise (not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [
            (xx * 255 // max(width - 1, 1)),
            (yy * 255 // max(height - 1, 1)),
            ((xx + yy) % 128) * 2,
        ],
        axis=-1,
    ).astype(np.int32)
    cy, cx, r = height // 2, width // 3, min(height, width) // 5
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (230, 40, 40)
    image += rng.integers(-20, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def column_runs(mask: np.ndarray) -> np.ndarray:
    """COCO RLE's uncompressed counts (uint32) of an HxW bool or 0/1 mask, found by numpy:
    column-major run lengths from a run of 0s."""
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
    return np.diff(changes, prepend=0).astype(np.uint32)


def coco_rle(mask: np.ndarray) -> dict:
    """pycocotools' COCO RLE of an HxW bool or 0/1 mask (bytes counts)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def runs_of(mask: np.ndarray) -> MaskRuns:
    """``MaskRuns`` of an HxW bool mask, as the server makes them from their runs: its
    column-major run lengths, found by numpy, and its box and area as pycocotools gives them."""
    box = [int(v) for v in mask_utils.toBbox(coco_rle(mask))]
    return MaskRuns.of_runs(column_runs(mask), mask.shape, box, int(mask.sum()))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoints):
    """A real TorchServe from config.properties with the sam_micro archive registered
    as ``sam``; ``sam_small_cache.mar`` (a one-image cache) waits in its model store."""
    root = tmp_path_factory.mktemp("torchserve")
    store = root / "model_store"
    spec = spec_by_name("sam_micro")
    build_archive(spec, checkpoints["sam_micro"], store, MODEL)
    build_archive(
        spec,
        checkpoints["sam_micro"],
        store,
        "sam_small_cache",
        settings={"embedding_cache_mb": SMALL_CACHE_MB, "cpu_matmul": OTHER_CPU_MATMUL},
    )
    server = TorchServe(root / "run", store, PORTS, config=CONFIG)
    server.start()
    try:
        rest = RestClient(server.inference_url, server.management_url, keys=server.keys())
        status = rest.register_model("sam.mar", MODEL, initial_workers=1)
        assert "registered" in status
        yield server
    finally:
        server.stop()
        assert server.pid() is None


@contextmanager
def micro_server(
    root: Path,
    checkpoint: Path,
    port_delta: int,
    workers: int = 1,
    overrides: dict[str, str] | None = None,
) -> Iterator[TorchServe]:
    """A TorchServe of its own, besides the session's: its directory ``root``, the
    session's ports shifted by ``port_delta`` (below the session's worker ports, 920),
    ``overrides`` of config.properties, and sam_micro (``checkpoint``) registered as
    ``sam`` with ``workers`` workers."""
    build_archive(spec_by_name("sam_micro"), checkpoint, root / "store", MODEL)
    ports = Ports.offset(PORTS.inference - 8080 + port_delta)
    server = TorchServe(root / "run", root / "store", ports, CONFIG, overrides)
    server.start()
    try:
        rest = RestClient(server.inference_url, server.management_url, server.key_source())
        rest.register_model(f"{MODEL}.mar", MODEL, initial_workers=workers)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rest(server) -> RestClient:
    """A REST client of the session's server whose keys renew when they expire."""
    return RestClient(server.inference_url, server.management_url, keys=server.key_source())


@pytest.fixture(scope="module")
def grpc_client(server):
    """A gRPC client of the session's server, with its keys."""
    client = GrpcClient(
        "127.0.0.1",
        PORTS.grpc_inference,
        PORTS.grpc_management,
        keys=server.key_source(),
        token_url=server.management_url,
    )
    yield client
    client.close()


# A redis-server of the tests' own, for the shared store (test_store, test_shared_cache).

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (scripts/setup.sh installs Debian's redis-server)",
)


def free_port() -> int:
    """A TCP port no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of our own on a free port, with no persistence."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.args = args
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
            *self.args,
        ]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (the server holds it)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        process = self.process
        wait_until_answering(
            self.port, self.directory / "redis.log", 10, lambda: process.poll() is None
        )

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL) and wait for it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def url(self, query: str = "", auth: str = "", scheme: str = "redis") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0{query}"

    def client(self, **kwargs):
        """A plain redis-py client, to look at the server from outside the store."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture
def redis_server(tmp_path: Path):
    """A running redis-server, killed after the test."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
        server.kill()
