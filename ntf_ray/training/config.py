"""Training configuration: the paper's hyper-parameters, every one a field.

The config stops at the entry points (CLI, jobs, the local recipe); models, losses and the
engine take explicit keyword arguments. ``load_config`` merges a YAML file and
``key=value`` overrides onto the defaults and rejects unknown keys at once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ntf_ray import storage


@dataclass
class TrainConfig:
    # Network
    backbone: str = "resnet50"
    pretrained: str = "none"  # "imagenet", "none", or a local weights file
    proj_dim: int = 128
    # Images
    crop_size: int = 224  # classifier crop (train random / test centre)
    scl_crop_size: int = 32  # SCL crop (stage 2)
    stage1_resized_crop: bool = True  # SimCLR random resized crop; False = crop at native resolution
    stage1_crop_scale: tuple[float, float] = (0.08, 1.0)
    stage1_jitter: float = 0.5  # SimCLR colour-distortion strength s (0 = off)
    stage1_grayscale: float = 0.2  # probability
    blur_prob: float = 0.1  # Wang2020 augmentation, stage 2
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)
    max_pixels: int = 100_000_000
    # Optimisation (SGD as the paper)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    schedule: str = "cosine"  # "cosine", "step" or "constant"
    step_size: int = 30  # epochs between decays for "step"
    step_gamma: float = 0.1
    warmup_epochs: int = 0
    epochs_stage1: int = 200
    epochs_stage2: int = 10
    lr_stage2: float | None = None  # None: same as lr
    batch_size: int = 256  # per worker
    # Losses
    temperature: float = 0.1
    lam: float = 0.1
    eta: float = 0.5
    gamma: float = 0.5
    # Which detector to train (ntf_ray.nn.variants): the paper's ntf, no-orth, no-het-orth,
    # no-scl, linear-probe, bce, and the readings beyond the paper ntf-proximity (the default,
    # chosen by bench/README.md's figures) and traces-only
    variant: str = "ntf-proximity"
    # Variants that decide by the distance to the natural traces: real images it is fitted on,
    # and held-out reals it is calibrated on (ntf_ray.training.natural_traces)
    trace_fit_images: int = 4096
    trace_calibration_images: int = 2048
    train_generators: list[str] | None = None  # None: every generator in the manifest's train split
    # Runtime
    device: str = "auto"  # "auto", "cpu", "cuda"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    num_workers: int = 2  # data-loading workers in the local recipe
    cache_bytes: bool = False  # Ray Train: keep encoded images in the object store after the first read
    seed: int = 0
    threshold: float = 0.5
    # Recovery drills: fail once at the start of this (0-based) epoch of each stage, unless
    # resuming; fail_mode "raise" (rank 0 raises) or "kill" (the last rank's process is
    # killed with SIGKILL, as when its node is lost).
    fail_at_epoch: int | None = None
    fail_mode: str = "raise"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict`` (JSON turns tuples into lists)."""
        tuples = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, tuple)}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in values.items()})


#: Fields a resumed run may change: they say where and how the work runs (device, memory
#: layout, local data-loading processes, byte cache), the detector's decision threshold, or
#: the recovery drill. Every other field (lr, batch size, variant, crops, augmentations,
#: losses, seed, data selection, ...) shapes the optimisation already under way in the
#: checkpoint: the optimiser would keep the stored lr while the rest followed the new one.
RESUMABLE = frozenset({"device", "channels_last", "num_workers", "cache_bytes", "threshold", "fail_at_epoch",
                       "fail_mode"})
#: Epoch counts may change (extend or shorten a run) only where an epoch's learning rate
#: does not depend on them: under the step and constant schedules. Cosine decays over the
#: epoch count, so the remaining epochs would follow another curve than the one begun.
EPOCHS = ("epochs_stage1", "epochs_stage2")


class ResumeConflict(ValueError):
    """A run resumed with a config that would change its maths (see ``RESUMABLE``)."""


def resume_conflicts(stored: dict[str, Any], new: TrainConfig, *, stored_workers: int | None = None,
                     workers: int | None = None) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored value, new value)}`` for each change a resumed run must refuse.

    ``stored`` is the ``to_dict()`` of the run's first config; fields it lacks (written by
    an older version) count as their defaults, fields it has that no longer exist are ignored.
    With the number of data-parallel workers of both, ``batch_size`` may change with them
    as long as the global batch (workers x batch_size: what the losses, batch norm and the
    number of steps per epoch see) stays the same.
    """
    defaults = TrainConfig().to_dict()
    current = new.to_dict()
    extendable = stored.get("schedule", defaults["schedule"]) in ("step", "constant") and \
        current["schedule"] in ("step", "constant")
    out = {}
    for name, value in current.items():
        old = stored.get(name, defaults[name])
        if old == value or name in RESUMABLE or (name in EPOCHS and extendable):
            continue
        out[name] = (old, value)
    if stored_workers is not None and workers is not None:
        out.pop("batch_size", None)
        old_batch = stored.get("batch_size", defaults["batch_size"])
        if stored_workers * old_batch != workers * new.batch_size:
            out["global batch (workers x batch_size)"] = (f"{stored_workers} x {old_batch} = {stored_workers * old_batch}",
                                                          f"{workers} x {new.batch_size} = {workers * new.batch_size}")
    return out


def refuse_resume(run: str, conflicts: dict[str, tuple[Any, Any]]) -> None:
    """Raise a ``ResumeConflict`` naming each of ``conflicts`` with its old and new value."""
    if not conflicts:
        return
    lines = [f"  {name}: {old!r} -> {new!r}"
             + (" (the cosine schedule spans the epoch count; schedules step and constant may extend a run)"
                if name in EPOCHS else "")
             for name, (old, new) in conflicts.items()]
    raise ResumeConflict(f"{run} was started with another config; resuming it with this one would go on with a "
                         "mix of both:\n" + "\n".join(lines)
                         + "\nresume with the stored values, or start a new run with a new --output and --run-name")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a YAML or command-line value to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"config {name}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(f"config {name}: expected a list of {len(default)} numbers, got {value!r}")
        return tuple(type(d)(v) for d, v in zip(default, value))
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {name}: expected a number, got {value!r}") from None
        if isinstance(default, int):
            if number != int(number):
                raise ValueError(f"config {name}: expected an integer, got {value!r}")
            return int(number)
        return number
    if isinstance(value, str) and default is None:
        parsed = yaml.safe_load(value)
        return parsed
    return value


def _fields() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return out


#: Ablation switches of earlier versions, now one ``variant`` each.
_REPLACED = {
    "use_het": "variant=no-het-orth (without L_het and L_orth)",
    "use_orth": "variant=no-orth (without L_orth) or variant=no-het-orth",
    "use_scl": "variant=no-scl (same network, BCE only) or variant=linear-probe",
    "train_encoder_stage2": "variant=bce (the Wang2020 baseline)",
}


#: The most read of a training config file (a YAML of a few dozen fields).
CONFIG_MAX_BYTES = 1 * 2**20


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then a YAML file, then ``key=value`` overrides (later wins)."""
    defaults = _fields()
    values: dict[str, Any] = {}
    if path is not None:
        text = storage.read_input(str(path), what="config file", max_bytes=CONFIG_MAX_BYTES)
        try:
            loaded = yaml.safe_load(text.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"config file {path} is not YAML text ({type(exc).__name__})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r}: use key=value")
            key, value = item.split("=", 1)
            values[key.strip()] = value
    replaced = sorted(set(values) & set(_REPLACED))
    if replaced:
        raise ValueError("; ".join(f"config {k} was replaced by the variant switch: use {_REPLACED[k]}" for k in replaced))
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(defaults)}")
    resolved = {k: _coerce(k, v, defaults[k]) for k, v in values.items()}
    cfg = TrainConfig(**resolved)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    from ntf_ray.nn.model import BACKBONES
    from ntf_ray.nn.variants import get_variant

    get_variant(cfg.variant)
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"backbone {cfg.backbone!r}: choose one of {sorted(BACKBONES)}")
    if cfg.schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule {cfg.schedule!r}: choose cosine, step or constant")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.fail_mode not in ("raise", "kill"):
        raise ValueError(f"fail_mode {cfg.fail_mode!r}: choose raise or kill")
    for name in ("crop_size", "scl_crop_size", "batch_size", "proj_dim"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive")
    if cfg.scl_crop_size > cfg.crop_size:
        raise ValueError("scl_crop_size must not exceed crop_size")
    for name in ("blur_prob", "jpeg_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]")
    if cfg.temperature <= 0:
        raise ValueError("temperature must be positive")
    if cfg.epochs_stage1 < 0 or cfg.epochs_stage2 < 0:
        raise ValueError("epoch counts must be >= 0")
