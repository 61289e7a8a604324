"""spinedxa.baseline and stages/baseline.py: ROI features, C chosen on each fold's validation part, the model fitted on
the fold's training part only, out-of-fold scoring of every scan, and the MLflow runs.

:func:`conftest.write_cohort` writes ROI-style 16-bit PNGs and a 3-fold split table: osteoporosis ROIs have a darker,
noisier central band (the "vertebrae"), so the baseline can learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from conftest import REPO, dvc_argv, stage_main, write_cohort, write_external_cohort
from spinedxa import baseline, calibration, metrics, tracking
from spinedxa.config import load_params
from spinedxa.contracts import png16, splits as splits_contract
from spinedxa.data import ImageItem, part_items

CLASSES = ("normal", "osteoporosis")


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    write_external_cohort(tmp_path)
    return write_cohort(tmp_path)


def _paths(tmp_path: Path, splits: Path, ingested: Path) -> baseline.BaselinePaths:
    return baseline.BaselinePaths(splits, ingested, tmp_path / "m.json", tmp_path / "p.csv", tmp_path / "plots",
                                  tmp_path / "data" / "external", tmp_path / "x.csv", tmp_path / "prov.json")


def _params(bootstrap: int = 50):
    import dataclasses

    params = load_params(REPO / "params.yaml")
    return dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, bootstrap=bootstrap))


# ------------------------------------------------------------------------------------------ features


def test_feature_vector_names_and_signal() -> None:
    bright, dark = np.full((40, 30), 0.2), np.full((40, 30), 0.2)
    bright[:, 7:23], dark[:, 7:23] = 0.8, 0.4  # covers the vertebral band (columns 25-75 %)
    fb, fd = baseline.image_features(bright), baseline.image_features(dark)
    assert fb.shape == (len(baseline.FEATURE_NAMES),) and np.isfinite(fb).all() and np.isfinite(fd).all()
    named = dict(zip(baseline.FEATURE_NAMES, fb))
    assert named["roi_mean"] == pytest.approx(0.8) and named["roi_std"] == pytest.approx(0.0)
    assert named["roi_to_image_mean"] > dict(zip(baseline.FEATURE_NAMES, fd))["roi_to_image_mean"]


def test_texture_features_see_noise() -> None:
    rng = np.random.default_rng(0)
    smooth = np.full((40, 30), 0.5)
    rough = np.clip(0.5 + rng.normal(0, 0.1, (40, 30)), 0, 1)
    fs, fr = (dict(zip(baseline.FEATURE_NAMES, baseline.image_features(x))) for x in (smooth, rough))
    assert fr["glcm_contrast"] > fs["glcm_contrast"] == 0.0
    assert fr["glcm_homogeneity"] < fs["glcm_homogeneity"] == 1.0
    assert fr["local_std_mean"] > fs["local_std_mean"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("shape", [(6, 40), (40, 12), (5, 5)])
def test_too_small_roi_is_rejected(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="too small"):
        baseline.image_features(np.zeros(shape))


def test_feature_matrix_names_the_bad_file(tmp_path: Path) -> None:
    png16.write(tmp_path / "tiny.png", np.zeros((6, 6)))
    with pytest.raises(ValueError, match="tiny.png"):
        baseline.feature_matrix([ImageItem(tmp_path / "tiny.png", 0, "x.dcm", "P0")])


def test_fit_selects_c_on_validation_and_rejects_one_class() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + rng.normal(0, 0.5, 40) > 0).astype(int)
    fitted = baseline.fit_baseline(x[:30], y[:30], x[30:], y[30:], seed=0)
    assert fitted.c in baseline.C_GRID and set(fitted.val_log_loss) == set(baseline.C_GRID)
    assert fitted.val_log_loss[fitted.c] == min(fitted.val_log_loss.values())
    assert fitted.model.predict_proba(x).shape == (40, 2)
    no_val = baseline.fit_baseline(x[:30], y[:30], x[:0], y[:0], seed=0)
    assert no_val.c == 1.0 and no_val.val_log_loss is None
    with pytest.raises(ValueError, match="only class"):
        baseline.fit_baseline(x[:10], np.zeros(10, dtype=int), x[10:], y[10:], seed=0)


# ------------------------------------------------------------------------------------------ per fold, out of fold


def test_each_fold_is_fitted_on_its_training_part_with_c_chosen_on_its_validation_part(
    cohort: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits, ingested = cohort
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    real_fit = baseline.fit_baseline

    def spy(x_train, y_train, x_val, y_val, *, seed, n_classes):
        seen.append((x_train, y_train, x_val, y_val))
        return real_fit(x_train, y_train, x_val, y_val, seed=seed, n_classes=n_classes)

    monkeypatch.setattr(baseline, "fit_baseline", spy)
    params = _params()
    record, fitted = baseline.run_baseline(params, _paths(tmp_path, splits, ingested))
    table = splits_contract.read(splits)
    assert [f.fold for f in fitted] == splits_contract.folds(table) == [0, 1, 2] and len(seen) == 3
    for fit, (x_train, y_train, x_val, y_val) in zip(fitted, seen):
        parts = {r: part_items(splits, ingested, fit.fold, r, CLASSES) for r in ("train", "val", "test")}
        # Exactly the fold's training scans, then its validation scans: never a test scan.
        np.testing.assert_allclose(x_train, baseline.feature_matrix(parts["train"]))
        np.testing.assert_allclose(x_val, baseline.feature_matrix(parts["val"]))
        assert y_train.tolist() == [it.label for it in parts["train"]]
        scaler = fit.model.named_steps["standardscaler"]
        assert scaler.n_samples_seen_ == len(parts["train"])  # the model saw the training rows only
        np.testing.assert_allclose(scaler.mean_, x_train.mean(axis=0))
        # C is the candidate with the lowest validation log-loss, each candidate fitted on the training part alone.
        for c in baseline.C_GRID:
            candidate = baseline._pipeline(params.evaluate.seed, c).fit(x_train, y_train)
            assert fit.val_log_loss[float(c)] == pytest.approx(
                log_loss(y_val, candidate.predict_proba(x_val)[:, 1], labels=[0, 1]))
        assert fit.c == min(baseline.C_GRID, key=lambda c: (fit.val_log_loss[float(c)], c))
        assert set(fit.test_metrics) == set(metrics.METRIC_KEYS)
        # Then calibrated on the validation part, like every CNN fold (Platt scaling: two classes).
        chosen = baseline._pipeline(params.evaluate.seed, fit.c).fit(x_train, y_train)
        assert fit.calibration == calibration.fit(chosen.predict_proba(x_val), y_val, seed=params.evaluate.seed)
        assert fit.calibration.method == "platt_on_val" and fit.calibration.n == len(y_val)
    assert record["baseline_c"] == [f.c for f in fitted]


def test_every_scan_is_scored_once_by_the_fold_that_holds_it_out(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    splits, ingested = cohort
    record, fitted = baseline.run_baseline(_params(), _paths(tmp_path, splits, ingested))
    table = splits_contract.read(splits)
    tested = splits_contract.out_of_fold(table).set_index("source")
    preds = metrics.read_predictions(tmp_path / "p.csv")
    assert sorted(preds["source"]) == sorted(table["source"].unique()) and preds["source"].is_unique
    assert dict(zip(preds["source"], preds["fold"])) == tested["fold"].to_dict()
    for fit in fitted:  # each fold's probabilities come from that fold's own model, calibrated on its val part
        items = part_items(splits, ingested, fit.fold, "test", CLASSES)
        own = fit.calibration.apply(fit.model.predict_proba(baseline.feature_matrix(items)))[:, 1]
        np.testing.assert_allclose(preds.set_index("source").loc[[it.source for it in items], "prob"], own,
                                   atol=1e-6)
        raw = fit.model.predict_proba(baseline.feature_matrix(items))[:, 1]
        assert np.abs(own - raw).max() > 1e-3  # calibration changed the numbers (the test can fail)
    assert (record["protocol"], record["folds"], record["n_folds"]) == ("kfold", 3, 3)
    assert record["n_test"] == len(tested) and record["n_test_patients"] == tested["patient_id"].nunique()
    assert record["n_patients"] == tested["patient_id"].nunique()
    for key in metrics.METRIC_KEYS:
        assert {key, f"{key}_ci_low", f"{key}_ci_high", f"{key}_fold_mean", f"{key}_fold_sd",
                f"patient_{key}"} <= set(record), key
    assert record["roc_auc"] > 0.9  # the band intensity separates the classes of the fake cohort
    assert record["roc_auc_ci_low"] <= record["roc_auc"] <= record["roc_auc_ci_high"]


def test_holdout_protocol_scores_the_test_part(tmp_path: Path) -> None:
    splits, ingested = write_cohort(tmp_path, protocol="holdout")
    import dataclasses

    params = _params()
    params = dataclasses.replace(params, split=dataclasses.replace(params.split, protocol="holdout"))
    record, fitted = baseline.run_baseline(params, _paths(tmp_path, splits, ingested))
    table = splits_contract.read(splits)
    assert len(fitted) == 1 and (record["protocol"], record["folds"]) == ("holdout", 1)
    assert record["n_test"] == int((table["split"] == "test").sum()) < table["source"].nunique()


@pytest.mark.parametrize("edit, message", [
    ("one_class_train", r"the training part holds only class"),
    ("empty_test", r"splits\.csv: fold 1 has no test images"),
])
def test_unusable_fold_fails_and_writes_nothing(cohort: tuple[Path, Path], tmp_path: Path, edit: str,
                                                message: str) -> None:
    splits, ingested = cohort
    table = splits_contract.read(splits)
    fold1 = table["fold"] == 1
    if edit == "one_class_train":
        table.loc[fold1 & (table["split"] == "train") & (table["label"] == "normal"), "split"] = "val"
    else:
        table.loc[fold1 & (table["split"] == "test"), "split"] = "train"
    splits_contract.write(splits, table)
    with pytest.raises(ValueError, match=message):
        baseline.run_baseline(_params(), _paths(tmp_path, splits, ingested))
    assert not (tmp_path / "m.json").exists()


def test_stage_runs_the_dvc_command_and_logs_to_mlflow(
    cohort: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    splits, _ = cohort
    params_text = (REPO / "params.yaml").read_text().replace("bootstrap: 1000", "bootstrap: 100")
    (tmp_path / "params.yaml").write_text(params_text)
    monkeypatch.chdir(tmp_path)
    stage_main("baseline")(dvc_argv("baseline"))
    out = tmp_path / "reports"
    record = json.loads((out / "metrics/baseline.json").read_text())
    provenance = json.loads((out / "provenance/baseline.json").read_text())
    assert provenance["model"] == "baseline" and record["bootstrap_resamples"] == 100
    assert record["external_n"] > 0 and (out / "predictions/external/baseline.csv").is_file()
    assert record["n_test"] == splits_contract.read(splits)["source"].nunique()
    assert sorted(p.name for p in (out / "plots/baseline").iterdir()) == ["calibration.csv", "pr.csv", "roc.csv"]

    params = load_params(tmp_path / "params.yaml")
    runs = tracking.find_runs(tracking.experiment_name(params.runtime.mlflow_experiment))
    parents = [r for r in runs if r["run_name"] == "baseline"]
    folds = sorted((r for r in runs if r["run_name"].startswith("baseline/fold")), key=lambda r: r["run_name"])
    assert len(parents) == 1 and [r["run_name"] for r in folds] == [f"baseline/fold{k}" for k in range(3)]
    assert parents[0]["metrics"]["test_roc_auc"] == pytest.approx(record["roc_auc"])
    assert parents[0]["metrics"]["test_n_test"] == record["n_test"]
    assert [float(r["params"]["c"]) for r in folds] == record["baseline_c"]
    assert all(r["tags"]["fold"] == r["run_name"][-1] for r in folds)
    assert provenance["mlflow_run_id"] == parents[0]["run_id"]  # the audit follows it
