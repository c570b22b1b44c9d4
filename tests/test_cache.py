"""Tests for samserve.cache.LRUCache, checked against a reference model where it helps."""

from __future__ import annotations

import random
import sys
import threading
from collections import OrderedDict

import pytest

from samserve.cache import CacheStats, LRUCache


def make(max_bytes: int) -> LRUCache[bytes]:
    return LRUCache(max_bytes, len)


def value(size: int, fill: int = 0) -> bytes:
    return bytes([fill % 256]) * size


def contents_bytes(cache: LRUCache[bytes], keys) -> int:
    """Total size of the values present (reading them moves counters: snapshot first)."""
    return sum(len(cache.get(k)) for k in keys if k in cache)


def test_new_cache_is_empty():
    cache = make(100)
    assert len(cache) == 0
    assert cache.stats() == CacheStats(0, 0, 0, 0, 0, 100)


def test_negative_bound_is_rejected():
    with pytest.raises(ValueError):
        make(-1)


def test_get_returns_what_was_put_and_counts_hits_and_misses():
    cache = make(100)
    assert cache.put("a", value(10, 1)) is True
    assert cache.put("b", value(20, 2)) is True
    assert cache.get("a") == value(10, 1)
    assert cache.get("a") == value(10, 1)
    assert cache.get("b") == value(20, 2)
    assert cache.get("missing") is None
    assert cache.stats() == CacheStats(
        hits=3, misses=1, evictions=0, entries=2, bytes=30, max_bytes=100
    )


def test_least_recently_put_is_evicted_first():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    cache.put("d", value(10))
    assert "a" not in cache
    assert all(k in cache for k in "bcd")
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (1, 3, 30)


def test_get_refreshes_recency_so_another_entry_is_evicted():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    assert cache.get("a") is not None  # "a" is now the most recent; "b" the least
    cache.put("d", value(10))
    assert "b" not in cache
    assert all(k in cache for k in "acd")
    cache.put("e", value(10))  # next in line: "c"
    assert "c" not in cache
    assert all(k in cache for k in "ade")
    assert cache.stats().evictions == 2


def test_put_evicts_as_many_entries_as_needed():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    assert cache.put("big", value(25)) is True
    assert [k for k in "abc" if k in cache] == []
    stats = cache.stats()
    assert (stats.evictions, stats.entries, stats.bytes) == (3, 1, 25)


def test_value_of_exactly_the_bound_is_stored():
    cache = make(30)
    cache.put("a", value(10))
    assert cache.put("full", value(30)) is True
    assert "full" in cache and "a" not in cache
    assert cache.stats().bytes == 30


def test_contains_changes_neither_counters_nor_recency():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    before = cache.stats()
    assert "a" in cache
    assert "zzz" not in cache
    assert cache.stats() == before
    cache.put("d", value(10))  # "a" was not refreshed by ``in``: it is evicted
    assert "a" not in cache
    assert "b" in cache


def test_too_large_value_is_not_stored_and_cache_is_unchanged():
    cache = make(30)
    cache.put("a", value(10))
    cache.put("b", value(10))
    before = cache.stats()
    assert cache.put("huge", value(31)) is False
    assert "huge" not in cache
    assert "a" in cache and "b" in cache
    assert cache.stats() == before  # nothing evicted to make room that was never enough


def test_zero_bound_stores_nothing_with_a_size():
    cache = make(0)
    assert cache.put("a", value(1)) is False
    assert len(cache) == 0
    assert cache.stats().bytes == 0


def test_re_put_of_a_key_replaces_value_and_size():
    cache = make(100)
    cache.put("a", value(10, 1))
    cache.put("b", value(10, 2))
    assert cache.put("a", value(25, 3)) is True
    assert cache.get("a") == value(25, 3)
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 35, 0)
    assert cache.put("a", value(5, 4)) is True  # shrinking works too
    assert cache.stats().bytes == 15


def test_re_put_makes_the_key_most_recent():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    cache.put("a", value(10))
    cache.put("d", value(10))
    assert "a" in cache
    assert "b" not in cache


def test_re_put_that_needs_room_does_not_evict_itself():
    cache = make(30)
    for key in "abc":
        cache.put(key, value(10))
    assert cache.put("c", value(20)) is True  # frees its own 10, then evicts "a" only
    assert cache.get("c") == value(20)
    assert "a" not in cache and "b" in cache
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 30, 1)


def test_too_large_re_put_leaves_no_stale_value_and_consistent_bytes():
    cache = make(30)
    cache.put("a", value(10, 1))
    cache.put("b", value(10, 2))
    assert cache.put("a", value(31, 3)) is False
    assert cache.get("a") is None  # neither the new value nor a stale old one
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (1, 10)
    assert cache.get("b") == value(10, 2)


def test_byte_bound_holds_after_many_puts():
    rng = random.Random(0)
    cache = make(1000)
    keys = [f"k{i}" for i in range(60)]
    for step in range(3000):
        cache.put(rng.choice(keys), value(rng.randint(0, 300), step))
        stats = cache.stats()
        assert stats.bytes <= 1000
        assert stats.entries == len(cache) == sum(k in cache for k in keys)
        if step % 100 == 0:
            assert stats.bytes == contents_bytes(cache, keys)
    assert cache.stats().evictions > 0


def test_matches_a_reference_lru_model_exactly():
    rng = random.Random(1)
    max_bytes = 500
    cache = make(max_bytes)
    model: OrderedDict[str, int] = OrderedDict()
    hits = misses = evictions = 0
    keys = [f"k{i}" for i in range(25)]
    for _ in range(5000):
        key = rng.choice(keys)
        if rng.random() < 0.5:
            got = cache.get(key)
            if key in model:
                model.move_to_end(key)
                hits += 1
                assert got is not None and len(got) == model[key]
            else:
                misses += 1
                assert got is None
        else:
            size = rng.choice([0, 1, 50, 120, 200, 499, 500, 501])
            model.pop(key, None)
            stored = size <= max_bytes
            if stored:
                while sum(model.values()) + size > max_bytes:
                    model.popitem(last=False)
                    evictions += 1
                model[key] = size
            assert cache.put(key, value(size)) is stored
        # Same keys; recency order shows in which keys later evictions pick.
        assert [k for k in keys if k in cache] == [k for k in keys if k in model]
        assert cache.stats() == CacheStats(
            hits, misses, evictions, len(model), sum(model.values()), max_bytes
        )


def test_size_of_is_what_counts():
    cache: LRUCache[list[int]] = LRUCache(10, lambda v: 4 * len(v))
    assert cache.put("a", [1, 2]) is True  # 8 bytes
    assert cache.put("b", [1]) is True  # 4 bytes: "a" must go
    assert "a" not in cache
    assert cache.stats().bytes == 4
    assert cache.put("c", [1, 2, 3]) is False  # 12 > 10


def test_concurrent_puts_and_gets_keep_stats_consistent():
    max_bytes = 2000
    cache = make(max_bytes)
    keys = [f"k{i}" for i in range(40)]
    threads_count, ops = 8, 3000
    gets = [0] * threads_count
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def work(index: int) -> None:
        rng = random.Random(index)
        try:
            start.wait()
            for step in range(ops):
                key = rng.choice(keys)
                if rng.random() < 0.5:
                    got = cache.get(key)
                    gets[index] += 1
                    assert got is None or isinstance(got, bytes)
                else:
                    cache.put(key, value(rng.randint(1, 400), step))
                if step % 100 == 0:
                    assert cache.stats().bytes <= max_bytes
        except BaseException as err:  # reported to the main thread
            errors.append(err)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        sys.setswitchinterval(switch)

    assert errors == []
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(gets)  # no lost counter updates
    assert stats.hits > 0 and stats.misses > 0 and stats.evictions > 0
    assert stats.bytes <= max_bytes
    assert stats.bytes == contents_bytes(cache, keys)
    assert stats.entries == len(cache) == sum(k in cache for k in keys)


@pytest.mark.parametrize(
    "operation",
    [
        lambda c: c.get("a"),
        lambda c: c.put("b", b"xy"),
        lambda c: "a" in c,
        len,
        lambda c: c.stats(),
    ],
    ids=["get", "put", "contains", "len", "stats"],
)
def test_every_operation_takes_the_lock(operation):
    # White-box: under the GIL a missing lock rarely shows as a race, so check that each
    # operation waits while the cache's lock is held by someone else.
    cache = make(100)
    cache.put("a", b"x")
    done = threading.Event()

    def run() -> None:
        operation(cache)
        done.set()

    with cache._lock:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert not done.wait(0.05)  # blocked on the lock
    assert done.wait(5)
    thread.join(5)
