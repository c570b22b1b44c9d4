"""Tests for samserve.weights and scripts/download_weights.py against a real local HTTP
server (no network mocks)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import download_weights
from samserve import weights
from samserve.weights import (
    Checkpoint,
    DownloadError,
    DownloadOptions,
    Expected,
    VerificationError,
    download_checkpoint,
    download_file,
    file_name_from_url,
    verify_file,
)

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "scripts" / "download_weights.py"
QUIET = DownloadOptions(progress=False, timeout=10)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus misbehaving servers under a few path prefixes:

    - ``/truncated/<name>``: promises 1000 bytes, sends 10, closes.
    - ``/announce/<n>/<name>``: announces ``Content-Length: n`` and sends zeros until the
      client hangs up (or ``n`` bytes are out); records the bytes sent.
    - ``/nolength/<name>``: the static file without ``Content-Length`` (ends at close).
    """

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
        elif self.path.startswith("/announce/"):
            self._announce(int(self.path.split("/")[2]))
        elif self.path.startswith("/nolength/"):
            data = (Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
        else:
            super().do_GET()

    def _announce(self, length: int) -> None:
        """Announce ``length`` bytes and send zeros until the client goes away."""
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        block = bytes(64 * 1024)
        try:
            while sent < length:
                self.wfile.write(block[: length - sent])
                sent += min(len(block), length - sent)
        except OSError:
            pass
        self.close_connection = True
        self.server.sent.append(sent)  # type: ignore[attr-defined]
        self.server.sent_done.set()  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class Server:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    sent_done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    host, port = httpd.server_address[:2]
    state = Server(root, f"http://{host}:{port}/")
    httpd.requests, httpd.sent, httpd.sent_done = state.requests, state.sent, state.sent_done  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True)
class Served:
    """A small real torch checkpoint on the local server, and what it must be."""

    name: str
    data: bytes
    expected: Expected


def _expected_of(data: bytes) -> Expected:
    return Expected(
        size=len(data),
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
    )


@pytest.fixture
def tiny_checkpoint(server: Server, tmp_path: Path) -> Served:
    scratch = tmp_path / "scratch.pth"
    torch.manual_seed(0)
    state = {
        "image_encoder.patch_embed.proj.weight": torch.randn(4, 3, 2, 2),
        "mask_decoder.iou_token.weight": torch.randn(1, 8),
    }
    torch.save(state, scratch)
    data = scratch.read_bytes()
    (server.root / "sam_tiny.pth").write_bytes(data)
    return Served("sam_tiny.pth", data, _expected_of(data))


@pytest.fixture
def official_vit_b_is_tiny(server: Server, tiny_checkpoint: Served, monkeypatch) -> Served:
    """The table's vit_b entry pointed at the tiny checkpoint, served under the official
    file name: the download path runs exactly as for the real file."""
    name = weights.OFFICIAL_CHECKPOINTS["vit_b"].file_name
    (server.root / name).write_bytes(tiny_checkpoint.data)
    entry = Checkpoint("vit_b", name, tiny_checkpoint.expected)
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "vit_b", entry)
    return Served(name, tiny_checkpoint.data, tiny_checkpoint.expected)


def _dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --- the published facts ----------------------------------------------------------------------


def test_official_checkpoints_are_the_published_ones() -> None:
    # File names: segment-anything README, "Model Checkpoints"
    #   (github.com/facebookresearch/segment-anything).
    # MD5s: their first six digits are in the official file names; the full values verify
    #   downloads from dl.fbaipublicfiles.com in IOPaint (Sanster/IOPaint,
    #   iopaint/plugins/interactive_seg.py, SEGMENT_ANYTHING_MODELS).
    # Sizes: the Content-Length Meta's host sends (wget logs of dl.fbaipublicfiles.com:
    #   "Length: 375042383" for vit_b, "Length: 2564550879" for vit_h), and the same three
    #   sizes in independent download manifests (e.g. Fooocus-based SimpleModels lists).
    # SHA-256s: micro-sam's pooch registry, which fetches these files from
    #   dl.fbaipublicfiles.com and checks them on every download
    #   (computational-cell-analytics/micro-sam, micro_sam/util.py).
    published = {
        # model: (file name, size in bytes, md5, sha256)
        "vit_b": ("sam_vit_b_01ec64.pth", 375042383, "01ec64d29a2fca3f0661936605ae66f8",
                  "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        "vit_l": ("sam_vit_l_0b3195.pth", 1249524607, "0b3195507c641ddb6910d2bb5adee89c",
                  "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        "vit_h": ("sam_vit_h_4b8939.pth", 2564550879, "4b8939a88964f0f4ff5f5b2642c598a6",
                  "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    }  # fmt: skip
    table = {
        name: (c.file_name, c.expected.size, c.expected.md5, c.expected.sha256)
        for name, c in weights.OFFICIAL_CHECKPOINTS.items()
    }
    assert table == published
    assert all(name == c.name for name, c in weights.OFFICIAL_CHECKPOINTS.items())


def test_official_file_names_carry_the_start_of_their_md5() -> None:
    """The hex in each official name is an MD5 prefix, not a SHA-256 one."""
    for checkpoint in weights.OFFICIAL_CHECKPOINTS.values():
        tag = re.fullmatch(r"sam_vit_[bhl]_([0-9a-f]{6})\.pth", checkpoint.file_name)
        assert tag is not None, checkpoint.file_name
        assert checkpoint.expected.md5.startswith(tag.group(1))
        assert not checkpoint.expected.sha256.startswith(tag.group(1))


# --- Expected, verify_file, file_name_from_url -------------------------------------------------


def test_expected_normalises_and_validates_digests() -> None:
    assert Expected(md5="01EC64D29A2FCA3F0661936605AE66F8").md5 == (
        "01ec64d29a2fca3f0661936605ae66f8"
    )
    assert Expected(size=3, sha256="a" * 64).digests == {"sha256": "a" * 64}
    assert Expected().digests == {}
    with pytest.raises(ValueError, match="md5 must be 32 hex digits"):
        Expected(md5="01ec64")  # the six digits of a file name are not a digest
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits"):
        Expected(sha256="g" * 64)
    with pytest.raises(ValueError, match="size must be >= 0"):
        Expected(size=-1)


def test_verify_file_checks_size_then_digests(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    good = _expected_of(b"abc")
    verify_file(path, good)
    with pytest.raises(VerificationError, match="size mismatch .*expected 4 bytes, got 3 bytes"):
        verify_file(path, Expected(size=4, md5=good.md5))
    wrong = hashlib.md5(b"abd").hexdigest()
    with pytest.raises(VerificationError) as info:
        verify_file(path, Expected(size=3, md5=wrong))
    assert (info.value.check, info.value.expected, info.value.actual) == ("md5", wrong, good.md5)
    assert f"expected {wrong}, got {good.md5}" in str(info.value)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "sam_vit_b_01ec64.pth",
        ),
        ("https://zenodo.org/record/1/files/vit_b_lm.pth?download=1", "vit_b_lm.pth"),
        ("http://host/a%20b.pth#frag", "a b.pth"),
    ],
)
def test_file_name_from_url(url: str, name: str) -> None:
    assert file_name_from_url(url) == name


@pytest.mark.parametrize("url", ["http://host/", "http://host", "http://host/dir/.."])
def test_file_name_from_url_rejects_nameless(url: str) -> None:
    with pytest.raises(ValueError, match="does not end in a file name"):
        file_name_from_url(url)


# --- the official download path ---------------------------------------------------------------


def test_download_checkpoint_verifies_the_table_entry(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path, capsys
) -> None:
    dest_dir = tmp_path / "weights"
    out = download_checkpoint(
        "vit_b", dest_dir, base_url=server.url, options=DownloadOptions(timeout=10)
    )
    assert out == dest_dir / "sam_vit_b_01ec64.pth"
    assert out.read_bytes() == official_vit_b_is_tiny.data
    assert _dir_listing(dest_dir) == ["sam_vit_b_01ec64.pth"]
    assert server.requests == ["/sam_vit_b_01ec64.pth"]
    assert "100%" in capsys.readouterr().err  # tqdm bar on stderr, total from Content-Length
    state = torch.load(out, weights_only=True)
    assert state["mask_decoder.iou_token.weight"].shape == (1, 8)


def test_mirror_keeps_the_official_name_and_digests(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path
) -> None:
    mirror = server.root / "mirror" / "sam"
    mirror.mkdir(parents=True)
    (mirror / "sam_vit_b_01ec64.pth").write_bytes(official_vit_b_is_tiny.data)
    base = server.url + "mirror/sam"  # no trailing slash must work too
    out = download_checkpoint("vit_b", tmp_path, base_url=base, options=QUIET)
    assert out.read_bytes() == official_vit_b_is_tiny.data
    assert server.requests == ["/mirror/sam/sam_vit_b_01ec64.pth"]

    # A mirror serving something else under the official name is refused.
    (mirror / "sam_vit_b_01ec64.pth").write_bytes(b"x" * len(official_vit_b_is_tiny.data))
    with pytest.raises(VerificationError, match="md5 mismatch"):
        download_checkpoint("vit_b", tmp_path / "other", base_url=base, options=QUIET)
    assert _dir_listing(tmp_path / "other") == []


@pytest.mark.parametrize("digest", ["md5", "sha256"])
def test_wrong_digest_leaves_nothing(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path, digest: str, monkeypatch
) -> None:
    # Same length as the expected file, different bytes: only the digests can tell.
    forged = bytes(len(official_vit_b_is_tiny.data))
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(forged)
    only = {"md5": None, "sha256": None, digest: getattr(official_vit_b_is_tiny.expected, digest)}
    entry = Checkpoint("vit_b", "sam_vit_b_01ec64.pth", Expected(size=len(forged), **only))
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "vit_b", entry)
    dest_dir = tmp_path / "weights"
    with pytest.raises(VerificationError) as info:
        download_checkpoint("vit_b", dest_dir, base_url=server.url, options=QUIET)
    actual = hashlib.new(digest, forged).hexdigest()
    assert info.value.check == digest
    assert f"expected {only[digest]}, got {actual}" in str(info.value)
    assert _dir_listing(dest_dir) == []  # neither the file nor a temp file


def test_official_entry_refuses_a_wrong_content_length_before_the_body(
    server: Server, tmp_path: Path
) -> None:
    """The real vit_b entry against a small file under its name: refused on the header."""
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(b"definitely not the vit_b checkpoint")
    dest_dir = tmp_path / "weights"
    with pytest.raises(VerificationError) as info:
        download_checkpoint("vit_b", dest_dir, base_url=server.url, options=QUIET)
    assert info.value.check == "size (Content-Length)"
    assert "expected 375042383 bytes, got 35 bytes" in str(info.value)
    assert _dir_listing(dest_dir) == []


def test_wrong_content_length_fails_without_reading_the_body(
    server: Server, tmp_path: Path
) -> None:
    announced = 1 << 30
    dest = tmp_path / "weights" / "big.pth"
    with pytest.raises(VerificationError, match="Content-Length"):
        download_file(server.url + f"announce/{announced}/big.pth", dest, Expected(size=100), QUIET)
    assert _dir_listing(dest.parent) == []  # no temp file was even created
    assert server.sent_done.wait(10)
    # What the server got out before the client hung up fits in socket buffers.
    assert server.sent[0] < announced // 16


@pytest.mark.parametrize(
    ("served", "actual"), [(b"short", "5 bytes"), (b"much too long", "more than 8 bytes")]
)
def test_body_of_the_wrong_size_fails(
    server: Server, tmp_path: Path, served: bytes, actual: str
) -> None:
    """No Content-Length: the size is checked on the bytes themselves."""
    (server.root / "f.pth").write_bytes(served)
    dest = tmp_path / "weights" / "f.pth"
    with pytest.raises(VerificationError, match=f"expected 8 bytes, got {actual}"):
        download_file(server.url + "nolength/f.pth", dest, Expected(size=8), QUIET)
    assert _dir_listing(dest.parent) == []


def test_body_without_content_length_of_the_right_size(
    server: Server, tiny_checkpoint: Served, tmp_path: Path
) -> None:
    dest = tmp_path / "sam_tiny.pth"
    download_file(server.url + "nolength/sam_tiny.pth", dest, tiny_checkpoint.expected, QUIET)
    assert dest.read_bytes() == tiny_checkpoint.data


def test_http_404(server: Server, tmp_path: Path) -> None:
    dest_dir = tmp_path / "weights"
    with pytest.raises(DownloadError) as info:
        download_checkpoint("vit_h", dest_dir, base_url=server.url, options=QUIET)
    assert info.value.status == 404
    assert "404" in str(info.value)
    assert server.url + "sam_vit_h_4b8939.pth" in str(info.value)
    assert _dir_listing(dest_dir) == []


def test_truncated_download_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "weights" / "x.pth"
    with pytest.raises(DownloadError, match="truncated/x.pth"):
        download_file(server.url + "truncated/x.pth", dest, Expected(size=1000), QUIET)
    assert _dir_listing(dest.parent) == []


def test_connection_refused(tmp_path: Path) -> None:
    dest = tmp_path / "x.pth"
    # Port 9 on loopback: nothing listens there.
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        download_file("http://127.0.0.1:9/x.pth", dest, Expected(size=3), QUIET)
    assert _dir_listing(tmp_path) == []


# --- a file already at the destination --------------------------------------------------------


def test_existing_valid_file_not_redownloaded(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path
) -> None:
    dest = tmp_path / "sam_vit_b_01ec64.pth"
    dest.write_bytes(official_vit_b_is_tiny.data)
    mtime = dest.stat().st_mtime_ns
    out = download_checkpoint("vit_b", tmp_path, base_url=server.url, options=QUIET)
    assert out == dest
    assert server.requests == []
    assert dest.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("same_size", [False, True])
def test_existing_wrong_file_is_replaced(
    server: Server, tiny_checkpoint: Served, tmp_path: Path, same_size: bool
) -> None:
    dest = tmp_path / "weights" / "sam_tiny.pth"
    dest.parent.mkdir()
    dest.write_bytes(bytes(len(tiny_checkpoint.data)) if same_size else b"corrupt")
    download_file(server.url + "sam_tiny.pth", dest, tiny_checkpoint.expected, QUIET)
    assert dest.read_bytes() == tiny_checkpoint.data
    assert server.requests == ["/sam_tiny.pth"]
    assert _dir_listing(dest.parent) == ["sam_tiny.pth"]


def test_failed_download_keeps_the_existing_file(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path
) -> None:
    (server.root / "sam_vit_b_01ec64.pth").write_bytes(b"wrong new content")
    dest = tmp_path / "weights" / "sam_vit_b_01ec64.pth"
    dest.parent.mkdir()
    dest.write_bytes(b"old content")
    with pytest.raises(VerificationError):
        download_checkpoint("vit_b", dest.parent, base_url=server.url, options=QUIET)
    assert dest.read_bytes() == b"old content"
    assert _dir_listing(dest.parent) == ["sam_vit_b_01ec64.pth"]


def test_unverified_download_always_fetches(server: Server, tmp_path: Path) -> None:
    """With nothing to check a file against, one already there proves nothing."""
    (server.root / "plain.bin").write_bytes(b"abc")
    dest = tmp_path / "plain.bin"
    dest.write_bytes(b"old")
    assert download_file(server.url + "plain.bin", dest, Expected(), QUIET) == dest
    assert dest.read_bytes() == b"abc"
    assert server.requests == ["/plain.bin"]


def test_unknown_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vit_b, vit_h, vit_l"):
        download_checkpoint("vit_x", tmp_path, base_url="http://127.0.0.1:9/")
    assert _dir_listing(tmp_path) == []


# --- CLI --------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SAMSERVE_WEIGHTS_URL"}
    return subprocess.run(
        [sys.executable, str(CLI), "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("digests", [("md5",), ("sha256",), ("md5", "sha256")])
def test_cli_custom_url_with_digests(
    server: Server, tiny_checkpoint: Served, tmp_path: Path, digests: tuple[str, ...]
) -> None:
    flags = [a for d in digests for a in (f"--{d}", getattr(tiny_checkpoint.expected, d))]
    url = server.url + "sam_tiny.pth?download=1"
    proc = _run_cli("--url", url, *flags, "--dest", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str((tmp_path / "w" / "sam_tiny.pth").resolve())
    assert (tmp_path / "w" / "sam_tiny.pth").read_bytes() == tiny_checkpoint.data


def test_cli_custom_url_wrong_digest(
    server: Server, tiny_checkpoint: Served, tmp_path: Path
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = server.url + "sam_tiny.pth"
    dest_dir = tmp_path / "weights"
    proc = _run_cli("--url", url, "--sha256", wrong, "--dest", str(dest_dir))
    assert proc.returncode == 1
    assert f"sha256 mismatch for {url}" in proc.stderr
    assert f"expected {wrong}, got {tiny_checkpoint.expected.sha256}" in proc.stderr
    assert proc.stdout == ""
    assert _dir_listing(dest_dir) == []


def test_cli_custom_url_no_verify(server: Server, tiny_checkpoint: Served, tmp_path: Path) -> None:
    proc = _run_cli("--url", server.url + "sam_tiny.pth", "--no-verify", "--dest", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sam_tiny.pth").read_bytes() == tiny_checkpoint.data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://127.0.0.1:9/x.pth"], "--url needs --md5 and/or --sha256"),
        (["vit_b", "--md5", "0" * 32], "go with --url"),
        (["vit_b", "--no-verify"], "go with --url"),
        ([], "either an official model type or --url"),
        (["vit_b", "--url", "http://127.0.0.1:9/x.pth"], "either an official model type"),
        (["--url", "http://127.0.0.1:9/x.pth", "--md5", "01ec64"], "md5 must be 32 hex digits"),
        (["--url", "http://h/x.pth", "--md5", "0" * 32, "--no-verify"], "contradicts"),
        (["--url", "http://h/x.pth", "--md5", "0" * 32, "--base-url", "http://h/"], "--base-url"),
        (["vit_x"], "invalid choice"),
    ],
)
def test_cli_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run_cli(*args, "--dest", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert _dir_listing(tmp_path) == []


def test_cli_http_error(server: Server, tmp_path: Path) -> None:
    proc = _run_cli("vit_l", "--dest", str(tmp_path), "--base-url", server.url)
    assert proc.returncode == 1
    assert "404" in proc.stderr and "sam_vit_l_0b3195.pth" in proc.stderr


def test_cli_official_checkpoint_from_the_env_mirror(
    server: Server, official_vit_b_is_tiny: Served, tmp_path: Path, monkeypatch, capsys
) -> None:
    """In-process, so the CLI sees the table pointed at the tiny file."""
    monkeypatch.setenv("SAMSERVE_WEIGHTS_URL", server.url)
    assert download_weights.main(["vit_b", "--dest", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str((tmp_path / "sam_vit_b_01ec64.pth").resolve())
    assert Path(out).read_bytes() == official_vit_b_is_tiny.data
    assert server.requests == ["/sam_vit_b_01ec64.pth"]
