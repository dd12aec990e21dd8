"""``s3://bucket/key`` (``s3a://``, ``s3n://`` accepted) as a ``Source``: AWS S3, MinIO, Ceph, moto.

S3 settings come from the standard AWS variables and files (credentials, region) plus an
endpoint URL (``AWS_ENDPOINT_URL`` or an explicit argument). The endpoint is handed explicitly
to s3fs and to pyarrow: pyarrow does not read it from the environment. Reads carry the listed
ETag as ``If-Match`` and a ``Range`` one byte past the cap; the lease's writes carry
``If-None-Match`` / ``If-Match``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import unquote_plus, urlparse

from ntf_ray.storage.source import ObjectChanged, ObjectTooLarge, Row, Source, StorageOptions, matches

#: Keys per ListObjectsV2 page (S3's own maximum).
PAGE_KEYS = 1000
#: Objects HEAD-ed at once for a manifest's listing rows.
STAT_CHUNK = 1000
#: S3's answers to a conditional write that another writer won.
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``."""
    if not str(uri).startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    if not _BUCKET_CHARS.fullmatch(bucket):
        raise ValueError(f"s3 URI whose bucket is not a bucket name: {uri!r}")
    return bucket, key


#: What a bucket name can hold at most, anywhere S3 is spoken (AWS's rules are stricter: 3-63
#: lowercase letters, digits, '.' and '-'; older buckets and other stores allow upper case and '_').
_BUCKET_CHARS = re.compile(r"[A-Za-z0-9._-]{1,255}")


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


def error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (``PreconditionFailed``, ...)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None)
    return (response or {}).get("Error", {}).get("Code")


def list_s3(uri: str, options: StorageOptions | None = None, *, page_keys: int | None = None) -> Iterator[dict]:
    """Every object under the ``s3://bucket/prefix`` ``uri``, one ListObjectsV2 page in memory at
    a time: dicts with ``key`` (decoded), ``etag``, ``size`` and ``last_modified``.

    Keys are asked for URL-encoded (XML cannot carry every character a key may hold, such as
    control characters) and decoded here (``_objects``). An empty ``folder/`` marker is left
    out; a key ending in ``/`` that holds bytes is an object like any other.
    """
    from fsspec.asyn import sync

    fs = fsspec_filesystem(options)
    bucket, prefix = split_s3(uri)
    kwargs: dict = {"Bucket": bucket, "Prefix": prefix, "EncodingType": "url", "MaxKeys": page_keys or PAGE_KEYS}
    while True:
        page = sync(fs.loop, _list_page, fs, **kwargs)  # S3's throttling waited out, as the fan-out's listers do
        yield from _objects(page)
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


#: Folders per lister a fanned-out listing splits a prefix into, at most (see ``list_s3_fanout``).
PARTS_PER_LISTER = 8
#: S3's answers that mean "slow down": retried after a backoff, however often botocore retried.
_THROTTLED = ("SlowDown", "503", "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequests")
THROTTLE_ATTEMPTS = 8


async def _list_page(fs, **kwargs) -> dict:
    """One ListObjectsV2 page; S3's throttling answered with exponential backoff (0.1 s, doubling)."""
    for attempt in range(THROTTLE_ATTEMPTS):
        try:
            return await fs._call_s3("list_objects_v2", **kwargs)
        except OSError as exc:
            if error_code(exc) not in _THROTTLED or attempt == THROTTLE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(min(0.1 * 2**attempt, 10.0))
    raise AssertionError("unreachable")


def _objects(page: dict) -> Iterator[dict]:
    """A ListObjectsV2 page's objects: keys URL-decoded, empty folder markers left out."""
    encoded = page.get("EncodingType") == "url"
    for obj in page.get("Contents", []):
        key = unquote_plus(obj["Key"]) if encoded else obj["Key"]
        size = int(obj.get("Size", 0))
        if key.endswith("/") and size == 0:
            continue
        yield {"key": key, "etag": obj.get("ETag", "").strip('"'), "size": size, "last_modified": obj.get("LastModified")}


def list_s3_fanout(uri: str, options: StorageOptions | None = None, *, concurrency: int = 16,
                   page_keys: int | None = None, max_depth: int = 3) -> Iterator[dict]:
    """``list_s3`` with up to ``concurrency`` listers at once, each on its own part of the prefix.

    A plan first (``Delimiter=/`` listings that read only the folder names): the prefix is
    split along its folders, level by level down to ``max_depth``, while a level holds at most
    ``PARTS_PER_LISTER x concurrency`` folders (a layout of a million folders of one object
    each would cost a million requests: it stays with one lister). Then each folder of the last
    level is listed whole by one of the listers, and each folder it was split from has the
    objects directly in it listed once (``Delimiter=/``): every object once, keys decoded as
    ``list_s3`` decodes them, never a pattern. Pages reach the caller as they are listed, at
    most ``2 x concurrency`` waiting, so its pace bounds the memory. An error stops every
    lister and reaches the caller; so does the caller going away.
    """
    fs = fsspec_filesystem(options)
    bucket, prefix = split_s3(uri)
    page_keys = page_keys or PAGE_KEYS
    cap = PARTS_PER_LISTER * concurrency
    done = object()

    async def pages(part: str, *, delimiter: bool) -> AsyncIterator[dict]:
        kwargs: dict = {"Bucket": bucket, "Prefix": part, "EncodingType": "url", "MaxKeys": page_keys}
        if delimiter:
            kwargs["Delimiter"] = "/"
        while True:
            page = await _list_page(fs, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def folders(part: str, room: int) -> list[str] | None:
        """The folders directly under ``part``, or None if there are more than ``room``."""
        found: list[str] = []
        async for page in pages(part, delimiter=True):
            encoded = page.get("EncodingType") == "url"
            found += [unquote_plus(f["Prefix"]) if encoded else f["Prefix"] for f in page.get("CommonPrefixes", [])]
            if len(found) > room:
                return None
        return found

    async def plan() -> list[tuple[str, bool]]:
        """(part, whole) to list: whole parts with everything below them, the others only the
        objects directly in them."""
        shallow: list[str] = []
        level = [prefix]
        for _ in range(max_depth):
            if len(level) >= concurrency:
                break
            deeper: list[str] = []
            for part in level:
                below = await folders(part, cap - len(deeper))
                if below is None:  # too wide to split further: list this level's parts whole
                    return [(p, False) for p in shallow] + [(p, True) for p in level]
                deeper += below
            if not deeper:
                break
            shallow += level
            level = deeper
        return [(p, False) for p in shallow] + [(p, True) for p in level]

    async def run(out: asyncio.Queue) -> None:
        work: asyncio.Queue = asyncio.Queue()
        for item in await plan():
            work.put_nowait(item)

        async def lister() -> None:
            while not work.empty():
                part, whole = work.get_nowait()
                async for page in pages(part, delimiter=not whole):
                    items = list(_objects(page))
                    if items:
                        await out.put(items)

        tasks = [asyncio.ensure_future(lister()) for _ in range(min(concurrency, work.qsize()) or 1)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed: the others stop too, no request after the caller hears of it
                task.cancel()
            raise

    async def start() -> tuple[asyncio.Queue, asyncio.Future]:
        out: asyncio.Queue = asyncio.Queue(maxsize=2 * concurrency)

        async def main() -> None:
            try:
                await run(out)
                await out.put(done)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the caller re-raises it
                await out.put(exc)

        return out, asyncio.ensure_future(main())

    out, task = asyncio.run_coroutine_threadsafe(start(), fs.loop).result()
    try:
        while True:
            items = asyncio.run_coroutine_threadsafe(out.get(), fs.loop).result()
            if items is done:
                return
            if isinstance(items, BaseException):
                raise items
            yield from items
    finally:
        fs.loop.call_soon_threadsafe(task.cancel)  # the caller went away (or it all ended): listers stop


async def _get(fs, uri: str, etag: str | None, max_bytes: int | None) -> bytes:
    bucket, key = split_s3(uri)
    kwargs: dict = {}
    if etag:
        kwargs["IfMatch"] = f'"{etag}"'
    if max_bytes is not None:
        kwargs["Range"] = f"bytes=0-{max_bytes}"  # one byte more than allowed says "too large"
    try:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)
    except OSError as exc:
        code = error_code(exc)
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


def _folder(uri: str) -> str:
    """A prefix that names a folder: ``s3://bucket/a/`` for ``s3://bucket/a``; the bucket for ``s3://bucket``."""
    bucket, key = split_s3(uri)
    return f"s3://{bucket}/{key.rstrip('/') + '/' if key else ''}"


class S3Source(Source):
    scheme = "s3"

    def normalize(self, uri: str) -> str:
        uri = "s3://" + uri.split("://", 1)[1]
        split_s3(uri)  # a clear error now, not an odd one from the S3 client later
        return uri

    def list(self, prefix: str, pattern: str | None, options: StorageOptions, *, concurrency: int = 1) -> Iterator[Row]:
        folder = _folder(prefix)
        bucket, _ = split_s3(folder)
        objects = list_s3(folder, options) if concurrency <= 1 else list_s3_fanout(folder, options, concurrency=concurrency)
        for obj in objects:
            if matches(obj["key"].rstrip("/").rsplit("/", 1)[-1], pattern):
                yield {"uri": f"s3://{bucket}/{obj['key']}", "etag": obj["etag"], "size_bytes": obj["size"],
                       "last_modified": obj["last_modified"]}

    def stat_many(self, uris: list[str], options: StorageOptions) -> Iterator[Row]:
        from fsspec.asyn import sync

        fs = fsspec_filesystem(options)

        async def info(u: str):
            try:
                return await fs._info(u)
            except (OSError, ValueError) as exc:
                return exc

        for start in range(0, len(uris), STAT_CHUNK):
            chunk = uris[start : start + STAT_CHUNK]
            for u, i in zip(chunk, sync(fs.loop, asyncio.gather, *[info(u) for u in chunk])):
                if isinstance(i, Exception):
                    yield {"uri": u, "etag": None, "size_bytes": None, "last_modified": None}
                else:
                    yield {"uri": u, "etag": str(i.get("ETag", "")).strip('"'), "size_bytes": int(i.get("size", 0)),
                           "last_modified": i.get("LastModified")}

    def read_many(self, uris: list[str], options: StorageOptions, *, etags: list[str | None],
                  max_bytes: int | None) -> list[bytes | Exception]:
        # Fetched concurrently: per-object latency, not bandwidth, bounds a loop over small images.
        from fsspec.asyn import sync

        fs = fsspec_filesystem(options)

        async def fetch_all():
            return await asyncio.gather(*[_get(fs, u, e, max_bytes) for u, e in zip(uris, etags)],
                                        return_exceptions=True)

        return list(sync(fs.loop, fetch_all))

    def read_bytes(self, uri: str, options: StorageOptions) -> bytes:
        return fsspec_filesystem(options).cat_file(uri)

    def write_bytes(self, uri: str, data: bytes, options: StorageOptions) -> None:
        fsspec_filesystem(options).pipe_file(uri, data)  # one PUT: the object appears whole

    def remove(self, uri: str, options: StorageOptions) -> None:
        fs = fsspec_filesystem(options)
        if fs.exists(uri):
            fs.rm(uri, recursive=True)

    def files(self, folder: str, options: StorageOptions, *, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
        folder = _folder(folder)
        bucket, prefix = split_s3(folder)
        for obj in list_s3(folder, options):  # verbatim keys, one page at a time
            rel = obj["key"][len(prefix):]
            if skip and any(part.startswith(skip) for part in rel.split("/")[:-1]):
                continue
            yield rel, f"s3://{bucket}/{obj['key']}", obj["etag"]

    def version(self, uri: str, options: StorageOptions) -> str:
        return str(fsspec_filesystem(options).info(uri).get("ETag", "")).strip('"')

    def exists(self, uri: str, options: StorageOptions) -> bool:
        return fsspec_filesystem(options).exists(uri)

    def move(self, source: str, target: str, options: StorageOptions) -> None:
        fsspec_filesystem(options).cp_file(source, target)  # one object appears whole; one file, never a pattern
        self.remove(source, options)

    def arrow_filesystem(self, uri: str, options: StorageOptions):
        import pyarrow.fs as pafs

        kwargs: dict = {}
        if options.endpoint_url:
            parsed = urlparse(options.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if options.region:
            kwargs["region"] = options.region
        return pafs.S3FileSystem(**kwargs), self.arrow_path(uri)

    def arrow_path(self, uri: str) -> str:
        bucket, key = split_s3(uri)
        return f"{bucket}/{key}".rstrip("/")

    def _call(self, op: str, uri: str, options: StorageOptions, **kwargs) -> Any:
        from fsspec.asyn import sync

        fs = fsspec_filesystem(options)
        bucket, key = split_s3(uri)
        return sync(fs.loop, fs._call_s3, op, Bucket=bucket, Key=key, **kwargs)

    def create(self, uri: str, data: bytes, options: StorageOptions) -> tuple[bool, str | None]:
        try:
            return True, self._call("put_object", uri, options, Body=data, IfNoneMatch="*")["ETag"]
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or error_code(exc) in _LOST_RACE:
                return False, None
            raise

    def replace(self, uri: str, data: bytes, token: str | None, options: StorageOptions) -> tuple[bool, str | None]:
        try:
            return True, self._call("put_object", uri, options, Body=data, IfMatch=token)["ETag"]
        except OSError as exc:
            if error_code(exc) in _LOST_RACE or isinstance(exc, FileNotFoundError):
                return False, None
            raise

    def read_versioned(self, uri: str, options: StorageOptions) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        try:
            response = self._call("get_object", uri, options)
        except FileNotFoundError:
            return None, None
        return sync(fsspec_filesystem(options).loop, response["Body"].read), response["ETag"]


#: ``s3a://`` and ``s3n://`` (Hadoop's names) are S3 too.
ALIASES = re.compile(r"^s3[an]?://")
