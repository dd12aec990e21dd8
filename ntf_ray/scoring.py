"""Score encoded images with a detector: bytes -> decode -> centre crop -> P(fake).

Errors are values: every input gets a ``ScoreResult`` with either a score or a short
reason. Each image is decoded and cropped on its own (peak memory: one decoded image plus
the batch of crops), and the network runs in eval mode, so an image's score does not
depend on what else is in its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ntf_ray.artifact import load_artifact
from ntf_ray.decode import DEFAULT_MAX_PIXELS, decode
from ntf_ray.engine import resolve_device
from ntf_ray.model import Detector
from ntf_ray.storage import StorageOptions
from ntf_ray.transforms import eval_transform, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    score: float | None  # P(fake); None on error
    is_fake: bool | None
    width: int | None  # decoded size before cropping
    height: int | None
    format: str | None
    error: str | None  # None when scored

    def as_dict(self) -> dict:
        return asdict(self)


class Scorer:
    """A loaded Detector plus its preprocessing contract (input size, threshold).

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast, CUDA only); ``"auto"`` = bf16 on
    CUDA, fp32 on CPU.
    """

    def __init__(
        self,
        detector: Detector,
        *,
        input_size: int = 224,
        threshold: float = 0.5,
        model_id: str = "",
        device: str | torch.device = "auto",
        batch_size: int = 64,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        precision: str = "auto",
    ):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.input_size = int(input_size)
        self.threshold = float(threshold)
        self.model_id = model_id
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size!r}")
        self.max_pixels = max_pixels
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
        self.precision = precision
        if self.device.type == "cuda":
            self.detector = self.detector.to(memory_format=torch.channels_last)

    @classmethod
    def from_artifact(
        cls,
        uri: str,
        *,
        device: str = "auto",
        threshold: float | None = None,
        options: StorageOptions | None = None,
        **kwargs,
    ) -> Scorer:
        art = load_artifact(uri, options=options)
        return cls(
            art.detector,
            input_size=art.input_size,
            threshold=art.threshold if threshold is None else threshold,
            model_id=art.model_id,
            device=device,
            **kwargs,
        )

    def preprocess(self, data: bytes) -> tuple[torch.Tensor | None, ScoreResult]:
        """Decode and crop one image; on failure the result carries the reason."""
        decoded = decode(data, max_pixels=self.max_pixels)
        if not decoded.ok:
            return None, ScoreResult(None, None, decoded.width, decoded.height, decoded.format, decoded.error)
        h, w = decoded.image.shape[:2]
        short = min(h, w)
        if self.max_pixels is not None and short < self.input_size:
            # A sliver (say 1 x 20000) upscaled until its short side fits would need gigabytes:
            # refuse it under the same pixel ceiling as the decoder.
            up_h, up_w = max(self.input_size, -(-h * self.input_size // short)), max(self.input_size, -(-w * self.input_size // short))
            if up_h * up_w > self.max_pixels:
                return None, ScoreResult(None, None, decoded.width, decoded.height, decoded.format,
                                         f"too_large: upscaling {w}x{h} to fit {self.input_size} px needs {up_w}x{up_h} = "
                                         f"{up_h * up_w} px > limit {self.max_pixels}")
        try:
            crop = eval_transform(to_tensor(decoded.image), self.input_size)
        except (RuntimeError, ValueError) as exc:  # e.g. a degenerate 1 x N image
            return None, ScoreResult(None, None, decoded.width, decoded.height, decoded.format,
                                     f"decode: cannot crop ({type(exc).__name__})")
        return crop, ScoreResult(None, None, decoded.width, decoded.height, decoded.format, None)

    @torch.inference_mode()
    def score_tensors(self, crops: torch.Tensor) -> np.ndarray:
        """``(B, 3, S, S)`` uint8 crops -> ``(B,)`` float32 P(fake), in chunks of ``batch_size``."""
        out = []
        for start in range(0, crops.shape[0], self.batch_size):
            x = crops[start : start + self.batch_size].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16" and self.device.type == "cuda"):
                logits = self.detector(x)
            out.append(torch.sigmoid(logits.float()).cpu())
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0,), np.float32)

    def score_bytes(self, items: Sequence[bytes]) -> list[ScoreResult]:
        """One result per input, in order; bad inputs get an error and never raise."""
        results: list[ScoreResult] = []
        crops: list[torch.Tensor] = []
        slots: list[int] = []
        for data in items:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                results.append(ScoreResult(None, None, None, None, None, f"read: expected bytes, got {type(data).__name__}"))
                continue
            crop, result = self.preprocess(data)
            results.append(result)
            if crop is not None:
                slots.append(len(results) - 1)
                crops.append(crop)
        if crops:
            scores = self.score_tensors(torch.stack(crops))
            for slot, score in zip(slots, scores):
                r = results[slot]
                score = float(score)  # compare in float64: numpy would compare float32 with a float32-rounded threshold
                results[slot] = ScoreResult(score, score >= self.threshold, r.width, r.height, r.format, None)
        return results
