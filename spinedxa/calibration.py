"""Per-fold probability calibration on the fold's validation part, applied wherever a fold model scores.

Pooling the out-of-fold predictions of K separately trained networks puts K probability scales on one axis: a fold
model that is over-confident for the positive class ranks all its scans above another fold's, whatever their true
classes, and the pooled ROC-AUC drops below every fold's own (measured on the default cohort: ResNet-50 folds 0.81 /
0.85 / 0.88, pooled 0.77). Each fold is therefore calibrated on its own *validation* part, which the held-out part
never touches, so every fold speaks one probability scale and the 0.5 threshold means the same in every fold:

* **binary task**: Platt scaling (Platt 1999), a logistic regression on the logit of P(positive). Two parameters
  fitted on a dozen or two validation scans: scikit-learn's L2 penalty (C = 1) keeps them from running away on a
  separable validation set. A fitted slope <= 0 would reverse the network: the identity is kept instead.
* **ordinal task** (three or more classes): temperature scaling (Guo et al. 2017), one parameter ``T`` dividing the
  log-probabilities before the softmax, fitted by minimum negative log-likelihood. It keeps every scan's predicted
  class and suits several classes; a vector of per-class Platt fits would not give probabilities that sum to one.

The same calibration is applied to the baseline's probabilities (:mod:`spinedxa.baseline`), so every model in the
report is calibrated the same way.

Every calibration maps an ``N x K`` probability matrix to an ``N x K`` probability matrix (:meth:`Calibration.apply`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: Probabilities are clipped away from 0 and 1 before taking logits (float32 softmax saturates at 1 - 6e-8).
EPS = 1e-6
#: Search interval of the temperature (log-uniform bounds): far beyond any fitted value (measured 0.5-3).
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration: ``method`` ``platt_on_val`` (``slope``, ``intercept``), ``temperature_on_val``
    (``temperature``) or an identity (``identity...``); ``n`` validation scans it was fitted on (0: not fitted)."""

    slope: float = 1.0
    intercept: float = 0.0
    temperature: float = 1.0
    n: int = 0
    method: str = "identity"

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (``N x K`` float64) of ``prob`` (``N x K``; a 1-D binary P(positive) is
        taken as ``[1 - p, p]``)."""
        p = np.asarray(prob, dtype=np.float64)
        if p.ndim == 1:
            p = np.column_stack([1.0 - p, p])
        if self.method == "platt_on_val":
            z = self.slope * logit(p[:, -1]) + self.intercept
            q = 1.0 / (1.0 + np.exp(-z))
            return np.column_stack([1.0 - q, q])
        if self.method == "temperature_on_val":
            return softmax(np.log(np.clip(p, EPS, 1.0)) / self.temperature)
        return p

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "Calibration":
        """The calibration a fold's meta.json records (the identity when it records none)."""
        if not record:
            return cls()
        return cls(float(record.get("slope", 1.0)), float(record.get("intercept", 0.0)),
                   float(record.get("temperature", 1.0)), int(record.get("n", 0)),
                   str(record.get("method", "platt_on_val")))


#: The name the train stage and older code use for a fold's calibration.
Platt = Calibration


def logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(prob, EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_platt(prob: Sequence[float] | np.ndarray, y_true: Sequence[int], *, seed: int = 0) -> Calibration:
    """Fit Platt scaling on validation P(positive) (1-D, or the last column of ``N x 2``); the identity when they
    hold a single class.

    Raises:
        ValueError: ``prob`` and ``y_true`` differ in length.
    """
    from sklearn.linear_model import LogisticRegression  # only the train and baseline stages fit

    p, y = np.asarray(prob, dtype=np.float64), np.asarray(y_true, dtype=int)
    p = p[:, -1] if p.ndim == 2 else p
    if len(p) != len(y):
        raise ValueError(f"calibration: {len(p)} probabilities for {len(y)} labels")
    if len(np.unique(y)) < 2:
        return Calibration(method="identity (one class on val)")
    model = LogisticRegression(C=1.0, random_state=seed).fit(logit(p)[:, None], y)
    slope = float(model.coef_[0, 0])
    if slope <= 0:
        # The validation scans rank against the network (or not at all): calibration may rescale a network's
        # scores, never reverse or flatten them, which would be training on the validation part. Identity.
        return Calibration(n=int(len(y)), method="identity_on_val (fitted slope <= 0)")
    return Calibration(slope=slope, intercept=float(model.intercept_[0]), n=int(len(y)), method="platt_on_val")


def fit_temperature(prob: np.ndarray, y_true: Sequence[int]) -> Calibration:
    """Fit temperature scaling on validation class probabilities (``N x K``) by minimum negative log-likelihood.

    Raises:
        ValueError: shapes disagree.
    """
    from scipy.optimize import minimize_scalar

    p, y = np.asarray(prob, dtype=np.float64), np.asarray(y_true, dtype=int)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"calibration: probabilities {p.shape} for {len(y)} labels")
    if len(np.unique(y)) < 2:
        return Calibration(method="identity (one class on val)")
    logp = np.log(np.clip(p, EPS, 1.0))

    def nll(log_t: float) -> float:
        q = softmax(logp / np.exp(log_t))
        return float(-np.mean(np.log(np.clip(q[np.arange(len(y)), y], EPS, 1.0))))

    low, high = np.log(TEMPERATURE_BOUNDS)
    best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return Calibration(temperature=float(np.exp(best.x)), n=int(len(y)), method="temperature_on_val")


def fit(prob: np.ndarray, y_true: Sequence[int], *, seed: int = 0) -> Calibration:
    """The task's calibration fitted on validation predictions: Platt for two classes, temperature for more.

    ``prob`` is ``N x K`` (or 1-D P(positive) for the binary task).
    """
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 2:
        return fit_platt(p, y_true, seed=seed)
    return fit_temperature(p, y_true)
