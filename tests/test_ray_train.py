"""Ray Train in-process: global-batch parity, resume after a failure and after a resubmission.

Local Ray, 2 CPU workers on gloo. Both stages from S3 to S3 through `ray job submit`: test_ray_jobs.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train import ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from ntf_ray.ray_edge import train as ray_train  # noqa: E402
from ntf_ray.synth import make_synthetic  # noqa: E402
from ntf_ray.training.config import load_config  # noqa: E402
from ntf_ray.training.datasets import manifest_table, write_manifest  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SMOKE = Path(__file__).resolve().parents[1] / "ntf_ray" / "training" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def local_ray(s3):
    # After `s3`: Ray's workers inherit the environment, the test credentials included.
    # More logical CPUs than cores: 2 train workers hold 2, Ray Data's tasks need more.
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _parity_loop(config):
    """One stage-1 step of the engine on a fixed global batch, split over the workers."""
    from ntf_ray.nn import dist
    from ntf_ray.nn.model import Stage1Model, build_encoder
    from ntf_ray.training.engine import make_optimizer, train_stage1_epoch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = Stage1Model(build_encoder("tiny"), proj_dim=16)
    if world > 1:
        dist.convert_global_batchnorm(model)
    g = torch.Generator().manual_seed(1)
    v1 = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=g)
    v2 = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=g)
    per = 8 // world
    local = slice(rank * per, (rank + 1) * per)
    opt = make_optimizer(model.parameters(), lr=0.1, weight_decay=0.0)
    m = train_stage1_epoch(model, [{"view1": v1[local], "view2": v2[local]}], opt, epoch=0, gather=True, log_every=0)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    metrics = {"loss": m["loss"], "hom": m["hom"], "het": m["het"], "orth": m["orth"], "params": checksum}
    # Ray Train's Result carries the metrics of the latest checkpointed report.
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def _one_and_two_workers(loop, storage_path) -> dict[int, dict]:
    """The metrics ``loop`` reports with 1 and with 2 workers."""
    results = {}
    for workers in (1, 2):
        trainer = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
            run_config=ray.train.RunConfig(name=f"{loop.__name__.strip('_')}-{workers}", storage_path=str(storage_path)),
        )
        results[workers] = trainer.fit().metrics
    return results


def test_global_batch_parity_one_vs_two_workers(local_ray, tmp_path):
    results = _one_and_two_workers(_parity_loop, tmp_path)
    for key in ("loss", "hom", "het", "orth"):
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-5), key
    # Same parameters after the SGD step: the gradients agree after DDP-style averaging.
    assert results[2]["params"] == pytest.approx(results[1]["params"], rel=1e-6)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    records = make_synthetic(root, n_real=60, n_fake=20, size=40, seed=3)
    write_manifest(manifest_table(records), str(root / "manifest.parquet"))
    return str(root / "manifest.parquet")


def _resume_config(**over):
    cfg = load_config(SMOKE, ["epochs_stage1=3", "batch_size=16", "crop_size=32", "scl_crop_size=16"])
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def test_worker_failure_resumes_from_latest_checkpoint(local_ray, small_manifest, tmp_path):
    cfg = _resume_config(fail_at_epoch=1)
    spec = ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), num_workers=2,
                             run_name="fail-once", max_failures=1)
    result = ray_train.run_stage(1, cfg, spec)
    assert result.error is None
    assert result.metrics["epoch"] == 2  # 0-based: all 3 epochs done
    assert result.metrics["resumed_from_epoch"] == 1  # the first resumed epoch is epoch 2 (1-based)
    assert (tmp_path / "out" / "stage1" / "models.safetensors").is_file()


def test_resubmission_under_the_same_name_resumes(local_ray, small_manifest, tmp_path):
    spec = ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), num_workers=2,
                             run_name="resubmit", max_failures=0)
    with pytest.raises(Exception, match="injected failure"):
        ray_train.run_stage(1, _resume_config(fail_at_epoch=1), spec)
    # The workers check the checkpoint's own config too (here run_stage is called directly,
    # without train's check of config.json): another lr is refused before any weight loads.
    with pytest.raises(Exception, match=r"was started with another config(.|\n)*lr: 0.005 -> 0.05"):
        ray_train.run_stage(1, _resume_config(lr=0.05), spec)
    result = ray_train.run_stage(1, _resume_config(), spec)  # same name, no failure this time
    assert result.metrics["resumed_from_epoch"] == 1 and result.metrics["epoch"] == 2


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(local_ray, small_manifest, tmp_path):
    """A node lost while writing leaves the newest checkpoint truncated: the run resumes from
    the older one Ray keeps, and fails with every checkpoint named only when none loads."""
    spec = ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), num_workers=2,
                             run_name="truncated", max_failures=0, num_to_keep=2)
    with pytest.raises(Exception, match="injected failure"):  # stops after 2 of 3 epochs
        ray_train.run_stage(1, _resume_config(fail_at_epoch=2), spec)
    run = tmp_path / "out" / "ray" / "truncated-stage1"
    kept = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2
    weights = kept[-1] / "models.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = ray_train.run_stage(1, _resume_config(), spec)
    assert result.error is None
    assert result.metrics["resumed_from_epoch"] == 1 and result.metrics["epoch"] == 2  # epochs 2 and 3 again

    kept = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    for ckpt in kept:
        (ckpt / "checkpoint.json").write_text('{"format": ')
    with pytest.raises(Exception, match="no kept checkpoint of this run loads") as failed:
        ray_train.run_stage(1, _resume_config(), spec)
    assert all(ckpt.name in str(failed.value) for ckpt in kept)


def _stage2_parity_loop(config):
    """One stage-2 step (transfer layer, SCL + BCE) on a fixed global batch, split over the workers."""
    from ntf_ray.nn import dist
    from ntf_ray.nn.model import Stage1Model, Stage2Model, build_encoder
    from ntf_ray.training.engine import make_optimizer, prepare_stage2, train_stage2_epoch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = Stage2Model.from_stage1(Stage1Model(build_encoder("tiny"), proj_dim=16), proj_dim=16)
    if world > 1:
        dist.convert_global_batchnorm(model)
    g = torch.Generator().manual_seed(2)
    batch = {"image": torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=g),
             "crop": torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=g),
             "label": torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])}
    per = 8 // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    opt = make_optimizer(prepare_stage2(model), lr=0.1, weight_decay=0.0)
    m = train_stage2_epoch(model, [local], opt, epoch=0, gather=True, log_every=0)
    checksum = {name: float(p.double().sum()) for name, p in model.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"loss": m["loss"], "scl": m["scl"], "ce": m["ce"], **checksum}, checkpoint=ckpt)


def test_stage2_global_batch_parity_one_vs_two_workers(local_ray, tmp_path):
    results = _one_and_two_workers(_stage2_parity_loop, tmp_path)
    assert {k for k in results[1] if k.startswith("transfer.")}, results[1]
    for key, value in results[1].items():
        if isinstance(value, float):
            assert results[2][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_every_variant_trains_on_two_workers(local_ray, small_manifest, tmp_path):
    """Smoke: each of the paper's variants, both stages on 2 Ray workers, gives its detector."""
    from safetensors.torch import load_file

    from ntf_ray.detector.artifact import load_artifact
    from ntf_ray.nn.variants import VARIANTS

    for name, variant in VARIANTS.items():
        cfg = _resume_config(variant=name, epochs_stage1=1, epochs_stage2=1, batch_size=8)
        out = tmp_path / name
        spec = ray_train.RunSpec(manifest=small_manifest, output=str(out), num_workers=2, run_name=f"variant-{name}")
        metrics = ray_train.train("both", cfg, spec)
        assert ("stage1" in metrics) == variant.stage1, name
        assert metrics["stage2"]["images"] > 0, name
        epoch = json.loads((out / "metrics" / "stage2" / "epoch-0001.json").read_text())
        assert epoch["stage"] == 2 and epoch["images"] == metrics["stage2"]["images"] and "ce" in epoch
        art = load_artifact(str(out / "detector"))
        assert art.head == variant.head and art.training["config"]["variant"] == name
        assert (art.detector.traces is not None) == bool(variant.traces), name  # fitted on rank 0 after stage 2
        if variant.stage1:
            stage1 = load_file(str(out / "stage1" / "models.safetensors"))
            assert any(k.startswith("stage1.f_het.") for k in stage1) == variant.needs_f_het, name
            encoder = {k[len("stage1."):]: v for k, v in stage1.items() if k.startswith("stage1.encoder.")}
            for key, value in art.detector.state_dict().items():
                if key.startswith("encoder."):  # frozen through stage 2, buffers included
                    assert torch.equal(value, encoder[key]), (name, key)


def test_stage2_refuses_a_stage1_export_of_another_variant(tmp_path):
    """A variant's stage 2 starts only from a stage 1 trained with its terms, at once, on the driver."""
    from ntf_ray import storage

    export = tmp_path / "stage1"
    export.mkdir()
    cfg = _resume_config(variant="ntf")
    (export / "checkpoint.json").write_text(json.dumps({"config": cfg.to_dict()}))
    options = storage.StorageOptions()
    for same in ("ntf", "no-scl", "linear-probe"):  # one stage 1 serves these three
        ray_train.check_stage1_export(_resume_config(variant=same), str(tmp_path), options)
    for other in ("no-orth", "no-het-orth"):
        with pytest.raises(ValueError, match=f"stage 1 of variant ntf .* variant {other} needs its own"):
            ray_train.check_stage1_export(_resume_config(variant=other), str(tmp_path), options)
    with pytest.raises(ValueError, match="proj_dim"):
        ray_train.check_stage1_export(_resume_config(variant="ntf", proj_dim=64), str(tmp_path), options)
    with pytest.raises(FileNotFoundError, match="run --stage 1"):
        ray_train.check_stage1_export(cfg, str(tmp_path / "elsewhere"), options)


@pytest.fixture
def driver_only(monkeypatch):
    """``ray_train.train`` without Ray: the trainer, the drop counter and the dataset are
    stand-ins that record what the workers, the read tasks and the driver were given."""
    from types import SimpleNamespace

    seen: dict = {}

    class Trainer:
        def __init__(self, loop, *, train_loop_config, **kwargs):
            seen["workers"] = train_loop_config["endpoint"]
            seen["fits"] = seen.get("fits", 0) + 1

        def fit(self):
            return SimpleNamespace(metrics={})

    real_read_manifest = ray_train.read_manifest

    def read_manifest(uri, options=None, **kwargs):
        seen["driver"] = options.endpoint_url
        return real_read_manifest(uri, options, **kwargs)

    def build_dataset(rows, **kwargs):
        seen["read_tasks"] = kwargs["endpoint"]

    monkeypatch.setattr(ray_train, "TorchTrainer", Trainer)
    monkeypatch.setattr(ray_train, "read_manifest", read_manifest)
    monkeypatch.setattr(ray_train, "DropCounter", SimpleNamespace(remote=lambda: None))
    class StageWatch:  # the epoch bar's board is an actor
        board = None

        def __init__(self, stage, epochs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(ray_train, "build_dataset", build_dataset)
    monkeypatch.setattr(ray_train, "StageWatch", StageWatch)
    monkeypatch.setattr(ray_train.ray, "kill", lambda actor: None)
    return seen


def test_training_takes_the_endpoint_from_the_environment(monkeypatch, driver_only, small_manifest, tmp_path):
    """With only AWS_ENDPOINT_URL set (no --s3-endpoint), the driver, the checkpoint storage,
    the read tasks and the workers all use it, as the scan does (StorageOptions.resolve)."""
    import pyarrow as pa

    from ntf_ray.ray_edge import train_data as ray_train_data

    endpoint = "http://minio.internal:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    cfg = _resume_config(epochs_stage1=1)
    ray_train.train("1", cfg, ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), run_name="env"))
    assert driver_only == {"driver": endpoint, "workers": endpoint, "read_tasks": endpoint, "fits": 1}

    _, fs = ray_train._storage(ray_train.RunSpec(manifest=small_manifest, output="s3://bucket/out"))
    assert fs.__reduce__()[1][0]["endpoint_override"] == "minio.internal:9000"

    # A read task on a node without the variable still gets the driver's endpoint explicitly;
    # one that is handed none resolves it like the driver.
    used = []
    monkeypatch.setattr(ray_train_data.storage, "read_many", lambda uris, options: used.append(options) or [b""] * len(uris))
    ray_train_data.read_batch(pa.table({"uri": ["s3://b/k"], "label": [0]}), endpoint=None)
    assert used[0].endpoint_url == endpoint


def _png(h: int, w: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("stage", [1, 2])
def test_prepare_batch_drops_and_counts_slivers(stage, caplog):
    """A 1 x 1000 image, which upscaling to the crop would blow up past max_pixels, is dropped,
    logged with its reason and counted, like an undecodable one; the others train."""
    from types import SimpleNamespace

    import pyarrow as pa

    from ntf_ray.ray_edge.train_data import prepare_batch

    added = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=added.append))
    cfg = _resume_config(max_pixels=1_000_000)  # crop 32: 1 x 1000 needs 32 x 32000 = 1,024,000 px
    batch = pa.table({"label": [0, 1, 0, 1], "data": [_png(40, 40), _png(1, 1000), b"not an image", _png(20, 40)]})
    with caplog.at_level("WARNING", logger="ntf_ray.ray_edge.train_data"):
        out = prepare_batch(batch, stage=stage, cfg=cfg.to_dict(), counter=counter)
    assert out["label"].tolist() == [0, 1] and added == [2]
    assert "too_large: upscaling 1000x1 to fit 32 px needs 32000x32 = 1024000 px > limit 1000000" in caplog.text


def test_drop_counter_survives_losing_its_process(local_ray):
    """Losing the counter's node costs only the count since the last take, never the training."""
    from ntf_ray.ray_edge.train_data import DropCounter

    counter = DropCounter.remote()
    ray.get(counter.add.remote(3), timeout=60)
    assert ray.get(counter.take.remote(), timeout=60) == 3
    ray.get(counter.add.remote(2), timeout=60)
    ray.kill(counter, no_restart=False)  # as when its node is lost
    ray.get(counter.add.remote(5), timeout=60)  # from a decode task, while it restarts: never an error
    _wait_until_restarted(counter)
    # the 2 not yet taken are lost; the 5 too if they reached the process before it died
    assert ray.get(counter.take.remote(), timeout=60) in (0, 5)
    ray.get(counter.add.remote(4), timeout=60)
    assert ray.get(counter.take.remote(), timeout=60) == 4  # the restarted counter counts
    ray.kill(counter)


def _wait_until_restarted(actor, timeout: float = 60.0) -> None:
    """Until GCS reports the actor restarted and alive (its public state API needs the dashboard,
    which these tests do not start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ray._private.state.actors(actor_id=actor._actor_id.hex())
        if state.get("NumRestarts", 0) >= 1 and state.get("State") == "ALIVE":
            return
        time.sleep(0.1)
    raise AssertionError(f"the actor did not restart within {timeout} s")


def test_resuming_with_another_config_is_refused_and_keeps_config_json(driver_only, small_manifest, tmp_path):
    """A run submitted again under its name may not change its maths (the optimiser would
    keep the stored lr, the cosine schedule would take the new epoch count); config.json
    stays as the run first wrote it. Placement, the threshold and the drill may change."""
    from ntf_ray.training.config import ResumeConflict

    out = tmp_path / "out"

    def spec(**over):
        return ray_train.RunSpec(**{"manifest": small_manifest, "output": str(out), "num_workers": 2,
                                    "run_name": "r1", **over})

    ray_train.train("1", _resume_config(), spec())
    first = (out / "config.json").read_bytes()
    with pytest.raises(ResumeConflict) as refused:
        ray_train.train("1", _resume_config(lr=0.05, epochs_stage1=5, variant="no-orth"), spec())
    message = str(refused.value)
    assert "run 'r1'" in message and "new --output and --run-name" in message
    for line in ("lr: 0.005 -> 0.05", "variant: 'ntf-proximity' -> 'no-orth'", "epochs_stage1: 3 -> 5 (the cosine schedule"):
        assert f"\n  {line}" in message, message
    with pytest.raises(ResumeConflict, match=r"global batch \(workers x batch_size\): '2 x 16 = 32' -> '1 x 16 = 16'"):
        ray_train.train("1", _resume_config(), spec(num_workers=1))
    with pytest.raises(ResumeConflict, match="manifest"):
        ray_train.train("1", _resume_config(), spec(manifest=str(tmp_path / "other.parquet")))
    assert driver_only["fits"] == 1  # nothing was trained with a refused config
    # The same global batch on other workers, placement, the threshold and the drill: resumed.
    ray_train.train("1", _resume_config(batch_size=32, device="auto", threshold=0.7, fail_at_epoch=1,
                                        num_workers=0, cache_bytes=False), spec(num_workers=1, max_failures=3))
    assert driver_only["fits"] == 2 and (out / "config.json").read_bytes() == first
    # Another run name in the same output is a new run.
    ray_train.train("1", _resume_config(lr=0.05), spec(run_name="r2"))
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 0.05


def test_a_step_schedule_may_extend_a_resumed_run(driver_only, small_manifest, tmp_path):
    from ntf_ray.training.config import ResumeConflict

    spec = ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), run_name="steps")
    ray_train.train("1", _resume_config(schedule="step", step_size=1), spec)
    ray_train.train("1", _resume_config(schedule="step", step_size=1, epochs_stage1=6), spec)
    with pytest.raises(ResumeConflict, match="step_size: 1 -> 2"):
        ray_train.train("1", _resume_config(schedule="step", step_size=2, epochs_stage1=6), spec)


def test_a_worker_killed_in_each_stage_resumes_both(local_ray, small_manifest, tmp_path):
    """Fault drill: in each stage the last worker's process is killed (SIGKILL, as a lost node)
    at the start of its second epoch; Ray Train restarts the workers (max_failures) and both
    stages go on from their checkpoints to the detector."""
    cfg = _resume_config(epochs_stage1=2, epochs_stage2=2, fail_at_epoch=1, fail_mode="kill")
    spec = ray_train.RunSpec(manifest=small_manifest, output=str(tmp_path / "out"), num_workers=2,
                             cpus_per_worker=0.5, run_name="killed", max_failures=1)
    metrics = ray_train.train("both", cfg, spec)
    for stage in ("stage1", "stage2"):
        assert metrics[stage]["resumed_from_epoch"] == 1 and metrics[stage]["epoch"] == 1, (stage, metrics[stage])
    assert (tmp_path / "out" / "detector" / "model.json").is_file()


def test_workers_that_decode_and_augment_train_on_every_good_image_and_count_the_rest(local_ray, tmp_path):
    """Both stages with images decoded and augmented in the train workers (the GPU workers' path,
    here on a CPU worker) train on every image that decodes and fits, and count the others."""
    import io

    from PIL import Image

    from ntf_ray.detector.artifact import load_artifact

    root = tmp_path / "data"
    records = make_synthetic(root, n_real=24, n_fake=8, size=40, seed=4)
    jpeg = root / "photo.jpg"  # a JPEG: the batched decoder's path
    Image.new("RGB", (48, 40), (120, 30, 200)).save(jpeg, format="JPEG")
    (root / "junk.png").write_bytes(b"not an image")
    buf = io.BytesIO()
    Image.new("RGB", (4000, 1)).save(buf, format="PNG")  # a sliver: too large to upscale to the crop
    (root / "sliver.png").write_bytes(buf.getvalue())
    base = {"label": 0, "generator": "tconv", "split": "train", "source": "real", "family": "upsampling"}
    records += [{**base, "uri": str(root / name)} for name in ("photo.jpg", "junk.png", "sliver.png", "missing.png")]
    manifest = str(root / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    cfg = _resume_config(epochs_stage1=1, epochs_stage2=1, batch_size=8, max_pixels=100_000)
    train = [r for r in records if r["split"] == "train"]
    # one worker: Ray Train's equal split of a stream among workers drops up to (workers - 1) rows an epoch
    spec = ray_train.RunSpec(manifest=manifest, output=str(tmp_path / "out"), num_workers=1, augment="worker",
                             run_name="augment-worker")
    metrics = ray_train.train("both", cfg, spec)
    # every good image of the train split (the JPEG among them); junk, sliver and the missing file dropped,
    # as the tasks drop them (test_prepare_batch_drops_and_counts_slivers)
    reals = sum(r["label"] == 0 for r in train)
    assert {s: (m["images"], m["rows_dropped"]) for s, m in metrics.items()} == {
        "stage1": (reals - 3, 3), "stage2": (len(train) - 3, 3)}
    assert metrics["stage1"]["first_batch_s"] > 0 and 0 <= metrics["stage1"]["input_wait_share"] <= 1
    assert load_artifact(str(tmp_path / "out" / "detector")).training["config"]["crop_size"] == 32


def test_gpu_workers_decode_and_augment_themselves_unless_told_otherwise():
    spec = ray_train.RunSpec(manifest="m", output="o")
    assert ray_train.augment_place(spec) == "tasks"
    assert ray_train.augment_place(ray_train.RunSpec(manifest="m", output="o", use_gpu=True)) == "worker"
    assert ray_train.augment_place(ray_train.RunSpec(manifest="m", output="o", use_gpu=True, augment="tasks")) == "tasks"
    with pytest.raises(ValueError, match="augment must be one of auto, tasks, worker"):
        ray_train.augment_place(ray_train.RunSpec(manifest="m", output="o", augment="gpu"))


def test_the_read_tasks_of_training_import_no_torch():
    """With the workers augmenting, Ray Data's tasks only read: a fresh task process that
    imports torch and torchvision pays seconds before its first row (7-10 s were measured in
    fresh worker processes on a GPU node), the first epoch's start-up."""
    import subprocess
    import sys

    code = ("import sys, ntf_ray.ray_edge.train_data; "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_workers_skip_a_batch_together_when_any_of_them_lost_it():
    """Rank-local drops after the split: each rank's engine would skip on its own and the collectives
    would pair with the wrong steps; every rank skips what any rank cannot step on."""
    sizes_elsewhere = iter([4, 0, 4, 1, 4])  # the other rank's usable images, batch by batch
    mine = [{"image": torch.zeros((n, 3, 2, 2))} for n in (4, 4, 1, 4, 4)]
    got = list(ray_train.agreed_batches(mine, "image", 2, torch.device("cpu"),
                                        reduce_min=lambda n: min(n, next(sizes_elsewhere))))
    assert [b["image"].shape[0] for b in got] == [4, 4]  # batch 2 (other rank empty), 3 (mine 1), 4 (other 1) out


def test_train_workers_never_reserve_every_cpu_of_the_cluster():
    """Workers holding every CPU leave Ray Data's read tasks none: the run waits for ever."""
    spec = ray_train.RunSpec(manifest="m", output="o", num_workers=2, cpus_per_worker=1.0)
    assert ray_train.worker_cpus(spec, 2.0) == 0.5  # a 2-core laptop's `ray start`: one CPU left to the tasks
    assert ray_train.worker_cpus(spec, 1.0) == 0.25
    assert ray_train.worker_cpus(spec, 3.0) == 1.0 and ray_train.worker_cpus(spec, 16.0) == 1.0
    assert ray_train.worker_cpus(spec, 0.0) == 1.0  # nothing known: as asked
