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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum of the incoming gradients over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks; ``x`` itself in one process."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


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


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of an int over ranks; identity in one process."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def average_gradients(params) -> None:
    """All-reduce and average ``.grad`` over ranks (what DDP does), for modules not wrapped in DDP."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every rank's batch (SimCLR's "global BN").

    With per-rank statistics, W workers of batch B would not compute what one worker of
    batch W*B computes, and contrastive learning can cheat through batch statistics that
    differ between ranks. Sums and sums of squares are all-reduced with autograd, so the
    backward also spans ranks. In eval mode, or in one process, it is plain batch norm.
    Works on CPU (gloo) and CUDA; same parameters and buffers as ``BatchNorm*d``.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        # Sums accumulated in float64: the variance is E[x^2] - E[x]^2, which loses about
        # log10(mean^2 / var) digits, and float32 sums made 2 workers differ from one
        # process by 1e-5 (relative) in stage 2's losses. Squares stay float32 (no float64
        # copy of the activations is kept for the backward).
        count = torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)
        stats = all_reduce_with_grad(torch.cat([xf.sum(dims, dtype=torch.float64),
                                                (xf * xf).sum(dims, dtype=torch.float64), count]))
        total = stats[-1]
        mean64 = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean64 * mean64).clamp_min(0.0).float()
        mean = mean64.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` in ``module`` with a ``GlobalBatchNorm`` (same state)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for p_old, p_new in zip(module.parameters(), new.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new.to(next(iter(module.state_dict().values())).device)
    for name, child in list(module.named_children()):
        setattr(module, name, convert_global_batchnorm(child))
    return module


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)
