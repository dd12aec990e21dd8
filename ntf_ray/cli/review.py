"""The commands that judge a detector and show its work: ``evaluate`` (the paper's metrics),
``calibrate`` (a threshold for a false positive rate), ``explain`` (Grad-CAM++ maps) and
``report`` (a page of a scan run for moderators)."""

from __future__ import annotations

import argparse
import json
import sys

from ntf_ray.cli.arguments import (
    actors,
    add_max_bytes_argument,
    byte_size,
    count,
    gpus,
    positive_count,
    rate,
    seed,
    spec_from_args,
    threshold,
)


def add_evaluation_actor_arguments(s: argparse.ArgumentParser) -> None:
    """The detector actors of evaluate and calibrate (the scan's ``ActorPool``, one actor per GPU)."""
    s.add_argument("--batch-size", type=positive_count, default=64, help="images per detector call (default 64)")
    s.add_argument("--max-actors", type=actors, help="most detector actors (default: one per GPU, or 2 on CPU)")
    s.add_argument("--gpus-per-actor", type=gpus, help="GPUs per detector actor (default: 1 when the cluster has GPUs)")


def evaluate_spec(args: argparse.Namespace):
    """The ``EvaluateSpec`` of a parsed evaluate or calibrate command line (options by field name)."""
    from ntf_ray.ray_edge.evaluate import EvaluateSpec

    return spec_from_args(EvaluateSpec, args, split=None if args.split == "all" else args.split,
                          endpoint=args.storage_options.endpoint_url)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ntf_ray import storage
    from ntf_ray.ray_edge import evaluate as ray_evaluate
    from ntf_ray.ray_edge import runtime

    spec = evaluate_spec(args)
    runtime.init_local_ray()
    metrics = ray_evaluate.evaluate(spec, command=storage.redact(" ".join(["ntf-ray", *_without_endpoint(args.argv)])))
    print(ray_evaluate.format_summary(metrics))
    print(f"report: {storage.join(args.output, 'report.md')}", flush=True)
    return 0


def _without_endpoint(argv: list[str]) -> list[str]:
    """The command line as a report records it: without the S3 endpoint, which may name internal hosts."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--s3-endpoint":
            skip = True
        elif not item.startswith("--s3-endpoint="):
            out.append(item)
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ntf_ray.ray_edge import evaluate as ray_evaluate
    from ntf_ray.ray_edge import runtime

    spec = evaluate_spec(args)
    reals = ray_evaluate.calibration_reals(spec, args.target_fpr)  # a split too small is refused before Ray starts
    runtime.init_local_ray()
    cal, art = ray_evaluate.calibrate_model(spec, args.target_fpr, reals)
    print(f"threshold {cal.threshold:.6g} (was {cal.previous_threshold:g}): {cal.false_positives} of {cal.reals} real "
          f"images of split {cal.split or 'all'} flagged, FPR {cal.fpr:.2%} (95% upper bound {cal.fpr_upper95:.2%}; "
          f"target {cal.target_fpr:.2%})")
    print(f"calibrated detector {art.model_id} written to {args.output} (a new model id: scans and moderate runs "
          f"with it are its own, apart from {cal.previous_model_id}'s)", flush=True)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ntf_ray.detector.explain import explain
    from ntf_ray.nn.dist import resolve_device

    results = explain(args.model, args.inputs, args.output, options=args.storage_options,
                      device=str(resolve_device(args.device)), max_bytes=args.max_bytes)
    for r in results:
        print(json.dumps({"uri": r.source, "score": r.score, "heatmap": r.output, "error": r.error}, allow_nan=False), flush=True)
    return 0 if any(r.error is None for r in results) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ntf_ray.scan.review_page import ReportStorageError, build_report

    try:
        result = build_report(args.scores, args.output, run_id=args.run_id, top=args.top, model=args.model,
                              max_bytes=args.max_bytes, options=args.storage_options)
    except ReportStorageError as exc:  # an unreachable endpoint, a file where the folder goes: one line
        print(f"ntf-ray report: error: {exc}", file=sys.stderr)
        return 1
    if args.card and args.model:
        from ntf_ray.detector.artifact import load_artifact
        from ntf_ray.detector.model_card import render

        print(render(load_artifact(args.model, options=args.storage_options).metadata()))
    print(f"report of run {result.run_id}: {result.shown} images ({result.changed} changed since the scan, "
          f"{result.missing} no longer there, {result.too_large} larger than {result.max_bytes} bytes, "
          f"{result.unreadable} unreadable now; no picture of those): {result.page}", flush=True)
    return 0


def add_evaluate(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("evaluate", parents=endpoint,
                       help="the paper's metrics of a detector on a labelled manifest split, with a report",
                       description="Score a manifest split through the scan's Ray Data path (clean and, with --perturb, "
                                   "at every perturbation level), join the labels, and write OUTPUT/report.md, "
                                   "metrics.json, scores.parquet and PNG figures: per generator AP, ACC, FPR, FNR (fake = "
                                   "positive, the artifact's threshold), the image-weighted average and mAP, family "
                                   "averages, robustness curves, PR curves, score histograms and a t-SNE map.")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("--manifest", required=True, help="labelled manifest (.parquet/.csv, local or s3://)")
    s.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="manifest split to evaluate (default test; all: every labelled row)")
    s.add_argument("--output", required=True, help="report folder (local or s3://)")
    s.add_argument("--families", nargs="+", default=[], metavar="FAMILY=GEN,GEN",
                   help="average per generator family, e.g. --families gan=progan,stylegan dm=ddpm,ldm "
                        "(default: the manifest's family column, if any)")
    s.add_argument("--perturb", nargs="+", default=[], metavar="KIND=LEVEL,LEVEL",
                   help="robustness: e.g. --perturb blur=0,1,2,3 jpeg=100,75,50,30 noise=0,0.01,0.02 scale=1,0.5,0.25 "
                        "(blur sigma in px, JPEG quality, noise sigma in [0, 1] units, down-scaling factor); seeded")
    s.add_argument("--embeddings", type=count, default=0, metavar="N",
                   help="t-SNE map of N clean test images' features, coloured by generator and label (default 0: none)")
    s.add_argument("--threshold", type=threshold, help="decision threshold for ACC/FPR/FNR (default: the artifact's)")
    s.add_argument("--seed", type=seed, default=0, help="seed of the noise perturbation and the t-SNE sample (default 0)")
    add_evaluation_actor_arguments(s)
    s.set_defaults(func=cmd_evaluate)


def add_calibrate(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("calibrate", parents=endpoint,
                       help="choose a detector's threshold for a false positive rate on real images",
                       description="Score the real images of a manifest split (the scan's Ray Data path), pick the "
                                   "lowest threshold that flags at most --target-fpr of them, and write the detector "
                                   "with it to OUTPUT: a new artifact (a new model id) whose model.json records the "
                                   "threshold's provenance (split, reals, achieved FPR and its 95%% upper bound, date). "
                                   "Refused when the split has too few reals for the target (about 3/target).")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("--manifest", required=True, help="labelled manifest (.parquet/.csv, local or s3://)")
    s.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                   help="split whose real images set the threshold (default val: not trained on, not the test)")
    s.add_argument("--target-fpr", type=rate, required=True, help="false positive rate to allow, e.g. 0.01")
    s.add_argument("--output", required=True, help="folder for the calibrated artifact (local or s3://)")
    add_evaluation_actor_arguments(s)
    s.set_defaults(func=cmd_calibrate)


def add_explain(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("explain", parents=endpoint,
                       help="Grad-CAM++ maps of where the detector saw the fake traces, as PNG overlays",
                       description="For each image: the centre crop the detector scores, next to a Grad-CAM++ map "
                                   "of its fake logit (target: the encoder's last block) laid over it, written to "
                                   "OUTPUT as NNNN_NAME_HASH_scoreS.png (its place among the inputs, its name, a "
                                   "digest of its uri; the score also in the PNG's description). Needs the grad-cam "
                                   "package: pip install 'ntf-ray[explain]'.")
    s.add_argument("--model", required=True, help="detector artifact folder (local or s3://)")
    s.add_argument("inputs", nargs="+", metavar="PATH_OR_URI", help="image files or s3:// objects")
    s.add_argument("--output", required=True, help="folder for the overlays (local or s3://)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_max_bytes_argument(s, "refuse images larger than this, reading no more than one byte past it (error "
                              "too_large:); devices, FIFOs and sockets are refused (error read:)")
    s.set_defaults(func=cmd_explain)


def add_report(sub, endpoint: list[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("report", parents=endpoint,
                       help="a static HTML page of a scan run for moderators: summary, histogram, top images",
                       description="Write OUTPUT/index.html for a completed run under SCORES: counts, errors by kind, "
                                   "flagged, a score histogram, then the --top images by score with thumbnail, "
                                   "score, uri and size (and a Grad-CAM++ map with --model). Pictures are read from "
                                   "the bucket now, only while each object is still the version scored (its etag) "
                                   "and no larger than --max-bytes, and written beside the page: no credentials or "
                                   "presigned URLs. An object changed, grown or deleted since the scan gets a card "
                                   "that says so and no picture.")
    s.add_argument("--scores", required=True, help="the scan's --output (local or s3://)")
    s.add_argument("--run-id", help="which run (default: the latest completed one)")
    s.add_argument("--top", type=positive_count, default=200, help="images on the contact sheet (default 200)")
    s.add_argument("--model", help="detector artifact: add its Grad-CAM++ map beside each thumbnail")
    s.add_argument("--card", action="store_true", help="also print the --model's model card")
    s.add_argument("--max-bytes", type=byte_size, metavar="SIZE",
                   help="read no object larger than this (default: the scan's --max-bytes, from the run's summary)")
    s.add_argument("--output", required=True, help="report folder (local or s3://)")
    s.set_defaults(func=cmd_report)
