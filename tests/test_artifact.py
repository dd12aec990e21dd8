"""The detector artifact: ``model.safetensors`` + ``model.json``, local and on S3 (moto).

Contract (docs/contracts.md): weights only, never a pickle; model.json holds format version,
backbone, input size, normalisation, threshold, training config/data summary, metrics,
and ``model_id`` = first 16 hex of sha256 of the weights file. Loading never executes
code from the artifact, and every malformed artifact is a clear ``ArtifactError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from ntf_ray.detector.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    DetectorArtifact,
    card_record,
    load_artifact,
    model_id_of,
    save_artifact,
)
from ntf_ray.nn.model import Detector
from ntf_ray.storage import StorageOptions
from tests.awkward import texture


def make_detector(seed: int = 0) -> Detector:
    """A random-init tiny Detector with non-trivial BatchNorm statistics (so scores vary)."""
    torch.manual_seed(seed)
    det = Detector.build("tiny")
    for m in det.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    det.train()
    with torch.no_grad():
        for i in range(2):
            x = torch.stack([torch.from_numpy(texture(48, 48, seed=1000 * seed + 10 * i + j)).permute(2, 0, 1)
                             for j in range(8)])
            det(x)
    for m in det.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return det.eval()


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


def _images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.from_numpy(texture(size, size, seed=seed + i)).permute(2, 0, 1) for i in range(n)])


def _strict_json(data: bytes) -> dict:
    def reject(const):
        raise AssertionError(f"model.json holds {const}, which is not JSON")

    return json.loads(data, parse_constant=reject)


TRAINING = {"config": {"backbone": "tiny", "lr": 0.1, "epochs": [2, 1]}, "data": {"images": 12, "generators": ["progan"]}}
METRICS = {"split": "test", "table": [{"generator": "progan", "ap": 0.75, "acc": 0.5, "fpr": math.nan}]}


@pytest.fixture
def saved(tmp_path) -> tuple[str, Detector, DetectorArtifact]:
    det = make_detector()
    uri = str(tmp_path / "detector")
    art = save_artifact(uri, det, input_size=64, threshold=0.4, training=TRAINING, metrics=METRICS)
    return uri, det, art


def _check_round_trip(det: Detector, saved_art: DetectorArtifact, loaded: DetectorArtifact,
                      weights: bytes, meta_bytes: bytes) -> None:
    meta = _strict_json(meta_bytes)
    # model_id = first 16 hex digits of the sha256 of the weights' digest, the scoring contract
    # and the record the card shows, as model.json holds it
    model_id = model_id_of(weights, backbone="tiny", head="transfer", input_size=64, threshold=0.4,
                           record={"training": TRAINING, "metrics": meta["metrics"], "calibration": {}})
    assert saved_art.model_id == loaded.model_id == model_id
    assert len(model_id) == 16 and int(model_id, 16) >= 0

    assert meta["format_version"] == FORMAT_VERSION == 4
    assert meta["head"] == "transfer" and loaded.head == "transfer"
    assert meta["model_id"] == model_id
    assert meta["backbone"] == "tiny"
    assert meta["input_size"] == 64
    assert meta["threshold"] == pytest.approx(0.4)
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert meta["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225], abs=1e-6)
    assert meta["label_convention"]["0"] == "real" and meta["label_convention"]["1"] == "fake"
    assert meta["training"] == TRAINING
    # NaN is not JSON: it is stored as null
    assert meta["metrics"] == {"split": "test", "table": [{"generator": "progan", "ap": 0.75, "acc": 0.5, "fpr": None}]}

    # the loaded artifact
    assert isinstance(loaded, DetectorArtifact)
    assert (loaded.backbone, loaded.input_size, loaded.threshold) == ("tiny", 64, pytest.approx(0.4))
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406), abs=1e-6)
    assert loaded.std == pytest.approx((0.229, 0.224, 0.225), abs=1e-6)
    assert loaded.training == TRAINING
    assert loaded.metrics["table"][0]["ap"] == 0.75
    _state_equal(det, loaded.detector)
    assert not loaded.detector.training
    assert not any(m.training for m in loaded.detector.modules())
    assert all(p.device.type == "cpu" for p in loaded.detector.parameters())
    x = _images()
    with torch.no_grad():
        assert torch.equal(det.eval()(x), loaded.detector(x))

    # the weights file is a plain safetensors file with exactly the state dict
    state = det.state_dict()
    with safe_open_bytes(weights) as f:
        assert set(f.keys()) == set(state)
        assert json.loads(f.metadata()["ntf_ray"]) == {"backbone": "tiny", "format_version": 4}


class safe_open_bytes:
    """``safe_open`` on bytes (it wants a path): via a temporary file."""

    def __init__(self, data: bytes):
        import tempfile

        self._tmp = tempfile.NamedTemporaryFile(suffix=".safetensors")
        self._tmp.write(data)
        self._tmp.flush()

    def __enter__(self):
        self._f = safe_open(self._tmp.name, framework="pt")
        return self._f

    def __exit__(self, *exc):
        self._tmp.close()


# ---------------------------------------------------------------------------------------
# round trips


def test_round_trip_local(saved):
    uri, det, art = saved
    assert sorted(p.name for p in Path(uri).iterdir()) == ["MODEL_CARD.md", "model.json", "model.safetensors"]  # no temp files
    loaded = load_artifact(uri)
    _check_round_trip(det, art, loaded, Path(uri, "model.safetensors").read_bytes(), Path(uri, "model.json").read_bytes())


def test_a_calibration_is_kept_in_model_json_and_a_malformed_one_refused(tmp_path):
    torch.manual_seed(0)
    det = Detector.build("tiny").eval()
    cal = {"threshold": 0.73, "target_fpr": 0.01, "reals": 400, "split": "val"}
    uri = str(tmp_path / "m")
    art = save_artifact(uri, det, input_size=32, threshold=0.73, calibration=cal)
    assert load_artifact(uri).calibration == cal and json.loads(Path(uri, "model.json").read_text())["calibration"] == cal
    plain = save_artifact(str(tmp_path / "p"), det, input_size=32, threshold=0.73)
    assert plain.model_id != art.model_id  # how the threshold was chosen is part of the id, as the card shows it
    assert "calibration" not in json.loads(Path(tmp_path, "p", "model.json").read_text())
    meta = json.loads(Path(uri, "model.json").read_text())
    meta["calibration"] = ["not", "an", "object"]
    Path(uri, "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="calibration"):
        load_artifact(uri)


def test_round_trip_from_train_mode_and_resave(tmp_path):
    det = make_detector(seed=1).train()
    uri = str(tmp_path / "a" / "b")  # parents created
    save_artifact(uri, det, input_size=32)
    loaded = load_artifact(uri)
    assert not loaded.detector.training
    _state_equal(det, loaded.detector)
    assert loaded.threshold == 0.5 and loaded.input_size == 32 and loaded.metrics == {} and loaded.training == {}
    # saving a different model over it replaces it
    other = make_detector(seed=2)
    art2 = save_artifact(uri, other, input_size=32)
    reloaded = load_artifact(uri)
    assert reloaded.model_id == art2.model_id != loaded.model_id
    _state_equal(other, reloaded.detector)


def test_model_id_is_deterministic(tmp_path):
    """Same weights, contract and record -> same model_id, every save (incremental scans rely on
    it); another threshold, input size, training record, evaluation or calibration is another model."""
    det = make_detector(seed=3)
    ids = set()
    for i in range(12):  # safetensors' metadata map is hash-ordered: repeat to catch that
        art = save_artifact(str(tmp_path / f"a{i}"), det, input_size=64, threshold=0.5,
                            metrics={"x": 1, "y": [0.5, None]}, training={"b": 2, "a": {"d": 1, "c": 0}})
        ids.add(art.model_id)
    assert len(ids) == 1
    for i, record in enumerate([{"metrics": {"x": 2}}, {"training": {"b": 3}}, {"calibration": {"fpr": 0.0}}, {}]):
        assert save_artifact(str(tmp_path / f"r{i}"), det, input_size=64, threshold=0.5, **record).model_id not in ids
    assert len({(tmp_path / f"a{i}" / "model.safetensors").read_bytes() for i in range(12)}) == 1
    assert save_artifact(str(tmp_path / "other"), make_detector(seed=4), input_size=64).model_id not in ids
    assert save_artifact(str(tmp_path / "t"), det, input_size=64, threshold=0.9).model_id not in ids
    assert save_artifact(str(tmp_path / "s"), det, input_size=32, threshold=0.5).model_id not in ids


@pytest.mark.parametrize("key,value", [("threshold", 0.9), ("threshold", 1.5), ("input_size", 128), ("input_size", 0)])
def test_an_edited_threshold_or_input_size_is_refused(saved, key, value):
    """Editing model.json's decision rule without a new id would keep the id of another model:
    moderate would skip objects the edited model was never asked about."""
    uri, _, _ = saved
    meta = _meta(uri)
    meta[key] = value
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="model_id|expected"):
        load_artifact(uri)


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"threshold": -0.1}, {"threshold": float("nan")},
                                    {"input_size": 0}, {"input_size": 10**6}])
def test_out_of_range_threshold_or_input_size_is_not_saved(tmp_path, kwargs):
    with pytest.raises(ArtifactError, match="expected"):
        save_artifact(str(tmp_path / "bad"), make_detector(), **{"input_size": 64, **kwargs})


@pytest.mark.parametrize("edit", [
    lambda m: m.update(calibration={"target_fpr": 0.001, "fpr": 0.0, "fpr_upper95": 0.000003, "reals": 1_000_000}),
    lambda m: m["metrics"]["table"][0].update(ap=0.999),
    lambda m: m["training"]["data"].update(generators=["progan", "stylegan", "ldm"]),
    lambda m: m.pop("metrics"),
], ids=["pasted calibration", "better AP", "more generators", "metrics removed"])
def test_an_edited_card_record_is_refused(saved, edit):
    """A calibration or metrics pasted into model.json under the old model_id is not what that
    model was saved with: the card would report it as the model's own."""
    uri, _, _ = saved
    meta = _meta(uri)
    edit(meta)
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="model_id .* does not match .*training, metrics and calibration"):
        load_artifact(uri)


def test_format3_artifact_loads_with_its_id_and_says_so(saved):
    """Format 3's id covers the weights and contract, not the record: it still loads (its tables
    carry that id), and the artifact says which format it came from, for the card."""
    uri, _, _ = saved
    meta = _meta(uri)
    weights = Path(uri, "model.safetensors").read_bytes()
    meta.update(format_version=3, model_id=model_id_of(weights, backbone="tiny", head="transfer", input_size=64,
                                                        threshold=0.4),
                calibration={"fpr": 0.0, "reals": 1_000_000})
    _write_meta(uri, meta)
    loaded = load_artifact(uri)
    assert loaded.model_id == meta["model_id"] and loaded.format_version == 3
    assert loaded.metadata()["format_version"] == 3 and loaded.calibration == {"fpr": 0.0, "reals": 1_000_000}


def test_format2_artifact_still_loads_with_its_weights_id(saved):
    """Artifacts written before the id covered the contract keep the id their tables carry."""
    uri, _, _ = saved
    meta = _meta(uri)
    weights = Path(uri, "model.safetensors").read_bytes()
    meta.update(format_version=2, model_id=hashlib.sha256(weights).hexdigest()[:16])
    _write_meta(uri, meta)
    assert load_artifact(uri).model_id == meta["model_id"]


def test_round_trip_s3(s3, bucket):
    options = StorageOptions(endpoint_url=s3.endpoint_url)
    det = make_detector(seed=4)
    uri = f"{bucket}/models/ntf/"
    art = save_artifact(uri, det, input_size=64, threshold=0.4, training=TRAINING, metrics=METRICS, options=options)
    client = s3.client()
    name = bucket[len("s3://"):]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"])
    assert keys == ["models/ntf/MODEL_CARD.md", "models/ntf/model.json", "models/ntf/model.safetensors"]
    weights = client.get_object(Bucket=name, Key="models/ntf/model.safetensors")["Body"].read()
    meta = client.get_object(Bucket=name, Key="models/ntf/model.json")["Body"].read()
    for spelling in (uri, uri.rstrip("/")):
        loaded = load_artifact(spelling, options=options)
        _check_round_trip(det, art, loaded, weights, meta)


def test_s3_missing_artifact_and_tampering(s3, bucket):
    options = StorageOptions(endpoint_url=s3.endpoint_url)
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(f"{bucket}/nothing-here", options=options)
    uri = f"{bucket}/det"
    save_artifact(uri, make_detector(seed=5), input_size=64, options=options)
    client, name = s3.client(), bucket[len("s3://"):]
    client.delete_object(Bucket=name, Key="det/model.safetensors")
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_artifact(uri, options=options)
    save_artifact(uri, make_detector(seed=5), input_size=64, options=options)
    client.put_object(Bucket=name, Key="det/model.safetensors",
                      Body=save_safetensors({k: v.contiguous() for k, v in make_detector(seed=6).state_dict().items()}))
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(uri, options=options)


# ---------------------------------------------------------------------------------------
# malformed artifacts


def _meta(uri: str) -> dict:
    return json.loads(Path(uri, "model.json").read_text())


def _write_meta(uri: str, meta: dict) -> None:
    Path(uri, "model.json").write_text(json.dumps(meta))


def _write_weights(uri: str, data: bytes, *, fix_model_id: bool = True) -> None:
    """Replace the weights; with ``fix_model_id`` model.json is updated to match, so the
    loader gets past the hash check and must judge the bytes themselves."""
    Path(uri, "model.safetensors").write_bytes(data)
    if fix_model_id:
        _fix_model_id(uri, data)


def _fix_model_id(uri: str, weights: bytes | None = None) -> None:
    """Make model.json's model_id match its weights and contract, as a forger would."""
    meta = _meta(uri)
    weights = Path(uri, "model.safetensors").read_bytes() if weights is None else weights
    meta["model_id"] = model_id_of(weights, backbone=str(meta["backbone"]), head=meta["head"],
                                   input_size=meta["input_size"], threshold=meta["threshold"],
                                   record=card_record(meta.get("training") or {}, meta.get("metrics") or {},
                                                      meta.get("calibration") or {}))
    _write_meta(uri, meta)


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(str(tmp_path / "does-not-exist"))
    uri, _, _ = saved
    Path(uri, "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        load_artifact(uri)
    save_artifact(uri, make_detector(), input_size=64)
    Path(uri, "model.json").unlink()
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(uri)
    # a file where the folder should be
    (tmp_path / "a-file").write_bytes(b"x")
    with pytest.raises(ArtifactError):
        load_artifact(str(tmp_path / "a-file"))


@pytest.mark.parametrize("version", [5, 0, "1", None, True, 4.0, [1]])
def test_wrong_format_version(saved, version):
    uri, _, _ = saved
    meta = _meta(uri)
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="format_version"):
        load_artifact(uri)


@pytest.mark.parametrize("backbone", ["vgg16", "", None, ["tiny"], {"name": "tiny"}, 50])
def test_unknown_backbone(saved, backbone):
    uri, _, _ = saved
    meta = _meta(uri)
    meta["backbone"] = backbone
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="backbone"):
        load_artifact(uri)


def test_mismatched_backbone(saved):
    """tiny weights with model.json saying resnet18 (hash still valid)."""
    uri, _, _ = saved
    meta = _meta(uri)
    meta["backbone"] = "resnet18"
    _write_meta(uri, meta)
    _fix_model_id(uri)
    with pytest.raises(ArtifactError, match="do not fit backbone 'resnet18'"):
        load_artifact(uri)


def test_weights_with_missing_or_extra_or_reshaped_tensors(saved):
    uri, det, _ = saved
    state = {k: v.contiguous() for k, v in det.state_dict().items()}
    missing = dict(state)
    missing.pop("classifier.fc.weight")
    extra = dict(state, **{"classifier.extra": torch.zeros(2)})
    reshaped = dict(state, **{"classifier.fc.weight": torch.zeros(1, 32)})
    for bad in (missing, extra, reshaped, {}):
        _write_weights(uri, save_safetensors(bad))
        with pytest.raises(ArtifactError, match="do not fit"):
            load_artifact(uri)


def test_tampered_weights(saved):
    uri, _, _ = saved
    path = Path(uri, "model.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # flip a bit inside the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model_id .* does not match"):
        load_artifact(uri)


@pytest.mark.parametrize("model_id", [None, "", 123])
def test_model_id_required(saved, model_id):
    """Without a model_id the weights cannot be verified: refused, not silently trusted."""
    uri, _, _ = saved
    meta = _meta(uri)
    if model_id is None:
        del meta["model_id"]
    else:
        meta["model_id"] = model_id
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="model_id"):
        load_artifact(uri)


def test_corrupt_safetensors(saved):
    uri, det, _ = saved
    good = Path(uri, "model.safetensors").read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    corrupt = [
        b"",
        b"\x00" * 7,
        b"not a safetensors file at all, just some text" * 10,
        good[: len(good) // 2],  # truncated
        good[:8] + b"[" + good[9:],  # broken JSON header
        good[:8] + good[8 : 8 + header_len].replace(b'"F32"', b'"X32"', 1) + good[8 + header_len :],  # unknown dtype
        good[: 8 + header_len] + good[8 + header_len + 8 :],  # tensor data shorter than the header says
        (10**12).to_bytes(8, "little") + good[8:],  # header length beyond the file
        bytes(range(256)) * 16,
    ]
    for data in corrupt:
        _write_weights(uri, data)
        with pytest.raises(ArtifactError, match="not a readable safetensors file"):
            load_artifact(uri)
    assert header_len > 0


@pytest.mark.parametrize(
    "text",
    [b"", b"not json {", b"{\"format_version\": 1,", b"\xff\xfe\x00garbage\x80", b"[1, 2, 3]", b"\"a string\"", b"null"],
)
def test_model_json_not_json_or_not_an_object(saved, text):
    uri, _, _ = saved
    Path(uri, "model.json").write_bytes(text)
    with pytest.raises(ArtifactError, match="model.json"):
        load_artifact(uri)


@pytest.mark.parametrize(
    "field,value",
    [
        ("input_size", "big"),
        ("input_size", 0),
        ("input_size", 64.5),
        ("threshold", "high"),
        ("threshold", None),
        ("normalization", {"mean": [0.5, 0.5, 0.5], "std": [0.229, 0.224, 0.225]}),
        ("normalization", {"mean": [0.485, 0.456], "std": [0.229, 0.224, 0.225]}),
        ("training", [1, 2]),
    ],
)
def test_bad_metadata_values(saved, field, value):
    uri, _, _ = saved
    meta = _meta(uri)
    meta[field] = value
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError):
        load_artifact(uri)


# ---------------------------------------------------------------------------------------
# nothing is ever unpickled


def _forbid_unpickling(monkeypatch) -> list[str]:
    calls: list[str] = []

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while loading an artifact")

        return f

    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", forbidden("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", forbidden("torch.serialization.load"))
    return calls


def test_load_never_unpickles(saved, monkeypatch):
    uri, det, _ = saved
    calls = _forbid_unpickling(monkeypatch)
    loaded = load_artifact(uri)
    _state_equal(det, loaded.detector)
    assert calls == []


class _MarkerPayload:
    """Unpickling this creates (opens for writing) ``path``: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_rejected_without_executing(saved, tmp_path):
    uri, _, _ = saved
    # The payload works: unpickling it here does create its marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_MarkerPayload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "marker-must-not-exist"
    payloads = {
        "raw pickle": pickle.dumps(_MarkerPayload(marker)),
        "pickle protocol 0": pickle.dumps(_MarkerPayload(marker), protocol=0),
    }
    buf = io.BytesIO()
    torch.save({"classifier.fc.weight": _MarkerPayload(marker)}, buf)  # torch's zip format, pickle inside
    payloads["torch.save zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"x": _MarkerPayload(marker)}, buf, _use_new_zipfile_serialization=False)  # legacy torch format
    payloads["torch.save legacy"] = buf.getvalue()

    for what, data in payloads.items():
        _write_weights(uri, data)  # model_id matches, so only the format check can stop it
        with pytest.raises(ArtifactError, match="not a readable safetensors file"):
            load_artifact(uri)
        assert not marker.exists(), what
        # and with the hash left stale it is refused before the bytes are parsed at all
        _write_weights(uri, data, fix_model_id=False)
        Path(uri, "model.json").write_text(json.dumps(dict(_meta(uri), model_id="0" * 16)))
        with pytest.raises(ArtifactError):
            load_artifact(uri)
        assert not marker.exists(), what



def _write_format1(uri: Path, det: Detector) -> str:
    """An artifact as ntf-ray wrote it before the transfer layer (format 1: D on E)."""
    from safetensors.torch import save as save_safetensors

    uri.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in det.state_dict().items()}
    weights = save_safetensors(state, metadata={"ntf_ray": json.dumps({"backbone": "tiny", "format_version": 1})})
    (uri / "model.safetensors").write_bytes(weights)
    meta = {"format_version": 1, "model_id": hashlib.sha256(weights).hexdigest()[:16], "backbone": "tiny",
            "input_size": 64, "threshold": 0.5,
            "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "training": {}, "metrics": {}}
    (uri / "model.json").write_text(json.dumps(meta))
    return meta["model_id"]


def test_format1_artifact_still_loads_as_a_classifier_on_the_encoder(tmp_path):
    torch.manual_seed(3)
    old = Detector.build("tiny", head="linear").eval()
    assert set(old.state_dict()) == {k for k in old.state_dict() if k.startswith(("encoder.", "classifier."))}
    model_id = _write_format1(tmp_path / "old", old)
    loaded = load_artifact(str(tmp_path / "old"))
    assert loaded.head == "linear" and loaded.detector.transfer is None and loaded.model_id == model_id
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded.detector(x), old(x))
        # what format 1 computed: D(E(x))
        assert torch.equal(loaded.detector(x), old.classifier(old.encoder(x)).squeeze(1))


def test_head_that_does_not_fit_the_weights_is_an_error(saved):
    uri, _, _ = saved
    meta = _meta(uri)
    meta["head"] = "linear"  # the weights hold a transfer layer
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="model_id .* does not match"):
        load_artifact(uri)
    _fix_model_id(uri)
    meta = _meta(uri)
    with pytest.raises(ArtifactError, match="linear head"):
        load_artifact(uri)
    meta["head"] = "mlp"
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="head 'mlp'"):
        load_artifact(uri)
    del meta["head"]  # formats 2 and 3 always name their head
    _write_meta(uri, meta)
    with pytest.raises(ArtifactError, match="head None"):
        load_artifact(uri)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_at_save_and_at_load(saved, tmp_path, bad):
    uri, det, _ = saved
    broken = make_detector()
    with torch.no_grad():
        broken.classifier.fc.weight[0, 0] = bad
    with pytest.raises(ArtifactError, match="NaN or infinity"):
        save_artifact(str(tmp_path / "never"), broken, input_size=32)
    assert not (tmp_path / "never").exists()
    # written by something else, with a model_id that matches: still refused when loaded
    _write_weights(uri, save_safetensors({k: v.contiguous() for k, v in broken.state_dict().items()}))
    with pytest.raises(ArtifactError, match=r"NaN or infinity \(e.g. \[.classifier.fc.weight.\]\)"):
        load_artifact(uri)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("odd", ["fifo", "dev-zero"])
def test_a_model_card_that_is_not_a_regular_file_is_refused_at_once(tmp_path, odd):
    """A model.json that is a FIFO blocked the run; one linked to /dev/zero read until memory ran out."""
    import os

    from tests.conftest import save_random_detector

    model = Path(save_random_detector(str(tmp_path / "model")))
    (model / "model.json").unlink()
    if odd == "fifo":
        os.mkfifo(model / "model.json")
    else:
        (model / "model.json").symlink_to("/dev/zero")
    with pytest.raises(ArtifactError, match="model.json .* not a regular file"):
        load_artifact(str(model))
