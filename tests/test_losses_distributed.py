"""Distributed parity of the gathered losses (``gather=True``) on 2 gloo CPU processes.

method.md: "Run with W workers of batch B must give the same loss, and the same gradient
up to DDP's averaging, as one worker with batch W*B." Each case splits a fixed global
batch between two ranks; the features come from a tiny linear layer with the same weights
on both ranks. Every rank computes the loss with ``gather=True``, backpropagates,
all-reduces the parameter gradients and divides by the world size (what DDP does). The
parent compares each rank's loss (and components) and the averaged gradient with one
process computing the loss with ``gather=False`` on the concatenated batch (rank 0's
samples, then rank 1's; z1 / z2 each concatenated), and that value with the float64
reference.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ntf_ray.nn import losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_reference as ref  # noqa: E402

pytestmark = pytest.mark.timeout(120)

WORLD = 2
D_IN, C = 6, 5
TOL = dict(rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ model / losses --


def _features(params, x, prefix="w"):
    return x @ params[prefix] + params[prefix + "_b"]


def _forward(kind: str, params: dict, inp: dict, kwargs: dict, gather: bool) -> dict:
    """Loss dict for one batch; every feature is a function of ``params``."""
    if kind in ("nt_xent", "hom_loss"):
        z1, z2 = _features(params, inp["x1"]), _features(params, inp["x2"])
        fn = losses.nt_xent if kind == "nt_xent" else losses.hom_loss
        return {"loss": fn(z1, z2, gather=gather, **kwargs)}
    if kind == "trace_loss":
        x1, x2 = inp["x1"], inp["x2"]
        return losses.trace_loss(
            _features(params, x1, "hom"),
            _features(params, x2, "hom"),
            _features(params, x1, "het"),
            _features(params, x2, "het"),
            gather=gather,
            **kwargs,
        )
    if kind == "soft_supcon":
        z = _features(params, inp["x"])
        return {"loss": losses.soft_supcon(z, inp["labels"], inp["hom"], gather=gather, **kwargs)}
    if kind == "detection_loss":
        z = _features(params, inp["x"])
        logits = inp["x"] @ params["d"] + params["d_b"]
        return losses.detection_loss(z, logits, inp["labels"], inp["hom"], gather=gather, **kwargs)
    raise ValueError(kind)


def _loss_and_grads(case: dict, inp: dict, gather: bool):
    params = {k: v.clone().requires_grad_() for k, v in case["params"].items()}
    out = _forward(case["kind"], params, inp, case["kwargs"], gather)
    out["loss"].backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return {k: v.detach() for k, v in out.items()}, grads


# ------------------------------------------------------------------ worker ----------


def _worker(rank: int, world: int, init_file: str, case_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        case = torch.load(case_file)
        values, grads = _loss_and_grads(case, case["ranks"][rank], gather=True)
        for g in grads.values():  # DDP: sum over ranks, divide by the world size
            dist.all_reduce(g)
            g /= world
        torch.save({"values": values, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(case: dict, tmp_path: Path) -> list[dict]:
    case_file = tmp_path / "case.pt"
    torch.save(case, case_file)
    mp.spawn(
        _worker,
        args=(WORLD, str(tmp_path / "pg_init"), str(case_file), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------ cases -----------


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _params(kind: str, seed: int) -> dict:
    p = {}
    names = ("hom", "het") if kind == "trace_loss" else ("w",)
    for i, name in enumerate(names):
        p[name] = _randn(D_IN, C, seed=seed + 2 * i)
        p[name + "_b"] = _randn(C, seed=seed + 2 * i + 1) * 0.1
    if kind == "detection_loss":
        p["d"] = _randn(D_IN, seed=seed + 10)
        p["d_b"] = _randn(1, seed=seed + 11).reshape(())
    return p


def _split(t: torch.Tensor, sizes) -> list[torch.Tensor]:
    return list(torch.split(t, list(sizes)))


def _stage1_case(kind: str, sizes, seed: int, kwargs: dict) -> dict:
    n = sum(sizes)
    x1, x2 = _randn(n, D_IN, seed=seed), _randn(n, D_IN, seed=seed + 1)
    ranks = [{"x1": a, "x2": b} for a, b in zip(_split(x1, sizes), _split(x2, sizes))]
    return {
        "kind": kind,
        "params": _params(kind, seed + 100),
        "kwargs": kwargs,
        "ranks": ranks,
        "global": {"x1": x1, "x2": x2},
    }


def _stage2_case(kind: str, labels_per_rank, seed: int, kwargs: dict) -> dict:
    """Traces J of each rank = (fixed, gradient-free) traces of that rank's real images,
    so ranks hold different numbers of them; the global J is rank 0's then rank 1's."""
    ranks, xs, labs, homs = [], [], [], []
    for r, labels in enumerate(labels_per_rank):
        labels = torch.tensor(labels, dtype=torch.int64)
        x = _randn(len(labels), D_IN, seed=seed + 10 * r)
        hom = _randn(int((labels == 0).sum()), C, seed=seed + 10 * r + 1)
        ranks.append({"x": x, "labels": labels, "hom": hom})
        xs.append(x), labs.append(labels), homs.append(hom)
    return {
        "kind": kind,
        "params": _params(kind, seed + 100),
        "kwargs": kwargs,
        "ranks": ranks,
        "global": {"x": torch.cat(xs), "labels": torch.cat(labs), "hom": torch.cat(homs)},
    }


def _hom_case(sizes, seed: int, want_cross_rank: bool) -> dict:
    """hom_loss inputs whose max pair is unique (for a clean gradient) and lies across
    the two ranks (or within one rank)."""
    for s in range(seed, seed + 500):
        case = _stage1_case("hom_loss", sizes, s, {})
        p, g = case["params"], case["global"]
        h1, h2 = _features(p, g["x1"]), _features(p, g["x2"])
        if ref.hom_pair_gaps(h1, h2) < 1e-3:
            continue
        n = sum(sizes)
        i, k = ref.hom_argmax_pair(h1, h2)
        cross = (i % n < sizes[0]) != (k % n < sizes[0])
        if cross == want_cross_rank:
            return case
    raise AssertionError("no suitable hom_loss input")


REAL, FAKE = 0, 1
CASES = {
    "nt_xent-4+4": lambda: _stage1_case("nt_xent", (4, 4), 1, {"temperature": 0.2}),
    "nt_xent-3+5": lambda: _stage1_case("nt_xent", (3, 5), 2, {"temperature": 0.1}),
    "nt_xent-1+1": lambda: _stage1_case("nt_xent", (1, 1), 3, {"temperature": 0.5}),
    "hom_loss-4+4-cross-rank-max": lambda: _hom_case((4, 4), 10, True),
    "hom_loss-4+4-within-rank-max": lambda: _hom_case((4, 4), 600, False),
    "hom_loss-3+5": lambda: _hom_case((3, 5), 1200, True),
    "trace_loss-4+4": lambda: _stage1_case("trace_loss", (4, 4), 20, {"temperature": 0.2, "lam": 0.1}),
    "trace_loss-1+1": lambda: _stage1_case("trace_loss", (1, 1), 21, {"temperature": 0.1, "lam": 0.5}),
    "trace_loss-3+5-no-orth": lambda: _stage1_case("trace_loss", (3, 5), 22, {"use_orth": False}),
    "soft_supcon-4+4-J3+1": lambda: _stage2_case(
        "soft_supcon", [[REAL, FAKE, REAL, REAL], [FAKE, FAKE, REAL, FAKE]], 30, {"temperature": 0.2, "eta": 0.5}
    ),
    "soft_supcon-3+5": lambda: _stage2_case(
        "soft_supcon", [[REAL, FAKE, FAKE], [REAL, REAL, FAKE, REAL, FAKE]], 31, {"temperature": 0.1, "eta": 0.7}
    ),
    # A local batch without a positive for its only real image, and a rank with no trace.
    "soft_supcon-3+5-rank0-no-real": lambda: _stage2_case(
        "soft_supcon", [[FAKE, FAKE, FAKE], [REAL, FAKE, REAL, REAL, FAKE]], 32, {"temperature": 0.1}
    ),
    "detection_loss-4+4": lambda: _stage2_case(
        "detection_loss", [[REAL, FAKE, REAL, FAKE], [FAKE, REAL, REAL, FAKE]], 40, {"temperature": 0.2, "gamma": 0.5}
    ),
    "detection_loss-3+5": lambda: _stage2_case(
        "detection_loss", [[FAKE, REAL, REAL], [REAL, FAKE, FAKE, REAL, FAKE]], 41, {"eta": 0.5, "gamma": 1.5}
    ),
    "detection_loss-4+4-no-scl": lambda: _stage2_case(
        "detection_loss", [[REAL, FAKE, REAL, FAKE], [FAKE, REAL, REAL, FAKE]], 42, {"use_scl": False}
    ),
}


def _reference(case: dict) -> dict:
    kind, kw, g = case["kind"], case["kwargs"], case["global"]
    p = case["params"]
    if kind in ("nt_xent", "hom_loss"):
        z1, z2 = _features(p, g["x1"]), _features(p, g["x2"])
        return {"loss": ref.nt_xent(z1, z2, **kw) if kind == "nt_xent" else ref.hom_loss(z1, z2)}
    if kind == "trace_loss":
        f = [_features(p, g[x], name) for name in ("hom", "het") for x in ("x1", "x2")]
        return ref.trace_loss(*f, **kw)
    z = _features(p, g["x"])
    if kind == "soft_supcon":
        return {"loss": ref.soft_supcon(z, g["labels"], g["hom"], **kw)}
    logits = g["x"] @ p["d"] + p["d_b"]
    return ref.detection_loss(z, logits, g["labels"], g["hom"], **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_matches_single_process(name, tmp_path):
    case = CASES[name]()
    single_values, single_grads = _loss_and_grads(case, case["global"], gather=False)

    # The single-process value is itself the documented loss of the global batch.
    for key, expected in _reference(case).items():
        torch.testing.assert_close(
            single_values[key].double().reshape(()), torch.tensor(float(expected), dtype=torch.float64), **TOL
        )

    results = _run_two_ranks(case, tmp_path)
    for rank, res in enumerate(results):
        for key, want in single_values.items():
            got = res["values"][key]
            torch.testing.assert_close(
                got.double().reshape(()),
                want.double().reshape(()),
                **TOL,
                msg=lambda m, key=key, rank=rank: f"{name}: value {key!r} on rank {rank}: {m}",
            )
        for key, want in single_grads.items():
            torch.testing.assert_close(
                res["grads"][key],
                want,
                **TOL,
                msg=lambda m, key=key, rank=rank: f"{name}: DDP-averaged grad of {key!r} on rank {rank}: {m}",
            )
