"""Scan at GPU speed: three ways to score the same JPEGs with the same detector, plus decoder parity.

(a) direct: one process reads a batch of files, decodes it with nvJPEG in one call, centre-crops,
    runs the model (bf16, channels_last), one batch after another;
(b) textbook Ray: ``read_binary_files`` -> PIL decode + crop in Ray Data tasks -> one GPU actor;
(c) ntf-ray: ``ntf_ray.ray_edge.scan.scan`` (detector actors decoding on the GPU, the real score table written),
    once per actor layout asked for (``--layouts 1x1s2 2x0.5s1``: actors x GPU share, s: streams per
    actor, b: batch size).

Before them, the ceilings each stage has on this card (batched nvJPEG decode through torchvision;
nvImageCodec's hardware and CUDA decoders, whole images and the centre crop alone, when the
``nvidia-nvimgcodec`` package is importable; the network alone), and what a detector actor's
start-up spends its time on.

Prints images/s overall (start to last row) and in steady state (from the first scored batch),
the time to the first scored batch, and, before that, the decoder parity: scores of the ``pil``
and ``nvjpeg`` paths on the same files, for a detector trained here (tiny backbone, synthetic
JPEGs) and for the benchmark's ResNet-50, with the largest difference and the decisions that flip.

On the GPU machine (Ray from the device bundle, the project on PYTHONPATH):

    python bench/scan_gpu_bench.py                       # 32,768 JPEGs of 1024x768, ResNet-50
    python bench/scan_gpu_bench.py --device cpu --n 256 --width 256 --height 192 --backbone tiny \
        --unique 64 --parity-images 200 --layouts 1x0s1  # a quick check of the script on a CPU
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------- data


def _one_jpeg(args: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    i, width, height = args
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))
    img = (img // 2 + rng.integers(0, 64, img.shape, dtype=np.uint8)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)  # 4:2:0, the common case
    return buf.getvalue()


def make_jpegs(folder: Path, n: int, width: int, height: int, unique: int) -> list[Path]:
    """``unique`` different JPEGs (in parallel), written round-robin to ``n`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool() as pool:
        blobs = pool.map(_one_jpeg, [(i, width, height) for i in range(min(unique, n))])
    paths = []
    for i in range(n):
        p = folder / f"{i // 4096:03d}" / f"img_{i:06d}.jpg"
        if i % 4096 == 0:
            p.parent.mkdir()
        p.write_bytes(blobs[i % len(blobs)])
        paths.append(p)
    return paths


# ---------------------------------------------------------------- (a) direct loop


def direct(paths: list[Path], model_uri: str, device: str, batch: int) -> dict:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from ntf_ray.detector.artifact import load_artifact
    from ntf_ray.images.transforms import eval_transform

    art = load_artifact(model_uri)
    model = art.detector.to(device).eval()
    cuda = device == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    first = None
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths[i : i + batch]]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            x = torch.stack([eval_transform(im, art.input_size) for im in images])
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                scores = torch.sigmoid(model(x).float()).cpu()
            if first is None:
                first = (time.perf_counter(), len(scores))
    total = time.perf_counter() - start
    return _rates(len(paths), total, first[0] - start, (len(paths) - first[1]) / max(start + total - first[0], 1e-9))


# ---------------------------------------------------------------- (b) textbook Ray


class _TextbookActor:
    def __init__(self, model_uri: str, device: str):
        import torch

        from ntf_ray.detector.artifact import load_artifact

        self.torch = torch
        self.device = device
        self.model = load_artifact(model_uri).detector.to(device).eval()

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            x = torch.from_numpy(batch["crop"]).to(self.device)
            scores = torch.sigmoid(self.model(x).float()).cpu().numpy()
        return {"score": scores, "t": np.full(len(scores), time.time())}


def _pil_crop(batch: dict, size: int) -> dict:
    from ntf_ray.images.decode import decode
    from ntf_ray.images.transforms import eval_transform, to_tensor

    crops = [eval_transform(to_tensor(decode(b).image), size).numpy() for b in batch["bytes"]]
    return {"crop": np.stack(crops)}


def textbook(folder: Path, model_uri: str, device: str, batch: int, input_size: int) -> dict:
    import ray

    start = time.perf_counter()
    t0 = time.time()
    ds = ray.data.read_binary_files(str(folder))
    ds = ds.map_batches(_pil_crop, fn_kwargs={"size": input_size}, batch_size=batch)
    ds = ds.map_batches(_TextbookActor, fn_constructor_kwargs={"model_uri": model_uri, "device": device},
                        batch_size=batch, compute=ray.data.ActorPoolStrategy(size=1),
                        num_gpus=1 if device == "cuda" else 0, num_cpus=0.5)
    stamps = np.concatenate([b["t"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    total = time.perf_counter() - start
    return _stamped(len(stamps), total, t0, stamps)


# ---------------------------------------------------------------- (c) ntf-ray scan


def _has_nvimgcodec() -> bool:
    from ntf_ray.images.gpu_decode import DecoderUnavailable, nvimgcodec_module

    try:
        nvimgcodec_module()
        return True
    except DecoderUnavailable as exc:
        print(f"nvimgcodec: {exc}", flush=True)
        return False


def _wait_for_free_cluster(limit_s: float = 60.0) -> None:
    import ray

    total = ray.cluster_resources()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= total[k] for k in ("CPU", "GPU") if k in total):
            return
        time.sleep(0.2)


def project_scan(folder: Path, out: Path, model_uri: str, batch: int, actors: int, gpu_share: float,
                 streams: int, decoder: str = "nvjpeg") -> dict:
    import pyarrow.dataset as pads

    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.scan.spec import ScanSpec

    start = time.perf_counter()
    t0 = time.time()
    result = ray_scan.scan(ScanSpec(model=model_uri, output=str(out), input=str(folder), batch_size=batch,
                                             max_actors=actors, gpus_per_actor=gpu_share, streams=streams,
                                             decoder=decoder))
    total = time.perf_counter() - start
    table = pads.dataset(result.run_dir, format="parquet").to_table(columns=["scanned_at", "error", "decoder"])
    errors = table.num_rows - table.column("error").null_count
    if errors:
        raise SystemExit(f"the scan wrote {errors} error rows for good JPEGs")
    decoders = {d: table.column("decoder").to_pylist().count(d) for d in ("pil", "nvjpeg", "nvimgcodec")}
    stamps = np.array([s.timestamp() for s in table.column("scanned_at").to_pylist()])
    out_row = _stamped(table.num_rows, total, t0, stamps)
    out_row["decoders"] = decoders
    return out_row


# ---------------------------------------------------------------- ceilings and start-up


def _timed(fn, reps: int, device: str) -> float:
    """Seconds per call of ``fn`` (after one warm-up call)."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def ceilings(blobs: list[bytes], model_uri: str, device: str, batch: int, size: int) -> None:
    """Images/s of each stage alone: decode (torchvision nvJPEG; nvImageCodec if importable), crop, network."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from ntf_ray.detector.scorer import Scorer
    from ntf_ray.images.gpu_decode import as_uint8

    chunk = [blobs[i % len(blobs)] for i in range(batch)]
    tensors = [as_uint8(b) for b in chunk]
    sec = _timed(lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device), 5, device)
    print(f"ceiling: torchvision decode_jpeg, batches of {batch}: {batch / sec:,.0f} images/s", flush=True)
    frames = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    scorer = Scorer.from_artifact(model_uri, device=device, batch_size=batch, decoder="nvjpeg")
    sec = _timed(lambda: scorer.crop_batch(frames, "JPEG", "nvjpeg"), 10, device)
    print(f"ceiling: batched centre crop: {batch / sec:,.0f} images/s", flush=True)
    crops = scorer.crop_batch(frames, "JPEG", "nvjpeg")[1]
    sec = _timed(lambda: scorer.score_tensors(crops), 10, device)
    print(f"ceiling: network ({scorer.precision}, batch {batch}): {batch / sec:,.0f} images/s", flush=True)
    sec = _timed(lambda: scorer.score_bytes(chunk), 5, device)
    print(f"ceiling: Scorer.score_bytes (screen, decode, crop, network; one stream): {batch / sec:,.0f} images/s",
          flush=True)


def nvimgcodec_ceilings(blobs: list[bytes], batch: int) -> None:
    """nvImageCodec's decoders on one batch: images/s, failures, and pixels against Pillow's (the
    core decoder, the reference) beside torchvision's nvJPEG against Pillow's."""
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from ntf_ray.images.gpu_decode import as_uint8, nvimgcodec_module

    nvimgcodec = nvimgcodec_module()
    chunk = [blobs[i % len(blobs)] for i in range(batch)]
    reference = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                 for b in chunk[:32]]

    def against_pil(images) -> str:
        diffs = [(im.cpu().int() - ref.int()).abs().float() for im, ref in zip(images, reference) if im is not None]
        if not diffs:
            return "nothing decoded"
        return (f"|pixel - Pillow's| mean {np.mean([d.mean().item() for d in diffs]):.3f}, "
                f"max {max(d.max().item() for d in diffs):.0f}")

    frames = decode_jpeg([as_uint8(b) for b in chunk], mode=ImageReadMode.RGB, device="cuda")
    print(f"torchvision nvJPEG: {against_pil(frames)}", flush=True)
    stream = torch.cuda.current_stream().cuda_stream
    kinds = nvimgcodec.BackendKind
    for name, backends, options in (("hardware engine", [kinds.HW_GPU_ONLY], ""),
                                    ("hardware engine, fancy upsampling", [kinds.HW_GPU_ONLY], ":fancy_upsampling=1"),
                                    ("hybrid CPU/GPU", [kinds.HYBRID_CPU_GPU], ""),
                                    ("hardware engine + hybrid (the product's)", [kinds.HW_GPU_ONLY, kinds.HYBRID_CPU_GPU], "")):
        try:
            decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(k) for k in backends], options=options)
            streams = [nvimgcodec.CodeStream(b) for b in chunk]
            out = decoder.decode(streams, cuda_stream=stream)
            sec = _timed(lambda: decoder.decode(streams, cuda_stream=stream), 5, "cuda")
            images = [None if o is None else torch.as_tensor(o, device="cuda").permute(2, 0, 1) for o in out[:32]]
            print(f"nvimgcodec {name}: {batch / sec:,.0f} images/s, {sum(o is None for o in out)} of {batch} failed; "
                  f"{against_pil(images)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a backend this card or build lacks: say so, go on
            print(f"nvimgcodec {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def actor_startup(model_uri: str, device: str, batch: int) -> None:
    """How long a detector actor takes to be ready, from its creation, and on what."""
    import ray

    from ntf_ray.ray_edge.scan.actor import DetectorActor

    t = time.perf_counter()
    actor = ray.remote(num_gpus=1 if device == "cuda" else 0, num_cpus=1)(DetectorActor).remote(
        model_uri, endpoint=None, threshold=None, batch_size=batch, device=device, decoder="auto")
    parts = ray.get(actor.startup_seconds.remote())
    total = time.perf_counter() - t
    inside = sum(parts.values())
    print(f"detector actor start-up: {total:.1f} s from creation to ready; worker process start {total - inside:.1f} s, "
          + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()), flush=True)
    ray.kill(actor)


# ---------------------------------------------------------------- figures


def _rates(n: int, total: float, to_first: float, steady: float) -> dict:
    return {"n": n, "overall": n / total, "steady": steady, "first_batch_s": to_first, "seconds": total}


def _stamped(n: int, total: float, t0: float, stamps: np.ndarray) -> dict:
    """Rates from per-row wall-clock stamps (one stamp per scored block)."""
    first, last = stamps.min(), stamps.max()
    after_first = int((stamps > first).sum())
    return _rates(n, total, first - t0, after_first / max(last - first, 1e-9))


def parity(name: str, scorer_args: dict, blobs: list[bytes], device: str, decoder: str = "nvjpeg") -> None:
    """Scores of ``decoder``'s path against the core decoder's, and the tolerance docs/operations.md states for it."""
    from ntf_ray.detector.scorer import PARITY_TOLERANCE, Scorer
    from ntf_ray.detector.scorer import parity as compare

    pil = Scorer.from_artifact(**scorer_args, device=device, decoder="pil")
    gpu = Scorer.from_artifact(**scorer_args, device=device, decoder=decoder)
    a, b = pil.score_bytes(blobs), gpu.score_bytes(blobs)
    found = compare(a, b, pil.threshold)
    scores = np.clip([r.score for r in a if r.score is not None], 1e-7, 1 - 1e-7)
    logits = np.log(scores) - np.log1p(-scores)
    max_diff, share = PARITY_TOLERANCE[decoder]
    verdict = "within" if found.within(max_diff, share) else "OUTSIDE"
    print(f"parity {name}: {found.images} images ({sum(r.decoder == decoder for r in b)} decoded by {decoder}; "
          f"logit std {logits.std():.2f}), |score pil - score {decoder}| max {found.max_diff:.2e}, mean "
          f"{found.mean_diff:.2e}; decisions flipped at threshold {pil.threshold:g}: {found.flipped}; error rows "
          f"identical: {found.same_errors}; {verdict} the tolerance (max {max_diff}, {share:.1%} flipped)", flush=True)


def trained_detector(root: Path, device: str, n: int) -> tuple[str, list[bytes]]:
    """A tiny detector trained here on synthetic JPEGs (smoke config), and its held-out JPEGs."""
    import dataclasses

    from ntf_ray.synth import make_synthetic
    from ntf_ray.training.config import load_config
    from ntf_ray.training.datasets import manifest_table, read_manifest, select, write_manifest
    from ntf_ray.training.recipe import train_local

    records = make_synthetic(root / "synth", n_real=n, n_fake=n, size=64, seed=3, image_format="jpeg",
                             jpeg_quality=90)
    write_manifest(manifest_table(records), str(root / "synth" / "manifest.parquet"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "ntf_ray" / "training" / "configs" / "smoke.yaml")
    cfg = dataclasses.replace(cfg, device=device, num_workers=4)
    art = train_local(str(root / "synth" / "manifest.parquet"), str(root / "trained"), cfg)
    print(f"trained detector (tiny, smoke config, {2 * n} synthetic JPEGs): held-out AP "
          f"{art.metrics['table'][-1]['ap']:.3f}", flush=True)
    uris = select(read_manifest(str(root / "synth" / "manifest.parquet")), split="test").column("uri").to_pylist()
    return str(root / "trained" / "detector"), [Path(u).read_bytes() for u in uris]


LAYOUT = re.compile(r"(\d+)x([\d.]+)(?:s(\d+))?(?:b(\d+))?(?:-(nvjpeg|nvimgcodec))?")


def _workdir(asked: str | None) -> str | None:
    """Where the JPEGs go: memory-backed /dev/shm when it has room (the scan should not wait on a disk)."""
    if asked:
        return asked
    try:
        free = os.statvfs("/dev/shm")
        return "/dev/shm" if free.f_bavail * free.f_frsize > 40 * 1024**3 else None
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32_768, help="JPEGs to score (default 32768)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--unique", type=int, default=1024, help="different images among them (default 1024)")
    p.add_argument("--backbone", default="resnet50", help="detector backbone, random weights (default resnet50)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--layouts", nargs="+",
                   default=["1x1s1", "1x1s2", "1x1s3", "2x0.5s2", "4x0.25s1", "4x0.25s2", "1x1s2b512"],
                   help="(c) actor layouts, ACTORSxGPU_SHARE[sSTREAMS][bBATCH] (default: a sweep of seven)")
    p.add_argument("--parity-images", type=int, default=1000, help="synthetic held-out JPEGs for parity (>= 1000)")
    p.add_argument("--skip", nargs="*", default=["textbook"],
                   choices=("direct", "textbook", "parity", "ceilings", "startup", "nvimgcodec"),
                   help="sections to leave out (default: textbook, which takes a minute and changes nothing here)")
    p.add_argument("--workdir", help="where the JPEGs are written (default: /dev/shm when it has 40 GiB free)")
    args = p.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("ntf_ray").addHandler(handler)  # the scan's own timings (listing, actors ready)
    logging.getLogger("ntf_ray").setLevel(logging.INFO)
    for layout in args.layouts:
        if not LAYOUT.fullmatch(layout):
            p.error(f"layout {layout!r}: write ACTORSxGPU_SHARE[sSTREAMS][bBATCH], e.g. 2x0.5s2")

    import ray
    import torch
    import torchvision

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector

    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{time.strftime('%Y-%m-%d')} on {card}; {os.cpu_count()} CPU cores; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, ray {ray.__version__}, python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(dir=_workdir(args.workdir)) as tmp:
        tmp = Path(tmp)
        if "parity" not in args.skip:
            # The split gives about 30% of the images to the test split.
            model, held_out = trained_detector(tmp / "parity", args.device, max(200, int(args.parity_images / 0.6)))
            parity("trained tiny detector, synthetic JPEGs", {"uri": model}, held_out, args.device)
            if args.device == "cuda" and _has_nvimgcodec():
                parity("trained tiny detector, synthetic JPEGs", {"uri": model}, held_out, args.device, "nvimgcodec")
        t = time.perf_counter()
        paths = make_jpegs(tmp / "jpegs", args.n, args.width, args.height, args.unique)
        print(f"{len(paths)} JPEGs of {args.width}x{args.height} ({args.unique} different), "
              f"{sum(q.stat().st_size for q in paths[: args.unique]) / min(args.unique, len(paths)) / 1024:.0f} "
              f"KiB each, made in {time.perf_counter() - t:.0f} s (in {tmp.parent})", flush=True)
        torch.manual_seed(0)
        model = str(tmp / "detector")
        save_artifact(model, Detector.build(args.backbone), input_size=224)
        blobs = [q.read_bytes() for q in paths[: args.unique]]
        if "ceilings" not in args.skip:
            try:
                ceilings(blobs, model, args.device, args.batch, 224)
            except Exception as exc:  # noqa: BLE001 - the scans below still say what they say
                print(f"ceilings: {type(exc).__name__}: {exc}", flush=True)
        if "parity" not in args.skip:
            parity(f"{args.backbone} (random weights), benchmark JPEGs", {"uri": model}, blobs, args.device)

        rows = {}
        if "direct" not in args.skip:
            rows["(a) direct loop, nvJPEG"] = direct(paths, model, args.device, args.batch)
            _print("(a) direct loop, nvJPEG", rows["(a) direct loop, nvJPEG"])
        cores = os.cpu_count() or 2
        ray.init(address="local", num_cpus=max(4, cores), num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, object_store_memory=8 * 1024**3 if args.device == "cuda" else None)
        if "startup" not in args.skip:
            actor_startup(model, args.device, args.batch)
        if "textbook" not in args.skip:
            rows["(b) textbook Ray (PIL tasks -> 1 actor)"] = textbook(tmp / "jpegs", model, args.device, args.batch, 224)
            _print("(b) textbook Ray (PIL tasks -> 1 actor)", rows["(b) textbook Ray (PIL tasks -> 1 actor)"])
        for layout in args.layouts:
            actors, share, streams, batch, decoder = LAYOUT.fullmatch(layout).groups()
            streams, batch, decoder = int(streams or 1), int(batch or args.batch), decoder or "nvjpeg"
            name = f"(c) ntf-ray scan, {actors} actor(s) x {share} GPU, {streams} stream(s), batch {batch}, {decoder}"
            _wait_for_free_cluster()  # the last scan's actors may still hold the GPU
            try:
                rows[name] = project_scan(tmp / "jpegs", tmp / f"scores-{layout}", model, batch, int(actors),
                                          float(share) if args.device == "cuda" else 0.0, streams, decoder)
            except Exception as exc:  # noqa: BLE001 - one layout failing must not cost the others' figures
                print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            _print(name, rows[name])
        ray.shutdown()
    base = rows.get("(a) direct loop, nvJPEG")
    print("\n| path | images/s overall | steady state | first batch (s) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['overall']:,.0f} | {r['steady']:,.0f} | {r['first_batch_s']:.1f} |")
    if base and base["steady"] > 0:  # a run of a single batch has no steady state
        for name, r in rows.items():
            if name.startswith("(c)"):
                print(f"ratio {name} / (a), steady state = {r['steady'] / base['steady']:.2f}")
    if args.device == "cuda" and "nvimgcodec" not in args.skip:  # last: an optional native library may crash
        if _has_nvimgcodec():
            nvimgcodec_ceilings(blobs, args.batch)


def _print(name: str, r: dict) -> None:
    extra = f", decoders {r['decoders']}" if "decoders" in r else ""
    print(f"{name}: {r['overall']:,.0f} images/s overall ({r['seconds']:.1f} s), steady state {r['steady']:,.0f}, "
          f"first scored batch after {r['first_batch_s']:.1f} s{extra}", flush=True)


if __name__ == "__main__":
    main()
