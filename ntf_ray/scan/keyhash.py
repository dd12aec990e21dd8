"""The skip index's hashes: which partition a uri is in, and a fingerprint of a key
(uri, etag, last-modified) to find it among millions by binary search. Both are the same in
every process and on every machine, and are written into the index's layout, so they must
not change without a new ``index.LAYOUT``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_BASE = np.uint64(0x100000001B3)
_POWERS = np.cumprod(np.full(256, _BASE, np.uint64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(n: int) -> np.ndarray:
    global _POWERS
    if n > len(_POWERS):
        _POWERS = np.cumprod(np.full(max(n, 2 * len(_POWERS)), _BASE, np.uint64))
    return _POWERS


def string_hash(values: pa.Array | pa.ChunkedArray, *, slice_rows: int = 1 << 18) -> np.ndarray:
    """A 64-bit hash of each string (its UTF-8 bytes; null hashes as ''), the same in every
    process and on every machine (Python's ``hash`` is not). Not a secret: what it decides
    (a partition, a fingerprint that is then checked exactly) never depends on its luck."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    values = pc.fill_null(values, "").cast(pa.large_string())
    out = np.empty(len(values), np.uint64)
    for first in range(0, len(values), slice_rows):
        part = values.slice(first, slice_rows)
        n = len(part)
        offsets = np.frombuffer(part.buffers()[1], np.int64, count=n + 1, offset=part.offset * 8)
        lo, hi = int(offsets[0]), int(offsets[-1])
        lengths = np.diff(offsets)
        h = np.zeros(n, np.uint64)
        if hi > lo:
            data = np.frombuffer(part.buffers()[2], np.uint8, count=hi - lo, offset=lo).astype(np.uint64)
            starts = offsets[:-1] - lo
            position = np.arange(hi - lo, dtype=np.int64) - np.repeat(starts, lengths)
            terms = (data + np.uint64(1)) * _powers(int(lengths.max()))[position]
            filled = lengths > 0
            h[filled] = np.add.reduceat(terms, starts[filled])
        out[first:first + n] = _mix(h ^ lengths.astype(np.uint64))
    return out


def partition_of(uris: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """The partition of each uri, 0..partitions-1."""
    if partitions == 1:
        return np.zeros(len(uris), np.int64)
    return (string_hash(uris) % np.uint64(partitions)).astype(np.int64)


def fingerprint(keys: pa.Table) -> np.ndarray:
    """A 64-bit fingerprint of each ``KEY`` row, to find a key among millions by binary search;
    two keys may share one, so a match is always checked against the key itself."""
    modified = pc.fill_null(keys.column("modified"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    h = _mix(string_hash(keys.column("uri")) ^ _mix(string_hash(keys.column("etag")) ^ modified.view(np.uint64)))
    return h
