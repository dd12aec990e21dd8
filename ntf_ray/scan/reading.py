"""Ray Data's read stage: the listed objects' bytes, exactly the objects listed, with retries
of transient errors and a short reason for each object that cannot be read.

A row's key is never a pattern, its bytes are the listed version (``If-Match`` on S3, the
listed size, times and inode locally), and no object larger than ``max_bytes`` is read: the
listing's size decides before any byte moves, and a read stops one byte past the cap.
"""

from __future__ import annotations

import time

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.errors import TOO_LARGE, error
from ntf_ray.storage import DEFAULT_MAX_BYTES, ObjectTooLarge, Source, StorageOptions

READ_ATTEMPTS = 3  # transient read errors are retried; each source names those that are not


def _read_with_retries(uris: list[str], options: StorageOptions, *, etags: list[str | None] | None = None,
                       max_bytes: int | None = None) -> list[bytes | Exception]:
    etags = etags if etags is not None else [None] * len(uris)
    out = storage.read_many(uris, options, etags=etags, max_bytes=max_bytes)
    for attempt in range(1, READ_ATTEMPTS):
        retry = [i for i, v in enumerate(out)
                 if isinstance(v, Exception) and not isinstance(v, storage.source_for(uris[i]).final_errors)]
        if not retry:
            break
        time.sleep(0.2 * 2**attempt)
        again = storage.read_many([uris[i] for i in retry], options, etags=[etags[i] for i in retry], max_bytes=max_bytes)
        for i, v in zip(retry, again):
            out[i] = v
    return out


def object_error(exc: BaseException) -> str:
    """The error a row gets for an object that could not be read."""
    if isinstance(exc, ObjectTooLarge):
        return error(TOO_LARGE, f"{exc}")
    return storage.read_error(exc)


def _column(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def read_objects(batch: pa.Table, *, endpoint: str | None, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 sources: list[Source] | None = None) -> pa.Table:
    """Ray Data task: the listing rows plus ``data`` (bytes) and ``read_error``.

    ``sources``: the driver's registered sources (``storage.sources()``), registered in the
    task's process too, so that a source added by a plugin reads there as it listed.
    Optional listing columns: ``etag`` (the version to read), ``size_bytes`` (checked against
    ``max_bytes`` before reading) and ``listing_error`` (the listing's own reason: not read).
    """
    for source in sources or ():
        storage.register(source)
    uris, etags, sizes = _column(batch, "uri"), _column(batch, "etag"), _column(batch, "size_bytes")
    listed_errors = _column(batch, "listing_error")
    data: list[bytes | None] = [None] * batch.num_rows
    errors: list[str | None] = list(listed_errors)
    todo = []
    for i, size in enumerate(sizes):
        if errors[i] is not None:
            continue
        errors[i] = storage.name_error(uris[i])  # one odd name is its own row, never its block's
        if errors[i] is not None:
            continue
        if max_bytes is not None and size is not None and size > max_bytes:
            errors[i] = error(TOO_LARGE, f"{size} bytes > limit {max_bytes}")
        elif size == 0 and etags[i] is not None:
            data[i] = b""  # listed empty: nothing to read (S3 refuses a range of an empty object)
        else:
            todo.append(i)
    values = _read_with_retries([uris[i] for i in todo], StorageOptions(endpoint_url=endpoint),
                                etags=[etags[i] for i in todo], max_bytes=max_bytes)
    for i, value in zip(todo, values):
        if isinstance(value, Exception):
            errors[i] = object_error(value)
        else:
            data[i] = value
    return batch.append_column("data", pa.array(data, pa.binary())).append_column("read_error", pa.array(errors, pa.string()))
