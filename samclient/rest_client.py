"""REST client for the samserve TorchServe: inference (8080) and management (8081) APIs."""

from __future__ import annotations

from typing import Any

import orjson
import requests
import urllib3

from .body import decode_response
from .errors import (
    AuthError,
    ModelApiDisabledError,
    ModelNotFoundError,
    PayloadTooLargeError,
    PredictionFailedError,
    SamServeError,
    ServerUnavailableError,
)
from .keys import Keys, KeySource
from .resend import ResendOptions, SentImages, predict_resending


class RestClient:
    """Calls TorchServe over HTTP with the right token for each API.

    Errors raise ``SamServeError``: with our handler's ``code`` (e.g. ``image_not_cached``)
    and the HTTP status for bad requests, or a subclass for server-side conditions. A
    refused (expired) key is replaced once through ``keys`` (:class:`KeySource`), and a
    click by ``image_id`` that reached a worker without the image is sent again with the
    image when this client sent it (:mod:`samclient.resend`).
    """

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        management_url: str = "http://127.0.0.1:8081",
        keys: Keys | KeySource | None = None,
        timeout: float = 300,
        resend: ResendOptions | None = None,
    ) -> None:
        """
        Arguments:
          inference_url, management_url: the server's REST APIs (the management API also
            serves the token API that renews keys).
          keys: a key source, fixed keys, or None to find the server's key_file.json.
          timeout: seconds per HTTP call.
          resend: how requests that reached a worker without their image are recovered.
        """
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_source = KeySource.of(keys)
        self.timeout = timeout
        self.session = requests.Session()
        self.sent_images = SentImages(resend or ResendOptions())

    @property
    def keys(self) -> Keys:
        """The keys this client sends now."""
        return self.key_source.keys

    def _call(self, api: str, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful response; an error status raises ``_http_error``'s.
        A refused key is replaced once (:meth:`KeySource.call`)."""
        return self.key_source.call(
            api, lambda keys: self._send(keys, api, method, path, kwargs), self.management_url
        )

    def _send(self, keys: Keys, api: str, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        """One HTTP call with ``keys``; the decoded JSON body."""
        base = self.inference_url if api == "inference" else self.management_url
        headers = {**keys.header(api), **kwargs.get("headers", {})}
        options = {name: value for name, value in kwargs.items() if name != "headers"}
        try:
            response = self.session.request(
                method, f"{base}{path}", headers=headers, timeout=self.timeout, stream=True,
                **options,
            )  # fmt: skip
            # The body in one read, since requests' own (``Response.content``) joins small
            # chunks, slow on a response of many masks (docs/performance.md, *Responses
            # and the frontend*); a whole read hands the connection back to the pool.
            body = response.raw.read(decode_content=True)
        except (requests.ConnectionError, urllib3.exceptions.HTTPError) as err:
            raise ServerUnavailableError(None, f"cannot reach {base}: {err}") from err
        if not response.ok:
            raise _http_error(response.status_code, body)
        return decode_response(body, f"{method} {path}")

    def close(self) -> None:
        """Close the connections the client keeps for later calls."""
        self.session.close()

    def ping(self) -> str:
        """The server's health status ("Healthy")."""
        return self._call("inference", "GET", "/ping")["status"]

    def predict(self, model_name: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON request to /predictions/{model_name}; the decoded response.

        A request by ``image_id`` answered ``image_not_cached`` goes once more with the
        image, when this client sent it before (see :class:`ResendOptions`).
        """
        return predict_resending(
            lambda request: self._call(
                "inference", "POST", f"/predictions/{model_name}", json=dict(request)
            ),
            body,
            self.sent_images,
        )

    def predict_image(
        self, model_name: str, image: bytes, content_type: str = "image/png"
    ) -> dict[str, Any]:
        """POST raw image bytes (a pre-compute request); the response with its image_id."""
        response = self._call(
            "inference",
            "POST",
            f"/predictions/{model_name}",
            data=image,
            headers={"Content-Type": content_type},
        )
        self.sent_images.remember(response.get("image_id"), image)
        return response

    def register_model(
        self, url: str, model_name: str | None = None, initial_workers: int = 1,
        synchronous: bool = True,
    ) -> str:  # fmt: skip
        """Register an archive (a file name in the model store) through the management API."""
        params: dict[str, Any] = {
            "url": url,
            "initial_workers": initial_workers,
            "synchronous": str(synchronous).lower(),
        }
        if model_name:
            params["model_name"] = model_name
        return self._call("management", "POST", "/models", params=params)["status"]

    def list_models(self, limit: int = 100) -> dict[str, Any]:
        return self._call("management", "GET", "/models", params={"limit": limit})

    def describe_model(self, model_name: str, customized: bool = False) -> list[dict[str, Any]]:
        """The model's description; with ``customized`` the handler's cache counters too."""
        params = {"customized": "true"} if customized else {}
        return self._call("management", "GET", f"/models/{model_name}", params=params)

    def scale_workers(
        self, model_name: str, min_worker: int, max_worker: int | None = None,
        synchronous: bool = True,
    ) -> str:  # fmt: skip
        params = {
            "min_worker": min_worker,
            "max_worker": max_worker if max_worker is not None else min_worker,
            "synchronous": str(synchronous).lower(),
        }
        return self._call("management", "PUT", f"/models/{model_name}", params=params)["status"]

    def unregister_model(self, model_name: str) -> str:
        return self._call("management", "DELETE", f"/models/{model_name}")["status"]

    def metrics(self, metrics_url: str = "http://127.0.0.1:8082") -> str:
        """Prometheus text from the metrics API."""
        return requests.get(f"{metrics_url.rstrip('/')}/metrics", timeout=self.timeout).text


def _http_error(status: int, body: bytes) -> SamServeError:
    """Our handler's ``{"error": ...}`` or TorchServe's ``{"code", "type", "message"}``."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = {}
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        return SamServeError(error.get("code"), error.get("message", ""), status=status)
    kind = payload.get("type", "") if isinstance(payload, dict) else ""
    text = body.decode(errors="replace")
    message = (payload.get("message") if isinstance(payload, dict) else None) or text
    message = f"HTTP {status} {kind}: {message}".strip()
    if key_refused(status, body):
        return AuthError(status, message, status=status)
    if "Model API disabled" in message:
        return ModelApiDisabledError(status, message, status=status)
    if status == 404:
        return ModelNotFoundError(status, message, status=status)
    if status == 413:
        return PayloadTooLargeError(
            status, "request or response over the size limit", status=status
        )
    if status >= 500:
        return PredictionFailedError(status, message, status=status)
    return SamServeError(status, message, status=status)


def key_refused(status: int, body: bytes) -> bool:
    """Whether TorchServe refused the call's key: HTTP 400 ``InvalidKeyException``
    (TorchServe's ``TokenAuthorizationHandler.java``), for a missing, wrong or expired key."""
    if status != 400:
        return False
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and payload.get("type") == "InvalidKeyException"
