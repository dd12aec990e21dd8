"""The skip index's hashes: which partition a uri is in, and a fingerprint of a key
(uri, etag, last-modified) to find it among millions by binary search.

SipHash-2-4 of each string's UTF-8 bytes (pandas' ``hash_array``, in C) under the index's own
random key (``new_key``, kept in ``index.json``), then splitmix64's finaliser. Keyed, so an
upload cannot be named to share a fingerprint with others (which could only slow the check:
every match is checked against the key itself). The same in every process and on every
machine, and written into the index's layout: ``check_value`` is kept beside the key, so a
library that hashed differently makes the index read as of an earlier layout, never wrong.
"""

from __future__ import annotations

import secrets

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

#: Strings hashed at once (their Python copies are what a slice costs).
SLICE_ROWS = 1 << 18
_CHECK_TEXT = "ntf-ray skip index"


def new_key() -> str:
    """A fresh key for an index: 16 characters, 64 random bits."""
    return secrets.token_hex(8)


def _checked(key: str) -> str:
    if not isinstance(key, str) or len(key.encode()) != 16:
        raise ValueError("an index hash key is 16 bytes")
    return key


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_hash(values: pa.Array | pa.ChunkedArray, key: str, *, slice_rows: int = SLICE_ROWS) -> np.ndarray:
    """A 64-bit keyed hash of each string (its UTF-8 bytes; null hashes as '')."""
    key = _checked(key)
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    out = np.empty(len(values), np.uint64)
    done = 0
    for chunk in chunks:  # a chunk at a time: their strings together may pass 2 GiB
        chunk = pc.fill_null(chunk, "")
        for first in range(0, len(chunk), slice_rows):
            part = chunk.slice(first, slice_rows).to_numpy(zero_copy_only=False)
            out[done:done + len(part)] = pd.util.hash_array(part, hash_key=key, categorize=False)
            done += len(part)
    return out


def check_value(key: str) -> str:
    """What ``string_hash`` gives a fixed text under ``key``, kept in ``index.json``."""
    return f"{int(string_hash(pa.array([_CHECK_TEXT]), key)[0]):016x}"


def partition_of(uris: pa.Array | pa.ChunkedArray, partitions: int, key: str) -> np.ndarray:
    """The partition of each uri, 0..partitions-1."""
    if partitions == 1:
        return np.zeros(len(uris), np.int64)
    return partition_of_hash(string_hash(uris, key), partitions)


def partition_of_hash(uri_hash: np.ndarray, partitions: int) -> np.ndarray:
    """``partition_of`` from the uris' ``string_hash``."""
    return (uri_hash % np.uint64(partitions)).astype(np.int64)


def fingerprint(keys: pa.Table, key: str, *, uri_hash: np.ndarray | None = None) -> np.ndarray:
    """A 64-bit fingerprint of each ``KEY`` row (``uri_hash``: its uris' ``string_hash``, when
    already at hand); two keys may share one, so a match is always checked against the key."""
    modified = pc.fill_null(keys.column("modified"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if uri_hash is None:
        uri_hash = string_hash(keys.column("uri"), key)
    return _mix(uri_hash ^ _mix(string_hash(keys.column("etag"), key) ^ modified.view(np.uint64)))
