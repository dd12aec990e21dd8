"""Proximity to the natural traces as part of the decision (a reading beyond the paper).

The paper wants the detector to "make decisions based on the proximity of images to the
natural traces"; the classifier ``D(t(E(x)))`` alone decides from what the training fakes
showed it. ``NaturalTraces`` measures the proximity itself: how far an image's frozen
stage-1 features ``E(x)`` lie from those of real images, as a Mahalanobis distance under the
reals' mean and (Ledoit-Wolf shrunk) covariance, fitted after training on real images only.
Its log is turned into a logit by the reals alone: 0 at the 99th percentile of held-out
reals' distances (so at the usual threshold it flags 1% of them), the median real 4 units
below it. Nothing about fakes enters it, so a fake that
departs from the reals in a direction no training fake took is far from them all the same.

The classifier's own axis gets the same two-sided reading: a trained ``D`` extrapolates,
and a fake that departs from the reals away from every training fake can score *more real
than the reals* (the synthetic headroom families: 33-45 AP, below chance). So a classifier
logit below the 1st percentile of the held-out reals' logits counts as far from the reals
too, with the same scale (0 at that edge, the median real 4 units above it).

``ntf-proximity`` takes the largest of the three logits: at any threshold the decision flags
what the classifier flags, plus images whose features, or whose classifier logit on the real
side, lie beyond the held-out reals' edge; each of the two readings may add 1% of false
positives on reals at the usual threshold. An image within the reals on both counts keeps
the classifier's score. ``traces-only`` uses the distance alone. (Also measured: a noisy OR
of the three, which raised every real's score a little and cost the usual held-out families
3-5 AP; and edges at the farthest held-out real, which left most headroom fakes inside them;
see bench/README.md.) Every buffer travels in the artifact's weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

#: The share of held-out reals beyond each edge: the false positives each reading may add at
#: the usual threshold. And how many logit units separate the median held-out real from it.
EDGE_SHARE = 0.01
EDGE_UNITS = 4.0


class NaturalTraces(nn.Module):
    """``(B, d)`` encoder features -> ``(B,)`` logit that they lie away from the reals'."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("edge", torch.zeros(()))
        self.register_buffer("width", torch.ones(()))
        self.register_buffer("with_classifier", torch.ones((), dtype=torch.bool))
        self.register_buffer("low_edge", torch.zeros(()))  # the classifier's logit at the reals' 1st percentile
        self.register_buffer("low_width", torch.ones(()))

    def log_distance(self, e: torch.Tensor) -> torch.Tensor:
        with torch.autocast(e.device.type, enabled=False):  # fitted in float32: bf16 would move the edges
            d = e.float() - self.loc
            return ((d @ self.precision) * d).sum(1).clamp_min(1e-12).log()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (self.log_distance(e) - self.edge) / self.width

    def combine(self, classifier_logit: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The detector's logit: the largest of the classifier's, the distance's and the
        classifier's beyond the reals; or the distance's alone."""
        trace_logit = self(e)
        if not bool(self.with_classifier):
            return trace_logit
        classifier_logit = classifier_logit.float()
        beyond = (self.low_edge - classifier_logit) / self.low_width
        return torch.maximum(torch.maximum(classifier_logit, trace_logit), beyond)

    @classmethod
    def fit(cls, fit_features: np.ndarray, held_out: np.ndarray, held_out_logits: np.ndarray | None = None, *,
            with_classifier: bool = True) -> NaturalTraces:
        """Fitted on real images' features only: mean and shrunk covariance on ``fit_features``,
        the logit's edge and width on ``held_out`` (other reals), and with the classifier the
        edge of its logits on those reals (``held_out_logits``)."""
        from sklearn.covariance import LedoitWolf

        fit_features = np.asarray(fit_features, np.float64)
        held_out = np.asarray(held_out, np.float64)
        if fit_features.ndim != 2 or held_out.ndim != 2 or fit_features.shape[1] != held_out.shape[1]:
            raise ValueError("features must be (n, d) arrays of the same d")
        if len(fit_features) < 2 or len(held_out) < 2:
            raise ValueError(f"fitting the natural traces needs real images: got {len(fit_features)} to fit and "
                             f"{len(held_out)} held out (at least 2 each)")
        lw = LedoitWolf().fit(fit_features)
        traces = cls(fit_features.shape[1])
        traces.loc.copy_(torch.from_numpy(lw.location_).float())
        traces.precision.copy_(torch.from_numpy(lw.precision_).float())
        with torch.no_grad():
            dist = traces.log_distance(torch.from_numpy(held_out).float()).numpy()
        edge, median = float(np.quantile(dist, 1 - EDGE_SHARE)), float(np.median(dist))
        traces.edge.fill_(float(edge))
        traces.width.fill_(float(max((edge - median) / EDGE_UNITS, 1e-3)))
        traces.with_classifier.fill_(with_classifier)
        if with_classifier:
            if held_out_logits is None or len(held_out_logits) != len(held_out):
                raise ValueError("with the classifier, its logits on the held-out reals are needed")
            held_out_logits = np.asarray(held_out_logits, np.float64)
            low, median = float(np.quantile(held_out_logits, EDGE_SHARE)), float(np.median(held_out_logits))
            traces.low_edge.fill_(float(low))
            traces.low_width.fill_(float(max((median - low) / EDGE_UNITS, 1e-3)))
        return traces
