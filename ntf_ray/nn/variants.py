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

``bce`` is the Wang2020 (CNNDetection) baseline: the encoder from ``pretrained`` (ImageNet
weights, a file, or random), fine-tuned end to end with BCE on the same crops and
augmentations. ``linear-probe`` is D on the frozen stage-1 encoder: SCL could only train
a projection that inference never uses, so it trains with BCE alone.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What the classifier reads: ``transfer`` = D(t(E(x))), ``linear`` = D(E(x)).
HEADS = ("transfer", "linear")


@dataclass(frozen=True)
class Variant:
    name: str
    stage1: bool  # stage 1 runs (False: the encoder comes from ``pretrained``)
    use_het: bool  # L_het in stage 1 (f_het exists only when L_het or L_orth needs it)
    use_orth: bool  # L_orth in stage 1
    use_scl: bool  # L_scl in stage 2
    head: str  # one of HEADS
    train_encoder: bool  # stage 2 trains the encoder (end to end)
    summary: str

    @property
    def needs_f_het(self) -> bool:
        return self.use_het or self.use_orth


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("ntf", True, True, True, True, "transfer", False,
            "NTF: natural-trace learning, then SCL + BCE through the transfer layer"),
    Variant("no-orth", True, True, False, True, "transfer", False, "NTF without L_orth"),
    Variant("no-het-orth", True, False, False, True, "transfer", False, "NTF without L_het and L_orth"),
    Variant("no-scl", True, True, True, False, "transfer", False, "NTF's network, stage 2 with BCE only"),
    Variant("linear-probe", True, True, True, False, "linear", False, "a linear classifier on the frozen stage-1 encoder"),
    Variant("bce", False, False, False, False, "linear", True, "Wang2020: the pretrained encoder fine-tuned with BCE"),
)}
DEFAULT_VARIANT = "ntf"


def get_variant(name: str) -> Variant:
    """The variant called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
