"""Tests of spinedxa.baseline and stages/baseline.py on a tiny generated cohort.

:func:`conftest.write_cohort` writes ingested-style 16-bit PNGs and a splits CSV: osteoporosis images have a darker,
noisier central band (the "vertebrae"), so the baseline can learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, dvc_argv, stage_main, write_cohort

from spinedxa import baseline, metrics
from spinedxa.config import load_params
from spinedxa.data import ImageItem, write_image


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, Path]:
    return write_cohort(tmp_path)


def test_feature_vector_names_and_signal() -> None:
    bright, dark = np.full((40, 30), 0.2), np.full((40, 30), 0.2)
    bright[:, 9:21], dark[:, 9:21] = 0.8, 0.4
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
    write_image(tmp_path / "tiny.png", np.zeros((6, 6)))
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


def test_stage_runs_the_dvc_command_and_writes_the_evaluate_contract(
    cohort: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits, ingested = cohort
    params = (REPO / "params.yaml").read_text().replace("bootstrap: 1000", "bootstrap: 100")
    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)
    stage_main("baseline")(dvc_argv("baseline"))
    out = tmp_path / "reports"
    record = json.loads((out / "metrics/baseline.json").read_text())
    for key in metrics.METRIC_KEYS:
        assert {key, f"{key}_ci_low", f"{key}_ci_high", f"{key}_ci_skipped"} <= set(record), key
    assert record["model"] == "baseline" and record["bootstrap_resamples"] == 100
    test_rows = pd.read_csv(splits).query("split == 'test'")
    assert record["n_test"] == len(test_rows) and record["n_test_patients"] == test_rows["patient_id"].nunique()
    assert record["roc_auc"] > 0.9  # the band intensity separates the classes of the fake cohort
    preds = metrics.read_predictions(out / "predictions/baseline.csv")
    assert sorted(preds["source"]) == sorted(test_rows["source"])
    assert sorted(p.name for p in (out / "plots/baseline").iterdir()) == ["calibration.csv", "pr.csv", "roc.csv"]


def test_one_class_test_split_fails_with_the_file_name(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    splits, ingested = cohort
    frame = pd.read_csv(splits)
    frame.loc[(frame["split"] == "test") & (frame["label"] == "normal"), "split"] = "train"
    frame.to_csv(splits, index=False)
    with pytest.raises(ValueError, match=r"splits\.csv: the test split must hold both classes"):
        baseline.run_baseline(load_params(REPO / "params.yaml"), splits_csv=splits, images_dir=ingested,
                              metrics_path=tmp_path / "m.json", predictions_path=tmp_path / "p.csv",
                              plots_dir=tmp_path / "plots")
    assert not (tmp_path / "m.json").exists()
