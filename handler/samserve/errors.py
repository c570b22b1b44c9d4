"""The one error type a request can fail with, carrying what the client is told."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be served as sent: an HTTP status, a stable code, a message.

    ``code`` is part of the public protocol (clients branch on it); ``message`` says
    what was wrong and what to do about it.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The response body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}
