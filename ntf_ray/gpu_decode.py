"""Batched JPEG decoding with torchvision's decoder on the scorer's device (nvJPEG on CUDA).

Only files that :func:`ntf_ray.jpeg_screen.screen` passes reach this module. One batched
call decodes them all; when that call fails (one file the screen could not catch fails the
whole batch), the files are decoded one by one, so a bad file costs only itself: its slot
holds the exception and the caller hands it to the core decoder on the CPU.

On a CPU device torchvision's CPU decoder (libjpeg-turbo) runs instead; it gives Pillow's
pixels exactly, which is how the tests check the routing and fallback logic without a GPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _decode_fn():
    from torchvision.io import ImageReadMode, decode_jpeg

    def fn(data, device):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return fn


def as_uint8(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """A 1-D uint8 tensor over ``blob``'s memory, not a copy of it (the decoder only reads it)."""
    with warnings.catch_warnings():  # torch warns that a read-only buffer is not writable: nothing writes it
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.frombuffer(blob, dtype=torch.uint8)


def decode_jpegs(blobs: Sequence[bytes | memoryview], device: torch.device, decode_fn=None) -> list[torch.Tensor | Exception]:
    """``(3, H, W)`` uint8 RGB tensors on ``device``, one per blob, or the exception that blob raised.

    ``decode_fn(data, device)`` takes a uint8 tensor or a list of them (torchvision's
    ``decode_jpeg`` signature); tests pass one that fails on purpose.
    """
    if not blobs:
        return []
    fn = decode_fn or _decode_fn()
    tensors = [as_uint8(b) for b in blobs]
    try:
        out = fn(tensors, device)
        if len(out) != len(tensors):
            raise RuntimeError(f"the decoder returned {len(out)} images for {len(tensors)} files")
        return list(out)
    except Exception as exc:  # noqa: BLE001 - any failure of the batch: retry file by file
        log.info("batched JPEG decode of %d files failed (%s: %s); decoding them one by one",
                 len(tensors), type(exc).__name__, str(exc)[:120])
    results: list[torch.Tensor | Exception] = []
    for t in tensors:
        try:
            results.append(fn(t, device))
        except Exception as exc:  # noqa: BLE001 - this file goes to the CPU decoder
            results.append(exc)
    return results
