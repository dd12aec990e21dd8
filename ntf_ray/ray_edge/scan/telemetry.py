"""The scan's metrics, through Ray's own metrics (``ray.util.metrics``): every node's metrics
agent serves them to Prometheus with Ray's, prefixed ``ray_`` (counters end in ``_total``).
``deploy/grafana/ntf-scan.json`` plots them; docs/operations.md says how to scrape them.

Counted where the work happens: objects listed on the driver; scored, flagged, errors by kind,
bytes read and images/s in each detector actor (tagged with its decoder and actor).
"""

from __future__ import annotations

import pyarrow as pa

from ntf_ray import errors

#: name -> (kind, description, tag keys); the dashboard test holds the dashboard to these names.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ntf_scan_listed": ("counter", "objects listed to score (after what moderate skips)", ("model_id",)),
    "ntf_scan_scored": ("counter", "objects scored (a row with a score)", ("model_id", "decoder")),
    "ntf_scan_flagged": ("counter", "objects flagged as fake (score >= threshold)", ("model_id",)),
    "ntf_scan_errors": ("counter", "rows with an error, by its kind (read, decode, too_large, ...)",
                        ("model_id", "kind")),
    "ntf_scan_bytes_read": ("counter", "encoded bytes the detector actors received", ("model_id",)),
    "ntf_scan_actor_images_per_second": ("gauge", "images per second of a detector actor's last batch",
                                         ("model_id", "actor")),
}


def _make(name: str):
    from ray.util.metrics import Counter, Gauge

    kind, description, tags = METRICS[name]
    return (Counter if kind == "counter" else Gauge)(name, description=description, tag_keys=tags)


def count_listed(n: int, model_id: str) -> None:
    if n:
        _make("ntf_scan_listed").inc(n, tags={"model_id": model_id})


class ActorMetrics:
    """One detector actor's metrics (made once per actor process)."""

    def __init__(self, model_id: str, actor: str):
        self.model_id, self.actor = model_id, actor
        self.scored, self.flagged = _make("ntf_scan_scored"), _make("ntf_scan_flagged")
        self.errors, self.bytes_read = _make("ntf_scan_errors"), _make("ntf_scan_bytes_read")
        self.rate = _make("ntf_scan_actor_images_per_second")

    def record(self, rows: pa.Table, bytes_read: int, seconds: float) -> None:
        tags = {"model_id": self.model_id}
        decoders: dict[str, int] = {}
        for score, decoder in zip(rows.column("score").to_pylist(), rows.column("decoder").to_pylist()):
            if score is not None:
                decoders[decoder or "unknown"] = decoders.get(decoder or "unknown", 0) + 1
        for decoder, n in decoders.items():
            self.scored.inc(n, tags={**tags, "decoder": decoder})
        flagged = sum(1 for f in rows.column("is_fake").to_pylist() if f)
        if flagged:
            self.flagged.inc(flagged, tags=tags)
        kinds: dict[str, int] = {}
        for error in rows.column("error").drop_null().to_pylist():
            kind = errors.kind(error)
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            self.errors.inc(n, tags={**tags, "kind": kind})
        if bytes_read:
            self.bytes_read.inc(bytes_read, tags=tags)
        if seconds > 0:
            self.rate.set(rows.num_rows / seconds, tags={**tags, "actor": self.actor})
