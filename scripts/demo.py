#!/usr/bin/env python
"""Serve the interactive web demo (demo/index.html) on loopback and print its URL.

    python scripts/demo.py            # after scripts/run.sh (TorchServe running from run/)

The page needs TorchServe's inference token, which it gets from the URL this prints:
the key sits in the fragment (after ``#``), which browsers never send to any server.

Why the page's API calls go through this server: a browser sends a CORS preflight
(OPTIONS, without the Authorization header) before any cross-origin request that
carries a token, and TorchServe 0.12 with token authorization on answers every
preflight 400 (InvalidKeyException; checked against the real server). So this server
also forwards ``POST /predictions/<model>`` to TorchServe on the same origin as the
page, passing the page's ``Authorization`` header through unchanged: the token is
still checked by TorchServe, and nothing here holds or adds a key. With token auth
disabled, the page can call TorchServe directly (``#api=http://127.0.0.1:8080``,
allowed by ``cors_allowed_origin`` in config.properties).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
import webbrowser
from pathlib import Path
from urllib.parse import urlencode

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from samclient.keys import load_keys  # noqa: E402

DEMO = REPO / "demo"
FORWARDED = ("Authorization", "Content-Type")


class DemoHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from demo/, and POST /predictions/* forwarded to ``upstream``."""

    upstream = "http://127.0.0.1:8080"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.path.startswith("/predictions/"):
            self.send_error(404, "only /predictions/<model> is forwarded")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {name: self.headers[name] for name in FORWARDED if self.headers[name]}
        try:
            reply = requests.post(self.upstream + self.path, data=body, headers=headers,
                                  timeout=600)  # fmt: skip
        except requests.RequestException as err:
            self.send_error(502, f"TorchServe at {self.upstream} is not answering: {err}")
            return
        self.send_response(reply.status_code)
        self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        pass  # quiet: the page's requests are logged by TorchServe


def demo_url(port: int, model: str, key: str | None) -> str:
    """The page's URL, with the model and inference key in its fragment."""
    fragment = {"model": model, **({"key": key} if key else {})}
    return f"http://127.0.0.1:{port}/index.html#{urlencode(fragment)}"


def serve(port: int, upstream: str) -> http.server.ThreadingHTTPServer:
    """The demo server on 127.0.0.1:``port`` (0: any free port), running in a thread."""
    handler = functools.partial(
        type("Handler", (DemoHandler,), {"upstream": upstream.rstrip("/")}), directory=str(DEMO)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api", default="http://127.0.0.1:8080", help="TorchServe inference")
    parser.add_argument("--model", default="sam")
    parser.add_argument("--workdir", type=Path, default=REPO / "run", help="TorchServe's")
    parser.add_argument("--open", action="store_true", help="open it in the default browser")
    args = parser.parse_args(argv)
    server = serve(args.port, args.api)
    url = demo_url(server.server_port, args.model, load_keys(args.workdir).inference)
    print(f"demo: open {url}\n(Ctrl-C stops the demo server; TorchServe keeps running)")
    if args.open:
        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
