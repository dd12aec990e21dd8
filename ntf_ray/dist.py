"""Distributed helpers on ``torch.distributed`` only.

Without an initialised process group everything degrades to rank 0 of a world of 1, so
the same code runs in a notebook, a test, or under Ray Train's DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension may differ between ranks (pad, gather, trim)."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return [t[:n] for t, n in zip(out, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients across ranks.

    Every rank computes the same global loss from the gathered tensor, so the gradient of
    the global loss with respect to rank r's rows is the sum of what every rank sends back
    for them. Keeping only the local slice (the plain ``all_gather`` pattern) would drop
    the other ranks' contributions and silently shrink the contrastive gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = _gather_sizes(x.shape[0], x.device)
        ctx.sizes = sizes
        ctx.rank = rank()
        return tuple(_all_gather_padded(x, sizes))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        sizes = ctx.sizes
        longest = max(sizes)
        stacked = grads[0].new_zeros((len(sizes), longest, *grads[0].shape[1:]))
        for i, (g, n) in enumerate(zip(grads, sizes)):
            stacked[i, :n] = g
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[ctx.rank, : sizes[ctx.rank]].contiguous()


def gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Rows of every rank, in rank order, differentiable; ``[x]`` in a single process.

    Ranks may hold different numbers of rows (a short last batch, a varying number of
    real images): sizes are exchanged first and the tensors padded for the collective.
    """
    if world_size() == 1:
        return [x]
    return list(_GatherWithGrad.apply(x))


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Rows of every rank, in rank order, without gradient (labels, frozen traces)."""
    if world_size() == 1:
        return [x]
    return _all_gather_padded(x, _gather_sizes(x.shape[0], x.device))


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python float over ranks (for logging); identity in one process."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def all_reduce_sum(value: float, device: torch.device | str = "cpu") -> float:
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
