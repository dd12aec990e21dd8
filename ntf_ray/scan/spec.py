"""What a scan is asked to do (``ScanSpec``), what it returns, and how its run is named and summed up.

Ray-free: the Ray edge runs a spec (``ntf_ray.ray_edge.scan.scan``); the table, listing and
lock read it."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ntf_ray.images.decode import DEFAULT_MAX_PIXELS
from ntf_ray.scan.inventory import DEFAULT_MAX_BYTES as INVENTORY_MAX_BYTES
from ntf_ray.scan.inventory import DEFAULT_MAX_ROWS as INVENTORY_MAX_ROWS
from ntf_ray.scan.lock import STALL_S
from ntf_ray.scan.reading import DEFAULT_MAX_BYTES
from ntf_ray.storage import DEFAULT_READ_AHEAD_BYTES


@dataclass(kw_only=True)
class ActorPool:
    """The detector actors that score a stream and the read blocks that feed them: the options
    scan, moderate, evaluate and calibrate share, defined once here and passed whole
    (``ray_edge.scan.actor.scored_stream``)."""

    batch_size: int | None = None  # images per detector call; default 256 on GPU actors, 64 on CPU
    min_actors: int | None = None  # default: max_actors (a fixed pool, all started at once)
    max_actors: int | None = None  # default: ACTORS_PER_GPU per GPU, or 2 on CPU
    gpus_per_actor: float | None = None  # default: 1 / ACTORS_PER_GPU when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    read_block_rows: int = 128  # objects per read task: smaller blocks reach the detectors sooner

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_actors", "max_actors", "read_block_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("gpus_per_actor", "cpus_per_actor"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.min_actors is not None and self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"--min-actors {self.min_actors} is more than --max-actors {self.max_actors}: the pool "
                             "starts with at most its largest size")


@dataclass
class ScanSpec(ActorPool):
    """What to scan, with which model, and where the table goes (and its ``ActorPool``)."""

    model: str
    output: str
    input: str | None = None  # s3:// prefix or local folder
    manifest: str | None = None  # or a manifest's uris
    inventory: str | None = None  # or an S3 Inventory report's manifest.json (no LIST or HEAD call)
    inventory_max_bytes: int = INVENTORY_MAX_BYTES  # an inventory data file inflating to more is refused
    inventory_max_rows: int = INVENTORY_MAX_ROWS  # an inventory data file holding more rows is refused
    allow_unchecked_inventory: bool = False  # read inventory data files the manifest gives no MD5checksum for
    run_id: str | None = None
    incremental: bool = False
    threshold: float | None = None  # default: the artifact's
    pattern: str | None = None  # glob on the object's name, e.g. "*.jpg"
    list_concurrency: int = 1  # listers at once on a large S3 prefix (split along its folders); 1: one lister
    limit: int | None = None
    decoder: str = "auto"  # auto: nvImageCodec (if installed) or nvJPEG for plain JPEGs on GPU actors, else pil
    read_block_bytes: int = 64 * 1024**2  # a read block holds at most this many listed bytes (and >= 1 object)
    streams: int | None = None  # batches each GPU actor scores at once (default: GPU_STREAMS; 1 on CPU)
    read_ahead_bytes: int | None = DEFAULT_READ_AHEAD_BYTES  # cap on what the scan holds in the object store
    max_bytes: int | None = DEFAULT_MAX_BYTES  # larger objects get a too_large: row without being read
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # images whose header declares more get a too_large: row
    stall_s: float | None = STALL_S  # a run without progress this long stops (and gives its lease back); None: never
    provenance: bool = True  # read what each image says of its origin (C2PA, XMP, PNG text, EXIF) beside its score
    c2pa_trust: list[str] = field(default_factory=list)  # local PEM files of the certificates C2PA signers may chain to
    endpoint: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The spec as it goes into _summary.json (no endpoint: it may name internal hosts)."""
        return {k: v for k, v in asdict(self).items() if k != "endpoint"}


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict[str, Any]


#: What a run id may be: it names a folder (``run_id=ID``), so no "/", "=", ".." or spaces.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit (it names a folder under OUTPUT)")
    return run_id


def format_summary(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary["errors_by_kind"].items())) or "none"
    return (f"run {summary['run_id']} (model {summary['model_id']}): {summary['listed']} listed, "
            f"{summary['skipped']} skipped as already scored, {summary['scored']} scored, "
            f"{summary['flagged']} flagged as fake (score >= {summary['threshold']:g}), "
            f"{summary['errors']} errors ({errors}); {summary['images_per_s']:.1f} images/s over "
            f"{summary['seconds']:.1f} s\ntable: {summary['table']}")
