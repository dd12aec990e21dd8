"""NTF networks: encoder E, projection heads, classifier D, and the inference Detector.

Encoders take ``(B, 3, H, W)`` images as uint8 (0..255) or float (0..1) and normalise
them inside, so data pipelines can move uint8 (4x less than float32) and the
normalisation travels with the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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
    Stage 2 keeps this embedding frozen, so its width sets how steady the smoke recipe
    is: 32 full-resolution channels held AP 0.94-0.98 over training seeds of the linear
    probe where 16 ranged 0.89-0.98 (docs/method.md, "The smoke configuration").
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
    """Encoder plus the decoupling heads: ``x -> (z_hom, z_het)``, each ``(B, proj_dim)``.

    ``het=False`` leaves ``f_het`` out (``z_het`` is None) for variants that use neither
    L_het nor L_orth: a head that gets no gradient would stall DDP's gradient reduction.
    """

    def __init__(self, encoder: Encoder, proj_dim: int = 128, *, het: bool = True):
        super().__init__()
        self.encoder = encoder
        self.f_hom = ProjectionHead(encoder.dim, proj_dim)
        self.f_het = ProjectionHead(encoder.dim, proj_dim) if het else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.encoder(x)
        return self.f_hom(e), (self.f_het(e) if self.f_het is not None else None)


class Classifier(nn.Module):
    """D: ``(B, d)`` features -> ``(B, 1)`` fake logit; an affine map of its input.

    A non-affine ``BatchNorm1d`` standardises the input before the linear layer.
    In eval mode it is a fixed affine map, so D is still ``Linear(d, 1)`` as a function
    (the two fold into one layer); it only preconditions SGD, which otherwise crawls on
    features whose scale and offset the classifier cannot choose (the usual
    linear-probe practice).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, 1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(e))


class TransferLayer(nn.Module):
    """t: ``(B, d)`` frozen embedding -> ``(B, d)``, ``ReLU(Linear(d, d))`` (method notes, stage 2).

    The layer that L_scl and L_ce train together: the SCL projection and the classifier
    D both read it, so the soft contrastive loss shapes what D sees. As in ``Classifier``,
    a non-affine batch norm standardises the frozen embedding first; in eval mode it folds
    into the linear layer, so t is ``ReLU(Linear(d, d))`` as a function.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.norm(e)))


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch norms in ``module`` normalise with batch statistics but leave their running
    statistics as they are (momentum 0). Stage 2 sends the 32 px SCL crops through t: their
    features must not leak into the statistics that inference applies to 224 px crops."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class Stage2Model(nn.Module):
    """Stage-1 encoder and ``f_hom`` (frozen in training), transfer layer ``t``, SCL projection, D.

    ``head="transfer"``: ``logit = D(t(E(x)))`` and the SCL projection is
    ``Linear(d, proj_dim)`` on ``t(E(x))``, so g = projection o t is the paper's two-layer
    head. ``head="linear"``: no t; D and the projection read ``E(x)`` (the linear probe and
    the Wang2020 baseline).
    """

    def __init__(self, encoder: Encoder, f_hom: ProjectionHead, proj_dim: int = 128, *, head: str = "transfer"):
        super().__init__()
        if head not in ("transfer", "linear"):
            raise ValueError(f"head must be transfer or linear, got {head!r}")
        self.encoder = encoder
        self.f_hom = f_hom
        self.transfer = TransferLayer(encoder.dim) if head == "transfer" else None
        self.project = nn.Linear(encoder.dim, proj_dim)
        self.classifier = Classifier(encoder.dim)

    @classmethod
    def from_stage1(cls, stage1: Stage1Model, proj_dim: int = 128, *, head: str = "transfer") -> Stage2Model:
        return cls(stage1.encoder, stage1.f_hom, proj_dim, head=head)

    def features(self, e: torch.Tensor) -> torch.Tensor:
        """What D reads: ``t(e)``, or ``e`` without a transfer layer; ``(B, d)``."""
        return self.transfer(e) if self.transfer is not None else e

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` embeddings of the 224 crops -> ``(B,)`` fake logits."""
        return self.classifier(self.features(e)).squeeze(1)

    def scl_projection(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` embeddings of the SCL crops -> ``(B, proj_dim)`` z of Eq. 5 (t's running
        statistics untouched)."""
        if self.transfer is None:
            return self.project(e)
        with running_stats_frozen(self.transfer):
            return self.project(self.transfer(e))

    def detector(self) -> Detector:
        return Detector(self.encoder, self.classifier, self.transfer)


class Detector(nn.Module):
    """Inference network: ``(B, 3, S, S)`` images -> ``(B,)`` fake logits, ``D(t(E(x)))``.

    ``transfer`` is None for detectors whose classifier reads the encoder directly (the
    linear probe, the Wang2020 baseline, and every artifact of format 1). ``traces``
    (``ntf_ray.nn.traces``), when set, adds the features' distance from the reals' to the
    decision (variants ``ntf-proximity``, ``traces-only``).
    """

    def __init__(self, encoder: Encoder, classifier: Classifier, transfer: TransferLayer | None = None,
                 traces: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.transfer = transfer
        self.classifier = classifier
        self.traces = traces

    @property
    def head(self) -> str:
        return "transfer" if self.transfer is not None else "linear"

    @classmethod
    def build(cls, backbone: str, head: str = "transfer", *, traces: bool = False) -> Detector:
        if head not in ("transfer", "linear"):
            raise ValueError(f"head must be transfer or linear, got {head!r}")
        from ntf_ray.nn.traces import NaturalTraces

        encoder = build_encoder(backbone, "none")
        transfer = TransferLayer(encoder.dim) if head == "transfer" else None
        return cls(encoder, Classifier(encoder.dim), transfer, NaturalTraces(encoder.dim) if traces else None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` images -> ``(B, d)``: the features D reads."""
        e = self.encoder(x)
        return self.transfer(e) if self.transfer is not None else e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder(x)
        logit = self.classifier(self.transfer(e) if self.transfer is not None else e).squeeze(1)
        return logit if self.traces is None else self.traces.combine(logit, e)
