"""Find TorchServe's token-authorization keys so clients never need keys copied by hand.

TorchServe 0.12 writes ``key_file.json`` into the directory it was started from::

    {"management": {"key": "...", "expiration time": "..."},
     "inference": {"key": "...", "expiration time": "..."},
     "API": {"key": "..."}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KEY_FILE_NAME = "key_file.json"
KEY_FILE_ENV = "SAMSERVE_KEY_FILE"


@dataclass(frozen=True)
class Keys:
    """Bearer tokens for the inference and management APIs (None when auth is disabled)."""

    inference: str | None = None
    management: str | None = None

    def header(self, api: str) -> dict[str, str]:
        """HTTP headers for ``api`` ("inference" or "management"); empty when no key."""
        key = getattr(self, api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata for ``api``; empty when no key."""
        key = getattr(self, api)
        return (("authorization", f"Bearer {key}"),) if key else ()


def find_key_file(workdir: str | os.PathLike | None = None) -> Path | None:
    """Locate key_file.json: $SAMSERVE_KEY_FILE, then ``workdir``, then ./run, then cwd."""
    candidates: list[Path] = []
    if os.environ.get(KEY_FILE_ENV):
        candidates.append(Path(os.environ[KEY_FILE_ENV]))
    if workdir is not None:
        candidates.append(Path(workdir) / KEY_FILE_NAME)
    repo_run_dir = Path(__file__).resolve().parent.parent / "run"
    candidates += [repo_run_dir / KEY_FILE_NAME, Path.cwd() / KEY_FILE_NAME]
    return next((path for path in candidates if path.is_file()), None)


def load_keys(workdir: str | os.PathLike | None = None) -> Keys:
    """Read the server's keys; returns empty Keys when no key file exists (auth disabled)."""
    path = find_key_file(workdir)
    if path is None:
        return Keys()
    data = json.loads(path.read_text())
    return Keys(
        inference=data.get("inference", {}).get("key"),
        management=data.get("management", {}).get("key"),
    )
