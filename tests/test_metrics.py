"""Tests of spinedxa.metrics: scikit-learn agreement, patient bootstrap, McNemar, DeLong, curves, output files, and the
pooled out-of-fold record (per-fold mean and SD, patient-level view)."""

from __future__ import annotations

import json
import math
from math import comb

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from spinedxa import metrics as M
from spinedxa.contracts import predictions as predictions_contract


def _cohort(n_patients: int, images_per_patient: int = 1, seed: int = 0, signal: float = 1.0):
    """A fake test set: labels per patient, noisy probabilities; every image of a patient is identical."""
    rng = np.random.default_rng(seed)
    y_pat = rng.integers(0, 2, n_patients)
    p_pat = 1.0 / (1.0 + np.exp(-(signal * (2 * y_pat - 1) + rng.normal(0, 1.2, n_patients))))
    y = np.repeat(y_pat, images_per_patient)
    p = np.repeat(p_pat, images_per_patient)
    pids = np.repeat([f"P{i:03d}" for i in range(n_patients)], images_per_patient)
    return y, p, pids


FIXED = {
    "balanced": ([0, 0, 1, 1, 0, 1, 1, 0], [0.1, 0.6, 0.8, 0.4, 0.3, 0.9, 0.55, 0.2]),
    "imbalanced": ([1, 1, 1, 1, 1, 0, 0, 1, 1, 0], [0.9, 0.8, 0.3, 0.7, 0.6, 0.2, 0.65, 0.51, 0.95, 0.05]),
    "ties": ([0, 1, 0, 1, 1, 0], [0.5, 0.5, 0.2, 0.8, 0.5, 0.5]),
    "random": tuple(arr.tolist() for arr in _cohort(40, seed=3)[:2]),
}


@pytest.mark.parametrize("name", sorted(FIXED))
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_point_metrics_equal_sklearn(name: str, threshold: float) -> None:
    y, p = (np.asarray(a) for a in FIXED[name])
    pred = (p >= threshold).astype(int)
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred),
        "recall": skm.recall_score(y, pred),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "f1": skm.f1_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "mcc": skm.matthews_corrcoef(y, pred),
        "roc_auc": skm.roc_auc_score(y, p),
        "pr_auc": skm.average_precision_score(y, p),
        "brier": skm.brier_score_loss(y, p),
    }
    got = M.point_metrics(y, p, threshold)
    assert set(got) == set(M.METRIC_KEYS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize(
    "y, p, undefined, zero",
    [
        ([1, 1, 1], [0.9, 0.2, 0.7], {"roc_auc", "pr_auc", "balanced_accuracy", "specificity"}, set()),
        ([0, 0, 0], [0.9, 0.2, 0.7], {"roc_auc", "pr_auc", "balanced_accuracy", "recall"}, {"precision", "f1"}),
        ([0, 0, 0], [0.1, 0.2, 0.3], {"roc_auc", "pr_auc", "balanced_accuracy", "recall"}, {"precision", "f1"}),
        # Nothing predicted positive: scikit-learn's conventions give precision, F1 and MCC 0, not "undefined".
        ([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], set(), {"precision", "f1", "mcc", "recall"}),
    ],
)
def test_point_metrics_undefined_are_nan(y, p, undefined, zero) -> None:
    got = M.point_metrics(y, p, 0.5)
    assert {k for k, v in got.items() if math.isnan(v)} == undefined
    assert {k for k in zero if got[k] == 0.0} == zero


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([0, 1], [0.5], "equal length"),
        ([], [], "no predictions"),
        ([0, 2], [0.1, 0.2], "0/1"),
        ([0, 1], [0.1, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.1, float("nan")], "finite"),
    ],
)
def test_invalid_inputs_raise(y, p, match) -> None:
    with pytest.raises(M.MetricsInputError, match=match):
        M.point_metrics(np.asarray(y), np.asarray(p), 0.5)


def test_summarize_keys_and_cis_contain_point_estimate() -> None:
    y, p, pids = _cohort(30, images_per_patient=2, seed=1)
    rec = M.summarize(y, p, pids, threshold=0.5, n_resamples=300, seed=0)
    for key in M.METRIC_KEYS:
        assert rec[f"{key}_ci_low"] <= rec[key] <= rec[f"{key}_ci_high"], key
        assert rec[f"{key}_ci_low"] < rec[f"{key}_ci_high"], key
        assert rec[f"{key}_ci_skipped"] == 0, key
    assert (rec["n_test"], rec["n_test_patients"]) == (60, 30)
    assert rec["tp"] + rec["fp"] + rec["tn"] + rec["fn"] == 60
    assert rec["tp"] == int(np.sum((p >= 0.5) & (y == 1)))
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN anywhere


def test_bootstrap_resamples_patients_not_images() -> None:
    """Copying every patient's image k times must not narrow a patient-level interval (it would at image level)."""
    y1, p1, pid1 = _cohort(25, images_per_patient=1, seed=2)
    yk, pk, pidk = _cohort(25, images_per_patient=4, seed=2)
    single = M.bootstrap_intervals(y1, p1, pid1, threshold=0.5, n_resamples=500, seed=11)
    by_patient = M.bootstrap_intervals(yk, pk, pidk, threshold=0.5, n_resamples=500, seed=11)
    by_image = M.bootstrap_intervals(yk, pk, np.arange(len(yk)), threshold=0.5, n_resamples=500, seed=11)
    for key in ("accuracy", "roc_auc", "brier"):
        # Each metric is invariant to replicating all samples and the same patients are drawn: the same interval.
        assert (by_patient[key].low, by_patient[key].high) == pytest.approx((single[key].low, single[key].high)), key
        width = single[key].high - single[key].low
        assert by_image[key].high - by_image[key].low < 0.75 * width, key  # ~ width / sqrt(4) at image level


def test_bootstrap_weights_draw_whole_patients() -> None:
    pids = np.array(["a", "a", "a", "b", "c", "c"])
    w = M.patient_bootstrap_weights(pids, 50, seed=2)
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4]].sum(axis=1) == 3).all()  # three patients drawn per resample
    assert len({tuple(row) for row in w}) > 5  # and the draws vary


@pytest.mark.parametrize("threshold", [0.5, 0.35])
def test_weighted_metrics_equal_point_metrics_on_replicated_resamples(threshold: float) -> None:
    """The vectorised bootstrap formulas agree with scikit-learn on every resample (ties and one-class rows too)."""
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
    p = np.array([0.2, 0.8, 0.5, 0.5, 0.3, 0.35, 0.9, 0.1, 0.6, 0.35])
    pids = np.array(["a", "a", "b", "c", "c", "d", "e", "e", "f", "g"])
    weights = np.vstack([M.patient_bootstrap_weights(pids, 40, seed=1), np.r_[np.ones(3), np.zeros(7)]])
    got = M.weighted_metrics(y, p, weights, threshold)
    for r, row in enumerate(weights):
        idx = np.repeat(np.arange(len(y)), row.astype(int))
        expected = M.point_metrics(y[idx], p[idx], threshold)
        for key in M.METRIC_KEYS:
            assert got[key][r] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), (r, key)


def test_single_class_resamples_are_skipped_and_counted() -> None:
    # Two patients, one per class: about half the resamples hold a single class, where ROC-AUC is undefined.
    y, p, pids = np.array([0, 0, 1]), np.array([0.2, 0.3, 0.8]), np.array(["n", "n", "o"])
    cis = M.bootstrap_intervals(y, p, pids, threshold=0.5, n_resamples=200, seed=0)
    assert 50 < cis["roc_auc"].n_skipped < 150
    assert cis["roc_auc"].n_used + cis["roc_auc"].n_skipped == 200
    assert cis["accuracy"].n_skipped == 0
    assert (cis["roc_auc"].low, cis["roc_auc"].high) == (1.0, 1.0)


def test_all_resamples_undefined_gives_none_interval() -> None:
    rec = M.summarize(np.array([1, 1]), np.array([0.7, 0.8]), ["p", "q"], threshold=0.5, n_resamples=20, seed=0)
    assert rec["roc_auc"] is None and rec["roc_auc_ci_low"] is None and rec["roc_auc_ci_skipped"] == 20
    json.dumps(rec, allow_nan=False)


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (1, 6, 2 * (comb(7, 0) + comb(7, 1)) / 2**7),  # 0.125
        (8, 2, 2 * (comb(10, 0) + comb(10, 1) + comb(10, 2)) / 2**10),  # 0.109375
        (3, 3, 1.0),
        (0, 0, 1.0),
    ],
)
def test_mcnemar_exact_matches_hand_computed_binomial(b: int, c: int, expected: float) -> None:
    # Build predictions with 5 images both right, b images only A right, c images only B right, 2 both wrong.
    y = np.ones(5 + b + c + 2, dtype=int)
    a = np.r_[np.ones(5 + b), np.zeros(c), np.zeros(2)].astype(int)
    bb = np.r_[np.ones(5), np.zeros(b), np.ones(c), np.zeros(2)].astype(int)
    res = M.mcnemar_exact(y, a, bb)
    assert (res.both_right, res.b, res.c, res.both_wrong) == (5, b, c, 2)
    assert res.p_value == pytest.approx(expected, abs=1e-12)


def _delong_slow(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) from the definition: psi kernel over all m x n pairs (independent of the midrank form)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # k x m x n
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    aucs = psi.mean(axis=(1, 2))
    k = len(scores)
    cov = np.empty((k, k))
    for r in range(k):
        for s in range(k):
            s10 = np.sum((v10[r] - aucs[r]) * (v10[s] - aucs[s])) / (m - 1)
            s01 = np.sum((v01[r] - aucs[r]) * (v01[s] - aucs[s])) / (n - 1)
            cov[r, s] = s10 / m + s01 / n
    return aucs, cov


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_fast_equals_definition_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    a = np.round(np.clip(0.5 + 0.3 * (2 * y - 1) * rng.random(60) + rng.normal(0, 0.2, 60), 0, 1), 1)  # many ties
    b = np.clip(0.5 + 0.1 * (2 * y - 1) + rng.normal(0, 0.25, 60), 0, 1)
    aucs, cov = M.delong_covariance(y, np.vstack([a, b]))
    aucs_slow, cov_slow = _delong_slow(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, aucs_slow, atol=1e-12)
    np.testing.assert_allclose(cov, cov_slow, atol=1e-12)
    assert aucs[0] == pytest.approx(skm.roc_auc_score(y, a)) and aucs[1] == pytest.approx(skm.roc_auc_score(y, b))


def test_delong_se_agrees_with_paired_bootstrap() -> None:
    """The DeLong standard error of the AUC difference matches an image-level paired bootstrap (independent images)."""
    rng = np.random.default_rng(7)
    n = 200
    y = rng.integers(0, 2, n)
    latent = (2 * y - 1) * 0.8 + rng.normal(0, 1, n)
    a = 1 / (1 + np.exp(-(latent + rng.normal(0, 0.5, n))))
    b = 1 / (1 + np.exp(-(0.6 * latent + rng.normal(0, 1.0, n))))
    res = M.delong_test(y, a, b)
    boot = M.paired_bootstrap_auc(y, a, b, np.arange(n), n_resamples=2000, seed=3)  # one "patient" per image
    assert boot.difference == pytest.approx(res.difference)
    assert res.se == pytest.approx(boot.se, rel=0.15)
    assert res.ci_low < res.difference < res.ci_high
    assert 0.0 <= res.p_value <= 1.0


def test_delong_identical_models_has_no_variance() -> None:
    y, p, _ = _cohort(20, seed=2)
    res = M.delong_test(y, p, p)
    assert res.difference == 0.0 and res.se == 0.0 and math.isnan(res.p_value)


def test_delong_rejects_too_few_of_a_class() -> None:
    with pytest.raises(M.MetricsInputError, match="2 positives"):
        M.delong_test(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), np.array([0.3, 0.2, 0.1]))


def test_paired_bootstrap_auc() -> None:
    y, p, pids = _cohort(30, images_per_patient=2, seed=4)
    same = M.paired_bootstrap_auc(y, p, p, pids, n_resamples=100, seed=0)
    assert same.difference == 0.0 and (same.interval.low, same.interval.high) == (0.0, 0.0) and same.p_value == 1.0
    noise = np.random.default_rng(0).random(len(y))
    worse = M.paired_bootstrap_auc(y, p, noise, pids, n_resamples=200, seed=0)
    assert worse.difference == pytest.approx(skm.roc_auc_score(y, p) - skm.roc_auc_score(y, noise))
    assert worse.interval.low <= worse.difference <= worse.interval.high
    assert worse.p_value is not None and worse.p_value < 0.05


def test_curve_tables() -> None:
    y, p, _ = _cohort(40, seed=6)
    roc = M.roc_table(y, p)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert (roc.iloc[0][["fpr", "tpr"]].tolist(), roc.iloc[-1][["fpr", "tpr"]].tolist()) == ([0, 0], [1, 1])
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(skm.roc_auc_score(y, p))
    pr = M.pr_table(y, p)
    assert list(pr.columns) == ["recall", "precision", "threshold"] and pr["threshold"].isna().sum() == 1
    cal = M.calibration_table(y, p)
    assert list(cal.columns) == ["mean_predicted", "fraction_positive", "count"]
    assert cal["count"].sum() == len(y)
    bins = np.minimum((p * 10).astype(int), 9)
    expected = pd.Series(y).groupby(bins).mean().to_numpy()
    np.testing.assert_allclose(cal["fraction_positive"], expected)


def test_write_and_read_evaluation(tmp_path) -> None:
    y, p, pids = _cohort(12, seed=8)
    sources = [f"{'osteoporosis' if t else 'normal'}/scan_{i:04d}.dcm" for i, t in enumerate(y)]
    preds = M.predictions_frame(sources, pids, y, p, classes=("normal", "osteoporosis"), threshold=0.5)
    rec = M.summarize(y, p, pids, threshold=0.5, n_resamples=20, seed=0)
    M.write_evaluation(preds, rec, metrics_path=tmp_path / "m.json", predictions_path=tmp_path / "p.csv",
                       plots_dir=tmp_path / "plots")
    back = M.read_predictions(tmp_path / "p.csv")
    assert list(back.columns) == [*predictions_contract.COLUMNS, "prob_normal", "prob_osteoporosis"]
    assert (back["fold"] == 0).all()  # no folds given: one fold, 0
    assert list(back["source"]) == sorted(sources)  # written in source order
    back = back.set_index("source").loc[sources]
    assert (back["actual"] == np.where(y == 1, "osteoporosis", "normal")).all()
    assert (back["predicted"] == np.where(p >= 0.5, "osteoporosis", "normal")).all()
    back = back.reset_index()
    assert json.loads((tmp_path / "m.json").read_text())["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == ["calibration.csv", "pr.csv", "roc.csv"]
    back.drop(columns=["prob"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(M.MetricsInputError, match="prob"):
        M.read_predictions(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        M.read_predictions(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------ out of fold


def _oof(n_patients: int = 30, folds: int = 3, seed: int = 11) -> pd.DataFrame:
    """Pooled out-of-fold predictions: two scans for every third patient, patients dealt into folds."""
    y, p, pids = _cohort(n_patients, seed=seed)
    rows = []
    for i, (t, prob, pid) in enumerate(zip(y, p, pids)):
        for visit in range(2 if i % 3 == 0 else 1):
            rows.append({"source": f"s{i:03d}_{visit}.dcm", "patient_id": pid, "y": t,
                         "prob": float(np.clip(prob + 0.05 * visit, 0, 1)), "fold": i % folds})
    frame = pd.DataFrame(rows)
    return M.predictions_frame(frame["source"], frame["patient_id"], frame["y"].to_numpy(), frame["prob"].to_numpy(),
                               classes=("normal", "osteoporosis"), threshold=0.5, folds=frame["fold"])


def test_predictions_frame_keeps_the_fold() -> None:
    preds = _oof()
    assert list(preds.columns) == [*predictions_contract.COLUMNS, "prob_normal", "prob_osteoporosis"]
    assert sorted(preds["fold"].unique()) == [0, 1, 2]


def test_fold_summary_is_the_mean_and_sd_of_the_folds() -> None:
    preds = _oof()
    summary = M.fold_summary(preds, 0.5)
    per_fold = [M.point_metrics(g["y_true"], g["prob"], 0.5) for _, g in preds.groupby("fold")]
    assert summary["n_folds"] == 3
    for key in M.METRIC_KEYS:
        values = [m[key] for m in per_fold]
        assert summary[f"{key}_fold_mean"] == pytest.approx(np.mean(values)), key
        assert summary[f"{key}_fold_sd"] == pytest.approx(np.std(values, ddof=1)), key


def test_fold_summary_leaves_undefined_folds_out() -> None:
    preds = _oof()
    one_class = preds[(preds["fold"] != 0) | (preds["y_true"] == 1)]  # fold 0 holds positives only: no AUC there
    summary = M.fold_summary(one_class, 0.5)
    aucs = [M.point_metrics(g["y_true"], g["prob"], 0.5)["roc_auc"] for f, g in one_class.groupby("fold") if f != 0]
    assert summary["roc_auc_fold_mean"] == pytest.approx(np.mean(aucs))
    single = M.fold_summary(preds[preds["fold"] == 1], 0.5)
    assert single["n_folds"] == 1 and single["accuracy_fold_sd"] is None  # no SD from one fold


def test_patient_level_is_the_mean_probability_per_patient() -> None:
    preds = _oof()
    patients = M.patient_level(preds, ("normal", "osteoporosis")).set_index("patient_id")
    assert list(patients.columns) == ["n_scans", "y_true", "prob", "prob_normal", "prob_osteoporosis"]
    assert len(patients) == preds["patient_id"].nunique() and patients["n_scans"].sum() == len(preds)
    for pid, group in preds.groupby("patient_id"):
        assert patients.at[pid, "prob"] == pytest.approx(group["prob"].mean())
        assert patients.at[pid, "n_scans"] == len(group)


@pytest.mark.parametrize("labels, expected", [([0], 0), ([1, 1], 1), ([0, 1], 1), ([0, 0, 1], 0)])
def test_patient_label_is_the_majority_a_tie_positive(labels: list[int], expected: int) -> None:
    preds = M.predictions_frame([f"s{i}" for i in range(len(labels))], ["P1"] * len(labels), np.array(labels),
                                np.full(len(labels), 0.5), classes=("normal", "osteoporosis"), threshold=0.5)
    assert M.patient_level(preds, ("normal", "osteoporosis"))["y_true"].tolist() == [expected]


def test_out_of_fold_record_pools_every_scan() -> None:
    preds = _oof()
    record = M.out_of_fold_record(preds, ("normal", "osteoporosis"), protocol="kfold", threshold=0.5,
                                  n_resamples=50, seed=0)
    assert (record["protocol"], record["folds"], record["n_folds"]) == ("kfold", 3, 3)
    assert record["n_test"] == len(preds) and record["n_test_patients"] == record["n_patients"] == 30
    pooled = M.point_metrics(preds["y_true"], preds["prob"], 0.5)
    for key in M.METRIC_KEYS:
        assert record[key] == pytest.approx(pooled[key]), key
        assert {f"{key}_ci_low", f"{key}_ci_high", f"{key}_fold_mean", f"{key}_fold_sd", f"patient_{key}",
                f"patient_{key}_ci_low", f"patient_{key}_ci_high"} <= set(record)
    patients = M.patient_level(preds, ("normal", "osteoporosis"))
    assert record["patient_roc_auc"] == pytest.approx(skm.roc_auc_score(patients["y_true"], patients["prob"]))
    assert record["patient_tp"] + record["patient_fp"] + record["patient_tn"] + record["patient_fn"] == 30
    json.dumps(record, allow_nan=False)  # strict JSON: undefined values are None


# ------------------------------------------------------------------------------------------ ordinal (three classes)

WHO = ("normal", "osteopenia", "osteoporosis")


def _three(n_patients: int = 40, images_per_patient: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """Three ordered classes: a noisy ordinal score turned into class probabilities."""
    rng = np.random.default_rng(seed)
    y_pat = rng.integers(0, 3, n_patients)
    score = y_pat + rng.normal(0, 0.8, n_patients)
    logits = -((score[:, None] - np.arange(3)[None, :]) ** 2)
    p_pat = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.repeat(y_pat, images_per_patient)
    p = np.repeat(p_pat, images_per_patient, axis=0)
    pids = np.repeat([f"P{i:03d}" for i in range(n_patients)], images_per_patient)
    return y, p, pids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ordinal_point_metrics_equal_sklearn(seed: int) -> None:
    y, p, _ = _three(60, seed=seed)
    m = M.point_metrics(y, p, 0.5, WHO)
    pred = p.argmax(axis=1)
    assert set(m) == set(M.metric_keys(WHO))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["brier"] == pytest.approx(np.mean(((p - np.eye(3)[y]) ** 2).sum(axis=1)))
    for k, c in enumerate(WHO):
        assert m[f"roc_auc_{c}"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
        assert m[f"recall_{c}"] == pytest.approx(skm.recall_score(y == k, pred == k))


@pytest.mark.parametrize("seed", [0, 3])
def test_ordinal_weighted_metrics_equal_point_metrics_on_replicated_resamples(seed: int) -> None:
    """A row of integer weights gives what point_metrics gives on the images repeated that many times."""
    y, p, _ = _three(30, seed=seed)
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 3, size=(5, len(y))).astype(float)
    draws = M.weighted_metrics(y, p, weights, 0.5, WHO)
    for r, w in enumerate(weights):
        idx = np.repeat(np.arange(len(y)), w.astype(int))
        point = M.point_metrics(y[idx], p[idx], 0.5, WHO)
        for key, value in point.items():
            assert draws[key][r] == pytest.approx(value, nan_ok=True), (r, key)


def test_ordinal_record_has_intervals_a_confusion_matrix_and_no_binary_counts() -> None:
    y, p, pids = _three(40, images_per_patient=2, seed=5)
    record = M.summarize(y, p, pids, threshold=0.5, n_resamples=100, seed=0, classes=WHO)
    assert "tp" not in record
    cm = record["confusion"]
    assert sum(cm[a][b] for a in WHO for b in WHO) == len(y)
    assert [sum(cm[c].values()) for c in WHO] == [int((y == k).sum()) for k in range(3)]
    for key in M.metric_keys(WHO):
        low, high = record[f"{key}_ci_low"], record[f"{key}_ci_high"]
        assert low is None or low <= high, key
    assert record["roc_auc_ci_low"] <= record["roc_auc"] <= record["roc_auc_ci_high"]
    json.dumps(record, allow_nan=False)


def test_ordinal_paired_bootstrap_is_zero_for_a_model_against_itself() -> None:
    y, p, pids = _three(40, seed=2)
    same = M.paired_bootstrap_auc(y, p, p, pids, n_resamples=50, seed=0)
    assert same.difference == 0 and same.interval.low == 0 and same.interval.high == 0
    worse = np.full_like(p, 1 / 3)
    diff = M.paired_bootstrap_auc(y, p, worse, pids, n_resamples=200, seed=0)
    assert diff.difference == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr") - 0.5)
    assert diff.interval.low > 0


def test_three_class_out_of_fold_record_and_patient_level() -> None:
    y, p, pids = _three(45, seed=9)
    sources = [f"s{i:03d}.dcm" for i in range(len(y))]
    preds = M.predictions_frame(sources, pids, y, p, classes=WHO, threshold=0.5, folds=np.arange(len(y)) % 3)
    assert list(preds.columns) == [*predictions_contract.COLUMNS, *(f"prob_{c}" for c in WHO)]
    assert (preds["pred"] == p.argmax(axis=1)).all()
    np.testing.assert_allclose(preds["prob"], p[:, 2])  # prob: the most severe class
    record = M.out_of_fold_record(preds, WHO, protocol="kfold", threshold=0.5, n_resamples=50, seed=0)
    for key in M.metric_keys(WHO):
        assert {f"{key}_fold_mean", f"patient_{key}", f"patient_{key}_ci_low"} <= set(record), key
    assert record["patient_confusion"]["osteopenia"]["osteopenia"] >= 0


@pytest.mark.parametrize("labels, expected", [([0, 2], 2), ([1, 1, 2], 1), ([0, 1, 2], 2), ([0, 0, 2], 0)])
def test_patient_label_is_the_majority_a_tie_to_the_more_severe(labels: list[int], expected: int) -> None:
    p = np.tile([0.2, 0.3, 0.5], (len(labels), 1))
    preds = M.predictions_frame([f"s{i}" for i in range(len(labels))], ["P1"] * len(labels), np.array(labels), p,
                                classes=WHO, threshold=0.5)
    assert M.patient_level(preds, WHO)["y_true"].tolist() == [expected]


# ------------------------------------------------------------------------------------------ reproducibility


def test_bootstrap_does_not_depend_on_the_pseudonyms() -> None:
    """Two clones give every patient another pseudonym (a keyed HMAC); scans in source order give the same draws,
    so every interval, the patient-level ones included, is identical (issue 17)."""
    preds = _oof()
    renamed = preds.copy()
    mapping = {pid: f"Q{hash((pid, 'other key')) & 0xFFFFFFFF:08x}" for pid in preds["patient_id"].unique()}
    renamed["patient_id"] = renamed["patient_id"].map(mapping)
    one = M.out_of_fold_record(preds, ("normal", "osteoporosis"), protocol="kfold", threshold=0.5, n_resamples=200,
                               seed=0)
    two = M.out_of_fold_record(renamed, ("normal", "osteoporosis"), protocol="kfold", threshold=0.5,
                               n_resamples=200, seed=0)
    assert one == two


def test_metrics_files_are_written_at_a_fixed_precision(tmp_path) -> None:
    M.write_metrics(tmp_path / "m.json", {"a": 0.123456789, "b": -0.0, "c": -1e-12, "d": {"e": [1.00000049, 2]},
                                          "f": None, "g": "x", "h": True})
    back = json.loads((tmp_path / "m.json").read_text())
    assert back == {"a": 0.123457, "b": 0.0, "c": 0.0, "d": {"e": [1.0, 2]}, "f": None, "g": "x", "h": True}
    assert "-0.0" not in (tmp_path / "m.json").read_text()
