"""The one error type a request can fail with, carrying what the client is told, and the
one way its messages quote what the client sent."""

from __future__ import annotations

import reprlib
from typing import Any

# The longest quotation of a client's value, in characters.
MAX_QUOTE_CHARS = 200
# The longest message an error carries, in UTF-8 bytes: a backstop behind ``quote``, so
# that no message (whatever builds it) can make an error reply large.
MAX_MESSAGE_BYTES = 1024


def _short_repr() -> reprlib.Repr:
    """A ``reprlib.Repr`` that shows a few items of each container and the ends of long
    strings and numbers."""
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxlist = short.maxtuple = 6
    short.maxdict = short.maxset = short.maxfrozenset = 4
    short.maxstring = 128  # ids (image_id, logits_id: at most 128) are quoted whole
    short.maxlong = 40
    short.maxother = 40
    return short


_SHORT = _short_repr()


def quote(value: Any) -> str:
    """A short, printable quotation of a value a client sent, for an error message.

    Containers show their first items and their length, strings and numbers their ends:
    a 4-million-number list is quoted as ``[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, ...] (4000000
    items)``. The quotation is a ``repr``, so control characters and lone surrogates are
    escaped and it is always valid UTF-8.

    Arguments:
      value (Any): a decoded JSON value (or any Python object).

    Returns:
      (str): at most ``MAX_QUOTE_CHARS`` characters, and the length of a long value.
    """
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__} too long to print>"
    if len(text) > MAX_QUOTE_CHARS:  # nested containers multiply reprlib's bounds
        text = text[: MAX_QUOTE_CHARS - 3] + "..."
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _SHORT.maxlist:
        text += f" ({len(value)} items)"
    elif isinstance(value, str) and len(value) > _SHORT.maxstring:
        text += f" ({len(value)} characters)"
    return text


def capped(message: str) -> str:
    """``message`` as valid UTF-8 of at most ``MAX_MESSAGE_BYTES`` bytes, cut with '...'.

    Lone surrogates (from JSON ``"\\ud800"``) become backslash escapes: a JSON encoder
    refuses them, and one unencodable reply would fail its whole TorchServe batch.
    """
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return data.decode("utf-8")
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


class RequestError(Exception):
    """A request that cannot be served as sent: an HTTP status, a stable code, a message.

    ``code`` is part of the public protocol (clients branch on it); ``message`` says
    what was wrong and what to do about it, quoting client values through ``quote``,
    and is ``capped`` whatever it quotes.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        message = capped(message)
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The response body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}
