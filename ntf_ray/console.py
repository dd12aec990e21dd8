"""What a person running a command sees, and where the rest goes.

The terminal gets the command's own lines (what it is doing, its results, its warnings) and
one progress bar per long step when it is a terminal. Ray's internal logs (its Python
loggers, the output of its actors and tasks, the C++ lines of this process's core worker)
go to a file, ``OUTPUT/_logs/COMMAND-UTCSTAMP.log``; with ``-v`` they reach the terminal too.
The leading underscore keeps the folder out of what reads a score table as a dataset
(pyarrow, Spark and Hive skip ``_``-prefixed paths; DuckDB globs ``*.parquet``).

``session`` sets this up around one command and undoes it after, so a process that runs
several commands (tests, notebooks) gets its Ray back as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

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
        self.interactive = _isatty(sys.stderr)
        self.file: TextIO = open(log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._undo: list[Any] = []
        self._closed = False

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
        consoles = [h for h in logger.handlers if type(h) is not logging.FileHandler
                    and isinstance(h, logging.StreamHandler) and h is not self._handler]
        for h in consoles:
            logger.removeHandler(h)
        self._undo.append(lambda: [logger.addHandler(h) for h in consoles])

    def _redirect_fd2(self) -> None:
        """Lines written straight to file descriptor 2 by C/C++ code in this process (Ray's
        core worker) go to the file; Python's ``sys.stderr`` goes on to the terminal."""
        sys.stderr.flush()
        terminal_fd = os.dup(2)
        old_stderr = sys.stderr
        writes_fd2 = _fileno(old_stderr) == 2
        if writes_fd2:
            sys.stderr = open(os.dup(terminal_fd), "w", buffering=1, encoding=getattr(old_stderr, "encoding", None)
                              or "utf-8", errors="backslashreplace")
            # handlers made before (the command's own logging) hold the old object, i.e. fd 2
            moved = [h for h in logging.getLogger().handlers
                     if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is old_stderr]
            for h in moved:
                h.setStream(sys.stderr)
        os.dup2(self.file.fileno(), 2)

        def undo() -> None:
            sys.stderr.flush()
            os.dup2(terminal_fd, 2)
            os.close(terminal_fd)
            if writes_fd2:
                for h in moved:
                    h.setStream(old_stderr)
                sys.stderr.close()
                sys.stderr = old_stderr

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
        self._closed = True
        _detach_worker_logs(self)
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # undoing the rest matters more than this one
                print(f"ntf-ray: could not restore the terminal's set-up ({exc})", file=sys.stderr)
        self.file.close()
        self.kept = self._keep()

    def _keep(self) -> str | None:
        """Move the log under ``folder/_logs`` (see ``session``)."""
        import ray

        from ntf_ray import storage

        if self.folder is None:
            return str(self.log_path)
        target = storage.join(self.folder, LOG_DIR, self.name)
        if storage.is_s3(self.folder):
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
        lines = [line for line in data.get("lines", []) if not any(h in line for h in HARMLESS)]
        if data.get("pid") == "autoscaler":  # its status table every few seconds: only its events, as Ray prints
            lines = _autoscaler_events(lines)
        self._write(data, lines)
        if self.verbose and self._ray_print is not None:
            self._ray_print(data)

    def raylet_message(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        """Ray's printer of the raylet's messages to this driver (a worker that died, a task
        killed for memory): to the terminal and the file, but for the ``HARMLESS`` ones."""
        if self._closed:  # a Ray started in this session may still call it: Ray's own printer
            self._ray_message(data, ignore_prefix=ignore_prefix)
            return
        lines = [line for line in data.get("lines", []) if not any(h in line for h in HARMLESS)]
        if data.get("pid") == "raylet":  # (with -v, workers' lines reach here too, already in the file)
            self._write(data, lines)
        if lines:
            self._ray_message({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    def _write(self, data: dict[str, Any], lines: list[str]) -> None:
        if not lines:
            return
        name = data.get("actor_name") or data.get("task_name") or "worker"
        where = f", ip={data['ip']}" if data.get("ip") and data.get("ip") != data.get("localhost") else ""
        prefix = f"({name} pid={data.get('pid')}{where}) "
        self.file.write("".join(prefix + line.rstrip("\n") + "\n" for line in lines))

    _ray_print: Any = None


def _autoscaler_events(lines: list[str]) -> list[str]:
    from ray._private import worker

    try:
        return list(worker.filter_autoscaler_events(lines))
    except Exception:  # Ray's filter asks the cluster which autoscaler it runs: without one, its v1 marker
        return [line.split(":event_summary:", 1)[1] for line in lines if ":event_summary:" in line]


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


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
    ours = [h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
    if len(ours) != 1:
        return  # Ray was started with log_to_driver=False (nothing arrives here), or another Ray
    s._ray_print = ours[0]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", s.worker_lines)


def _detach_worker_logs(s: Session) -> None:
    if s._ray_print is None:
        return
    dispatcher = _dispatcher()
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", s._ray_print)
    s._ray_print = None
