"""The shared store: a second cache tier every worker (and, with Redis, every host) reads.

A worker looks for an image's embedding in its own LRU (``samserve.cache``), then here,
and only then runs the encoder; after an encoder run it writes the entry here. Low-res
logits kept for ``mask_input`` go here too, by ``logits_id``.

Three layers, each one idea:

- ``ByteStore``: a key-value store of bytes, ``get`` / ``put`` / ``close``, raising on
  failure: ``DiskStore`` (diskcache on a tmpfs, shared by the processes of one host) or
  ``RedisStore`` (a Redis-protocol server, shared by hosts).
- ``SharedStore``: what the engine calls. It namespaces keys by kind and model, encodes
  and checks entries (``samserve.store_codec``), and never raises for a store failure: a
  store that is down, slow or erroring gives misses and dropped writes, one warning per
  outage, and is not called again until a back-off has passed.
- ``StoreOptions``: the configuration, parsed from one URL (``StoreOptions.from_url``):

      none                                      no shared store
      disk://                                   diskcache in default_disk_path()
      disk:///absolute/path                     diskcache in that directory
      redis://[user:password@]host[:port][/db]  a Redis server (port 6379, db 0)
      rediss://[user:password@]host[:port][/db] the same over TLS

  with optional query parameters: ``max_mb`` (disk: the bound on the store's bytes),
  ``ttl_s`` (redis: every key's time to live), ``timeout_ms`` (how long one call may
  wait), ``backoff_s`` (how long to leave a failed store alone), and for ``rediss://``
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``
  (``none``, ``optional`` or ``required``). User names and passwords in the URL are
  percent-decoded; an ACL user is ``redis://user:password@host``, ``requirepass`` alone
  is ``redis://:password@host``.

The handler's ``store_url`` setting chooses the store, and ``SAMSERVE_STORE_URL``
overrides it (``resolve_store_url``). Redis evicts by itself only when configured to:
run the server with ``maxmemory <bytes>`` and ``maxmemory-policy allkeys-lru``; every key
is also written with a time to live (``SET key value PX ttl``) so entries of images no
longer used leave even a server without a memory bound.

Usage::

    options = StoreOptions.from_url(resolve_store_url(settings.store_url, os.environ))
    store = open_store(options, model_identity(spec_name, checkpoint_sha256))
    if store is not None:
        entry = store.get_embedding(image_id, spec)  # Entry or None
        ...
        store.put_embedding(image_id, Entry({"embedding": array}, {"input_size": (h, w)}))
"""

from __future__ import annotations

import hashlib
import io
import logging
import numbers
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from .store_codec import (
    EMBEDDING,
    FORMAT_VERSION,
    LOGITS,
    Entry,
    EntrySpec,
    InvalidEntry,
    decode_entry,
    encode_entry,
)

logger = logging.getLogger(__name__)

# The environment variable that overrides the handler's store_url setting.
STORE_URL_ENV = "SAMSERVE_STORE_URL"
# One host's workers share embeddings unless told otherwise.
DEFAULT_STORE_URL = "disk://"
DEFAULT_DISK_MB = 1024.0
DEFAULT_TTL_S = 3600.0
DEFAULT_BACKOFF_S = 1.0
# Python's sendall counts its timeout over the whole value, so one timeout must cover
# sending an embedding across the network; a dead store still costs at most one timeout
# per back-off.
DEFAULT_TIMEOUT_MS = 50.0
# A tmpfs keeps the disk store in memory; elsewhere the system's temporary directory.
DEFAULT_DISK_ROOT = "/dev/shm"
# Values from this size up are files beside diskcache's sqlite index rather than rows in
# it: entries (logits and embeddings alike) are larger, so a read is one file read and
# the index, and sqlite's page cache in every process, stay small.
DISK_MIN_FILE_SIZE = 32 * 1024
# redis-py's read buffer: large enough that an entry arrives in a few reads, where its
# default takes hundreds.
REDIS_READ_SIZE = 1024 * 1024
# The default bound takes at most this share of the filesystem, since a container's
# /dev/shm can be smaller than DEFAULT_DISK_MB.
DISK_SHARE = 0.5

BACKENDS = ("none", "disk", "redis")
CERT_REQS = ("none", "optional", "required")
_COMMON_QUERY = ("backoff_s", "timeout_ms")
_DISK_QUERY = ("max_mb", *_COMMON_QUERY)
_TLS_QUERY = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
_REDIS_QUERY = ("ttl_s", *_COMMON_QUERY)
# Longest part of a URL or value quoted in an error message.
_QUOTE_CHARS = 40


def resolve_store_url(setting: str | None, environ: Mapping[str, str]) -> str:
    """The store URL in effect.

    Arguments:
      setting (str or None): The handler's ``store_url`` setting; None if not set.
      environ (mapping): The process environment, usually ``os.environ``.

    Returns:
      (str): ``SAMSERVE_STORE_URL`` if set and not blank, else ``setting`` if not None,
        else ``DEFAULT_STORE_URL``.
    """
    override = environ.get(STORE_URL_ENV, "").strip()
    if override:
        return override
    return DEFAULT_STORE_URL if setting is None else setting


def model_identity(*parts: str) -> str:
    """A short identity for the model whose entries a store holds.

    Arguments:
      parts (str): Whatever changes the model's outputs, e.g. its spec name and its
        checkpoint's SHA-256.

    Returns:
      (str): 32 hex digits; equal parts give equal identities.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode() + b"\x00")
    return digest.hexdigest()


def default_disk_path() -> str:
    """The disk store's directory when the URL names none: ``samserve-store-<uid>`` in
    DEFAULT_DISK_ROOT, a tmpfs, where the host has one (else in the system's temporary
    directory), so entries live in memory and go at reboot."""
    root = DEFAULT_DISK_ROOT if os.path.isdir(DEFAULT_DISK_ROOT) else tempfile.gettempdir()
    return os.path.join(root, f"samserve-store-{os.getuid()}")


@dataclass(frozen=True)
class StoreOptions:
    """Which shared store to use and how; ``from_url`` makes one from a store URL.

    ``backend`` is ``none``, ``disk`` or ``redis``. Disk: ``path`` (None: the default
    directory) and ``max_mb`` (None: DEFAULT_DISK_MB, at most DISK_SHARE of the
    filesystem). Redis: ``host``, ``port``, ``db``, ``username``, ``password``, ``tls``
    and its ``ssl_*`` files, ``ttl_s``. Both: ``timeout_ms`` (Redis: the connect and read
    timeout, and the send timeout of a whole value; disk: the wait for another process's
    database lock) and ``backoff_s``.
    """

    backend: str = "disk"
    path: str | None = None
    max_mb: float | None = None
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ttl_s: float = DEFAULT_TTL_S
    timeout_ms: float = DEFAULT_TIMEOUT_MS
    backoff_s: float = DEFAULT_BACKOFF_S

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"store backend must be one of {BACKENDS}, got {_quoted(self.backend)}"
            )
        if self.path is not None and not os.path.isabs(self.path):
            raise ValueError(f"disk store path must be absolute, got {_quoted(self.path)}")
        _check_positive("max_mb", self.max_mb, optional=True)
        _check_positive("ttl_s", self.ttl_s)
        _check_positive("timeout_ms", self.timeout_ms)
        if not self.backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"redis port must be in 1-65535, got {self.port}")
        if self.db < 0:
            raise ValueError(f"redis db must be >= 0, got {self.db}")
        if self.ssl_cert_reqs not in CERT_REQS:
            raise ValueError(
                f"ssl_cert_reqs must be one of {CERT_REQS}, got {_quoted(self.ssl_cert_reqs)}"
            )

    @classmethod
    def from_url(cls, url: str) -> StoreOptions:
        """The options a store URL describes (the grammar is in this module's docstring).

        Raises ValueError naming the part of ``url`` that is wrong; passwords are never
        quoted.
        """
        text = url.strip()
        if not text:
            raise ValueError("store URL is empty; write 'none' to turn the shared store off")
        if text.lower() == "none":
            return cls(backend="none")
        scheme, separator, _ = text.partition("://")
        scheme = scheme.lower()
        if not separator or scheme not in ("disk", "redis", "rediss"):
            raise ValueError(
                f"store URL {_quoted(_redacted(text))}: expected none, disk://[/path], "
                "redis://[user:password@]host[:port][/db] or rediss://..."
            )
        try:
            parts = urlsplit(text)
        except ValueError as error:
            raise ValueError(f"store URL {_quoted(_redacted(text))}: {error}") from None
        if parts.fragment:
            raise ValueError(f"store URL {_quoted(_redacted(text))}: has a #fragment")
        if scheme == "disk":
            return cls._from_disk_url(parts.netloc, parts.path, _query(parts.query, _DISK_QUERY))
        known = _REDIS_QUERY + _TLS_QUERY if scheme == "rediss" else _REDIS_QUERY
        return cls._from_redis_url(parts, scheme == "rediss", _query(parts.query, known))

    @classmethod
    def _from_disk_url(cls, netloc: str, path: str, query: dict[str, str]) -> StoreOptions:
        """Options of ``disk://`` (the default directory) or ``disk:///absolute/path``."""
        if netloc:
            raise ValueError(
                f"disk store URL has a host part {_quoted(netloc)}; write disk:///absolute/path"
            )
        return cls(
            backend="disk",
            path=unquote(path) if path not in ("", "/") else None,
            max_mb=_number(query, "max_mb"),
            timeout_ms=_number(query, "timeout_ms", DEFAULT_TIMEOUT_MS),
            backoff_s=_number(query, "backoff_s", DEFAULT_BACKOFF_S),
        )

    @classmethod
    def _from_redis_url(cls, parts: SplitResult, tls: bool, query: dict[str, str]) -> StoreOptions:
        """Options of ``redis://`` or ``rediss://[user:password@]host[:port][/db]``."""
        try:
            port = parts.port
        except ValueError:
            hostport = parts.netloc.rpartition("@")[2]
            raise ValueError(
                f"redis URL: port in {_quoted(hostport)} is not a number in 1-65535"
            ) from None
        db_text = parts.path.strip("/")
        if db_text and not db_text.isdigit():
            raise ValueError(f"redis URL: database {_quoted(db_text)} is not a number")
        return cls(
            backend="redis",
            host=parts.hostname or "localhost",
            port=6379 if port is None else port,
            db=int(db_text or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ssl_ca_certs=query.get("ssl_ca_certs"),
            ssl_certfile=query.get("ssl_certfile"),
            ssl_keyfile=query.get("ssl_keyfile"),
            ssl_cert_reqs=query.get("ssl_cert_reqs", "required"),
            ttl_s=_number(query, "ttl_s", DEFAULT_TTL_S),
            timeout_ms=_number(query, "timeout_ms", DEFAULT_TIMEOUT_MS),
            backoff_s=_number(query, "backoff_s", DEFAULT_BACKOFF_S),
        )

    @property
    def timeout_s(self) -> float:
        """How long one store call may wait, in seconds."""
        return self.timeout_ms / 1000

    def describe(self) -> str:
        """The store as a URL for logs and stats, without its password."""
        if self.backend == "none":
            return "none"
        if self.backend == "disk":
            return f"disk://{self.path or default_disk_path()}"
        user = self.username or ""
        if self.password is not None:
            user += ":***"
        netloc = f"{user}@" if user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{netloc}{host}:{self.port}/{self.db}"


class ByteStore(Protocol):
    """A key-value store of bytes; its methods raise when the store fails."""

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any value there."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


class DiskStore:
    """A diskcache ``Cache`` in one directory: an sqlite index (safe across processes)
    and one file per entry, least recently read entries evicted past ``max_bytes``.

    Arguments:
      directory (str): Where the cache lives; made if missing, and must belong to this
        process's user and be writable by no one else (it may be in a shared tmpfs).
      max_bytes (int): The bound on the store's bytes (entries and index), which every
        write leaves it within: diskcache evicts the least recently read entry, and more
        (ten at a time) when that one was smaller than the entry written.
      timeout_s (float): How long a call may wait for another process's lock.
    """

    def __init__(self, directory: str, max_bytes: int, timeout_s: float) -> None:
        import diskcache  # on first use: a worker with another store needs none of it

        _private_directory(directory)
        self.directory = directory
        self._cache = diskcache.Cache(
            directory,
            timeout=timeout_s,
            size_limit=max_bytes,
            eviction_policy="least-recently-used",
            disk_min_file_size=DISK_MIN_FILE_SIZE,
            # One eviction per write, not diskcache's ten: a small store (a container's
            # /dev/shm) would lose most of its entries at each write past the bound.
            cull_limit=1,
        )

    @classmethod
    def from_options(cls, options: StoreOptions) -> DiskStore:
        """The disk store ``options`` describe (default path and bound filled in)."""
        directory = options.path or default_disk_path()
        _private_directory(directory)
        if options.max_mb is not None:
            max_bytes = int(options.max_mb * 2**20)
        else:
            share = int(shutil.disk_usage(directory).total * DISK_SHARE)
            max_bytes = min(int(DEFAULT_DISK_MB * 2**20), share)
        return cls(directory, max_bytes, options.timeout_s)

    def get(self, key: str) -> bytes | None:
        # A handle, read after diskcache's transaction: the LRU update holds the database
        # lock only while it finds the file, not while the file is read.
        value = self._cache.get(key, read=True)
        if value is None or isinstance(value, bytes):
            return value
        with value:
            return value.read()

    def put(self, key: str, value: bytes) -> None:
        if len(value) < DISK_MIN_FILE_SIZE:
            self._cache.set(key, value)
        else:
            # As a file object: diskcache writes bytes given as such line by line, that is
            # at every newline byte of the arrays.
            self._cache.set(key, io.BytesIO(value), read=True)
        if self._cache.volume() > self._cache.size_limit:
            self._cache.cull()

    def volume(self) -> int:
        """Bytes the store holds now: its entries and its index."""
        return self._cache.volume()

    def close(self) -> None:
        self._cache.close()


class RedisStore:
    """A Redis-protocol server through redis-py: ``GET``, and ``SET key value PX ttl``.

    Arguments:
      options (StoreOptions): A ``redis`` backend's host, port, db, credentials, TLS,
        ``ttl_s`` and ``timeout_s``.

    redis-py connects on the first command, not here, and is told not to retry: the
    caller's back-off decides when to try again.
    """

    def __init__(self, options: StoreOptions) -> None:
        import redis  # on first use: a worker with another store needs none of it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._ttl_ms = max(1, round(options.ttl_s * 1000))
        tls = {}
        if options.tls:
            tls = {
                "ssl": True,
                "ssl_ca_certs": options.ssl_ca_certs,
                "ssl_certfile": options.ssl_certfile,
                "ssl_keyfile": options.ssl_keyfile,
                "ssl_cert_reqs": options.ssl_cert_reqs,
            }
        self._client = redis.Redis(
            host=options.host,
            port=options.port,
            db=options.db,
            username=options.username,
            password=options.password,
            socket_connect_timeout=options.timeout_s,
            socket_timeout=options.timeout_s,
            socket_read_size=REDIS_READ_SIZE,
            retry=Retry(NoBackoff(), 0),
            **tls,
        )

    def get(self, key: str) -> bytes | None:
        return self._client.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._client.set(key, value, px=self._ttl_ms)

    def close(self) -> None:
        self._client.close()


# What a store call that failed, or was not made during a back-off, returns.
_FAILED = object()


class SharedStore:
    """Entries of one model in a ``ByteStore``, by kind; no method raises for a store
    failure.

    Arguments:
      open_backend (callable): Makes the ``ByteStore``; called on first use, and again
        after a back-off if it raised.
      model_id (str): The model's identity (``model_identity``): part of every key, and
        checked in every entry read.
      backoff_s (float): After a failure, calls return at once (a miss, a dropped write)
        until this many seconds have passed.
      name (str): The store as logs and ``stats`` show it (no password).

    Thread-safe. Counters (``stats``): ``hits``, ``misses`` (no entry), ``invalid`` (an
    entry that failed ``decode_entry``'s checks), ``writes``, ``errors`` (calls that
    failed), ``skipped`` (calls not made during a back-off), and the number and total
    seconds of the gets and puts that reached the store.
    """

    def __init__(
        self,
        open_backend: Callable[[], ByteStore],
        model_id: str,
        backoff_s: float = DEFAULT_BACKOFF_S,
        name: str = "shared store",
    ) -> None:
        if not model_id:
            raise ValueError("model_id must not be empty")
        self.model_id = model_id
        self.name = name
        self._open_backend = open_backend
        self._backend: ByteStore | None = None
        self._backoff_s = backoff_s
        self._prefix = f"samserve:v{FORMAT_VERSION}:{model_identity(model_id)[:16]}:"
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        # During an outage: time.monotonic() of its first failure and of the next try.
        self._failed_at: float | None = None
        self._retry_at: float | None = None
        self._counts = dict.fromkeys(
            ("hits", "misses", "invalid", "writes", "errors", "skipped", "gets", "puts"), 0
        )
        self._seconds = {"get_seconds": 0.0, "put_seconds": 0.0}

    def get_embedding(self, image_id: str, spec: EntrySpec) -> Entry | None:
        """The stored embedding entry of ``image_id``, or None (also for any failure).

        Arguments:
          image_id (str): The image's id.
          spec (EntrySpec): What the caller accepts, e.g. ``embedding`` 1xCxhxw float32
            and the ``input_size`` and ``original_size`` pairs.

        Returns:
          (Entry or None): Writable arrays matching ``spec``, and the metadata.
        """
        return self._get(EMBEDDING, image_id, spec)

    def put_embedding(self, image_id: str, entry: Entry) -> bool:
        """Store ``entry`` as the embedding of ``image_id``; False if the write was dropped.

        Raises ValueError only for an entry the format cannot hold (a caller's bug).
        """
        return self._put(EMBEDDING, image_id, entry)

    def get_logits(self, logits_id: str, spec: EntrySpec) -> Entry | None:
        """The stored logits entry of ``logits_id`` (e.g. ``logits`` 1x256x256 float32 and
        an ``image_id``), or None (also for any failure)."""
        return self._get(LOGITS, logits_id, spec)

    def put_logits(self, logits_id: str, entry: Entry) -> bool:
        """Store ``entry`` under ``logits_id``; False if the write was dropped.

        Raises ValueError only for an entry the format cannot hold (a caller's bug).
        """
        return self._put(LOGITS, logits_id, entry)

    def key(self, kind: str, entry_id: str) -> str:
        """The store key of an entry: format version, model and kind, then its id."""
        return f"{self._prefix}{kind}:{entry_id}"

    def stats(self) -> dict[str, int | float | bool | str]:
        """A consistent snapshot of the counters, the store's name, and whether it is
        ``available`` (not in a back-off after a failure)."""
        with self._lock:
            return {
                "store": self.name,
                "available": self._failed_at is None,
                **self._counts,
                **self._seconds,
            }

    def close(self) -> None:
        """Release the backend's connections and files; a later call opens it again."""
        with self._open_lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:  # closing a store that failed must not fail the worker
                logger.debug("closing %s failed", self.name, exc_info=True)

    def _get(self, kind: str, entry_id: str, spec: EntrySpec) -> Entry | None:
        """An entry read and checked, or None, each outcome counted."""
        key = self.key(kind, entry_id)
        blob = self._call("get", lambda backend: backend.get(key))
        if blob is _FAILED:
            return None
        if blob is None:
            self._count("misses")
            return None
        try:
            entry = decode_entry(blob, self.model_id, kind, spec)
        except InvalidEntry as error:
            self._count("invalid")
            logger.debug("%s: entry %s is a miss: %s", self.name, key, error)
            return None
        except Exception:  # any bytes are a hit or a miss, never a failed request
            self._count("invalid")
            logger.debug("%s: entry %s could not be decoded", self.name, key, exc_info=True)
            return None
        self._count("hits")
        return entry

    def _put(self, kind: str, entry_id: str, entry: Entry) -> bool:
        """Write an entry; True if the store took it."""
        key = self.key(kind, entry_id)
        blob = encode_entry(entry, self.model_id, kind)
        if self._call("put", lambda backend: backend.put(key, blob)) is _FAILED:
            return False
        self._count("writes")
        return True

    def _call(self, op: str, call: Callable[[ByteStore], object]) -> object:
        """``call(backend)``'s result, or ``_FAILED`` if it raised or a back-off is on."""
        with self._lock:
            if self._retry_at is not None and time.monotonic() < self._retry_at:
                self._counts["skipped"] += 1
                return _FAILED
        start = time.monotonic()
        try:
            result = call(self._opened())
        except Exception as error:  # a store failure of any kind must not fail a request
            self._failed(error)
            return _FAILED
        elapsed = time.monotonic() - start
        with self._lock:
            self._counts[f"{op}s"] += 1
            self._seconds[f"{op}_seconds"] += elapsed
            # A call begun before the outage's first failure does not end it.
            recovered = self._failed_at is not None and start >= self._failed_at
            if recovered:
                self._failed_at = self._retry_at = None
        if recovered:
            logger.info("%s is available again", self.name)
        return result

    def _opened(self) -> ByteStore:
        """The backend, opened on first use."""
        with self._open_lock:
            if self._backend is None:
                self._backend = self._open_backend()
            return self._backend

    def _failed(self, error: Exception) -> None:
        """Count a failure, start a back-off, and warn if it starts an outage."""
        with self._lock:
            now = time.monotonic()
            self._counts["errors"] += 1
            first = self._failed_at is None
            if first:
                self._failed_at = now
            self._retry_at = now + self._backoff_s
        if first:
            logger.warning(
                "%s failed (%s: %s); requests go on without it, next try in %g s",
                self.name,
                type(error).__name__,
                str(error)[:200],
                self._backoff_s,
            )

    def _count(self, name: str) -> None:
        """Add one to counter ``name``."""
        with self._lock:
            self._counts[name] += 1


def open_store(options: StoreOptions, model_id: str) -> SharedStore | None:
    """The shared store ``options`` describe for the model ``model_id``, or None for
    ``none``. Nothing is opened or connected until the first call."""
    if options.backend == "none":
        return None
    if options.backend == "disk":
        opener: Callable[[], ByteStore] = partial(DiskStore.from_options, options)
    else:
        opener = partial(RedisStore, options)
    return SharedStore(opener, model_id, options.backoff_s, options.describe())


def _private_directory(directory: str) -> None:
    """Make ``directory`` if missing; PermissionError unless this user owns it and no
    one else may write to it, since another user could plant entries there."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    status = os.stat(directory)
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise PermissionError(
            f"store directory {directory} must belong to this user and be writable by no one else"
        )


def _query(query: str, known: tuple[str, ...]) -> dict[str, str]:
    """A URL's query parameters, each at most once and each one of ``known``."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"store URL: malformed query {_quoted(query)}") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in _TLS_QUERY and name not in known:
            raise ValueError(f"store URL: query parameter {name} needs a rediss:// URL")
        if name not in known:
            raise ValueError(
                f"store URL: unknown query parameter {_quoted(name)} (known here: "
                f"{', '.join(sorted(known))})"
            )
        if name in out:
            raise ValueError(f"store URL: query parameter {name} given twice")
        out[name] = value
    return out


def _number(query: dict[str, str], name: str, default: float | None = None) -> float | None:
    """Query parameter ``name`` as a positive float (``backoff_s`` may be 0), or
    ``default``."""
    if name not in query:
        return default
    text = query[name]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"store URL: {name}={_quoted(text)} is not a number") from None
    _check_positive(name, value, allow_zero=name == "backoff_s")
    return value


def _check_positive(
    name: str, value: float | None, optional: bool = False, allow_zero: bool = False
) -> None:
    """ValueError unless ``value`` is a finite positive number (or None when
    ``optional``, or 0 when ``allow_zero``)."""
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and value < float("inf")
    if not (ok and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"{name} must be a positive number, got {value!r}"[:100])


def _redacted(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``."""
    scheme, separator, rest = url.partition("://")
    # The last "@" ends the user part: a password may hold "/" or "@" unescaped, and
    # cutting too much only hides more of the URL.
    userinfo, at, after = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{separator}{user}:***@{after}"


def _quoted(text: str) -> str:
    """``text`` quoted for an error message, cut to its first characters."""
    if len(text) > _QUOTE_CHARS:
        return repr(text[:_QUOTE_CHARS] + "...")
    return repr(text)
