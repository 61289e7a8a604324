"""Tests of spinedxa.baseline and stages/baseline.py on a tiny generated cohort.

:func:`write_cohort` (also used by test_evaluate.py and test_report.py) writes ingested-style 16-bit PNGs and a
splits CSV: osteoporosis images have a darker, noisier central band (the "vertebrae"), so the baseline can learn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from spinedxa import baseline, metrics
from spinedxa.config import load_params
from spinedxa.data import ImageItem, write_image

CLASSES = ("normal", "osteoporosis")


def write_cohort(
    root: Path, n_patients: int = 24, *, size: tuple[int, int] = (48, 32), seed: int = 0, followup_every: int = 4
) -> tuple[Path, Path]:
    """Write ``root/data/ingested/images/*.png`` and ``root/data/split/splits.csv`` (the dvc.yaml layout).

    Every ``followup_every``-th patient has two scans.

    Patients alternate classes and splits are assigned per patient (train 50 %, val 25 %, test 25 %).

    Returns:
        ``(splits_csv, ingested_dir)``.
    """
    rng = np.random.default_rng(seed)
    ingested = root / "data" / "ingested"
    rows = []
    h, w = size
    for p in range(n_patients):
        label = p % 2
        split = ("train", "train", "val", "test")[(p // 2) % 4]
        band_level = (0.75 if label == 0 else 0.5) + rng.normal(0, 0.05)
        for visit in range(2 if p % followup_every == 0 else 1):
            img = np.clip(0.15 + rng.normal(0, 0.02, (h, w)), 0, 1)
            band = slice(int(0.3 * w), int(0.7 * w))
            img[:, band] = np.clip(band_level + rng.normal(0, 0.03 + 0.05 * label, (h, band.stop - band.start)), 0, 1)
            source = f"{CLASSES[label]}/scan_{p:04d}_{visit}.dcm"
            sha = hashlib.sha256(source.encode()).hexdigest()
            rel = f"images/{sha[:16]}.png"
            write_image(ingested / rel, img)
            rows.append({"source": source, "sha256": sha, "patient_id": f"P{p:012x}", "label": CLASSES[label],
                         "image": rel, "split": split})
    splits = root / "data" / "split" / "splits.csv"
    splits.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(splits, index=False)
    return splits, ingested


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


def stage_main(verb: str):
    """``main`` of ``stages/<verb>.py``, imported from its file (stages/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{verb}", REPO / "stages" / f"{verb}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def dvc_argv(stage: str, **matrix: str) -> list[str]:
    """The arguments of ``stage``'s command in dvc.yaml (after ``python stages/<verb>.py``), matrix items filled in."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    for key, value in matrix.items():
        cmd = cmd.replace("${item." + key + "}", value)
    return shlex.split(cmd)[2:]


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
