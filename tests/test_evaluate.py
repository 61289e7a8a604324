"""Tests of spinedxa.evaluate and stages/evaluate.py: model checks, Grad-CAM for every model, the stage end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, dvc_argv, stage_main, write_cohort
from PIL import Image

from spinedxa import evaluate, metrics, tracking
from spinedxa.config import MODEL_NAMES, ConfigError, EvaluateConfig, apply_profile, load_params
from spinedxa.files import sha256_file, write_json_atomic
from spinedxa.models import get_model

CLASSES = ["normal", "osteoporosis"]
# Smallest sizes the models accept (ModelSpec.min_size); tiny inputs keep VGG and Inception cheap on CPU.
GRADCAM_SIZE = {"cnn21": 64, "resnet50": 64, "vgg16": 64, "vgg19": 64, "inception_v3": 80}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared


def save_untrained(model_dir: Path, name: str, image_size: int, run_id: str | None, seed: int = 0) -> str:
    """Write models/<name>/model.pt + meta.json (docs/CONTRACTS.md) for an untrained model; return its sha256."""
    torch.manual_seed(seed)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(get_model(name, 2).state_dict(), model_dir / "model.pt")
    digest = sha256_file(model_dir / "model.pt")
    write_json_atomic(model_dir / "meta.json", {
        "model": name, "image_size": image_size, "classes": CLASSES, "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(), "model_sha256": digest, "epochs_run": 0, "seed": seed,
    })
    return digest


@pytest.mark.parametrize(
    "y, n, expected",
    [
        ([0, 0, 1, 1, 0, 1], 4, [2, 0, 3, 1]),
        ([0, 0, 1, 1, 0, 1], 1, [2]),
        ([1, 1, 0], 5, [0, 2, 1]),
        ([0, 0], 3, [0, 1]),
        ([0, 1], 0, []),
    ],
)
def test_pick_gradcam_indices_alternates_classes(y: list[int], n: int, expected: list[int]) -> None:
    assert evaluate.pick_gradcam_indices(y, n) == expected


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"model": "vgg16"}, "model is 'vgg16'"),
        ({"image_size": 96}, "image_size is 96"),
        ({"classes": ["a", "b"]}, "classes is"),
        ({"model_sha256": "0" * 64}, "weights were changed"),
    ],
)
def test_check_model_dir_rejects_mismatches(tmp_path: Path, edit: dict, message: str) -> None:
    model_dir = tmp_path / "models" / "cnn21"
    digest = save_untrained(model_dir, "cnn21", 64, None)
    meta = json.loads((model_dir / "meta.json").read_text())
    assert evaluate.check_model_dir(model_dir, meta, "cnn21", 64, CLASSES) == digest
    with pytest.raises(evaluate.ModelMismatchError, match=message):
        evaluate.check_model_dir(model_dir, {**meta, **edit}, "cnn21", 64, CLASSES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradcam_figure_for_every_model(tmp_path: Path, name: str) -> None:
    size = GRADCAM_SIZE[name]
    torch.manual_seed(0)
    model = get_model(name, 2).eval()
    images = torch.rand(2, 1, size, size)
    maps = evaluate.gradcam_maps(model, name, images)
    assert maps.shape == (2, size, size)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    out = tmp_path / f"gradcam_{name}.png"
    evaluate.write_gradcam_figure(out, images[:, 0].numpy(), maps, [1, 0], [0.7, 0.2], CLASSES, name)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.height > img.width  # two rows of (scan, overlay)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, None),
        ({"bootstrap": 0}, "evaluate.bootstrap"),
        ({"threshold": 1.0}, "evaluate.threshold"),
        ({"threshold": 0.0}, "evaluate.threshold"),
        ({"gradcam_images": 0}, "evaluate.gradcam_images"),
    ],
)
def test_evaluate_config_rejects_unusable_values(overrides: dict, message: str | None) -> None:
    values = {"seed": 0, "bootstrap": 10, "threshold": 0.5, "gradcam_images": 2, **overrides}
    if message is None:
        assert EvaluateConfig(**values).bootstrap == 10
    else:
        with pytest.raises(ConfigError, match=message):
            EvaluateConfig(**values)


def test_mlflow_metrics_keeps_defined_numbers_only() -> None:
    record = {"accuracy": 0.5, "roc_auc": None, "tp": 3, "model": "cnn21", "flag": True, "brier": float("nan")}
    assert evaluate.mlflow_metrics(record) == {"test_accuracy": 0.5, "test_tp": 3.0}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory in the dvc.yaml layout: tiny-profile params.yaml, a fake cohort, a private MLflow store."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    apply_profile(tmp_path / "params.yaml", REPO / "profiles" / "tiny.yaml")
    write_cohort(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_end_to_end_on_an_untrained_cnn21(project: Path) -> None:
    params = load_params(project / "params.yaml")
    with tracking.training_run(params.mlflow.experiment, "cnn21", params={"lr": 0.001}, tags={}) as run_id:
        pass
    digest = save_untrained(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, run_id)

    stage_main("evaluate")(dvc_argv("evaluate", model="cnn21"))

    record = json.loads((project / "reports/metrics/cnn21.json").read_text())
    expected_keys = {k + s for k in metrics.METRIC_KEYS for s in ("", "_ci_low", "_ci_high", "_ci_skipped")}
    expected_keys |= {"tp", "fp", "tn", "fn", "n_test", "n_test_patients", "threshold", "model", "mlflow_run_id",
                      "model_sha256", "bootstrap_resamples", "bootstrap_seed"}
    assert set(record) == expected_keys
    assert (record["model"], record["mlflow_run_id"], record["model_sha256"]) == ("cnn21", run_id, digest)
    assert record["bootstrap_resamples"] == params.evaluate.bootstrap
    splits = pd.read_csv(project / "data/split/splits.csv")
    test_rows = splits[splits["split"] == "test"]
    assert record["n_test"] == len(test_rows) == record["tp"] + record["fp"] + record["tn"] + record["fn"]

    preds = metrics.read_predictions(project / "reports/predictions/cnn21.csv")
    assert list(preds["source"]) == list(test_rows["source"])
    assert list(preds["patient_id"]) == list(test_rows["patient_id"])
    assert record["roc_auc"] == pytest.approx(metrics.point_metrics(preds["y_true"], preds["prob"], 0.5)["roc_auc"])
    for name, columns in {"roc.csv": ["fpr", "tpr", "threshold"], "pr.csv": ["recall", "precision", "threshold"],
                          "calibration.csv": ["mean_predicted", "fraction_positive", "count"]}.items():
        assert list(pd.read_csv(project / "reports/plots/cnn21" / name).columns) == columns
    with Image.open(project / "reports/figures/gradcam_cnn21.png") as img:
        assert img.format == "PNG"

    logged = {r["run_id"]: r for r in tracking.find_runs(params.mlflow.experiment)}[run_id]
    assert logged["metrics"]["test_roc_auc"] == pytest.approx(record["roc_auc"])
    assert logged["metrics"]["test_n_test"] == record["n_test"]
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"cnn21.json", "cnn21.csv", "gradcam_cnn21.png", "roc.csv", "pr.csv", "calibration.csv"} <= artifacts


def test_without_run_id_evaluates_and_warns(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = load_params(project / "params.yaml")
    save_untrained(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, None)
    paths = evaluate.EvaluatePaths(*(project / p for p in (
        "models/cnn21", "data/split/splits.csv", "data/ingested", "m.json", "p.csv", "plots", "g.png")))
    with caplog.at_level(logging.WARNING):
        record = evaluate.evaluate_model(params, "cnn21", paths)
    assert record["mlflow_run_id"] is None and "no mlflow_run_id" in caplog.text
    assert (project / "g.png").is_file() and (project / "m.json").is_file()


def test_unknown_run_id_fails(project: Path) -> None:
    params = load_params(project / "params.yaml")
    tracking.init_store(experiment=params.mlflow.experiment)
    save_untrained(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, "0" * 32)
    with pytest.raises(tracking.RunNotFoundError, match="0" * 32):
        stage_main("evaluate")(dvc_argv("evaluate", model="cnn21"))
