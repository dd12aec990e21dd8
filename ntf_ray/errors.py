"""The kinds of error a score-table row can carry, which of them a later ``moderate`` retries,
and the one failure that stops a run instead of becoming a row.

A row's ``error`` is ``"<kind>: <short reason>"``. Everything that writes or parses one
uses the names here:

- ``read``: the object could not be read (transient, missing, changed after listing): retried;
- ``worker_lost``: no row came back, its worker died or its task failed for good: retried,
  until the object has been lost alone ``POISON_AFTER`` times;
- ``poison``: lost alone ``POISON_AFTER`` times (counted across runs): final, never retried;
- ``decode``: the bytes are not a readable image (``decode: out of memory`` is retried);
- ``too_large``: over a size limit (bytes, pixels, tiles, progressive scans);
- ``unsupported_format``, ``unsupported_name``: refused on purpose; final.
"""

from __future__ import annotations

import re

READ, DECODE, TOO_LARGE = "read", "decode", "too_large"
UNSUPPORTED_FORMAT, UNSUPPORTED_NAME = "unsupported_format", "unsupported_name"
WORKER_LOST, POISON = "worker_lost", "poison"
#: Written by a detector actor whose network scored NaN or infinity; such a row is never
#: published: the driver stops the run with ``DetectorFault`` when it sees one.
DETECTOR = "detector"

#: Error prefixes the next ``moderate`` scores again; any other error is final.
RETRIED_ERRORS = (f"{READ}:", f"{WORKER_LOST}:", f"{DECODE}: out of memory")
#: Times an object may be lost while it was scored alone before it gets a final ``poison:``
#: row: its worker died (or its task failed) every time it was handled on its own, so it is
#: the object, not bad luck. A run tries a lost object alone at most ``SOLO_ATTEMPTS`` times.
POISON_AFTER = 3
SOLO_ATTEMPTS = 2


#: How a ``worker_lost`` row says how many times its object was lost alone in its run (read
#: back, across runs, by ``pyarrow.compute.extract_regex`` and ``lost_alone``).
LOST_ALONE_PATTERN = r"^worker_lost: .*?\((?P<alone>\d+) alone in this run"
_ALONE = re.compile(LOST_ALONE_PATTERN)


def lost_error(alone: int, total: int) -> str:
    """The row of an object no row came back for: lost ``alone`` times while scored on its
    own in this run, ``total`` such losses counted across runs (this one included)."""
    if total >= POISON_AFTER:
        return (f"{POISON}: its worker died each time it was scored alone ({total} times across runs); "
                "it is not tried again")
    if alone:
        return (f"{WORKER_LOST}: its worker died each time it was scored alone ({alone} alone in this run, {total} of "
                f"{POISON_AFTER} before it is final); the next moderate tries it again")
    return (f"{WORKER_LOST}: no row came back for this object (its worker died or its task failed for good); "
            "the next moderate scores it again")


def lost_alone(error: str | None) -> int:
    """How many times the row's object was lost alone in the run that wrote ``error`` (0 for
    any other row)."""
    m = _ALONE.match(error or "")
    return int(m.group("alone")) if m else 0


def error(kind: str, reason: str) -> str:
    """A row's error: ``error(DECODE, "truncated image")`` is ``"decode: truncated image"``."""
    return f"{kind}: {reason}"


def kind(error: str) -> str:
    """``"decode"`` for ``"decode: truncated image"``."""
    return error.split(":", 1)[0]


def is_retried(error: str | None) -> bool:
    return error is not None and error.startswith(RETRIED_ERRORS)


class DetectorFault(RuntimeError):
    """The detector itself is broken (it scored NaN or infinity, or every object it was given
    alone killed its worker): no image's score can be trusted, so nothing it scores may be
    written as a decision, and the run stops."""


#: How long a run may go without progress (objects listed, rows staged) before it stops with
#: ``RunStalled`` (``ntf_ray.scan.lock``): long enough for a cluster to add a node, short enough
#: that a stuck nightly run does not hold OUTPUT's lease into the next night.
STALL_S = 1800.0


class RunStalled(RuntimeError):
    """A run made no progress for its stall timeout: it stopped, and gave its lease back."""
