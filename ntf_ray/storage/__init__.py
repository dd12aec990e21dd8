"""Local paths and ``s3://`` URIs, one way in for the whole project.

S3 settings come from the standard AWS variables and files (credentials, region) plus an
endpoint URL (``AWS_ENDPOINT_URL`` or an explicit argument) so MinIO, Ceph or moto work.
The endpoint is handed explicitly to s3fs and to pyarrow: pyarrow does not read it from
the environment. Credentials are never part of anything this module returns or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageOptions:
    """Where S3 lives. Credentials are deliberately not fields: they stay in the AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, endpoint_url: str | None = None, region: str | None = None) -> StorageOptions:
        """Explicit values win over ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_REGION``."""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint_url=endpoint or None, region=region or None)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI."""
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return str(Path(base, *parts))


def normalize(uri: str | Path) -> str:
    """Absolute local path, or the ``s3://`` URI unchanged (``s3a://`` / ``s3n://`` accepted)."""
    uri = str(uri)
    if re.match(r"^s3[an]?://", uri):
        uri = "s3://" + uri.split("://", 1)[1]
        split_s3(uri)  # a clear error now, not an odd one from the S3 client later
        return uri
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/key")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().absolute())


def fsspec_filesystem(options: StorageOptions | None = None):
    """An s3fs filesystem with the endpoint passed explicitly (credentials from the AWS chain)."""
    import s3fs

    options = options or StorageOptions.resolve()
    client_kwargs = {}
    if options.endpoint_url:
        client_kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        client_kwargs["region_name"] = options.region
    # fsspec caches instances per (kwargs, process), so repeated reads reuse one client and
    # its connection pool (a fresh S3FileSystem per call costs ~0.25 s: a new botocore
    # session per object), two endpoints never share a client, and a forked DataLoader
    # worker builds its own. No listings cache: another process may write meanwhile.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


def arrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an ``s3://`` URI."""
    uri = normalize(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), uri
    options = options or StorageOptions.resolve()
    kwargs: dict = {}
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if options.region:
        kwargs["region"] = options.region
    bucket, key = split_s3(uri)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """Whole object or file as bytes."""
    uri = normalize(uri)
    if is_s3(uri):
        return fsspec_filesystem(options).cat_file(uri)
    return Path(uri).read_bytes()


#: Default cap on an object's size for a scan: far above any photo (a 100 Mpx JPEG is ~50 MB),
#: far below what hurts a worker.
DEFAULT_MAX_BYTES = 128 * 2**20
#: What a scan holds in Ray's object store at most (read blocks waiting for a detector, and
#: scored rows waiting to be written): without a cap, reads run gigabytes ahead of the actors.
DEFAULT_READ_AHEAD_BYTES = 2 * 1024**3


class ObjectChanged(OSError):
    """The object read is not the one listed: another etag (S3) or size, time or inode (local)."""


class ObjectTooLarge(OSError):
    """The object holds more bytes than the reader's cap."""


def local_etag(st: os.stat_result) -> str:
    """A local file's etag: a digest of its size, mtime, ctime and inode.

    ctime cannot be set by a user, so a file rewritten with the same size and mtime (``cp -p``,
    ``touch -d``, rsync ``-t``) still reads as changed.
    """
    key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def read_many(uris: list[str], options: StorageOptions | None = None, *, etags: list[str | None] | None = None,
              max_bytes: int | None = None) -> list[bytes | Exception]:
    """Read many objects or files; each result is the bytes or the exception it raised.

    Each uri names exactly one object: nothing is expanded as a pattern (``*``, ``?``, ``[``
    are ordinary characters in a key). With ``etags``, an object whose etag (S3, sent as
    ``If-Match``) or ``local_etag`` (local) is no longer the one given reads as
    ``ObjectChanged``, so the bytes read are always the bytes listed. With ``max_bytes``, an
    object larger than that reads as ``ObjectTooLarge`` after at most ``max_bytes + 1`` bytes.
    S3 objects are fetched concurrently: per-object latency, not bandwidth, bounds a
    sequential loop over small images.
    """
    uris = [normalize(u) for u in uris]
    etags = list(etags) if etags is not None else [None] * len(uris)
    out: list[bytes | Exception] = [b""] * len(uris)
    remote = [i for i, u in enumerate(uris) if is_s3(u)]
    if remote:
        from fsspec.asyn import sync

        fs = fsspec_filesystem(options)

        async def fetch_all():
            return await asyncio.gather(*[_get_s3(fs, uris[i], etags[i], max_bytes) for i in remote],
                                        return_exceptions=True)

        for i, value in zip(remote, sync(fs.loop, fetch_all)):
            out[i] = value
    for i, u in enumerate(uris):
        if not is_s3(u):
            try:
                out[i] = _read_local(u, etags[i], max_bytes)
            except OSError as exc:
                out[i] = exc
    return out


def list_s3(uri: str, options: StorageOptions | None = None, *, page_keys: int = 1000) -> Iterator[dict]:
    """Every object under the ``s3://bucket/prefix`` ``uri``, one ListObjectsV2 page in memory at
    a time: dicts with ``key`` (decoded), ``etag``, ``size`` and ``last_modified``.

    Keys are asked for URL-encoded (XML cannot carry every character a key may hold, such as
    control characters) and decoded here. An empty ``folder/`` marker is left out; a key ending
    in ``/`` that holds bytes is an object like any other.
    """
    from fsspec.asyn import sync

    fs = fsspec_filesystem(options)
    bucket, prefix = split_s3(uri)
    kwargs: dict = {"Bucket": bucket, "Prefix": prefix, "EncodingType": "url", "MaxKeys": page_keys}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        encoded = page.get("EncodingType") == "url"
        for obj in page.get("Contents", []):
            key = unquote_plus(obj["Key"]) if encoded else obj["Key"]
            size = int(obj.get("Size", 0))
            if key.endswith("/") and size == 0:
                continue
            yield {"key": key, "etag": obj.get("ETag", "").strip('"'), "size": size,
                   "last_modified": obj.get("LastModified")}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (``PreconditionFailed``, ...)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None)
    return (response or {}).get("Error", {}).get("Code")


async def _get_s3(fs, uri: str, etag: str | None, max_bytes: int | None) -> bytes:
    bucket, key = split_s3(uri)
    kwargs: dict = {}
    if etag:
        kwargs["IfMatch"] = f'"{etag}"'
    if max_bytes is not None:
        kwargs["Range"] = f"bytes=0-{max_bytes}"  # one byte more than allowed says "too large"
    try:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)
    except OSError as exc:
        code = _s3_error_code(exc)
        if code in ("PreconditionFailed", "412"):
            raise ObjectChanged(f"{uri} changed after it was listed") from None
        if code in ("InvalidRange", "416"):  # a range of an empty object
            return b""
        raise
    try:
        data = await response["Body"].read()
    finally:
        response["Body"].close()
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLarge(f"more than {max_bytes} bytes")
    return data


def _read_local(path: str, etag: str | None, max_bytes: int | None) -> bytes:
    # O_NONBLOCK: a file swapped for a FIFO after listing must not block the open itself
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{path} is a folder")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise OSError(f"{path} is not a regular file")
        if etag is not None and local_etag(st) != etag:
            raise ObjectChanged(f"{path} changed after it was listed")
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLarge(f"more than {max_bytes} bytes")
    return data


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write bytes, creating local parent folders; S3 writes are whole-object puts."""
    uri = normalize(uri)
    if is_s3(uri):
        fsspec_filesystem(options).pipe_file(uri, data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name in the same folder (threads of one process may write the same
    # file), removed if the write fails; os.replace makes the file appear whole or not at all.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:  # mode 0666 minus the umask, like any new file
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Remove a file, or a folder with everything under it; nothing if it is not there."""
    uri = normalize(uri)
    if is_s3(uri):
        fs = fsspec_filesystem(options)
        if fs.exists(uri):
            fs.rm(uri, recursive=True)
    elif os.path.isdir(uri) and not os.path.islink(uri):
        import shutil

        shutil.rmtree(uri, ignore_errors=True)
    else:
        Path(uri).unlink(missing_ok=True)


def list_names(folder: str, options: StorageOptions | None = None) -> list[str]:
    """Every file under ``folder``, as paths relative to it (none if it is not there)."""
    folder = normalize(folder).rstrip("/")
    if is_s3(folder):
        base = folder[len("s3://"):]
        return sorted(p[len(base) + 1:] for p in fsspec_filesystem(options).find(base))
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                  for d, _, files in os.walk(folder) for f in files)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    uri = normalize(uri)
    if is_s3(uri):
        return fsspec_filesystem(options).exists(uri)
    return Path(uri).exists()


def redact(text: str) -> str:
    """``text`` without the credentials in use or anything that looks like one (``ntf_ray.storage.redaction``)."""
    from ntf_ray.storage.redaction import redact as redacted

    return redacted(text)


def read_error(exc: BaseException) -> str:
    """The ``read:`` error of one object, as a scan row, a score line or a log says it.

    One line of at most 200 characters, without secrets; a missing object reads as such,
    since between a listing and its read it most likely was deleted.
    """
    if isinstance(exc, FileNotFoundError):
        return "read: not found (deleted after listing?)"
    if isinstance(exc, ObjectChanged):
        return "read: changed after listing"
    # no endpoint in a row or a log: "Could not connect to the endpoint URL: http://minio.internal:9000/..."
    message = re.sub(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+", "<endpoint>", " ".join(redact(str(exc)).split()))
    text = f"read: {type(exc).__name__}: {message}" if message else f"read: {type(exc).__name__}"
    return text if len(text) <= 200 else text[:197] + "..."


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[memoryview | None]:
    """Each value of a binary column as a memoryview into Arrow's buffer, not a copy (None for nulls).

    A batch of 256 photos is about 100 MB: ``to_pylist`` would copy it once more under the GIL.
    """
    out: list[memoryview | None] = []
    for arr in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
            raise TypeError(f"expected a binary column, got {arr.type}")
        _, offsets_buf, data_buf = arr.buffers()
        width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        offsets = np.frombuffer(offsets_buf, width)[arr.offset : arr.offset + len(arr) + 1].tolist() if len(arr) else []
        # Arrow exports its buffers as signed chars ("b"): b"\xff" would not compare equal to them
        data = memoryview(data_buf).cast("B") if data_buf is not None else memoryview(b"")
        valid = arr.is_valid().to_pylist() if arr.null_count else [True] * len(arr)
        out.extend(data[offsets[k] : offsets[k + 1]] if valid[k] else None for k in range(len(arr)))
    return out
