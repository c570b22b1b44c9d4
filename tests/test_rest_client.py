"""RestClient against a real local HTTP server: bodies read whole, errors, kept connections.

TorchServe's own replies are covered by the integration tests; here a plain HTTP server
sends what TorchServe can send (multi-MB JSON, chunked bodies, error JSON, non-JSON) and
counts the TCP connections the client opens.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from samclient.errors import (
    InvalidResponseError,
    ModelNotFoundError,
    PredictionFailedError,
    SamServeError,
    ServerUnavailableError,
)
from samclient.keys import Keys
from samclient.rest_client import RestClient

# A response of 48 RLE masks' size (about 7 MB), as a 16-click multimask request returns.
LARGE = {"results": [{"masks": [{"segmentation": {"counts": "a1b2" * 37_500}}] * 3}] * 16}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe's frontend

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.connections.add(self.client_address)  # type: ignore[attr-defined]
        name = self.path.rsplit("/", 1)[-1]
        if name == "large":
            self._send(200, json.dumps(LARGE).encode())
        elif name == "chunked":
            self._send_chunked(json.dumps(LARGE).encode())
        elif name == "handler_error":
            error = {"error": {"code": "image_not_cached", "message": "image_id 'x' is not cached"}}
            self._send(404, json.dumps(error).encode())
        elif name == "torchserve_error":
            error = {"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}
            self._send(503, json.dumps(error).encode())
        elif name == "not_json":
            self._send(200, b"<html>proxy says hi</html>")
        elif name == "cut":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"results": ')
            self.close_connection = True
        else:
            error = {
                "code": 404,
                "type": "ModelNotFoundException",
                "message": f"Model not found: {name}",
            }
            self._send(404, json.dumps(error).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_chunked(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 65_536):
            piece = body[start : start + 65_536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.connections = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server: http.server.ThreadingHTTPServer) -> RestClient:
    url = f"http://127.0.0.1:{server.server_port}"
    return RestClient(url, url, keys=Keys(), timeout=10)


@pytest.mark.parametrize("path", ["large", "chunked"])
def test_large_bodies_decode_whole_over_one_kept_connection(http_server, path):
    client = _client(http_server)
    for _ in range(3):
        assert client.predict(path, {"image_id": "x"}) == LARGE
    assert len(http_server.connections) == 1  # the connection went back to the pool


def test_error_bodies_become_errors_and_the_connection_stays(http_server):
    client = _client(http_server)
    with pytest.raises(SamServeError) as caught:
        client.predict("handler_error", {})
    assert (caught.value.code, caught.value.status) == ("image_not_cached", 404)
    assert "not cached" in str(caught.value)
    with pytest.raises(PredictionFailedError, match="no worker"):
        client.predict("torchserve_error", {})
    with pytest.raises(ModelNotFoundError, match="Model not found: nope"):
        client.predict("nope", {})
    assert client.predict("large", {}) == LARGE
    assert len(http_server.connections) == 1


def test_a_body_that_is_not_json_is_an_invalid_response(http_server):
    with pytest.raises(InvalidResponseError, match="POST /predictions/not_json: not JSON"):
        _client(http_server).predict("not_json", {})


def test_a_body_cut_short_is_a_connection_error(http_server):
    with pytest.raises(ServerUnavailableError):
        _client(http_server).predict("cut", {})
