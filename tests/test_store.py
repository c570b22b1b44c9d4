"""The shared store (samserve.store, samserve.store_codec): the codec's checks, diskcache
in a temporary directory and a real redis-server, failures, and the URL grammar."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import RedisServer, free_port, needs_redis
from samserve import store_codec
from samserve.store import (
    DEFAULT_BACKOFF_S,
    DEFAULT_STORE_URL,
    DEFAULT_TIMEOUT_MS,
    DEFAULT_TTL_S,
    DISK_SHARE,
    STORE_URL_ENV,
    DiskStore,
    SharedStore,
    StoreOptions,
    model_identity,
    open_store,
    resolve_store_url,
)
from samserve.store_codec import EMBEDDING, LOGITS, Entry, EntrySpec, spec_of

MODEL = model_identity("sam_test", "0" * 64)
OTHER_MODEL = model_identity("sam_test", "1" * 64)
# Generous for calls that must succeed on a loaded machine; the failure tests set their own.
TIMEOUT_MS = 2000


def embedding_entry(seed: int = 0, side: int = 64) -> Entry:
    """An embedding entry as the engine stores it: 1x256xsidexside float32 and sizes."""
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((1, 256, side, side)).astype(np.float32)
    return Entry({"embedding": embedding}, {"input_size": (1024, 768), "original_size": (6, 4)})


def logits_entry(seed: int = 0) -> Entry:
    """A logits entry: 1x256x256 float32 and the id of its image."""
    logits = np.random.default_rng(seed).standard_normal((1, 256, 256)).astype(np.float32)
    return Entry({"logits": logits}, {"image_id": f"image-{seed}"})


EMBEDDING_SPEC = spec_of(embedding_entry())
LOGITS_SPEC = spec_of(logits_entry())
SMALL_SPEC = spec_of(embedding_entry(side=8))


def assert_same_entry(got: Entry | None, want: Entry) -> None:
    """``got`` has ``want``'s arrays bit for bit (dtype, shape, bytes) and its metadata."""
    assert got is not None
    assert got.meta == want.meta
    assert got.arrays.keys() == want.arrays.keys()
    for name, array in want.arrays.items():
        assert got.arrays[name].dtype == array.dtype
        assert got.arrays[name].shape == array.shape
        assert got.arrays[name].tobytes() == array.tobytes()


def disk_store(path: Path, max_mb: float = 64.0, model_id: str = MODEL) -> SharedStore:
    """A shared store on diskcache in ``path``."""
    options = StoreOptions(backend="disk", path=str(path), max_mb=max_mb, timeout_ms=TIMEOUT_MS)
    store = open_store(options, model_id)
    assert store is not None
    return store


def redis_store(server: RedisServer, auth: str = "", **query: float) -> SharedStore:
    """A shared store on ``server``, with the URL's query parameters ``query``."""
    query = {"timeout_ms": TIMEOUT_MS, **query}
    url = server.url("?" + "&".join(f"{name}={value}" for name, value in query.items()), auth)
    store = open_store(StoreOptions.from_url(url), MODEL)
    assert store is not None
    return store


# The codec.


def test_codec_round_trip_is_exact():
    """Arrays of several dtypes and layouts come back with their exact bits, writable."""
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)
    entry = Entry(
        {
            "embedding": embedding_entry().arrays["embedding"],
            "special": special,
            "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
            "strided": np.arange(20, dtype=np.int32)[::2],
            "mask": np.array([[True, False]]),
            "empty": np.zeros((0, 3), np.float16),
        },
        {"input_size": (np.int64(1024), 768), "original_size": (6, 4), "image_id": "x", "n": 3},
    )
    decoded = store_codec.decode_entry(
        store_codec.encode_entry(entry, MODEL, EMBEDDING), MODEL, EMBEDDING, spec_of(entry)
    )
    assert decoded.arrays["special"].tobytes() == special.tobytes()  # NaN bits and -0.0 too
    assert decoded.arrays["embedding"].tobytes() == entry.arrays["embedding"].tobytes()
    assert np.array_equal(decoded.arrays["big_endian"], entry.arrays["big_endian"])
    assert np.array_equal(decoded.arrays["strided"], entry.arrays["strided"])
    assert np.array_equal(decoded.arrays["mask"], entry.arrays["mask"])
    assert decoded.arrays["empty"].shape == (0, 3)
    assert decoded.meta == {
        "input_size": (1024, 768),
        "original_size": (6, 4),
        "image_id": "x",
        "n": 3,
    }
    for array in decoded.arrays.values():
        assert array.flags.writeable and array.flags.c_contiguous


def test_codec_views_without_copy_are_read_only():
    entry = embedding_entry()
    blob = store_codec.encode_entry(entry, MODEL, EMBEDDING)
    decoded = store_codec.decode_entry(blob, MODEL, EMBEDDING, EMBEDDING_SPEC, copy=False)
    assert not decoded.arrays["embedding"].flags.writeable
    assert_same_entry(decoded, entry)


def test_codec_rejects_every_mismatch():
    """Corrupted, truncated or foreign bytes and unexpected arrays raise InvalidEntry."""
    entry = embedding_entry()
    blob = store_codec.encode_entry(entry, MODEL, EMBEDDING)
    payload_byte = len(blob) // 2
    flipped = blob[:payload_byte] + bytes([blob[payload_byte] ^ 0x01]) + blob[payload_byte + 1 :]
    header_flip = blob[:30] + bytes([blob[30] ^ 0x20]) + blob[31:]
    cases = {
        "flipped payload byte": (flipped, MODEL, EMBEDDING, EMBEDDING_SPEC),
        "flipped header byte": (header_flip, MODEL, EMBEDDING, EMBEDDING_SPEC),
        "truncated by one": (blob[:-1], MODEL, EMBEDDING, EMBEDDING_SPEC),
        "truncated to half": (blob[: len(blob) // 2], MODEL, EMBEDDING, EMBEDDING_SPEC),
        "truncated to nothing": (b"", MODEL, EMBEDDING, EMBEDDING_SPEC),
        "other magic": (b"X" + blob[1:], MODEL, EMBEDDING, EMBEDDING_SPEC),
        "other version": (blob[:8] + b"\x09\x00" + blob[10:], MODEL, EMBEDDING, EMBEDDING_SPEC),
        "other model": (blob, OTHER_MODEL, EMBEDDING, EMBEDDING_SPEC),
        "other kind": (blob, MODEL, LOGITS, EMBEDDING_SPEC),
        "other shape": (
            blob,
            MODEL,
            EMBEDDING,
            EntrySpec({"embedding": ((1, 256, 32, 32), "float32")}, EMBEDDING_SPEC.meta),
        ),
        "other dtype": (
            blob,
            MODEL,
            EMBEDDING,
            EntrySpec({"embedding": ((1, 256, 64, 64), "float16")}, EMBEDDING_SPEC.meta),
        ),
        "another array expected": (
            blob,
            MODEL,
            EMBEDDING,
            EntrySpec({**EMBEDDING_SPEC.arrays, "extra": ((1,), "float32")}),
        ),
        "missing metadata": (
            blob,
            MODEL,
            EMBEDDING,
            EntrySpec(EMBEDDING_SPEC.arrays, {"image_id": "str"}),
        ),
        "metadata of another kind": (
            blob,
            MODEL,
            EMBEDDING,
            EntrySpec(EMBEDDING_SPEC.arrays, {"input_size": "int"}),
        ),
    }
    for case, args in cases.items():
        with pytest.raises(store_codec.InvalidEntry):
            store_codec.decode_entry(*args)
            pytest.fail(case)


def test_codec_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="cannot be stored"):
        store_codec.encode_entry(Entry({"x": np.array([object()])}), MODEL, EMBEDDING)
    with pytest.raises(ValueError, match="meta values"):
        store_codec.encode_entry(Entry({}, {"size": (1.5, 2)}), MODEL, EMBEDDING)
    with pytest.raises(ValueError, match="kind"):
        store_codec.encode_entry(Entry({}), MODEL, "other")
    with pytest.raises(ValueError, match="kind must be one of"):
        EntrySpec({}, {"size": "float"})


def test_forged_headers_are_invalid_never_an_error():
    """Headers changed at random, their checksum made valid again, decode to an entry
    or raise store_codec.InvalidEntry, never anything else."""
    rng = np.random.default_rng(1)
    entry = Entry({"logits": np.ones((1, 8, 8), np.float32)}, {"image_id": "image-0"})
    spec = spec_of(entry)
    blob = store_codec.encode_entry(entry, MODEL, LOGITS)
    header_end = blob.index(b"}]}") + 3
    outcomes = {"valid": 0, "invalid": 0}
    for _ in range(300):
        mutated = bytearray(blob[:-4])
        for index in rng.integers(0, header_end, int(rng.integers(1, 4))):
            mutated[index] = int(rng.integers(0, 256))
        mutated += zlib.crc32(mutated).to_bytes(4, "little")
        try:
            store_codec.decode_entry(bytes(mutated), MODEL, LOGITS, spec)
            outcomes["valid"] += 1
        except store_codec.InvalidEntry:
            outcomes["invalid"] += 1
    assert outcomes["invalid"] > 250


# Both backends.


def assert_round_trip(store: SharedStore) -> dict:
    """Put an embedding and a logits entry, read each back bit for bit (after a first
    miss), and check that an image id is not a logits id (one namespace per kind);
    returns the store's counters, closed."""
    entry, logits = embedding_entry(), logits_entry()
    assert store.get_embedding("image-0", EMBEDDING_SPEC) is None
    assert store.put_embedding("image-0", entry)
    assert store.put_logits("logits-0", logits)
    assert_same_entry(store.get_embedding("image-0", EMBEDDING_SPEC), entry)
    assert_same_entry(store.get_logits("logits-0", LOGITS_SPEC), logits)
    assert store.get_logits("image-0", LOGITS_SPEC) is None
    stats = store.stats()
    store.close()
    return stats


def test_disk_round_trip_is_exact(tmp_path: Path):
    stats = assert_round_trip(disk_store(tmp_path / "store"))
    assert (stats["hits"], stats["misses"], stats["writes"]) == (2, 2, 2)
    assert (stats["invalid"], stats["errors"], stats["skipped"]) == (0, 0, 0)
    assert stats["gets"] == 4 and stats["puts"] == 2
    assert stats["get_seconds"] > 0 and stats["put_seconds"] > 0
    assert stats["available"] is True


@needs_redis
def test_redis_round_trip_is_exact(redis_server: RedisServer):
    stats = assert_round_trip(redis_store(redis_server))
    assert (stats["hits"], stats["misses"], stats["writes"], stats["errors"]) == (2, 2, 2, 0)


@needs_redis
def test_redis_keys_have_the_ttl(redis_server: RedisServer):
    store = redis_store(redis_server, ttl_s=120)
    store.put_embedding("image-0", embedding_entry(side=8))
    store.put_logits("logits-0", logits_entry())
    client = redis_server.client()
    for key in (store.key(EMBEDDING, "image-0"), store.key(LOGITS, "logits-0")):
        assert 110_000 < client.pttl(key) <= 120_000
    client.close()


def test_default_ttl_and_timeout():
    options = StoreOptions.from_url("redis://cache.internal")
    assert (options.ttl_s, options.timeout_ms, options.backoff_s) == (
        DEFAULT_TTL_S,
        DEFAULT_TIMEOUT_MS,
        DEFAULT_BACKOFF_S,
    )


def test_other_model_is_a_miss(tmp_path: Path):
    """Another model's entries are in another namespace; copied into ours, they are
    invalid."""
    ours = disk_store(tmp_path / "store")
    theirs = disk_store(tmp_path / "store", model_id=OTHER_MODEL)
    theirs.put_embedding("image-0", embedding_entry())
    assert ours.key(EMBEDDING, "image-0") != theirs.key(EMBEDDING, "image-0")
    assert ours.get_embedding("image-0", EMBEDDING_SPEC) is None
    assert ours.stats()["misses"] == 1

    backend = ours._opened()
    blob = backend.get(theirs.key(EMBEDDING, "image-0"))
    backend.put(ours.key(EMBEDDING, "image-0"), blob)
    assert ours.get_embedding("image-0", EMBEDDING_SPEC) is None
    assert ours.stats()["invalid"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong shape"])
def test_damaged_entries_are_invalid_misses(tmp_path: Path, damage: str):
    store = disk_store(tmp_path / "store")
    store.put_embedding("image-0", embedding_entry())
    key = store.key(EMBEDDING, "image-0")
    backend = store._opened()
    blob = bytearray(backend.get(key))
    spec = EMBEDDING_SPEC
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x80
    elif damage == "truncate":
        del blob[-1000:]
    else:
        spec = EntrySpec({"embedding": ((1, 256, 32, 32), "float32")}, EMBEDDING_SPEC.meta)
    backend.put(key, bytes(blob))
    assert store.get_embedding("image-0", spec) is None
    stats = store.stats()
    assert (stats["invalid"], stats["hits"], stats["errors"]) == (1, 0, 0)
    # The encoder's next result replaces the damaged entry.
    store.put_embedding("image-0", embedding_entry())
    assert_same_entry(store.get_embedding("image-0", EMBEDDING_SPEC), embedding_entry())


# Sharing and bounds on one host.


def _child_reads_and_writes(path: str, queue) -> None:
    """In another process: read the parent's entry, write one back."""
    store = disk_store(Path(path))
    entry = store.get_embedding("from-parent", EMBEDDING_SPEC)
    same = entry is not None and (
        entry.arrays["embedding"].tobytes() == embedding_entry(1).arrays["embedding"].tobytes()
    )
    store.put_embedding("from-child", embedding_entry(2))
    store.close()
    queue.put(same)


def test_two_processes_share_the_disk_store(tmp_path: Path):
    path = tmp_path / "store"
    store = disk_store(path)
    store.put_embedding("from-parent", embedding_entry(1))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_reads_and_writes, args=(str(path), queue))
    child.start()
    try:
        assert queue.get(timeout=120) is True
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert_same_entry(store.get_embedding("from-child", EMBEDDING_SPEC), embedding_entry(2))


def test_disk_store_stays_within_its_bound_least_recently_read_first(tmp_path: Path):
    """Past the bound diskcache evicts the least recently read entries, one per write
    of an entry of the same size; the size stays within the bound, and an entry read
    after every write survives."""
    max_bytes = 4 * 2**20
    store = disk_store(tmp_path / "store", max_mb=max_bytes / 2**20)
    entry = logits_entry()  # a quarter MiB: the bound holds fifteen, with the index
    entry_bytes = len(store_codec.encode_entry(entry, MODEL, LOGITS))
    store.put_logits("kept", entry)
    sizes = []
    for index in range(60):
        store.put_logits(f"logits-{index}", entry)
        assert store.get_logits("kept", LOGITS_SPEC) is not None
        sizes.append(store._opened().volume())
    assert max(sizes) <= max_bytes
    assert min(sizes[30:]) >= max_bytes - 2 * entry_bytes  # evicted one by one
    # The least recently read entries went first; the newest are all there.
    present = [i for i in range(60) if store.get_logits(f"logits-{i}", LOGITS_SPEC)]
    assert present == list(range(60 - len(present), 60)) and len(present) >= 12
    assert len(list((tmp_path / "store").rglob("*.val"))) == len(present) + 1


def test_disk_store_bound_holds_for_entries_of_mixed_sizes(tmp_path: Path):
    """Entries larger than the ones they evict still leave the store within its bound."""
    max_bytes = 4 * 2**20
    store = disk_store(tmp_path / "store", max_mb=max_bytes / 2**20)
    for index in range(16):
        store.put_logits(f"logits-{index}", logits_entry())
    large = embedding_entry(side=32)  # a MiB: four logits' worth
    large_spec = spec_of(large)
    for index in range(8):
        assert store.put_embedding(f"image-{index}", large)
        assert store._opened().volume() <= max_bytes
    assert store.get_embedding("image-7", large_spec) is not None
    assert store.get_logits("logits-0", LOGITS_SPEC) is None


def test_default_disk_bound_fits_the_filesystem(tmp_path: Path):
    backend = DiskStore.from_options(StoreOptions(backend="disk", path=str(tmp_path / "s")))
    limit = backend._cache.size_limit
    assert 0 < limit <= shutil.disk_usage(tmp_path).total * DISK_SHARE
    assert limit <= 1024 * 2**20
    backend.close()


def test_disk_store_refuses_a_directory_others_can_write(tmp_path: Path, caplog):
    """A store directory anyone may write to could hold planted entries: not used, and
    the failure is an error like any other."""
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(0o777)
    store = disk_store(path)
    with caplog.at_level(logging.WARNING, logger="samserve.store"):
        assert store.get_embedding("image-0", SMALL_SPEC) is None
        assert store.put_embedding("image-0", embedding_entry(side=8)) is False
    assert "writable by no one else" in caplog.text
    stats = store.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 1


def test_store_is_thread_safe(tmp_path: Path):
    store = disk_store(tmp_path / "store")
    entries = [logits_entry(i) for i in range(4)]
    failures = []

    def work(worker: int) -> None:
        for round_ in range(10):
            index = (worker + round_) % 4
            store.put_logits(f"logits-{index}", entries[index])
            try:
                assert_same_entry(store.get_logits(f"logits-{index}", LOGITS_SPEC), entries[index])
            except AssertionError:
                failures.append((worker, round_))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    stats = store.stats()
    assert stats["writes"] == stats["puts"] == 40
    assert stats["hits"] == stats["gets"] == 40


# Failures: every call returns, and the store comes back.


@needs_redis
def test_redis_killed_gives_misses_one_warning_and_errors(redis_server: RedisServer, caplog):
    store = redis_store(redis_server, timeout_ms=200, backoff_s=0.3)
    store.put_embedding("image-0", embedding_entry(side=8))
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="samserve.store"):
        start = time.monotonic()
        assert store.get_embedding("image-0", SMALL_SPEC) is None
        assert time.monotonic() - start < 1.0
        # During the back-off calls return at once, without trying.
        start = time.monotonic()
        assert store.put_embedding("image-1", embedding_entry(side=8)) is False
        assert store.get_embedding("image-0", SMALL_SPEC) is None
        assert time.monotonic() - start < 0.1
        # After it, one more try fails, with no second warning.
        time.sleep(0.35)
        assert store.get_embedding("image-0", SMALL_SPEC) is None
    warnings = [r for r in caplog.records if r.name == "samserve.store"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "requests go on without it" in warnings[0].getMessage()
    stats = store.stats()
    assert (stats["errors"], stats["skipped"], stats["available"]) == (2, 2, False)
    assert (stats["hits"], stats["misses"], stats["writes"]) == (0, 0, 1)


@needs_redis
def test_redis_stalled_times_out(redis_server: RedisServer):
    """A server that stops answering costs one timeout, not a hung request."""
    store = redis_store(redis_server, timeout_ms=100, backoff_s=5)
    store.put_embedding("image-0", embedding_entry(side=8))
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert store.get_embedding("image-0", SMALL_SPEC) is None
        elapsed = time.monotonic() - start
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert 0.09 < elapsed < 1.0
    assert store.stats()["errors"] == 1


@needs_redis
def test_redis_restarted_is_used_again_after_the_back_off(redis_server: RedisServer, caplog):
    backoff_s = 0.3
    store = redis_store(redis_server, timeout_ms=200, backoff_s=backoff_s)
    redis_server.kill()
    with caplog.at_level(logging.INFO, logger="samserve.store"):
        assert store.put_embedding("image-0", embedding_entry(side=8)) is False
        redis_server.start()
        failed_at = time.monotonic()
        # Within the back-off the store is left alone even though it is back.
        assert store.put_embedding("image-0", embedding_entry(side=8)) is False
        deadline = failed_at + backoff_s + 5
        while not store.put_embedding("image-0", embedding_entry(side=8)):
            assert time.monotonic() < deadline, "the store was not used again"
            time.sleep(0.05)
        assert time.monotonic() - failed_at >= backoff_s * 0.9
    assert_same_entry(store.get_embedding("image-0", SMALL_SPEC), embedding_entry(side=8))
    messages = [r.getMessage() for r in caplog.records if r.name == "samserve.store"]
    assert len(messages) == 2 and "available again" in messages[1]
    assert store.stats()["available"] is True


@needs_redis
def test_redis_password_in_the_url(tmp_path: Path):
    server = RedisServer(tmp_path, "--requirepass", "s3cret/pw")
    server.start()
    try:
        store = redis_store(server, auth=":s3cret%2Fpw@")
        assert store.put_embedding("image-0", embedding_entry(side=8))
        assert_same_entry(store.get_embedding("image-0", SMALL_SPEC), embedding_entry(side=8))
        assert "s3cret" not in store.name and "***" in store.name

        wrong = redis_store(server, auth=":wrong@")
        assert wrong.get_embedding("image-0", SMALL_SPEC) is None
        assert wrong.stats()["errors"] == 1
    finally:
        server.kill()


@needs_redis
def test_redis_acl_user_in_the_url(tmp_path: Path):
    server = RedisServer(tmp_path, "--user", "alice", "on", ">secret", "~samserve:*", "+@all")
    server.start()
    try:
        store = redis_store(server, auth="alice:secret@")
        assert store.put_logits("logits-0", logits_entry())
        assert_same_entry(store.get_logits("logits-0", LOGITS_SPEC), logits_entry())
        assert store.name.startswith("redis://alice:***@")
    finally:
        server.kill()


@needs_redis
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_rediss_with_a_ca_file(tmp_path: Path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server = RedisServer(tmp_path)
    tls_port = free_port()
    server.args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert))
    server.args += ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert))
    server.args += ("--tls-auth-clients", "no")
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}&timeout_ms={TIMEOUT_MS}"
        store = open_store(StoreOptions.from_url(url), MODEL)
        assert store.put_embedding("image-0", embedding_entry(side=8))
        assert_same_entry(store.get_embedding("image-0", SMALL_SPEC), embedding_entry(side=8))
        # Without the CA the server's certificate is refused: an error, not a hang.
        url = f"rediss://127.0.0.1:{tls_port}/0?timeout_ms={TIMEOUT_MS}"
        untrusting = open_store(StoreOptions.from_url(url), MODEL)
        assert untrusting.get_embedding("image-0", SMALL_SPEC) is None
        assert untrusting.stats()["errors"] == 1
    finally:
        server.kill()


# Configuration.


def test_none_is_no_store():
    assert open_store(StoreOptions.from_url(" None "), MODEL) is None


def test_disk_urls():
    default = StoreOptions.from_url("disk://")
    assert (default.backend, default.path, default.max_mb) == ("disk", None, None)
    assert default.timeout_ms == DEFAULT_TIMEOUT_MS
    options = StoreOptions.from_url("disk:///dev/shm/sam%20store?max_mb=512&timeout_ms=20")
    assert (options.path, options.max_mb, options.timeout_ms) == ("/dev/shm/sam store", 512, 20)
    assert StoreOptions.from_url(DEFAULT_STORE_URL).backend == "disk"


def test_redis_urls():
    options = StoreOptions.from_url(
        "redis://alice:p%40ss@cache.internal:6380/3?ttl_s=60&timeout_ms=5&backoff_s=0"
    )
    assert (options.host, options.port, options.db) == ("cache.internal", 6380, 3)
    assert (options.username, options.password) == ("alice", "p@ss")
    assert (options.ttl_s, options.timeout_s, options.backoff_s, options.tls) == (
        60,
        0.005,
        0,
        False,
    )
    assert "p@ss" not in repr(options)
    assert options.describe() == "redis://alice:***@cache.internal:6380/3"
    only_password = StoreOptions.from_url("redis://:pw@localhost")
    assert (only_password.username, only_password.password) == (None, "pw")
    assert (only_password.port, only_password.db) == (6379, 0)
    tls = StoreOptions.from_url("rediss://[::1]:7000?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none")
    assert (tls.tls, tls.host, tls.ssl_ca_certs, tls.ssl_cert_reqs) == (
        True,
        "::1",
        "/etc/ca.pem",
        "none",
    )
    assert tls.describe() == "rediss://[::1]:7000/0"


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "empty"),
        ("memcached://host", "expected none, disk://"),
        ("redis:host", "expected none, disk://"),
        ("disk://host/path", "host part 'host'"),
        ("disk://?max_mb=abc", "max_mb='abc' is not a number"),
        ("disk://?max_mb=0", "max_mb must be a positive number"),
        ("disk://?max_mb=1&max_mb=2", "max_mb given twice"),
        ("disk://?ttl_s=5", "unknown query parameter 'ttl_s'"),
        ("redis://host:abc", "port in 'host:abc'"),
        ("redis://host:99999", "port in 'host:99999'"),
        ("redis://host/zero", "database 'zero'"),
        ("redis://host?timeout_ms=-1", "timeout_ms must be a positive number"),
        ("redis://host?ttl_s=inf", "ttl_s must be a positive number"),
        ("redis://host?ssl_ca_certs=/ca.pem", "needs a rediss:// URL"),
        ("rediss://host?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("redis://host?ttl=5", "unknown query parameter 'ttl'"),
        ("redis://host#x", "fragment"),
    ],
)
def test_bad_urls_name_the_bad_part(url: str, message: str):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        StoreOptions.from_url(url)


def test_bad_urls_never_show_a_password_or_much_of_the_url():
    secret = "hunter2-" + "x" * 200
    with pytest.raises(ValueError) as error:
        StoreOptions.from_url(f"redis://bob:{secret}@host:badport")
    assert "hunter2" not in str(error.value)
    with pytest.raises(ValueError) as error:
        StoreOptions.from_url(f"ftp://bob:{secret}@host/" + "y" * 500)
    assert "hunter2" not in str(error.value) and len(str(error.value)) < 200


def test_options_check_their_fields():
    with pytest.raises(ValueError, match="backend must be one of"):
        StoreOptions(backend="lmdb")
    with pytest.raises(ValueError, match="must be absolute"):
        StoreOptions(backend="disk", path="relative/dir")


def test_resolve_store_url():
    assert resolve_store_url(None, {}) == DEFAULT_STORE_URL
    assert resolve_store_url("none", {}) == "none"
    assert resolve_store_url("none", {STORE_URL_ENV: "redis://h"}) == "redis://h"
    assert resolve_store_url("disk://", {STORE_URL_ENV: "  "}) == "disk://"


def test_model_identity():
    assert model_identity("sam_vit_b", "ab") == model_identity("sam_vit_b", "ab")
    assert model_identity("sam_vit_b", "ab") != model_identity("sam_vit_ba", "b")
    assert len(model_identity("x")) == 32


def test_import_opens_nothing():
    """Importing the module neither imports the clients nor touches the store."""
    code = (
        "import sys, samserve.store; "
        "print(sorted(m for m in ('redis', 'diskcache') if m in sys.modules))"
    )
    env = {**os.environ, STORE_URL_ENV: "redis://127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
