"""TorchServe's token-authorization keys: find them, and renew them when they expire.

TorchServe 0.12 writes ``key_file.json`` into the directory it was started from::

    {"management": {"key": "...", "expiration time": "2024-02-16T21:12:24.801167Z"},
     "inference": {"key": "...", "expiration time": "..."},
     "API": {"key": "..."}}

The inference and management keys expire ``token_expiration_min`` minutes (60 by default)
after they were issued, and the file does not change by itself. ``GET /token?type=<api>``
on the management API, sent with the ``API`` key, issues a new key for that API, refuses
the old one from then on, and rewrites the file; its response body is empty, so the new
key is read from the file (TorchServe's ``TokenAuthorization.java`` and
``TokenAuthorizationHandler.java``).

:class:`KeySource` is the one place where the clients get their keys and recover from a
refused one: re-read the key file (another client may have renewed it already), else
renew through the token API when the file holds the ``API`` key, else explain.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import requests

from .errors import AuthError, ServerUnavailableError

KEY_FILE_NAME = "key_file.json"
KEY_FILE_ENV = "SAMSERVE_KEY_FILE"
APIS = ("inference", "management")
TOKEN_TIMEOUT = 30.0
# TorchServe truncates and rewrites the key file in place, so a reader can meet it half
# written: read again for up to this many tries, this many seconds apart.
_READ_TRIES = 20
_READ_PAUSE = 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class Keys:
    """Bearer tokens for the inference and management APIs (None when auth is disabled),
    the token API's key where the holder may renew them, and when each expires."""

    inference: str | None = None
    management: str | None = None
    api: str | None = None
    inference_expires: datetime | None = field(default=None, compare=False)
    management_expires: datetime | None = field(default=None, compare=False)

    def header(self, api: str) -> dict[str, str]:
        """HTTP headers for ``api`` ("inference" or "management"); empty when no key."""
        key = getattr(self, api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata for ``api``; empty when no key."""
        key = getattr(self, api)
        return (("authorization", f"Bearer {key}"),) if key else ()

    def expired(self, api: str, now: datetime | None = None) -> bool:
        """Whether the key file said ``api``'s key expires at or before ``now``."""
        expires = getattr(self, f"{api}_expires")
        return expires is not None and (now or datetime.now(timezone.utc)) >= expires


def find_key_file(workdir: str | os.PathLike | None = None) -> Path | None:
    """The server's key file, looked for in this order (the first that exists wins):

    1. ``$SAMSERVE_KEY_FILE``, a deployment's choice for all of its clients;
    2. ``workdir/key_file.json``, in the server directory a program was given;
    3. ``run/key_file.json`` in the current directory, where ``samserve-serve`` (and
       ``scripts/serve.py``) run TorchServe from;
    4. ``key_file.json`` in the current directory, where a TorchServe started there
       writes it.

    A client given a key file's path (:class:`KeySource` ``path``) reads that file and
    searches nothing.

    Arguments:
      workdir: the server's working directory, when known.

    Returns:
      The first candidate that is a file, or None (token authorization may be off).
    """
    candidates: list[Path] = []
    if os.environ.get(KEY_FILE_ENV):
        candidates.append(Path(os.environ[KEY_FILE_ENV]))
    if workdir is not None:
        candidates.append(Path(workdir) / KEY_FILE_NAME)
    candidates += [Path("run") / KEY_FILE_NAME, Path(KEY_FILE_NAME)]
    return next((path.resolve() for path in candidates if path.is_file()), None)


def read_keys(path: str | os.PathLike) -> Keys:
    """The keys in a key file (TorchServe's, or a copy holding only some of its sections).

    Arguments:
      path: the JSON file.

    Returns:
      The keys it holds; a section it lacks is None.
    """
    for attempt in range(_READ_TRIES):
        try:
            data = json.loads(Path(path).read_text())
            break
        except json.JSONDecodeError:
            if attempt == _READ_TRIES - 1:
                raise
            time.sleep(_READ_PAUSE)
    return Keys(
        inference=_section(data, "inference").get("key"),
        management=_section(data, "management").get("key"),
        api=_section(data, "API").get("key"),
        inference_expires=_instant(_section(data, "inference").get("expiration time")),
        management_expires=_instant(_section(data, "management").get("expiration time")),
    )


def load_keys(workdir: str | os.PathLike | None = None) -> Keys:
    """Read the server's keys; returns empty Keys when no key file exists (auth disabled)."""
    path = find_key_file(workdir)
    return read_keys(path) if path is not None else Keys()


class KeySource:
    """Where a client's keys come from, and how a refused key is replaced.

    A source is either a key file (TorchServe's own, or a copy of it holding only the
    inference key, as a deployment hands to its clients) or fixed keys given by hand.
    After the server refuses a key, :meth:`refresh` reads the file again and, when it
    still holds the refused (or an expired) key and also the ``API`` key, renews that
    key through TorchServe's token API.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        keys: Keys | None = None,
        search_from: str | os.PathLike | None = None,
    ) -> None:
        """
        Arguments:
          path: the key file to read, and to read again after a refusal.
          keys: fixed keys, when there is no file.
          search_from: with neither, look for a key file as :func:`find_key_file` does
            from this directory, now and again after a refusal (the server may start later).
        """
        self._search = path is None and keys is None
        self._search_from = search_from
        self._lock = threading.Lock()
        self.path = Path(path) if path is not None else None
        if self._search:
            self.path = find_key_file(search_from)
        readable = self.path is not None and self.path.is_file()
        self._keys = read_keys(self.path) if readable else (keys or Keys())

    @classmethod
    def of(cls, keys: Keys | KeySource | None) -> KeySource:
        """A client's source from what it was given: a source, fixed keys, or None to
        search for the key file."""
        if isinstance(keys, KeySource):
            return keys
        return cls(keys=keys) if keys is not None else cls()

    @property
    def keys(self) -> Keys:
        """The keys to send now."""
        return self._keys

    def describe(self) -> str:
        """Where the keys come from, for messages."""
        if self.path is not None:
            return str(self.path)
        return "the keys given to the client" if not self._search else "no key file found"

    def call(self, api: str, send: Callable[[Keys], T], token_url: str | None) -> T:
        """``send(keys)``; after an :class:`AuthError`, once more with a fresh key.

        Arguments:
          api: "inference" or "management", the API ``send`` calls.
          send: makes the call with the given keys; raises AuthError when the key is refused.
          token_url: the server's REST management API, where its token API answers.

        Returns:
          What ``send`` returns.
        """
        keys = self._keys
        try:
            return send(keys)
        except AuthError as refused:
            fresh = self.refresh(api, getattr(keys, api), token_url, refused)
        return send(fresh)

    def refresh(
        self,
        api: str,
        refused: str | None,
        token_url: str | None,
        error: AuthError | None = None,
    ) -> Keys:
        """Keys with a different ``api`` key than ``refused``, which the server refused.

        Arguments:
          api: "inference" or "management".
          refused: the key the server refused (None: none was sent).
          token_url: the server's REST management API, for renewal.
          error: the refusal, quoted in the error raised when no other key can be had.

        Returns:
          The source's new keys, also kept for later calls.
        """
        with self._lock:
            path = self._key_file(api, error)
            with _locked(path, error):
                current = read_keys(path)
                key = getattr(current, api)
                if key and key != refused and not current.expired(api):
                    self._keys = current
                    return current
                return self._renew(path, current, api, token_url, error)

    def renew(self, api: str, token_url: str) -> Keys:
        """Have the server issue a new ``api`` key now (the old one is refused from then on).

        Arguments:
          api: "inference" or "management".
          token_url: the server's REST management API.

        Returns:
          The source's new keys.
        """
        with self._lock:
            path = self._key_file(api, None)
            with _locked(path, None):
                return self._renew(path, read_keys(path), api, token_url, None)

    def _key_file(self, api: str, error: AuthError | None) -> Path:
        """The key file to read, searched for again if there was none."""
        if self.path is None and self._search:
            self.path = find_key_file(self._search_from)
        if self.path is None:
            raise self._no_new_key(api, "it has no key file to read a newer one from", error)
        return self.path

    def _renew(
        self, path: Path, current: Keys, api: str, token_url: str | None, error: AuthError | None
    ) -> Keys:
        """A new ``api`` key through the token API, with the API key in ``current``."""
        if current.api is None or token_url is None:
            reason = f"{path} holds no newer {api} key and no API key to renew it"
            raise self._no_new_key(api, reason, error)
        request_new_key(token_url, api, current.api)
        self._keys = read_keys(path)
        return self._keys

    def _no_new_key(self, api: str, reason: str, error: AuthError | None) -> AuthError:
        """The error that says the key was refused, why no other could be had, and what to do."""
        refusal = f" ({error.message})" if error is not None else ""
        message = (
            f"TorchServe refused the {api} key{refusal}: it expired (keys live "
            f"token_expiration_min minutes after they are issued, 60 by default) or it is "
            f"wrong. No new key: {reason} (key source: {self.describe()}). Get the current "
            f"key from the server's key_file.json, or have the server's operator renew it "
            f"(`samserve-serve renew-key --api {api}`, or `GET /token?type={api}` "
            f"on the management API with the API key), and give it to this client."
        )
        status = error.status if error is not None else None
        return AuthError(error.code if error is not None else None, message, status=status)


def request_new_key(token_url: str, api: str, api_key: str) -> None:
    """Ask TorchServe's token API for a new ``api`` key; it rewrites its key file.

    Arguments:
      token_url: the server's REST management API, e.g. ``http://127.0.0.1:8081``.
      api: "inference" or "management".
      api_key: the ``API`` key from the key file.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, not {api!r}")
    url = f"{token_url.rstrip('/')}/token"
    try:
        response = requests.get(
            url, params={"type": api}, headers={"Authorization": f"Bearer {api_key}"},
            timeout=TOKEN_TIMEOUT,
        )  # fmt: skip
    except requests.RequestException as err:
        raise ServerUnavailableError(None, f"cannot reach the token API at {url}: {err}") from err
    if not response.ok:
        raise AuthError(
            response.status_code,
            f"the token API at {url} refused to renew the {api} key: HTTP "
            f"{response.status_code} {response.text.strip()[:200]}",
            status=response.status_code,
        )


def _section(data: object, name: str) -> dict:
    """One section of the key file, or an empty one."""
    section = data.get(name) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _instant(text: str | None) -> datetime | None:
    """Java's ``Instant.toString()`` (UTC, up to nine fraction digits) as a datetime."""
    if not text:
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d)?)(?:\.(\d+))?Z", text.strip())
    if match is None:
        return None
    base = datetime.fromisoformat(match.group(1)).replace(tzinfo=timezone.utc)
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    return base.replace(microsecond=int(fraction))


@contextmanager
def _locked(path: Path, error: AuthError | None) -> Iterator[None]:
    """Hold an exclusive lock on the key file, so that clients of one server, in any
    process, renew a key one at a time and each reads what the one before wrote."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise AuthError(
            error.code if error is not None else None,
            f"cannot read the key file {path} ({err}): is TorchServe running from there?",
            status=error.status if error is not None else None,
        ) from err
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
