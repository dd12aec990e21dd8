"""The paper's losses, as fixed by the project's method notes.

Every function takes ``(N, C)`` float feature tensors and L2-normalises them itself.
``gather=True`` makes a loss see the global batch across ``torch.distributed`` ranks with
a gather that keeps gradients (``dist.gather_with_grad``); without a process group it is
the single-process loss. Each rank then holds the same global loss value, and DDP's
gradient averaging gives the gradient of one process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ntf_ray.nn import dist


def _cat_ranks(x: torch.Tensor, gather: bool) -> torch.Tensor:
    return torch.cat(dist.gather_with_grad(x), dim=0) if gather else x


def _cat_ranks_no_grad(x: torch.Tensor, gather: bool) -> torch.Tensor:
    return torch.cat(dist.gather_no_grad(x), dim=0) if gather else x


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = False
) -> torch.Tensor:
    """NT-Xent on two views (Eq. 1, L_het), mean over the 2N anchors.

    ``z1[i]`` and ``z2[i]`` are the two views of image i, shape ``(N, C)`` each. For anchor
    a with positive p: ``-s_ap + logsumexp_{k != a} s_ak`` with ``s = cos / temperature``.
    """
    _check_pair(z1, z2)
    z1, z2 = _cat_ranks(z1, gather), _cat_ranks(z2, gather)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    # cross_entropy = -s_ap + logsumexp over the row, the diagonal already excluded.
    return F.cross_entropy(sim, positive, reduction="mean")


def hom_loss(h1: torch.Tensor, h2: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """Largest squared distance between views of different images (Eq. 2, L_hom).

    ``h1``, ``h2``: ``(N, C)`` first and second views of ``z_hom``. The max runs over ordered
    pairs of the 2N normalised views whose source images differ; 0 when N < 2. Minimising
    it pulls all real images' homogeneous features into one tight cluster.
    """
    _check_pair(h1, h2)
    h1, h2 = _cat_ranks(h1, gather), _cat_ranks(h2, gather)
    n = h1.shape[0]
    if n < 2:
        return (h1.sum() + h2.sum()) * 0.0
    h = F.normalize(torch.cat([h1, h2], dim=0), dim=1)
    # ||a - b||^2 = 2 - 2 a.b for unit vectors; clamp guards tiny negative round-off.
    dist2 = (2.0 - 2.0 * (h @ h.T)).clamp_min(0.0)
    source = torch.arange(2 * n, device=h.device) % n
    same_source = source[:, None] == source[None, :]
    return dist2.masked_fill(same_source, float("-inf")).max()


def orth_loss(z_hom: torch.Tensor, z_het: torch.Tensor) -> torch.Tensor:
    """Soft orthogonality (Eq. 3, L_orth): mean over rows of ``|cos(z_hom_i, z_het_i)|``."""
    _check_pair(z_hom, z_het)
    return F.cosine_similarity(z_hom, z_het, dim=1, eps=1e-12).abs().mean()


def soft_supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    hom: torch.Tensor,
    temperature: float = 0.1,
    eta: float = 0.5,
    gather: bool = False,
) -> torch.Tensor:
    """Soft supervised contrastive loss (Eq. 5, L_scl), mean over all N anchors.

    ``z``: ``(N, C)`` SCL projections; ``labels``: ``(N,)`` 0 real / 1 fake; ``hom``: ``(J, C)``
    natural traces (``f_hom`` of the batch's real images; J may be 0). Per anchor i, with
    ``y_i = +1`` real / ``-1`` fake, P(i) the other samples of i's label, K(i) all but i:
    ``-(1/|P(i)|) sum_p (s_ip - logsumexp_{k in K(i)} s_ik)`` (0 if P(i) is empty)
    ``- eta * y_i * mean_j(z_i . h_j) / temperature`` (0 if J is empty).
    """
    if z.ndim != 2 or labels.ndim != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"soft_supcon wants z (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    if hom.ndim != 2 or (hom.shape[0] > 0 and hom.shape[1] != z.shape[1]):
        raise ValueError(f"soft_supcon wants hom (J, {z.shape[1]}), got {tuple(hom.shape)}")
    z = _cat_ranks(z, gather)
    labels = _cat_ranks_no_grad(labels.reshape(-1), gather)
    hom = _cat_ranks_no_grad(hom.detach(), gather) if gather else hom
    n = z.shape[0]
    z = F.normalize(z, dim=1)
    is_fake = labels.to(torch.bool)

    if n > 1:
        sim = z @ z.T / temperature
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        log_denominator = torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1)
        positive = (is_fake[:, None] == is_fake[None, :]) & ~self_mask
        n_pos = positive.sum(dim=1)
        log_prob = sim - log_denominator[:, None]
        pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        supcon = torch.where(n_pos > 0, -pos_sum / n_pos.clamp_min(1), torch.zeros_like(pos_sum))
    else:
        # One sample: K(i) is empty, so there is no contrastive term (and logsumexp over
        # nothing would put NaN into the gradient).
        supcon = z.sum(dim=1) * 0.0

    if hom.shape[0] > 0:
        h = F.normalize(hom.to(z.dtype), dim=1)
        y = 1.0 - 2.0 * is_fake.to(z.dtype)  # +1 real, -1 fake
        trace = eta * y * (z @ h.T).mean(dim=1) / temperature
        supcon = supcon - trace
    return supcon.mean()


def trace_loss(
    z_hom1: torch.Tensor,
    z_hom2: torch.Tensor,
    z_het1: torch.Tensor | None,
    z_het2: torch.Tensor | None,
    *,
    temperature: float = 0.1,
    lam: float = 0.1,
    use_het: bool = True,
    use_orth: bool = True,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """Stage-1 natural-trace loss (Eq. 4): ``L_hom + L_het + lam * L_orth``.

    Inputs are the first/second views, ``(N, C)`` each. ``use_het=False`` / ``use_orth=False``
    are the paper's ablations; with both off, ``z_het1``/``z_het2`` may be None (no f_het).
    Returns ``loss`` (differentiable) and the detached components ``hom``, ``het``, ``orth``
    for logging (disabled ones are 0), and ``hom_spread``: the mean squared distance of the
    2N normalised homogeneous features from their mean (0 = collapsed to one point, which
    minimises L_hom trivially; up to 1 for spread-out features).
    """
    if (use_het or use_orth) and (z_het1 is None or z_het2 is None):
        raise ValueError("trace_loss: L_het and L_orth need z_het (the f_het head)")
    if gather:
        z_hom1, z_hom2 = _cat_ranks(z_hom1, True), _cat_ranks(z_hom2, True)
        if z_het1 is not None and z_het2 is not None:
            z_het1, z_het2 = _cat_ranks(z_het1, True), _cat_ranks(z_het2, True)
    hom = hom_loss(z_hom1, z_hom2)
    zero = hom * 0.0
    het = nt_xent(z_het1, z_het2, temperature) if use_het else zero
    orth = (
        orth_loss(torch.cat([z_hom1, z_hom2]), torch.cat([z_het1, z_het2])) if use_orth else zero
    )
    loss = hom + het + lam * orth
    with torch.no_grad():
        h = F.normalize(torch.cat([z_hom1, z_hom2]).float(), dim=1)
        spread = (h - h.mean(dim=0)).pow(2).sum(dim=1).mean()
    return {"loss": loss, "hom": hom.detach(), "het": het.detach(), "orth": orth.detach(), "hom_spread": spread}


def detection_loss(
    z: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    hom: torch.Tensor,
    *,
    temperature: float = 0.1,
    eta: float = 0.5,
    gamma: float = 0.5,
    use_scl: bool = True,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """Stage-2 loss (Eq. 7): ``L_scl + gamma * L_ce``.

    ``z``: ``(N, C)`` SCL projections of the 32 px crops; ``logits``: ``(N,)`` classifier
    logits on the 224 crops (fake-positive); ``labels``: ``(N,)`` 0 real / 1 fake; ``hom``:
    ``(J, C)`` traces of the batch's real images. ``use_scl=False`` is the BCE-only
    ablation. Returns ``loss`` and detached ``scl``, ``ce``.
    """
    logits = logits.reshape(-1)
    labels = labels.reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"detection_loss: {logits.shape[0]} logits for {labels.shape[0]} labels")
    all_logits = _cat_ranks(logits, gather)
    all_labels = _cat_ranks_no_grad(labels, gather)
    # Half-precision logits from autocast are lifted to float32; float64 stays float64.
    dtype = torch.promote_types(all_logits.dtype, torch.float32)
    ce = F.binary_cross_entropy_with_logits(all_logits.to(dtype), all_labels.to(dtype))
    if use_scl:
        scl = soft_supcon(z, labels, hom, temperature, eta, gather=gather)
    else:
        scl = ce * 0.0
    loss = scl + gamma * ce
    return {"loss": loss, "scl": scl.detach(), "ce": ce.detach()}


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, C) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
