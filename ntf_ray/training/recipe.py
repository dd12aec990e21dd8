"""The whole NTF recipe in one process: stage 1, stage 2, artifact, evaluation.

This is the laptop / notebook path (plain torch ``DataLoader``); ``ray_train`` runs the
same epoch functions across workers. Both read a manifest and write the detector
artifact to ``OUTPUT/detector``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from ntf_ray import storage
from ntf_ray.detector.artifact import DetectorArtifact, save_artifact
from ntf_ray.detector.scorer import Scorer
from ntf_ray.evaluate.metrics import per_generator_table
from ntf_ray.images.transforms import TooLargeToFit
from ntf_ray.nn.dist import resolve_device
from ntf_ray.nn.model import Detector, Stage1Model, Stage2Model
from ntf_ray.nn.variants import get_variant
from ntf_ray.storage import StorageOptions
from ntf_ray.training.config import TrainConfig
from ntf_ray.training.datasets import ManifestDataset, collate_drop_none, read_manifest, select
from ntf_ray.training.engine import (
    make_optimizer,
    make_scheduler,
)
from ntf_ray.training.natural_traces import fit_natural_traces_for
from ntf_ray.training.stages import STAGE1, STAGE2, Stage, build_stage1, build_stage2

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingImages(ManifestDataset):
    """A manifest's training images; one the transform refuses (a sliver that upscaling to
    the crop would blow up, ``TooLargeToFit``) is dropped and counted like an undecodable one."""

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return super().__getitem__(index)
        except TooLargeToFit as exc:
            log.warning("skipping %s: %s", self.uris[index], exc)
            return None


def _loader(dataset: ManifestDataset, cfg: TrainConfig) -> DataLoader:
    return DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) > cfg.batch_size,
        num_workers=cfg.num_workers, collate_fn=collate_drop_none,
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed),
    )


def train_stage1(table: pa.Table, cfg: TrainConfig, *, options: StorageOptions | None = None,
                 report: Callable[[dict], None] | None = None) -> Stage1Model | None:
    """Stage 1 of ``cfg.variant``; None for a variant without stage 1."""
    if not get_variant(cfg.variant).stage1:
        log.info("variant %s has no stage 1: stage 2 starts from the %s encoder", cfg.variant, cfg.pretrained)
        return None
    model = build_stage1(cfg).to(resolve_device(cfg.device))
    return _fit(STAGE1, model, table, cfg, options=options, report=report)


def train_stage2(table: pa.Table, stage1: Stage1Model | None, cfg: TrainConfig, *,
                 options: StorageOptions | None = None, report: Callable[[dict], None] | None = None) -> Stage2Model:
    model = build_stage2(cfg, stage1).to(resolve_device(cfg.device))
    return _fit(STAGE2, model, table, cfg, options=options, report=report)


def _fit(stage: Stage, model: torch.nn.Module, table: pa.Table, cfg: TrainConfig, *,
         options: StorageOptions | None, report: Callable[[dict], None] | None) -> torch.nn.Module:
    """``stage.epochs(cfg)`` epochs of ``stage`` on ``model``, in this process."""
    epochs = stage.epochs(cfg)
    if epochs == 0:
        return model
    seed = cfg.seed if stage is STAGE2 else None  # stage 2's draws are seeded; stage 1's come from torch's seed
    data = TrainingImages(stage.rows(table, cfg), stage.transform(cfg, seed), keys=stage.keys, options=options,
                          max_pixels=cfg.max_pixels)
    loader = _loader(data, cfg)
    optimizer = make_optimizer(stage.trainable(model, cfg), lr=stage.lr(cfg), momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, epochs=epochs, schedule=cfg.schedule, step_size=cfg.step_size,
                               step_gamma=cfg.step_gamma, warmup_epochs=cfg.warmup_epochs)
    device = next(model.parameters()).device
    for epoch in range(epochs):
        m = stage.epoch(model, loader, optimizer, cfg, epoch=epoch, device=device, report=report)
        scheduler.step()
        log.info("stage %d epoch %d/%d: %s", stage.number, epoch + 1, epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float)))
    return model


def evaluate(scorer: Scorer, table: pa.Table, *, options: StorageOptions | None = None,
             batch: int = 64) -> list[dict[str, Any]]:
    """Per-generator AP/ACC/FPR/FNR of a labelled table (unreadable images are left out and logged)."""
    uris = table.column("uri").to_pylist()
    labels = table.column("label").to_pylist()
    gens = table.column("generator").to_pylist()
    ys, ss, gs, failed = [], [], [], 0
    for start in range(0, len(uris), batch):
        chunk = range(start, min(start + batch, len(uris)))
        blobs = storage.read_many([uris[i] for i in chunk], options)
        for i, b in zip(chunk, blobs):
            if isinstance(b, Exception):
                log.warning("evaluation cannot read %s: %s", uris[i], storage.read_error(b))
        results = scorer.score_bytes([b if isinstance(b, bytes) else b"" for b in blobs])
        for i, r in zip(chunk, results):
            if r.error is not None or labels[i] is None:
                failed += 1
                continue
            ys.append(labels[i]), ss.append(r.score), gs.append(gens[i] or "unknown")
    if failed:
        log.warning("evaluation left out %d unscorable or unlabelled images", failed)
    return per_generator_table(ys, ss, gs, threshold=scorer.threshold)


def data_summary(table: pa.Table) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for split, label in zip(table.column("split").to_pylist(), table.column("label").to_pylist()):
        key = f"{split}/{'real' if label == 0 else 'fake' if label == 1 else 'unlabelled'}"
        counts[key] = counts.get(key, 0) + 1
    return {"images": table.num_rows, "counts": counts,
            "generators": sorted({g for g in table.column("generator").to_pylist() if g})}


def train_local(manifest: str, output: str, cfg: TrainConfig, *, options: StorageOptions | None = None,
                report: Callable[[dict], None] | None = None, evaluate_split: str | None = "test") -> DetectorArtifact:
    """Stage 1 then stage 2 in this process, then ``OUTPUT/detector`` (+ ``OUTPUT/config.json``).

    With ``evaluate_split``, the detector is scored on that split first and the
    per-generator table goes into the artifact's metrics.
    """
    seed_everything(cfg.seed)
    table = read_manifest(manifest, options)
    storage.write_bytes(storage.join(output, "config.json"), json.dumps(cfg.to_dict(), indent=2, allow_nan=False).encode(), options)
    stage1 = train_stage1(table, cfg, options=options, report=report)
    stage2 = train_stage2(table, stage1, cfg, options=options, report=report)
    detector: Detector = fit_natural_traces_for(stage2.detector().cpu().eval(), table, cfg, options=options)
    metrics: dict[str, Any] = {}
    held_out = select(table, split=evaluate_split) if evaluate_split else None
    if held_out is not None and held_out.num_rows:
        scorer = Scorer(detector, input_size=cfg.crop_size, threshold=cfg.threshold, device="cpu")
        metrics = {"split": evaluate_split, "table": evaluate(scorer, held_out, options=options)}
    return save_artifact(
        storage.join(output, "detector"), detector, input_size=cfg.crop_size, threshold=cfg.threshold,
        training={"config": cfg.to_dict(), "data": data_summary(table)}, metrics=metrics, options=options,
    )
