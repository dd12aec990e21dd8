"""The evaluation's figures: PR curves, score histograms, robustness curves, t-SNE (PNG files
drawn on matplotlib's Agg canvas, no pyplot, and written through ``storage.write_bytes``)."""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ntf_ray import storage
from ntf_ray.evaluate.metrics import average_precision
from ntf_ray.evaluate.tables import CLEAN, STRONGER_UP, UNITS, as_float, score_columns
from ntf_ray.storage import StorageOptions

log = logging.getLogger(__name__)


def safe_name(name: str) -> str:
    """A file-name-safe form: anything outside ``[A-Za-z0-9._-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


def _file_names(prefix: str, names: Sequence[str]) -> dict[str, str]:
    """``name -> prefix + safe_name(name) + ".png"``, distinct even where two names sanitise alike."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem, n = f"{prefix}{safe_name(name)}", 1
        while (candidate := f"{stem}{'' if n == 1 else f'-{n}'}.png") in used:
            n += 1
        used.add(candidate)
        out[name] = candidate
    return out


def _figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _write_png(fig, *, output: str, name: str, options: StorageOptions | None) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(storage.join(output, name), buf.getvalue(), options)
    log.debug("wrote %s", name)
    return name


def _clean_scored(scores: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = score_columns(scores)
    keep = (cols["perturbation"] == CLEAN) & cols["scored"]
    return cols["label"][keep], cols["score"][keep], cols["generator"][keep]


def pr_curves(scores: pa.Table, *, output: str, threshold: float, options: StorageOptions | None = None) -> list[str]:
    """``pr_<generator>.png``: precision-recall curve of the clean images (scikit-learn's
    ``precision_recall_curve``, fake positive) with the operating point at ``threshold``.
    Generators without a fake image have no curve. Returns the file names written."""
    from sklearn.metrics import precision_recall_curve

    y, s, g = _clean_scored(scores)
    names = _file_names("pr_", sorted(set(g.tolist())))
    written = []
    for gen, name in names.items():
        yy, ss = y[g == gen], s[g == gen]
        if not yy.any():
            log.info("no PR curve for %s: no fake image", gen)
            continue
        precision, recall, _ = precision_recall_curve(yy, ss, pos_label=1)
        called = ss >= threshold
        fig, (ax,) = _figure()
        ax.plot(recall, precision, drawstyle="steps-post", label=f"AP {100 * average_precision(yy, ss):.1f}")
        if called.any():
            ax.plot([called[yy == 1].mean()], [yy[called].mean()], "o", color="C3", label=f"threshold {threshold:g}")
        ax.set(xlabel="recall (share of fakes found)", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.05),
               title=f"PR curve: {gen} ({len(yy)} images)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        written.append(_write_png(fig, output=output, name=name, options=options))
    return written


def score_histograms(scores: pa.Table, *, output: str, threshold: float, options: StorageOptions | None = None) -> list[str]:
    """``hist_<generator>.png``: overlaid histograms of the clean real and fake scores with the
    threshold drawn. Returns the file names written."""
    y, s, g = _clean_scored(scores)
    written = []
    for gen, name in _file_names("hist_", sorted(set(g.tolist()))).items():
        yy, ss = y[g == gen], s[g == gen]
        bins = np.linspace(min(0.0, ss.min()), max(1.0, ss.max()), 41)
        fig, (ax,) = _figure()
        for value, label, color in ((0, "real", "C0"), (1, "fake", "C3")):
            if (yy == value).any():
                ax.hist(ss[yy == value], bins=bins, alpha=0.55, color=color, label=f"{label} ({int((yy == value).sum())})")
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
        ax.set(xlabel="score = P(fake)", ylabel="images", title=f"Scores: {gen}")
        ax.legend()
        written.append(_write_png(fig, output=output, name=name, options=options))
    return written


def robustness_curves(metrics: Mapping[str, Any], *, output: str, options: StorageOptions | None = None,
                      max_generator_lines: int = 8) -> list[str]:
    """``robustness_<kind>.png``: AP and ACC (percent) against the level of each perturbation in
    ``compute_metrics``' result: a thick line for the average, thin lines per generator when
    there are at most ``max_generator_lines``. Returns the file names written."""
    written = []
    for kind, sections in metrics["perturbations"].items():
        levels = [s["level"] for s in sections]
        generators = sorted({r["generator"] for s in sections for r in s["table"][:-1]})
        fig, axes = _figure(ncols=2)
        for ax, key, title in zip(axes, ("ap", "acc"), ("AP", "ACC")):
            if len(generators) <= max_generator_lines:
                for i, gen in enumerate(generators):
                    values = [next((100 * as_float(r[key]) for r in s["table"] if r["generator"] == gen), math.nan)
                              for s in sections]
                    ax.plot(levels, values, linewidth=0.8, alpha=0.7, color=f"C{i % 10}", label=gen)
            ax.plot(levels, [100 * as_float(s["table"][-1][key]) for s in sections], "o-", color="k", linewidth=2.5,
                    label="average")
            ax.set(xlabel=f"{kind} level ({UNITS[kind]})", ylabel=f"{title} (%)", title=f"{title} under {kind}",
                   ylim=(-2, 102))
            if not STRONGER_UP[kind]:
                ax.invert_xaxis()  # stronger to the right
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize="small")
        written.append(_write_png(fig, output=output, name=f"robustness_{safe_name(kind)}.png", options=options))
    return written


def tsne(embeddings: np.ndarray, *, labels: Sequence[int] | np.ndarray, generators: Sequence[str] | np.ndarray,
         output: str, options: StorageOptions | None = None, name: str = "tsne.png", random_state: int = 0) -> list[str]:
    """The paper's Figure 1: a 2-D t-SNE map of ``embeddings`` (N, d), coloured by generator,
    marker by label (real ``o``, fake ``x``). scikit-learn's ``TSNE`` with a fixed
    ``random_state`` and perplexity min(30, (N - 1) / 3) (at least 1). Returns ``[name]``."""
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    y, g = np.asarray(labels).astype(np.int64), np.asarray(generators, dtype=object)
    if x.ndim != 2 or len(x) < 2 or y.shape != (len(x),) or g.shape != (len(x),):
        raise ValueError(f"t-SNE needs embeddings (N >= 2, d) with N labels and generators; got {x.shape}, "
                         f"{y.shape}, {g.shape}")
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca" if min(x.shape) >= 2 else "random",
              random_state=random_state).fit_transform(x)
    import matplotlib

    fig, (ax,) = _figure()
    names = sorted(set(g.tolist()))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    for i, gen in enumerate(names):
        for value, marker in ((0, "o"), (1, "x")):
            m = (g == gen) & (y == value)
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=16, marker=marker, color=cmap(i % cmap.N),
                           label=f"{gen} ({'real' if value == 0 else 'fake'})")
    ax.set(title=f"t-SNE of {len(x)} embeddings (perplexity {perplexity:.3g})", xticks=[], yticks=[])
    ax.legend(fontsize="x-small", markerscale=0.8)
    return [_write_png(fig, output=output, name=name, options=options)]
