"""Score named files or objects one at a time: what ``ntf-ray score`` prints, one row per input.

For a few files on one machine; a prefix or a manifest of many objects is a scan
(``ntf_ray.ray_scan``), which reads and scores them in batches on Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ntf_ray import storage
from ntf_ray.scoring import Scorer
from ntf_ray.storage import StorageOptions


def score_files(scorer: Scorer, inputs: Iterable[str | Path], *,
                options: StorageOptions | None = None) -> Iterator[dict[str, Any]]:
    """One row ``{uri, score, is_fake, error, decoder}`` per input, in order, as each is scored.

    A file that cannot be read gets a row with ``storage.read_error``'s ``read:`` error;
    an input that is not a local path or ``s3://`` URI raises ``ValueError`` (a wrong argument).
    """
    for uri in inputs:
        uri = storage.normalize(uri)
        try:
            data = storage.read_bytes(uri, options)
        except (OSError, ValueError) as exc:
            yield {"uri": uri, "score": None, "is_fake": None, "error": storage.read_error(exc), "decoder": None}
            continue
        r = scorer.score_bytes([data])[0]
        yield {"uri": uri, "score": r.score, "is_fake": r.is_fake, "error": r.error, "decoder": r.decoder}
