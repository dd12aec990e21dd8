"""Proximity to the natural traces as part of the decision (a reading beyond the paper).

The paper wants the detector to "make decisions based on the proximity of images to the
natural traces"; the classifier ``D(t(E(x)))`` alone decides from what the training fakes
showed it. ``NaturalTraces`` measures the proximity itself: how far an image's frozen
stage-1 features ``E(x)`` lie from those of real images, as a Mahalanobis distance under the
reals' mean and (Ledoit-Wolf shrunk) covariance, fitted after training on real images only.
Its log is turned into a logit by the reals alone: 0 at the 99th percentile of held-out
reals, and the median real 4 units below it. Nothing about fakes enters it, so a fake
that departs from the reals in a direction no training fake took is far from them all the
same.

The classifier's own axis gets the same two-sided reading: a trained ``D`` extrapolates,
and a fake that departs from the reals away from every training fake can score *more real
than the reals* (the synthetic headroom families: 33-45 AP, below chance). So a classifier
logit below the 1st percentile of held-out reals' logits counts as far from the reals too,
with the same scale (0 at that percentile, the median real 4 units above it).

The detector's score combines them as a noisy OR, ``P(fake) = 1 - (1 - P_D)(1 - P_J)(1 -
P_low)``: high when the classifier says fake, or the features are far from the reals', or
the classifier puts the image beyond the reals (variant ``ntf-proximity``); or it uses the
distance alone (``traces-only``). Every buffer travels in the artifact's weights.
docs/method.md, "Proximity to the natural traces", says what is read from the paper and
what is not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#: Held-out reals above which the distance's logit is positive (its "edge"), and how many
#: logit units separate the median real from that edge.
EDGE_QUANTILE = 0.99
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
        d = e.float() - self.loc
        return ((d @ self.precision) * d).sum(1).clamp_min(1e-12).log()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return (self.log_distance(e) - self.edge) / self.width

    def combine(self, classifier_logit: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The detector's logit: the noisy OR of both, or the distance's alone."""
        trace_logit = self(e)
        if not bool(self.with_classifier):
            return trace_logit
        classifier_logit = classifier_logit.float()
        beyond = (self.low_edge - classifier_logit) / self.low_width
        return noisy_or(noisy_or(classifier_logit, trace_logit), beyond)

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
        edge, median = np.quantile(dist, EDGE_QUANTILE), np.quantile(dist, 0.5)
        traces.edge.fill_(float(edge))
        traces.width.fill_(float(max((edge - median) / EDGE_UNITS, 1e-3)))
        traces.with_classifier.fill_(with_classifier)
        if with_classifier:
            if held_out_logits is None or len(held_out_logits) != len(held_out):
                raise ValueError("with the classifier, its logits on the held-out reals are needed")
            low, median = np.quantile(np.asarray(held_out_logits, np.float64), [1 - EDGE_QUANTILE, 0.5])
            traces.low_edge.fill_(float(low))
            traces.low_width.fill_(float(max((median - low) / EDGE_UNITS, 1e-3)))
        return traces


def noisy_or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The logit of ``1 - (1 - sigmoid(a)) (1 - sigmoid(b))``, computed in log space."""
    log_neither = F.logsigmoid(-a) + F.logsigmoid(-b)  # log P(neither says fake), <= 0
    return torch.log((-torch.expm1(log_neither)).clamp_min(1e-30)) - log_neither
