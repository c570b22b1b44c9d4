"""gRPC client for the samserve TorchServe (inference API on 7070, management API on 7071).

Stubs come from :mod:`samclient.protos` (compiled from TorchServe's own protos, which it ships).
Token authorization is on by default in TorchServe 0.12: the inference and management APIs
take *different* keys, sent as ``authorization: Bearer <key>`` metadata; they are read from
the server's ``key_file.json`` by :class:`samclient.keys.KeySource`, which also replaces an
expired key (TorchServe's token API is REST only: ``token_url``).

Behaviour of TorchServe 0.12's gRPC API worth knowing (checked against a live server):

* errors come back as ``grpc.RpcError`` with details ``"<message>\\n<java exception class>"``;
  unknown model on the *inference* API is ``INTERNAL`` (``NOT_FOUND`` on management), a handler
  exception is ``UNAVAILABLE "Prediction failed"``, a wrong key is ``PERMISSION_DENIED`` and so
  is "Model API disabled"; registering a name twice is ``UNKNOWN`` with empty details;
* our handler's ``{"error": {...}}`` bodies arrive as a normal, successful prediction;
* a request over ``max_request_size`` is ``CANCELLED`` (RST_STREAM 8); a worker response over
  ``max_response_size`` kills the worker (``INTERNAL "Worker died."``);
* int fields equal to 0 mean "unset": ``min_worker=0`` scales to 1 and ``initial_workers=0``
  means ``default_workers_per_model``; ``ListModels`` with ``limit=0`` returns nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2

from samclient.body import decode_response
from samclient.errors import (
    AuthError,
    InvalidResponseError,
    ModelApiDisabledError,
    ModelNotFoundError,
    PayloadTooLargeError,
    PredictionFailedError,
    RequestTimeoutError,
    SamServeError,
    ServerUnavailableError,
)
from samclient.keys import Keys, KeySource
from samclient.protos import Stubs, load_stubs
from samclient.resend import ResendOptions, SentImages, predict_resending

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_PING_TIMEOUT = 10.0
DEFAULT_MANAGEMENT_TIMEOUT = 120.0
DEFAULT_REGISTER_TIMEOUT = 600.0

_NOT_FOUND_MARKERS = ("ModelNotFoundException", "ModelVersionNotFoundException")


def rpc_error_to_samserve(exc: grpc.RpcError, what: str) -> SamServeError:
    """Translate a ``grpc.RpcError`` from TorchServe into the matching :class:`SamServeError`.

    ``code`` is the gRPC status name; the message starts with ``what`` and keeps the server's
    details verbatim, followed by a hint where the status is ambiguous.
    """
    status = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    message = f"{what}: {name}: {details.strip()}" if details else f"{what}: {name} (no details)"

    if "Model API disabled" in details:
        return ModelApiDisabledError(
            name, f"{message} (start TorchServe with enable_model_api=true)"
        )
    if status in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return AuthError(
            name,
            f"{message} (send the key from the server's key_file.json; inference and "
            "management keys differ and expire)",
        )
    if status == grpc.StatusCode.NOT_FOUND or any(m in details for m in _NOT_FOUND_MARKERS):
        return ModelNotFoundError(name, message)
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimeoutError(name, message)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED or (
        status == grpc.StatusCode.CANCELLED and "RST_STREAM" in details
    ):
        return PayloadTooLargeError(
            name,
            f"{message} (message above the server's max_request_size/max_response_size "
            "or the client's max_message_bytes)",
        )
    if status == grpc.StatusCode.UNAVAILABLE:
        if "org.pytorch.serve" in details:  # the server answered: the worker failed
            return PredictionFailedError(name, f"{message} (see logs/model_log.log)")
        return ServerUnavailableError(name, message)
    if status == grpc.StatusCode.INTERNAL and "Worker died" in details:
        return PredictionFailedError(
            name,
            f"{message} (a response above max_response_size also kills the worker; "
            "see logs/model_log.log)",
        )
    if status == grpc.StatusCode.UNIMPLEMENTED:
        return SamServeError(name, f"{message} (inference and management ports swapped?)")
    return SamServeError(name, message)


def _register_error(exc: grpc.RpcError, what: str) -> SamServeError:
    """``rpc_error_to_samserve``, naming the usual cause of RegisterModel's bare UNKNOWN."""
    error = rpc_error_to_samserve(exc, what)
    if error.code == "UNKNOWN" and not (exc.details() or ""):
        return SamServeError(
            "UNKNOWN",
            f"{what}: UNKNOWN with no details: TorchServe 0.12 answers this way "
            "when a model of that name and version is already registered",
        )
    return error


def _encode_body(body: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, Mapping):
        return json.dumps(body).encode()
    raise TypeError(f"body must be bytes or a dict, not {type(body).__name__}")


def _raise_handler_error(payload: Any) -> None:
    """Raise SamServeError for our handler's ``{"error": {"code": ..., "message": ...}}``."""
    if not isinstance(payload, dict) or "error" not in payload:
        return
    error = payload["error"]
    if isinstance(error, Mapping):
        raise SamServeError(error.get("code"), str(error.get("message", json.dumps(error))))
    raise SamServeError(None, str(error))


class GrpcClient:
    """Client for TorchServe's gRPC inference and management APIs.

    Use as a context manager (or call :meth:`close`)::

        with GrpcClient(keys=KeySource("run/key_file.json")) as client:
            client.ping()
            client.predict("sam", {"image": ...})

    All methods raise :class:`samclient.errors.SamServeError` (or a subclass) on failure.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        inference_port: int = 7070,
        management_port: int = 7071,
        keys: Keys | KeySource | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token_url: str | None = None,
        resend: ResendOptions | None = None,
    ) -> None:
        """
        Arguments:
          host, inference_port, management_port: the server's gRPC APIs.
          keys: a key source, fixed keys, or None to find the server's key_file.json.
          max_message_bytes: largest message either way.
          token_url: the server's REST management API, whose token API renews expired
            keys (default: port 8081 on ``host``).
          resend: how requests that reached a worker without their image are recovered.
        """
        self.host = host
        self.inference_port = inference_port
        self.management_port = management_port
        self.key_source = KeySource.of(keys)
        self.max_message_bytes = max_message_bytes
        self.stubs: Stubs = load_stubs()
        target_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.token_url = token_url or f"http://{target_host}:8081"
        self.sent_images = SentImages(resend or ResendOptions())
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._inference_channel = grpc.insecure_channel(
            f"{target_host}:{inference_port}", options=options
        )
        self._management_channel = grpc.insecure_channel(
            f"{target_host}:{management_port}", options=options
        )
        self._inference = self.stubs.inference_pb2_grpc.InferenceAPIsServiceStub(
            self._inference_channel
        )
        self._management = self.stubs.management_pb2_grpc.ManagementAPIsServiceStub(
            self._management_channel
        )

    def __repr__(self) -> str:
        return (
            f"GrpcClient(host={self.host!r}, inference_port={self.inference_port}, "
            f"management_port={self.management_port})"
        )

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def keys(self) -> Keys:
        """The keys this client sends now."""
        return self.key_source.keys

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        api: str,
        timeout: float | None,
        what: str,
        translate: Callable[[grpc.RpcError, str], SamServeError] | None = None,
    ) -> Any:
        """``method(request)`` with ``api``'s key; a refused key is replaced once
        (:meth:`KeySource.call`). ``translate`` turns an RpcError into the error raised."""
        translate = translate or rpc_error_to_samserve

        def send(keys: Keys) -> Any:
            try:
                return method(request, metadata=keys.metadata(api), timeout=timeout)
            except grpc.RpcError as exc:
                raise translate(exc, what) from exc

        return self.key_source.call(api, send, self.token_url)

    # -- inference API -----------------------------------------------------------------------

    def ping(self, timeout: float | None = DEFAULT_PING_TIMEOUT) -> str:
        """Server health status string, e.g. ``"Healthy"`` (needs the inference key)."""
        response = self._call(self._inference.Ping, empty_pb2.Empty(), "inference", timeout, "ping")
        try:
            health = json.loads(response.health)
        except ValueError:
            return str(response.health)
        if isinstance(health, dict) and "status" in health:
            return str(health["status"])
        return str(response.health)

    def predict_raw(
        self,
        model_name: str,
        body: bytes | Mapping[str, Any],
        input_name: str = "body",
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Run a prediction and return the raw response bytes.

        ``body`` is sent as input ``input_name`` (the handler sees bytes under that key);
        dict bodies are JSON-encoded first.
        """
        pb2 = self.stubs.inference_pb2
        request = pb2.PredictionsRequest(
            model_name=model_name,
            model_version=model_version or "",
            input={input_name: _encode_body(body)},
        )
        response = self._call(
            self._inference.Predictions,
            request,
            "inference",
            timeout,
            f"predict({model_name!r})",
        )
        if response.HasField("status") and response.status.code != 0:
            raise SamServeError(response.status.code, response.status.message)
        return bytes(response.prediction)

    def predict(
        self,
        model_name: str,
        body: bytes | Mapping[str, Any],
        input_name: str = "body",
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run a prediction and return the decoded JSON object.

        Raises :class:`SamServeError` with the handler's code and message when the response
        is ``{"error": {"code": ..., "message": ...}}`` (over gRPC such handler errors arrive
        as a normal prediction), and :class:`InvalidResponseError` when it is not a JSON object.
        A dict request by ``image_id`` answered ``image_not_cached`` goes once more with the
        image, when this client sent it before (see :class:`ResendOptions`).
        """
        if not isinstance(body, Mapping):
            return self._predict_once(model_name, body, input_name, model_version, timeout)
        return predict_resending(
            lambda request: self._predict_once(
                model_name, request, input_name, model_version, timeout
            ),
            body,
            self.sent_images,
        )

    def _predict_once(
        self,
        model_name: str,
        body: bytes | Mapping[str, Any],
        input_name: str,
        model_version: str | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        """One prediction, decoded; our handler's error body raises SamServeError."""
        raw = self.predict_raw(model_name, body, input_name, model_version, timeout)
        payload = decode_response(raw, f"predict({model_name!r})")
        _raise_handler_error(payload)
        if not isinstance(payload, dict):
            raise InvalidResponseError(
                "INVALID_JSON",
                f"predict({model_name!r}): expected a JSON object, got {type(payload).__name__}",
            )
        return payload

    # -- management API ----------------------------------------------------------------------

    def register_model(
        self,
        url: str,
        model_name: str | None = None,
        initial_workers: int = 1,
        synchronous: bool = True,
        timeout: float | None = DEFAULT_REGISTER_TIMEOUT,
        *,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        response_timeout: int | None = None,
        startup_timeout: int | None = None,
        handler: str | None = None,
    ) -> str:
        """Register a model archive; returns the server's status message.

        ``url`` is a name relative to the server's model store (``"sam.mar"``, or the directory
        of a ``--archive-format no-archive`` model), an absolute path on the server, or an
        http(s) URL matching ``allowed_urls``. ``file://`` URLs are *copied* into the model
        store and fail if a file of that name is already there. ``initial_workers`` must be
        at least 1 (gRPC treats 0 as "use default_workers_per_model").
        """
        if initial_workers < 1:
            raise ValueError(
                "initial_workers must be >= 1: TorchServe's gRPC API reads 0 as "
                "'unset' (default_workers_per_model)"
            )
        optional = {
            "model_name": model_name,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay,
            "response_timeout": response_timeout,
            "startup_timeout": startup_timeout,
            "handler": handler,
        }
        request = self.stubs.management_pb2.RegisterModelRequest(
            url=url,
            initial_workers=initial_workers,
            synchronous=synchronous,
            **{key: value for key, value in optional.items() if value is not None},
        )
        what = f"register_model({url!r})"
        response = self._call(
            self._management.RegisterModel, request, "management", timeout, what,
            translate=_register_error,
        )  # fmt: skip
        return str(response.msg)

    def list_models(
        self,
        limit: int = 100,
        next_page_token: int = 0,
        timeout: float | None = DEFAULT_MANAGEMENT_TIMEOUT,
    ) -> dict[str, Any]:
        """Registered models: ``{"models": [{"modelName": ..., "modelUrl": ...}, ...]}``.

        ``limit`` must be 1..1000 (0 would return nothing); the dict carries
        ``"nextPageToken"`` when there are more pages.
        """
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000 (0 returns nothing)")
        request = self.stubs.management_pb2.ListModelsRequest(
            limit=limit, next_page_token=next_page_token
        )
        response = self._call(
            self._management.ListModels, request, "management", timeout, "list_models"
        )
        payload = decode_response(response.msg, "list_models")
        if not isinstance(payload, dict):
            raise InvalidResponseError("INVALID_JSON", f"list_models: got {payload!r}")
        return payload

    def describe_model(
        self,
        model_name: str,
        model_version: str | None = None,
        customized: bool = False,
        timeout: float | None = DEFAULT_MANAGEMENT_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Model description, one dict per version (``model_version="all"`` for every one)."""
        request = self.stubs.management_pb2.DescribeModelRequest(
            model_name=model_name, model_version=model_version or "", customized=customized
        )
        what = f"describe_model({model_name!r})"
        response = self._call(self._management.DescribeModel, request, "management", timeout, what)
        payload = decode_response(response.msg, what)
        if not isinstance(payload, list):
            raise InvalidResponseError("INVALID_JSON", f"{what}: expected a list, got {payload!r}")
        return payload

    def scale_workers(
        self,
        model_name: str,
        min_worker: int,
        max_worker: int | None = None,
        synchronous: bool = True,
        model_version: str | None = None,
        timeout: float | None = DEFAULT_REGISTER_TIMEOUT,
    ) -> str:
        """Set a model's worker count; returns the server's status message.

        ``min_worker`` must be at least 1: over gRPC, 0 means "unset" and scales to 1 worker
        (use the REST API to scale to zero). ``max_worker`` defaults to ``min_worker``.
        """
        if min_worker < 1:
            raise ValueError(
                "min_worker must be >= 1: TorchServe's gRPC API reads 0 as 'unset' (1 worker); "
                "use the REST API to scale to zero"
            )
        if max_worker is not None and max_worker < min_worker:
            raise ValueError("max_worker must be >= min_worker")
        request = self.stubs.management_pb2.ScaleWorkerRequest(
            model_name=model_name,
            model_version=model_version or "",
            min_worker=min_worker,
            max_worker=max_worker if max_worker is not None else min_worker,
            synchronous=synchronous,
        )
        response = self._call(
            self._management.ScaleWorker,
            request,
            "management",
            timeout,
            f"scale_workers({model_name!r})",
        )
        return str(response.msg)

    def unregister_model(
        self,
        model_name: str,
        model_version: str | None = None,
        timeout: float | None = DEFAULT_MANAGEMENT_TIMEOUT,
    ) -> str:
        """Unregister a model (its default version unless ``model_version``); returns the
        server's status message."""
        if not model_name:
            raise ValueError("model_name is required")
        request = self.stubs.management_pb2.UnregisterModelRequest(
            model_name=model_name, model_version=model_version or ""
        )
        response = self._call(
            self._management.UnregisterModel,
            request,
            "management",
            timeout,
            f"unregister_model({model_name!r})",
        )
        return str(response.msg)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close both channels."""
        self._inference_channel.close()
        self._management_channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
