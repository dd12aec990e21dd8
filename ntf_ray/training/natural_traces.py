"""Fit a detector's distance to the natural traces (``ntf_ray.nn.traces``) after stage 2.

For variants that decide by proximity to the reals (``ntf-proximity``, ``traces-only``):
the frozen encoder's features of real training images give the reals' mean and shrunk
covariance, those of held-out reals (the ``val`` split, else the half of the training reals
not used to fit) set where the distance starts to say "fake". Images are decoded and
cropped as a scan scores them (the centre crop at native resolution), so the distances
seen at inference are measured the same way. Fakes are never read here.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from ntf_ray import storage
from ntf_ray.nn.model import Detector
from ntf_ray.nn.traces import NaturalTraces
from ntf_ray.nn.variants import get_variant
from ntf_ray.storage import StorageOptions
from ntf_ray.training.config import TrainConfig
from ntf_ray.training.datasets import select

log = logging.getLogger(__name__)

#: Fewer held-out reals than this in the val split: half of the training reals are held out instead.
MIN_HELD_OUT = 100


def fit_natural_traces_for(detector: Detector, table: pa.Table, cfg: TrainConfig, *,
                           options: StorageOptions | None = None, device: str | torch.device = "cpu") -> Detector:
    """``detector`` with its natural traces fitted when ``cfg.variant`` decides by them; as is otherwise."""
    mode = get_variant(cfg.variant).traces
    if not mode:
        return detector
    reals = select(table, split="train", labels=[0], generators=cfg.train_generators)
    held = select(table, split="val", labels=[0], generators=cfg.train_generators)
    rng = np.random.default_rng(cfg.seed)
    train_uris = reals.column("uri").to_pylist()
    rng.shuffle(train_uris)
    held_uris = held.column("uri").to_pylist()
    if len(held_uris) < MIN_HELD_OUT:
        cut = len(train_uris) // 2
        train_uris, held_uris = train_uris[:cut], train_uris[cut:]
    rng.shuffle(held_uris)
    detector.traces = None  # the classifier's own logits, for the held-out reals' edge
    fit, _ = _features(detector, train_uris[: cfg.trace_fit_images], cfg, options, device)
    cal, cal_logits = _features(detector, held_uris[: cfg.trace_calibration_images], cfg, options, device)
    detector.traces = NaturalTraces.fit(fit, cal, cal_logits, with_classifier=mode == "combined").to(
        next(detector.parameters()).device)
    log.info("natural traces fitted on %d real images, calibrated on %d held-out reals (%s)", len(fit), len(cal),
             "with the classifier" if mode == "combined" else "alone")
    return detector


def _features(detector: Detector, uris: list[str], cfg: TrainConfig, options: StorageOptions | None,
              device: str | torch.device, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's features of ``uris`` and the classifier's logits, the images decoded
    and centre-cropped as the scorer does."""
    from ntf_ray.detector.scorer import Scorer

    scorer = Scorer(detector, input_size=cfg.crop_size, device=device, max_pixels=cfg.max_pixels)
    out, logits, skipped = [], [], 0
    detector.eval()
    for start in range(0, len(uris), batch):
        crops = []
        for blob in storage.read_many(uris[start : start + batch], options):
            crop = scorer.preprocess(blob)[0] if isinstance(blob, bytes) else None
            skipped += crop is None
            if crop is not None:
                crops.append(crop)
        if crops:
            with torch.inference_mode():
                x = torch.stack(crops).to(scorer.device)
                out.append(detector.encoder(x).float().cpu().numpy())
                logits.append(detector(x).float().cpu().numpy())
    if skipped:
        log.warning("natural traces: %d real image(s) could not be read or decoded and were left out", skipped)
    if not out:
        return np.zeros((0, detector.encoder.dim), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(out), np.concatenate(logits)
