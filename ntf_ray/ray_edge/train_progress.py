"""Training progress on the driver: one bar per stage on a terminal, one line per epoch otherwise.

The epochs run in Ray Train's workers, whose own output goes to the command's log file
(``ntf_ray.ray_edge.console``). Rank 0 posts its progress to a small actor, the ``ProgressBoard``;
the driver, blocked in ``trainer.fit()``, reads it from a thread. Posts are fire-and-forget
and throttled, so the board costs the training loop nothing it would wait for.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from ntf_ray.ray_edge import console

#: seconds between two step posts of rank 0, and between two reads of the driver
POST_EVERY_S = 1.0
READ_EVERY_S = 0.5
#: the figures of an epoch's summary line, in this order, where the epoch reported them
SUMMARY_KEYS = ("loss", "images_per_s", "seconds", "rows_dropped")


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where rank 0 posts how far its stage is; the driver reads it."""

    def __init__(self) -> None:
        self.epoch, self.fraction = 0, 0.0
        self.done: list[tuple[int, dict[str, float]]] = []

    def step(self, epoch: int, fraction: float) -> None:
        self.epoch, self.fraction = epoch, min(fraction, 1.0)

    def epoch_done(self, epoch: int, summary: dict[str, float]) -> None:
        self.epoch, self.fraction = epoch + 1, 0.0
        self.done.append((epoch, summary))

    def read(self, seen: int) -> tuple[int, float, list[tuple[int, dict[str, float]]]]:
        """The current epoch and fraction of it, and the epochs finished after the first ``seen``."""
        return self.epoch, self.fraction, self.done[seen:]


class Poster:
    """Rank 0's side: ``batch(b)`` after each batch, ``epoch_done`` after each epoch."""

    def __init__(self, board: Any, epoch: int, expected_images: int, world: int) -> None:
        self.board, self.epoch = board, epoch
        self.expected = max(1, expected_images)
        self.world = world
        self.images = 0
        self.last = time.perf_counter()

    def batch(self, batch: Any) -> None:
        self.images += batch_images(batch)
        now = time.perf_counter()
        if now - self.last >= POST_EVERY_S:
            self.last = now
            # every rank sees about as many images: this rank's share stands for all of them
            self.board.step.remote(self.epoch, self.images * self.world / self.expected)

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        self.board.epoch_done.remote(self.epoch, {k: float(metrics[k]) for k in SUMMARY_KEYS
                                                  if isinstance(metrics.get(k), (int, float))})


def batch_images(batch: Any) -> int:
    """Images in one training batch (a dict of tensors or a tuple whose first item is one)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(first)


def summary_line(stage: int, epoch: int, epochs: int, summary: dict[str, float]) -> str:
    parts = [f"stage {stage} epoch {epoch + 1}/{epochs}"]
    if "loss" in summary:
        parts.append(f"loss {summary['loss']:.4g}")
    if "images_per_s" in summary:
        parts.append(f"{summary['images_per_s']:.0f} images/s")
    if "seconds" in summary:
        parts.append(f"{summary['seconds']:.1f} s")
    if summary.get("rows_dropped"):
        parts.append(f"{summary['rows_dropped']:.0f} rows dropped")
    return ", ".join(parts)


class StageWatch:
    """The driver's side, around ``trainer.fit()``: a bar (terminal) or a line per epoch."""

    def __init__(self, stage: int, epochs: int) -> None:
        self.stage, self.epochs = stage, epochs
        self.board = ProgressBoard.remote()
        self._stop = threading.Event()
        self._seen = 0
        self._printed: set[int] = set()
        self._bar = None
        self._thread = threading.Thread(target=self._run, name=f"ntf-stage{stage}-progress", daemon=True)

    def __enter__(self) -> "StageWatch":
        self._bar = console.bar(total=self.epochs, desc=f"stage {self.stage}", unit="epochs")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._read()  # the last epochs, posted after the thread's last read
        finally:
            if self._bar is not None:
                self._bar.close()
            try:
                ray.kill(self.board)
            except Exception:  # Ray already gone: nothing to free, and fit()'s own error comes first
                pass

    def _run(self) -> None:
        while not self._stop.wait(READ_EVERY_S):
            self._read()

    def _read(self) -> None:
        try:
            epoch, fraction, done = ray.get(self.board.read.remote(self._seen), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return  # progress is best-effort; the run's own errors come from fit()
        for finished, summary in done:
            if finished in self._printed:  # an epoch run again after a restart from a checkpoint
                continue
            self._printed.add(finished)
            line = summary_line(self.stage, finished, self.epochs, summary)
            if self._bar is not None:
                self._bar.set_postfix_str(line.split(", ", 1)[-1], refresh=False)
            else:
                print(line, flush=True)
        self._seen += len(done)
        if self._bar is not None:
            self._bar.n = min(float(self.epochs), epoch + fraction)
            self._bar.refresh()
