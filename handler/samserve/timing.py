"""Stage timings of a request, gathered by one helper instead of a parameter on every call.

The service opens ``timed_stages`` around the work of a request (on the thread that does
it); the code it calls marks its stages with ``stage``, which costs nothing when no one
is collecting. The stages reach the client in ``timing_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_stages: ContextVar[dict[str, float] | None] = ContextVar("samserve_stages", default=None)


def ms_since(tic: float) -> float:
    """Milliseconds since ``tic``, a ``time.perf_counter()`` reading."""
    return (time.perf_counter() - tic) * 1000.0


@contextmanager
def timed_stages(stages: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Collect the milliseconds of every ``stage`` entered on this thread inside the block.

    Arguments:
      stages (dict(str, float) or None): where to add them (a fresh dict when None).

    Returns:
      (dict(str, float)): milliseconds by stage name, summed over repeated stages.
    """
    collected: dict[str, float] = {} if stages is None else stages
    token = _stages.set(collected)
    try:
        yield collected
    finally:
        _stages.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the block's milliseconds to stage ``name`` of the enclosing ``timed_stages``."""
    stages = _stages.get()
    tic = time.perf_counter()
    try:
        yield
    finally:
        if stages is not None:
            stages[name] = stages.get(name, 0.0) + ms_since(tic)
