"""The two NTF stages as objects: what differs between stage 1 and stage 2 is decided here once,
and the one-process recipe, the Ray Train worker, the CPU tasks and the device path ask.

Stage 1 (natural-trace learning, Eq. 1-4) trains on real images only, two augmented views
each (``view1``/``view2``), the whole stage-1 network. Stage 2 (transfer, Eq. 5-7) trains on
real and fake images, a 224 crop and its 32 px SCL crop (``image``/``crop``), the heads (and
the encoder only for a variant that trains it).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ntf_ray.images.augment import Stage1Augment, Stage2Augment
from ntf_ray.nn.model import Stage1Model, Stage2Model, build_encoder
from ntf_ray.nn.variants import get_variant
from ntf_ray.training.config import TrainConfig


@dataclass(frozen=True)
class Stage(abc.ABC):
    number: int
    keys: tuple[str, str]  # the batch's two image tensors
    labels: tuple[int, ...]  # the training rows' labels
    what: str  # the training rows, as an error message names them
    min_rows: int  # fewest rows a rank's batch may hold when ranks agree on batches (a BN/SupCon need)
    ddp: bool  # the model is wrapped in DistributedDataParallel on several workers

    # ---- data
    def rows(self, table: pa.Table, cfg: TrainConfig) -> pa.Table:
        """The train split's rows this stage learns from, limited to ``cfg.train_generators``."""
        from ntf_ray.training.datasets import select

        rows = select(table, split="train", labels=self.labels, generators=cfg.train_generators)
        if rows.num_rows == 0:
            raise ValueError(f"the manifest has no {self.what} (split=train)")
        return rows

    @abc.abstractmethod
    def augment(self, cfg: TrainConfig) -> Stage1Augment | Stage2Augment:
        """The augmentation's parameters as ``cfg`` sets them (both the CPU and the GPU path take these)."""
        ...

    @abc.abstractmethod
    def transform(self, cfg: TrainConfig, seed: int | None = None) -> Callable[[torch.Tensor], tuple]:
        """The CPU path's augmentation of one decoded image."""
        ...

    @abc.abstractmethod
    def device_views(self, cfg: TrainConfig):
        """The GPU path's augmentation of a batch of frames (``training.device_augment``)."""
        ...

    @abc.abstractmethod
    def view_sizes(self, cfg: TrainConfig) -> tuple[int, int]:
        """The side of the batch's first and second image tensors."""
        ...

    def empty_batch(self, cfg: TrainConfig) -> dict[str, np.ndarray]:
        """A batch of no rows, its arrays shaped as a full one's."""
        first, second = self.view_sizes(cfg)
        return {self.keys[0]: np.zeros((0, 3, first, first), np.uint8),
                self.keys[1]: np.zeros((0, 3, second, second), np.uint8), "label": np.zeros((0,), np.int64)}

    # ---- training
    @abc.abstractmethod
    def epochs(self, cfg: TrainConfig) -> int:
        ...

    @abc.abstractmethod
    def lr(self, cfg: TrainConfig) -> float:
        ...

    @abc.abstractmethod
    def trainable(self, model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
        """The parameters the optimiser steps."""
        ...

    @abc.abstractmethod
    def epoch(self, model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
              optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, epoch: int, **common: Any) -> dict[str, float]:
        """One epoch of the engine's loop for this stage, with the losses' arguments from ``cfg``."""
        ...


def build_stage1(cfg: TrainConfig) -> Stage1Model:
    """The stage-1 network of ``cfg.variant`` (encoder from ``cfg.pretrained``); no f_het
    when the variant uses neither L_het nor L_orth."""
    variant = get_variant(cfg.variant)
    return Stage1Model(build_encoder(cfg.backbone, cfg.pretrained), cfg.proj_dim, het=variant.needs_f_het)


def build_stage2(cfg: TrainConfig, stage1: Stage1Model | None) -> Stage2Model:
    """The stage-2 network of ``cfg.variant`` on a trained stage 1, or, for a variant without
    stage 1 (``bce``), on a fresh encoder from ``cfg.pretrained``."""
    variant = get_variant(cfg.variant)
    if stage1 is None:
        if variant.stage1:
            raise ValueError(f"variant {variant.name} starts stage 2 from a trained stage 1")
        stage1 = Stage1Model(build_encoder(cfg.backbone, cfg.pretrained), cfg.proj_dim, het=False)
    return Stage2Model.from_stage1(stage1, cfg.proj_dim, head=variant.head)


class _Stage1(Stage):
    def augment(self, cfg: TrainConfig) -> Stage1Augment:
        return Stage1Augment(cfg.crop_size, resized_crop=cfg.stage1_resized_crop,
                             crop_scale=tuple(cfg.stage1_crop_scale), jitter=cfg.stage1_jitter,
                             grayscale_prob=cfg.stage1_grayscale)

    def transform(self, cfg: TrainConfig, seed: int | None = None):
        from ntf_ray.images.transforms import Stage1Views

        return Stage1Views.of(self.augment(cfg), max_pixels=cfg.max_pixels)

    def device_views(self, cfg: TrainConfig):
        from ntf_ray.training.device_augment import Stage1DeviceViews

        return Stage1DeviceViews(**vars(self.augment(cfg)))

    def view_sizes(self, cfg: TrainConfig) -> tuple[int, int]:
        return cfg.crop_size, cfg.crop_size

    def build(self, cfg, *, stage1_weights=None):
        return build_stage1(cfg)

    def epochs(self, cfg: TrainConfig) -> int:
        return cfg.epochs_stage1

    def lr(self, cfg: TrainConfig) -> float:
        return cfg.lr

    def trainable(self, model, cfg):
        return list(model.parameters())

    def epoch(self, model, batches, optimizer, cfg, *, epoch, **common):
        from ntf_ray.training.engine import train_stage1_epoch

        v = get_variant(cfg.variant)
        return train_stage1_epoch(model, batches, optimizer, epoch=epoch, temperature=cfg.temperature, lam=cfg.lam,
                                  use_het=v.use_het, use_orth=v.use_orth, amp=cfg.amp,
                                  channels_last=cfg.channels_last, **common)


class _Stage2(Stage):
    def augment(self, cfg: TrainConfig) -> Stage2Augment:
        return Stage2Augment(cfg.crop_size, cfg.scl_crop_size, blur_prob=cfg.blur_prob,
                             blur_sigma=tuple(cfg.blur_sigma), jpeg_prob=cfg.jpeg_prob,
                             jpeg_quality=tuple(cfg.jpeg_quality))

    def transform(self, cfg: TrainConfig, seed: int | None = None):
        from ntf_ray.images.transforms import Stage2Transform

        return Stage2Transform.of(self.augment(cfg), seed=seed, max_pixels=cfg.max_pixels)

    def device_views(self, cfg: TrainConfig):
        from ntf_ray.training.device_augment import Stage2DeviceViews

        return Stage2DeviceViews(**vars(self.augment(cfg)))

    def view_sizes(self, cfg: TrainConfig) -> tuple[int, int]:
        return cfg.crop_size, cfg.scl_crop_size

    def build(self, cfg, *, stage1_weights=None):
        if not get_variant(cfg.variant).stage1:  # bce: the encoder from cfg.pretrained, trained end to end
            return build_stage2(cfg, None)
        if stage1_weights is None:
            raise ValueError(f"variant {cfg.variant}: stage 2 starts from a trained stage 1")
        # pretrained=none: stage 1's weights overwrite every one (no ImageNet download here)
        stage1 = build_stage1(dataclasses.replace(cfg, pretrained="none"))
        stage1_weights(stage1)
        return build_stage2(cfg, stage1)

    def epochs(self, cfg: TrainConfig) -> int:
        return cfg.epochs_stage2

    def lr(self, cfg: TrainConfig) -> float:
        return cfg.lr_stage2 or cfg.lr

    def trainable(self, model, cfg):
        from ntf_ray.training.engine import prepare_stage2

        return prepare_stage2(model, train_encoder=get_variant(cfg.variant).train_encoder)

    def epoch(self, model, batches, optimizer, cfg, *, epoch, **common):
        from ntf_ray.training.engine import train_stage2_epoch

        v = get_variant(cfg.variant)
        return train_stage2_epoch(model, batches, optimizer, epoch=epoch, temperature=cfg.temperature, eta=cfg.eta,
                                  gamma=cfg.gamma, use_scl=v.use_scl, train_encoder=v.train_encoder, amp=cfg.amp,
                                  channels_last=cfg.channels_last, **common)


STAGE1 = _Stage1(number=1, keys=("view1", "view2"), labels=(0,), what="real training images", min_rows=1, ddp=True)
STAGE2 = _Stage2(number=2, keys=("image", "crop"), labels=(0, 1), what="training images", min_rows=2, ddp=False)
STAGES = {1: STAGE1, 2: STAGE2}


def stage_of(number: int | str) -> Stage:
    """``STAGE1`` or ``STAGE2`` by number."""
    try:
        return STAGES[int(number)]
    except (KeyError, ValueError):
        raise ValueError(f"no stage {number!r}: NTF has stages 1 and 2") from None
