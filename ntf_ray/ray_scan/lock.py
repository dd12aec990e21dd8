"""One ``moderate`` run at a time per OUTPUT: a lease in ``OUTPUT/_lock.json``.

Two overlapping incremental runs (a nightly batch that lasts more than a night) would each
score what the other has not published yet, so the second refuses with a clear message.
The holder rewrites its lease every ``HEARTBEAT_S``; a lease without a heartbeat for
``STALE_S`` belongs to a run that died and is taken over, and a run resubmitted with the
same run id takes its own lease back at once. On S3 the lease is created and renewed with
conditional writes (``If-None-Match`` / ``If-Match``), so two drivers cannot both win it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ntf_ray import storage
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)

LOCK = "_lock.json"
# S3's answers to a conditional write that another writer won (or is winning)
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
STALE_S = 600.0
HEARTBEAT_S = 60.0


class OutputBusy(ValueError):
    """Another run holds OUTPUT's lease (a ValueError: the CLI reports it as a usage error)."""


class LeaseLost(ValueError):
    """This run's lease was taken over (it went without a heartbeat, or the run was resubmitted)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Lease:
    def __init__(self, output: str, run_id: str, options: StorageOptions, *, stale_s: float = STALE_S):
        self.uri = storage.join(storage.normalize(output), LOCK)
        self.run_id, self.options, self.stale_s = run_id, options, stale_s
        self.since = _now().isoformat()
        self.attempt = uuid.uuid4().hex[:12]  # a resubmission of the same run id is another attempt
        self._token: str | None = None  # S3: the lease's etag as we last wrote it
        self._renewing = threading.Lock()  # the heartbeat thread and check() must not race each other
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "attempt": self.attempt, "since": self.since,
                           "heartbeat": _now().isoformat()}).encode()

    def _ours(self, held: dict | None) -> bool:
        return bool(held) and held.get("run_id") == self.run_id and held.get("attempt") == self.attempt

    # ---- storage: create if absent, replace if unchanged, read
    def _s3(self, op: str, **kwargs):
        from fsspec.asyn import sync

        fs = storage.fsspec_filesystem(self.options)
        bucket, key = storage.split_s3(self.uri)
        return sync(fs.loop, fs._call_s3, op, Bucket=bucket, Key=key, **kwargs)

    def _create(self) -> bool:
        if storage.is_s3(self.uri):
            try:
                self._token = self._s3("put_object", Body=self._body(), IfNoneMatch="*")["ETag"]
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, FileExistsError) or storage._s3_error_code(exc) in _LOST_RACE:
                    return False
                raise
            return True
        Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._body())
        return True

    def _replace(self, token: str | None) -> bool:
        """Overwrite the lease if it is still the version ``token`` names."""
        if storage.is_s3(self.uri):
            try:
                self._token = self._s3("put_object", Body=self._body(), IfMatch=token)["ETag"]
            except OSError as exc:
                if storage._s3_error_code(exc) in _LOST_RACE or isinstance(exc, FileNotFoundError):
                    return False
                raise
            return True
        storage.write_bytes(self.uri, self._body())  # one machine: a rename, last writer wins
        return True

    def _read(self) -> tuple[dict | None, str | None]:
        if storage.is_s3(self.uri):
            try:
                response = self._s3("get_object")
            except FileNotFoundError:
                return None, None
            from fsspec.asyn import sync

            fs = storage.fsspec_filesystem(self.options)
            data = sync(fs.loop, response["Body"].read)
            token = response["ETag"]
        else:
            try:
                data, token = Path(self.uri).read_bytes(), None
            except FileNotFoundError:
                return None, None
        try:
            return json.loads(data), token
        except ValueError:
            return {}, token  # unreadable: treated as stale

    # ---- the lease
    def acquire(self) -> None:
        if self._create():
            return
        held, token = self._read()
        if held is None and self._create():
            return
        held = held or {}
        age = self._age(held)
        if held.get("run_id") == self.run_id or age is None or age > self.stale_s:
            if held.get("run_id") != self.run_id:
                log.warning("taking over %s from run %s, silent for %s s", LOCK, held.get("run_id"),
                            "?" if age is None else f"{age:.0f}")
            if self._replace(token):
                return
        heartbeat = "never" if age is None else f"{age:.0f} s ago"
        raise OutputBusy(
            f"run {held.get('run_id')} is scoring into this output (since {held.get('since')}, last heartbeat "
            f"{heartbeat}): a second moderate run would score the same objects again, so this one stops. "
            f"Run it after that one finishes; if that run died, its lease expires {self.stale_s:.0f} s after its last "
            f"heartbeat, or resubmit it with --run-id {held.get('run_id')}")

    def _age(self, held: dict) -> float | None:
        try:
            return (_now() - dt.datetime.fromisoformat(held["heartbeat"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            return None

    def renew(self) -> None:
        with self._renewing:
            if self.lost:
                return
            held, token = self._read()
            if not self._ours(held) or not self._replace(token):
                self.lost = True

    def check(self) -> None:
        """Raise if another run took the lease over: publishing now could duplicate its rows."""
        self.renew()
        if self.lost:
            raise LeaseLost(f"run {self.run_id} lost this output's lease to another attempt (a resubmission, or a run "
                            f"that found no heartbeat for {self.stale_s:.0f} s); its rows are not published")

    def release(self) -> None:
        held, _ = self._read()
        if self._ours(held):
            storage.remove(self.uri, self.options)


@contextlib.contextmanager
def lease(output: str, run_id: str, options: StorageOptions, *, stale_s: float = STALE_S,
          heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold OUTPUT's lease for the block, renewing it in the background."""
    held = Lease(output, run_id, options, stale_s=stale_s)
    held.acquire()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                held.renew()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                log.warning("could not renew %s: %s", LOCK, storage.redact(str(exc))[:200])

    thread = threading.Thread(target=beat, name="ntf-ray-lease", daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join(timeout=5)
        held.release()
