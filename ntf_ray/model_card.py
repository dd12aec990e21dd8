"""``MODEL_CARD.md``: what a detector artifact is for, what it was trained on, how well it did
and where it falls short, written from its ``model.json`` (so it says what the artifact holds,
nothing else) beside the weights by ``save_artifact``, and shown by ``ntf-ray score --card``."""

from __future__ import annotations

from typing import Any

CARD = "MODEL_CARD.md"

INTENDED_USE = (
    "Flagging images likely to be AI-generated for a person to review: bulk audits of a bucket "
    "and nightly moderation batches. A score is P(fake) from pixel-level traces; it is evidence "
    "for review, not proof, and not a decision to act on alone.")

ALWAYS = [
    "Scores describe pixels, not content: an edited real photo is not 'fake', and a generated "
    "image re-encoded, resized or screenshotted loses traces and may pass.",
    "A generator family absent from training is detected only as far as its traces resemble the "
    "trained ones: evaluate on that family before relying on the detector for it.",
]


def _synthetic(generators: list[str]) -> bool:
    from ntf_ray.synth.families import GENERATORS

    return bool(generators) and set(generators) <= set(GENERATORS)


def limits(meta: dict[str, Any]) -> list[str]:
    """Known limits that follow from what ``model.json`` says (and those that always hold)."""
    out = []
    data = (meta.get("training") or {}).get("data") or {}
    generators = list(data.get("generators") or [])
    if _synthetic(generators):
        out.append("Trained on synthetic data only (`ntf-ray synth`: " + ", ".join(generators) + "): a smoke-test "
                   "model, not for real uploads.")
    elif not data:
        out.append("No training data summary: what it was trained on is unknown.")
    if not meta.get("calibration"):
        out.append(f"Threshold {meta.get('threshold', 0.5):g} is not calibrated: its false positive rate on your "
                   "real images is unknown (`ntf-ray calibrate --target-fpr ...`).")
    if not meta.get("metrics"):
        out.append("No evaluation stored with it: run `ntf-ray evaluate` on a held-out split.")
    return out + ALWAYS


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _metrics(metrics: dict[str, Any]) -> list[str]:
    """The per-generator table training stored (``{"split", "table": [rows]}``), else the flat values."""
    rows = metrics.get("table")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        out = [f"On split `{metrics.get('split', '?')}` (threshold as trained):", "",
               "| generator | images | AP | ACC | FPR | FNR |", "|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "" for k in ("ap", "acc", "fpr", "fnr")]
            out.append(f"| {r.get('generator', '?')} | {r.get('images', '')} | " + " | ".join(cells) + " |")
        return out
    flat = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in sorted(metrics.items())
            if isinstance(v, (int, float, str))]
    return _table(flat) if flat else ["(none stored)"]


def render(meta: dict[str, Any]) -> str:
    """The card of the artifact whose ``model.json`` is ``meta``."""
    training = meta.get("training") or {}
    config = training.get("config") or {}
    data = training.get("data") or {}
    cal = meta.get("calibration") or {}
    lines = [f"# Model card: ntf-ray detector {meta.get('model_id', '?')}", "", "## Intended use", "", INTENDED_USE, "",
             "## Model", ""]
    lines += _table([("model id", f"`{meta.get('model_id', '?')}`"), ("variant", config.get("variant", "unknown")),
                     ("backbone", meta.get("backbone")), ("head", meta.get("head")),
                     ("input", f"{meta.get('input_size')} px centre crop at native resolution"),
                     ("threshold", f"{meta.get('threshold')} (flag at score >= threshold)"),
                     ("workers", training.get("workers", "unknown"))])
    lines += ["", "## Training data", ""]
    if data:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((data.get("counts") or {}).items()))
        lines += _table([("images", data.get("images")), ("by split and label", counts or "unknown"),
                         ("generators", ", ".join(data.get("generators") or []) or "unknown")])
    else:
        lines.append("Not recorded.")
    lines += ["", "## Calibration", ""]
    if cal:
        lines += _table([("target FPR", cal.get("target_fpr")), ("achieved FPR", cal.get("fpr")),
                         ("95% upper bound", cal.get("fpr_upper95")), ("real images", cal.get("reals")),
                         ("split", cal.get("split")), ("manifest", cal.get("manifest")), ("date", cal.get("date")),
                         ("previous threshold", cal.get("previous_threshold"))])
    else:
        lines.append("Not calibrated.")
    lines += ["", "## Evaluation", "", *_metrics(meta.get("metrics") or {}), "", "## Known limits", "",
              *(f"- {item}" for item in limits(meta)), ""]
    return "\n".join(lines)
