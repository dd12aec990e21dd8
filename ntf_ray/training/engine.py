"""Training loops for both NTF stages, and checkpoint state.

The epoch functions take any iterable of batches (a torch ``DataLoader``, Ray's
``iter_torch_batches``) and hand their metrics to a ``report`` callable, so the same loop
runs in a test, on a laptop and under Ray Train. Batches are dicts of tensors:

- stage 1: ``view1``, ``view2``: ``(B, 3, S, S)`` uint8, two views of the same real images;
- stage 2: ``image``: ``(B, 3, S, S)`` uint8 crops, ``crop``: ``(B, 3, s, s)`` SCL crops,
  ``label``: ``(B,)`` 0 real / 1 fake.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from ntf_ray.nn import dist
from ntf_ray.nn.losses import detection_loss, trace_loss
from ntf_ray.nn.model import Stage1Model, Stage2Model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: Below this mean squared distance of the normalised z_hom from their mean, stage 1 warns
#: that f_hom has collapsed (up to 1 for features spread over the sphere).
COLLAPSE_SPREAD = 1e-3
Report = Callable[[dict[str, Any]], None]


def make_optimizer(params: Iterable[nn.Parameter], *, lr: float, momentum: float = 0.9, weight_decay: float = 1e-3) -> torch.optim.SGD:
    """SGD as the paper: momentum 0.9, weight decay ("attenuation") 1e-3."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    schedule: str = "cosine",
    step_size: int = 30,
    step_gamma: float = 0.1,
    warmup_epochs: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch learning-rate factor: linear warm-up, then cosine to 0, step decay or constant.

    Stepped once per epoch (the number of steps per epoch of a streamed dataset is not
    known in advance).
    """

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "cosine":
            span = max(1, epochs - warmup_epochs)
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup_epochs, span) / span))
        if schedule == "step":
            return step_gamma ** ((epoch - warmup_epochs) // max(1, step_size))
        if schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {schedule!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, amp: bool):
    # bf16 on CUDA only: CPU autocast would change the numbers the CPU tests pin down.
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the step is not taken, and training stops with the
    last good checkpoint in place (a diverged model must never be saved as a detector)."""


def _check_finite(loss: torch.Tensor, stage: int, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss.detach())):  # one sync per step; the meter reads the loss anyway
        raise NonFiniteLoss(f"stage {stage} epoch {epoch} step {step}: the loss is {float(loss.detach())}; training "
                            "stops before this step (the last good checkpoint is kept): lower the learning rate, or "
                            "check the data")


def _empty(batch: Mapping[str, Any], key: str) -> bool:
    """A batch whose every image failed to decode (``collate_drop_none``). Only the local
    loop may skip one: under ``gather=True`` every rank must take every step."""
    return key not in batch or batch[key].shape[0] == 0


class _Meter:
    """Running sums of per-step metrics, weighted by images, averaged over ranks at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.images = 0
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, parts: Mapping[str, torch.Tensor], images: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach()) * images
        self.images += images
        self.steps += 1

    def result(self, device: torch.device) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        images_total = dist.all_reduce_sum(self.images, device)
        out = {k: dist.all_reduce_sum(v, device) / max(1.0, images_total) for k, v in self.sums.items()}
        out.update(images=int(images_total), steps=self.steps, seconds=seconds, images_per_s=images_total / max(seconds, 1e-9))
        return out


def train_stage1_epoch(
    model: Stage1Model | nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    temperature: float = 0.1,
    lam: float = 0.1,
    use_het: bool = True,
    use_orth: bool = True,
    gather: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    report: Report | None = None,
    log_every: int = 50,
) -> dict[str, float]:
    """One epoch of natural-trace learning on real images (Eq. 4).

    ``model`` maps images to ``(z_hom, z_het)`` (a ``Stage1Model``, possibly DDP-wrapped).
    Both views go through the network in one forward pass (view-major), so batch-norm
    statistics cover both. Returns the epoch's metrics (loss components averaged over
    images, lr, images/s, views/s); ``report`` receives the same dict.
    """
    device = torch.device(device)
    model.train()
    meter = _Meter()
    for step, batch in enumerate(batches):
        if _empty(batch, "view1"):
            continue
        v1 = _to_device(batch["view1"], device, channels_last)
        v2 = _to_device(batch["view2"], device, channels_last)
        n = v1.shape[0]
        with _autocast(device, amp):
            z_hom, z_het = model(torch.cat([v1, v2], dim=0))
        # Losses in float32: contrastive logits / temperature lose too much in bf16.
        z_hom = z_hom.float()
        het1, het2 = (None, None) if z_het is None else (z_het[:n].float(), z_het[n:].float())
        parts = trace_loss(
            z_hom[:n], z_hom[n:], het1, het2,
            temperature=temperature, lam=lam, use_het=use_het, use_orth=use_orth, gather=gather,
        )
        _check_finite(parts["loss"], 1, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if not isinstance(model, DistributedDataParallel):
            dist.average_gradients(model.parameters())  # no-op in one process
        optimizer.step()
        meter.add(parts, n)
        if log_every and step % log_every == 0 and dist.is_main():
            log.info("stage 1 epoch %d step %d: loss %.4f (hom %.4f het %.4f orth %.4f)", epoch, step,
                     float(parts["loss"].detach()), float(parts["hom"]), float(parts["het"]), float(parts["orth"]))
    metrics = meter.result(device)
    metrics.update(stage=1, epoch=epoch, lr=optimizer.param_groups[0]["lr"], views_per_s=2 * metrics["images_per_s"])
    if metrics.get("hom_spread", 1.0) < COLLAPSE_SPREAD and dist.is_main():
        log.warning("stage 1 epoch %d: the homogeneous features have collapsed (spread %.2g < %g): a constant "
                    "f_hom minimises L_hom; check lam, the learning rate and the variant", epoch, metrics["hom_spread"],
                    COLLAPSE_SPREAD)
    if report is not None:
        report(metrics)
    return metrics


def prepare_stage2(model: Stage2Model, *, train_encoder: bool = False) -> list[nn.Parameter]:
    """Freeze the stage-1 encoder and ``f_hom`` (eval mode: batch-norm statistics fixed too).

    Returns the parameters stage 2 trains: the transfer layer (when the model has one), the
    SCL projection and the classifier, plus the encoder when ``train_encoder`` (the
    Wang2020 end-to-end baseline).
    """
    model.f_hom.requires_grad_(False)
    model.encoder.requires_grad_(train_encoder)
    heads = [model.transfer, model.project, model.classifier]
    params = [p for head in heads if head is not None for p in head.parameters()]
    if train_encoder:
        params = list(model.encoder.parameters()) + params
    return params


def _stage2_train_mode(model: Stage2Model, train_encoder: bool) -> None:
    model.train()
    model.f_hom.eval()
    if not train_encoder:
        model.encoder.eval()


def train_stage2_epoch(
    model: Stage2Model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    temperature: float = 0.1,
    eta: float = 0.5,
    gamma: float = 0.5,
    use_scl: bool = True,
    train_encoder: bool = False,
    gather: bool = False,
    device: torch.device | str = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    report: Report | None = None,
    log_every: int = 50,
) -> dict[str, float]:
    """One epoch of soft contrastive transfer + BCE (Eq. 7) on real and fake images.

    The encoder and ``f_hom`` stay frozen (call ``prepare_stage2`` before building the
    optimiser). The classifier sees ``t(E(224 crop))``; the SCL term uses
    ``projection(t(E(32 px crop)))``, so both losses train t; the traces J are
    ``f_hom(E(x))`` of the batch's real 224 crops. ``model`` is the bare ``Stage2Model``
    (not DDP-wrapped): across ranks its gradients are averaged here.
    """
    device = torch.device(device)
    _stage2_train_mode(model, train_encoder)
    meter = _Meter()
    for step, batch in enumerate(batches):
        # One image cannot train the classifier's batch norm (and has no SCL pair): skip.
        if _empty(batch, "image") or batch["image"].shape[0] < 2:
            continue
        images = _to_device(batch["image"], device, channels_last)
        labels = batch["label"].to(device).reshape(-1).float()
        with _autocast(device, amp):
            with torch.no_grad() if not train_encoder else nullcontext():
                e = model.encoder(images)
            logits = model.logits(e)
            if use_scl:
                with torch.no_grad():
                    hom = model.f_hom(e[labels < 0.5].detach()).float()
                crops = _to_device(batch["crop"], device, channels_last)
                with torch.no_grad() if not train_encoder else nullcontext():
                    e32 = model.encoder(crops)
                z = model.scl_projection(e32)
            else:
                hom = logits.new_zeros((0, 1))
                z = logits.new_zeros((labels.shape[0], 1))
        parts = detection_loss(
            z.float(), logits.float(), labels, hom,
            temperature=temperature, eta=eta, gamma=gamma, use_scl=use_scl, gather=gather,
        )
        _check_finite(parts["loss"], 2, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        # Stage 2 is never DDP-wrapped (its forward is not one module call): average here.
        dist.average_gradients(p for p in model.parameters() if p.requires_grad)
        optimizer.step()
        meter.add(parts, labels.shape[0])
        if log_every and step % log_every == 0 and dist.is_main():
            log.info("stage 2 epoch %d step %d: loss %.4f (scl %.4f ce %.4f)", epoch, step,
                     float(parts["loss"].detach()), float(parts["scl"]), float(parts["ce"]))
    metrics = meter.result(device)
    metrics.update(stage=2, epoch=epoch, lr=optimizer.param_groups[0]["lr"])
    if report is not None:
        report(metrics)
    return metrics


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(
    directory: str | Path,
    *,
    models: Mapping[str, nn.Module],
    epoch: int,
    config: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder: ``models.safetensors``, ``optimizer.safetensors``, ``checkpoint.json``.

    Tensors go to safetensors and everything else to JSON, so loading never unpickles.
    ``epoch`` is the number of completed epochs (resume starts at ``epoch``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in models.items():
        for key, value in module.state_dict().items():
            # clone: safetensors refuses tensors that share storage (tied or shared modules).
            tensors[f"{name}.{key}"] = value.detach().to("cpu").clone().contiguous()
    save_file(tensors, str(directory / "models.safetensors"))
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "models": sorted(models),
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        opt_tensors, opt_values = {}, {}
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    opt_tensors[f"{idx}.{key}"] = value.detach().to("cpu").clone().contiguous()
                else:
                    opt_values[f"{idx}.{key}"] = value
        save_file(opt_tensors, str(directory / "optimizer.safetensors"))
        meta["optimizer"] = {"param_groups": state["param_groups"], "values": opt_values}
    if scheduler is not None:
        meta["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (directory / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False))
    return directory


def load_checkpoint(
    directory: str | Path,
    *,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns the JSON metadata."""
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint.json in {directory}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {meta.get('format')!r} is not supported (expected {CHECKPOINT_FORMAT})")
    tensors = load_file(str(directory / "models.safetensors"))
    for name, module in models.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"checkpoint has no weights for {name!r} (it holds {meta.get('models')})")
        module.load_state_dict(state, strict=strict)
    if optimizer is not None and "optimizer" in meta:
        opt_tensors = load_file(str(directory / "optimizer.safetensors"))
        state: dict[int, dict[str, Any]] = {}
        for flat, value in list(opt_tensors.items()) + list(meta["optimizer"]["values"].items()):
            idx, key = flat.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    return meta
