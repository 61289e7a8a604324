"""Per-fold probability calibration on the fold's validation part (Platt scaling), applied wherever a fold scores.

Pooling the out-of-fold predictions of K separately trained networks puts K probability scales on one axis: a fold
model that is over-confident for the positive class ranks all its scans above another fold's, whatever their true
classes, and the pooled ROC-AUC drops below every fold's own (measured on the default cohort: ResNet-50 folds 0.81 /
0.85 / 0.88, pooled 0.77). Platt scaling (Platt 1999; a logistic regression on the network's logit) fitted on each
fold's *validation* part, which the held-out part never touches, maps every fold onto calibrated probabilities
(measured: pooled 0.83) and makes the 0.5 threshold mean the same in every fold. Two parameters fitted on a dozen or
two validation scans: scikit-learn's L2 penalty (C = 1) keeps them from running away on a separable validation set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: Probabilities are clipped away from 0 and 1 before taking logits (float32 softmax saturates at 1 - 6e-8).
EPS = 1e-6


@dataclass(frozen=True)
class Platt:
    """``p' = sigmoid(slope * logit(p) + intercept)``; the identity is slope 1, intercept 0."""

    slope: float = 1.0
    intercept: float = 0.0
    n: int = 0  # validation scans it was fitted on (0: not fitted, the identity)
    method: str = "platt_on_val"

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ``prob`` (float64)."""
        z = self.slope * logit(np.asarray(prob, dtype=np.float64)) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "Platt":
        """The calibration a fold's meta.json records (the identity when it records none)."""
        return cls() if not record else cls(float(record["slope"]), float(record["intercept"]), int(record["n"]),
                                            str(record.get("method", "platt_on_val")))


def logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(prob, EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p))


def fit_platt(prob: Sequence[float], y_true: Sequence[int], *, seed: int = 0) -> Platt:
    """Fit Platt scaling on validation predictions; the identity when they hold a single class.

    Raises:
        ValueError: ``prob`` and ``y_true`` differ in length.
    """
    from sklearn.linear_model import LogisticRegression  # only the train stage fits

    p, y = np.asarray(prob, dtype=np.float64), np.asarray(y_true, dtype=int)
    if len(p) != len(y):
        raise ValueError(f"calibration: {len(p)} probabilities for {len(y)} labels")
    if len(np.unique(y)) < 2:
        return Platt()
    model = LogisticRegression(C=1.0, random_state=seed).fit(logit(p)[:, None], y)
    slope = float(model.coef_[0, 0])
    if slope <= 0:
        # The validation scans rank against the network (or not at all): calibration may rescale a network's
        # scores, never reverse or flatten them, which would be training on the validation part. Identity.
        return Platt(n=int(len(y)), method="identity_on_val (fitted slope <= 0)")
    return Platt(slope, float(model.intercept_[0]), int(len(y)))
