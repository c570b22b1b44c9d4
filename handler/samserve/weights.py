"""Download and verify the official Segment Anything checkpoints.

Downloads are streamed with ``requests``, hashed (SHA-256) while they stream, written to a
temporary file next to the destination and only moved into place (``os.replace``) once the
hash matches the prefix embedded in the file name (the ``torch.hub`` convention, e.g.
``sam_vit_b_01ec64.pth``). A failed, interrupted or corrupted download therefore never leaves a
partial or wrong file at the destination.

This module is plain Python on purpose: it does not import TorchServe (``ts``), so it can be
used from scripts, tests and build steps.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import requests
from tqdm import tqdm

__all__ = [
    "DEFAULT_BASE_URL",
    "OFFICIAL_CHECKPOINTS",
    "ChecksumError",
    "DownloadError",
    "checkpoint_url",
    "download_checkpoint",
    "download_file",
    "expected_hash_prefix",
    "sha256_file",
]

OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

#: Shortest token accepted as an embedded hash prefix (guards against e.g. ``sam_vit_b.pth``,
#: whose last token ``b`` happens to be valid hex).
MIN_HASH_PREFIX_LEN = 6
CHUNK_SIZE = 1 << 20
_HEX_RE = re.compile(r"[0-9a-fA-F]+")


class ChecksumError(ValueError):
    """The downloaded (or existing) file's SHA-256 does not start with the expected prefix."""

    def __init__(self, source: str, expected_prefix: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {source}: expected sha256 starting with "
            f"{expected_prefix!r}, got {actual!r}"
        )
        self.source = source
        self.expected_prefix = expected_prefix
        self.actual = actual


class DownloadError(RuntimeError):
    """The HTTP request failed (bad status, connection error, timeout or truncated body)."""

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        status_text = f"HTTP {status}" if status is not None else "request failed"
        super().__init__(f"download of {url} failed: {status_text}: {reason}")
        self.url = url
        self.status = status


def expected_hash_prefix(filename: str) -> str:
    """Return the lowercase hex hash prefix embedded in ``filename``.

    Follows the ``torch.hub`` convention: the prefix is the last ``_``- or ``-``-separated token
    of the file stem, e.g. ``"sam_vit_b_01ec64.pth" -> "01ec64"``. Raises ``ValueError`` when
    the name has no such token of at least ``MIN_HASH_PREFIX_LEN`` hex digits.
    """
    stem = Path(filename).stem
    token = re.split(r"[_-]", stem)[-1]
    if token == stem or len(token) < MIN_HASH_PREFIX_LEN or not _HEX_RE.fullmatch(token):
        raise ValueError(
            f"no hash prefix in file name {filename!r}: expected the last '_' or '-' separated "
            f"part of the stem to be at least {MIN_HASH_PREFIX_LEN} hex digits"
        )
    return token.lower()


def sha256_file(path: Path, chunk_size: int = CHUNK_SIZE) -> str:
    """Return the hex SHA-256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_url(model_type: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """Return the download URL of the official checkpoint for ``model_type``."""
    return base_url.rstrip("/") + "/" + _checkpoint_filename(model_type)


def _checkpoint_filename(model_type: str) -> str:
    """Map a model type (``vit_h``/``vit_l``/``vit_b``) to its official checkpoint file name."""
    try:
        return OFFICIAL_CHECKPOINTS[model_type]
    except KeyError:
        valid = ", ".join(sorted(OFFICIAL_CHECKPOINTS))
        raise ValueError(f"unknown model type {model_type!r}; valid types: {valid}") from None


def _matches(path: Path, sha256_prefix: str) -> bool:
    """Whether ``path`` is a regular file whose SHA-256 starts with ``sha256_prefix``."""
    return path.is_file() and sha256_file(path).startswith(sha256_prefix.lower())


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so a completed rename survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stream_to(url: str, fh: BinaryIO, timeout: float, progress: bool, desc: str) -> str:
    """Stream ``url`` into the open binary file ``fh``; return the SHA-256 hex digest."""
    digest = hashlib.sha256()
    received = 0
    try:
        # identity encoding: the bytes hashed must be the bytes of the file, not a gzip stream.
        with requests.get(
            url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}
        ) as resp:
            if resp.status_code != 200:
                raise DownloadError(url, resp.reason or "unexpected status", resp.status_code)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                file=sys.stderr,
                disable=not progress,
            ) as bar:
                for chunk in resp.iter_content(chunk_size=CHUNK_SIZE):
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        raise DownloadError(url, str(exc)) from exc
    if total is not None and received != total:
        raise DownloadError(url, f"truncated body: got {received} of {total} bytes", 200)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    sha256_prefix: str | None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying the SHA-256 prefix if given.

    If ``dest`` already exists and its hash starts with ``sha256_prefix`` nothing is downloaded.
    Otherwise the body is streamed into a temporary file in ``dest``'s directory, hashed on the
    fly, and moved over ``dest`` only if the hash matches. On any failure (HTTP error, timeout,
    truncated body, checksum mismatch, ``KeyboardInterrupt``) the temporary file is removed and
    ``dest`` is left as it was.

    Raises ``DownloadError`` for HTTP/network problems and ``ChecksumError`` for a hash mismatch.
    """
    dest = Path(dest)
    if sha256_prefix is not None and _matches(dest, sha256_prefix):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            actual = _stream_to(url, fh, timeout, progress, dest.name)
            if sha256_prefix is not None and not actual.startswith(sha256_prefix.lower()):
                raise ChecksumError(url, sha256_prefix.lower(), actual)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return dest


def download_checkpoint(
    model_type: str,
    dest_dir: str | os.PathLike[str],
    base_url: str = DEFAULT_BASE_URL,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download the official SAM checkpoint for ``model_type`` into ``dest_dir``.

    The file keeps its official name (e.g. ``sam_vit_b_01ec64.pth``) and is verified against
    the hash prefix embedded in it. Returns the path of the checkpoint; an already present,
    valid checkpoint is returned without downloading. Raises ``ValueError`` for an unknown
    ``model_type``.
    """
    filename = _checkpoint_filename(model_type)
    url = checkpoint_url(model_type, base_url)
    dest = Path(dest_dir) / filename
    return download_file(url, dest, expected_hash_prefix(filename), progress, timeout)
