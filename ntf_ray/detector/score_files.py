"""Score named files or objects one at a time: what ``ntf-ray score`` prints, one row per input.

For a few files on one machine; a prefix or a manifest of many objects is a scan
(``ntf_ray.ray_edge.scan``), which reads and scores them in batches on Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ntf_ray import storage
from ntf_ray.detector.scorer import Scorer
from ntf_ray.errors import TOO_LARGE
from ntf_ray.images.provenance import PROVENANCE_COLUMNS, C2paTrust, provenance_of
from ntf_ray.storage import DEFAULT_MAX_BYTES, ObjectTooLarge, StorageOptions


def input_error(exc: BaseException) -> str:
    """The row error of an input that could not be read: ``too_large:`` past the cap (as a
    scan's row says it), ``read:`` for the rest, a device, FIFO or socket included.

    Raises what is not one input's failure: an S3 client that cannot reach its endpoint at
    all (botocore's errors), which every other input would meet too."""
    if isinstance(exc, ObjectTooLarge):
        return f"{TOO_LARGE}: {exc}"
    if isinstance(exc, (OSError, ValueError)):
        return storage.read_error(exc)
    raise exc


def read_one(uri: str, options: StorageOptions | None, max_bytes: int | None) -> bytes | str:
    """The bytes of one file or object, or its row's error (``input_error``). At most
    ``max_bytes + 1`` bytes are read, as in a scan; a file that is not a regular file is not
    read at all (it could block or never end)."""
    (value,) = storage.read_many([uri], options, max_bytes=max_bytes)
    return input_error(value) if isinstance(value, BaseException) else value


def score_files(scorer: Scorer, inputs: Iterable[str | Path], *, options: StorageOptions | None = None,
                max_bytes: int | None = DEFAULT_MAX_BYTES,
                provenance: C2paTrust | None = None) -> Iterator[dict[str, Any]]:
    """One row ``{uri, score, is_fake, error, decoder}`` per input, in order, as each is scored,
    with the score table's provenance columns (null unless ``provenance``: the trust list to
    read C2PA credentials with, ``images.provenance``).

    A file that cannot be read gets a row with ``read_one``'s error (``read:`` or ``too_large:``);
    an input that is not a local path or ``s3://`` URI raises ``ValueError`` (a wrong argument).
    """
    for uri in inputs:
        uri = storage.normalize(uri)
        data = read_one(uri, options, max_bytes)
        claims = dict.fromkeys(PROVENANCE_COLUMNS)
        if isinstance(data, str):
            yield {"uri": uri, "score": None, "is_fake": None, "error": data, "decoder": None, **claims}
            continue
        r = scorer.score_bytes([data])[0]
        if provenance is not None:
            claims = provenance_of(data, provenance, max_pixels=scorer.max_pixels).columns()
        yield {"uri": uri, "score": r.score, "is_fake": r.is_fake, "error": r.error, "decoder": r.decoder, **claims}
