"""The detector artifact: a folder with ``model.safetensors`` and ``model.json``.

``model.safetensors`` holds the Detector's weights only (never a pickle); ``model.json``
holds the format version, backbone, head, input size, normalisation, threshold, training
config and data summary, metrics if evaluated, and ``model_id``. Loading never executes
code from the artifact.

``model_id`` names everything that decides a score and a decision, and everything the model
card reports as measured: the first 16 hex digits of the sha256 of the weights file's digest
together with the backbone, head, input size and threshold, and (format 4) the training
record, metrics and calibration. Editing any of them in ``model.json`` without a new id is
refused at load time, so a table's ``model_id`` always says which weights *and* which
decision rule made its rows, and a card's FPR or AP is the one its model was saved with
(a pasted calibration is another model id). Format 3 named the weights and the contract
only: it still loads, and its card shows training, metrics and calibration as unverified.
Formats 1 and 2 named the weights only; they still load with their stored id.

Format 2 added the transfer layer (``head = "transfer"``: ``D(t(E(x)))``). Format-1
artifacts, written before it, hold a classifier on the encoder (``D(E(x))``); they still
load, as ``head = "linear"``, and score exactly as they did.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ntf_ray import storage
from ntf_ray.nn.model import BACKBONES, Detector
from ntf_ray.storage import StorageOptions

FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
#: The first format whose model_id covers what the card shows (training, metrics, calibration).
CARD_IN_ID_SINCE = 4
#: The range of input sizes a detector may declare (pixels of the square crop).
INPUT_SIZES = (8, 4096)
WEIGHTS = "model.safetensors"
METADATA = "model.json"


class ArtifactError(ValueError):
    """A detector artifact that is missing, malformed or does not fit this code."""


@dataclass
class DetectorArtifact:
    detector: Detector
    backbone: str
    input_size: int
    head: str = "transfer"
    threshold: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    model_id: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # how the threshold was chosen (ntf-ray calibrate)
    format_version: int = FORMAT_VERSION  # as loaded: below CARD_IN_ID_SINCE the card's record is unverified

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_id": self.model_id,
            "backbone": self.backbone,
            "head": self.head,
            "input_size": self.input_size,
            "normalization": {"mean": list(self.mean), "std": list(self.std), "input_range": "uint8 0..255 / 255"},
            "threshold": self.threshold,
            "label_convention": {"0": "real", "1": "fake", "score": "P(fake)"},
            "training": self.training,
            "metrics": self.metrics,
            **({"calibration": self.calibration} if self.calibration else {}),
        }


def model_id_of(weights: bytes, *, backbone: str | None = None, head: str | None = None,
                input_size: int | None = None, threshold: float | None = None,
                record: dict[str, Any] | None = None) -> str:
    """The artifact's id: the weights' digest alone (formats 1-2), with the scoring contract
    (format 3), and with ``record`` (format 4: ``card_record``'s training, metrics, calibration)."""
    digest = hashlib.sha256(weights).hexdigest()
    if backbone is None:
        return digest[:16]
    named: dict[str, Any] = {"weights": digest, "backbone": backbone, "head": head, "input_size": int(input_size),
                             "threshold": float(threshold)}
    if record is not None:
        named["record"] = record
    # The record as model.json holds it (JSON values, string keys); NaN only in a hand-made file.
    contract = json.dumps(named, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(contract.encode()).hexdigest()[:16]


def card_record(training: dict[str, Any], metrics: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """What a format-4 model_id covers beyond the weights and contract: what the card reports."""
    return {"training": training, "metrics": metrics, "calibration": calibration}


def check_threshold(threshold: object, where: str) -> float:
    """``threshold`` as a float, or ``ArtifactError``: a decision threshold is a finite number in
    [0, 1] (NaN flags nothing, -1 or 50 everything or nothing)."""
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or not 0.0 <= threshold <= 1.0):
        raise ArtifactError(f"{where}: threshold {threshold!r}; expected a number in [0, 1] (scores are P(fake))")
    return float(threshold)


def check_contract(input_size: object, threshold: object, where: str) -> None:
    """Refuse an input size or threshold no detector can score with."""
    lo, hi = INPUT_SIZES
    if type(input_size) is not int or not lo <= input_size <= hi:
        raise ArtifactError(f"{where}: input_size {input_size!r}; expected an integer in [{lo}, {hi}]")
    check_threshold(threshold, where)


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity: such a detector scores NaN, and a NaN score
    compares false with every threshold, so every image it sees would pass as real."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ArtifactError(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[:2]}); a detector "
                            "with non-finite weights cannot score (was its training diverging?)")


def save_artifact(
    uri: str,
    detector: Detector,
    *,
    input_size: int,
    threshold: float = 0.5,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    options: StorageOptions | None = None,
) -> DetectorArtifact:
    """Write ``uri/model.safetensors`` then ``uri/model.json``; returns the artifact with its model_id."""
    check_contract(input_size, threshold, f"artifact for {uri}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_dict().items()}
    check_finite(state, f"artifact for {uri}")
    # One metadata entry only: safetensors writes its metadata map in hash order, so two
    # entries would make the file bytes (and so model_id) differ between saves of one model.
    header = json.dumps({"backbone": detector.encoder.backbone, "format_version": FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))
    weights = save_safetensors(state, metadata={"ntf_ray": header})

    # The record as model.json will hold it and load_artifact will read it back (string keys,
    # no numpy, no NaN), so the id computed now is the id recomputed at load.
    record = json.loads(json.dumps(json_safe(card_record(dict(training or {}), dict(metrics or {}),
                                                          dict(calibration or {}))), allow_nan=False))
    artifact = DetectorArtifact(
        detector=detector,
        backbone=detector.encoder.backbone,
        head=detector.head,
        input_size=int(input_size),
        threshold=float(threshold),
        mean=tuple(float(x) for x in detector.encoder.mean.flatten()),
        std=tuple(float(x) for x in detector.encoder.std.flatten()),
        model_id=model_id_of(weights, backbone=detector.encoder.backbone, head=detector.head,
                             input_size=int(input_size), threshold=float(threshold), record=record),
        training=record["training"],
        metrics=record["metrics"],
        calibration=record["calibration"],
    )
    # Weights first: a reader that finds model.json finds the weights it describes.
    storage.write_bytes(storage.join(uri, WEIGHTS), weights, options)
    text = json.dumps(json_safe(artifact.metadata()), indent=2, sort_keys=True, allow_nan=False)
    storage.write_bytes(storage.join(uri, METADATA), text.encode(), options)
    from ntf_ray.detector.model_card import CARD, render

    # For people: written from model.json, never read back (ntf-ray score --card renders it again).
    storage.write_bytes(storage.join(uri, CARD), render(json.loads(text)).encode(), options)
    return artifact


#: The most read of each file of an artifact: a model card is a few kB; the weights of the
#: largest backbone a few hundred MB.
MAX_BYTES = {METADATA: 16 * 2**20, WEIGHTS: 4 * 2**30}


def _read(uri: str, name: str, options: StorageOptions | None) -> bytes:
    path = storage.join(uri, name)
    try:  # guarded: a model.json that is a FIFO, or links to /dev/zero, is refused, not read for ever
        return storage.read_input(path, options, what=f"{name} of the detector artifact",
                                  max_bytes=MAX_BYTES[name])
    except storage.InputMissing:
        raise ArtifactError(f"detector artifact at {uri} has no {name}") from None
    except storage.InputError as exc:
        raise ArtifactError(str(exc)) from None


def load_artifact(uri: str, *, options: StorageOptions | None = None, map_location: str | torch.device = "cpu") -> DetectorArtifact:
    """Read and validate an artifact; the Detector comes back in eval mode."""
    try:
        meta = json.loads(_read(uri, METADATA, options))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{METADATA} at {uri} is not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{METADATA} at {uri} is not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise ArtifactError(f"{METADATA} at {uri} nests too deeply to be read") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{METADATA} at {uri} must hold a JSON object")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # true and 1.0 are not 1
        raise ArtifactError(f"artifact at {uri} has format_version {version!r}; this ntf-ray reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    backbone = meta.get("backbone")
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ArtifactError(f"artifact at {uri} names backbone {backbone!r}; known: {sorted(BACKBONES)}")
    # Format 1 had no transfer layer: its classifier reads the encoder.
    head = meta.get("head") if version >= 2 else "linear"
    if head not in ("transfer", "linear"):
        raise ArtifactError(f"artifact at {uri} names head {head!r}; known: transfer, linear")
    input_size = meta.get("input_size", 224)
    threshold = meta.get("threshold", 0.5)
    check_contract(input_size, threshold, f"artifact at {uri}")
    training, metrics = meta.get("training") or {}, meta.get("metrics") or {}
    calibration = meta.get("calibration") or {}
    if not isinstance(training, dict) or not isinstance(metrics, dict) or not isinstance(calibration, dict):
        raise ArtifactError(f"artifact at {uri}: training, metrics and calibration in {METADATA} must be JSON objects")
    weights = _read(uri, WEIGHTS, options)
    if not isinstance(meta.get("model_id"), str) or not meta["model_id"]:
        raise ArtifactError(f"{METADATA} at {uri} has no model_id, so its weights cannot be verified")
    if version >= 3:
        record = card_record(training, metrics, calibration) if version >= CARD_IN_ID_SINCE else None
        model_id = model_id_of(weights, backbone=backbone, head=head, input_size=input_size, threshold=threshold,
                               record=record)
        covered = ("backbone, head, input_size, threshold, training, metrics and calibration" if record
                   else "backbone, head, input_size and threshold")
        if meta["model_id"] != model_id:
            raise ArtifactError(f"artifact at {uri}: model.json's model_id {meta['model_id']} does not match its weights, "
                                f"{covered} (expected {model_id}); an edited model.json is not this model: save a "
                                "new artifact")
    else:
        model_id = model_id_of(weights)
        if meta["model_id"] != model_id:
            raise ArtifactError(f"artifact at {uri}: weights hash {model_id} does not match model.json's model_id {meta['model_id']}")
    try:
        state = load_safetensors(weights)
    except (SafetensorError, Exception) as exc:  # safetensors raises several types on corrupt input
        raise ArtifactError(f"{WEIGHTS} at {uri} is not a readable safetensors file ({type(exc).__name__})") from None
    # The distance to the natural traces (ntf_ray.nn.traces) is weights only: its buffers say it is there.
    detector = Detector.build(backbone, head, traces=any(k.startswith("traces.") for k in state))
    expected = detector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise ArtifactError(
            f"weights at {uri} do not fit backbone {backbone!r} with a {head} head: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:2]})"
        )
    check_finite(state, f"artifact at {uri}")
    detector.load_state_dict(state)
    detector.to(map_location).eval()
    # The normalisation applied is the one stored with the weights (Encoder buffers);
    # model.json describes it, and a model.json that says otherwise is not this model.
    mean = tuple(float(x) for x in detector.encoder.mean.flatten())
    std = tuple(float(x) for x in detector.encoder.std.flatten())
    norm = meta.get("normalization", {})
    for key, actual in (("mean", mean), ("std", std)):
        stated = norm.get(key, actual) if isinstance(norm, dict) else None
        if not (isinstance(stated, (list, tuple)) and len(stated) == 3
                and all(type(v) in (int, float) and abs(v - a) <= 1e-6 for v, a in zip(stated, actual))):
            raise ArtifactError(f"artifact at {uri}: normalization {key} {stated!r} in {METADATA} does not match the weights' {list(actual)}")
    return DetectorArtifact(
        detector=detector,
        backbone=backbone,
        head=head,
        input_size=input_size,
        threshold=float(threshold),
        mean=mean,
        std=std,
        model_id=model_id,
        training=training,
        metrics=metrics,
        calibration=calibration,
        format_version=version,
    )


def json_safe(value: Any) -> Any:
    """Metrics as strict JSON values: NaN and infinities (an undefined AP, FPR without reals)
    become null, numpy scalars plain numbers, mapping keys strings."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
