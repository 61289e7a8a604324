"""Tests for spinedxa.calibration: Platt scaling fitted on a fold's validation part, its record, its application."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from spinedxa.calibration import EPS, Platt, fit_platt, logit


def _skewed(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An over-confident, shifted model: true probabilities p, reported sigmoid(3 logit(p) + 1.5), labels ~ p."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.uniform(size=n) < p).astype(int)
    reported = 1.0 / (1.0 + np.exp(-(3.0 * logit(p) + 1.5)))
    return reported, y


def test_identity_by_default_and_for_one_class() -> None:
    prob = np.array([0.1, 0.5, 0.9])
    assert Platt() == Platt(1.0, 0.0, 0, "platt_on_val")
    np.testing.assert_allclose(Platt().apply(prob), prob, rtol=1e-12)
    for y in ([0, 0, 0], [1, 1, 1]):  # a one-class validation part: nothing to fit, the identity
        fitted = fit_platt(prob, y)
        assert fitted == Platt() and fitted.n == 0
    assert fit_platt([], []) == Platt()


def test_fit_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        fit_platt([0.1, 0.2, 0.3], [0, 1])


def test_fit_improves_log_loss_on_a_skewed_set() -> None:
    prob, y = _skewed()
    platt = fit_platt(prob, y, seed=0)
    assert platt.n == len(y) and platt.method == "platt_on_val"
    calibrated = platt.apply(prob)
    assert log_loss(y, calibrated) < 0.9 * log_loss(y, prob)
    # It recovers the inverse of the distortion: slope ~ 1/3, intercept ~ -1.5/3 (the L2 penalty shrinks a little).
    assert platt.slope == pytest.approx(1 / 3, abs=0.1) and platt.intercept == pytest.approx(-0.5, abs=0.25)
    # Monotone (positive slope): the ranking, hence the fold's own ROC-AUC, is unchanged.
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, prob))
    assert fit_platt(prob, y, seed=0) == platt  # deterministic


def test_apply_clips_saturated_probabilities() -> None:
    """float32 softmax saturates at exactly 0 and 1; their logits are clipped at EPS instead of being infinite."""
    out = Platt(0.5, 0.1, 10).apply(np.array([0.0, 1.0], dtype=np.float32))
    assert np.all(np.isfinite(out)) and out.dtype == np.float64
    np.testing.assert_allclose(logit(np.array([0.0, 1.0])), [np.log(EPS / (1 - EPS)), np.log((1 - EPS) / EPS)])
    assert 0.0 < out[0] < out[1] < 1.0


@pytest.mark.parametrize("platt", [Platt(), Platt(0.42, -0.3, 12), Platt(2.0, 1.0, 5, "platt_on_val")])
def test_record_round_trip(platt: Platt) -> None:
    """What a fold's meta.json records (through JSON) gives back the same calibration and the same probabilities."""
    record = json.loads(json.dumps(platt.record()))
    assert record == {"slope": platt.slope, "intercept": platt.intercept, "n": platt.n, "method": platt.method}
    again = Platt.from_record(record)
    assert again == platt
    prob = np.linspace(0.01, 0.99, 7)
    np.testing.assert_array_equal(again.apply(prob), platt.apply(prob))


@pytest.mark.parametrize("record", [None, {}])
def test_missing_record_is_the_identity(record) -> None:
    """A fold meta.json written before calibration existed records none: apply nothing."""
    assert Platt.from_record(record) == Platt()


def test_record_without_method_defaults() -> None:
    assert Platt.from_record({"slope": 1.5, "intercept": 0.2, "n": 8}) == Platt(1.5, 0.2, 8, "platt_on_val")
