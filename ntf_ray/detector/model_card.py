"""``MODEL_CARD.md``: what a detector artifact is for, what it was trained on, how well it did
and where it falls short, written from its ``model.json`` (so it says what the artifact holds,
nothing else) beside the weights by ``save_artifact``, and shown by ``ntf-ray score --card``."""

from __future__ import annotations

import json
import re
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


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object of ``model.json``, or an empty one where it holds something else."""
    return value if isinstance(value, dict) else {}


def _names(value: Any) -> list[str] | None:
    """A list of names (generators), or None where ``model.json`` holds anything else."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


#: Characters a card never prints as they are: control characters (a terminal would obey
#: escape sequences), line breaks (they would end a table row) and bidirectional overrides.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def _cell(value: Any) -> str:
    """Any ``model.json`` value as one short line of a Markdown table: it is text an artifact's
    writer chose, so nothing in it may break the table or reach the terminal as a control."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "..."


def _synthetic(generators: list[str] | None) -> bool:
    from ntf_ray.synth.families import KNOWN_GENERATORS

    return bool(generators) and set(generators) <= set(KNOWN_GENERATORS)


def verified(meta: dict[str, Any]) -> bool:
    """Whether the card's training record, evaluation and calibration are bound to its model_id:
    ``meta`` is a loaded artifact's ``metadata()`` (``load_artifact`` refused it otherwise) of a
    format whose id covers them."""
    from ntf_ray.detector.artifact import CARD_IN_ID_SINCE

    version = meta.get("format_version")
    return type(version) is int and version >= CARD_IN_ID_SINCE


def limits(meta: dict[str, Any]) -> list[str]:
    """Known limits that follow from what ``model.json`` says (and those that always hold)."""
    out = []
    if not verified(meta):
        out.append(f"Its training record, evaluation and calibration are unverified: model id "
                   f"{_cell(meta.get('model_id', '?'))} (format {_cell(meta.get('format_version', '?'))}) does not "
                   "cover them, so an edit to model.json would not show. Save the detector again "
                   "(`ntf-ray calibrate`) to bind them to its id.")
    data = _obj(_obj(meta.get("training")).get("data"))
    generators = _names(data.get("generators"))
    if _synthetic(generators):
        out.append("Trained on synthetic data only (`ntf-ray synth`: " + ", ".join(map(_cell, generators)) + "): a "
                   "smoke-test model, not for real uploads. Its synthetic figures show that the pipeline learns and "
                   "how it generalises between made-up traces; they cannot show accuracy on real generators, cameras, "
                   "compression or resizing.")
    elif not data:
        out.append("No training data summary: what it was trained on is unknown.")
    variant = _obj(_obj(meta.get("training")).get("config")).get("variant")
    if variant in ("ntf-proximity", "traces-only"):
        out.append(f"Variant {_cell(variant)} (beyond the paper) also flags images far from its training reals' "
                   "features: real photos unlike those (another kind of camera, heavy editing, screenshots) score "
                   "higher. Calibrate on your own real images (`ntf-ray calibrate`) before trusting its threshold.")
    if not meta.get("calibration"):
        out.append(f"Threshold {_cell(meta.get('threshold', 0.5))} is not calibrated: its false positive rate on "
                   "your real images is unknown (`ntf-ray calibrate --target-fpr ...`).")
    if not meta.get("metrics"):
        out.append("No evaluation stored with it: run `ntf-ray evaluate` on a held-out split.")
    return out + ALWAYS


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]


def _metrics(metrics: dict[str, Any]) -> list[str]:
    """The per-generator table training stored (``{"split", "table": [rows]}``), else the flat values."""
    rows = metrics.get("table")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        out = [f"On split `{_cell(metrics.get('split', '?'))}` (threshold as trained):", "",
               "| generator | images | AP | ACC | FPR | FNR |", "|---|---|---|---|---|---|"]
        for r in rows:
            cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "" for k in ("ap", "acc", "fpr", "fnr")]
            out.append(f"| {_cell(r.get('generator', '?'))} | {_cell(r.get('images', ''))} | " + " | ".join(cells)
                       + " |")
        return out
    flat = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in sorted(metrics.items())
            if isinstance(v, (int, float, str))]
    return _table(flat) if flat else ["(none stored)"]


def render(meta: dict[str, Any]) -> str:
    """The card of the artifact whose loaded ``metadata()`` is ``meta``: any value of it, of any
    JSON type, renders as text. Its training record, evaluation and calibration are headed
    "unverified" unless its model_id covers them (``verified``)."""
    training = _obj(meta.get("training"))
    config = _obj(training.get("config"))
    data = _obj(training.get("data"))
    cal = _obj(meta.get("calibration"))
    bound = verified(meta)
    mark = "" if bound else " (unverified: not covered by the model id)"
    model_id = _cell(meta.get("model_id", "?"))
    lines = [f"# Model card: ntf-ray detector {model_id}", "",
             f"Everything below is what model `{model_id}` was saved with: its id covers the weights, the threshold, "
             "the training record, the evaluation and the calibration, and a model.json edited since is refused."
             if bound else
             f"**Unverified record.** The id `{model_id}` covers the weights and the threshold only: the training "
             "data, calibration and evaluation below could have been edited after the model was saved.",
             "", "## Intended use", "", INTENDED_USE, "", "## Model", ""]
    lines += _table([("model id", f"`{model_id}`"), ("variant", config.get("variant", "unknown")),
                     ("backbone", meta.get("backbone")), ("head", meta.get("head")),
                     ("input", f"{_cell(meta.get('input_size'))} px centre crop at native resolution"),
                     ("threshold", f"{_cell(meta.get('threshold'))} (flag at score >= threshold)"),
                     ("workers", training.get("workers", "unknown"))])
    lines += ["", f"## Training data{mark if data else ''}", ""]
    if data:
        counts = ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in sorted(_obj(data.get("counts")).items()))
        stored = data.get("generators")
        names = _names(stored)
        generators = (", ".join(names) if names else "unknown" if not stored
                      else f"unknown (not a list of names: {_cell(stored)})")
        lines += _table([("images", data.get("images")), ("by split and label", counts or "unknown"),
                         ("generators", generators)])
    else:
        lines.append("Not recorded.")
    lines += ["", f"## Calibration{mark if cal else ''}", ""]
    if cal:
        lines += _table([("target FPR", cal.get("target_fpr")), ("achieved FPR", cal.get("fpr")),
                         ("95% upper bound", cal.get("fpr_upper95")), ("real images", cal.get("reals")),
                         ("split", cal.get("split")), ("manifest", cal.get("manifest")), ("date", cal.get("date")),
                         ("previous threshold", cal.get("previous_threshold"))])
    else:
        lines.append("Not calibrated.")
    metrics = _obj(meta.get("metrics"))
    lines += ["", f"## Evaluation{mark if metrics else ''}", "", *_metrics(metrics), "", "## Known limits", "",
              *(f"- {item}" for item in limits(meta)), ""]
    return "\n".join(lines)
