"""NTF networks: encoder E, projection heads, classifier D, and the inference Detector.

Encoders take ``(B, 3, H, W)`` images as uint8 (0..255) or float (0..1) and normalise
them inside, so data pipelines can move uint8 (4x less than float32) and the
normalisation travels with the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# backbone name -> embedding width d
BACKBONES = {"resnet50": 2048, "resnet18": 512, "tiny": 128}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
    """A small CNN for tests and the demo: ``(B, 3, H, W) -> (B, dim)``.

    The first two convolutions keep stride 1, and the embedding concatenates the pooled
    full-resolution features with the pooled deep ones (a hypercolumn), so pixel-level
    upsampling traces reach the embedding instead of being averaged away by striding.
    Stage 2 trains a linear classifier on this frozen embedding, so its width sets how
    steady the smoke recipe is: 32 full-resolution channels held AP 0.94-0.98 over training
    seeds where 16 ranged 0.89-0.98 (README, "The smoke configuration").
    """

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(block(3, width, 1), block(width, width, 1))
        self.deep = nn.Sequential(block(width, 2 * width, 2), block(2 * width, dim - width, 2), block(dim - width, dim - width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.stem(x)
        return torch.cat([self.pool(shallow).flatten(1), self.pool(self.deep(shallow)).flatten(1)], dim=1)


def _resnet(name: str, pretrained: str) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    weights = None
    if pretrained == "imagenet":
        enum = {"resnet50": torchvision.models.ResNet50_Weights, "resnet18": torchvision.models.ResNet18_Weights}[name]
        weights = enum.DEFAULT
    net = builder(weights=None)
    if weights is not None:
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # no network and nothing in the torch cache
            raise RuntimeError(
                f"could not load ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "put them in the torch hub cache, pass a local weights file as pretrained, "
                "or use pretrained=none for random initialisation"
            ) from None
        net.load_state_dict(state)
    net.fc = nn.Identity()
    return net


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    # weights_only: a .pth/.pt file is read as tensors only; no code in it ever runs.
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


class Encoder(nn.Module):
    """E: image -> ``(B, d)`` pooled embedding, normalisation included."""

    def __init__(self, backbone: str, trunk: nn.Module, dim: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        return self.trunk(x)


def build_encoder(backbone: str = "resnet50", pretrained: str = "none") -> Encoder:
    """Encoder for ``backbone`` with ``pretrained`` = "imagenet", "none" or a weights file path.

    A weights file holds the trunk's state dict (torchvision key names, ``fc.*`` ignored).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if backbone == "tiny":
        if pretrained == "imagenet":
            raise ValueError("the tiny backbone has no ImageNet weights; use pretrained=none or a file")
        trunk: nn.Module = TinyCNN(dim=BACKBONES["tiny"])
    else:
        trunk = _resnet(backbone, pretrained if pretrained == "imagenet" else "none")
    if pretrained not in ("imagenet", "none", "", None):
        state = {k: v for k, v in _load_weights_file(pretrained).items() if not k.startswith("fc.")}
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights file {pretrained} does not fit backbone {backbone}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        log.info("loaded %s trunk weights from a local file", backbone)
    return Encoder(backbone, trunk, BACKBONES[backbone])


class ProjectionHead(nn.Module):
    """``Linear(d, d) -> ReLU -> Linear(d, out_dim)``: f_hom, f_het and the SCL head g."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e)


class Stage1Model(nn.Module):
    """Encoder plus the decoupling heads: ``x -> (z_hom, z_het)``, each ``(B, proj_dim)``."""

    def __init__(self, encoder: Encoder, proj_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.f_hom = ProjectionHead(encoder.dim, proj_dim)
        self.f_het = ProjectionHead(encoder.dim, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.encoder(x)
        return self.f_hom(e), self.f_het(e)


class Classifier(nn.Module):
    """D: ``(B, d)`` embedding -> ``(B, 1)`` fake logit; an affine map of the embedding.

    A non-affine ``BatchNorm1d`` standardises the frozen embedding before the linear layer.
    In eval mode it is a fixed affine map, so D is still ``Linear(d, 1)`` as a function
    (the two fold into one layer); it only preconditions SGD, which otherwise crawls on
    frozen features whose scale and offset the classifier cannot choose (the usual
    linear-probe practice).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, 1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(e))


class Stage2Model(nn.Module):
    """Stage-1 encoder and ``f_hom`` (frozen in training), SCL head ``g``, classifier ``D``."""

    def __init__(self, encoder: Encoder, f_hom: ProjectionHead, proj_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.f_hom = f_hom
        self.g = ProjectionHead(encoder.dim, proj_dim)
        self.classifier = Classifier(encoder.dim)

    @classmethod
    def from_stage1(cls, stage1: Stage1Model, proj_dim: int = 128) -> Stage2Model:
        return cls(stage1.encoder, stage1.f_hom, proj_dim)

    def detector(self) -> Detector:
        return Detector(self.encoder, self.classifier)


class Detector(nn.Module):
    """Inference network ``E`` + ``D``: ``(B, 3, S, S)`` images -> ``(B,)`` fake logits."""

    def __init__(self, encoder: Encoder, classifier: Classifier):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    @classmethod
    def build(cls, backbone: str) -> Detector:
        encoder = build_encoder(backbone, "none")
        return cls(encoder, Classifier(encoder.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x)).squeeze(1)
