"""``ntf-ray evaluate``: score a labelled manifest split through the scan's Ray Data path.

The split's rows are read by the scan's read tasks and scored by detector actors (one per
GPU, or CPU actors), so an evaluation scales to a cluster like a scan. Each actor decodes
an image once, then scores it clean and at every perturbation level (seeded per image,
so reruns give equal tables), and returns one row per (image, level) joined with the
manifest's label, generator and family; a sample of clean rows also returns the features
the classifier reads, for the t-SNE map. ``ntf_ray.evaluate`` turns the rows into the
paper's tables, figures and a report.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ntf_ray import storage
from ntf_ray.detector.artifact import check_threshold
from ntf_ray.errors import DECODE, DETECTOR, DetectorFault, error
from ntf_ray.evaluate import CLEAN, format_summary, parse_families, parse_perturbations, write_report
from ntf_ray.images.provenance import PROVENANCE_COLUMNS, provenance_of
from ntf_ray.ray_edge.scan.actor import scored_stream
from ntf_ray.scan.spec import ActorPool
from ntf_ray.storage import StorageOptions
from ntf_ray.training.datasets import read_manifest, select

log = logging.getLogger(__name__)

#: One row per (image, perturbation level): what ``ntf_ray.evaluate`` reads.
ROWS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("label", pa.int8()),
    ("generator", pa.string()),
    ("family", pa.string()),
    ("perturbation", pa.string()),
    ("level", pa.float64()),
    ("score", pa.float32()),
    ("error", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    # what the image says of its origin (``images.provenance``), the same at every level
    *[(name, pa.string()) for name in PROVENANCE_COLUMNS],
])


@dataclass
class EvaluateSpec(ActorPool):
    """What to evaluate, with which model, and where the report goes."""

    model: str
    manifest: str
    output: str
    split: str | None = "test"  # None: every labelled row
    families: list[str] = field(default_factory=list)  # ["gan=progan,stylegan", ...]
    perturb: list[str] = field(default_factory=list)  # ["blur=0,1,2", ...]
    embeddings: int = 0  # clean images whose features go into the t-SNE map
    threshold: float | None = None  # default: the artifact's
    seed: int = 0
    batch_size: int | None = field(default=64, kw_only=True)  # the ActorPool's, with evaluate's own default
    endpoint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Bad arguments fail here, before a cluster is started or a byte is read.
        super().__post_init__()
        self.perturbations = parse_perturbations(self.perturb)
        self.family_map = parse_families(self.families) or None
        if self.embeddings < 0 or self.embeddings == 1:
            raise ValueError("--embeddings must be 0 (no t-SNE map) or at least 2")
        if self.threshold is not None:
            check_threshold(self.threshold, "--threshold")


def perturbation_plan(perturbations: dict[str, list[float]]) -> list[tuple[str, float | None]]:
    """``[("none", None), (kind, level), ...]``: the clean image first, then every level."""
    return [(CLEAN, None)] + [(kind, float(level)) for kind, levels in perturbations.items() for level in levels]


def _noise_generator(seed: int, uri: str, kind: str, level: float):
    """The random stream of one image at one level: equal on every run, worker and actor."""
    import torch

    key = hashlib.sha256(f"{seed}|{uri}|{kind}|{level!r}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


class EvaluationActor:
    """Ray Data actor: loads the detector once; decodes each image once and scores every level."""

    def __init__(self, model: str, *, endpoint: str | None, threshold: float | None, batch_size: int, device: str,
                 plan: list[tuple[str, float | None]], seed: int):
        import torch

        from ntf_ray.detector.scorer import Scorer

        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        # The core decoder on every device: perturbations run on the CPU image, and one
        # decoder keeps clean and perturbed scores comparable.
        self.scorer = Scorer.from_artifact(model, device=device, threshold=threshold,
                                           options=StorageOptions(endpoint_url=endpoint), batch_size=batch_size,
                                           decoder="pil")
        self.plan, self.seed = plan, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._rows(batch)
        except DetectorFault as exc:  # the detector scored NaN: rows that say so, and score_rows stops
            n, repeat = batch.num_rows, len(self.plan)
            cols = {"level_index": [i for i in range(repeat) for _ in range(n)],
                    "perturbation": [k for k, _ in self.plan for _ in range(n)],
                    "level": [v for _, v in self.plan for _ in range(n)],
                    "score": [None] * (n * repeat), "error": [f"{DETECTOR}: {exc}"] * (n * repeat),
                    "embedding": [None] * (n * repeat), **{c: [None] * (n * repeat) for c in PROVENANCE_COLUMNS}}
            for name in ("uri", "label", "generator", "family"):
                cols[name] = batch.column(name).to_pylist() * repeat
            return pa.table(cols, schema=ROWS_SCHEMA.append(pa.field("level_index", pa.int32())))

    def _rows(self, batch: pa.Table) -> pa.Table:
        import torch

        from ntf_ray.images.transforms import perturb

        uris = batch.column("uri").to_pylist()
        data, read_errors = batch.column("data").to_pylist(), batch.column("read_error").to_pylist()
        embed = batch.column("embed").to_pylist()
        images: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        claims: list[dict] = [dict.fromkeys(PROVENANCE_COLUMNS) for _ in uris]
        for i, (blob, read_error) in enumerate(zip(data, read_errors)):
            if read_error is not None:
                errors[i] = read_error
                continue
            claims[i] = provenance_of(blob, max_pixels=self.scorer.max_pixels).columns()
            image, result = self.scorer.decode(blob)
            if image is None:
                errors[i] = result.error
            else:
                images[i] = image
        cols: dict[str, list] = {name: [] for name in (*ROWS_SCHEMA.names, "level_index")}
        for index, (kind, level) in enumerate(self.plan):
            crops: dict[int, torch.Tensor] = {}
            level_errors = dict(errors)
            for i, image in images.items():
                try:
                    x = image if kind == CLEAN else perturb(image, kind, level, _noise_generator(self.seed, uris[i], kind, level))
                except (RuntimeError, ValueError) as exc:  # e.g. down-scaling a tiny image to nothing
                    level_errors[i] = f"perturb: {kind}={level:g}: {type(exc).__name__}"
                    continue
                crop, result = self.scorer.crop(x, None, "pil")
                if crop is None:
                    level_errors[i] = result.error
                else:
                    crops[i] = crop
            stacked = torch.stack(list(crops.values())) if crops else None
            scores = dict(zip(crops, self.scorer.score_tensors(stacked))) if crops else {}
            wanted = [i for i in crops if embed[i]] if kind == CLEAN else []
            features = dict(zip(wanted, self.scorer.embed_tensors(torch.stack([crops[i] for i in wanted])))) if wanted else {}
            for i in range(batch.num_rows):
                cols["level_index"].append(index)
                cols["perturbation"].append(kind)
                cols["level"].append(level)
                cols["score"].append(float(scores[i]) if i in scores else None)
                cols["error"].append(None if i in scores else level_errors.get(i, error(DECODE, "not scored")))
                cols["embedding"].append(features[i].tolist() if i in features else None)
        repeat = len(self.plan)
        for name in ("uri", "label", "generator", "family"):
            cols[name] = batch.column(name).to_pylist() * repeat
        for name in PROVENANCE_COLUMNS:
            cols[name] = [c[name] for c in claims] * repeat
        return pa.table(cols, schema=ROWS_SCHEMA.append(pa.field("level_index", pa.int32())))


def _rows_to_score(spec: EvaluateSpec, options: StorageOptions) -> pa.Table:
    """The split's labelled rows (uri, label, generator, family, embed)."""
    table = read_manifest(spec.manifest, options)
    rows = select(table, split=spec.split) if spec.split else table
    unlabelled = rows.column("label").null_count
    if unlabelled:
        log.warning("evaluate: %d rows of the %s split have no label and are left out", unlabelled, spec.split or "whole")
        rows = rows.filter(rows.column("label").is_valid())
    if rows.num_rows == 0:
        raise ValueError(f"the manifest {spec.manifest} has no labelled rows"
                         + (f" in split {spec.split!r}" if spec.split else ""))
    family = rows.column("family") if "family" in rows.column_names else pa.nulls(rows.num_rows, pa.string())
    generator = [g or "unknown" for g in rows.column("generator").to_pylist()]
    embed = np.zeros(rows.num_rows, dtype=bool)
    if spec.embeddings > 0:
        pick = np.random.default_rng(spec.seed).permutation(rows.num_rows)[: spec.embeddings]
        embed[pick] = True
    return pa.table({"uri": rows.column("uri"), "label": rows.column("label"), "generator": pa.array(generator, pa.string()),
                     "family": family.cast(pa.string()), "embed": pa.array(embed)})


def score_rows(spec: EvaluateSpec, rows: pa.Table, plan: list[tuple[str, float | None]], threshold: float) -> pa.Table:
    """Every row scored at every level through Ray Data (read tasks -> evaluation actors)."""
    ds = scored_stream(
        rows, EvaluationActor,
        {"model": spec.model, "endpoint": spec.endpoint, "threshold": threshold, "batch_size": spec.batch_size,
         "plan": plan, "seed": spec.seed},
        pool=spec, endpoint=spec.endpoint, name="evaluate",
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise RuntimeError("evaluate: the detector actors returned no rows")
    out = pa.concat_tables(tables)
    faults = out.filter(pc.starts_with(pc.fill_null(out["error"], ""), f"{DETECTOR}:"))
    if faults.num_rows:
        raise DetectorFault(faults["error"][0].as_py()[len(DETECTOR) + 2:])
    if out.num_rows != rows.num_rows * len(plan):
        raise RuntimeError(f"evaluate: {out.num_rows} scored rows for {rows.num_rows} images x {len(plan)} levels")
    # A stable order (Ray Data's is not): by image, then the plan's order of levels.
    return out.sort_by([("uri", "ascending"), ("level_index", "ascending")]).drop_columns(["level_index"])


def evaluate(spec: EvaluateSpec, *, command: str | None = None) -> dict[str, Any]:
    """Score, then write ``report.md``, ``metrics.json``, ``scores.parquet`` and figures to OUTPUT."""
    from ntf_ray.detector.artifact import load_artifact

    options = StorageOptions(endpoint_url=spec.endpoint)
    art = load_artifact(spec.model, options=options)
    threshold = art.threshold if spec.threshold is None else float(spec.threshold)
    rows = _rows_to_score(spec, options)
    plan = perturbation_plan(spec.perturbations)
    log.info("evaluate: %d images of split %s at %d levels (clean + %d perturbed), model %s", rows.num_rows,
             spec.split, len(plan), len(plan) - 1, art.model_id)
    scored = score_rows(spec, rows, plan, threshold)
    has_embedding = scored.column("embedding").is_valid()
    sample = scored.filter(has_embedding)
    embeddings = (np.asarray(sample.column("embedding").to_pylist(), dtype=np.float32) if sample.num_rows else None)
    model = {"uri": storage.redact(spec.model), "model_id": art.model_id, "backbone": art.backbone, "head": art.head,
             "input_size": art.input_size, "threshold": threshold,
             "variant": (art.training.get("config") or {}).get("variant"), "split": spec.split, "seed": spec.seed}
    return write_report(scored.drop_columns(["embedding"]), output=spec.output, threshold=threshold, model=model,
                        families=spec.family_map, embeddings=embeddings,
                        embedding_rows=sample.select(["uri", "label", "generator"]) if embeddings is not None else None,
                        options=options, command=command)


def calibration_reals(spec: EvaluateSpec, target_fpr: float) -> pa.Table:
    """The real images of ``spec.split`` that will set the threshold, or ``TooFewReals`` (read
    from the manifest alone: nothing is scored, no cluster is needed)."""
    import pyarrow.compute as pc

    from ntf_ray.detector.calibrate import TooFewReals, min_reals

    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"--target-fpr must be in (0, 1), got {target_fpr}")
    rows = _rows_to_score(spec, StorageOptions(endpoint_url=spec.endpoint))
    reals = rows.filter(pc.equal(rows.column("label"), 0))
    if reals.num_rows < min_reals(target_fpr):
        where = f"split {spec.split!r}" if spec.split else "the manifest"
        raise TooFewReals(f"{where} of {storage.redact(spec.manifest)} has {reals.num_rows} real images; a false "
                          f"positive rate of {target_fpr:.2%} needs at least {min_reals(target_fpr)} (with no false "
                          "positive among n reals the 95% upper bound is about 3/n): add reals or aim for a higher rate")
    return reals


def calibrate_model(spec: EvaluateSpec, target_fpr: float, reals: pa.Table | None = None):
    """Score the split's real images (``spec.split``), choose the threshold for ``target_fpr``
    (:mod:`ntf_ray.detector.calibrate`), and write the detector with it to ``spec.output``: a new
    artifact, whose ``model_id`` differs (the threshold is part of what it names) and whose
    ``model.json`` holds the calibration. Returns ``(calibration, new artifact)``."""
    from ntf_ray.detector.artifact import load_artifact, save_artifact
    from ntf_ray.detector.calibrate import calibrate

    options = StorageOptions(endpoint_url=spec.endpoint)
    art = load_artifact(spec.model, options=options)
    if reals is None:
        reals = calibration_reals(spec, target_fpr)
    where = f"split {spec.split!r}" if spec.split else "the manifest"
    log.info("calibrate: scoring %d real images of %s with model %s", reals.num_rows, where, art.model_id)
    scored = score_rows(spec, reals, perturbation_plan({}), art.threshold)
    scores = scored.column("score")
    failed = scores.null_count
    if failed:
        log.warning("calibrate: %d of %d real images could not be scored and are left out (see their errors with "
                    "ntf-ray evaluate)", failed, scored.num_rows)
    cal = calibrate(scores.drop_null().to_numpy(zero_copy_only=False), target_fpr, split=spec.split,
                    manifest=storage.redact(spec.manifest), previous_threshold=art.threshold,
                    previous_model_id=art.model_id)
    new = save_artifact(spec.output, art.detector, input_size=art.input_size, threshold=cal.threshold,
                        training=art.training, metrics=art.metrics, calibration=cal.as_dict(), options=options)
    return cal, new


__all__ = ["EvaluateSpec", "calibrate_model", "calibration_reals", "evaluate", "format_summary", "perturbation_plan", "score_rows"]
