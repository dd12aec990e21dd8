"""The detectors the paper compares (Figure 3, Table 2), each one value of ``variant``.

A variant fixes which stage-1 terms train, whether stage 1 runs at all, which losses
stage 2 uses, what the classifier reads, and whether the encoder trains in stage 2. The
training loops take these as explicit keyword arguments; the config names only the
variant, so an ablation is always a whole, named row of the paper's tables.

| variant        | stage 1                  | stage 2 loss    | classifier reads | encoder in stage 2 |
|----------------|--------------------------|-----------------|------------------|--------------------|
| `ntf`          | L_hom + L_het + λ L_orth | L_scl + γ L_ce  | t(E(x))          | frozen             |
| `no-orth`      | L_hom + L_het            | L_scl + γ L_ce  | t(E(x))          | frozen             |
| `no-het-orth`  | L_hom                    | L_scl + γ L_ce  | t(E(x))          | frozen             |
| `no-scl`       | L_hom + L_het + λ L_orth | γ L_ce          | t(E(x))          | frozen             |
| `linear-probe` | L_hom + L_het + λ L_orth | γ L_ce          | E(x)             | frozen             |
| `bce`          | none (``pretrained``)    | γ L_ce          | E(x)             | trained end to end |
| `ntf-proximity` (default) | as ntf | as ntf | t(E(x)), and the distance of E(x) to the reals' | frozen |
| `traces-only`  | as ntf                   | as ntf          | the distance of E(x) to the reals' alone        | frozen |

``bce`` is the Wang2020 (CNNDetection) baseline: the encoder from ``pretrained`` (ImageNet
weights, a file, or random), fine-tuned end to end with BCE on the same crops and
augmentations. ``linear-probe`` is D on the frozen stage-1 encoder: SCL could only train
a projection that inference never uses, so it trains with BCE alone.

``ntf-proximity`` and ``traces-only`` are readings beyond the paper (``ntf_ray.nn.traces``):
after stage 2, the distance of an image's frozen features from those of real images, fitted
and calibrated on reals only, joins the classifier's decision (the most alarming of the
classifier, the distance and the classifier read beyond the reals) or replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What the classifier reads: ``transfer`` = D(t(E(x))), ``linear`` = D(E(x)).
HEADS = ("transfer", "linear")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of the table above; every field by name."""

    name: str
    summary: str
    stage1: bool = True  # stage 1 runs (False: the encoder comes from ``pretrained``)
    use_het: bool = True  # L_het in stage 1 (f_het exists only when L_het or L_orth needs it)
    use_orth: bool = True  # L_orth in stage 1
    use_scl: bool = True  # L_scl in stage 2
    head: str = "transfer"  # one of HEADS
    train_encoder: bool = False  # stage 2 trains the encoder (end to end)
    traces: str = ""  # "": D decides; "combined": D or the distance to the natural traces; "only": the distance

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"variant {self.name}: head must be one of {HEADS}, got {self.head!r}")
        if self.traces not in ("", "combined", "only"):
            raise ValueError(f"variant {self.name}: traces must be '', combined or only, got {self.traces!r}")

    @property
    def needs_f_het(self) -> bool:
        return self.use_het or self.use_orth


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(name="ntf", summary="NTF: natural-trace learning, then SCL + BCE through the transfer layer"),
    Variant(name="no-orth", use_orth=False, summary="NTF without L_orth"),
    Variant(name="no-het-orth", use_het=False, use_orth=False, summary="NTF without L_het and L_orth"),
    Variant(name="no-scl", use_scl=False, summary="NTF's network, stage 2 with BCE only"),
    Variant(name="linear-probe", use_scl=False, head="linear",
            summary="a linear classifier on the frozen stage-1 encoder"),
    Variant(name="bce", stage1=False, use_het=False, use_orth=False, use_scl=False, head="linear", train_encoder=True,
            summary="Wang2020: the pretrained encoder fine-tuned with BCE"),
    Variant(name="ntf-proximity", traces="combined",
            summary="NTF, deciding also by the features' distance from the reals' (beyond the paper)"),
    Variant(name="traces-only", traces="only",
            summary="the distance of NTF's frozen features from the reals' alone (beyond the paper)"),
)}
DEFAULT_VARIANT = "ntf-proximity"


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
