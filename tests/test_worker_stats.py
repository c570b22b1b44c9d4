"""Tests for samserve.worker_stats: every worker's counters, published and read back."""

from __future__ import annotations

import os
import subprocess
import sys

from samserve.worker_stats import collect, publish, summed


def test_published_counters_of_running_workers_are_collected(tmp_path):
    publish(tmp_path, os.getpid(), {"encoder_runs": 2, "embedding_cache": {"hits": 5}})
    publish(tmp_path, os.getppid(), {"encoder_runs": 1, "embedding_cache": {"hits": 1}})
    workers = collect(tmp_path)
    assert sorted(w["pid"] for w in workers) == sorted([os.getpid(), os.getppid()])
    assert summed(workers) == {"encoder_runs": 3, "embedding_cache": {"hits": 6}}


def test_a_worker_that_has_exited_is_forgotten(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    publish(tmp_path, int(gone.stdout), {"encoder_runs": 7})
    publish(tmp_path, os.getpid(), {"encoder_runs": 1})
    assert [w["pid"] for w in collect(tmp_path)] == [os.getpid()]
    assert not (tmp_path / f"{int(gone.stdout)}.json").exists()


def test_publishing_again_replaces_a_workers_counters(tmp_path):
    publish(tmp_path, os.getpid(), {"encoder_runs": 1})
    publish(tmp_path, os.getpid(), {"encoder_runs": 4})
    assert collect(tmp_path) == [{"pid": os.getpid(), "encoder_runs": 4}]
    assert not list(tmp_path.glob(".*.tmp"))


def test_sums_leave_out_names_and_flags():
    workers = [
        {"pid": 1, "device": "cpu", "shared_store": {"store": "disk://", "available": True,
                                                     "hits": 2, "get_seconds": 0.5}},
        {"pid": 2, "device": "cpu", "shared_store": {"store": "disk://", "available": False,
                                                     "hits": 3, "get_seconds": 0.25}},
    ]  # fmt: skip
    assert summed(workers) == {"shared_store": {"hits": 5, "get_seconds": 0.75}}
    assert summed([]) == {}
