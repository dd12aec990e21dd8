"""Leave-one-generator-out generalisation of every variant on the synthetic families.

For each generator family F (``ntf-ray synth --generators all``: the three upsamplers
and the two full-resolution families), train on the other families' folders only, then
measure AP and ACC on F's test split (the left-out family) and on the training families'
test split (in distribution). Every variant of the paper's comparison (``--variant``)
trains on the same data with the same settings and seeds; stage 1 is shared by the
variants whose stage 1 is the same (ntf, no-scl, linear-probe). The training is the
product's one-process recipe (``ntf_ray.training.recipe``), scoring the product's ``Scorer``.

    python bench/quality.py                      # 5 families x 6 variants x 3 seeds
    python bench/quality.py --seeds 0 --families fingerprint --variants ntf bce

Prints one line per run, then the tables: per variant the mean and spread (standard
deviation over families x seeds) of AP and ACC on the left-out family and in
distribution, and the mean left-out AP per family. Nothing here is tuned on a left-out
family: the settings are the smoke recipe's, at the image size below.

``--headroom`` runs the headroom protocol instead: every variant trains on the five usual
families (``ALL_GENERATORS``) and is tested on each headroom family
(``ntf_ray.synth.headroom``: departures from the reals no usual family takes). In the same
run, per family and seed, an in-family oracle (``bce``, the same recipe, trained on that
family alone) shows the family can be learnt at all. A family has headroom when the
oracle's AP is >= 90 and ``bce``'s transfer AP (trained on the usual families) is <= 80,
both as means over the seeds; a family that fails either is reported and left out of the
margin. Last lines: per variant the mean AP over the families with headroom, and the
margin of the best NTF variant over ``bce``.

    python bench/quality.py --headroom           # every headroom family x (oracle + every variant) x 3 seeds

The families are kept or left out on the same seeds whose APs then enter the margin, as the
protocol asks (each condition checked in the same run); with few seeds that makes the
margin a little optimistic, and every family's row is printed either way.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SMOKE = Path(__file__).resolve().parents[1] / "ntf_ray" / "training" / "configs" / "smoke.yaml"


def _stage1_key(variant) -> tuple:
    return (variant.use_het, variant.use_orth) if variant.stage1 else None


def _trained(name: str, generators: list[str], job: dict, table, stage1_cache: dict):
    """``(detector, cfg)``: variant ``name`` trained on ``generators`` with the job's settings and
    seed, its stage 1 shared through ``stage1_cache`` by the variants whose stage 1 is the same."""
    from ntf_ray.nn.variants import get_variant
    from ntf_ray.training.config import load_config
    from ntf_ray.training.recipe import fit_natural_traces_for, seed_everything, train_stage1, train_stage2

    cfg = load_config(SMOKE, {**job["overrides"], "variant": name, "seed": job["seed"],
                              "train_generators": generators, "num_workers": 0})
    seed_everything(cfg.seed)
    key = _stage1_key(get_variant(name))
    if key is not None and key not in stage1_cache:
        stage1_cache[key] = train_stage1(table, cfg)
    stage1 = copy.deepcopy(stage1_cache[key]) if key is not None else None
    seed_everything(cfg.seed + 1)
    return fit_natural_traces_for(train_stage2(table, stage1, cfg).detector().cpu().eval(), table, cfg), cfg


def run_fold(job: dict) -> list[dict]:
    """Every variant on one (left-out family, seed); returns one result row per variant."""
    import torch

    from ntf_ray.detector.scorer import Scorer
    from ntf_ray.evaluate.metrics import binary_metrics
    from ntf_ray.training.datasets import read_manifest, select

    torch.set_num_threads(1)
    table = read_manifest(job["manifest"])
    train_gens = [g for g in job["families"] if g != job["left_out"]]
    tests = {"left_out": select(table, split="test", generators=[job["left_out"]]),
             "in_dist": select(table, split="test", generators=train_gens)}
    data = {k: ([open(u, "rb").read() for u in t.column("uri").to_pylist()], t.column("label").to_pylist())
            for k, t in tests.items()}
    stage1_cache: dict = {}
    rows = []
    for name in job["variants"]:
        start = time.perf_counter()
        detector, cfg = _trained(name, train_gens, job, table, stage1_cache)
        scorer = Scorer(detector, input_size=cfg.crop_size, threshold=cfg.threshold, device="cpu")
        row = {"variant": name, "left_out": job["left_out"], "seed": job["seed"],
               "seconds": round(time.perf_counter() - start, 1)}
        for part, (blobs, labels) in data.items():
            scores = [r.score for r in scorer.score_bytes(blobs)]
            m = binary_metrics(labels, scores, threshold=cfg.threshold)
            row[f"{part}_ap"], row[f"{part}_acc"] = m.ap, m.acc
        print(f"{name:<13} left out {job['left_out']:<14} seed {job['seed']}: left-out AP {row['left_out_ap']:.3f} "
              f"ACC {row['left_out_acc']:.3f} | in-dist AP {row['in_dist_ap']:.3f} ACC {row['in_dist_acc']:.3f} "
              f"({row['seconds']} s)", flush=True)
        rows.append(row)
    return rows


def run_headroom(job: dict) -> list[dict]:
    """One seed of the headroom protocol: every variant trained on the usual families, the
    oracle on each headroom family; AP on each headroom family's test split."""
    import torch

    from ntf_ray.detector.scorer import Scorer
    from ntf_ray.evaluate.metrics import binary_metrics
    from ntf_ray.training.datasets import read_manifest, select

    torch.set_num_threads(1)
    table = read_manifest(job["manifest"])
    tests = {f: select(table, split="test", generators=[f]) for f in job["headroom"]}
    data = {f: ([open(u, "rb").read() for u in t.column("uri").to_pylist()], t.column("label").to_pylist())
            for f, t in tests.items()}
    rows = []

    def score(detector, cfg, families) -> dict[str, float]:
        scorer = Scorer(detector, input_size=cfg.crop_size, threshold=cfg.threshold, device="cpu")
        out = {}
        for f in families:
            blobs, labels = data[f]
            out[f] = binary_metrics(labels, [r.score for r in scorer.score_bytes(blobs)], threshold=cfg.threshold).ap
        return out

    for f in job["headroom"]:  # the oracle: the same recipe, trained on the family itself
        start = time.perf_counter()
        detector, cfg = _trained("bce", [f], job, table, {})
        ap = score(detector, cfg, [f])[f]
        rows.append({"variant": "oracle", "family": f, "seed": job["seed"], "ap": ap})
        print(f"oracle        on {f:<10} seed {job['seed']}: AP {ap:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    cache: dict = {}
    for name in job["variants"]:
        start = time.perf_counter()
        detector, cfg = _trained(name, job["usual"], job, table, cache)
        aps = score(detector, cfg, job["headroom"])
        for f, ap in aps.items():
            rows.append({"variant": name, "family": f, "seed": job["seed"], "ap": ap})
        print(f"{name:<13} seed {job['seed']}: " + ", ".join(f"{f} AP {ap:.3f}" for f, ap in aps.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def summarise_headroom(rows: list[dict], variants: list[str], families: list[str]) -> str:
    def aps(v, f):
        return [x["ap"] for x in rows if x["variant"] == v and x["family"] == f]

    def cell(v, f):
        a = aps(v, f)
        return f"{100 * np.mean(a):5.1f} ± {100 * np.std(a):4.1f}"

    if "bce" not in variants:
        raise SystemExit("the headroom protocol needs bce among --variants: its transfer AP decides the families")
    kept = [f for f in families if np.mean(aps("oracle", f)) >= 0.90 and np.mean(aps("bce", f)) <= 0.80]
    lines = ["", "AP per headroom family, mean ± std over seeds (oracle: bce trained on the family itself; "
             "every other row: trained on the usual families):", "",
             "| variant | " + " | ".join(families) + " | mean over families with headroom |",
             "|---|" + "---|" * (len(families) + 1)]
    for v in ["oracle", *variants]:
        mean = f"{100 * np.mean([np.mean(aps(v, f)) for f in kept]):5.1f}" if kept else "-"
        lines.append(f"| {v} | " + " | ".join(cell(v, f) for f in families) + f" | {mean} |")
    lines.append("")
    for f in families:
        o, b = 100 * np.mean(aps("oracle", f)), 100 * np.mean(aps("bce", f))
        verdict = "headroom" if f in kept else "left out: " + " and ".join(
            x for x, bad in (("oracle < 90", o < 90), ("bce transfer > 80", b > 80)) if bad)
        lines.append(f"family {f}: oracle {o:.1f}, bce transfer {b:.1f}: {verdict}")
    ntf_like = [v for v in variants if v != "bce"]  # every other variant learns NTF's stage 1
    if kept and "bce" in variants and ntf_like:
        means = {v: 100 * np.mean([np.mean(aps(v, f)) for f in kept]) for v in ntf_like}
        best = max(means, key=means.get)
        bce = 100 * np.mean([np.mean(aps("bce", f)) for f in kept])
        lines.append(f"headroom margin: best NTF variant {best} {means[best]:.1f} AP against bce {bce:.1f}: "
                     f"{means[best] - bce:+.1f} AP over {len(kept)} families")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    return f"{100 * np.mean(values):5.1f} ± {100 * np.std(values):4.1f}"


def summarise(rows: list[dict], variants: list[str], families: list[str]) -> str:
    lines = ["", "| variant | left-out AP | left-out ACC | in-dist AP | in-dist ACC | runs |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        r = [x for x in rows if x["variant"] == v]
        lines.append(f"| {v} | {_fmt([x['left_out_ap'] for x in r])} | {_fmt([x['left_out_acc'] for x in r])} | "
                     f"{_fmt([x['in_dist_ap'] for x in r])} | {_fmt([x['in_dist_acc'] for x in r])} | {len(r)} |")
    lines += ["", "Left-out AP per family (mean over seeds, percent):", "",
              "| variant | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for v in variants:
        cells = [f"{100 * np.mean([x['left_out_ap'] for x in rows if x['variant'] == v and x['left_out'] == f]):.1f}"
                 for f in families]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from ntf_ray.nn.variants import VARIANTS
    from ntf_ray.synth import ALL_GENERATORS, HEADROOM_GENERATORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="real and fake images per family folder (default 300)")
    p.add_argument("--size", type=int, default=48, help="image side in px (default 48)")
    p.add_argument("--crop", type=int, default=32, help="classifier crop (default 32; SCL crop = crop / 2)")
    p.add_argument("--epochs-stage1", type=int, default=2)
    p.add_argument("--epochs-stage2", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--families", nargs="+", default=list(ALL_GENERATORS), help="left-out families to run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--data-seed", type=int, default=11)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another training config field for every run (e.g. --set lr=0.05)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: 2)")
    p.add_argument("--headroom", nargs="*", default=None, metavar="FAMILY",
                   help="the headroom protocol instead (see module); families (default: every headroom family)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.headroom is not None:
        headroom(args, args.headroom or list(HEADROOM_GENERATORS))
        return

    with tempfile.TemporaryDirectory() as tmp:
        manifest, overrides = _data(args, list(ALL_GENERATORS), Path(tmp))
        jobs = [{"manifest": manifest, "families": list(ALL_GENERATORS), "left_out": f, "seed": s,
                 "variants": args.variants, "overrides": overrides} for f in args.families for s in args.seeds]
        print(f"quality: {len(jobs)} folds x {len(args.variants)} variants; {args.n} real + {args.n} fake per family, "
              f"{args.size} px, crop {args.crop}, {args.epochs_stage1}+{args.epochs_stage2} epochs, tiny backbone, "
              f"settings {' '.join(args.set) or 'smoke.yaml'}, "
              f"{platform.machine()} {os.cpu_count()} cores, {args.jobs} processes", flush=True)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = [r for part in pool.map(run_fold, jobs) for r in part]
    print(summarise(rows, args.variants, args.families))
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s")


def _data(args: argparse.Namespace, generators: list[str], tmp: Path) -> tuple[str, dict]:
    """Both protocols' data (``args.n`` real + fake per family) and training settings."""
    from ntf_ray.synth import make_synthetic
    from ntf_ray.training.datasets import manifest_table, write_manifest

    records = make_synthetic(tmp / "data", n_real=args.n * len(generators), n_fake=args.n * len(generators),
                             size=args.size, seed=args.data_seed, generators=generators)
    manifest = str(tmp / "data" / "manifest.parquet")
    write_manifest(manifest_table(records), manifest)
    overrides = {"crop_size": args.crop, "scl_crop_size": args.crop // 2, "epochs_stage1": args.epochs_stage1,
                 "epochs_stage2": args.epochs_stage2, **dict(item.split("=", 1) for item in args.set)}
    return manifest, overrides


def headroom(args: argparse.Namespace, families: list[str]) -> None:
    from ntf_ray.synth import ALL_GENERATORS

    if "bce" not in args.variants:
        raise SystemExit("the headroom protocol needs bce among --variants: its transfer AP decides the families")
    gens = list(ALL_GENERATORS) + families
    with tempfile.TemporaryDirectory() as tmp:
        manifest, overrides = _data(args, gens, Path(tmp))
        jobs = [{"manifest": manifest, "usual": list(ALL_GENERATORS), "headroom": families, "seed": s,
                 "variants": args.variants, "overrides": overrides} for s in args.seeds]
        print(f"quality --headroom: families {', '.join(families)}; {len(args.seeds)} seeds x (oracle per family + "
              f"{len(args.variants)} variants on {', '.join(ALL_GENERATORS)}); {args.n} real + {args.n} fake per "
              f"family, {args.size} px, crop {args.crop}, {args.epochs_stage1}+{args.epochs_stage2} epochs, tiny "
              f"backbone, settings {' '.join(args.set) or 'smoke.yaml'}, {platform.machine()} {os.cpu_count()} cores, "
              f"{args.jobs} processes", flush=True)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = [r for part in pool.map(run_headroom, jobs) for r in part]
    print(summarise_headroom(rows, args.variants, families))
    print(f"\n{len(rows)} results in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
