"""Independent float64 references for the NTF losses (``ntf_ray.nn.losses``).

Written from ``method.md`` (the project's reading of the paper's Eqs. 1-7) in a
deliberately different style from a vectorised implementation: every feature is turned
into a Python list of floats, and each loss is an explicit loop over anchors / pairs
with ``math.exp`` / ``math.log`` and a hand-written, max-shifted log-sum-exp. Nothing
here is differentiable; the tests compare values, and gradients are checked with
``torch.autograd.gradcheck`` on the implementation.

Every function returns a Python ``float`` (the combined losses a ``dict`` of floats).
"""

from __future__ import annotations

import math
from typing import Sequence

Rows = list[list[float]]


def _rows(x) -> Rows:
    """(M, C) tensor / array / nested list -> list of M lists of C Python floats."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().tolist()
    elif hasattr(x, "tolist"):
        x = x.tolist()
    return [[float(v) for v in row] for row in x]


def _flat(x) -> list[float]:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().reshape(-1).tolist()
    elif hasattr(x, "tolist"):
        x = x.reshape(-1).tolist()
    return [float(v) for v in x]


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    total = 0.0
    for u, v in zip(a, b):
        total += u * v
    return total


def _l2_normalise(rows: Rows) -> Rows:
    out = []
    for row in rows:
        norm = math.sqrt(_dot(row, row))
        out.append([v / norm for v in row])
    return out


def _logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))) shifted by the max so that nothing overflows."""
    m = max(values)
    acc = 0.0
    for v in values:
        acc += math.exp(v - m)
    return m + math.log(acc)


def _sq_dist(a: Sequence[float], b: Sequence[float]) -> float:
    total = 0.0
    for u, v in zip(a, b):
        total += (u - v) * (u - v)
    return total


# ---------------------------------------------------------------- Stage 1 -----------


def nt_xent(z1, z2, temperature: float = 0.1) -> float:
    """Eq. 1 (L_het): NT-Xent over the 2N views in view-major order, mean over anchors.

    Anchor a in [0, 2N): positive p = a + N (mod 2N); loss_a = -s_ap + LSE_{k != a} s_ak,
    s = cosine / temperature.
    """
    rows = _l2_normalise(_rows(z1) + _rows(z2))
    two_n = len(rows)
    n = two_n // 2
    total = 0.0
    for a in range(two_n):
        p = (a + n) % two_n
        logits = []
        s_ap = None
        for k in range(two_n):
            if k == a:
                continue
            s = _dot(rows[a], rows[k]) / temperature
            logits.append(s)
            if k == p:
                s_ap = s
        total += -s_ap + _logsumexp(logits)
    return total / two_n


def hom_loss(h1, h2) -> float:
    """Eq. 2 (L_hom): max over ordered pairs of views from *different* source images of
    ||h_i - h_k||^2 (h L2-normalised); 0 when N < 2."""
    rows = _l2_normalise(_rows(h1) + _rows(h2))
    two_n = len(rows)
    n = two_n // 2
    if n < 2:
        return 0.0
    best = -math.inf
    for i in range(two_n):
        for k in range(two_n):
            if i % n == k % n:  # same source image (incl. i == k)
                continue
            best = max(best, _sq_dist(rows[i], rows[k]))
    return best


def hom_argmax_pair(h1, h2) -> tuple[int, int]:
    """The (i, k) (indices into the view-major 2N rows) that attains ``hom_loss``."""
    rows = _l2_normalise(_rows(h1) + _rows(h2))
    two_n = len(rows)
    n = two_n // 2
    best, arg = -math.inf, None
    for i in range(two_n):
        for k in range(two_n):
            if i % n == k % n:
                continue
            d = _sq_dist(rows[i], rows[k])
            if d > best:
                best, arg = d, (i, k)
    return arg


def hom_pair_gaps(h1, h2) -> float:
    """Gap between the largest and the next *distinct* pair distance (unordered pairs),
    used to pick inputs whose max is well separated (for gradcheck)."""
    rows = _l2_normalise(_rows(h1) + _rows(h2))
    two_n = len(rows)
    n = two_n // 2
    ds = sorted(
        (_sq_dist(rows[i], rows[k]) for i in range(two_n) for k in range(i + 1, two_n) if i % n != k % n),
        reverse=True,
    )
    return ds[0] - ds[1] if len(ds) > 1 else math.inf


def orth_loss(z_hom, z_het) -> float:
    """Eq. 3 as method.md reads it: mean over rows of |cos(z_hom_i, z_het_i)|."""
    a = _rows(z_hom)
    b = _rows(z_het)
    total = 0.0
    for u, v in zip(a, b):
        total += abs(_dot(u, v) / (math.sqrt(_dot(u, u)) * math.sqrt(_dot(v, v))))
    return total / len(a)


def trace_loss(
    z_hom1,
    z_hom2,
    z_het1,
    z_het2,
    *,
    temperature: float = 0.1,
    lam: float = 0.1,
    use_het: bool = True,
    use_orth: bool = True,
) -> dict[str, float]:
    """Eq. 4: L_tra = L_hom + L_het + lam * L_orth (orth over all 2N views)."""
    hom = hom_loss(z_hom1, z_hom2)
    het = nt_xent(z_het1, z_het2, temperature) if use_het else 0.0
    orth = orth_loss(_rows(z_hom1) + _rows(z_hom2), _rows(z_het1) + _rows(z_het2)) if use_orth else 0.0
    return {"loss": hom + het + lam * orth, "hom": hom, "het": het, "orth": orth}


# ---------------------------------------------------------------- Stage 2 -----------


def soft_supcon(z, labels, hom, temperature: float = 0.1, eta: float = 0.5) -> float:
    """Eq. 5 (L_scl) as method.md reads it.

    y_i = +1 real (label 0), -1 fake (label 1); P(i) = other samples with the same label;
    K(i) = all samples but i;
    loss_i = -(1/|P(i)|) sum_{p in P(i)} (s_ip - LSE_{k in K(i)} s_ik)   [0 if P(i) empty]
             - eta * y_i * mean_{j in J}(z_i . h_j) / tau                 [0 if J empty]
    L_scl = mean over all N anchors.
    """
    zs = _l2_normalise(_rows(z))
    lab = [int(round(v)) for v in _flat(labels)]
    hs = _rows(hom)
    hs = _l2_normalise(hs) if len(hs) > 0 else []
    n = len(zs)
    total = 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and lab[p] == lab[i]]
        loss_i = 0.0
        if positives:
            lse = _logsumexp([_dot(zs[i], zs[k]) / temperature for k in range(n) if k != i])
            acc = 0.0
            for p in positives:
                acc += _dot(zs[i], zs[p]) / temperature - lse
            loss_i += -acc / len(positives)
        if hs:
            y = 1.0 if lab[i] == 0 else -1.0
            mean_dot = sum(_dot(zs[i], h) for h in hs) / len(hs)
            loss_i += -eta * y * mean_dot / temperature
        total += loss_i
    return total / n


def bce_with_logits(logits, labels) -> float:
    """Eq. 6: mean binary cross-entropy of sigmoid(logit) against the label (1 = fake),
    in the stable form max(x, 0) - x*y + log(1 + exp(-|x|))."""
    xs = _flat(logits)
    ys = _flat(labels)
    total = 0.0
    for x, y in zip(xs, ys):
        total += max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))
    return total / len(xs)


def detection_loss(
    z,
    logits,
    labels,
    hom,
    *,
    temperature: float = 0.1,
    eta: float = 0.5,
    gamma: float = 0.5,
    use_scl: bool = True,
) -> dict[str, float]:
    """Eq. 7: L_d = L_scl + gamma * L_ce (L_scl = 0 without SCL)."""
    scl = soft_supcon(z, labels, hom, temperature, eta) if use_scl else 0.0
    ce = bce_with_logits(logits, labels)
    return {"loss": scl + gamma * ce, "scl": scl, "ce": ce}
