"""Local paths and ``s3://`` URIs, one way in for the whole project.

S3 settings come from the standard AWS variables and files (credentials, region) plus an
endpoint URL (``AWS_ENDPOINT_URL`` or an explicit argument) so MinIO, Ceph or moto work.
The endpoint is handed explicitly to s3fs and to pyarrow: pyarrow does not read it from
the environment. Credentials are never part of anything this module returns or logs.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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


def read_many(uris: list[str], options: StorageOptions | None = None) -> list[bytes | Exception]:
    """Read many objects or files; each result is the bytes or the exception it raised.

    S3 objects are fetched concurrently (s3fs's async ``cat``): per-object latency, not
    bandwidth, bounds a sequential loop over small images.
    """
    uris = [normalize(u) for u in uris]
    out: list[bytes | Exception] = [b""] * len(uris)
    remote = [i for i, u in enumerate(uris) if is_s3(u)]
    if remote:
        fetched = fsspec_filesystem(options).cat([uris[i] for i in remote], on_error="return")
        for i in remote:
            value = fetched.get(uris[i][len("s3://"):], fetched.get(uris[i]))
            out[i] = value if value is not None else FileNotFoundError(uris[i])
    for i, u in enumerate(uris):
        if not is_s3(u):
            try:
                out[i] = Path(u).read_bytes()
            except OSError as exc:
                out[i] = exc
    return out


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


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    uri = normalize(uri)
    if is_s3(uri):
        return fsspec_filesystem(options).exists(uri)
    return Path(uri).exists()


def redact(text: str) -> str:
    """Remove anything that looks like an AWS key, secret or session token from a message."""
    text = re.sub(r"\b(A3T|AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA)[A-Z0-9]{12,}\b", "<redacted>", text)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text


def read_error(exc: BaseException) -> str:
    """The ``read:`` error of one object, as a scan row, a score line or a log says it.

    One line of at most 200 characters, without secrets; a missing object reads as such,
    since between a listing and its read it most likely was deleted.
    """
    if isinstance(exc, FileNotFoundError):
        return "read: not found (deleted after listing?)"
    message = " ".join(redact(str(exc)).split())
    text = f"read: {type(exc).__name__}: {message}" if message else f"read: {type(exc).__name__}"
    return text if len(text) <= 200 else text[:197] + "..."
