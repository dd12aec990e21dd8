"""One ``moderate`` run at a time per OUTPUT: a lease in ``OUTPUT/_lock.json``; a run that
makes no progress gives it up; attempts of one run id keep out of each other's staging.

Two overlapping incremental runs (a nightly batch that lasts more than a night) would each
score what the other has not published yet, so the second refuses with a clear message.
The holder rewrites its lease every ``HEARTBEAT_S``; a lease without a heartbeat for
``STALE_S`` belongs to a run that died and is taken over, and a run resubmitted with the
same run id takes its own lease back at once. On S3 the lease is created and renewed with
conditional writes (``If-None-Match`` / ``If-Match``), so two drivers cannot both win it.

A run alive but stuck (detector actors that no node can place, a listing that hangs) would
heartbeat for ever and refuse every later run, so the heartbeat also watches the run's
progress (``Watch``): after ``STALL_S`` without any, the run stops with ``RunStalled`` and
gives its lease back at once.

Each attempt of a run id stages under its own folder and says it is alive there
(``attempt``); a finishing attempt removes its own folder and those of attempts silent for
``STALE_S`` (crashed), never one still running.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator

from ntf_ray import storage
from ntf_ray.errors import STALL_S, RunStalled
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__package__)

LOCK = "_lock.json"
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

    # ---- storage: create if absent, replace if unchanged, read (conditional writes on S3)
    def _create(self) -> bool:
        written, token = storage.create(self.uri, self._body(), self.options)
        if written:
            self._token = token
        return written

    def _replace(self, token: str | None) -> bool:
        """Overwrite the lease if it is still the version ``token`` names."""
        written, new_token = storage.replace(self.uri, self._body(), token, self.options)
        if written:
            self._token = new_token
        return written

    def _read(self) -> tuple[dict | None, str | None]:
        data, token = storage.read_versioned(self.uri, self.options)
        if data is None:
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


class Watch:
    """What the heartbeat knows of a run's progress: ``progress()`` returns anything that
    changes while the run gets on (``None``: a phase not watched, such as publishing)."""

    def __init__(self, progress: Callable[[], Hashable | None] | None = None, stall_s: float | None = STALL_S):
        self.progress, self.stall_s = progress, stall_s
        self.stalled = False
        self._last: Hashable | None = None
        self._since = time.monotonic()
        self._thread = threading.get_ident()  # the run's thread: where the stop is raised

    def stuck_for(self) -> float:
        """Seconds since the progress last changed (0 while not watched)."""
        if self.progress is None or not self.stall_s:
            return 0.0
        now = self.progress()
        if now is None or now != self._last:
            self._last, self._since = now, time.monotonic()
            return 0.0
        return time.monotonic() - self._since

    def stop_run(self) -> None:
        """Make the run's thread raise ``_Stop`` at its next Python step (turned into
        ``RunStalled``): an asynchronous exception, not SIGINT, whose handler Ray may own."""
        self.stalled = True
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), ctypes.py_object(_Stop))

    def error(self) -> RunStalled:
        return RunStalled(f"no progress for {self.stall_s:g} s (no object listed, no row staged): the run stops "
                          "and gives its lease back. Most often its detector actors cannot be placed: ask for no more "
                          "GPUs or CPUs per actor than one node of the cluster has (--gpus-per-actor, --cpus-per-actor), "
                          "or raise --stall-timeout for a cluster that takes longer to add nodes")


class _Stop(BaseException):
    """Raised in a stalled run's thread by its watchdog (a BaseException: no ``except
    Exception`` on the way swallows it)."""


def _beating(every: float, beat: Callable[[], bool]) -> contextlib.AbstractContextManager:
    """Call ``beat`` every ``every`` seconds in a thread for the block (until it returns False)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            if not beat():
                return

    @contextlib.contextmanager
    def running() -> Iterator[None]:
        thread = threading.Thread(target=loop, name="ntf-ray-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    return running()


@contextlib.contextmanager
def watched(watch: Watch, every: float = HEARTBEAT_S, on_stall: Callable[[], None] | None = None) -> Iterator[Watch]:
    """Stop the block with ``RunStalled`` when ``watch`` sees no progress for its ``stall_s``."""
    def beat() -> bool:
        try:
            stuck = watch.stuck_for()
        except Exception as exc:  # noqa: BLE001 - a progress probe that failed is retried at the next beat
            log.warning("could not read the run's progress: %s", storage.redact(str(exc))[:200])
            return True
        if watch.stall_s and stuck >= watch.stall_s:
            log.error("the run made no progress for %.0f s: stopping it", stuck)
            if on_stall is not None:
                on_stall()
            watch.stop_run()
            return False
        return True

    try:
        with _beating(min(every, watch.stall_s or every), beat):
            yield watch
    except _Stop:
        raise watch.error() from None
    if watch.stalled:  # stopped between the block's end and here
        raise watch.error()


@contextlib.contextmanager
def lease(output: str, run_id: str, options: StorageOptions, *, stale_s: float = STALE_S,
          heartbeat_s: float = HEARTBEAT_S, watch: Watch | None = None) -> Iterator[Lease]:
    """Hold OUTPUT's lease for the block, renewing it in the background; with ``watch``, a run
    without progress for ``watch.stall_s`` gives the lease back and stops (``RunStalled``)."""
    held = Lease(output, run_id, options, stale_s=stale_s)
    held.acquire()
    watch = watch or Watch(stall_s=None)

    def beat() -> bool:
        if watch.stall_s and watch.stuck_for() >= watch.stall_s:
            log.error("run %s made no progress for %.0f s: giving %s back and stopping", run_id, watch.stall_s, LOCK)
            with held._renewing:
                held.lost = True  # no more heartbeats, and no publishing
            held.release()
            watch.stop_run()
            return False
        try:
            held.renew()
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried at the next one
            log.warning("could not renew %s: %s", LOCK, storage.redact(str(exc))[:200])
        return True

    try:
        with _beating(heartbeat_s, beat):
            yield held
    except _Stop:
        raise watch.error() from None
    finally:
        held.release()
    if watch.stalled:
        raise watch.error()


ALIVE = "_alive"


def _alive_path(output: str, run_id: str, attempt: str) -> str:
    from ntf_ray.scan.publish import staging_dir

    return storage.join(staging_dir(output, run_id), f"{ALIVE}-{attempt}.json")


@contextlib.contextmanager
def attempt(output: str, run_id: str, options: StorageOptions, *, heartbeat_s: float = HEARTBEAT_S,
            stale_s: float = STALE_S) -> Iterator[str]:
    """A new attempt of ``run_id``: its staging folder, said alive every ``heartbeat_s`` for the
    block. On the way out its own folder goes, with those of attempts silent for ``stale_s``
    (crashed ones); the folder of an attempt still running stays, whatever this one does."""
    from ntf_ray.scan.publish import staging_dir

    name = uuid.uuid4().hex[:12]
    alive, staged = _alive_path(output, run_id, name), staging_dir(output, run_id, name)

    def beat() -> bool:
        try:
            storage.write_bytes(alive, json.dumps({"heartbeat": _now().isoformat()}).encode(), options)
        except Exception as exc:  # noqa: BLE001 - retried at the next beat
            log.warning("could not say attempt %s is alive: %s", name, storage.redact(str(exc))[:200])
        return True

    beat()  # before anything is staged: a sweeping attempt never takes this one for dead
    try:
        with _beating(heartbeat_s, beat):
            yield staged
    finally:
        storage.remove(staged, options)
        storage.remove(alive, options)
        sweep_attempts(output, run_id, options, stale_s=stale_s)


def sweep_attempts(output: str, run_id: str, options: StorageOptions, *, stale_s: float = STALE_S) -> list[str]:
    """Remove the staging folders of ``run_id``'s attempts silent for ``stale_s``; their names."""
    from ntf_ray.scan.publish import staging_dir

    run = staging_dir(output, run_id)
    names: dict[str, set[str]] = {}
    for path in storage.list_names(run, options):
        first = path.split("/", 1)[0]
        if first.startswith("attempt="):
            names.setdefault(first[len("attempt="):], set())
        elif first.startswith(f"{ALIVE}-") and first.endswith(".json"):
            names.setdefault(first[len(ALIVE) + 1:-len(".json")], set()).add("alive")
    swept = []
    for name, has in names.items():
        age = None
        if "alive" in has:
            try:
                body = json.loads(storage.read_bytes(_alive_path(output, run_id, name), options))
                age = (_now() - dt.datetime.fromisoformat(body["heartbeat"])).total_seconds()
            except FileNotFoundError:
                continue  # finished meanwhile
            except (KeyError, TypeError, ValueError):
                age = None
        if age is not None and age <= stale_s:
            continue
        storage.remove(staging_dir(output, run_id, name), options)
        storage.remove(_alive_path(output, run_id, name), options)
        swept.append(name)
    if swept:
        log.info("removed the staging of %d attempt(s) of run %s that went silent", len(swept), run_id)
    storage.prune(run, options)  # the run's staging folder, if nothing is left in it
    return swept
