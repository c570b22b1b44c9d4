"""Download and verify Segment Anything checkpoints.

The official checkpoints are known by their published size and MD5 (the six hex digits in
each official file name are the start of its MD5) and their SHA-256. A download is checked
against what is known before its body is read (the announced ``Content-Length``), while it
streams (no more bytes than the known size) and at its end (size, then every known digest,
hashed on the fly). The body goes to a temporary file next to the destination that is moved
into place (``os.replace``) only once everything matches, so a failed, interrupted or wrong
download never leaves a partial or wrong file behind.

This module is plain Python on purpose: it does not import TorchServe (``ts``), so it can be
used from scripts, tests and build steps.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import requests
from tqdm import tqdm

__all__ = [
    "DEFAULT_BASE_URL",
    "OFFICIAL_CHECKPOINTS",
    "Checkpoint",
    "DownloadError",
    "DownloadOptions",
    "Expected",
    "VerificationError",
    "checkpoint_url",
    "download_checkpoint",
    "download_file",
    "file_digests",
    "file_name_from_url",
    "official_checkpoint",
    "verify_file",
]

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
CHUNK_SIZE = 1 << 20
_DIGEST_LENGTHS = {"md5": 32, "sha256": 64}
_HEX_RE = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Expected:
    """What a file must be. A field left ``None`` is not checked.

    Arguments:
      size (int or None): The file's length in bytes.
      md5 (str or None): Its MD5, 32 hex digits (either case; kept in lower case).
      sha256 (str or None): Its SHA-256, 64 hex digits (either case; kept in lower case).
    """

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        for name, length in _DIGEST_LENGTHS.items():
            value = getattr(self, name)
            if value is None:
                continue
            digest = value.strip().lower()
            if len(digest) != length or not _HEX_RE.fullmatch(digest):
                raise ValueError(f"{name} must be {length} hex digits, got {value!r}")
            object.__setattr__(self, name, digest)

    @property
    def digests(self) -> dict[str, str]:
        """The known digests by algorithm name (``md5``, ``sha256``), possibly empty."""
        return {
            name: getattr(self, name) for name in _DIGEST_LENGTHS if getattr(self, name) is not None
        }


@dataclass(frozen=True)
class Checkpoint:
    """An official SAM checkpoint.

    Arguments:
      name (str): The model type it is built for (``vit_b``, ``vit_l``, ``vit_h``).
      file_name (str): Its file name on the download host, kept on disk.
      expected (Expected): Its published size and digests.
    """

    name: str
    file_name: str
    expected: Expected


# File names from the segment-anything README ("Model Checkpoints"); sizes and digests of the
# files Meta's host serves under them. tests/test_weights.py names the source of each value.
OFFICIAL_CHECKPOINTS: dict[str, Checkpoint] = {
    checkpoint.name: checkpoint
    for checkpoint in (
        Checkpoint(
            "vit_h",
            "sam_vit_h_4b8939.pth",
            Expected(
                size=2564550879,
                md5="4b8939a88964f0f4ff5f5b2642c598a6",
                sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            ),
        ),
        Checkpoint(
            "vit_l",
            "sam_vit_l_0b3195.pth",
            Expected(
                size=1249524607,
                md5="0b3195507c641ddb6910d2bb5adee89c",
                sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            ),
        ),
        Checkpoint(
            "vit_b",
            "sam_vit_b_01ec64.pth",
            Expected(
                size=375042383,
                md5="01ec64d29a2fca3f0661936605ae66f8",
                sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            ),
        ),
    )
}


@dataclass(frozen=True)
class DownloadOptions:
    """How to download.

    Arguments:
      progress (bool): Show a progress bar on stderr.
      timeout (float): Seconds to wait for the connection and for each read.
    """

    progress: bool = True
    timeout: float = 60


class DownloadError(RuntimeError):
    """The HTTP request failed (bad status, connection error, timeout or truncated body)."""

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        status_text = f"HTTP {status}" if status is not None else "request failed"
        super().__init__(f"download of {url} failed: {status_text}: {reason}")
        self.url = url
        self.status = status


class VerificationError(ValueError):
    """A file (downloaded or already present) is not what it must be."""

    def __init__(self, source: str, check: str, expected: object, actual: object) -> None:
        super().__init__(f"{check} mismatch for {source}: expected {expected}, got {actual}")
        self.source = source
        self.check = check
        self.expected = expected
        self.actual = actual


class _Hash(Protocol):
    """What this module uses of a ``hashlib`` object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def _new_hash(name: str) -> _Hash:
    """A fresh hash object for ``md5`` or ``sha256``."""
    # MD5 checks integrity against a published value, not security: allowed on FIPS builds.
    return hashlib.new(name, usedforsecurity=False)


def official_checkpoint(model_type: str) -> Checkpoint:
    """The official checkpoint built for ``model_type``.

    Arguments:
      model_type (str): ``vit_b``, ``vit_l`` or ``vit_h``.

    Returns:
      (Checkpoint): Its file name, size and digests. Raises ``ValueError`` for other types.
    """
    try:
        return OFFICIAL_CHECKPOINTS[model_type]
    except KeyError:
        valid = ", ".join(sorted(OFFICIAL_CHECKPOINTS))
        raise ValueError(f"unknown model type {model_type!r}; valid types: {valid}") from None


def checkpoint_url(model_type: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """The download URL of an official checkpoint.

    Arguments:
      model_type (str): ``vit_b``, ``vit_l`` or ``vit_h``.
      base_url (str): Meta's host or a mirror of it, with or without a trailing slash.

    Returns:
      (str): ``base_url`` joined with the official file name.
    """
    return base_url.rstrip("/") + "/" + official_checkpoint(model_type).file_name


def file_name_from_url(url: str) -> str:
    """The file name a URL's path ends in.

    Arguments:
      url (str): e.g. ``https://host/files/sam_ft.pth?download=1``.

    Returns:
      (str): The last path segment, percent-decoded, e.g. ``sam_ft.pth``. Raises
      ``ValueError`` when the path ends in no name.
    """
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if name in ("", ".", ".."):
        raise ValueError(f"the URL {url!r} does not end in a file name")
    return name


def file_digests(path: Path, names: Iterable[str]) -> dict[str, str]:
    """Hash the file at ``path`` once with every algorithm in ``names``.

    Arguments:
      path (Path): The file to read.
      names (iterable of str): Algorithm names, ``md5`` and/or ``sha256``.

    Returns:
      (dict of str to str): The hex digest by algorithm name.
    """
    hashes = {name: _new_hash(name) for name in names}
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            for digest in hashes.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def verify_file(path: Path, expected: Expected) -> None:
    """Check the file at ``path`` against ``expected``: its size first (free), then its
    digests in one read.

    Arguments:
      path (Path): A regular file.
      expected (Expected): What it must be.

    Returns:
      None. Raises ``VerificationError`` naming the first check that fails, with the
      expected and the actual value.
    """
    path = Path(path)
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise VerificationError(str(path), "size", f"{expected.size} bytes", f"{size} bytes")
    _check_digests(str(path), expected, file_digests(path, expected.digests))


def _check_digests(source: str, expected: Expected, actual: dict[str, str]) -> None:
    """Raise ``VerificationError`` for the first known digest that ``actual`` does not match."""
    for name, digest in expected.digests.items():
        if actual[name] != digest:
            raise VerificationError(source, name, digest, actual[name])


def _already_valid(dest: Path, expected: Expected) -> bool:
    """Whether ``dest`` is a file that passes every check of ``expected``; a file that can
    be checked by nothing does not count, since it may be anything."""
    if not dest.is_file() or (expected.size is None and not expected.digests):
        return False
    try:
        verify_file(dest, expected)
    except VerificationError:
        return False
    return True


def _announced_size(url: str, resp: requests.Response, expected: Expected) -> int | None:
    """The body length the server announces (``Content-Length``), checked against the
    expected size before a byte of the body is read."""
    length = resp.headers.get("Content-Length")
    announced = int(length) if length and length.isdigit() else None
    if announced is not None and expected.size is not None and announced != expected.size:
        raise VerificationError(
            url, "size (Content-Length)", f"{expected.size} bytes", f"{announced} bytes"
        )
    return announced


def _stream_body(
    url: str,
    resp: requests.Response,
    fh: BinaryIO,
    expected: Expected,
    announced: int | None,
    options: DownloadOptions,
) -> None:
    """Write the body of ``resp`` into ``fh``, hashing it on the way, and check it.

    Arguments:
      url (str): The URL, for messages.
      resp (requests.Response): A streamed 200 response whose body has not been read.
      fh (BinaryIO): The open temporary file.
      expected (Expected): What the body must be.
      announced (int or None): The server's ``Content-Length``.
      options (DownloadOptions): Progress bar on or off.

    Returns:
      None. Raises ``DownloadError`` for a body shorter than announced and
      ``VerificationError`` for a wrong size or digest.
    """
    hashes = {name: _new_hash(name) for name in expected.digests}
    received = 0
    with tqdm(
        total=announced if announced is not None else expected.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or url,
        file=sys.stderr,
        disable=not options.progress,
    ) as bar:
        for chunk in resp.iter_content(chunk_size=CHUNK_SIZE):
            received += len(chunk)
            # A server that sends no length must not make us store more than the file.
            if expected.size is not None and received > expected.size:
                raise VerificationError(
                    url, "size", f"{expected.size} bytes", f"more than {expected.size} bytes"
                )
            fh.write(chunk)
            for digest in hashes.values():
                digest.update(chunk)
            bar.update(len(chunk))
    if announced is not None and received != announced:
        raise DownloadError(url, f"truncated body: got {received} of {announced} bytes", 200)
    if expected.size is not None and received != expected.size:
        raise VerificationError(url, "size", f"{expected.size} bytes", f"{received} bytes")
    _check_digests(url, expected, {name: h.hexdigest() for name, h in hashes.items()})


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


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    expected: Expected,
    options: DownloadOptions | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verified against ``expected``.

    A file already at ``dest`` that passes every check of ``expected`` is kept and nothing
    is downloaded. Otherwise the body streams into a temporary file in ``dest``'s directory
    and replaces ``dest`` only once its size and digests match. On any failure (HTTP error,
    timeout, wrong ``Content-Length``, truncated or wrong body, ``KeyboardInterrupt``) the
    temporary file is removed and ``dest`` is left as it was. ``expected`` may check nothing
    (``Expected()``): the caller decides whether an unverified download is acceptable.

    Arguments:
      url (str): Where the file is.
      dest (path): The file to write.
      expected (Expected): Its size and digests, each optional.
      options (DownloadOptions or None): Progress bar and timeout; defaults if None.

    Returns:
      (Path): ``dest``. Raises ``DownloadError`` for HTTP and network problems and
      ``VerificationError`` for a size or digest that does not match.
    """
    options = options or DownloadOptions()
    dest = Path(dest)
    if _already_valid(dest, expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # identity encoding: the bytes hashed must be the bytes of the file, not a gzip stream.
        with requests.get(
            url, stream=True, timeout=options.timeout, headers={"Accept-Encoding": "identity"}
        ) as resp:
            if resp.status_code != 200:
                raise DownloadError(url, resp.reason or "unexpected status", resp.status_code)
            announced = _announced_size(url, resp, expected)
            _write_atomically(url, resp, dest, expected, announced, options)
    except requests.RequestException as exc:
        raise DownloadError(url, str(exc)) from exc
    _fsync_dir(dest.parent)
    return dest


def _write_atomically(
    url: str,
    resp: requests.Response,
    dest: Path,
    expected: Expected,
    announced: int | None,
    options: DownloadOptions,
) -> None:
    """Stream the body into a temporary file beside ``dest`` and move it over ``dest`` once
    verified; remove the temporary file on any failure."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            _stream_body(url, resp, fh, expected, announced, options)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_checkpoint(
    model_type: str,
    dest_dir: str | os.PathLike[str],
    base_url: str = DEFAULT_BASE_URL,
    options: DownloadOptions | None = None,
) -> Path:
    """Download the official SAM checkpoint for ``model_type`` into ``dest_dir``.

    A mirror (``base_url``) serves the same files: the official file name is kept and the
    download is verified against the official size and digests.

    Arguments:
      model_type (str): ``vit_b``, ``vit_l`` or ``vit_h``.
      dest_dir (path): The directory to write it to.
      base_url (str): Where the official file names live.
      options (DownloadOptions or None): Progress bar and timeout; defaults if None.

    Returns:
      (Path): The checkpoint, e.g. ``dest_dir/sam_vit_b_01ec64.pth``; a valid one already
      there is returned without downloading. Raises ``ValueError`` for an unknown
      ``model_type``, and as ``download_file``.
    """
    checkpoint = official_checkpoint(model_type)
    url = checkpoint_url(model_type, base_url)
    return download_file(url, Path(dest_dir) / checkpoint.file_name, checkpoint.expected, options)
