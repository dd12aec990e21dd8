"""Evaluation: a long-form score table -> the paper's tables, figures and a Markdown report.

The input (``scores``) has one row per (image, perturbation level): ``uri``, ``label`` (0 real,
1 fake), ``generator``, ``family`` (nullable), ``perturbation`` (``"none"`` for the clean
image, else one of :data:`PERTURBATIONS`), ``level`` (null when clean), ``score`` = P(fake)
(null when the image could not be scored) and ``error`` (null when scored). Rows that were
not scored are counted per generator and left out of every metric. All metrics come from
scikit-learn through :mod:`ntf_ray.evaluate.metrics`; figures are drawn with matplotlib's Agg canvas
(no pyplot, no global backend) and, like every file here, written through
:func:`ntf_ray.storage.write_bytes`, so ``output`` may be a local folder or ``s3://``.
"""

from ntf_ray.evaluate.figures import pr_curves, robustness_curves, safe_name, score_histograms, tsne
from ntf_ray.evaluate.report import format_summary, write_report
from ntf_ray.evaluate.tables import CLEAN, PERTURBATIONS, compute_metrics, parse_families, parse_perturbations, to_json

__all__ = ["CLEAN", "PERTURBATIONS", "compute_metrics", "format_summary", "parse_families", "parse_perturbations",
           "pr_curves", "robustness_curves", "safe_name", "score_histograms", "to_json", "tsne", "write_report"]
