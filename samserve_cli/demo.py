"""Serve the interactive web demo (demo/index.html) on loopback and print its URL.

    samserve-demo            # in the folder samserve-serve runs TorchServe from
    python scripts/demo.py   # the same for the project's checkout, from anywhere

The page needs TorchServe's inference key, which it gets from the URL this prints:
the key sits in the fragment (after ``#``), which browsers never send to any server.

Why the page's API calls go through this server: a browser sends a CORS preflight
(OPTIONS, without the Authorization header) before any cross-origin request that
carries a key, and TorchServe 0.12 with token authorization on answers every
preflight 400 (InvalidKeyException; checked against the real server). So this server
also forwards ``POST /predictions/<model>`` to TorchServe on the same origin as the
page, with the page's ``Authorization`` header: TorchServe still checks every key.

Keys expire (``token_expiration_min``). This server runs beside TorchServe and reads its
key file, so it keeps the pages it served working: a request that carries a key this
server handed out (in the printed URL, or in a reply) goes to TorchServe with the
current key, renewed through the token API when TorchServe refuses it, and the reply
hands the page that key in ``X-Samserve-Key``. A key this server never handed out (a
wrong one, or one the page got elsewhere) is forwarded as it is, and its refusal comes
back unchanged: a page gets a key only by showing one this server gave. With token auth
disabled, the page can call TorchServe directly (``#api=http://127.0.0.1:8080``,
allowed by ``cors_allowed_origin`` in config.properties).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
import webbrowser
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlencode

import requests

from samclient.errors import SamServeError
from samclient.keys import KeySource
from samclient.rest_client import key_refused
from samclient.server import Addresses

FORWARDED = ("Content-Type",)
KEY_HEADER = "X-Samserve-Key"


class PageKeys:
    """The inference keys this demo server handed to its pages, and the one to use now.

    Arguments:
      source: the server's key file (None: token auth is off, or the pages bring keys).
      token_url: the server's REST management API, whose token API renews keys.
    """

    def __init__(self, source: KeySource | None, token_url: str | None) -> None:
        self.source = source
        self.token_url = token_url
        self._handed: set[str] = set()
        self._lock = threading.Lock()

    def hand_out(self) -> str | None:
        """The current inference key, recorded as handed out (None without a key)."""
        key = self.source.keys.inference if self.source is not None else None
        if key:
            with self._lock:
                self._handed.add(key)
        return key

    def for_page(self, presented: str | None) -> str | None:
        """The key to send for a page that presented ``presented``: the current one if
        this server handed ``presented`` out (or it is the key file's), else None
        (forward the page's own)."""
        if self.source is None or not presented:
            return None
        with self._lock:
            if presented == self.source.keys.inference:
                self._handed.add(presented)
            handed = presented in self._handed
        return self.hand_out() if handed else None

    def renew(self, refused: str) -> str | None:
        """A new key after TorchServe refused ``refused``, a key this server handed out;
        None when none can be had (the page then gets TorchServe's refusal)."""
        try:
            self.source.refresh("inference", refused, self.token_url)
        except SamServeError:
            return None
        return self.hand_out()


@dataclass(frozen=True)
class Upstream:
    """Where the demo server forwards the page's calls, and with which keys."""

    inference_url: str
    keys: PageKeys


class DemoHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from demo/, and POST /predictions/* forwarded to ``upstream``."""

    upstream: Upstream

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.path.startswith("/predictions/"):
            self.send_error(404, "only /predictions/<model> is forwarded")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        presented = _bearer(self.headers.get("Authorization"))
        key = self.upstream.keys.for_page(presented)
        try:
            reply = self._forward(body, key or presented)
            if key and key_refused(reply.status_code, reply.content):
                key = self.upstream.keys.renew(key)
                reply = self._forward(body, key) if key else reply
        except requests.RequestException as err:
            where = self.upstream.inference_url
            self.send_error(502, f"TorchServe at {where} is not answering: {err}")
            return
        self.send_response(reply.status_code)
        self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(reply.content)))
        if key and key != presented:
            self.send_header(KEY_HEADER, key)
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(reply.content)

    def _forward(self, body: bytes, key: str | None) -> requests.Response:
        """POST the page's request to TorchServe with ``key``."""
        headers = {name: self.headers[name] for name in FORWARDED if self.headers[name]}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(
            self.upstream.inference_url + self.path, data=body, headers=headers, timeout=600
        )

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        pass  # quiet: the page's requests are logged by TorchServe


def _bearer(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header."""
    if not header or not header.startswith("Bearer "):
        return None
    return header[len("Bearer ") :].strip() or None


def demo_url(port: int, model: str, key: str | None) -> str:
    """The page's URL, with the model and inference key in its fragment."""
    fragment = {"model": model, **({"key": key} if key else {})}
    return f"http://127.0.0.1:{port}/index.html#{urlencode(fragment)}"


def page_folder() -> Path:
    """The page and its example image: the repository's demo/, packaged with the server."""
    return Path(str(resources.files(__package__) / "page"))


def serve(port: int, upstream: Upstream) -> http.server.ThreadingHTTPServer:
    """The demo server on 127.0.0.1:``port`` (0: any free port), running in a thread."""
    handler = functools.partial(
        type("Handler", (DemoHandler,), {"upstream": upstream}), directory=str(page_folder())
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """``samserve-demo``: serve the page until interrupted.

    Arguments:
      argv: the arguments (default: the command line's).
      root: the folder whose config.properties and run/ the defaults name (default: the
        current directory).

    Returns:
      The exit status.
    """
    root = root if root is not None else Path()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", type=Path, help="TorchServe's config.properties "
                        f"(default: {root / 'config.properties'}, if it exists)")  # fmt: skip
    parser.add_argument("--api", help="TorchServe inference (default: config.properties')")
    parser.add_argument("--model", default="sam")
    parser.add_argument("--workdir", type=Path, default=root / "run", help="TorchServe's")
    parser.add_argument("--open", action="store_true", help="open it in the default browser")
    args = parser.parse_args(argv)
    addresses = Addresses.find(args.config, root / "config.properties")
    keys = PageKeys(KeySource(search_from=args.workdir), addresses.management_url)
    server = serve(args.port, Upstream((args.api or addresses.inference_url).rstrip("/"), keys))
    url = demo_url(server.server_port, args.model, keys.hand_out())
    print(f"demo: open {url}\n(Ctrl-C stops the demo server; TorchServe keeps running)")
    if args.open:
        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0
