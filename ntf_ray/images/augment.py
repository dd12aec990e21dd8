"""The training augmentations' parameters, defined once: the CPU transforms
(``images.transforms.Stage1Views``, ``Stage2Transform``) and the GPU views
(``training.device_augment.Stage1DeviceViews``, ``Stage2DeviceViews``) are both built from
these, and ``tests/test_device_augment.py`` checks every field's distribution on both paths.

A training config sets them (``training.stages``); the paper's values are the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage1Augment:
    """Stage 1's two views of a real image (SimCLR style).

    ``resized_crop``: SimCLR's random resized crop (area fraction in ``crop_scale``), or
    (False) a crop at native resolution that keeps pixel-level traces; ``jitter``: the colour
    distortion's strength s (0: none); ``grayscale_prob``: each view made grey with it."""

    size: int = 224
    resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: float = 0.5
    grayscale_prob: float = 0.2


@dataclass(frozen=True)
class Stage2Augment:
    """Stage 2's ``size`` crop and its ``scl_size`` SCL crop (the Wang2020 recipe): Gaussian blur
    (sigma ~ U[blur_sigma]) with ``blur_prob``, JPEG (quality ~ U{jpeg_quality}) with
    ``jpeg_prob``, then the crop and a horizontal flip (``flip``)."""

    size: int = 224
    scl_size: int = 32
    blur_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)
    flip: bool = True
