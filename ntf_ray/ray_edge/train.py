"""Both NTF stages on Ray Train: multi-worker DDP, data streamed with Ray Data, resumable.

Per stage, one ``TorchTrainer`` whose workers run the core's epoch functions over their
shard of a Ray Data stream. Ray Data reads the images; where they are decoded and augmented
is ``RunSpec.augment``: Ray Data's CPU tasks (``iter_torch_batches`` of tensors; CPU workers'
default) or each worker itself, batched on its device (``ntf_ray.training.device_augment``; GPU
workers' default). Undecodable rows are dropped and counted either way; losses gather the
global batch (``gather=True``) and batch norm uses global statistics across workers.
Every epoch rank 0 reports metrics and a checkpoint; a run submitted again under the same
name, or restarted after a worker failure, continues from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ntf_ray import storage
from ntf_ray.detector.artifact import json_safe, save_artifact
from ntf_ray.nn import dist
from ntf_ray.nn.model import Stage1Model
from ntf_ray.nn.variants import get_variant
from ntf_ray.ray_edge.train_data import DropCounter, InputWaits, agreed_batches, augment_place, build_dataset
from ntf_ray.ray_edge.train_progress import Poster, StageWatch
from ntf_ray.storage import StorageOptions
from ntf_ray.training.config import ResumeConflict, TrainConfig, refuse_resume, resume_conflicts
from ntf_ray.training.datasets import read_manifest
from ntf_ray.training.engine import load_checkpoint, make_optimizer, make_scheduler, save_checkpoint
from ntf_ray.training.natural_traces import fit_natural_traces, trace_uris
from ntf_ray.training.recipe import data_summary
from ntf_ray.training.stages import stage_of

log = logging.getLogger(__name__)

STAGE1_EXPORT = "stage1"  # OUTPUT/stage1: the final stage-1 checkpoint, stage 2's starting point
DETECTOR = "detector"
METRICS = "metrics"  # OUTPUT/metrics/stageN/epoch-EEEE.json: each epoch's metrics, as reported


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``fail_at_epoch`` to exercise recovery."""


# ---------------------------------------------------------------- worker loop


def _report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, checkpoint=ckpt)


def _export_stage1(checkpoint_dir: str, output: str, options: StorageOptions) -> None:
    for name in ("models.safetensors", "checkpoint.json"):
        data = Path(checkpoint_dir, name).read_bytes()
        storage.write_bytes(storage.join(output, STAGE1_EXPORT, name), data, options)


def _load_stage1_export(model: Stage1Model, output: str, options: StorageOptions) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("models.safetensors", "checkpoint.json"):
            uri = storage.join(output, STAGE1_EXPORT, name)
            try:
                Path(tmp, name).write_bytes(storage.read_bytes(uri, options))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"stage 2 needs stage 1's result at {storage.join(output, STAGE1_EXPORT)}; "
                    "run --stage 1 (or --stage both) with this --output first"
                ) from None
        return load_checkpoint(tmp, models={"stage1": model})


def _kept_checkpoints(latest: Checkpoint) -> list[Checkpoint]:
    """``latest`` and the older checkpoints Ray keeps beside it, newest first (Ray names them
    ``checkpoint_<timestamp>``, so the names sort by age)."""
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError as exc:
        log.warning("cannot list the checkpoints beside %s (%s): only the latest is tried", latest.path, exc)
        return [latest]
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest, *(Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem) for n in older)]


def restore(latest: Checkpoint, load: Callable[[str], dict[str, Any]], *, warn: bool = True
            ) -> tuple[Checkpoint, dict[str, Any]]:
    """Load the newest kept checkpoint that loads, starting from ``latest``: a truncated or
    corrupt one (a node lost while writing, a damaged object) is skipped with a warning
    naming it. ``load(directory)`` restores the state and returns the checkpoint's metadata.
    Raises ``RuntimeError`` listing every checkpoint tried when none loads."""
    failures = []
    for ckpt in _kept_checkpoints(latest):
        try:
            with ckpt.as_directory() as d:
                return ckpt, load(d)
        except ResumeConflict:
            raise
        except Exception as exc:  # safetensors, JSON or storage errors: whatever a damaged file raises
            failures.append(f"{ckpt.path}: {type(exc).__name__}: {storage.redact(str(exc))}")
            if warn:
                log.warning("checkpoint %s does not load (%s: %s); trying the one before it",
                            ckpt.path, type(exc).__name__, storage.redact(str(exc)))
    raise RuntimeError("no kept checkpoint of this run loads, so it cannot resume:\n  " + "\n  ".join(failures)
                       + "\nstart a new run with a new --output and --run-name")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function for one stage (config: see ``run_stage``)."""
    loop_start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage: int = config["stage"]
    step = stage_of(stage)
    cfg = TrainConfig.from_dict(config["cfg"])
    options = StorageOptions.resolve(config["endpoint"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = step.build(cfg, stage1_weights=lambda stage1: _load_stage1_export(stage1, config["output"], options))
    epochs = step.epochs(cfg)
    if world > 1:
        # Before the optimiser is built: conversion replaces the batch-norm parameters.
        dist.convert_global_batchnorm(model)
    model.to(device)
    optimizer = make_optimizer(step.trainable(model, cfg), lr=step.lr(cfg), momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, epochs=epochs, schedule=cfg.schedule, step_size=cfg.step_size,
                               step_gamma=cfg.step_gamma, warmup_epochs=cfg.warmup_epochs)

    def load(directory: str) -> dict[str, Any]:
        meta = json.loads(Path(directory, "checkpoint.json").read_text())
        # Before any weight: a run submitted again with another config stops here, whatever
        # its config.json says (the driver checks that first).
        refuse_resume(f"run {config['run_name']!r} (checkpoint of stage {stage})", resume_conflicts(
            meta.get("config", {}), cfg, stored_workers=meta.get("extra", {}).get("world_size"), workers=world))
        return load_checkpoint(directory, models={f"stage{stage}": model}, optimizer=optimizer, scheduler=scheduler)

    start_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        resumed, meta = restore(resumed, load, warn=rank == 0)
        start_epoch = int(meta["epoch"])
        if world > 1:  # every rank must go on from the same epoch, or the collectives would hang
            epochs_of_ranks = [int(t) for t in dist.gather_no_grad(torch.tensor([start_epoch], device=device))]
            if len(set(epochs_of_ranks)) > 1:
                raise RuntimeError(f"the workers restored different checkpoints (epochs {epochs_of_ranks}); "
                                   "submit the run again")
        if rank == 0:
            log.info("stage %d resumed from its checkpoint after epoch %d of %d; continuing with epoch %d (checkpoint %s)",
                     stage, start_epoch, epochs, start_epoch + 1, resumed.path)
    train_model = model
    if step.ddp and world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    shard = ray.train.get_dataset_shard("train")
    device_batches = None
    if config.get("augment") == "worker":
        from ntf_ray.training.device_augment import DeviceBatches

        # each rank draws its own augmentations, the same ones on every run of this config
        device_batches = DeviceBatches(stage, cfg, device, seed=cfg.seed * 1_000_003 + 7919 * stage + rank)
    counter = config.get("counter")
    board = config.get("board") if rank == 0 else None
    if counter is not None and rank == 0:
        ray.get(counter.take.remote())  # rows an earlier, failed attempt dropped
    common = dict(gather=True, device=device)
    for epoch in range(start_epoch, epochs):
        if cfg.fail_at_epoch == epoch and resumed is None:
            if cfg.fail_mode == "kill" and rank == world - 1:
                # Ray Train registers a checkpoint once it has polled every worker's report
                # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker lost sooner takes the
                # last report with it, and the run restarts from the checkpoint before.
                time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
                log.warning("killing this worker (rank %d) at the start of stage %d epoch %d (fail_at_epoch)",
                            rank, stage, epoch)
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.fail_mode == "raise" and rank == 0:
                raise InjectedFailure(f"injected failure at the start of stage {stage} epoch {epoch} (fail_at_epoch)")
        if device_batches is None:
            batches = shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False,
                                               local_shuffle_buffer_size=4 * cfg.batch_size,
                                               local_shuffle_seed=cfg.seed + epoch, device="cpu")
        else:
            from ntf_ray.training.device_augment import prefetch

            encoded = shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=False,
                                         local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + epoch)
            batches = prefetch(encoded, device_batches, device)
            if world > 1:
                batches = agreed_batches(batches, step.keys[0], step.min_rows, device)
        poster = Poster(board, epoch, config.get("rows", 0), world) if board is not None else None
        batches = InputWaits(batches, on_batch=poster.batch if poster is not None else None)
        metrics = step.epoch(train_model, batches, optimizer, cfg, epoch=epoch, **common)
        metrics.update(batches.metrics())
        if epoch == start_epoch:
            metrics["setup_s"] = batches.start - loop_start  # the worker's own start: model, restore, DDP
        scheduler.step()
        if metrics["images"] == 0:
            raise RuntimeError(
                f"stage {stage} epoch {epoch + 1}: no training image could be read and decoded; check the "
                "manifest's uris, the storage credentials and endpoint (--s3-endpoint), and the workers' logs")
        if counter is not None and device_batches is not None:
            ray.get(counter.add.remote(device_batches.dropped))  # what this rank dropped this epoch
            device_batches.dropped = 0
            if world > 1:
                torch.distributed.barrier()  # every rank's count is in before rank 0 takes it
        if counter is not None and rank == 0:
            metrics["rows_dropped"] = ray.get(counter.take.remote())
        metrics["resumed_from_epoch"] = start_epoch if resumed is not None else -1
        if poster is not None:
            poster.epoch_done(metrics)
        if rank == 0:
            log.info("stage %d epoch %d/%d: %s", stage, epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            # One small file per epoch (object stores cannot append): OUTPUT/metrics/stageN/epoch-EEEE.json
            storage.write_bytes(storage.join(config["output"], METRICS, f"stage{stage}", f"epoch-{epoch + 1:04d}.json"),
                                json.dumps(json_safe(metrics), sort_keys=True, allow_nan=False).encode(), options)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, models={f"stage{stage}": model}, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch + 1, config=cfg.to_dict(), extra={"stage": stage, "world_size": world})
                if stage == 1 and epoch + 1 == epochs:
                    _export_stage1(tmp, config["output"], options)
                _report(metrics, tmp)
        else:
            _report(metrics, None)

    if rank == 0 and stage == 2:
        detector = model.detector().eval()
        if config.get("trace_uris"):  # the distance to the reals' features, fitted on reals the driver picked
            fit_uris, held_uris = config["trace_uris"]
            detector = fit_natural_traces(detector, fit_uris, held_uris, cfg, options=options, device=device)
        detector = detector.cpu().eval()
        art = save_artifact(storage.join(config["output"], DETECTOR), detector, input_size=cfg.crop_size,
                            threshold=cfg.threshold, training={"config": cfg.to_dict(), "data": config["data"],
                                                               "workers": world}, options=options)
        log.info("detector %s written to %s", art.model_id, storage.join(config["output"], DETECTOR))
    if rank == 0 and stage == 1 and start_epoch >= epochs:
        log.info("stage 1 already complete (%d epochs)", epochs)


# ---------------------------------------------------------------- driver


@dataclass
class RunSpec:
    """Where and how a training run runs (the driver side, not hyper-parameters)."""

    manifest: str
    output: str
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: where images are decoded and augmented: "tasks" (Ray Data CPU tasks), "worker" (each
    #: train worker, batched on its device), "auto" (the worker when workers have GPUs)
    augment: str = "auto"
    run_name: str = "ntf"
    storage_path: str | None = None  # default OUTPUT/ray
    max_failures: int = 0
    num_to_keep: int = 2
    endpoint: str | None = None  # None: AWS_ENDPOINT_URL(_S3), as everywhere (StorageOptions.resolve)


def _resolve_endpoint(spec: RunSpec) -> RunSpec:
    """``spec`` with the endpoint the driver resolved: the workers get it explicitly, as
    their nodes need not share the driver's environment."""
    return dataclasses.replace(spec, endpoint=StorageOptions.resolve(spec.endpoint).endpoint_url)


def _storage(spec: RunSpec) -> tuple[str, Any]:
    path = storage.normalize(spec.storage_path or storage.join(spec.output, "ray"))
    if storage.local_path(path) is not None:
        return path, None  # Ray Train's own local paths
    fs, inner = storage.arrow_filesystem(path, StorageOptions.resolve(spec.endpoint))
    return inner, fs


def check_stage1_export(cfg: TrainConfig, output: str, options: StorageOptions) -> None:
    """Stage 2 of ``cfg.variant`` may start from ``OUTPUT/stage1`` only if that stage 1 was
    trained as this variant's (same terms, backbone and projection width): otherwise the
    detector would record a variant its encoder was never trained as."""
    uri = storage.join(output, STAGE1_EXPORT, "checkpoint.json")
    try:
        saved = json.loads(storage.read_bytes(uri, options)).get("config", {})
    except FileNotFoundError:
        raise FileNotFoundError(f"stage 2 needs stage 1's result at {storage.join(output, STAGE1_EXPORT)}; "
                                "run --stage 1 (or --stage both) with this --output first") from None
    want, have = get_variant(cfg.variant), get_variant(saved.get("variant", "ntf"))
    mismatch = [name for name, a, b in (("terms", (want.use_het, want.use_orth), (have.use_het, have.use_orth)),
                                        ("backbone", cfg.backbone, saved.get("backbone")),
                                        ("proj_dim", cfg.proj_dim, saved.get("proj_dim"))) if a != b]
    if mismatch:
        raise ValueError(f"{storage.join(output, STAGE1_EXPORT)} holds stage 1 of variant {have.name} "
                         f"({saved.get('backbone')}, proj_dim {saved.get('proj_dim')}); variant {want.name} needs its own "
                         f"(differs in {', '.join(mismatch)}): use another --output or --stage both")


def run_stage(stage: int, cfg: TrainConfig, spec: RunSpec, table: pa.Table | None = None) -> ray.train.Result:
    """Train one stage on Ray Train; stage 2 starts from ``OUTPUT/stage1``."""
    spec = _resolve_endpoint(spec)
    options = StorageOptions.resolve(spec.endpoint)
    if stage == 2 and get_variant(cfg.variant).stage1:
        check_stage1_export(cfg, spec.output, options)
    table = table if table is not None else read_manifest(spec.manifest, options)
    rows = stage_of(stage).rows(table, cfg)
    counter = DropCounter.remote()
    augment = augment_place(spec)
    dataset = build_dataset(rows, stage=stage, cfg=cfg, endpoint=spec.endpoint, counter=counter,
                            augment_in_tasks=augment == "tasks")
    storage_path, fs = _storage(spec)
    watch = StageWatch(stage, stage_of(stage).epochs(cfg))
    cpus_per_worker = worker_cpus(spec, float(ray.cluster_resources().get("CPU", 0)))
    with watch:  # its board is an actor, killed however the run ends
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"stage": stage, "cfg": cfg.to_dict(), "endpoint": spec.endpoint, "output": spec.output,
                               "trace_uris": trace_uris(table, cfg) if stage == 2 and get_variant(cfg.variant).traces
                               else None,
                               "counter": counter, "data": data_summary(table), "run_name": spec.run_name,
                               "augment": augment, "board": watch.board, "rows": rows.num_rows},
            scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker,
                                                               **({"GPU": 1} if spec.use_gpu else {})}),
            run_config=RunConfig(
                name=f"{spec.run_name}-stage{stage}",
                storage_path=storage_path,
                storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(num_to_keep=spec.num_to_keep),
                failure_config=FailureConfig(max_failures=spec.max_failures),
            ),
            datasets={"train": dataset},
        )
        log.info("stage %d: %d training rows, %d workers (%s), images decoded and augmented in %s, run %s-stage%d",
                 stage, rows.num_rows, spec.num_workers, "GPU" if spec.use_gpu else "CPU",
                 "the workers" if augment == "worker" else "Ray Data tasks", spec.run_name, stage)
        result = trainer.fit()
    ray.kill(counter)
    return result


def _stored_run(output: str, options: StorageOptions) -> dict[str, Any] | None:
    """``OUTPUT/config.json`` as ``train`` wrote it, or None (none yet, or the local recipe's)."""
    try:
        stored = json.loads(storage.read_bytes(storage.join(output, "config.json"), options))
    except FileNotFoundError:
        return None
    return stored if isinstance(stored, dict) and isinstance(stored.get("run"), dict) else None


def check_resume(stored: dict[str, Any], cfg: TrainConfig, spec: RunSpec) -> None:
    """Refuse to resume the run that ``stored`` (its ``config.json``) describes with a config
    or data that would change its maths (see ``config.RESUMABLE``); a ``ResumeConflict``
    names each difference."""
    run = stored["run"]
    conflicts = resume_conflicts(stored.get("config", {}), cfg, stored_workers=run.get("num_workers"),
                                 workers=spec.num_workers)
    if run.get("manifest") is not None and storage.normalize(run["manifest"]) != storage.normalize(spec.manifest):
        conflicts["manifest"] = (run["manifest"], spec.manifest)
    refuse_resume(f"run {spec.run_name!r} ({storage.join(spec.output, 'config.json')})", conflicts)


def train(stage: str, cfg: TrainConfig, spec: RunSpec) -> dict[str, Any]:
    """``stage`` in {"1", "2", "both"}; writes ``OUTPUT/config.json``; returns the last metrics.

    Submitted again under the same run name, the run resumes: its ``config.json`` stays as
    written first, and a config that would change the run's maths is refused (``check_resume``).
    """
    spec = _resolve_endpoint(spec)
    options = StorageOptions.resolve(spec.endpoint)
    stored = _stored_run(spec.output, options)
    if stored is not None and stored["run"].get("run_name") == spec.run_name:
        check_resume(stored, cfg, spec)
        changed = {k: (stored.get("config", {}).get(k), v) for k, v in cfg.to_dict().items()
                   if stored.get("config", {}).get(k, v) != v}
        log.info("resuming run %s; %s keeps its first config%s", spec.run_name, storage.join(spec.output, "config.json"),
                 "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else "")
    else:
        resolved = {"config": cfg.to_dict(), "run": {k: v for k, v in spec.__dict__.items() if k != "endpoint"},
                    "stage": stage}
        storage.write_bytes(storage.join(spec.output, "config.json"), json.dumps(resolved, indent=2, allow_nan=False).encode(), options)
    table = read_manifest(spec.manifest, options)
    out: dict[str, Any] = {}
    stages = (1, 2) if stage == "both" else (int(stage),)
    if not get_variant(cfg.variant).stage1:
        if stages == (1,):
            raise ValueError(f"variant {cfg.variant} has no stage 1 (its encoder comes from --pretrained); "
                             "use --stage 2 or --stage both")
        stages = (2,)
        log.info("variant %s has no stage 1: stage 2 starts from the %s encoder", cfg.variant, cfg.pretrained)
    for s in stages:
        result = run_stage(s, cfg, spec, table)
        out[f"stage{s}"] = dict(result.metrics or {})
    return out


def worker_cpus(spec: RunSpec, cluster_cpus: float) -> float:
    """CPUs each train worker reserves: ``spec.cpus_per_worker``, less when the workers would
    hold every CPU of the cluster (a laptop's ``ray start``) and leave Ray Data's decode tasks
    none (they read the bytes even when the workers decode): the run would wait for ever,
    silently. The workers still use what they need; only Ray's accounting changes."""
    want = spec.num_workers * spec.cpus_per_worker
    if not cluster_cpus or want <= cluster_cpus - 1:
        return spec.cpus_per_worker
    fit = (cluster_cpus - 1 if cluster_cpus >= 2 else cluster_cpus / 2) / spec.num_workers
    log.warning("the cluster has %g CPUs: each of the %d train workers reserves %.2f CPU, not %g, so that Ray Data's "
                "decode tasks can run", cluster_cpus, spec.num_workers, fit, spec.cpus_per_worker)
    return fit


def new_run_name() -> str:
    return f"ntf-{uuid.uuid4().hex[:8]}"
