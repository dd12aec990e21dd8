"""Where a detector looked: Grad-CAM++ maps of the fake logit over each image (the paper's
Figure 6), saved as the crop the detector scored next to the map laid over it.

The maps come from the ``grad-cam`` package (``pip install ntf-ray[explain]``), never from
code written here. The target is the encoder's last block: ResNet's ``layer4[-1]``; for the
tiny test backbone, whose embedding joins pooled full-resolution features to pooled deep
ones, the last block of each branch (the package averages their maps). The input is the
centre crop a scan scores; the map is the gradient-weighted activation of the logit
``D(t(E(x)))``, so it says what pushed the score up, not proof of where a generator worked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ntf_ray import storage
from ntf_ray.storage import DEFAULT_MAX_BYTES, StorageOptions

log = logging.getLogger(__name__)


@dataclass
class Explained:
    source: str
    output: str | None
    score: float | None
    cam: np.ndarray | None  # (S, S) in [0, 1]
    error: str | None = None


class _Logit:
    """grad-cam's target: the fake logit itself (the detector has one output per image)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1)[0] if output.ndim else output


def target_layers(detector) -> list[torch.nn.Module]:
    trunk = detector.encoder.trunk
    if hasattr(trunk, "layer4"):
        return [trunk.layer4[-1]]
    return [trunk.stem[-1], trunk.deep[-1]]


def _cam_module():
    try:
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.image import show_cam_on_image
    except ImportError:
        raise ValueError("explain needs the grad-cam package: pip install 'ntf-ray[explain]'") from None
    return GradCAMPlusPlus, show_cam_on_image


def cam_maps(detector, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, maps)`` for ``(B, 3, S, S)`` uint8 crops: P(fake) per image and ``(B, S, S)``
    Grad-CAM++ maps in [0, 1] of the fake logit."""
    GradCAMPlusPlus, _ = _cam_module()
    detector = detector.eval()
    x = crops.float().div(255.0)
    with torch.no_grad():
        scores = torch.sigmoid(detector(x)).cpu().numpy()
    with GradCAMPlusPlus(model=detector, target_layers=target_layers(detector)) as cam:
        maps = cam(input_tensor=x, targets=[_Logit() for _ in range(len(x))])
    return scores, np.asarray(maps, dtype=np.float32)


def overlay_png(crop: torch.Tensor, cam: np.ndarray, score: float) -> bytes:
    """The crop and the map laid over it, side by side, as PNG bytes (the score in the caption bar)."""
    _, show_cam_on_image = _cam_module()
    rgb = crop.permute(1, 2, 0).cpu().numpy()
    heat = show_cam_on_image(rgb.astype(np.float32) / 255.0, cam, use_rgb=True)
    pair = np.concatenate([rgb, heat], axis=1)
    image = Image.fromarray(pair)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_caption(score))
    return buf.getvalue()


def _caption(score: float):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", f"ntf-ray Grad-CAM++ of the fake logit; left: the crop scored, right: the map; "
                                 f"score P(fake) = {score:.4f}")
    return info


def overlay_name(position: int, source: str, score: float) -> str:
    """``NNNN_STEM_HASH_scoreS.png`` for the input at ``position``: its place among the inputs
    (names never collide within a run, whatever the inputs are called: ``a/x.png``, ``b/x.png``
    and ``0002_x.png`` included), the file name's stem in safe characters, at most 64, and
    the first 8 hex digits of the sha256 of its uri (two inputs of one stem stay apart in a
    folder written by several runs)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.rstrip("/").rsplit("/", 1)[-1]).rsplit(".", 1)[0][:64] or "image"
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{position:04d}_{stem}_{digest}_score{score:.3f}.png"


def explain(model: str, sources: Sequence[str], output: str, *, options: StorageOptions | None = None,
            device: str = "cpu", max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[Explained]:
    """Grad-CAM++ overlays of ``sources`` (files or s3:// objects) written to ``output``, one per
    input that is read (at most ``max_bytes``: a larger one gets a ``too_large:`` error, a device
    or FIFO a ``read:`` one) and decoded."""
    from ntf_ray.detector.artifact import load_artifact
    from ntf_ray.detector.score_files import input_error
    from ntf_ray.detector.scorer import Scorer

    art = load_artifact(model, options=options, map_location=device)
    scorer = Scorer(art.detector, input_size=art.input_size, threshold=art.threshold, device=device, decoder="pil")
    results: list[Explained] = []
    blobs = storage.read_many(list(sources), options, max_bytes=max_bytes)
    crops, kept = [], []
    for source, blob in zip(sources, blobs):
        if isinstance(blob, BaseException):
            results.append(Explained(source, None, None, None, input_error(blob)))
            continue
        crop, result = scorer.preprocess(blob)
        if crop is None:
            results.append(Explained(source, None, None, None, result.error))
            continue
        crops.append(crop)
        kept.append(len(results))
        results.append(Explained(source, None, None, None))
    if crops:
        stacked = torch.stack(crops).to(device)
        scores, maps = cam_maps(art.detector, stacked)
        for k, i in enumerate(kept):
            r = results[i]
            target = storage.join(output, overlay_name(i + 1, r.source, float(scores[k])))
            storage.write_bytes(target, overlay_png(stacked[k], maps[k], float(scores[k])), options)
            r.output, r.score, r.cam = target, float(scores[k]), maps[k]
    return results
