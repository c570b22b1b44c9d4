"""Every worker's counters in one report: each worker of a model publishes its own to a
directory the model's workers share, and whichever worker answers a describe call reads
them all.

TorchServe sends a describe call to one worker, which otherwise knows only its own cache;
with several workers (or a shared store) the counters that matter are the sums.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A worker's counters, as ``SegmentService.stats`` makes them (nested dicts of numbers).
Stats = Mapping[str, Any]


def publish(directory: Path, pid: int, stats: Stats) -> None:
    """Write one worker's ``stats`` as ``<pid>.json`` in ``directory``, whole or not at
    all (a reader never sees half a file).

    Arguments:
      directory (Path): the directory the model's workers share (made if missing).
      pid (int): the worker's process id.
      stats (Stats): its counters, JSON-serialisable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{pid}.json.tmp"
    partial.write_text(json.dumps({"pid": pid, **stats}))
    os.replace(partial, directory / f"{pid}.json")


def collect(directory: Path) -> list[dict[str, Any]]:
    """The published counters of every worker still running, by pid; the files of
    workers that have exited are removed.

    Returns:
      (list(dict)): one worker's counters each (with its ``pid``), in pid order.
    """
    workers = []
    for path in sorted(directory.glob("*.json"), key=lambda p: int(p.stem)):
        pid = int(path.stem)
        if not _running(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            workers.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced or removed while read: next report has it
            continue
    return workers


def summed(workers: list[Stats]) -> dict[str, Any]:
    """The workers' counters added up, key by key: numbers are summed (bounds such as
    ``max_bytes`` too, which gives the model's total), nested mappings summed alike, and
    everything else (names, flags) left out."""
    total: dict[str, Any] = {}
    for stats in workers:
        for key, value in stats.items():
            if key == "pid":
                continue
            if isinstance(value, Mapping):
                total[key] = summed([total.get(key, {}), value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (this user's or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
