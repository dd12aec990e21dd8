"""What a person running a command sees, and where the rest goes.

The terminal gets the command's own lines (what it is doing, its results, its warnings) and
one progress bar per long step when it is a terminal. Ray's internal logs (its Python
loggers, the output of its actors and tasks, the C++ lines of this process's core worker)
go to a file, ``OUTPUT/_logs/COMMAND-UTCSTAMP-PID.log``; with ``-v`` they reach the terminal too.
The leading underscore keeps the folder out of what reads a score table as a dataset
(pyarrow, Spark and Hive skip ``_``-prefixed paths; DuckDB globs ``*.parquet``).

``session`` sets this up around one command and undoes it after, so a process that runs
several commands (tests, notebooks) gets its Ray back as it was.

Nothing written anywhere carries a credential: ``terminal`` (around every command) redacts
every log record and what goes to ``sys.stdout``/``sys.stderr`` (``ntf_ray.storage.redaction``), the
session redacts its workers' lines as they come and the log file (the C++ lines of fd 2 too)
before it is kept. ``-v`` shows ntf-ray's own debug lines, not those of the storage libraries
(botocore signs every request in them); ``-vv`` shows those too, redacted like the rest.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ntf_ray.storage import redaction

LOG_DIR = "_logs"
#: Loggers of Ray's that write to the console themselves (they do not propagate to the root).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
#: Lines of Ray's own actors that say nothing a user can act on, dropped from the log file too.
HARMLESS = (
    # Ray Train's PlacementGroupCleaner asks the State API, which a local Ray started without
    # its dashboard (as ``init_local_ray`` starts it) does not serve: it fails every second
    # for the whole run. Its only job, freeing a placement group when the train controller
    # dies while the driver lives on, is moot on a local Ray that ends with its driver.
    "Failed to query Ray Train Controller actor state",
    # The raylet counts every Python worker it starts (train controller, split coordinator,
    # dataset manager, actor pools, tasks) against 4x the node's cores: a small machine passes
    # that in any training run while nothing is wrong.
    "worker processes have been started on node",
)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray.RAY_TQDM_MAGIC

_active: "Session | None" = None


def interactive() -> bool:
    """Whether progress bars are drawn: the command's terminal is a terminal."""
    return _active.interactive if _active is not None else _isatty(sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(*, total: float, desc: str, unit: str) -> Any:
    """A progress bar on the terminal, or None where there is no terminal to draw on."""
    if not interactive():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.4g}/{total:g} {unit} [{elapsed}<{remaining}{postfix}]")


class Session:
    """One command's terminal and log file (see the module's docstring)."""

    def __init__(self, log_path: Path, *, verbose: bool, folder: str | None = None, name: str = "",
                 options: Any = None) -> None:
        self.log_path = log_path
        self.verbose = verbose
        self.folder, self.name = folder, name
        self.options = options
        #: where the log is once the session is over (None: nothing worth keeping was written)
        self.kept: str | None = None
        # Ray Data draws bars when stdout is a terminal, ours draw on stderr: both, or a log
        self.interactive = _isatty(sys.stderr) and _isatty(sys.stdout)
        self._lock = threading.Lock()  # the file's writers (Ray's threads) against its closing
        self.file: TextIO = open(log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._undo: list[Any] = []
        self._closed = False
        self._ray_print: Any = None  # Ray's printer of its workers' output, while ours replaces it
        self._ray_message: Any = None  # Ray's printer of the raylet's messages, while ours filters them

    # ------------------------------------------------------------------ set up, undone in reverse
    def start(self) -> None:
        import ray.data  # noqa: F401  # its import configures the "ray.data" logger: before we change it

        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.setLevel(logging.INFO)
        self._handler = handler
        root = logging.getLogger()
        root.addHandler(handler)
        self._undo.append(lambda: (root.removeHandler(handler), handler.close()))
        for name in RAY_LOGGERS:
            self._send_to_file(logging.getLogger(name))
        if not self.verbose:
            self._redirect_fd2()
        self._quiet_ray_data()
        self._filter_raylet_messages()
        attach_worker_logs()

    def _filter_raylet_messages(self) -> None:
        from ray._private import worker

        # Private to Ray (2.60): the driver's thread that prints the raylet's messages looks
        # this function up by name on every message.
        original = getattr(worker, "print_to_stdstream", None)
        if original is None:
            return
        self._ray_message = original
        worker.print_to_stdstream = self.raylet_message

        def undo() -> None:
            worker.print_to_stdstream = original

        self._undo.append(undo)

    def _send_to_file(self, logger: logging.Logger) -> None:
        if logger.propagate and not logger.handlers:
            return  # reaches the root, which writes the file
        logger.addHandler(self._handler)
        self._undo.append(lambda: logger.removeHandler(self._handler))
        if self.verbose:
            return
        consoles = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)
                    and isinstance(h, logging.StreamHandler)]
        for h in consoles:
            logger.removeHandler(h)
        self._undo.append(lambda: [logger.addHandler(h) for h in consoles])

    def _redirect_fd2(self) -> None:
        """Lines written straight to file descriptor 2 by C/C++ code in this process (Ray's
        core worker) go to the file; Python's ``sys.stderr`` goes on to the terminal."""
        if sys.stderr is not None:
            sys.stderr.flush()
        terminal_fd = os.dup(2)
        self._undo.append(lambda: os.close(terminal_fd))
        old_stderr = sys.stderr
        if _fileno(old_stderr) == 2:
            terminal = open(os.dup(terminal_fd), "w", buffering=1, encoding=getattr(old_stderr, "encoding", None)
                            or "utf-8", errors="backslashreplace")
            ours = redaction.RedactingStream(terminal)  # what the command prints there is redacted too
            # handlers made before (the command's own logging) hold the old object, i.e. fd 2
            # (or the stream ``old_stderr`` redacts, where they were made before the redaction)
            moved = [(h, h.stream) for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                     and getattr(h, "stream", None) in (old_stderr, getattr(old_stderr, "stream", old_stderr))]

            def give_back() -> None:
                for h, stream in moved:
                    h.setStream(stream)
                if sys.stderr is ours:
                    sys.stderr = old_stderr
                if faulthandler.is_enabled():  # ray.init enabled it on ``ours``: crash dumps to fd 2
                    faulthandler.enable(file=2)
                terminal.close()

            self._undo.append(give_back)
            sys.stderr = ours
            for h, _ in moved:
                h.setStream(ours)
        os.dup2(self.file.fileno(), 2)

        def undo() -> None:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(terminal_fd, 2)

        self._undo.append(undo)

    def _quiet_ray_data(self) -> None:
        """Ray Data's bars: its overall bar on a terminal (not one per operator), none otherwise,
        where it would log a many-line table every 10 s (that table goes to the file)."""
        from ray.data import DataContext

        ctx = DataContext.get_current()
        saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
        if not self.verbose:
            ctx.enable_operator_progress_bars = False
            ctx.enable_progress_bars = self.interactive

        def undo() -> None:
            ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved

        self._undo.append(undo)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        steps = [lambda: _detach_worker_logs(self), *reversed(self._undo)]
        for step in steps:
            try:
                step()
            except Exception as exc:  # undoing the rest matters more than this one
                print(f"ntf-ray: could not restore the terminal's set-up ({exc})", file=sys.stderr)
        with self._lock:
            self.file.close()
        try:
            self.kept = self._keep()
        except OSError as exc:  # never in place of the command's own outcome
            self.kept = str(self.log_path)
            print(f"ntf-ray: the log stays at {self.log_path}: {exc}", file=sys.stderr)

    def _keep(self) -> str | None:
        """Move the log under ``folder/_logs`` (see ``session``)."""
        import ray

        from ntf_ray import storage

        _redact_file(self.log_path)  # what reached fd 2 from C/C++ code came in unredacted
        if self.folder is None:
            return str(self.log_path)
        target = storage.join(self.folder, LOG_DIR, self.name)
        if storage.local_path(self.folder) is None:  # an object store: the log goes up once, at the end
            if not ray.is_initialized():
                self.log_path.unlink()  # refused before it started anything: nothing to keep
                return None
            try:
                storage.write_bytes(target, self.log_path.read_bytes(), self.options)
            except Exception as exc:
                print(f"ntf-ray: uploading the log to {target} failed ({type(exc).__name__}); it stays at "
                      f"{self.log_path}", file=sys.stderr)
                return str(self.log_path)
            self.log_path.unlink()
            return target
        if Path(self.folder).is_dir():
            Path(target).parent.mkdir(exist_ok=True)
            shutil.move(self.log_path, target)
            return target
        if ray.is_initialized() and self.log_path.stat().st_size:
            return str(self.log_path)
        self.log_path.unlink()
        return None

    # ------------------------------------------------------------------ Ray's worker output
    def worker_lines(self, data: dict[str, Any]) -> None:
        """Ray's handler for the output its actors and tasks send this driver."""
        lines = [redaction.redact(line) for line in data.get("lines", []) if not any(h in line for h in HARMLESS)]
        if data.get("pid") == "autoscaler":  # its status table every few seconds: only its events, as Ray prints
            lines = _autoscaler_events(lines)
        self._write(data, lines)
        if self.verbose and self._ray_print is not None:
            self._ray_print({**data, "lines": [redaction.redact(line) for line in data.get("lines", [])]})

    def raylet_message(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        """Ray's printer of the raylet's messages to this driver (a worker that died, a task
        killed for memory): to the terminal and the file, but for the ``HARMLESS`` ones."""
        if self._closed:  # a Ray started in this session may still call it: Ray's own printer
            self._ray_message(data, ignore_prefix=ignore_prefix)
            return
        lines = [redaction.redact(line) for line in data.get("lines", []) if not any(h in line for h in HARMLESS)]
        if data.get("pid") == "raylet":  # (with -v, workers' lines reach here too, already in the file)
            self._write(data, lines)
        if lines:
            self._ray_message({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    def _write(self, data: dict[str, Any], lines: list[str]) -> None:
        lines = [line for line in lines if _TQDM_MAGIC not in line]  # a remote bar's state, for Ray's printer
        if not lines:
            return
        name = data.get("actor_name") or data.get("task_name") or "worker"
        where = f", ip={data['ip']}" if data.get("ip") and data.get("ip") != data.get("localhost") else ""
        prefix = f"({name} pid={data.get('pid')}{where}) "
        with self._lock:
            if not self._closed:  # Ray's threads may still deliver a line while the session ends
                self.file.write("".join(prefix + line.rstrip("\n") + "\n" for line in lines))


def _autoscaler_events(lines: list[str]) -> list[str]:
    from ray._private import worker

    try:
        return list(worker.filter_autoscaler_events(lines))
    except Exception:  # Ray's filter asks the cluster which autoscaler it runs: without one, its v1 marker
        return [line.split(":event_summary:", 1)[1] for line in lines if ":event_summary:" in line]


def _redact_file(path: Path) -> None:
    """Rewrite the log file at ``path`` redacted, line by line (it may be large)."""
    redacted = path.with_name(path.name + ".redacted")
    with open(path, encoding="utf-8", errors="backslashreplace") as src, \
            open(redacted, "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(redaction.redact(line))
    os.replace(redacted, path)


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


@contextlib.contextmanager
def terminal(verbose: int = 0) -> Iterator[None]:
    """The terminal of one command: its log lines, and nothing secret in anything it writes
    (see the module's docstring). ``-v`` puts ntf-ray's loggers at DEBUG and leaves the
    libraries at INFO: botocore's debug lines are every request's headers and signing steps,
    a thousand lines a scan. ``-vv`` puts every logger at DEBUG."""
    own = logging.getLogger("ntf_ray")
    saved = own.level
    with redaction.installed():  # first: the handler basicConfig makes writes to the redacted sys.stderr
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, format=_FORMAT, datefmt="%H:%M:%S")
        if verbose:
            own.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            own.setLevel(saved)


def log_name(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"


@contextlib.contextmanager
def session(folder: str, command: str, *, verbose: bool = False, options: Any = None) -> Iterator[Session]:
    """Run one command with Ray's internal logs in ``folder/_logs`` (see the module's docstring).

    The log is written to a temporary file while the command runs and moved under ``folder``
    at the end, so that a command refused before it made its output leaves no folder behind;
    where there is no such folder (a local one the command never made), the file stays where
    it is and ``Session.kept`` says so.
    """
    global _active
    if _active is not None:  # nested (the demo runs the others): the outer session stays
        yield _active
        return
    fd, tmp = tempfile.mkstemp(prefix=f"ntf-ray-{command}-", suffix=".log")
    os.close(fd)
    s = Session(Path(tmp), verbose=verbose, folder=folder, name=log_name(command), options=options)
    _active = s
    try:
        s.start()
        yield s
    finally:
        _active = None
        s.close()


# ---------------------------------------------------------------------- Ray's log forwarding
def _dispatcher() -> Any:
    from ray._private import worker

    # Private to Ray (2.60): the hook through which a driver prints what its workers print.
    # Without it (another Ray), their output reaches the terminal as Ray prints it.
    return getattr(worker, "global_worker_stdstream_dispatcher", None)


def attach_worker_logs() -> None:
    """Send the output of Ray's actors and tasks to the active session's file (called when
    Ray starts, and when a session starts with Ray running)."""
    import ray

    s = _active
    if s is None or not ray.is_initialized() or s._ray_print is not None:
        return
    dispatcher = _dispatcher()
    lock = getattr(dispatcher, "_lock", None)
    if lock is None:
        return
    with lock:  # one swap: no line is printed by neither
        pairs = list(dispatcher.handlers)
        theirs = [h for name, h in pairs if name == "ray_print_logs"]
        if len(theirs) != 1:
            return  # Ray was started with log_to_driver=False (nothing arrives here), or another Ray
        s._ray_print = theirs[0]
        dispatcher.handlers = [(n, s.worker_lines if n == "ray_print_logs" else h) for n, h in pairs]


def _detach_worker_logs(s: Session) -> None:
    if s._ray_print is None:
        return
    dispatcher = _dispatcher()
    with dispatcher._lock:
        # only where ours is still there: ray.shutdown removes it, and the next ray.init adds its own
        dispatcher.handlers = [(n, s._ray_print if h == s.worker_lines else h) for n, h in dispatcher.handlers]
    s._ray_print = None
