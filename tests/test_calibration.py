"""Tests for spinedxa.calibration: Platt scaling (two classes) and temperature scaling (three or more), fitted on a
fold's validation part, their records, their application to class-probability matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from spinedxa import calibration
from spinedxa.calibration import EPS, Calibration, fit_platt, fit_temperature, logit, softmax


def _skewed(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An over-confident, shifted model: true probabilities p, reported sigmoid(3 logit(p) + 1.5), labels ~ p."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.uniform(size=n) < p).astype(int)
    reported = 1.0 / (1.0 + np.exp(-(3.0 * logit(p) + 1.5)))
    return reported, y


def _overconfident_three(n: int = 600, seed: int = 0, temperature: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: true class probabilities q, labels ~ q, reported softmax(log q / temperature)."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet([2.0, 2.0, 2.0], n)
    y = np.array([rng.choice(3, p=row) for row in q])
    return softmax(np.log(q) / temperature), y


def test_identity_by_default_and_for_one_class() -> None:
    prob = np.array([0.1, 0.5, 0.9])
    assert Calibration().method == "identity"
    np.testing.assert_allclose(Calibration().apply(prob), np.column_stack([1 - prob, prob]), rtol=1e-12)
    for y in ([0, 0, 0], [1, 1, 1]):  # a one-class validation part: nothing to fit, the identity
        fitted = fit_platt(prob, y)
        assert fitted.method.startswith("identity") and fitted.n == 0
        np.testing.assert_allclose(fitted.apply(prob)[:, 1], prob)
    assert fit_platt([], []).method.startswith("identity")


def test_fit_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 probabilities for 2 labels"):
        fit_platt([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        fit_temperature(np.full((3, 3), 1 / 3), [0, 1])


def test_platt_improves_log_loss_on_a_skewed_set() -> None:
    prob, y = _skewed()
    platt = fit_platt(prob, y, seed=0)
    assert platt.n == len(y) and platt.method == "platt_on_val"
    calibrated = platt.apply(prob)[:, 1]
    assert log_loss(y, calibrated) < 0.9 * log_loss(y, prob)
    # It recovers the inverse of the distortion: slope ~ 1/3, intercept ~ -1.5/3 (the L2 penalty shrinks a little).
    assert platt.slope == pytest.approx(1 / 3, abs=0.1) and platt.intercept == pytest.approx(-0.5, abs=0.25)
    # Monotone (positive slope): the ranking, hence the fold's own ROC-AUC, is unchanged.
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, prob))
    assert fit_platt(prob, y, seed=0) == platt  # deterministic


def test_platt_takes_the_positive_column_of_a_two_class_matrix() -> None:
    prob, y = _skewed()
    matrix = np.column_stack([1 - prob, prob])
    assert calibration.fit(matrix, y) == fit_platt(prob, y)
    np.testing.assert_allclose(fit_platt(prob, y).apply(matrix), fit_platt(prob, y).apply(prob))


def test_a_reversing_fit_is_refused() -> None:
    prob, y = _skewed()
    fitted = fit_platt(1 - prob, y)  # the scores rank against the labels
    assert fitted.method.startswith("identity_on_val") and fitted.n == len(y)
    np.testing.assert_allclose(fitted.apply(1 - prob)[:, 1], 1 - prob)


def test_temperature_recovers_an_overconfident_three_class_model() -> None:
    prob, y = _overconfident_three(temperature=0.4)
    fitted = calibration.fit(prob, y)
    assert fitted.method == "temperature_on_val" and fitted.n == len(y)
    assert fitted.temperature == pytest.approx(1 / 0.4, rel=0.15)  # undoes the sharpening
    calibrated = fitted.apply(prob)
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, rtol=1e-12)
    assert log_loss(y, calibrated, labels=[0, 1, 2]) < 0.9 * log_loss(y, prob, labels=[0, 1, 2])
    np.testing.assert_array_equal(calibrated.argmax(axis=1), prob.argmax(axis=1))  # every predicted class kept


def test_temperature_by_hand() -> None:
    """softmax(log p / T), computed by hand for one row."""
    p = np.array([[0.7, 0.2, 0.1]])
    out = Calibration(temperature=2.0, n=5, method="temperature_on_val").apply(p)
    expected = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_apply_clips_saturated_probabilities() -> None:
    """float32 softmax saturates at exactly 0 and 1; their logits are clipped at EPS instead of being infinite."""
    out = Calibration(0.5, 0.1, n=10, method="platt_on_val").apply(np.array([0.0, 1.0], dtype=np.float32))
    assert np.all(np.isfinite(out)) and out.dtype == np.float64
    np.testing.assert_allclose(logit(np.array([0.0, 1.0])), [np.log(EPS / (1 - EPS)), np.log((1 - EPS) / EPS)])
    assert 0.0 < out[0, 1] < out[1, 1] < 1.0
    three = Calibration(temperature=0.5, n=3, method="temperature_on_val").apply(np.array([[1.0, 0.0, 0.0]]))
    assert np.all(np.isfinite(three)) and three[0, 0] > 0.99


@pytest.mark.parametrize("fitted", [
    Calibration(), Calibration(0.42, -0.3, n=12, method="platt_on_val"),
    Calibration(temperature=1.7, n=30, method="temperature_on_val"),
    Calibration(n=9, method="identity_on_val (fitted slope <= 0)"),
])
def test_record_round_trip(fitted: Calibration) -> None:
    """What a fold's meta.json records (through JSON) gives back the same calibration and the same probabilities."""
    record = json.loads(json.dumps(fitted.record()))
    assert set(record) == {"slope", "intercept", "temperature", "n", "method"}
    again = Calibration.from_record(record)
    assert again == fitted
    prob = np.linspace(0.01, 0.99, 7)
    matrix = np.column_stack([prob, (1 - prob) / 2, (1 - prob) / 2])
    np.testing.assert_array_equal(again.apply(prob), fitted.apply(prob))
    np.testing.assert_array_equal(again.apply(matrix), fitted.apply(matrix))


@pytest.mark.parametrize("record", [None, {}])
def test_missing_record_is_the_identity(record) -> None:
    """A fold meta.json written before calibration existed records none: apply nothing."""
    assert Calibration.from_record(record) == Calibration()


def test_record_without_method_is_platt() -> None:
    """Records written before the method key existed were Platt fits."""
    assert Calibration.from_record({"slope": 1.5, "intercept": 0.2, "n": 8}) == Calibration(
        1.5, 0.2, n=8, method="platt_on_val")
