"""Test-set metrics shared by ``evaluate@<model>``, ``baseline`` and ``report``.

* Point estimates come from scikit-learn (one definition for every model, nothing re-implemented).
* 95 % confidence intervals come from a *cluster* bootstrap: patients are resampled with replacement and every image
  of a drawn patient enters the resample, because images of one patient (baseline and follow-up scans) are not
  independent; an image-level bootstrap would understate the width of the intervals. All resamples are scored at
  once as a weight matrix (:func:`weighted_metrics`, checked against scikit-learn resample by resample in the tests).
* Paired comparisons: exact McNemar test on the thresholded predictions (statsmodels) and DeLong's test for two
  correlated ROC-AUCs in the fast midrank form of Sun & Xu (2014), plus a paired patient bootstrap of the AUC
  difference that, unlike DeLong, respects the clustering by patient.
* Curves (ROC, precision-recall, calibration) as tables in the column layout of docs/CONTRACTS.md for DVC plots.

**Tasks** (:mod:`spinedxa.task`). Binary (two classes): ``y_true == 1`` is the positive class (osteoporosis) and
``prob`` the predicted probability of it (a 1-D array, or the second column of an ``N x 2`` matrix). Ordinal (three
or more ordered classes, the WHO's normal < osteopenia < osteoporosis): ``prob`` is the ``N x K`` matrix of class
probabilities and the predicted class its argmax; the metrics are accuracy, balanced accuracy, macro F1, MCC,
quadratic-weighted Cohen's kappa (the classes are ordered; Cohen 1968), macro one-vs-rest ROC-AUC and average
precision, the multi-class Brier score (sum over classes, Brier 1950) and per class the one-vs-rest ROC-AUC, recall and
precision, all with the same patient-bootstrap intervals; paired comparisons use the macro ROC-AUC. Which set applies
is decided once, from the shape of ``prob`` and the task's classes (:func:`metric_keys`), never by a caller.

Curves and calibration tables are drawn for the last (positive / most severe) class against the rest.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from statsmodels.stats.contingency_tables import mcnemar

from spinedxa.contracts import jsonfile, predictions as predictions_contract, table as table_contract
from spinedxa.task import Task

#: Metric keys, in report order. Each appears in the metrics JSON with ``_ci_low``/``_ci_high``/``_ci_skipped``.
METRIC_KEYS: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "balanced_accuracy",
    "mcc",
    "roc_auc",
    "pr_auc",
    "brier",
)
#: Ordinal (three or more classes) metric keys before the per-class ones (:func:`metric_keys`). ``f1`` is macro F1,
#: ``roc_auc`` and ``pr_auc`` the macro one-vs-rest averages.
ORDINAL_KEYS: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "f1", "mcc", "kappa_quadratic", "roc_auc", "pr_auc", "brier",
)
#: Per-class metrics of the ordinal task, ``<metric>_<class>``.
PER_CLASS_KEYS: tuple[str, ...] = ("roc_auc", "recall", "precision")
#: Equal-width probability bins of the calibration curve: 10 bins of 0.1 is the usual reliability-diagram
#: resolution (Niculescu-Mizil & Caruana 2005); with a few dozen test images most bins still hold a few images.
CALIBRATION_BINS = 10
#: Two-sided 95 % intervals.
CI_LEVEL = 0.95


class MetricsInputError(ValueError):
    """Labels, probabilities or patient ids given to a metric are malformed (wrong shape, range or values)."""


def default_classes(n_classes: int) -> tuple[str, ...]:
    """Class names for a bare probability matrix (``class0``, ``class1``, ...)."""
    return tuple(f"class{k}" for k in range(n_classes))


def task_of(prob: np.ndarray | Sequence[float], classes: Sequence[str] | None = None) -> Task:
    """The task a probability array belongs to: 1-D (P of the positive class) or ``N x 2`` is binary; ``N x K``
    with ``K >= 3`` ordinal, with ``classes`` (default :func:`default_classes`) naming the columns.

    Raises:
        MetricsInputError: ``classes`` does not match the number of columns.
    """
    p = np.asarray(prob)
    k = 2 if p.ndim == 1 else p.shape[1]
    names = tuple(classes) if classes is not None else default_classes(k)
    if len(names) != k:
        raise MetricsInputError(f"{len(names)} class names {list(names)} for {k} probability columns")
    return Task(names)


def metric_keys(classes: Sequence[str]) -> tuple[str, ...]:
    """The metric keys of the task with these classes, in report order: :data:`METRIC_KEYS` (binary) or
    :data:`ORDINAL_KEYS` followed by ``<metric>_<class>`` for each of :data:`PER_CLASS_KEYS` and class."""
    task = Task(tuple(classes))
    if task.is_binary:
        return METRIC_KEYS
    return (*ORDINAL_KEYS, *(f"{m}_{c}" for m in PER_CLASS_KEYS for c in task.classes))


def positive_prob(prob: np.ndarray) -> np.ndarray:
    """P(last class): the 1-D array itself, or the last column of a probability matrix."""
    p = np.asarray(prob, dtype=float)
    return p if p.ndim == 1 else p[:, -1]


def as_matrix(prob: np.ndarray) -> np.ndarray:
    """An ``N x K`` probability matrix (a 1-D binary ``prob`` becomes ``[1 - p, p]``)."""
    p = np.asarray(prob, dtype=float)
    return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p


def _check_matrix(y_true: np.ndarray, prob: np.ndarray, what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """Checks for an ``N x K`` probability matrix (``K >= 3``) and labels in ``0..K-1``."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p) or p.shape[1] < 3:
        raise MetricsInputError(f"{what}: y_true {y.shape} and prob {p.shape}: expected N labels and N x K >= 3 "
                                "probabilities")
    if len(y) == 0:
        raise MetricsInputError(f"{what}: no predictions to score")
    bad_labels = sorted(set(np.unique(y).tolist()) - set(range(p.shape[1])))
    if bad_labels:
        raise MetricsInputError(f"{what}: y_true must hold class indices 0..{p.shape[1] - 1}, found {bad_labels[:5]}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise MetricsInputError(f"{what}: prob must be finite and within [0, 1], got range [{p.min()}, {p.max()}]")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise MetricsInputError(f"{what}: each row of class probabilities must sum to 1")
    return y.astype(int), p


def _check_inputs(y_true: np.ndarray, prob: np.ndarray, what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise MetricsInputError(f"{what}: y_true {y.shape} and prob {p.shape} must be 1-D arrays of equal length")
    if len(y) == 0:
        raise MetricsInputError(f"{what}: no predictions to score")
    bad_labels = sorted(set(np.unique(y).tolist()) - {0, 1})
    if bad_labels:
        raise MetricsInputError(f"{what}: y_true must hold 0/1 only, found {bad_labels[:5]}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise MetricsInputError(f"{what}: prob must be finite and within [0, 1], got range [{p.min()}, {p.max()}]")
    return y.astype(int), p


def point_metrics(
    y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, threshold: float,
    classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """All :func:`metric_keys` from scikit-learn; ``nan`` where a metric is undefined for these labels.

    Binary (1-D ``prob`` or ``N x 2``): :data:`METRIC_KEYS` at ``threshold``; ordinal (``N x K``, ``K >= 3``): see
    :func:`ordinal_point_metrics` (argmax; ``threshold`` unused).

    Undefined (nan) means: a metric conditioned on a true class that the set lacks - recall, specificity, balanced
    accuracy, ROC-AUC, PR-AUC on a set with a single true class. Metrics with an empty *predicted* margin keep
    scikit-learn's default conventions: precision (and F1) 0 when nothing is predicted positive, MCC 0 when a margin
    is empty. A model that predicts one class for everything thus scores 0, not "undefined".

    Args:
        y_true: 0/1 labels (1 = osteoporosis).
        prob: predicted probability of class 1.
        threshold: ``prob >= threshold`` predicts class 1.
        classes: class names (needed for the per-class keys of the ordinal task).
    """
    if not task_of(prob, classes).is_binary:
        return ordinal_point_metrics(y_true, prob, classes)
    y, p = _check_inputs(y_true, prob)
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    nan = float("nan")
    with warnings.catch_warnings():
        # Undefined cases are set explicitly (zero_division, `has`, `both`); the warning adds nothing.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        # matthews_corrcoef on a one-class set: its 0 is scikit-learn's documented convention, not an error.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        precision, recall, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0.0)
        has = {c: bool((y == c).any()) for c in (0, 1)}
        return {
            "accuracy": float(skm.accuracy_score(y, pred)),
            "precision": float(precision[1]),
            "recall": float(recall[1]) if has[1] else nan,
            "specificity": float(recall[0]) if has[0] else nan,  # specificity is the recall of the negative class
            "f1": float(f1[1]),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if both else nan,
            "mcc": float(skm.matthews_corrcoef(y, pred)),
            "roc_auc": float(skm.roc_auc_score(y, p)) if both else nan,
            "pr_auc": float(skm.average_precision_score(y, p)) if both else nan,
            "brier": float(skm.brier_score_loss(y, p, pos_label=1)),
        }


def confusion_counts(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, int]:
    """``tp, fp, tn, fn`` at ``threshold`` (scikit-learn's confusion matrix)."""
    y, p = _check_inputs(y_true, prob)
    tn, fp, fn, tp = skm.confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def ordinal_point_metrics(y_true: Sequence[int] | np.ndarray, prob: np.ndarray,
                          classes: Sequence[str] | None = None) -> dict[str, float]:
    """The ordinal task's metrics (:func:`metric_keys`) from scikit-learn; ``nan`` where undefined.

    The predicted class is the argmax. ``roc_auc``/``pr_auc`` are the macro averages of the one-vs-rest values and
    undefined unless every class is present (scikit-learn's ``multi_class="ovr"`` rule); per-class values are
    undefined for a class the set lacks. Macro F1 counts every class (zero_division 0), as scikit-learn's
    ``average="macro"`` with ``labels=range(K)``.
    """
    y, p = _check_matrix(y_true, prob)
    task = task_of(p, classes)
    k = p.shape[1]
    pred = p.argmax(axis=1)
    labels = list(range(k))
    nan = float("nan")
    onehot = np.eye(k)[y]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0.0)
        present = support > 0
        per_auc = [float(skm.roc_auc_score(y == c, p[:, c])) if 0 < (y == c).sum() < len(y) else nan for c in labels]
        per_ap = [float(skm.average_precision_score(y == c, p[:, c])) if 0 < (y == c).sum() < len(y) else nan
                  for c in labels]
        kappa = skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic") if len(np.unique(y)) > 1 else nan
        out = {
            "accuracy": float(skm.accuracy_score(y, pred)),
            "balanced_accuracy": float(recall[present].mean()),
            "f1": float(np.mean(f1)),
            "mcc": float(skm.matthews_corrcoef(y, pred)),
            "kappa_quadratic": float(kappa) if np.isfinite(kappa) else nan,
            "roc_auc": float(np.mean(per_auc)) if all(np.isfinite(per_auc)) else nan,
            "pr_auc": float(np.mean(per_ap)) if all(np.isfinite(per_ap)) else nan,
            "brier": float(np.mean(((p - onehot) ** 2).sum(axis=1))),
        }
    for c, name in enumerate(task.classes):
        out[f"roc_auc_{name}"] = per_auc[c]
        out[f"recall_{name}"] = float(recall[c]) if present[c] else nan
        out[f"precision_{name}"] = float(precision[c])
    return out


def confusion_matrix(y_true: np.ndarray, prob: np.ndarray, threshold: float,
                     classes: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """``{actual class: {predicted class: count}}`` (threshold for the binary task, argmax otherwise)."""
    p = np.asarray(prob, dtype=float)
    task = task_of(p, classes)
    y = np.asarray(y_true).astype(int)
    pred = task.decide(as_matrix(p), threshold)
    cm = skm.confusion_matrix(y, pred, labels=list(range(task.n_classes)))
    return {a: {b: int(cm[i, j]) for j, b in enumerate(task.classes)} for i, a in enumerate(task.classes)}


# --- patient-level (cluster) bootstrap ------------------------------------------------------------------------------
#
# A bootstrap resample of patients is the original test set with integer weights: the weight of an image is the
# number of times its patient was drawn. Evaluating all resamples at once as a (resamples x images) weight matrix
# makes 1000 resamples take milliseconds; calling scikit-learn once per resample and metric took 25-50 ms per
# resample on the project's shared 2-core CPU (measured), i.e. most of a minute per model. The weighted formulas
# below are the textbook definitions that scikit-learn implements; tests/test_metrics.py checks them against
# point_metrics() on replicated resamples, so the point estimates and the intervals share one definition.


def patient_bootstrap_weights(patient_ids: Sequence[str] | np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Image weights of a cluster bootstrap over patients, shape ``(n_resamples, n_images)``.

    Each resample draws as many patients as there are, with replacement; every image of a drawn patient enters the
    resample (a patient drawn twice contributes all its images twice, a patient not drawn none). Passing one
    distinct id per image gives the ordinary image-level bootstrap.
    """
    if n_resamples < 1:
        raise MetricsInputError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    codes, uniques = pd.factorize(np.asarray(patient_ids))
    if (codes < 0).any():
        raise MetricsInputError("bootstrap: patient_ids contain missing values")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(uniques), size=(n_resamples, len(uniques)))
    per_patient = np.apply_along_axis(np.bincount, 1, drawn, minlength=len(uniques))
    return per_patient[:, codes].astype(float)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with nan where ``den == 0``."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def weighted_auc(y: np.ndarray, prob: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision per weight row (nan for rows holding a single class).

    ROC-AUC is the weighted Mann-Whitney statistic (ties count one half); average precision is
    ``sum_k (R_k - R_{k-1}) P_k`` over distinct score thresholds, as in ``sklearn.metrics.average_precision_score``.
    """
    levels, inverse = np.unique(prob, return_inverse=True)  # ascending distinct scores
    onehot = np.zeros((len(prob), len(levels)))
    onehot[np.arange(len(prob)), inverse] = 1.0
    pos = (weights * y) @ onehot  # resamples x levels: positive weight at each score level
    neg = (weights * (1 - y)) @ onehot
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    roc_auc = _ratio((pos * (neg_below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
    tp = np.cumsum(pos[:, ::-1], axis=1)  # thresholds from the highest score down
    fp = np.cumsum(neg[:, ::-1], axis=1)
    precision = np.nan_to_num(_ratio(tp, tp + fp))  # 0/0 only where the recall step is 0 too
    ap = _ratio((pos[:, ::-1] * precision).sum(axis=1), n_pos)
    undefined = (n_pos == 0) | (n_neg == 0)
    roc_auc[undefined] = np.nan
    ap[undefined] = np.nan
    return roc_auc, ap


def weighted_metrics(
    y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray, threshold: float,
    classes: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Every :func:`metric_keys` entry for each row of ``weights`` (shape ``resamples x images``).

    Same definitions and undefined cases as :func:`point_metrics`: a row of integer weights gives the values
    point_metrics returns on the images repeated that many times.
    """
    if not task_of(prob, classes).is_binary:
        return ordinal_weighted_metrics(y_true, prob, weights, classes)
    y, p = _check_inputs(y_true, prob)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    pred = (p >= threshold).astype(float)
    tp, fp = w @ (y * pred), w @ ((1 - y) * pred)
    fn, tn = w @ (y * (1 - pred)), w @ ((1 - y) * (1 - pred))
    total = tp + fp + fn + tn
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.zeros_like(tp)  # scikit-learn returns 0 when a margin is empty
    np.divide(tp * tn - fp * fn, mcc_den, out=mcc, where=mcc_den != 0)
    roc_auc, pr_auc = weighted_auc(y, p, w)
    return {
        "accuracy": _ratio(tp + tn, total),
        "precision": np.nan_to_num(_ratio(tp, tp + fp)),  # 0 with nothing predicted positive, as scikit-learn
        "recall": recall,
        "specificity": specificity,
        "f1": np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn)),
        "balanced_accuracy": (recall + specificity) / 2.0,  # nan when either class is absent
        "mcc": mcc,
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "brier": _ratio(w @ (p - y) ** 2, total),
    }


def ordinal_weighted_metrics(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray,
                             classes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """:func:`ordinal_point_metrics` for each row of ``weights``, from weighted confusion matrices (one per row)."""
    y, p = _check_matrix(y_true, prob)
    task = task_of(p, classes)
    k = p.shape[1]
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    onehot, pred = np.eye(k)[y], np.eye(k)[p.argmax(axis=1)]
    cm = np.einsum("rn,ni,nj->rij", w, onehot, pred)  # resamples x actual x predicted
    total = cm.sum(axis=(1, 2))
    true_n, pred_n, diag = cm.sum(axis=2), cm.sum(axis=1), np.diagonal(cm, axis1=1, axis2=2)
    recall, precision = _ratio(diag, true_n), np.nan_to_num(_ratio(diag, pred_n))
    f1 = np.nan_to_num(_ratio(2 * diag, true_n + pred_n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a class: nan, counted as skipped
        balanced = np.nanmean(np.where(true_n > 0, recall, np.nan), axis=1)
    c, s_ = diag.sum(axis=1), total
    mcc_num = c * s_ - (pred_n * true_n).sum(axis=1)
    mcc_den = np.sqrt((s_ ** 2 - (pred_n ** 2).sum(axis=1)) * (s_ ** 2 - (true_n ** 2).sum(axis=1)))
    mcc = np.zeros_like(c)
    np.divide(mcc_num, mcc_den, out=mcc, where=mcc_den != 0)
    dist = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    expected = np.einsum("ri,rj->rij", true_n, pred_n) / np.where(total > 0, total, 1.0)[:, None, None]
    kappa = 1.0 - _ratio((dist * cm).sum(axis=(1, 2)), (dist * expected).sum(axis=(1, 2)))
    kappa[(true_n > 0).sum(axis=1) < 2] = np.nan  # one true class: kappa undefined, as in the point estimate
    per_auc = np.column_stack([weighted_auc((y == j).astype(int), p[:, j], w)[0] for j in range(k)])
    per_ap = np.column_stack([weighted_auc((y == j).astype(int), p[:, j], w)[1] for j in range(k)])
    out = {
        "accuracy": _ratio(c, total),
        "balanced_accuracy": balanced,
        "f1": f1.mean(axis=1),
        "mcc": mcc,
        "kappa_quadratic": kappa,
        "roc_auc": per_auc.mean(axis=1),  # nan when a class is absent from the resample
        "pr_auc": per_ap.mean(axis=1),
        "brier": _ratio(w @ ((p - onehot) ** 2).sum(axis=1), total),
    }
    for j, name in enumerate(task.classes):
        out[f"roc_auc_{name}"] = per_auc[:, j]
        out[f"recall_{name}"] = recall[:, j]
        out[f"precision_{name}"] = precision[:, j]
    return out


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval; ``low``/``high`` are ``None`` when no resample gave a defined value."""

    low: float | None
    high: float | None
    n_used: int
    n_skipped: int


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> Interval:
    """Percentile interval of the finite ``values``; non-finite entries (undefined resamples) are counted as skipped."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    skipped = int(len(values) - len(finite))
    if len(finite) == 0:
        return Interval(None, None, 0, skipped)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(low), float(high), int(len(finite)), skipped)


def bootstrap_intervals(
    y_true: np.ndarray,
    prob: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    *,
    threshold: float,
    n_resamples: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """95 % percentile intervals of every :func:`metric_keys` entry from a patient-level (cluster) bootstrap.

    Resamples in which a metric is undefined (e.g. a single class for ROC-AUC) are skipped for that metric and
    counted in :attr:`Interval.n_skipped`. The draws depend on the order of ``patient_ids`` (patients are numbered in
    order of appearance): callers pass scans in a key-independent order (by ``source``), never by pseudonym.
    """
    if len(patient_ids) != len(y_true):
        raise MetricsInputError(f"bootstrap: {len(patient_ids)} patient ids for {len(y_true)} predictions")
    weights = patient_bootstrap_weights(patient_ids, n_resamples, seed)
    draws = weighted_metrics(y_true, prob, weights, threshold, classes)
    return {k: percentile_interval(draws[k]) for k in metric_keys(task_of(prob, classes).classes)}


def summarize(
    y_true: np.ndarray,
    prob: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    *,
    threshold: float,
    n_resamples: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The flat metrics record of docs/CONTRACTS.md (without the model identity keys).

    Keys: each metric of :func:`metric_keys`, ``<metric>_ci_low``, ``<metric>_ci_high``, ``<metric>_ci_skipped``;
    ``confusion`` (``{actual: {predicted: n}}``); for the binary task also ``tp, fp, tn, fn``; ``n_test,
    n_test_patients, threshold, bootstrap_resamples, bootstrap_seed``. Undefined values are ``None`` so that the JSON
    stays strict (no NaN).
    """
    task = task_of(prob, classes)
    point = point_metrics(y_true, prob, threshold, task.classes)
    cis = bootstrap_intervals(y_true, prob, patient_ids, threshold=threshold, n_resamples=n_resamples, seed=seed,
                              classes=task.classes)
    out: dict[str, Any] = {}
    for key in metric_keys(task.classes):
        out[key] = jsonfile.finite_or_none(point[key])
        out[f"{key}_ci_low"] = cis[key].low
        out[f"{key}_ci_high"] = cis[key].high
        out[f"{key}_ci_skipped"] = cis[key].n_skipped
    if task.is_binary:
        out.update(confusion_counts(y_true, prob, threshold))
    out["confusion"] = confusion_matrix(y_true, prob, threshold, task.classes)
    out.update(
        n_test=int(len(y_true)),
        n_test_patients=int(pd.Series(np.asarray(patient_ids)).nunique()),
        threshold=float(threshold),
        bootstrap_resamples=int(n_resamples),
        bootstrap_seed=int(seed),
    )
    return out


# --- curves -------------------------------------------------------------------------------------------------------


def roc_table(y_true: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    """ROC curve points ``fpr, tpr, threshold`` (scikit-learn; the first threshold is ``inf``: nothing positive)."""
    y, p = _check_inputs(y_true, prob)
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def pr_table(y_true: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    """Precision-recall points ``recall, precision, threshold``; the final (recall 0, precision 1) point has none."""
    y, p = _check_inputs(y_true, prob)
    precision, recall, thr = skm.precision_recall_curve(y, p)
    return pd.DataFrame({"recall": recall, "precision": precision, "threshold": np.append(thr, np.nan)})


def calibration_table(y_true: np.ndarray, prob: np.ndarray, n_bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Reliability diagram ``mean_predicted, fraction_positive, count`` over non-empty equal-width bins."""
    y, p = _check_inputs(y_true, prob)
    fraction_positive, mean_predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    # calibration_curve drops empty bins but does not return counts: bin the same way it does (searchsorted on the
    # inner edges of np.linspace(0, 1, n_bins + 1)) and keep the non-empty bins, in the same order.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    counts = counts[counts > 0]
    return pd.DataFrame({"mean_predicted": mean_predicted, "fraction_positive": fraction_positive, "count": counts})


# --- output files shared by evaluate and baseline ------------------------------------------------------------------


def predictions_frame(
    sources: Sequence[str],
    patient_ids: Sequence[str],
    y_true: np.ndarray,
    prob: np.ndarray,
    *,
    classes: Sequence[str],
    threshold: float,
    folds: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The per-image predictions table (:mod:`spinedxa.contracts.predictions`); ``actual``/``predicted`` are class
    names, ``fold`` the fold that scored each image (0 for all when ``folds`` is None).

    ``prob``: P(positive) (1-D, binary task) or the ``N x K`` class probabilities. The prediction is
    ``prob >= threshold`` for the binary task and the argmax for the ordinal one.
    """
    task = task_of(prob, classes)
    matrix = as_matrix(prob)
    y, _ = (_check_inputs(y_true, matrix) if task.is_binary else _check_matrix(y_true, matrix))
    pred = task.decide(matrix, threshold)
    names = np.asarray(task.classes, dtype=object)
    frame = pd.DataFrame(
        {
            "source": list(sources),
            "patient_id": list(patient_ids),
            "fold": np.zeros(len(y), dtype=int) if folds is None else np.asarray(folds, dtype=int),
            "label": names[y],
            "y_true": y,
            "prob": matrix[:, -1],
            "pred": pred,
            "actual": names[y],
            "predicted": names[pred],
        },
        columns=list(predictions_contract.BASE_COLUMNS),
    )
    for k, column in enumerate(predictions_contract.class_columns(task.classes)):
        frame[column] = matrix[:, k]
    return frame


def probabilities(predictions: pd.DataFrame) -> np.ndarray:
    """The ``N x K`` class probabilities of a predictions table (its ``prob_<class>`` columns)."""
    return predictions[predictions_contract.class_columns(predictions_contract.classes_of(predictions))].to_numpy(
        dtype=float)


def task_prob(predictions: pd.DataFrame) -> np.ndarray:
    """What the metrics take for a predictions table: P(positive) (binary) or the class probabilities (ordinal)."""
    p = probabilities(predictions)
    return p[:, -1] if p.shape[1] == 2 else p


def positive_curve_inputs(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(is last class, P(last class))``: the binary view the curves are drawn from (the positive class of the
    binary task, the most severe class against the rest in the ordinal one)."""
    last = len(predictions_contract.classes_of(predictions)) - 1
    return (predictions["y_true"].to_numpy() == last).astype(int), predictions["prob"].to_numpy(dtype=float)


#: Fixed precision of every number in a metrics file: an identical re-run gives identical bytes (README).
METRICS_DECIMALS = 6


def rounded(value: Any, decimals: int = METRICS_DECIMALS) -> Any:
    """``value`` with every float rounded to ``decimals`` (``-0.0`` written as ``0.0``), recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        out = round(value, decimals)
        return 0.0 if out == 0 else out
    if isinstance(value, Mapping):
        return {k: rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, decimals) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return rounded(value.item(), decimals)
    return value


def write_metrics(path: str | Path, record: Mapping[str, Any]) -> None:
    """Write a metrics record (a DVC metric) at the fixed precision :data:`METRICS_DECIMALS`."""
    jsonfile.write(path, rounded(dict(record)))


def write_evaluation(
    predictions: pd.DataFrame,
    record: Mapping[str, object],
    *,
    metrics_path: str | Path,
    predictions_path: str | Path,
    plots_dir: str | Path,
) -> None:
    """Write the metrics JSON, the predictions CSV and ``roc.csv``/``pr.csv``/``calibration.csv`` (all atomic).

    The curves are those of the last class against the rest (:func:`positive_curve_inputs`).
    """
    y, p = positive_curve_inputs(predictions)
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    tables = {"roc.csv": roc_table(y, p), "pr.csv": pr_table(y, p), "calibration.csv": calibration_table(y, p)}
    for name, frame in tables.items():
        table_contract.write(plots_dir / name, frame.round(METRICS_DECIMALS), list(frame.columns))
    predictions_contract.write(predictions_path, predictions)
    write_metrics(metrics_path, record)


def fold_summary(predictions: pd.DataFrame, threshold: float) -> dict[str, float | int | None]:
    """Per-fold point metrics as ``<metric>_fold_mean`` and ``<metric>_fold_sd`` (sample SD over the folds).

    The pooled out-of-fold metrics (:func:`summarize`) are the headline; the spread over folds shows how much a
    result depends on which patients a model was trained on. A metric undefined in a fold is left out of its mean.
    """
    classes = predictions_contract.classes_of(predictions)
    per_fold = [point_metrics(g["y_true"].to_numpy(), task_prob(g), threshold, classes)
                for _, g in predictions.groupby("fold")]
    out: dict[str, float | int | None] = {"n_folds": len(per_fold)}
    for key in metric_keys(classes):
        values = np.array([m[key] for m in per_fold], dtype=float)
        values = values[np.isfinite(values)]
        out[f"{key}_fold_mean"] = jsonfile.finite_or_none(values.mean()) if len(values) else None
        out[f"{key}_fold_sd"] = jsonfile.finite_or_none(values.std(ddof=1)) if len(values) > 1 else None
    return out


def patient_level(predictions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The clinical view: one row per patient with the mean predicted class probabilities over their scans.

    A patient's label is the majority label of their scans, a tie going to the class listed later (the more severe
    one; as the split stratifies). Columns ``patient_id, n_scans, y_true, prob`` and ``prob_<class>``; patients in
    order of their first scan by ``source`` (a key-independent order: the bootstrap numbers patients in this order,
    so the intervals do not depend on the pseudonyms).
    """
    classes = list(classes)
    order = predictions.sort_values("source", kind="stable")
    grouped = order.groupby("patient_id", sort=False)
    counts = pd.crosstab(order["patient_id"], order["y_true"]).reindex(columns=range(len(classes)), fill_value=0)
    first = list(grouped.groups)  # order of first appearance
    counts = counts.loc[first]
    label = counts[counts.columns[::-1]].idxmax(axis=1).astype(int)  # ties: the later (more severe) class
    columns = predictions_contract.class_columns(classes)
    means = grouped[columns].mean().loc[first]
    out = pd.DataFrame({
        "patient_id": first,
        "n_scans": grouped.size().loc[first].to_numpy(),
        "y_true": label.to_numpy(),
        "prob": means[columns[-1]].to_numpy(),
    })
    for column in columns:
        out[column] = means[column].to_numpy()
    return out


def patient_summary(predictions: pd.DataFrame, classes: Sequence[str], *, threshold: float, n_resamples: int,
                    seed: int) -> dict[str, Any]:
    """Metrics of :func:`patient_level`, keys prefixed ``patient_`` (intervals: an ordinary bootstrap of patients)."""
    patients = patient_level(predictions, classes)
    record = summarize(patients["y_true"].to_numpy(), task_prob(patients), patients["patient_id"].to_numpy(),
                       threshold=threshold, n_resamples=n_resamples, seed=seed, classes=classes)
    keys = metric_keys(classes)
    keep = [*keys, *(f"{k}_ci_{s}" for k in keys for s in ("low", "high"))]
    keep += ["tp", "fp", "tn", "fn"] if Task(tuple(classes)).is_binary else ["confusion"]
    return {f"patient_{k}": record[k] for k in keep} | {"n_patients": int(len(patients))}


def out_of_fold_record(
    predictions: pd.DataFrame, classes: Sequence[str], *, protocol: str, threshold: float, n_resamples: int, seed: int
) -> dict[str, Any]:
    """The metrics record of docs/CONTRACTS.md for the pooled out-of-fold predictions of one model.

    Pooled metrics with patient-bootstrap intervals (:func:`summarize`; ``n_test`` is the number of scans scored),
    per-fold mean and SD (:func:`fold_summary`), patient-level metrics (:func:`patient_summary`), ``protocol``
    and ``folds``. Scans are taken in ``source`` order (key-independent bootstrap draws).
    """
    predictions = predictions.sort_values("source", kind="stable")
    record: dict[str, Any] = dict(summarize(
        predictions["y_true"].to_numpy(), task_prob(predictions), predictions["patient_id"].to_numpy(),
        threshold=threshold, n_resamples=n_resamples, seed=seed, classes=classes))
    record.update(fold_summary(predictions, threshold))
    record.update(patient_summary(predictions, classes, threshold=threshold, n_resamples=n_resamples, seed=seed))
    record.update(protocol=protocol, folds=int(predictions["fold"].nunique()))
    return record


def external_record(predictions: pd.DataFrame, classes: Sequence[str], *, threshold: float, n_resamples: int,
                    seed: int) -> dict[str, Any]:
    """The external cohort's metrics, keys prefixed ``external_`` (``external_n`` scans of ``external_patients``),
    with patient-bootstrap intervals; scans in ``source`` order."""
    predictions = predictions.sort_values("source", kind="stable")
    record = summarize(predictions["y_true"].to_numpy(), task_prob(predictions), predictions["patient_id"].to_numpy(),
                       threshold=threshold, n_resamples=n_resamples, seed=seed, classes=classes)
    out = {f"external_{k}": v for k, v in record.items()
           if k not in ("threshold", "bootstrap_resamples", "bootstrap_seed", "n_test", "n_test_patients")}
    out.update(external_n=int(record["n_test"]), external_patients=int(record["n_test_patients"]))
    return out


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a predictions CSV (:func:`spinedxa.contracts.predictions.read`), raising :class:`MetricsInputError`."""
    try:
        return predictions_contract.read(path)
    except table_contract.TableError as exc:
        raise MetricsInputError(str(exc)) from None


# --- paired comparisons ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test: ``b`` = A right/B wrong, ``c`` = A wrong/B right."""

    both_right: int
    b: int
    c: int
    both_wrong: int
    p_value: float


def mcnemar_exact(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test of two classifiers' thresholded predictions on the same images (statsmodels)."""
    y = np.asarray(y_true).astype(int)
    a_right = np.asarray(pred_a).astype(int) == y
    b_right = np.asarray(pred_b).astype(int) == y
    if not (len(y) == len(a_right) == len(b_right)):
        raise MetricsInputError(f"mcnemar: lengths differ: y {len(y)}, a {len(a_right)}, b {len(b_right)}")
    table = np.array(
        [
            [np.sum(a_right & b_right), np.sum(a_right & ~b_right)],
            [np.sum(~a_right & b_right), np.sum(~a_right & ~b_right)],
        ]
    )
    result = mcnemar(table, exact=True)
    return McNemarResult(int(table[0, 0]), int(table[0, 1]), int(table[1, 0]), int(table[1, 1]), float(result.pvalue))


@dataclass(frozen=True)
class DeLongResult:
    """DeLong test of ``auc_a - auc_b`` on paired predictions; ``p_value``/``z`` are nan when the variance is 0."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float


def delong_covariance(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of ``k`` score vectors and their DeLong covariance matrix, by the fast algorithm of Sun & Xu (2014).

    Sun X, Xu W. "Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
    operating characteristic curves." IEEE Signal Processing Letters 21(11):1389-1393, 2014. Midranks replace the
    O(m n) kernel comparisons of DeLong, DeLong & Clarke-Pearson (1988): the structural components are
    ``V10_i = (Tz_i - Tx_i) / n`` for the m positives and ``V01_j = 1 - (Tz_j - Ty_j) / m`` for the n negatives.

    Args:
        y_true: 0/1 labels, both classes present.
        scores: array ``k x N`` (one row per classifier).

    Returns:
        ``(aucs, cov)`` with shapes ``(k,)`` and ``(k, k)``.
    """
    y = np.asarray(y_true).astype(int)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != len(y):
        raise MetricsInputError(f"delong: scores have {s.shape[1]} columns for {len(y)} labels")
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise MetricsInputError(f"delong: needs at least 2 positives and 2 negatives, got {m} and {n}")
    tx = stats.rankdata(pos, axis=1)  # midranks ("average") within the positives ...
    ty = stats.rankdata(neg, axis=1)  # ... within the negatives ...
    tz = stats.rankdata(np.hstack([pos, neg]), axis=1)  # ... and in the pooled sample
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, level: float = CI_LEVEL) -> DeLongResult:
    """Two-sided DeLong test of equal ROC-AUC for two classifiers scored on the same images.

    DeLong treats images as independent; with repeat scans of a patient the true variance is somewhat larger, which
    is why the report also gives the paired patient bootstrap of the difference (:func:`paired_bootstrap_auc`).
    """
    aucs, cov = delong_covariance(y_true, np.vstack([prob_a, prob_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= 1e-15:  # identical rankings, or both AUCs at 0 or 1: no sampling variance to test against
        return DeLongResult(float(aucs[0]), float(aucs[1]), diff, 0.0, float("nan"), float("nan"), diff, diff)
    se = math.sqrt(var)
    z = diff / se
    q = stats.norm.ppf(0.5 + level / 2.0)
    return DeLongResult(
        float(aucs[0]), float(aucs[1]), diff, se, z, float(2.0 * stats.norm.sf(abs(z))), diff - q * se, diff + q * se
    )


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Paired patient bootstrap of ``auc_a - auc_b``: point difference, its bootstrap SE, interval, p-value."""

    difference: float
    se: float | None
    interval: Interval
    p_value: float | None


def paired_bootstrap_auc(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    patient_ids: Sequence[str] | np.ndarray,
    *,
    n_resamples: int,
    seed: int,
) -> PairedBootstrapResult:
    """Bootstrap the ROC-AUC difference of two classifiers, resampling patients (both models see the same resample).

    Binary: the ROC-AUC of P(positive) (1-D or ``N x 2``); ordinal (``N x K``): the macro one-vs-rest ROC-AUC.
    Resamples in which the AUC is undefined are skipped and counted. The p-value is the usual percentile-bootstrap one:
    twice the smaller share of differences on either side of 0 (bounded by 1).
    """
    if np.asarray(prob_a).shape != np.asarray(prob_b).shape:
        raise MetricsInputError(f"paired bootstrap: predictions of shapes {np.asarray(prob_a).shape} and "
                                f"{np.asarray(prob_b).shape} differ")
    weights = patient_bootstrap_weights(patient_ids, n_resamples, seed)
    if task_of(prob_a).is_binary:
        y, pa = _check_inputs(y_true, prob_a)
        _, pb = _check_inputs(y_true, prob_b)
        diff = float(skm.roc_auc_score(y, pa) - skm.roc_auc_score(y, pb))
        draws = weighted_auc(y, pa, weights)[0] - weighted_auc(y, pb, weights)[0]
    else:
        y, pa = _check_matrix(y_true, prob_a)
        _, pb = _check_matrix(y_true, prob_b)
        diff = float(ordinal_point_metrics(y, pa)["roc_auc"] - ordinal_point_metrics(y, pb)["roc_auc"])
        draws = (ordinal_weighted_metrics(y, pa, weights)["roc_auc"]
                 - ordinal_weighted_metrics(y, pb, weights)["roc_auc"])
    interval = percentile_interval(draws)
    finite = draws[np.isfinite(draws)]
    if len(finite) == 0:
        return PairedBootstrapResult(diff, None, interval, None)
    se = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    p_value = float(min(1.0, 2.0 * min(np.mean(finite <= 0.0), np.mean(finite >= 0.0))))
    return PairedBootstrapResult(diff, se, interval, p_value)
