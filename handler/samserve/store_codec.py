"""The bytes of one shared-store entry: named arrays and small metadata, checked on read.

An entry is written as (integers little-endian)::

    prefix   MAGIC, format version (u16), reserved (u16), header length (u32)
    header   UTF-8 JSON: model identity, kind, metadata, and each array's name, dtype,
             shape, offset (from the payload's start) and size in bytes
    payload  from the first multiple of ALIGNMENT after the header: the arrays' bytes in
             C order, each starting at a multiple of ALIGNMENT
    trailer  CRC-32 (zlib) of everything before it (u32)

Arrays keep their dtype and bytes exactly (no lossy encoding), and reading one is a view
of the payload plus at most one copy. ``decode_entry`` raises ``InvalidEntry`` for any
entry that is not exactly what the caller expects; nothing is unpickled, so bytes from
the store can never run code. The checksum finds corruption and truncation; it is not a
signature: whoever can write to the store can write a valid entry, so access to the
store itself (password, TLS, a private tmpfs) is the security boundary.
"""

from __future__ import annotations

import json
import math
import numbers
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"SAMSTORE"
FORMAT_VERSION = 1
# Kinds of entries, one key namespace each: embeddings by image_id, low-res logits kept
# for mask_input by logits_id.
EMBEDDING = "embedding"
LOGITS = "logits"
KINDS = (EMBEDDING, LOGITS)
# Arrays start at multiples of a cache line so views of the payload are aligned for any dtype.
ALIGNMENT = 64
# A header is a few hundred bytes; a larger length read from the store means corruption.
MAX_HEADER_BYTES = 64 * 1024

_PREFIX = struct.Struct("<8sHHI")
_TRAILER = struct.Struct("<I")
# The metadata kinds an EntrySpec may ask for, and the Python types that hold them.
META_KINDS = ("int", "str", "pair")

MetaValue = int | str | tuple[int, int]
ArraySpec = tuple[tuple[int, ...], str]


class InvalidEntry(ValueError):
    """Bytes from the store that are not a valid entry of the expected model, kind and
    arrays; the message says which check failed."""


@dataclass(frozen=True)
class Entry:
    """What the store keeps under one key.

    Arguments:
      arrays (dict(str, np.ndarray)): The entry's arrays by name, e.g. ``embedding``,
        1xCxhxw float32 (1x256x64x64 for official SAM), or ``logits``, 1x256x256 float32.
      meta (dict(str, int, str or (int, int))): Small values that go with the arrays,
        e.g. ``input_size`` and ``original_size`` as (H, W) int pairs, or ``image_id``.
    """

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, MetaValue] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(array.nbytes for array in self.arrays.values())


@dataclass(frozen=True)
class EntrySpec:
    """What a reader accepts: anything else read from the store is ``InvalidEntry``.

    Arguments:
      arrays (dict(str, (tuple(int), str))): Each array's exact shape and dtype name by
        array name, e.g. ``{"embedding": ((1, 256, 64, 64), "float32")}``; an entry with
        another set of names is invalid.
      meta (dict(str, str)): Each metadata key the reader needs and its kind: ``int``,
        ``str`` or ``pair`` (two ints); keys not listed are returned as stored.
    """

    arrays: Mapping[str, ArraySpec]
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (shape, dtype) in self.arrays.items():
            if not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"array {name!r}: shape must be non-negative ints, got {shape}")
            np.dtype(dtype)  # an unknown dtype name fails here, not on every read
        for key, kind in self.meta.items():
            if kind not in META_KINDS:
                raise ValueError(f"meta {key!r}: kind must be one of {META_KINDS}, got {kind!r}")


def spec_of(entry: Entry) -> EntrySpec:
    """The ``EntrySpec`` that accepts exactly ``entry``'s array names, shapes, dtypes and
    metadata kinds."""
    arrays = {name: (tuple(a.shape), a.dtype.name) for name, a in entry.arrays.items()}
    meta = {key: _meta_kind(_normalized(value)) for key, value in entry.meta.items()}
    return EntrySpec(arrays, meta)


def encode_entry(entry: Entry, model_id: str, kind: str) -> bytes:
    """The bytes that store ``entry``.

    Arguments:
      entry (Entry): Arrays of fixed-size numeric or bool dtypes, any layout, and
        metadata of ints, strings and int pairs.
      model_id (str): The identity of the model that made the entry (``model_identity``).
      kind (str): ``EMBEDDING`` or ``LOGITS``.

    Returns:
      (bytes): Prefix, header, payload and trailer as described in this module.

    Raises ValueError for an entry the format cannot hold (a caller's bug, not a store
    failure).
    """
    _check_kind(kind)
    arrays = {name: _little_endian(array, name) for name, array in entry.arrays.items()}
    records, offset = [], 0
    for name, array in arrays.items():
        offset = _aligned(offset)
        records.append(
            {
                "name": name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
            }
        )
        offset += array.nbytes
    meta = {key: _meta_json(key, value) for key, value in entry.meta.items()}
    header = json.dumps(
        {"model": model_id, "kind": kind, "meta": meta, "arrays": records},
        separators=(",", ":"),
    ).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"entry header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)) + header
    head += bytes(_aligned(len(head)) - len(head))

    # The arrays go into the result by the buffer protocol: one copy each, checksummed as
    # they are joined.
    parts: list[bytes | memoryview] = [head]
    position = 0
    for record, array in zip(records, arrays.values()):
        parts.append(bytes(record["offset"] - position))
        parts.append(memoryview(array.reshape(-1).view(np.uint8)))
        position = record["offset"] + record["nbytes"]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_TRAILER.pack(crc))
    return b"".join(parts)


def decode_entry(
    blob: bytes, model_id: str, kind: str, spec: EntrySpec, copy: bool = True
) -> Entry:
    """The entry stored in ``blob``, if it is exactly what the caller expects.

    Arguments:
      blob (bytes): Bytes read from the store.
      model_id (str): The reader's model identity; an entry of another model is invalid.
      kind (str): ``EMBEDDING`` or ``LOGITS``; an entry of the other kind is invalid.
      spec (EntrySpec): The arrays (names, shapes, dtypes) and metadata the reader needs.
      copy (bool): If True, each array is a writable copy; if False, a read-only view
        into ``blob``.

    Returns:
      (Entry): The arrays, C-contiguous with the dtypes and shapes of ``spec``, and the
        metadata, int pairs as tuples.

    Raises InvalidEntry when the bytes are truncated, corrupted (checksum), of another
    format version, model, kind, or do not match ``spec``.
    """
    view = memoryview(blob).cast("B")
    header, header_bytes = _checked_header(view)
    if header.get("model") != model_id:
        raise InvalidEntry("written by another model")
    if header.get("kind") != kind:
        raise InvalidEntry(f"of kind {str(header.get('kind'))[:20]!r}, not {kind!r}")
    meta = _checked_meta(header.get("meta"), spec)
    start = _aligned(_PREFIX.size + header_bytes)
    payload_bytes = len(view) - _TRAILER.size - start
    arrays = {}
    for name, dtype, shape, offset in _checked_records(header.get("arrays"), spec, payload_bytes):
        array = np.frombuffer(view, dtype, math.prod(shape), start + offset).reshape(shape)
        arrays[name] = array.copy() if copy else array
    return Entry(arrays, meta)


def _checked_header(view: memoryview) -> tuple[dict, int]:
    """The JSON header of a blob whose prefix, length and checksum are valid, and its
    length in bytes."""
    if len(view) < _PREFIX.size + _TRAILER.size:
        raise InvalidEntry(f"truncated: {len(view)} bytes")
    magic, version, _, header_bytes = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise InvalidEntry("not an entry (magic)")
    if version != FORMAT_VERSION:
        raise InvalidEntry(f"format version {version}, not {FORMAT_VERSION}")
    if header_bytes > min(MAX_HEADER_BYTES, len(view) - _PREFIX.size - _TRAILER.size):
        raise InvalidEntry("truncated or corrupted (header length)")
    (stored_crc,) = _TRAILER.unpack_from(view, len(view) - _TRAILER.size)
    if zlib.crc32(view[: -_TRAILER.size]) != stored_crc:
        raise InvalidEntry("truncated or corrupted (checksum)")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + header_bytes]))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidEntry("header is not JSON") from error
    if not isinstance(header, dict):
        raise InvalidEntry("header is not an object")
    return header, header_bytes


def _checked_meta(meta: object, spec: EntrySpec) -> dict[str, MetaValue]:
    """The stored metadata, int pairs as tuples, if it has every key ``spec`` needs."""
    if not isinstance(meta, dict):
        raise InvalidEntry("meta is not an object")
    out = {key: tuple(value) if isinstance(value, list) else value for key, value in meta.items()}
    for key, kind in spec.meta.items():
        if key not in out or _meta_kind(out[key], strict=False) != kind:
            raise InvalidEntry(f"meta {key!r} is missing or not of kind {kind!r}")
    return out


def _checked_records(
    records: object, spec: EntrySpec, payload_bytes: int
) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """Each stored array's (name, dtype, shape, offset in the payload), checked against
    ``spec`` and against the payload's bounds."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InvalidEntry("arrays are not a list of objects")
    names = [r.get("name") for r in records]
    if not all(isinstance(n, str) for n in names) or sorted(names) != sorted(spec.arrays):
        raise InvalidEntry(f"arrays {names} where {sorted(spec.arrays)} were expected"[:200])
    out = []
    for record in records:
        name = record["name"]
        shape, dtype_name = spec.arrays[name]
        try:
            stored_dtype = np.dtype(record.get("dtype"))
        except (TypeError, ValueError) as error:
            raise InvalidEntry(f"array {name!r}: unknown dtype") from error
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if stored_dtype != dtype:
            raise InvalidEntry(f"array {name!r}: dtype {stored_dtype}, not {dtype_name}")
        if record.get("shape") != list(shape):
            raise InvalidEntry(f"array {name!r}: shape {record.get('shape')}, not {shape}"[:200])
        offset, nbytes = record.get("offset"), record.get("nbytes")
        if not (
            isinstance(offset, int)
            and isinstance(nbytes, int)
            and offset % ALIGNMENT == 0
            and nbytes == math.prod(shape) * dtype.itemsize
            and 0 <= offset <= payload_bytes - nbytes
        ):
            raise InvalidEntry(f"array {name!r}: offset or size out of bounds")
        out.append((name, dtype, tuple(shape), offset))
    return out


def _little_endian(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` C-contiguous with a little-endian dtype (the format's byte order)."""
    if not isinstance(name, str) or not isinstance(array, np.ndarray):
        raise ValueError(f"entry arrays must be numpy arrays by str name, got {name!r}")
    if array.dtype.kind not in "biufc" or array.dtype.hasobject:
        raise ValueError(f"array {name!r}: dtype {array.dtype} cannot be stored")
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<"))


def _meta_json(key: str, value: object) -> int | str | list[int]:
    """``value`` as JSON holds it; ValueError for kinds the format does not have."""
    if not isinstance(key, str):
        raise ValueError(f"meta keys must be str, got {key!r}")
    value = _normalized(value)
    _meta_kind(value)
    return list(value) if isinstance(value, tuple) else value


def _normalized(value: object) -> object:
    """``value`` with integers of any type (numpy's too) as Python ints."""
    if isinstance(value, tuple):
        return tuple(_normalized(v) for v in value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _meta_kind(value: object, strict: bool = True) -> str | None:
    """``int``, ``str`` or ``pair`` for a metadata value; for another value ValueError
    (``strict``) or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    if isinstance(value, str):
        return "str"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return "pair"
    if strict:
        raise ValueError(f"meta values must be int, str or a pair of ints, got {value!r}"[:200])
    return None


def _check_kind(kind: str) -> None:
    """ValueError unless ``kind`` is one of ``KINDS``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _aligned(offset: int) -> int:
    """The first multiple of ``ALIGNMENT`` at or after ``offset``."""
    return -(-offset // ALIGNMENT) * ALIGNMENT
