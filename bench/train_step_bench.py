"""Training-step throughput of the core's two NTF stages on one device (no Ray).

Stage 1: two 224 views per image through ResNet-50 + both heads, trace loss, SGD step
(views/s). Stage 2: frozen encoder on 224 crops and 32 px crops, SCL + BCE, heads train
(images/s). bf16 autocast and channels_last on CUDA, as the engine does. Batches are made
on the device up front, so the figures are the compute side of a training step.

    python bench/train_step_bench.py                      # CUDA, ResNet-50, batch 256
    python bench/train_step_bench.py --device cpu --backbone tiny --size 64 --batch 32 --steps 3
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ntf_ray.nn.losses import trace_loss
from ntf_ray.nn.model import Stage1Model, Stage2Model, build_encoder
from ntf_ray.training.engine import make_optimizer, prepare_stage2, train_stage1_epoch, train_stage2_epoch


def batches_stage1(n, b, size, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    return [{"view1": x, "view2": y}] * n


def batches_stage2(n, b, size, crop, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    c = torch.randint(0, 256, (b, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)
    lab = (torch.arange(b) % 2).to(device)
    return [{"image": x, "crop": c, "label": lab}] * n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def check_loss_on_device(device):
    """The trace loss on the device (float32) against float64 on the CPU."""
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(64, 128, generator=g, dtype=torch.float64) for _ in range(4)]
    ref = trace_loss(*z)["loss"].item()
    got = trace_loss(*[t.float().to(device) for t in z])["loss"].item()
    return ref, got, abs(got - ref) / abs(ref)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time stage 1 with torch.compile")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name}; torch {torch.__version__}; backbone {a.backbone}; {a.size} px; batch {a.batch}")
    ref, got, rel = check_loss_on_device(device)
    print(f"check: trace loss on {device.type} {got:.6f} vs float64 CPU {ref:.6f} (rel diff {rel:.2e})")
    assert rel < 1e-4, "device loss disagrees with the CPU reference"

    torch.manual_seed(0)
    s1 = Stage1Model(build_encoder(a.backbone), 128).to(device)
    if device.type == "cuda":
        s1 = s1.to(memory_format=torch.channels_last)
    opt = make_optimizer(s1.parameters(), lr=0.1)
    kw = dict(device=device, amp=True, channels_last=True, log_every=0)
    train_stage1_epoch(s1, batches_stage1(a.warmup, a.batch, a.size, device), opt, epoch=0, **kw)
    m, secs = timed(lambda: train_stage1_epoch(s1, batches_stage1(a.steps, a.batch, a.size, device), opt, epoch=1, **kw), device)
    views = 2 * a.batch * a.steps / secs
    print(f"stage 1 eager: {views:,.0f} views/s ({a.batch * a.steps / secs:,.0f} images/s), loss {m['loss']:.4f}")
    if device.type == "cuda":
        print(f"stage 1 peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    if a.compile:
        compiled = torch.compile(s1)
        train_stage1_epoch(compiled, batches_stage1(a.warmup, a.batch, a.size, device), opt, epoch=0, **kw)
        m, secs = timed(lambda: train_stage1_epoch(compiled, batches_stage1(a.steps, a.batch, a.size, device), opt, epoch=1, **kw), device)
        print(f"stage 1 torch.compile: {2 * a.batch * a.steps / secs:,.0f} views/s, loss {m['loss']:.4f}")

    s2 = Stage2Model.from_stage1(s1, 128).to(device)
    params = prepare_stage2(s2)
    opt2 = make_optimizer(params, lr=0.1)
    enc_before = {k: v.clone() for k, v in s2.encoder.state_dict().items()}
    train_stage2_epoch(s2, batches_stage2(a.warmup, a.batch, a.size, a.crop, device), opt2, epoch=0, **kw)
    m, secs = timed(lambda: train_stage2_epoch(s2, batches_stage2(a.steps, a.batch, a.size, a.crop, device), opt2, epoch=1, **kw), device)
    frozen = all(torch.equal(v, s2.encoder.state_dict()[k]) for k, v in enc_before.items())
    print(f"stage 2 eager: {a.batch * a.steps / secs:,.0f} images/s, loss {m['loss']:.4f}; encoder unchanged: {frozen}")
    assert frozen


if __name__ == "__main__":
    main()
