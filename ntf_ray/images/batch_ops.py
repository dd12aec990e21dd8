"""Batched augmentation operations with one random draw per sample, for ``device_augment``.

torchvision's transforms draw one set of parameters per call; a batch on a GPU needs one per
image. The draws here follow torchvision's rules (``RandomResizedCrop``'s box, ``ColorJitter``'s
factors and order), and the colour operations are torchvision's uint8 kernels re-stated with a
factor per sample, each rounding down to whole levels between operations as they do (the
tests hold them to torchvision's output). Resized crops use ``roi_align``: bilinear when
upscaling, the mean of bilinear samples over each output pixel's footprint when downscaling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: torchvision's luma weights (``rgb_to_grayscale``).
LUMA = (0.2989, 0.587, 0.114)


# ---------------------------------------------------------------- parameters


def resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                     gen: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` by torchvision's ``RandomResizedCrop`` rule, drawn from ``gen``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=gen)


def bernoulli(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


# ---------------------------------------------------------------- batched operations


def crop_resize(frame: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """``(len(boxes), 3, size, size)`` float crops of one ``(3, H, W)`` or ``(N, 3, H, W)``
    stack of frames; ``boxes`` are ``(top, left, h, w)``, one per output, and a stack takes
    ``(index, top, left, h, w)`` instead. A box of exactly ``size`` is a copy of its pixels."""
    from torchvision.ops import roi_align

    stack = frame if frame.ndim == 4 else frame.unsqueeze(0)
    rois = torch.tensor([[b[0] if frame.ndim == 4 else 0, *_xyxy(b[-4:])] for b in boxes], dtype=torch.float32,
                        device=frame.device)
    return roi_align(stack.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _xyxy(box: Sequence[int]) -> tuple[int, int, int, int]:
    top, left, h, w = box
    return left, top, left + w, top + h


def _floor_clamp(x: torch.Tensor) -> torch.Tensor:
    """uint8 semantics on float values: clamp to [0, 255], then drop the fraction (``.to(uint8)``)."""
    return x.clamp_(0, 255).floor_()


def _per_sample(factors: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factors.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _floor_clamp(torch.addcmul(x * f, other, 1.0 - f))


def adjust_brightness(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample ``TF.adjust_brightness`` of a float batch holding whole levels 0..255."""
    return _floor_clamp(x * _per_sample(factors, x))


def adjust_contrast(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    mean = _luma(x).floor_().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factors, x))


def adjust_saturation(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(x, _luma(x).floor_(), _per_sample(factors, x))


def adjust_hue(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample ``TF.adjust_hue``: to HSV in [0, 1], hue shifted, back, scaled as ``to_dtype``."""
    rgb = x / 255.0
    maxc, _ = rgb.max(dim=-3)
    minc, _ = rgb.min(dim=-3)
    span = maxc - minc
    flat = span == 0
    s = span / torch.where(flat, torch.ones_like(maxc), maxc)
    safe = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = ((maxc.unsqueeze(-3) - rgb) / safe.unsqueeze(-3)).unbind(dim=-3)
    r, g, _ = rgb.unbind(dim=-3)
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    is_b = ~is_r & ~is_g
    h = (bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b
    h = (h / 6.0 + 1.0).fmod(1.0)
    h = (h + _per_sample(factors, x).squeeze(1)).remainder(1.0)
    # back to RGB: sector i of six, fraction f within it
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder(6)
    v = maxc
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * f) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * f) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    out = vpqt.gather(-3, select[:, i].movedim(0, -3))
    return out.mul(256.0 - 1e-3).floor_()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``TF.rgb_to_grayscale(num_output_channels=3)`` of a float batch of whole levels."""
    return _luma(x).floor_().expand_as(x).contiguous()


COLOR_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``ColorJitter`` per sample: ``factors`` ``(B, 4)`` (brightness, contrast, saturation,
    hue), ``order`` ``(B, 4)``, each row a permutation of the four operations."""
    order = order.to(x.device)
    for position in range(4):
        for op_id, op in enumerate(COLOR_OPS):
            rows = (order[:, position] == op_id).nonzero().flatten()
            if len(rows):
                x[rows] = op(x[rows], factors[rows.cpu(), op_id])
    return x


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()
