"""Both stages' training inputs decoded and augmented in the train worker, a batch at a time.

On the CPU path (:mod:`ntf_ray.images.transforms`) Ray Data tasks decode each image and apply
torchvision's transforms to it one at a time; a GPU worker then waits for them (about 90
views/s per core). Here Ray Data streams only the bytes and the worker does the rest on its
own device: JPEGs that :func:`ntf_ray.images.jpeg_screen.screen` passes are decoded there in one
batched call (nvJPEG on a GPU), everything else and every file that call refuses by the
core decoder on the CPU, as the scan does; then each stage's random augmentations run
batched, with parameters drawn per sample from the same distributions as the CPU path's:

- stage 1 (SimCLR views): torchvision's random-resized-crop rule (10 tries at an area in
  ``crop_scale`` and a log-uniform aspect in [3/4, 4/3], else the centre crop), a flip with
  probability 1/2, with probability 0.8 colour jitter of strength s (brightness, contrast,
  saturation in [1 - 0.8s, 1 + 0.8s], hue in [-0.2s, 0.2s], in a random order per view),
  grayscale with ``grayscale_prob``; images narrower than the crop upscaled first;
- stage 2 (Wang2020): Gaussian blur (sigma ~ U[blur_sigma]) with ``blur_prob``, JPEG
  (quality ~ U{jpeg_quality}) with ``jpeg_prob``, a random ``size`` crop at native
  resolution, a flip, and a random ``scl_size`` crop of that crop.

The draws and the batched operations are ``ntf_ray.images.batch_ops``'s: torchvision's rules and
uint8 kernels with one parameter per sample; resized crops by ``roi_align``, one call per
group of same-size images (an area mean where torchvision's antialiased resize uses a
triangle filter: within a few levels; the tests state the measured gap).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ntf_ray.images.augment import Stage1Augment, Stage2Augment
from ntf_ray.images.batch_ops import (
    as_uint8,
    bernoulli,
    color_jitter,
    crop_resize,
    flip_where,
    grayscale,
    resized_crop_box,
    uniform,
)
from ntf_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

#: Pixels the batched decoder holds at once (a group of files decodes, is cropped, and goes).
DECODE_GROUP_PIXELS = 64 * 1024 * 1024


# ---------------------------------------------------------------- decoding


def decode_frames(blobs: Sequence[bytes | memoryview | None], device: torch.device, *, max_pixels: int | None,
                  decode_fn=None, group_pixels: int = DECODE_GROUP_PIXELS) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Decoded ``(3, H, W)`` uint8 frames on ``device``, in groups: ``(input positions, frames)``.

    JPEGs the screen passes go to the batched decoder, at most ``group_pixels`` pixels per
    call; the rest, and the files that decoder refuses, to the core decoder (Pillow, EXIF
    orientation applied) on the CPU. Files neither can decode are left out and logged with
    their reason; ``None`` (a failed read) is left out silently (the reader logged it).
    """
    from ntf_ray.images.decode import decode
    from ntf_ray.images.gpu_decode import decode_jpegs
    from ntf_ray.images.jpeg_screen import screen
    from ntf_ray.images.transforms import to_tensor

    groups: list[list[int]] = [[]]
    pixels = 0
    cpu: list[int] = []
    for i, data in enumerate(blobs):
        if data is None or not len(data):
            continue
        found = screen(data, max_pixels=max_pixels)
        if not found.gpu:
            cpu.append(i)
            continue
        size = found.width * found.height
        if groups[-1] and pixels + size > group_pixels:
            groups.append([])
            pixels = 0
        groups[-1].append(i)
        pixels += size
    for group in groups:
        if not group:
            continue
        kept, frames, frame = [], [], None
        for i, frame in zip(group, decode_jpegs([blobs[i] for i in group], device, decode_fn)):
            if isinstance(frame, torch.Tensor) and frame.ndim == 3 and frame.shape[0] == 3:
                kept.append(i)
                frames.append(frame)
            else:
                cpu.append(i)
        del frame  # the loop's name would keep the group's last frame alive into the next decode
        yield kept, frames
        del frames
    kept, frames, pixels = [], [], 0
    for i in sorted(cpu):
        decoded = decode(blobs[i], max_pixels=max_pixels)
        if not decoded.ok:
            log.warning("dropping an image: %s", decoded.error)
            continue
        size = decoded.image.shape[0] * decoded.image.shape[1]
        if kept and pixels + size > group_pixels:  # the same budget as the batched decoder's groups
            yield kept, frames
            kept, frames, pixels = [], [], 0
        kept.append(i)
        frames.append(to_tensor(decoded.image).to(device, non_blocking=True))
        pixels += size
        del decoded
    if kept:
        yield kept, frames


# ---------------------------------------------------------------- the stages


@dataclass(frozen=True)
class Stage1DeviceViews(Stage1Augment):
    """Stage 1's two views of each frame, for a batch at once (see the module docstring); its
    parameters are ``Stage1Augment``'s, as the CPU path's."""

    ratio: ClassVar[tuple[float, float]] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios
    jitter_prob: ClassVar[float] = 0.8  # SimCLR's colour distortion is applied with this probability

    def boxes(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        if self.resized_crop:
            return resized_crop_box(h, w, tuple(self.crop_scale), self.ratio, gen)
        top = int(torch.randint(0, h - self.size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - self.size + 1, (1,), generator=gen))
        return top, left, self.size, self.size

    def crops(self, frames: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """``(2B, 3, S, S)`` float: every frame's first view, then every frame's second view."""
        boxes = [(self.boxes(*f.shape[-2:], gen), self.boxes(*f.shape[-2:], gen)) for f in frames]
        out = torch.empty((2 * len(frames), 3, self.size, self.size), device=frames[0].device) if frames else None
        by_shape: dict[tuple[int, int], list[int]] = {}
        for k, f in enumerate(frames):
            by_shape.setdefault(tuple(f.shape[-2:]), []).append(k)
        n = len(frames)
        for members in by_shape.values():
            stack = torch.stack([frames[k] for k in members]) if len(members) > 1 else frames[members[0]].unsqueeze(0)
            rois = [(j, *boxes[k][v]) for v in (0, 1) for j, k in enumerate(members)]
            crops = crop_resize(stack, rois, self.size).round_().clamp_(0, 255)  # whole levels, as uint8 resizes give
            index = torch.tensor([k + v * n for v in (0, 1) for k in members], device=crops.device)
            out[index] = crops
        return out

    def jitter_draws(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per view: the views jittered (probability 0.8), the factors ``(n, 4)`` (brightness,
        contrast, saturation in [1 - 0.8s, 1 + 0.8s], hue in [-0.2s, 0.2s]) and the order
        ``(n, 4)`` of the four operations (a uniform permutation), as ``ColorJitter`` draws them."""
        s = self.jitter
        low, high = max(0.0, 1 - 0.8 * s), 1 + 0.8 * s
        factors = torch.stack([uniform(n, low, high, gen), uniform(n, low, high, gen), uniform(n, low, high, gen),
                               uniform(n, -0.2 * s, 0.2 * s, gen)], dim=1)
        order = torch.argsort(torch.rand((n, 4), generator=gen), dim=1)
        return bernoulli(n, self.jitter_prob if s > 0 else 0.0, gen), factors, order

    def colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        x = flip_where(x, bernoulli(n, 0.5, gen))
        if self.jitter > 0:
            apply, factors, order = self.jitter_draws(n, gen)
            rows = apply.nonzero().flatten()
            if len(rows):
                x[rows.to(x.device)] = color_jitter(x[rows.to(x.device)], factors[rows], order[rows])
        gray = bernoulli(n, self.grayscale_prob, gen).nonzero().flatten().to(x.device)
        if len(gray):
            x[gray] = grayscale(x[gray])
        return x

    def __call__(self, frames: Sequence[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        views = as_uint8(self.colour(self.crops(frames, gen), gen))
        return views[: len(frames)], views[len(frames):]

    # the worker's batches (``DeviceBatches``): frames fitted as they are decoded, cropped a
    # decoder group at a time, coloured once for the whole batch
    def fit(self, frame: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
        from ntf_ray.images.transforms import fit_min_side

        return fit_min_side(frame, self.size, max_pixels)

    def group(self, frames: Sequence[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        crops = self.crops(frames, gen)
        return crops[: len(frames)], crops[len(frames):]

    def finish(self, a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        views = as_uint8(self.colour(torch.cat([a, b]), gen))
        return views[: len(a)], views[len(a):]


@dataclass(frozen=True)
class Stage2DeviceViews(Stage2Augment):
    """Stage 2's 224 crop and its SCL crop, for a batch at once (see the module docstring); its
    parameters are ``Stage2Augment``'s, as the CPU path's."""

    def degrade_draws(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Per image: blurred (``blur_prob``), sigma ~ U[blur_sigma], JPEG'd (``jpeg_prob``),
        quality ~ U{jpeg_quality} (both ends included), as ``Stage2Transform`` draws them."""
        return (bernoulli(n, self.blur_prob, gen), uniform(n, *self.blur_sigma, gen), bernoulli(n, self.jpeg_prob, gen),
                torch.randint(self.jpeg_quality[0], self.jpeg_quality[1] + 1, (n,), generator=gen))

    def __call__(self, frames: Sequence[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from ntf_ray.images.transforms import fit_min_side, gaussian_blur

        n = len(frames)
        blur, sigmas, jpeg, qualities = self.degrade_draws(n, gen)
        crops = []
        for k, frame in enumerate(frames):
            if blur[k]:
                frame = gaussian_blur(frame, float(sigmas[k]))
            if jpeg[k]:
                frame = reencode_jpeg(frame, int(qualities[k]))
            frame = fit_min_side(frame, self.size)  # after blur and JPEG, as the CPU path (checked before)
            h, w = frame.shape[-2:]
            top = int(torch.randint(0, h - self.size + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - self.size + 1, (1,), generator=gen))
            crops.append(frame[:, top : top + self.size, left : left + self.size])
        x = torch.stack(crops)
        if self.flip:
            x = flip_where(x, bernoulli(n, 0.5, gen))
        offsets = torch.randint(0, self.size - self.scl_size + 1, (n, 2), generator=gen).tolist()
        scl = torch.stack([x[k, :, t : t + self.scl_size, s : s + self.scl_size] for k, (t, s) in enumerate(offsets)])
        return x.contiguous(), scl.contiguous()

    # the worker's batches (``DeviceBatches``): frames checked to fit as they are decoded (blur
    # and JPEG come before the fit), views made a decoder group at a time
    def fit(self, frame: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
        from ntf_ray.images.transforms import check_fit

        check_fit(*frame.shape[-2:], self.size, max_pixels)
        return frame

    def group(self, frames: Sequence[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self(frames, gen)

    def finish(self, a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return a, b


def reencode_jpeg(frame: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG at ``quality`` and back with Pillow, the CPU path's codec, wherever the frame is.

    Only ``jpeg_prob`` of the images (10%) take this trip. nvJPEG's encoder is not used: it
    keeps full-resolution chroma (4:4:4) where Pillow, like the uploads it stands for, halves
    it (4:2:0), so its artifacts would not be the CPU path's."""
    from ntf_ray.images.transforms import jpeg

    return jpeg(frame.cpu(), quality).to(frame.device)


# ---------------------------------------------------------------- the worker's batches


class DeviceBatches:
    """The train worker's side of the device path: Arrow batches of ``label``/``data`` ->
    the engine's batches (stage 1 ``view1``/``view2``/``label``, stage 2 ``image``/``crop``/
    ``label``) on ``device``. Rows that cannot be read, decoded or fitted are dropped, logged
    and counted in ``dropped``; a batch loses them, as the CPU path's batches do."""

    def __init__(self, stage: int, cfg: TrainConfig, device: torch.device, *, seed: int, decode_fn=None):
        from ntf_ray.training.stages import stage_of

        self.step, self.device, self.cfg = stage_of(stage), torch.device(device), cfg
        self.max_pixels = cfg.max_pixels
        self.gen = torch.Generator().manual_seed(seed)
        self.decode_fn = decode_fn
        self.dropped = 0
        self.views: Stage1DeviceViews | Stage2DeviceViews = self.step.device_views(cfg)
        self.keys = self.step.keys

    def frames(self, blobs: Sequence[bytes | memoryview | None]) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """The decoded frames of ``blobs`` a decoder group at a time, with their positions; in
        stage 1 fitted to the crop (upscaled if narrower), in stage 2 checked to fit (its blur
        and JPEG come first). What cannot be is dropped and counted."""
        from ntf_ray.images.transforms import TooLargeToFit

        for group, decoded in decode_frames(blobs, self.device, max_pixels=self.max_pixels, decode_fn=self.decode_fn,
                                            group_pixels=DECODE_GROUP_PIXELS):
            kept, frames, frame = [], [], None
            for i, frame in zip(group, decoded):
                try:
                    frame = self.views.fit(frame, self.max_pixels)
                except TooLargeToFit as exc:
                    log.warning("dropping an image: %s", exc)
                    continue
                kept.append(i)
                frames.append(frame)
            del decoded, frame
            yield kept, frames
            del frames

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        """One engine batch from an Arrow table (``label``, ``data``). The device holds one
        group's frames at a time (``DECODE_GROUP_PIXELS``, or one image larger than that), the
        batched decoder's or the core decoder's: each group is cropped, then let go."""
        from ntf_ray.storage import binary_views

        blobs = binary_views(batch.column("data"))
        labels = np.asarray(batch.column("label").to_pylist(), dtype=np.int64)
        kept: list[int] = []
        firsts: list[torch.Tensor] = []
        seconds: list[torch.Tensor] = []
        for group, frames in self.frames(blobs):
            if frames:
                a, b = self.views.group(frames, self.gen)
                kept.extend(group)
                firsts.append(a)
                seconds.append(b)
            del frames
            if self.device.type == "cuda":
                # torchvision decodes on a stream of its own: the frames' memory may go to the next
                # group's decode only once this group's crops are read
                torch.cuda.current_stream(self.device).synchronize()
        self.dropped += len(blobs) - len(kept)
        if not kept:
            return {k: torch.from_numpy(v) for k, v in self.step.empty_batch(self.cfg).items()}
        a, b = self.views.finish(torch.cat(firsts), torch.cat(seconds), self.gen)
        return {self.keys[0]: a, self.keys[1]: b,
                "label": torch.from_numpy(labels[kept]).to(self.device, non_blocking=True)}


def prefetch(batches: Iterable, make: Callable, device: torch.device, depth: int = 2) -> Iterator:
    """``make(batch)`` for each of ``batches``, computed ``depth`` ahead in a thread (on a CUDA
    stream of its own on a GPU, so decoding and augmenting overlap the training step).
    Exceptions reach the caller at the batch that raised; stopping early stops the thread."""
    device = torch.device(device)
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            for batch in batches:
                if stop.is_set():
                    return
                if stream is None:
                    item = (make(batch), None)
                else:
                    with torch.cuda.stream(stream):
                        made = make(batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                    item = (made, event)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            out.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            out.put((exc, None))

    thread = threading.Thread(target=work, name="device-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, event = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in item.values():
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(current)  # made on the side stream, freed after this one used it
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
