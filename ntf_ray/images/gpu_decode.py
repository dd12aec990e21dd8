"""Batched JPEG decoding on the scorer's device: torchvision's decoder (nvJPEG's CUDA kernels),
or nvImageCodec's (the GPU's hardware JPEG engines, off the multiprocessors the network needs)
when the optional ``nvidia-nvimgcodec`` package is installed and asked for.

Only files that :func:`ntf_ray.images.jpeg_screen.screen` passes reach this module. One batched
call decodes them all; when that call fails (one file the screen could not catch fails the
whole batch), the files are decoded one by one, so a bad file costs only itself: its slot
holds the exception and the caller hands it to the core decoder on the CPU.

On a CPU device torchvision's CPU decoder (libjpeg-turbo) runs instead; it gives Pillow's
pixels exactly, which is how the tests check the routing and fallback logic without a GPU.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _decode_fn():
    from torchvision.io import ImageReadMode, decode_jpeg

    def fn(data, device):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return fn


class DecoderUnavailable(ValueError):
    """The decoder asked for is not installed or cannot run here."""


def check_decoder(decode_fn, device: torch.device) -> None:
    """Decode two tiny JPEGs with ``decode_fn`` on ``device`` (which also loads its kernels), or
    raise ``DecoderUnavailable``: a decoder that cannot run would otherwise fail every file."""
    from torchvision.io import encode_jpeg

    tiny = encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8)).numpy().tobytes()
    try:
        out = decode_jpegs([tiny, tiny], torch.device(device), decode_fn)
    except Exception as exc:  # noqa: BLE001 - whatever stops it, it cannot decode here
        out = [exc]
    bad = [o for o in out if not isinstance(o, torch.Tensor)]
    if bad:
        raise DecoderUnavailable(f"the decoder cannot decode on {device}: {type(bad[0]).__name__}: "
                                 f"{str(bad[0])[:200]}")


def nvimgcodec_module():
    """``nvidia.nvimgcodec``, or ``DecoderUnavailable`` saying how to install it."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        raise DecoderUnavailable("the nvimgcodec decoder needs NVIDIA's nvImageCodec: pip install "
                                 "'ntf-ray[nvimgcodec]' (CUDA 13), or use --decoder nvjpeg") from None
    return nvimgcodec


_local = threading.local()


def nvimgcodec_fn(module=None):
    """A ``decode_fn`` for :func:`decode_jpegs` on nvImageCodec: the hardware JPEG engines first,
    nvJPEG's hybrid CPU/GPU backend for what they do not take (progressive files, odd sampling).

    A file it cannot decode gets an exception in its slot (the others keep theirs); the
    images come back as ``(3, H, W)`` views of nvImageCodec's interleaved RGB buffers.
    """
    lib = module or nvimgcodec_module()  # looked up at call time: tests put a stand-in there

    def decoder(device: torch.device):
        # one decoder per thread and device: each holds its own engine state and CUDA streams
        key = (id(lib), device.type, device.index)
        cache = _local.__dict__.setdefault("nvimgcodec", {})
        if key not in cache:
            kinds = lib.BackendKind
            index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 0
            try:
                cache[key] = lib.Decoder(device_id=index, backends=[lib.Backend(kinds.HW_GPU_ONLY),
                                                                    lib.Backend(kinds.HYBRID_CPU_GPU)])
            except Exception as exc:  # noqa: BLE001 - kept: a batch's files would each try again
                cache[key] = DecoderUnavailable(f"nvImageCodec has no decoder for {device}: {exc}")
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    def fn(data, device):
        device = torch.device(device)
        single = isinstance(data, torch.Tensor)
        streams = [lib.CodeStream(t.numpy()) for t in ([data] if single else data)]
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        out = []
        for image in decoder(device).decode(streams, cuda_stream=stream):
            if image is None:
                out.append(RuntimeError("nvImageCodec could not decode this file"))
            else:
                out.append(torch.as_tensor(image, device=device).permute(2, 0, 1))
        if single:
            if isinstance(out[0], Exception):
                raise out[0]
            return out[0]
        return out

    return fn


# torch warns once that a read-only buffer is not writable: the decoders only read it. (Set once
# here: warnings.catch_warnings() per call would race between the actor's threads.)
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def as_uint8(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """A 1-D uint8 tensor over ``blob``'s memory, not a copy of it (the decoder only reads it)."""
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
