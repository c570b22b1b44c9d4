"""Tests for samserve.weights against a real local HTTP server (no network mocks)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from samserve import weights
from samserve.weights import (
    ChecksumError,
    DownloadError,
    download_checkpoint,
    download_file,
    expected_hash_prefix,
)

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "scripts" / "download_weights.py"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that records requests and can serve a truncated body."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/truncated/"):
            # Promise 1000 bytes, send 10, then close: an interrupted download.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class Server:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield Server(root, f"http://{host}:{port}/", httpd.requests)  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def tiny_checkpoint(server: Server, tmp_path: Path) -> tuple[str, bytes]:
    """A small real torch checkpoint served under a name embedding its sha256 prefix."""
    scratch = tmp_path / "scratch.pth"
    torch.manual_seed(0)
    state = {
        "image_encoder.patch_embed.proj.weight": torch.randn(4, 3, 2, 2),
        "mask_decoder.iou_token.weight": torch.randn(1, 8),
    }
    torch.save(state, scratch)
    data = scratch.read_bytes()
    name = f"sam_tiny_{hashlib.sha256(data).hexdigest()[:6]}.pth"
    (server.root / name).write_bytes(data)
    return name, data


def _dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --- expected_hash_prefix ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "prefix"),
    [
        ("sam_vit_b_01ec64.pth", "01ec64"),
        ("sam_vit_h_4b8939.pth", "4b8939"),
        ("sam_vit_l_0b3195.pth", "0b3195"),
        ("resnet18-f37072fd.pth", "f37072fd"),
        ("some/dir/model_ABCDEF12.pt", "abcdef12"),
    ],
)
def test_expected_hash_prefix(filename: str, prefix: str) -> None:
    assert expected_hash_prefix(filename) == prefix


@pytest.mark.parametrize(
    "filename", ["model.pth", "sam_vit_b.pth", "sam_tiny_zz1234.pth", "01ec64.pth", "x_abc.pth"]
)
def test_expected_hash_prefix_rejects(filename: str) -> None:
    with pytest.raises(ValueError, match="no hash prefix"):
        expected_hash_prefix(filename)


def test_official_names_carry_prefixes() -> None:
    for filename in weights.OFFICIAL_CHECKPOINTS.values():
        assert len(expected_hash_prefix(filename)) == 6


# --- download_file / download_checkpoint ------------------------------------------------------


def test_download_file_success(
    server: Server, tiny_checkpoint: tuple[str, bytes], tmp_path: Path, capsys
) -> None:
    name, data = tiny_checkpoint
    dest = tmp_path / "weights" / name
    out = download_file(server.url + name, dest, expected_hash_prefix(name), progress=True)
    assert out == dest
    assert dest.read_bytes() == data
    assert _dir_listing(dest.parent) == [name]
    assert "100%" in capsys.readouterr().err  # tqdm bar on stderr, total from Content-Length
    state = torch.load(dest, weights_only=True)
    assert state["mask_decoder.iou_token.weight"].shape == (1, 8)


def test_download_checkpoint_success(
    server: Server, tiny_checkpoint: tuple[str, bytes], tmp_path: Path, monkeypatch
) -> None:
    name, data = tiny_checkpoint
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "vit_tiny", name)
    dest_dir = tmp_path / "weights"
    base = server.url.rstrip("/")  # no trailing slash must work too
    out = download_checkpoint("vit_tiny", dest_dir, base_url=base, progress=False)
    assert out == dest_dir / name
    assert out.read_bytes() == data
    assert server.requests == ["/" + name]


def test_checksum_mismatch_leaves_nothing(server: Server, tmp_path: Path) -> None:
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(b"definitely not the vit_b checkpoint")
    dest_dir = tmp_path / "weights"
    with pytest.raises(ChecksumError) as info:
        download_checkpoint("vit_b", dest_dir, base_url=server.url, progress=False)
    msg = str(info.value)
    assert "01ec64" in msg
    assert hashlib.sha256(b"definitely not the vit_b checkpoint").hexdigest() in msg
    assert isinstance(info.value, ValueError)
    assert _dir_listing(dest_dir) == []  # neither the file nor a temp file


def test_checksum_mismatch_keeps_existing_file(server: Server, tmp_path: Path) -> None:
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(b"wrong new content")
    dest_dir = tmp_path / "weights"
    dest_dir.mkdir()
    (dest_dir / "sam_vit_b_01ec64.pth").write_bytes(b"old content")
    with pytest.raises(ChecksumError):
        download_checkpoint("vit_b", dest_dir, base_url=server.url, progress=False)
    assert (dest_dir / "sam_vit_b_01ec64.pth").read_bytes() == b"old content"
    assert _dir_listing(dest_dir) == ["sam_vit_b_01ec64.pth"]


def test_http_404(server: Server, tmp_path: Path) -> None:
    dest_dir = tmp_path / "weights"
    with pytest.raises(DownloadError) as info:
        download_checkpoint("vit_h", dest_dir, base_url=server.url, progress=False)
    assert info.value.status == 404
    assert "404" in str(info.value)
    assert server.url + "sam_vit_h_4b8939.pth" in str(info.value)
    assert _dir_listing(dest_dir) == []


def test_truncated_download_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights" / "sam_x_0123ab.pth"
    with pytest.raises(DownloadError, match="truncated/sam_x_0123ab.pth"):
        download_file(server.url + "truncated/sam_x_0123ab.pth", dest, "0123ab", progress=False)
    assert _dir_listing(dest.parent) == []


def test_connection_refused(tmp_path: Path) -> None:
    dest = tmp_path / "sam_x_0123ab.pth"
    # Port 9 on loopback: nothing listens there.
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        download_file("http://127.0.0.1:9/sam_x_0123ab.pth", dest, "0123ab", progress=False)
    assert _dir_listing(tmp_path) == []


def test_existing_valid_file_not_redownloaded(
    server: Server, tiny_checkpoint: tuple[str, bytes], tmp_path: Path
) -> None:
    name, data = tiny_checkpoint
    dest = tmp_path / name
    dest.write_bytes(data)
    mtime = dest.stat().st_mtime_ns
    out = download_file(server.url + name, dest, expected_hash_prefix(name), progress=False)
    assert out == dest
    assert server.requests == []
    assert dest.stat().st_mtime_ns == mtime


def test_existing_corrupt_file_is_replaced(
    server: Server, tiny_checkpoint: tuple[str, bytes], tmp_path: Path
) -> None:
    name, data = tiny_checkpoint
    dest = tmp_path / "weights" / name
    dest.parent.mkdir()
    dest.write_bytes(b"corrupt")
    download_file(server.url + name, dest, expected_hash_prefix(name), progress=False)
    assert dest.read_bytes() == data
    assert server.requests == ["/" + name]
    assert _dir_listing(dest.parent) == [name]


def test_no_prefix_downloads_unverified(server: Server, tmp_path: Path) -> None:
    (server.root / "plain.bin").write_bytes(b"abc")
    dest = download_file(server.url + "plain.bin", tmp_path / "plain.bin", None, progress=False)
    assert dest.read_bytes() == b"abc"


def test_unknown_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vit_b, vit_h, vit_l"):
        download_checkpoint("vit_x", tmp_path, base_url="http://127.0.0.1:9/")
    assert _dir_listing(tmp_path) == []


# --- CLI --------------------------------------------------------------------------------------


def _run_cli(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SAMSERVE_WEIGHTS_URL"}
    if env_url is not None:
        env["SAMSERVE_WEIGHTS_URL"] = env_url
    return subprocess.run(
        [sys.executable, str(CLI), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_success(server: Server, tiny_checkpoint: tuple[str, bytes], tmp_path: Path) -> None:
    name, data = tiny_checkpoint
    dest_dir = tmp_path / "weights"
    proc = _run_cli("vit_b", "--dest", str(dest_dir), "--base-url", server.url, "--filename", name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str((dest_dir / name).resolve())
    assert (dest_dir / name).read_bytes() == data


def test_cli_checksum_failure_via_env(server: Server, tmp_path: Path) -> None:
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(b"wrong")
    dest_dir = tmp_path / "weights"
    proc = _run_cli("vit_b", "--dest", str(dest_dir), "--no-progress", env_url=server.url)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr
    assert "01ec64" in proc.stderr
    assert proc.stdout == ""
    assert server.requests == ["/sam_vit_b_01ec64.pth"]
    assert _dir_listing(dest_dir) == []


def test_cli_http_error(server: Server, tmp_path: Path) -> None:
    proc = _run_cli("vit_l", "--dest", str(tmp_path), "--base-url", server.url)
    assert proc.returncode == 1
    assert "404" in proc.stderr and "sam_vit_l_0b3195.pth" in proc.stderr


def test_cli_rejects_unknown_model(tmp_path: Path) -> None:
    proc = _run_cli("vit_x", "--dest", str(tmp_path))
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
