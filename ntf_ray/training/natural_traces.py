"""Fit a detector's distance to the natural traces (``ntf_ray.nn.traces``) after stage 2.

For variants that decide by proximity to the reals (``ntf-proximity``, ``traces-only``):
the frozen encoder's features of real training images give the reals' mean and shrunk
covariance, those of held-out reals (the ``val`` split) set where the distance starts to
say "fake". Images are decoded and cropped as a scan scores them (the centre crop at native
resolution), so the distances seen at inference are measured the same way. Fakes are never
read here. ``trace_uris`` picks the images (on the driver, from the manifest);
``fit_natural_traces`` reads them wherever the detector is.
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
#: Fewer reals than this on either side of that half: all of them fit and calibrate (a smoke run).
MIN_EACH = 8


def trace_uris(table: pa.Table, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """The real images the traces are fitted on and those they are calibrated on: the train
    split's reals (of ``cfg.train_generators``) and the val split's, each shuffled by the
    seed and capped (``trace_fit_images``, ``trace_calibration_images``). With fewer than
    ``MIN_HELD_OUT`` val reals, half of the train reals are held out instead (logged: the
    encoder and classifier trained on them, so the edges sit a little low; the model card says
    to calibrate on one's own reals either way)."""
    rng = np.random.default_rng(cfg.seed)
    fit = select(table, split="train", labels=[0], generators=cfg.train_generators).column("uri").to_pylist()
    held = select(table, split="val", labels=[0], generators=cfg.train_generators).column("uri").to_pylist()
    rng.shuffle(fit)
    if len(held) < MIN_HELD_OUT:
        log.info("natural traces: %d real image(s) in the val split (fewer than %d): calibrating on half of the "
                    "training reals instead, which the encoder has seen; calibrate the detector on your own reals "
                    "(ntf-ray calibrate)", len(held), MIN_HELD_OUT)
        cut = len(fit) // 2
        fit, held = fit[:cut], fit[cut:]
        if len(fit) < MIN_EACH or len(held) < MIN_EACH:  # a handful of reals: fitted and calibrated on all
            fit = held = fit + held
    rng.shuffle(held)
    return fit[: cfg.trace_fit_images], held[: cfg.trace_calibration_images]


def fit_natural_traces_for(detector: Detector, table: pa.Table, cfg: TrainConfig, *,
                           options: StorageOptions | None = None, device: str | torch.device = "cpu") -> Detector:
    """``detector`` with its natural traces fitted when ``cfg.variant`` decides by them; as is otherwise."""
    if not get_variant(cfg.variant).traces:
        return detector
    fit, held = trace_uris(table, cfg)
    return fit_natural_traces(detector, fit, held, cfg, options=options, device=device)


def fit_natural_traces(detector: Detector, fit_uris: list[str], held_uris: list[str], cfg: TrainConfig, *,
                       options: StorageOptions | None = None, device: str | torch.device = "cpu") -> Detector:
    """Fit ``detector.traces`` from the real images at ``fit_uris`` and ``held_uris`` (on ``device``)."""
    mode = get_variant(cfg.variant).traces
    detector.traces = None  # the classifier's own logits, for the held-out reals' edge
    fit, _ = _features(detector, fit_uris, cfg, options, device)
    cal, cal_logits = _features(detector, held_uris, cfg, options, device)
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
    net = scorer.detector.eval()
    for start in range(0, len(uris), batch):
        crops = []
        for blob in storage.read_many(uris[start : start + batch], options):
            crop = scorer.preprocess(blob)[0] if isinstance(blob, bytes) else None
            skipped += crop is None
            if crop is not None:
                crops.append(crop)
        if crops:
            with torch.inference_mode():
                e = net.encoder(torch.stack(crops).to(scorer.device))
                logit = net.classifier(net.transfer(e) if net.transfer is not None else e).squeeze(1)
                out.append(e.float().cpu().numpy())
                logits.append(logit.float().cpu().numpy())
    if skipped:
        log.warning("natural traces: %d real image(s) could not be read or decoded and were left out", skipped)
    if not out:
        return np.zeros((0, detector.encoder.dim), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(out), np.concatenate(logits)
