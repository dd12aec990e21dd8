"""The whole product on one machine, as ``ntf-ray demo`` runs it.

Synthetic data -> both NTF stages on local Ray (tiny backbone, CPU) -> evaluation on the
held-out split -> a scan of the data folder into a score table. Progress goes to stdout:
it is what a first-time user watches.
"""

from __future__ import annotations

import time
from pathlib import Path

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "smoke.yaml"


def run_demo(*, work: str | Path, n: int = 1000, seed: int = 0, overrides: list[str] | None = None) -> None:
    """Make ``n`` real and ``n`` fake images under ``work/data``, train into ``work/run``, evaluate into
    ``work/report`` and scan into ``work/scores``; ``overrides`` are ``KEY=VALUE`` training config fields."""
    from ntf_ray.ray_edge import evaluate as ray_evaluate
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.ray_edge import train as ray_train
    from ntf_ray.scan.spec import ScanSpec, format_summary
    from ntf_ray.synth import make_synthetic
    from ntf_ray.training.config import load_config
    from ntf_ray.training.datasets import manifest_table, write_manifest

    start = time.perf_counter()
    work = Path(work).absolute()
    data, run, report = work / "data", work / "run", work / "report"
    print(f"[1/4] making {2 * n} synthetic images in {data} (test data, not a benchmark)", flush=True)
    records = make_synthetic(data, n_real=n, n_fake=n, size=64, seed=seed)
    manifest = str(data / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    cfg = load_config(SMOKE_CONFIG, list(overrides or []))
    print(f"[2/4] training both NTF stages on local Ray ({cfg.variant}, {cfg.backbone} backbone, {cfg.epochs_stage1}+"
          f"{cfg.epochs_stage2} epochs, 2 CPU workers)", flush=True)
    runtime.init_local_ray()
    ray_train.train("both", cfg, ray_train.RunSpec(manifest=manifest, output=str(run), num_workers=2,
                                                   run_name=ray_train.new_run_name()))
    detector = str(run / ray_train.DETECTOR)
    print("[3/4] evaluating the detector on the held-out test split (ntf-ray evaluate):", flush=True)
    metrics = ray_evaluate.evaluate(ray_evaluate.EvaluateSpec(model=detector, manifest=manifest, output=str(report),
                                                              embeddings=min(300, n)))
    print(ray_evaluate.format_summary(metrics))
    print(f"report: {report / 'report.md'}")
    print(f"[4/4] scanning {data} with Ray Data into a score table", flush=True)
    result = ray_scan.scan(ScanSpec(model=detector, output=str(work / "scores"), input=str(data),
                                             pattern="*.png"))
    print(format_summary(result.summary))
    print(f"detector at {detector}; score more files with: ntf-ray score --model {detector} FILE...")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
