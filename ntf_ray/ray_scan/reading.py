"""Ray Data's read stage: the listed objects' bytes, with retries of transient errors and a
short reason for each object that cannot be read."""

from __future__ import annotations

import time

import pyarrow as pa

from ntf_ray import storage
from ntf_ray.storage import StorageOptions

READ_ATTEMPTS = 3  # transient read errors are retried; a missing object is not


def _read_with_retries(uris: list[str], options: StorageOptions) -> list[bytes | Exception]:
    out = storage.read_many(uris, options)
    for attempt in range(1, READ_ATTEMPTS):
        retry = [i for i, v in enumerate(out)
                 if isinstance(v, Exception) and not isinstance(v, (FileNotFoundError, PermissionError, IsADirectoryError))]
        if not retry:
            break
        time.sleep(0.2 * 2**attempt)
        for i, v in zip(retry, storage.read_many([uris[i] for i in retry], options)):
            out[i] = v
    return out


def _read_error(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "read: not found (deleted after listing?)"
    return f"read: {type(exc).__name__}: {storage.redact(str(exc))[:160]}"


def read_objects(batch: pa.Table, *, endpoint: str | None) -> pa.Table:
    """Ray Data task: the listing rows plus ``data`` (bytes) and ``read_error``."""
    values = _read_with_retries(batch.column("uri").to_pylist(), StorageOptions(endpoint_url=endpoint))
    data = [None if isinstance(v, Exception) else v for v in values]
    errors = [_read_error(v) if isinstance(v, Exception) else None for v in values]
    return batch.append_column("data", pa.array(data, pa.binary())).append_column("read_error", pa.array(errors, pa.string()))
