"""REST client for the samserve TorchServe: inference (8080) and management (8081) APIs."""

from __future__ import annotations

from typing import Any

import requests

from .errors import (
    AuthError,
    InvalidResponseError,
    ModelApiDisabledError,
    ModelNotFoundError,
    PayloadTooLargeError,
    PredictionFailedError,
    SamServeError,
    ServerUnavailableError,
)
from .keys import Keys, load_keys


class RestClient:
    """Calls TorchServe over HTTP with the right token for each API.

    Errors raise ``SamServeError``: with our handler's ``code`` (e.g. ``image_not_cached``)
    and the HTTP status for bad requests, or a subclass for server-side conditions.
    """

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        management_url: str = "http://127.0.0.1:8081",
        keys: Keys | None = None,
        timeout: float = 300,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.keys = keys if keys is not None else load_keys()
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, api: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        base = self.inference_url if api == "inference" else self.management_url
        headers = {**self.keys.header(api), **kwargs.pop("headers", {})}
        try:
            response = self.session.request(
                method, f"{base}{path}", headers=headers, timeout=self.timeout, **kwargs
            )
        except requests.ConnectionError as err:
            raise ServerUnavailableError(None, f"cannot reach {base}: {err}") from err
        if not response.ok:
            raise _http_error(response)
        return response

    def ping(self) -> str:
        """The server's health status ("Healthy")."""
        return self._call("inference", "GET", "/ping").json()["status"]

    def predict(self, model_name: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON request to /predictions/{model_name}; the decoded response."""
        response = self._call("inference", "POST", f"/predictions/{model_name}", json=body)
        return _json(response)

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
        return _json(response)

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
        return _json(self._call("management", "POST", "/models", params=params))["status"]

    def list_models(self, limit: int = 100) -> dict[str, Any]:
        return _json(self._call("management", "GET", "/models", params={"limit": limit}))

    def describe_model(self, model_name: str, customized: bool = False) -> list[dict[str, Any]]:
        """The model's description; with ``customized`` the handler's cache counters too."""
        params = {"customized": "true"} if customized else {}
        return _json(self._call("management", "GET", f"/models/{model_name}", params=params))

    def scale_workers(
        self, model_name: str, min_worker: int, max_worker: int | None = None,
        synchronous: bool = True,
    ) -> str:  # fmt: skip
        params = {
            "min_worker": min_worker,
            "max_worker": max_worker if max_worker is not None else min_worker,
            "synchronous": str(synchronous).lower(),
        }
        response = self._call("management", "PUT", f"/models/{model_name}", params=params)
        return _json(response)["status"]

    def unregister_model(self, model_name: str) -> str:
        return _json(self._call("management", "DELETE", f"/models/{model_name}"))["status"]

    def metrics(self, metrics_url: str = "http://127.0.0.1:8082") -> str:
        """Prometheus text from the metrics API."""
        return requests.get(f"{metrics_url.rstrip('/')}/metrics", timeout=self.timeout).text


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError as err:
        raise InvalidResponseError(
            response.status_code, f"response is not JSON: {response.text[:200]!r}"
        ) from err


def _http_error(response: requests.Response) -> SamServeError:
    """Our handler's ``{"error": ...}`` or TorchServe's ``{"code", "type", "message"}``."""
    status = response.status_code
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        return SamServeError(error.get("code"), error.get("message", ""), status=status)
    kind = payload.get("type", "") if isinstance(payload, dict) else ""
    message = (payload.get("message") if isinstance(payload, dict) else None) or response.text
    message = f"HTTP {status} {kind}: {message}".strip()
    if kind == "InvalidKeyException":
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
