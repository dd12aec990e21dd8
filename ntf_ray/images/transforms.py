"""Image transforms on ``(3, H, W)`` uint8 tensors.

Detection keys on pixel-level traces, so nothing here resizes an image that is at least
the crop size on each side, except where an augmentation or a robustness perturbation
means to. Images smaller than the crop are upscaled until they fit, never zero-padded
(padding would add edges no real photo has).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ntf_ray.images.augment import Stage1Augment, Stage2Augment


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` uint8 tensor (a copy, safe to mutate)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C", copy=True))


class TooLargeToFit(ValueError):
    """An image whose short side cannot be upscaled to the crop size within the pixel limit;
    the message is the reason a dropped image is logged with (``too_large: ...``)."""


def fit_min_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """``(H, W)`` after ``fit_min_side``: the short side upscaled to ``size``, aspect kept."""
    if h >= size and w >= size:
        return h, w
    short = min(h, w)
    # integer ceil(side * size / short): float scaling can round 224.00000000000003 up to 225
    return max(size, -(-h * size // short)), max(size, -(-w * size // short))


def check_fit(h: int, w: int, size: int, max_pixels: int | None) -> None:
    """Raise ``TooLargeToFit`` when fitting an ``h x w`` image to ``size`` needs more than
    ``max_pixels``: a sliver (say 1 x 20000) would need gigabytes. The scorer refuses the
    same images under the same ceiling as the decoder."""
    new_h, new_w = fit_min_side_shape(h, w, size)
    if max_pixels is not None and (new_h, new_w) != (h, w) and new_h * new_w > max_pixels:
        raise TooLargeToFit(f"too_large: upscaling {w}x{h} to fit {size} px needs {new_w}x{new_h} = "
                            f"{new_h * new_w} px > limit {max_pixels}")


def fit_min_side(img: torch.Tensor, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """Upscale (bilinear, aspect kept) so both sides are >= ``size``; bigger images untouched.

    Raises ``TooLargeToFit`` when the upscaled image would hold more than ``max_pixels``.
    """
    h, w = img.shape[-2:]
    check_fit(h, w, size, max_pixels)
    new_h, new_w = fit_min_side_shape(h, w, size)
    if (new_h, new_w) == (h, w):
        return img
    return TF.resize(img, [new_h, new_w], interpolation=T.InterpolationMode.BILINEAR, antialias=False)


#: An image whose upscaled frame would hold more than this many crops' pixels is cropped
#: before it is resized (``eval_transform``): a 99600 x 50 sliver is not upscaled whole.
THIN_CROPS = 4


def eval_transform(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Test-time preset: centre ``size`` crop at native resolution (upscaled only if smaller).

    A thin image (its upscaled frame over ``THIN_CROPS`` crops) gets only the crop's pixels
    of that frame computed (``_upscaled_centre``): the same bilinear weights, not the whole
    frame in memory; about 1% of values differ from the whole frame's by 1 (rounding).
    """
    h, w = img.shape[-2:]
    new_h, new_w = fit_min_side_shape(h, w, size)
    if (new_h, new_w) != (h, w) and new_h * new_w > THIN_CROPS * size * size:
        return _upscaled_centre(img, new_h, new_w, size)
    return TF.center_crop(fit_min_side(img, size), [size, size])


def _source_taps(in_len: int, out_len: int, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners False, as ``fit_min_side``) of output pixels
    ``start..start+size-1`` of an ``in_len -> out_len`` resize: ``(i0, i1, weight of i1)``."""
    src = (torch.arange(start, start + size, dtype=torch.float64) + 0.5) * (in_len / out_len) - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_len - 1)
    i1 = (i0 + 1).clamp(max=in_len - 1)
    return i0, i1, src - i0


def _upscaled_centre(img: torch.Tensor, new_h: int, new_w: int, size: int) -> torch.Tensor:
    """The centre ``size`` crop of ``img`` resized to ``new_h x new_w``, computing only the crop."""
    h, w = img.shape[-2:]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # as TF.center_crop
    x0, x1, wx = _source_taps(w, new_w, left, size)
    y0, y1, wy = _source_taps(h, new_h, top, size)
    # horizontal pass rounded to uint8, then vertical, as torch's uint8 resize does (its weights are
    # fixed-point: about 1% of values land 1 apart)
    cols = (img[..., x0].double() * (1 - wx) + img[..., x1].double() * wx).round_().clamp_(0, 255)
    out = cols[..., y0, :] * (1 - wy)[:, None] + cols[..., y1, :] * wy[:, None]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_crop(img: torch.Tensor, size: int, generator: random.Random | None = None,
                max_pixels: int | None = None) -> torch.Tensor:
    rng = generator or random
    img = fit_min_side(img, size, max_pixels)
    h, w = img.shape[-2:]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return img[:, top : top + size, left : left + size]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of ``2 * ceil(3 sigma) + 1`` pixels; sigma <= 0 is identity.

    Along a side shorter than the kernel's half-width the kernel is cut to ``2 * side - 1``
    (reflect padding needs fewer pixels of padding than the side has): a 1 x N image is
    blurred along its row only.
    """
    if sigma <= 0:
        return img
    k = 2 * math.ceil(3 * sigma) + 1
    h, w = img.shape[-2:]
    return TF.gaussian_blur(img, [min(k, 2 * w - 1), min(k, 2 * h - 1)], [sigma, sigma])


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode as JPEG at ``quality`` (1..100) with Pillow, the same codec users' images pass through."""
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return to_tensor(out)


def gaussian_noise(img: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, sigma^2) noise, sigma in [0, 1] intensity units, then re-quantise to uint8."""
    if sigma <= 0:
        return img
    noise = torch.randn(img.shape, generator=generator) * (sigma * 255.0)
    return (img.float() + noise).round_().clamp_(0, 255).to(torch.uint8)


def downscale(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize by ``factor`` in (0, 1] (antialiased bilinear); the eval crop upscales it back if needed."""
    if not 0 < factor <= 1:
        raise ValueError(f"downscale factor must be in (0, 1], got {factor}")
    if factor == 1:
        return img
    h, w = img.shape[-2:]
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    return TF.resize(img, size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)


PERTURBATIONS = ("blur", "jpeg", "noise", "scale")


def perturb(img: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Robustness perturbation: ``blur`` (sigma px), ``jpeg`` (quality), ``noise`` (sigma in
    [0, 1] units) or ``scale`` (down-scaling factor; ``downscale`` is the same). Applied
    before the eval crop, as an attacker or a re-upload would."""
    if kind == "blur":
        return gaussian_blur(img, float(level))
    if kind == "jpeg":
        return jpeg(img, int(level))
    if kind == "noise":
        return gaussian_noise(img, float(level), generator)
    if kind in ("scale", "downscale"):
        return downscale(img, float(level))
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {PERTURBATIONS}")


class Stage1Views:
    """Stage-1 two-view augmentation (SimCLR style) of a real image: ``img -> (v1, v2)``.

    ``resized_crop=True`` is SimCLR's random resized crop (scale ``crop_scale``);
    ``False`` crops at native resolution, keeping pixel-level traces intact. ``jitter`` is
    SimCLR's colour-distortion strength s (0 disables it). An image that cannot be upscaled
    to ``size`` within ``max_pixels`` raises ``TooLargeToFit``.
    """

    def __init__(
        self,
        size: int = 224,
        *,
        resized_crop: bool = True,
        crop_scale=(0.08, 1.0),
        jitter: float = 0.5,
        grayscale_prob: float = 0.2,
        max_pixels: int | None = None,
    ):
        self.size = size
        self.resized_crop = resized_crop
        self.max_pixels = max_pixels
        crop = (
            T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)
            if resized_crop
            else T.RandomCrop(size)
        )
        self.augment = T.Compose(
            [
                crop,
                T.RandomHorizontalFlip(),
                # SimCLR's colour distortion of strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s), p=0.8.
                T.RandomApply([T.ColorJitter(0.8 * jitter, 0.8 * jitter, 0.8 * jitter, 0.2 * jitter)], p=0.8 if jitter > 0 else 0.0),
                T.RandomGrayscale(p=grayscale_prob),
            ]
        )

    @classmethod
    def of(cls, params: Stage1Augment, *, max_pixels: int | None = None) -> Stage1Views:
        """The CPU views of ``params`` (the GPU path's ``Stage1DeviceViews`` takes the same)."""
        return cls(**dataclasses.asdict(params), max_pixels=max_pixels)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = fit_min_side(img, self.size, self.max_pixels)
        return self.augment(img), self.augment(img)


class Stage2Transform:
    """Stage-2 training view: ``img -> (crop, scl_crop)``.

    The Wang2020 recipe: Gaussian blur (sigma ~ U[blur_sigma]) with probability
    ``blur_prob``, JPEG (quality ~ U{jpeg_quality}) with probability ``jpeg_prob``, random
    ``size`` crop, horizontal flip. The SCL view is a random ``scl_size`` crop of that crop.

    Random draws come from a ``random.Random`` seeded by ``seed``. In a DataLoader worker
    process the stream is re-seeded from ``seed`` and the worker's own seed (which torch
    draws per worker from the loader's generator), so workers never repeat each other's
    draws and a seeded loader still gives the same draws on every run.

    An image that cannot be upscaled to ``size`` within ``max_pixels`` raises
    ``TooLargeToFit`` before any work or draw.
    """

    def __init__(
        self,
        size: int = 224,
        scl_size: int = 32,
        *,
        blur_prob: float = 0.1,
        blur_sigma=(0.0, 3.0),
        jpeg_prob: float = 0.1,
        jpeg_quality=(30, 100),
        flip: bool = True,
        seed: int | None = None,
        max_pixels: int | None = None,
    ):
        self.size, self.scl_size = size, scl_size
        self.max_pixels = max_pixels
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.jpeg_prob, self.jpeg_quality = jpeg_prob, tuple(jpeg_quality)
        self.flip = flip
        self.seed = seed
        self.rng = random.Random(seed)
        self._stream: tuple[int, int] | None = None  # (worker id, worker seed) the rng was seeded for

    @classmethod
    def of(cls, params: Stage2Augment, *, seed: int | None = None, max_pixels: int | None = None) -> Stage2Transform:
        """The CPU transform of ``params`` (the GPU path's ``Stage2DeviceViews`` takes the same)."""
        return cls(**dataclasses.asdict(params), seed=seed, max_pixels=max_pixels)

    def _worker_rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._stream != (info.id, info.seed):
            # A worker holds a copy of this object, rng state included: re-seed per worker.
            self._stream = (info.id, info.seed)
            self.rng = random.Random(f"{self.seed}:{info.seed}")
        return self.rng

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_fit(*img.shape[-2:], self.size, self.max_pixels)
        rng = self._worker_rng()
        if rng.random() < self.blur_prob:
            img = gaussian_blur(img, rng.uniform(*self.blur_sigma))
        if rng.random() < self.jpeg_prob:
            img = jpeg(img, rng.randint(*self.jpeg_quality))
        crop = random_crop(img, self.size, rng)
        if self.flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop.contiguous(), random_crop(crop, self.scl_size, rng).contiguous()
