"""Recover a request by ``image_id`` that reached a worker without the image.

Each TorchServe worker has its own embedding cache, and TorchServe hands requests to its
workers with no affinity: with several workers, a click by ``image_id`` may reach one
that never saw the image and be answered 404 ``image_not_cached`` (as after an eviction).
A client that sent the image itself still has its bytes here, and sends the request once
more with the image attached. Idle workers take requests in turn, so the worker that
lacked the image would get the next click by ``image_id`` too: the image also goes with
the next few requests on it, until every worker is likely to have it.

A ``mask_input`` (a ``logits_id``) lives in the cache of the worker that answered the
click before; another worker answers 404 ``logits_not_cached``. The logits never reach
the client, so they cannot be resent: the request can only go again without them, which
gives a mask from the prompt's points and box alone. That is a different answer, so it
is done only when asked for (``ResendOptions.drop_missing_mask_input``).
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SamServeError

logger = logging.getLogger(__name__)

IMAGE_NOT_CACHED = "image_not_cached"
LOGITS_NOT_CACHED = "logits_not_cached"
# Fields that say how the server reads an image: its image_id depends on them, so they go
# with every resent copy of it.
READING_FIELDS = ("page", "intensity_range")


@dataclass(frozen=True)
class ResendOptions:
    """How a client recovers requests that reached a worker without their image or logits.

    Attributes:
      memory_bytes: byte bound of the images the client keeps (base64, by image_id) to
        resend; 0 keeps none and resends nothing.
      attach_after_resend: requests on an image that carry it along after it had to be
        resent, so that each worker that lacks it gets it once; at least the number of
        workers less one.
      drop_missing_mask_input: answer a request whose ``mask_input`` another worker holds
        by sending it again without its ``mask_input`` (a mask from points and box alone),
        instead of raising ``logits_not_cached``.
    """

    memory_bytes: int = 64 * 1024 * 1024
    attach_after_resend: int = 3
    drop_missing_mask_input: bool = False


class SentImages:
    """The images a client sent, by image_id, in a byte-bounded LRU (thread-safe)."""

    def __init__(self, options: ResendOptions) -> None:
        self.options = options
        self.resends = 0  # requests sent again with their image: each answered image_not_cached
        self._images: OrderedDict[str, str] = OrderedDict()
        self._readings: dict[str, dict[str, Any]] = {}
        self._attach: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes of the base64 images held."""
        return self._bytes

    def remember(
        self, image_id: Any, image: str | bytes | None, reading: Mapping[str, Any] | None = None
    ) -> None:
        """Keep ``image`` (base64 text, a data URL, or raw bytes) under ``image_id``.

        Arguments:
          image_id: the id the server answered for the image.
          image: what was sent; nothing is kept for None or when it alone passes the bound.
          reading: the request's ``READING_FIELDS`` it was sent with (page, intensity range).
        """
        if not isinstance(image_id, str) or image is None:
            return
        text = base64.b64encode(image).decode("ascii") if isinstance(image, bytes) else image
        if len(text) > self.options.memory_bytes:
            return
        with self._lock:
            if image_id in self._images:
                self._images.move_to_end(image_id)
                return
            self._images[image_id] = text
            if reading:
                self._readings[image_id] = dict(reading)
            self._bytes += len(text)
            while self._bytes > self.options.memory_bytes:
                old_id, old = self._images.popitem(last=False)
                self._attach.pop(old_id, None)
                self._readings.pop(old_id, None)
                self._bytes -= len(old)

    def image(self, image_id: str) -> str | None:
        """The base64 image sent under ``image_id``, or None."""
        with self._lock:
            if image_id not in self._images:
                return None
            self._images.move_to_end(image_id)
            return self._images[image_id]

    def prepare(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """``body`` with its image attached while the image is still being spread over
        the workers after a resend; else ``body`` itself."""
        image_id = body.get("image_id")
        if "image" in body or not isinstance(image_id, str):
            return body
        with self._lock:
            left = self._attach.get(image_id, 0)
            if left <= 0:
                return body
            self._attach[image_id] = left - 1
            image = self._images.get(image_id)
        return self._with_image(body, image) if image is not None else body

    def _with_image(self, body: Mapping[str, Any], image: str) -> dict[str, Any]:
        """``body`` (a request by ``image_id``) with ``image`` attached, read as it was
        when it was sent."""
        return {**body, "image": image, **self._readings.get(body["image_id"], {})}

    def recover(self, body: Mapping[str, Any], error: SamServeError) -> Mapping[str, Any] | None:
        """The request to send after ``body`` was answered ``error``, or None to raise it.

        Arguments:
          body: the JSON request that failed.
          error: the server's answer.

        Returns:
          ``body`` with its image attached (``image_not_cached``, when the image is here),
          or without its prompts' ``mask_input`` (``logits_not_cached``, when the options
          allow it); None otherwise.
        """
        if error.code == IMAGE_NOT_CACHED and "image" not in body:
            image = self.image(body.get("image_id")) if body.get("image_id") else None
            if image is None:
                return None
            with self._lock:
                self.resends += 1
                self._attach[body["image_id"]] = self.options.attach_after_resend
            return self._with_image(body, image)
        if error.code == LOGITS_NOT_CACHED and self.options.drop_missing_mask_input:
            prompts = body.get("prompts")
            if not isinstance(prompts, list) or not any("mask_input" in p for p in prompts):
                return None
            logger.warning("logits_not_cached: sending the prompts again without mask_input")
            stripped = [{k: v for k, v in p.items() if k != "mask_input"} for p in prompts]
            return {**body, "prompts": stripped}
        return None


def predict_resending(
    send: Callable[[Mapping[str, Any]], dict[str, Any]],
    body: Mapping[str, Any],
    sent: SentImages,
) -> dict[str, Any]:
    """``send(body)``, recovering once from each of ``image_not_cached`` and
    ``logits_not_cached`` as ``sent`` allows, and keeping the image it carried.

    Arguments:
      send: sends one JSON request and returns the decoded response; raises SamServeError.
      body: the JSON request.
      sent: the client's images and options.

    Returns:
      The response to the request (or to its recovered form).
    """
    request = sent.prepare(body)
    recovered: set[Any] = set()
    while True:
        try:
            response = send(request)
            break
        except SamServeError as error:
            retry = None if error.code in recovered else sent.recover(request, error)
            if retry is None:
                raise
            recovered.add(error.code)
            request = retry
    reading = {name: request[name] for name in READING_FIELDS if request.get(name) is not None}
    sent.remember(response.get("image_id"), request.get("image"), reading)
    return response
