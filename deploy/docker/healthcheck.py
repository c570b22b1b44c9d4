#!/usr/bin/env python
"""Container health check for samserve: TorchServe's ``/ping`` with the inference key.

TorchServe 0.12 asks for a key even on ``/ping``, and its inference key expires
(``token_expiration_min``) while the key file stays as it was. So, as the project's
clients do (``samclient.keys.KeySource``), a refused key is renewed once through the
token API with the file's ``API`` key, under an exclusive lock on the key file, and the
ping is repeated; the renewed key is in the file for every client that reads it.

Exit status 0: healthy (HTTP 200 from ``/ping``); 1: anything else, with the reason on
stderr. It runs in the image's Python (3.9 in ``pytorch/torchserve:0.12.0``), standard
library only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

CONFIG = "/home/model-server/samserve/config.properties"
# TorchServe writes key_file.json into its working directory, the image's WORKDIR.
KEY_FILE = "/home/model-server/key_file.json"
TIMEOUT_S = 5.0


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` lines of a Java properties file; as ``Properties.load``, a later
    line wins over an earlier one with the same key, and ``#``/``!`` lines are comments."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            values[line] = ""
            continue
        values[line[:cut].strip()] = line[cut + 1 :].strip()
    return values


def local_url(address: str) -> str:
    """A listener address of the config as a URL this container can call: a wildcard
    bind address (0.0.0.0, ::) is reached on loopback."""
    parts = urllib.parse.urlsplit(address)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def read_keys(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _key(keys: dict, section: str) -> str | None:
    value = keys.get(section)
    return value.get("key") if isinstance(value, dict) else None


def _get(url: str, key: str | None) -> tuple[int, str]:
    """(HTTP status, body) of a GET with the bearer key; status 0 when unreachable."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
    except (OSError, ValueError) as err:
        return 0, str(err)


def _refused(status: int, body: str) -> bool:
    """Whether TorchServe refused the key (HTTP 400 ``InvalidKeyException``)."""
    return status == 400 and "InvalidKeyException" in body


def _renew(key_file: str, refused: str | None, management: str) -> str | None:
    """The inference key after renewing ``refused`` (unless another client already did),
    read back from the file TorchServe rewrote; None when there is no API key."""
    with open(key_file, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            keys = read_keys(key_file)
            current = _key(keys, "inference")
            if current and current != refused:
                return current
            api_key = _key(keys, "API")
            if not api_key:
                return None
            _get(f"{management}/token?type=inference", api_key)
            return _key(read_keys(key_file), "inference")
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check(config_path: str, key_file: str) -> tuple[bool, str]:
    """(healthy, reason) of the TorchServe configured by ``config_path``."""
    with open(config_path, encoding="utf-8") as handle:
        config = parse_properties(handle.read())
    inference = local_url(config.get("inference_address", "http://127.0.0.1:8080"))
    management = local_url(config.get("management_address", "http://127.0.0.1:8081"))
    auth_off = config.get("disable_token_authorization", "false").lower() == "true"
    key = None
    if not auth_off:
        try:
            key = _key(read_keys(key_file), "inference")
        except (OSError, ValueError) as err:
            return False, f"no key file yet ({key_file}: {err})"
    status, body = _get(f"{inference}/ping", key)
    if _refused(status, body):
        key = _renew(key_file, key, management)
        status, body = _get(f"{inference}/ping", key)
    if status == 200:
        return True, body.strip()
    return False, f"{inference}/ping: HTTP {status} {body.strip()[:200]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.environ.get("SAMSERVE_TS_CONFIG", CONFIG))
    parser.add_argument("--key-file", default=os.environ.get("SAMSERVE_KEY_FILE", KEY_FILE))
    args = parser.parse_args(argv)
    healthy, reason = check(args.config, args.key_file)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
