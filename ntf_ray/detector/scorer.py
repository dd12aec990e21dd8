"""Score encoded images with a detector: bytes -> decode -> centre crop -> P(fake).

Errors are values: every input gets a ``ScoreResult`` with either a score or a short
reason. Each image is cropped on its own, and the network runs in eval mode, so an
image's score does not depend on what else is in its batch.

Decoders: ``pil``, the core decoder (Pillow, CPU), one image at a time; and ``nvjpeg``
(torchvision's CUDA decoder) or ``nvimgcodec`` (the GPU's hardware JPEG engines, an optional
package): JPEGs that pass the marker screen (``jpeg_screen``) decode in one batched call
on the scorer's device, everything else, and any file the batched
decoder fails on, through the core decoder. Each result names the decoder that made it.

Memory: each image's decoded frame lives only until its crop is taken, and the crop is a
copy (``3 * S * S`` bytes), not a view that would keep the frame alive, so a batch holds
its crops plus one frame (or one batched decoder call's frames, at most ``max_pixels``
pixels in all) at a time, whatever the images' sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ntf_ray.detector.artifact import check_threshold, load_artifact
from ntf_ray.errors import DECODE, READ, DetectorFault, error
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS, decode
from ntf_ray.images.transforms import TooLargeToFit, check_fit, eval_transform, to_tensor
from ntf_ray.nn.dist import resolve_device
from ntf_ray.nn.model import Detector
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)

DECODERS = ("pil", "nvjpeg", "nvimgcodec")


#: How far a GPU decoder's scores may be from the CPU path's (the core decoder): the largest
#: difference for one image, and the share of decisions that may flip, for a detector with
#: spread-out scores on 1,000 held-out JPEGs. Measured on an H200 (bench/README.md): nvimgcodec
#: 0.0016 and none of 1,000; nvjpeg 0.022 and 3 of 1,000.
PARITY_TOLERANCE = {"nvimgcodec": (0.005, 0.001), "nvjpeg": (0.05, 0.005)}


@dataclass(frozen=True)
class Parity:
    """Scores of one decoder against the core decoder's, on the same files."""

    images: int  # scored by both
    max_diff: float
    mean_diff: float
    flipped: int  # decisions at the threshold that differ
    same_errors: bool  # the same files failed, with the same reasons

    def within(self, max_diff: float, flipped_share: float) -> bool:
        return self.same_errors and self.max_diff <= max_diff and self.flipped <= flipped_share * self.images


def parity(reference: Sequence[ScoreResult], other: Sequence[ScoreResult], threshold: float) -> Parity:
    """How ``other``'s scores differ from ``reference``'s (the core decoder's), file by file."""
    same_errors = all(a.error == b.error for a, b in zip(reference, other, strict=True))
    pairs = np.array([(a.score, b.score) for a, b in zip(reference, other) if a.score is not None and b.score is not None],
                     dtype=np.float64).reshape(-1, 2)
    diff = np.abs(pairs[:, 0] - pairs[:, 1])
    flipped = int(((pairs[:, 0] >= threshold) != (pairs[:, 1] >= threshold)).sum())
    return Parity(len(pairs), float(diff.max(initial=0.0)), float(diff.mean()) if len(diff) else 0.0, flipped,
                  same_errors)


def _gpu_decoder(device: torch.device):
    """The GPU decoder ``auto`` picks, as ``(name, decode_fn)``: nvImageCodec's (checked on this
    device) when it is installed and decodes here, torchvision's nvJPEG (``None``) otherwise.

    On an H200 both scanned at the same speed (4,126 and 4,139 images/s, 4 actors), but
    nvImageCodec's hardware engines give Pillow's pixels (mean |difference| 0.000 against
    nvJPEG's 3.65), so its scores are the CPU path's: no decision of 1,000 flipped, against 3.
    """
    from ntf_ray.images.gpu_decode import DecoderUnavailable, check_decoder, nvimgcodec_fn

    try:
        fn = nvimgcodec_fn()
    except DecoderUnavailable:
        return "nvjpeg", None
    try:
        check_decoder(fn, device)
    except DecoderUnavailable as exc:
        log.warning("nvImageCodec is installed but cannot decode here (%s); decoding with nvJPEG", exc)
        return "nvjpeg", None
    return "nvimgcodec", fn


@dataclass(frozen=True)
class ScoreResult:
    score: float | None  # P(fake); None on error
    is_fake: bool | None
    width: int | None  # decoded size before cropping
    height: int | None
    format: str | None
    error: str | None  # None when scored
    decoder: str | None = None  # "pil", "nvjpeg" or "nvimgcodec": which decoder made the pixels

    def as_dict(self) -> dict:
        return asdict(self)


class Scorer:
    """A loaded Detector plus its preprocessing contract (input size, threshold).

    ``precision``: ``"fp32"`` or ``"bf16"`` (autocast, CUDA only); ``"auto"`` = bf16 on
    CUDA, fp32 on CPU. ``decoder``: ``"pil"``, ``"nvjpeg"`` (see the module notes; on a
    CPU device torchvision's CPU JPEG decoder stands in for nvJPEG), ``"nvimgcodec"`` (needs
    the ``nvimgcodec`` extra), or ``"auto"`` = on CUDA nvimgcodec when installed and able to
    decode there (its pixels are Pillow's on baseline JPEGs), else nvjpeg; on CPU pil.
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
        decoder: str = "pil",
    ):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.input_size = int(input_size)
        self.threshold = check_threshold(threshold, "scorer")
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
        self._decode_fn = None  # None: torchvision's decoder
        if decoder == "auto":
            decoder, self._decode_fn = _gpu_decoder(self.device) if self.device.type == "cuda" else ("pil", None)
        elif decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)} or auto, got {decoder!r}")
        elif decoder == "nvimgcodec":
            from ntf_ray.images.gpu_decode import check_decoder, nvimgcodec_fn

            self._decode_fn = nvimgcodec_fn()  # fails here, not on the first batch, when it is not installed
            check_decoder(self._decode_fn, self.device)  # ... or cannot decode on this device
        self.decoder = decoder
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

    def decode(self, data: bytes, *, window: bool = False) -> tuple[torch.Tensor | None, ScoreResult]:
        """Decode one image with the core decoder: ``(3, H, W)`` uint8, or None and the reason.

        ``window``: only the centre crop is wanted, so a plain JPEG may come back as just its
        centre ``input_size`` square (``images.jpeg_window``: the same pixels); the result's
        width and height are the whole image's either way."""
        decoded = decode(data, max_pixels=self.max_pixels, window=self.input_size if window else None)
        if not decoded.ok:
            return None, ScoreResult(None, None, decoded.width, decoded.height, decoded.format, decoded.error, "pil")
        return to_tensor(decoded.image), ScoreResult(None, None, decoded.width, decoded.height, decoded.format, None, "pil")

    def preprocess(self, data: bytes) -> tuple[torch.Tensor | None, ScoreResult]:
        """Decode (core decoder) and crop one image; on failure the result carries the reason.

        Only the centre window is decoded where the core decoder can (plain JPEGs:
        ``images.jpeg_window``), with the same pixels as the whole frame's centre."""
        image, result = self.decode(data, window=True)
        if image is None:
            return None, result
        crop, cropped = self.crop(image, result.format, "pil")  # a window is its own centre crop
        return crop, replace(cropped, width=result.width, height=result.height)

    def crop(self, image: torch.Tensor, fmt: str | None, decoder: str) -> tuple[torch.Tensor | None, ScoreResult]:
        """Centre crop of a decoded ``(3, H, W)`` uint8 image, on whatever device it is."""
        h, w = image.shape[-2:]
        try:  # a sliver (say 1 x 20000) upscaled to fit would need gigabytes: refused as in training
            check_fit(h, w, self.input_size, self.max_pixels)
        except TooLargeToFit as exc:
            return None, ScoreResult(None, None, w, h, fmt, str(exc), decoder)
        try:
            crop = eval_transform(image, self.input_size)
        except (RuntimeError, ValueError) as exc:  # e.g. a degenerate 1 x N image
            return None, ScoreResult(None, None, w, h, fmt, error(DECODE, f"cannot crop ({type(exc).__name__})"), decoder)
        if crop.untyped_storage().nbytes() > crop.numel() * crop.element_size():
            # The centre crop is a view: a copy lets the whole frame go now, not with the batch.
            crop = crop.clone(memory_format=torch.contiguous_format)
        return crop, ScoreResult(None, None, w, h, fmt, None, decoder)

    def _in_batches(self, crops: torch.Tensor, network) -> list[torch.Tensor]:
        """``network`` over ``(B, 3, S, S)`` uint8 crops in chunks of ``batch_size`` (float32, CPU)."""
        out = []
        with torch.inference_mode():
            for start in range(0, crops.shape[0], self.batch_size):
                x = crops[start : start + self.batch_size].to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16" and self.device.type == "cuda"):
                    out.append(network(x).float().cpu())
        return out

    def score_tensors(self, crops: torch.Tensor) -> np.ndarray:
        """``(B, 3, S, S)`` uint8 crops -> ``(B,)`` float32 P(fake), in chunks of ``batch_size``.

        Raises ``DetectorFault`` when a score is not finite (fail closed: a NaN score would
        compare false with the threshold and pass the image as real)."""
        out = self._in_batches(crops, lambda x: torch.sigmoid(self.detector(x).float()))
        scores = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0,), np.float32)
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise DetectorFault(f"detector {self.model_id or '(unsaved)'} scored {bad} of {len(scores)} images NaN or "
                                "infinity: its scores cannot be trusted, so none is written as a decision")
        return scores

    def embed_tensors(self, crops: torch.Tensor) -> np.ndarray:
        """``(B, 3, S, S)`` uint8 crops -> ``(B, d)`` float32: the features the classifier reads."""
        out = self._in_batches(crops, self.detector.embed)
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def score_bytes(self, items: Sequence[bytes | memoryview | None]) -> list[ScoreResult]:
        """One result per input, in order; bad inputs get an error and never raise.

        Inputs may be memoryviews (say into an Arrow buffer): the GPU decoders read them where
        they are.
        """
        results: list[ScoreResult | None] = [None] * len(items)
        slots: list[int] = []  # slots[k]: the input that row k of the stacked crops belongs to
        parts: list[torch.Tensor] = []
        if self.decoder != "pil":
            for group, crops, group_results in self._crop_jpegs_on_device(items):
                for i, r in group_results:
                    results[i] = r
                if crops is not None:
                    slots.extend(group)
                    parts.append(crops)
        cpu_slots, cpu_crops = [], []
        for i, data in enumerate(items):
            if results[i] is not None:
                continue
            if not isinstance(data, (bytes, bytearray, memoryview)):
                results[i] = ScoreResult(None, None, None, None, None, error(READ, f"expected bytes, got {type(data).__name__}"))
                continue
            crop, results[i] = self.preprocess(data)
            if crop is not None:
                cpu_slots.append(i)
                cpu_crops.append(crop)
        if cpu_crops:  # one host-to-device copy for the core decoder's crops
            slots.extend(cpu_slots)
            parts.append(torch.stack(cpu_crops).to(self.device, non_blocking=True))
        if parts:
            scores = self.score_tensors(parts[0] if len(parts) == 1 else torch.cat(parts))
            for slot, score in zip(slots, scores):
                r = results[slot]
                score = float(score)  # compare in float64: numpy would compare float32 with a float32-rounded threshold
                results[slot] = ScoreResult(score, score >= self.threshold, r.width, r.height, r.format, None, r.decoder)
        return results  # type: ignore[return-value]

    def crop_batch(self, frames: Sequence[torch.Tensor], fmt: str | None,
                   decoder: str) -> tuple[list[int], torch.Tensor | None, list[ScoreResult]]:
        """Centre crops of decoded ``(3, H, W)`` uint8 frames as one ``(B, 3, S, S)`` tensor.

        Frames at least ``S`` on each side (nearly all) are cropped by one batched copy of
        their centre windows; smaller ones go through :meth:`crop` (upscaled, or refused).
        Returns the positions of the frames the tensor holds (in its row order), the tensor
        (None when no frame was cropped), and one result per frame.
        """
        size = self.input_size
        results: list[ScoreResult] = []
        rows: list[int] = []
        windows: list[torch.Tensor] = []
        odd: list[tuple[int, torch.Tensor]] = []
        for k, frame in enumerate(frames):
            h, w = frame.shape[-2:]
            results.append(ScoreResult(None, None, w, h, fmt, None, decoder))
            if h >= size and w >= size:
                top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as TF.center_crop
                rows.append(k)
                windows.append(frame[:, top : top + size, left : left + size])
            else:
                odd.append((k, frame))
        for k, frame in odd:
            crop, results[k] = self.crop(frame, fmt, decoder)
            if crop is not None:
                rows.append(k)
                windows.append(crop)
        return rows, (torch.stack(windows) if windows else None), results

    def warm_up(self) -> None:
        """Run the network and the batched decoder once on this thread, so that loading their
        kernels happens now and not on the first batch of real images (other threads set up
        their own nvImageCodec decoder on their first batch)."""
        with torch.inference_mode():
            self.score_tensors(torch.zeros((min(self.batch_size, 8), 3, self.input_size, self.input_size),
                                           dtype=torch.uint8))
        if self.decoder == "nvjpeg":  # nvImageCodec was checked on this thread when the scorer was built
            from ntf_ray.images.gpu_decode import DecoderUnavailable, check_decoder

            try:
                check_decoder(self._decode_fn, self.device)
            except DecoderUnavailable as exc:  # every JPEG will go to the core decoder: slow, not wrong
                log.warning("the %s decoder does not work on this thread: %s", self.decoder, exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _crop_jpegs_on_device(
        self, items: Sequence[bytes | memoryview | None]
    ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, ScoreResult]]]]:
        """Decode the JPEGs the screen lets through on the device and crop each group at once:
        ``(inputs the crops belong to, crops or None, [(input, result), ...])`` per group.

        The batched decoder runs on groups of files holding at most ``max_pixels`` pixels in
        all (``DEFAULT_MAX_PIXELS`` without a limit; a larger file goes alone), and a group's
        frames are dropped once cropped, so the device holds one group's frames at a time.
        Files the screen routes elsewhere, and files the batched decoder fails on, get no
        result here: ``score_bytes`` hands them to the core decoder.
        """
        from ntf_ray.images.gpu_decode import decode_jpegs

        for group in self._jpeg_groups(items):
            decoded = decode_jpegs([items[i] for i in group], self.device, self._decode_fn)
            ok, frame = [], None
            for i, frame in zip(group, decoded):
                if isinstance(frame, torch.Tensor) and frame.ndim == 3 and frame.shape[0] == 3:
                    ok.append((i, frame))
                else:
                    log.debug("the batched JPEG decoder failed on item %d (%s); using the core decoder", i, frame)
            del decoded, frame  # the loop's name would keep the group's last frame alive
            group_ok = [i for i, _ in ok]
            rows, crops, results = self.crop_batch([f for _, f in ok], "JPEG", self.decoder)
            del ok[:]  # the crops are copies: the frames go now
            if self.device.type == "cuda":
                # torchvision decodes on a stream of its own that does not wait for this one: the
                # frames' memory may be handed to the next group's decode only once the crops are read
                torch.cuda.current_stream(self.device).synchronize()
            yield [group_ok[k] for k in rows], crops, list(zip(group_ok, results))

    def _jpeg_groups(self, items: Sequence[bytes]) -> Iterator[list[int]]:
        """Indices of the files the screen passes, in groups of at most ``max_pixels`` pixels."""
        from ntf_ray.images.jpeg_screen import screen

        budget = self.max_pixels or DEFAULT_MAX_PIXELS
        group: list[int] = []
        pixels = 0
        for i, data in enumerate(items):
            if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
                continue
            found = screen(data, max_pixels=self.max_pixels)
            if not found.gpu:
                continue
            size = found.width * found.height
            if group and pixels + size > budget:
                yield group
                group, pixels = [], 0
            group.append(i)
            pixels += size
        if group:
            yield group
