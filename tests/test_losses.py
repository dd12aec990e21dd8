"""``ntf_ray.nn.losses`` against the independent float64 references in ``loss_reference.py``
(written from ``method.md``), plus closed-form values, invariances, gradients and the
component switches of the combined stage-1 / stage-2 losses."""

from __future__ import annotations

import itertools
import math
import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from ntf_ray.nn import losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_reference as ref  # noqa: E402

NS = [1, 2, 3, 8, 17]
CS = [1, 4, 16, 128]
TEMPS = [0.05, 0.1, 0.5, 1.0]
SHAPES = list(itertools.product(NS, CS))
# A smaller grid for the (slower, combined) losses and the float32 runs.
SMALL_SHAPES = [(1, 4), (2, 1), (2, 16), (3, 4), (8, 128), (17, 16)]

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _seed(*parts) -> int:
    # Not hash(): string hashing is salted per interpreter run.
    return zlib.crc32(repr(parts).encode()) % (2**31)


def _labels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g)


def _check(got, expected: float, dtype=torch.float64) -> None:
    assert isinstance(got, torch.Tensor), type(got)
    assert got.numel() == 1, got.shape
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(
        got.detach().double().reshape(()), torch.tensor(float(expected), dtype=torch.float64), **TOL[dtype]
    )


def _same(a, b) -> None:
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=1e-7, atol=1e-10)


def _row_scale(m: int, seed: int) -> torch.Tensor:
    """Positive per-row factors spanning four orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return (10 ** (torch.rand(m, 1, generator=g, dtype=torch.float64) * 4 - 2))


def _rotation(c: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(c, c, seed=seed))
    return q


# ============================================================ nt_xent (Eq. 1) =======


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("n,c", SHAPES)
def test_nt_xent_matches_reference(n, c, temperature):
    s = _seed("ntx", n, c, temperature)
    z1, z2 = _randn(n, c, seed=s), _randn(n, c, seed=s + 1)
    _check(losses.nt_xent(z1, z2, temperature=temperature), ref.nt_xent(z1, z2, temperature))


@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("n,c", SMALL_SHAPES)
def test_nt_xent_float32(n, c, temperature):
    s = _seed("ntx32", n, c)
    z1, z2 = _randn(n, c, seed=s), _randn(n, c, seed=s + 1)
    got = losses.nt_xent(z1.float(), z2.float(), temperature=temperature)
    _check(got, ref.nt_xent(z1.float(), z2.float(), temperature), torch.float32)


def test_nt_xent_default_temperature_is_0_1():
    z1, z2 = _randn(5, 8, seed=1), _randn(5, 8, seed=2)
    _check(losses.nt_xent(z1, z2), ref.nt_xent(z1, z2, 0.1))


@pytest.mark.parametrize("temperature", TEMPS)
def test_nt_xent_single_pair_is_zero(temperature):
    # N = 1: K(i) holds only the other view, which is the positive: -s + log(exp(s)) = 0.
    z1, z2 = _randn(1, 7, seed=3), _randn(1, 7, seed=4)
    _check(losses.nt_xent(z1, z2, temperature=temperature), 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
def test_nt_xent_hand_computed(temperature):
    # Views identical, images orthogonal: every anchor sees s = 1/t at its positive and
    # s = 0 at the two other-image views: loss = -1/t + log(2 + e^{1/t}).
    e = torch.eye(2, dtype=torch.float64)
    expected = -1 / temperature + math.log(2 + math.exp(1 / temperature))
    _check(losses.nt_xent(e, e.clone(), temperature=temperature), expected)
    # Second view of image 0 is image 1's direction and vice versa.
    z2 = e.flip(0)  # anchor 0 = e1, positive = e2 (s=0), others: e2 (0), e1 (1/t)
    expected = 0 + math.log(1 + 1 + math.exp(1 / temperature))
    _check(losses.nt_xent(e, z2, temperature=temperature), expected)


def test_nt_xent_invariances():
    n, c = 9, 12
    z1, z2 = _randn(n, c, seed=10), _randn(n, c, seed=11)
    base = losses.nt_xent(z1, z2, temperature=0.2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    _same(losses.nt_xent(z1[perm], z2[perm], temperature=0.2), base)
    _same(losses.nt_xent(z2, z1, temperature=0.2), base)  # the two views play the same role
    _same(losses.nt_xent(z1 * _row_scale(n, 1), z2 * _row_scale(n, 2), temperature=0.2), base)
    _same(losses.nt_xent(3.5 * z1, 3.5 * z2, temperature=0.2), base)
    q = _rotation(c, 5)
    _same(losses.nt_xent(z1 @ q, z2 @ q, temperature=0.2), base)


def test_nt_xent_gradcheck():
    z1 = _randn(3, 4, seed=20).requires_grad_()
    z2 = _randn(3, 4, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: losses.nt_xent(a, b, temperature=0.3), (z1, z2))


# ============================================================ hom_loss (Eq. 2) ======


@pytest.mark.parametrize("n,c", SHAPES)
def test_hom_loss_matches_reference(n, c):
    s = _seed("hom", n, c)
    h1, h2 = _randn(n, c, seed=s), _randn(n, c, seed=s + 1)
    _check(losses.hom_loss(h1, h2), ref.hom_loss(h1, h2))


@pytest.mark.parametrize("n,c", SMALL_SHAPES)
def test_hom_loss_float32(n, c):
    s = _seed("hom32", n, c)
    h1, h2 = _randn(n, c, seed=s).float(), _randn(n, c, seed=s + 1).float()
    _check(losses.hom_loss(h1, h2), ref.hom_loss(h1, h2), torch.float32)


def test_hom_loss_closed_forms():
    v = _randn(1, 6, seed=30)
    # N < 2: no pair of distinct images -> 0.
    _check(losses.hom_loss(v, -v), 0.0)
    # Identical (after normalisation) features everywhere -> 0.
    same = v.repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [7.0]], dtype=torch.float64)
    _check(losses.hom_loss(same, 3 * same), 0.0)
    # Antipodal features of two different images -> ||h - (-h)||^2 = 4.
    _check(losses.hom_loss(torch.cat([v, -v]), torch.cat([v, -v])), 4.0)
    # Orthogonal images, identical views -> 2.
    e = torch.eye(3, dtype=torch.float64)
    _check(losses.hom_loss(e, e.clone()), 2.0)
    # Pairs of the SAME image are excluded: image 0's views are antipodal (distance 4),
    # but every cross-image pair is orthogonal (distance 2) -> 2, not 4.
    e1, e2 = torch.eye(2, dtype=torch.float64)
    h1 = torch.stack([e1, e2])
    h2 = torch.stack([-e1, e2])
    _check(losses.hom_loss(h1, h2), 2.0)


def test_hom_loss_invariances():
    n, c = 7, 5
    h1, h2 = _randn(n, c, seed=31), _randn(n, c, seed=32)
    base = losses.hom_loss(h1, h2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    _same(losses.hom_loss(h1[perm], h2[perm]), base)
    _same(losses.hom_loss(h2, h1), base)
    _same(losses.hom_loss(h1 * _row_scale(n, 3), h2 * _row_scale(n, 4)), base)
    q = _rotation(c, 6)
    _same(losses.hom_loss(h1 @ q, h2 @ q), base)


def _well_separated_hom(n: int, c: int, seed: int):
    for s in range(seed, seed + 200):
        h1, h2 = _randn(n, c, seed=s), _randn(n, c, seed=s + 10_000)
        if ref.hom_pair_gaps(h1, h2) > 1e-2:
            return h1, h2
    raise AssertionError("no well-separated input found")


def test_hom_loss_gradient_is_that_of_the_argmax_pair():
    n, c = 4, 5
    h1, h2 = _well_separated_hom(n, c, 40)
    i, k = ref.hom_argmax_pair(h1, h2)
    # Analytic: d/dx ||x_i/|x_i| - x_k/|x_k|||^2 only through rows i and k.
    x = torch.cat([h1, h2]).clone().requires_grad_()
    u, w = x[i] / x[i].norm(), x[k] / x[k].norm()
    ((u - w) ** 2).sum().backward()
    expected = x.grad
    a, b = h1.clone().requires_grad_(), h2.clone().requires_grad_()
    losses.hom_loss(a, b).backward()
    got = torch.cat([a.grad, b.grad])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_hom_loss_gradcheck_well_separated():
    h1, h2 = _well_separated_hom(3, 4, 50)
    assert torch.autograd.gradcheck(losses.hom_loss, (h1.requires_grad_(), h2.requires_grad_()))


# ============================================================ orth_loss (Eq. 3) =====


@pytest.mark.parametrize("m", [1, 2, 3, 8, 17, 34])
@pytest.mark.parametrize("c", CS)
def test_orth_loss_matches_reference(m, c):
    s = _seed("orth", m, c)
    a, b = _randn(m, c, seed=s), _randn(m, c, seed=s + 1)
    _check(losses.orth_loss(a, b), ref.orth_loss(a, b))
    _check(losses.orth_loss(a.float(), b.float()), ref.orth_loss(a, b), torch.float32)


def test_orth_loss_closed_forms():
    e = torch.eye(4, dtype=torch.float64)
    _check(losses.orth_loss(e, e.roll(1, dims=1)), 0.0)  # orthogonal
    _check(losses.orth_loss(e, 3 * e), 1.0)  # parallel
    _check(losses.orth_loss(e, -2 * e), 1.0)  # anti-parallel: |cos| = 1, not -1
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    _check(losses.orth_loss(a, b), (math.sqrt(0.5) + 0.0) / 2)  # mean, not sum


def test_orth_loss_invariances():
    m, c = 10, 6
    a, b = _randn(m, c, seed=60), _randn(m, c, seed=61)
    base = losses.orth_loss(a, b)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(2))
    _same(losses.orth_loss(a[perm], b[perm]), base)
    _same(losses.orth_loss(a * _row_scale(m, 7), b * _row_scale(m, 8)), base)
    _same(losses.orth_loss(b, a), base)
    _same(losses.orth_loss(-a, b), base)  # absolute value of the cosine
    q = _rotation(c, 9)
    _same(losses.orth_loss(a @ q, b @ q), base)


def test_orth_loss_gradcheck():
    a = _randn(4, 3, seed=62).requires_grad_()
    b = _randn(4, 3, seed=63).requires_grad_()
    assert torch.autograd.gradcheck(losses.orth_loss, (a, b))


# ============================================================ soft_supcon (Eq. 5) ===


@pytest.mark.parametrize("with_traces", [False, True], ids=["J0", "J"])
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("n,c", SHAPES)
def test_soft_supcon_matches_reference(n, c, temperature, with_traces):
    s = _seed("scl", n, c, temperature, with_traces)
    z = _randn(n, c, seed=s)
    labels = _labels(n, s + 1)
    j = max(1, n // 2) if with_traces else 0
    hom = _randn(j, c, seed=s + 2)
    got = losses.soft_supcon(z, labels, hom, temperature=temperature, eta=0.5)
    _check(got, ref.soft_supcon(z, labels, hom, temperature, 0.5))


@pytest.mark.parametrize("n,c", SMALL_SHAPES)
def test_soft_supcon_float32(n, c):
    s = _seed("scl32", n, c)
    z = _randn(n, c, seed=s).float()
    labels = _labels(n, s + 1)
    hom = _randn(3, c, seed=s + 2).float()
    for t in (0.05, 1.0):
        got = losses.soft_supcon(z, labels, hom, temperature=t, eta=0.5)
        _check(got, ref.soft_supcon(z, labels, hom, t, 0.5), torch.float32)


LABEL_PATTERNS = {
    "single_fake_among_reals": [0, 0, 0, 0, 0, 0, 0, 1],
    "single_real_among_fakes": [1, 1, 1, 1, 1, 0],
    "all_real": [0, 0, 0, 0, 0],
    "all_fake": [1, 1, 1, 1],
    "no_positives_anywhere": [0, 1],
    "one_real": [0],
    "one_fake": [1],
    "alternating": [0, 1, 0, 1, 0, 1, 0],
}


@pytest.mark.parametrize("j", [0, 1, 4])
@pytest.mark.parametrize("eta", [0.5, 2.0])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("pattern", list(LABEL_PATTERNS))
def test_soft_supcon_label_patterns(pattern, temperature, eta, j):
    labels = torch.tensor(LABEL_PATTERNS[pattern])
    n, c = len(labels), 6
    s = _seed("pat", pattern, temperature, eta, j)
    z, hom = _randn(n, c, seed=s), _randn(j, c, seed=s + 1)
    got = losses.soft_supcon(z, labels, hom, temperature=temperature, eta=eta)
    _check(got, ref.soft_supcon(z, labels, hom, temperature, eta))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_soft_supcon_label_dtypes(dtype):
    labels = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    z, hom = _randn(7, 5, seed=70), _randn(4, 5, seed=71)
    expected = ref.soft_supcon(z, labels, hom, 0.1, 0.5)
    _check(losses.soft_supcon(z, labels.to(dtype), hom), expected)  # defaults: tau 0.1, eta 0.5


def test_soft_supcon_closed_forms():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    empty = torch.empty(0, 3, dtype=torch.float64)
    # No anchor has a positive and there are no traces -> 0.
    _check(losses.soft_supcon(torch.stack([e1, e2]), torch.tensor([0, 1]), empty), 0.0)
    _check(losses.soft_supcon(e1[None], torch.tensor([1]), empty), 0.0)
    # Two samples, same label: K(i) = P(i) = {other}: s - log(exp(s)) = 0.
    _check(losses.soft_supcon(torch.stack([e1, e2 + e1]), torch.tensor([1, 1]), empty, temperature=0.3), 0.0)
    # Traces only: real anchor along the trace gets -eta/tau, the orthogonal one 0.
    z = torch.stack([e1, e2])
    _check(losses.soft_supcon(z, torch.tensor([0, 1]), e1[None], temperature=1.0, eta=0.5), -0.25)
    # ... a fake anchor along the trace is pushed: +eta/tau.
    _check(losses.soft_supcon(z, torch.tensor([1, 0]), e1[None], temperature=0.5, eta=0.5), 0.5)
    # Three samples z = [e1, e1, e2], labels real, real, fake.
    z = torch.stack([e1, e1, e2])
    labels = torch.tensor([0, 0, 1])
    for t in (1.0, 0.5):
        # anchors 0, 1: P = {other real} (s = 1/t), K adds the fake (s = 0):
        #   -(1/t - log(e^{1/t} + 1)); anchor 2: no positive -> 0.
        contrast = 2 * (math.log(math.exp(1 / t) + 1) - 1 / t)
        _check(losses.soft_supcon(z, labels, empty, temperature=t), contrast / 3)
        # Trace along e2: reals are orthogonal to it (0); the fake lies on it: +eta*1/t.
        _check(losses.soft_supcon(z, labels, 4 * e2[None], temperature=t, eta=0.5), (contrast + 0.5 / t) / 3)
        # Two traces e2, e3: mean of dots for the fake is 1/2.
        hom = torch.stack([e2, e3])
        _check(losses.soft_supcon(z, labels, hom, temperature=t, eta=0.5), (contrast + 0.25 / t) / 3)


def test_soft_supcon_invariances():
    n, c, j = 11, 6, 4
    z, hom = _randn(n, c, seed=80), _randn(j, c, seed=81)
    labels = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0])
    base = losses.soft_supcon(z, labels, hom, temperature=0.2, eta=0.7)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    hperm = torch.randperm(j, generator=torch.Generator().manual_seed(4))
    _same(losses.soft_supcon(z[perm], labels[perm], hom, temperature=0.2, eta=0.7), base)
    _same(losses.soft_supcon(z, labels, hom[hperm], temperature=0.2, eta=0.7), base)
    _same(
        losses.soft_supcon(z * _row_scale(n, 10), labels, hom * _row_scale(j, 11), temperature=0.2, eta=0.7), base
    )
    q = _rotation(c, 12)
    _same(losses.soft_supcon(z @ q, labels, hom @ q, temperature=0.2, eta=0.7), base)


def test_soft_supcon_gradcheck():
    z = _randn(5, 4, seed=90).requires_grad_()
    hom = _randn(3, 4, seed=91).requires_grad_()
    labels = torch.tensor([0, 0, 1, 0, 1])  # includes positives on both sides
    fn = lambda a, h: losses.soft_supcon(a, labels, h, temperature=0.4, eta=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, hom))
    labels = torch.tensor([0, 0, 1])  # the fake anchor has no positive
    z3 = _randn(3, 4, seed=92).requires_grad_()
    fn = lambda a, h: losses.soft_supcon(a, labels, h, temperature=0.4, eta=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z3, hom))
    empty = torch.empty(0, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: losses.soft_supcon(a, labels, empty, temperature=0.4), (z3,))


# ============================================================ trace_loss (Eq. 4) ====

FLAGS = [(True, True), (True, False), (False, True), (False, False)]


def _stage1_inputs(n: int, c: int, seed: int):
    return tuple(_randn(n, c, seed=seed + i) for i in range(4))


@pytest.mark.parametrize("use_het,use_orth", FLAGS)
@pytest.mark.parametrize("temperature,lam", [(0.1, 0.1), (0.05, 0.7), (1.0, 2.0)])
@pytest.mark.parametrize("n,c", SMALL_SHAPES)
def test_trace_loss_matches_reference(n, c, temperature, lam, use_het, use_orth):
    args = _stage1_inputs(n, c, _seed("tra", n, c, temperature))
    kw = dict(temperature=temperature, lam=lam, use_het=use_het, use_orth=use_orth)
    got = losses.trace_loss(*args, **kw)
    expected = ref.trace_loss(*args, **kw)
    assert set(got) >= {"loss", "hom", "het", "orth"}, set(got)
    for key in ("loss", "hom", "het", "orth"):
        _check(got[key], expected[key])


@pytest.mark.parametrize("n,c", [(3, 4), (8, 16)])
def test_trace_loss_float32(n, c):
    args = _stage1_inputs(n, c, _seed("tra32", n, c))
    got = losses.trace_loss(*(a.float() for a in args))
    expected = ref.trace_loss(*(a.float() for a in args))
    for key in ("loss", "hom", "het", "orth"):
        _check(got[key], expected[key], torch.float32)


def test_trace_loss_defaults_and_components():
    args = _stage1_inputs(6, 8, 100)
    out = losses.trace_loss(*args)  # tau 0.1, lambda 0.1, both terms on
    expected = ref.trace_loss(*args, temperature=0.1, lam=0.1)
    for key in ("loss", "hom", "het", "orth"):
        _check(out[key], expected[key])
    # The parts are what the single losses give; orth over all 2N views.
    zh1, zh2, ze1, ze2 = args
    _same(out["hom"], losses.hom_loss(zh1, zh2))
    _same(out["het"], losses.nt_xent(ze1, ze2, temperature=0.1))
    _same(out["orth"], losses.orth_loss(torch.cat([zh1, zh2]), torch.cat([ze1, ze2])))
    _same(out["loss"], out["hom"] + out["het"] + 0.1 * out["orth"])


@pytest.mark.parametrize("use_het,use_orth", FLAGS)
def test_trace_loss_flags_switch_terms_off(use_het, use_orth):
    args = [a.clone().requires_grad_() for a in _stage1_inputs(5, 6, 110)]
    out = losses.trace_loss(*args, lam=0.3, use_het=use_het, use_orth=use_orth)
    for key in ("loss", "hom", "het", "orth"):
        assert isinstance(out[key], torch.Tensor), (key, type(out[key]))
    assert out["loss"].requires_grad
    if not use_het:
        _check(out["het"], 0.0)
    else:
        assert float(out["het"]) > 0
    if not use_orth:
        _check(out["orth"], 0.0)
    else:
        assert float(out["orth"]) > 0
    _same(out["loss"], out["hom"] + out["het"] + 0.3 * out["orth"])
    out["loss"].backward()
    het_grad = [a.grad for a in args[2:]]
    if not use_het and not use_orth:
        # Without L_het and L_orth, z_het takes no part in the loss.
        for g in het_grad:
            assert g is None or torch.count_nonzero(g) == 0
    else:
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in het_grad)


def test_trace_loss_single_image():
    # N = 1: L_hom = 0 and L_het = 0 (closed forms); only orth is left.
    args = _stage1_inputs(1, 4, 120)
    out = losses.trace_loss(*args, lam=0.5)
    _check(out["hom"], 0.0)
    _check(out["het"], 0.0)
    _check(out["loss"], 0.5 * ref.orth_loss(torch.cat(args[:2]), torch.cat(args[2:])))


def test_trace_loss_invariances():
    n, c = 6, 5
    args = _stage1_inputs(n, c, 130)
    base = losses.trace_loss(*args, temperature=0.3)["loss"]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    _same(losses.trace_loss(*(a[perm] for a in args), temperature=0.3)["loss"], base)
    zh1, zh2, ze1, ze2 = args
    _same(losses.trace_loss(zh2, zh1, ze2, ze1, temperature=0.3)["loss"], base)  # swap views
    scaled = [a * _row_scale(n, 20 + i) for i, a in enumerate(args)]
    _same(losses.trace_loss(*scaled, temperature=0.3)["loss"], base)


def test_trace_loss_gradcheck():
    h1, h2 = _well_separated_hom(3, 4, 140)
    e1, e2 = _randn(3, 4, seed=141), _randn(3, 4, seed=142)
    inputs = tuple(t.clone().requires_grad_() for t in (h1, h2, e1, e2))
    fn = lambda a, b, c, d: losses.trace_loss(a, b, c, d, temperature=0.5, lam=0.3)["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ============================================================ detection_loss (Eq. 7)


def _stage2_inputs(n: int, c: int, j: int, seed: int):
    z = _randn(n, c, seed=seed)
    logits = _randn(n, seed=seed + 1) * 3
    labels = _labels(n, seed + 2)
    hom = _randn(j, c, seed=seed + 3)
    return z, logits, labels, hom


@pytest.mark.parametrize("use_scl", [True, False])
@pytest.mark.parametrize("temperature,eta,gamma", [(0.1, 0.5, 0.5), (0.05, 1.0, 2.0), (1.0, 0.2, 0.1)])
@pytest.mark.parametrize("n,c,j", [(1, 4, 0), (1, 4, 1), (2, 1, 1), (3, 16, 0), (8, 128, 5), (17, 16, 9)])
def test_detection_loss_matches_reference(n, c, j, temperature, eta, gamma, use_scl):
    z, logits, labels, hom = _stage2_inputs(n, c, j, _seed("det", n, c, j, temperature))
    kw = dict(temperature=temperature, eta=eta, gamma=gamma, use_scl=use_scl)
    got = losses.detection_loss(z, logits, labels, hom, **kw)
    expected = ref.detection_loss(z, logits, labels, hom, **kw)
    assert set(got) >= {"loss", "scl", "ce"}, set(got)
    for key in ("loss", "scl", "ce"):
        _check(got[key], expected[key])


@pytest.mark.parametrize("n,c,j", [(3, 4, 2), (8, 16, 0)])
def test_detection_loss_float32(n, c, j):
    z, logits, labels, hom = _stage2_inputs(n, c, j, _seed("det32", n, c, j))
    got = losses.detection_loss(z.float(), logits.float(), labels, hom.float())
    expected = ref.detection_loss(z.float(), logits.float(), labels, hom.float())
    for key in ("loss", "scl", "ce"):
        _check(got[key], expected[key], torch.float32)


def test_detection_loss_defaults_and_components():
    z, logits, labels, hom = _stage2_inputs(9, 8, 4, 150)
    out = losses.detection_loss(z, logits, labels, hom)  # tau 0.1, eta 0.5, gamma 0.5
    expected = ref.detection_loss(z, logits, labels, hom, temperature=0.1, eta=0.5, gamma=0.5)
    for key in ("loss", "scl", "ce"):
        _check(out[key], expected[key])
    _same(out["scl"], losses.soft_supcon(z, labels, hom))
    _same(out["ce"], F.binary_cross_entropy_with_logits(logits, labels.double()))
    _same(out["loss"], out["scl"] + 0.5 * out["ce"])


def test_detection_loss_closed_forms():
    z = _randn(4, 3, seed=160)
    labels = torch.tensor([0, 1, 1, 0])
    hom = _randn(2, 3, seed=161)
    zero_logits = torch.zeros(4, dtype=torch.float64)
    out = losses.detection_loss(z, zero_logits, labels, hom, gamma=0.5, use_scl=False)
    _check(out["ce"], math.log(2))  # sigmoid(0) = 1/2 for either target
    _check(out["scl"], 0.0)
    _check(out["loss"], 0.5 * math.log(2))
    # Target is the label with 1 = fake: a logit of +x on a fake costs log(1 + e^-x).
    logits = torch.tensor([-2.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    expected_ce = (
        math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))
    ) / 4
    out = losses.detection_loss(z, logits, labels, hom, use_scl=False)
    _check(out["ce"], expected_ce)


@pytest.mark.parametrize("use_scl", [True, False])
def test_detection_loss_flag_switches_scl_off(use_scl):
    z, logits, labels, hom = _stage2_inputs(6, 5, 3, 170)
    z = z.clone().requires_grad_()
    logits = logits.clone().requires_grad_()
    out = losses.detection_loss(z, logits, labels, hom, gamma=0.7, use_scl=use_scl)
    for key in ("loss", "scl", "ce"):
        assert isinstance(out[key], torch.Tensor), (key, type(out[key]))
    assert out["loss"].requires_grad
    if use_scl:
        _check(out["scl"], ref.soft_supcon(z, labels, hom, 0.1, 0.5))
    else:
        _check(out["scl"], 0.0)
    _same(out["loss"], out["scl"] + 0.7 * out["ce"])
    out["loss"].backward()
    if use_scl:
        assert z.grad is not None and torch.count_nonzero(z.grad) > 0
    else:
        assert z.grad is None or torch.count_nonzero(z.grad) == 0  # BCE only
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0


def test_detection_loss_invariances():
    n, c, j = 8, 5, 3
    z, logits, labels, hom = _stage2_inputs(n, c, j, 180)
    base = losses.detection_loss(z, logits, labels, hom, temperature=0.3)["loss"]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    hperm = torch.randperm(j, generator=torch.Generator().manual_seed(7))
    _same(losses.detection_loss(z[perm], logits[perm], labels[perm], hom[hperm], temperature=0.3)["loss"], base)
    scaled = losses.detection_loss(z * _row_scale(n, 30), logits, labels, hom * _row_scale(j, 31), temperature=0.3)
    _same(scaled["loss"], base)


def test_detection_loss_gradcheck():
    z, logits, labels, hom = _stage2_inputs(5, 4, 2, 190)
    inputs = tuple(t.clone().requires_grad_() for t in (z, logits, hom))
    fn = lambda a, b, h: losses.detection_loss(a, b, labels, h, temperature=0.5)["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
