"""Exceptions shared by the samserve clients (REST and gRPC).

Every error a client raises about the server is a :class:`SamServeError` with ``.code`` and
``.message``:

* errors reported by our handler (``{"error": {"code": ..., "message": ...}}`` in the body)
  raise :class:`SamServeError` itself, with the handler's code;
* transport/server errors raise one of the subclasses below. ``code`` is then the HTTP status
  (REST) or the gRPC status name such as ``"NOT_FOUND"`` (gRPC).
"""

from __future__ import annotations


class SamServeError(Exception):
    """An error reported by samserve: our handler's error body, or a server/transport error."""

    def __init__(self, code: int | str | None, message: str, *, status: int | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status  # HTTP status where there is one (REST); None over gRPC

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.code is not None else self.message


class AuthError(SamServeError):
    """Token authorization refused the call (missing, wrong or expired key; wrong API's key)."""


class ModelApiDisabledError(SamServeError):
    """Registering/unregistering is off: start TorchServe with ``enable_model_api=true``."""


class ModelNotFoundError(SamServeError):
    """No such model (or model version) is registered, or no archive at the given url."""


class ServerUnavailableError(SamServeError):
    """The server cannot be reached (not started, wrong host/port, connection dropped)."""


class PredictionFailedError(SamServeError):
    """The model worker failed on the request (handler exception, worker died, no worker)."""


class PayloadTooLargeError(SamServeError):
    """Request or response above the server's max_request_size/max_response_size or the
    client's message limit."""


class RequestTimeoutError(SamServeError):
    """The call did not finish within its deadline."""


class InvalidResponseError(SamServeError):
    """The server answered something the client cannot decode (e.g. not JSON)."""
