"""spinedxa.evaluate and stages/evaluate.py: out-of-fold scoring (every scan scored once by the fold model that never
saw it), the pooled record, model checks, Grad-CAM for every model at its input shape, degenerate maps flagged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import REPO, dvc_argv, stage_main, write_cohort, write_external_cohort
from spinedxa import evaluate, metrics, tracking
from spinedxa.config import MODEL_NAMES, ConfigError, EvaluateConfig, apply_profile, load_params
from spinedxa.contracts import splits as splits_contract
from spinedxa.data import ImageItem, input_shape, part_items, stack_images
from spinedxa.files import sha256_file, write_json_atomic
from spinedxa.models import get_model, get_spec, load_trained, predict_proba

CLASSES = ["normal", "osteoporosis"]
# The smallest image_size each model accepts (its narrow side, image_size / 2, at the model's min_size): cheap on CPU.
SMALLEST = {name: 2 * get_spec(name).min_size for name in MODEL_NAMES}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared


def save_untrained(model_dir: Path, name: str, image_size: int, run_id: str | None, seed: int = 0,
                   *, zero_head: bool = False, calibration: dict | None = None, tta: str = "none") -> str:
    """Write ``model.pt`` + ``meta.json`` (docs/CONTRACTS.md) of an untrained model; return the weights' sha256.

    ``zero_head``: the last linear layer is all zeros, so the logits do not depend on the image and every Grad-CAM
    map is constant (degenerate).
    """
    torch.manual_seed(seed)
    model = get_model(name, 2)
    if zero_head:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), model_dir / "model.pt")
    digest = sha256_file(model_dir / "model.pt")
    write_json_atomic(model_dir / "meta.json", {
        "model": name, "image_size": image_size, "classes": CLASSES, "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(), "model_sha256": digest, "epochs_run": 0, "seed": seed,
        "batch_norm": False, "tta": tta, **({"calibration": calibration} if calibration else {}),
    })
    return digest


def save_fold_models(model_dir: Path, name: str, image_size: int, folds: list[int], *, parent_run: str | None = None,
                     fold_runs: dict[int, str] | None = None, zero_head: bool = False,
                     calibration: dict | None = None, tta: str = "none") -> dict[str, str]:
    """``models/<m>/fold<k>/`` for every fold (a different seed each) and ``models/<m>/meta.json``."""
    digests = {str(k): save_untrained(evaluate.fold_dir(model_dir, k), name, image_size,
                                      (fold_runs or {}).get(k), seed=k, zero_head=zero_head,
                                      calibration=calibration, tta=tta) for k in folds}
    write_json_atomic(model_dir / "meta.json", {"model": name, "mlflow_run_id": parent_run, "variant": name,
                                                "folds": folds})
    return digests


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
    model_dir = tmp_path / "models" / "cnn21" / "fold0"
    digest = save_untrained(model_dir, "cnn21", 64, None)
    meta = json.loads((model_dir / "meta.json").read_text())
    assert evaluate.check_model_dir(model_dir, meta, "cnn21", 64, CLASSES) == digest
    with pytest.raises(evaluate.ModelMismatchError, match=message):
        evaluate.check_model_dir(model_dir, {**meta, **edit}, "cnn21", 64, CLASSES)


def test_fold_dir() -> None:
    assert evaluate.fold_dir(Path("models/vgg16"), 2) == Path("models/vgg16/fold2")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradcam_maps_for_every_model_at_its_input_shape(name: str) -> None:
    """Grad-CAM works on the ROI-shaped input (H x H/2) of each model at its smallest allowed size."""
    h, w = input_shape(SMALLEST[name])
    torch.manual_seed(0)
    model = get_model(name, 2).eval()
    images = torch.rand(2, 1, h, w)
    maps = evaluate.gradcam_maps(model, name, images)
    assert maps.shape == (2, h, w)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


class _FigureSpy:
    """Records the matplotlib figures evaluate draws (titles are checked instead of pixels)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.figures: list = []
        real = evaluate.Figure

        def make(*args, **kwargs):
            fig = real(*args, **kwargs)
            self.figures.append(fig)
            return fig

        monkeypatch.setattr(evaluate, "Figure", make)

    def titles(self) -> list[str]:
        (fig,) = self.figures
        return [fig._suptitle.get_text()] + [ax.get_title() for ax in fig.axes]


def test_degenerate_maps_are_flagged_not_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    informative = rng.uniform(0, 1, (32, 16)).astype(np.float32)
    maps = np.stack([informative, np.full((32, 16), 0.5, np.float32), np.zeros((32, 16), np.float32),
                     np.full((32, 16), 0.3, np.float32) + rng.uniform(0, evaluate.DEGENERATE_SPAN / 2, (32, 16))])
    assert evaluate.degenerate_maps(maps).tolist() == [False, True, True, True]

    spy = _FigureSpy(monkeypatch)
    out = tmp_path / "gradcam.png"
    images = rng.uniform(0, 1, (4, 32, 16)).astype(np.float32)
    evaluate.write_gradcam_figure(out, images, maps, [1, 0, 1, 0], [0.7, 0.2, 0.5, 0.5], CLASSES, "vgg16")
    titles = spy.titles()
    assert "(3 of 4 maps degenerate)" in titles[0]
    assert sum(t.startswith("DEGENERATE map") for t in titles) == 3
    assert sum(t.startswith("Grad-CAM (osteoporosis)") for t in titles) == 1
    with Image.open(out) as img:
        assert img.format == "PNG" and img.height > img.width  # four rows of (scan, overlay)


def test_no_note_when_every_map_has_contrast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _FigureSpy(monkeypatch)
    maps = np.random.default_rng(1).uniform(0, 1, (2, 32, 16)).astype(np.float32)
    evaluate.write_gradcam_figure(tmp_path / "g.png", maps, maps, [1, 0], [0.6, 0.4], CLASSES, "cnn21")
    assert "degenerate" not in spy.titles()[0].lower()


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


# ------------------------------------------------------------------------------------------ the stage, out of fold


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """A working directory in the dvc.yaml layout: tiny-profile params.yaml, a 3-fold fake cohort, MLflow store."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    apply_profile(tmp_path / "params.yaml", REPO / "profiles" / "tiny.yaml")
    write_cohort(tmp_path)
    write_external_cohort(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def expected_record_keys(extra: set[str]) -> set[str]:
    """Every key of the pooled out-of-fold record (docs/CONTRACTS.md, reports/metrics/<model>.json)."""
    keys = {k + s for k in metrics.METRIC_KEYS for s in ("", "_ci_low", "_ci_high", "_ci_skipped")}
    keys |= {"tp", "fp", "tn", "fn", "confusion", "n_test", "n_test_patients", "threshold", "bootstrap_resamples",
             "bootstrap_seed"}
    keys |= {f"{k}_fold_{s}" for k in metrics.METRIC_KEYS for s in ("mean", "sd")} | {"n_folds"}
    keys |= {f"patient_{k}{s}" for k in metrics.METRIC_KEYS for s in ("", "_ci_low", "_ci_high")}
    keys |= {f"patient_{k}" for k in ("tp", "fp", "tn", "fn")} | {"n_patients", "protocol", "folds"}
    keys |= {f"external_{k}{s}" for k in metrics.METRIC_KEYS for s in ("", "_ci_low", "_ci_high", "_ci_skipped")}
    keys |= {f"external_{k}" for k in ("tp", "fp", "tn", "fn", "confusion", "n", "patients")}
    return keys | extra


def test_stage_scores_every_scan_once_out_of_fold(project: Path) -> None:
    params = load_params(project / "params.yaml")
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    table = splits_contract.read(project / "data/split/splits.csv")
    folds = splits_contract.folds(table)
    with tracking.training_run(experiment, "cnn21", params={"lr": 0.001}, tags={}) as parent:
        fold_runs = {}
        for k in folds:
            with tracking.training_run(experiment, f"cnn21/fold{k}", params={"fold": k}, tags={},
                                       parent_run_id=parent) as run_id:
                fold_runs[k] = run_id
    digests = save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, folds,
                               parent_run=parent, fold_runs=fold_runs)

    stage_main("evaluate")(dvc_argv("evaluate", model="cnn21"))

    record = json.loads((project / "reports/metrics/cnn21.json").read_text())
    # The metrics file holds numbers (and the confusion matrix); identifiers live in the provenance file beside it.
    missing = expected_record_keys({"gradcam_degenerate", "kept_epoch"}) - set(record)
    assert not missing, sorted(missing)
    assert not {k for k, v in record.items() if isinstance(v, str) and k != "protocol"}  # no ids, commits, paths
    scans = table.drop_duplicates("source")
    assert (record["protocol"], record["folds"], record["n_folds"]) == ("kfold", 3, 3)
    assert record["n_test"] == len(scans) == record["tp"] + record["fp"] + record["tn"] + record["fn"]
    assert record["n_test_patients"] == record["n_patients"] == scans["patient_id"].nunique()
    provenance = json.loads((project / "reports/provenance/cnn21.json").read_text())
    assert (provenance["model"], provenance["mlflow_run_id"], provenance["model_sha256"]) == ("cnn21", parent,
                                                                                             digests)
    assert record["bootstrap_resamples"] == params.evaluate.bootstrap
    assert 0 <= record["gradcam_degenerate"] <= params.evaluate.gradcam_images

    # Every scan scored exactly once, by the fold in which it is held out.
    preds = metrics.read_predictions(project / "reports/predictions/cnn21.csv")
    tested = splits_contract.out_of_fold(table).set_index("source")
    assert sorted(preds["source"]) == sorted(scans["source"]) and preds["source"].is_unique
    assert dict(zip(preds["source"], preds["fold"])) == tested["fold"].to_dict()
    assert dict(zip(preds["source"], preds["patient_id"])) == tested["patient_id"].to_dict()
    # Each fold's scans were scored by that fold's own model (different seeds give different probabilities).
    for k in folds:
        model, _ = load_trained(evaluate.fold_dir(project / "models/cnn21", k))
        items = part_items(project / "data/split/splits.csv", project / "data/ingested", k, "test", CLASSES)
        own = predict_proba(model, "cnn21", stack_images(items, input_shape(params.train.cnn21.image_size)))[:, 1]
        got = preds.set_index("source").loc[[it.source for it in items], "prob"].to_numpy()
        np.testing.assert_allclose(got, own, rtol=1e-5, atol=1e-6)  # predictions are written at 6 decimals

    pooled = metrics.point_metrics(preds["y_true"], preds["prob"], params.evaluate.threshold)
    assert record["roc_auc"] == pytest.approx(pooled["roc_auc"])
    per_fold = [metrics.point_metrics(g["y_true"], g["prob"], params.evaluate.threshold)["accuracy"]
                for _, g in preds.groupby("fold")]
    assert record["accuracy_fold_mean"] == pytest.approx(np.mean(per_fold))
    assert record["accuracy_fold_sd"] == pytest.approx(np.std(per_fold, ddof=1))
    for name, columns in {"roc.csv": ["fpr", "tpr", "threshold"], "pr.csv": ["recall", "precision", "threshold"],
                          "calibration.csv": ["mean_predicted", "fraction_positive", "count"]}.items():
        assert list(pd.read_csv(project / "reports/plots/cnn21" / name).columns) == columns
    with Image.open(project / "reports/figures/gradcam_cnn21.png") as img:
        assert img.format == "PNG"

    # MLflow: pooled metrics on the parent run, each fold's own metrics on its nested run.
    runs = {r["run_id"]: r for r in tracking.find_runs(experiment)}
    assert runs[parent]["metrics"]["test_roc_auc"] == pytest.approx(record["roc_auc"])
    assert runs[parent]["metrics"]["test_n_test"] == record["n_test"]
    for k, run_id in fold_runs.items():
        fold_preds = preds[preds["fold"] == k]
        assert runs[run_id]["metrics"]["test_accuracy"] == pytest.approx(
            metrics.point_metrics(fold_preds["y_true"], fold_preds["prob"], params.evaluate.threshold)["accuracy"])
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(parent)}
    assert {"cnn21.json", "cnn21.csv", "gradcam_cnn21.png", "roc.csv", "pr.csv", "calibration.csv"} <= artifacts
    assert runs[parent]["metrics"]["test_external_roc_auc"] == pytest.approx(record["external_roc_auc"])


def _paths(project: Path) -> evaluate.EvaluatePaths:
    return evaluate.EvaluatePaths(*(project / p for p in (
        "models/cnn21", "data/split/splits.csv", "data/ingested", "m.json", "p.csv", "plots", "g.png",
        "data/external", "x.csv", "prov.json")))


def test_degenerate_grad_cam_is_counted_in_the_record(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fold models whose logits ignore the image (a zero head): every map is constant, flagged and counted."""
    params = load_params(project / "params.yaml")
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2], zero_head=True)
    with caplog.at_level(logging.WARNING):
        record = evaluate.evaluate_model(params, "cnn21", _paths(project))
    n = params.evaluate.gradcam_images
    assert record["gradcam_degenerate"] == n
    assert json.loads((project / "m.json").read_text())["gradcam_degenerate"] == n
    assert f"{n} of {n} Grad-CAM maps are degenerate" in caplog.text


def test_without_run_ids_evaluates_and_warns(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = load_params(project / "params.yaml")
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2])
    with caplog.at_level(logging.WARNING):
        evaluate.evaluate_model(params, "cnn21", _paths(project))
    assert json.loads((project / "prov.json").read_text())["mlflow_run_id"] is None
    assert "no mlflow_run_id" in caplog.text
    assert (project / "g.png").is_file() and (project / "m.json").is_file()


@pytest.mark.parametrize("break_fold, error, message", [
    ("missing", FileNotFoundError, r"fold1/meta\.json: not found"),
    ("image_size", evaluate.ModelMismatchError, r"fold1/meta\.json: image_size is 96"),
])
def test_a_broken_fold_model_stops_evaluation_naming_it(project: Path, break_fold: str, error: type[Exception],
                                                        message: str) -> None:
    params = load_params(project / "params.yaml")
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2])
    fold1 = evaluate.fold_dir(project / "models/cnn21", 1)
    if break_fold == "missing":
        (fold1 / "meta.json").unlink()
    else:
        meta = json.loads((fold1 / "meta.json").read_text())
        write_json_atomic(fold1 / "meta.json", {**meta, "image_size": 96})
    with pytest.raises(error, match=message):
        evaluate.evaluate_model(params, "cnn21", _paths(project))
    assert not (project / "m.json").exists()


def test_unknown_run_id_fails(project: Path) -> None:
    params = load_params(project / "params.yaml")
    tracking.init_store(experiment=tracking.experiment_name(params.runtime.mlflow_experiment))
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2],
                     parent_run="0" * 32)
    with pytest.raises(tracking.RunNotFoundError, match="0" * 32):
        stage_main("evaluate")(dvc_argv("evaluate", model="cnn21"))


# ------------------------------------------------------------------------------------------ TTA, calibration, external


def _by_hand(model: nn.Module, images: torch.Tensor, slope: float, intercept: float) -> np.ndarray:
    """P(positive) as every published number is made, computed by hand: softmax of the logits of each image and of
    its mirror image, averaged (TTA hflip), then Platt scaling sigmoid(slope * logit(p) + intercept)."""
    model.eval()
    with torch.no_grad():
        plain = torch.softmax(model(images), dim=1)[:, 1].double().numpy()
        mirror = torch.softmax(model(torch.flip(images, dims=[3])), dim=1)[:, 1].double().numpy()
    p = np.clip((plain + mirror) / 2, 1e-6, 1 - 1e-6)
    return 1 / (1 + np.exp(-(slope * np.log(p / (1 - p)) + intercept)))


def test_tta_and_platt_scaling_are_applied_as_recorded(project: Path) -> None:
    """The path behind every published number: mirror-image TTA, then the fold's Platt scaling, both read from the
    fold's meta.json; each scan's probability checked against a hand computation (issue 17)."""
    params = load_params(project / "params.yaml")
    calibration = {"slope": 0.7, "intercept": -0.4, "n": 12, "method": "platt_on_val"}
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2],
                     calibration=calibration, tta="hflip")
    evaluate.evaluate_model(params, "cnn21", _paths(project))
    preds = metrics.read_predictions(project / "p.csv").set_index("source")
    shape = input_shape(params.train.cnn21.image_size)
    for k in (0, 1, 2):
        model, _ = load_trained(evaluate.fold_dir(project / "models/cnn21", k))
        items = part_items(project / "data/split/splits.csv", project / "data/ingested", k, "test", CLASSES)
        expected = _by_hand(model, stack_images(items, shape), 0.7, -0.4)
        got = preds.loc[[it.source for it in items], "prob"].to_numpy()
        np.testing.assert_allclose(got, expected, atol=2e-6)  # 6 decimals on disk
        np.testing.assert_allclose(preds.loc[[it.source for it in items], "prob_normal"], 1 - expected, atol=2e-6)
        # Without the calibration the numbers differ: the test can fail.
        assert np.abs(got - _by_hand(model, stack_images(items, shape), 1.0, 0.0)).max() > 1e-3


def test_external_cohort_is_scored_by_the_fold_ensemble(project: Path) -> None:
    """The external cohort's probability of each scan is the mean of the fold models' calibrated probabilities."""
    params = load_params(project / "params.yaml")
    calibration = {"slope": 1.3, "intercept": 0.2, "n": 12, "method": "platt_on_val"}
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2],
                     calibration=calibration, tta="hflip")
    record = evaluate.evaluate_model(params, "cnn21", _paths(project))
    external = metrics.read_predictions(project / "x.csv").set_index("source")
    manifest = pd.read_csv(project / "data/external/manifest.csv", dtype=str, keep_default_na=False)
    items = [ImageItem(project / "data/external" / r.roi, CLASSES.index(r.label), r.source, r.patient_id)
             for r in manifest.itertuples(index=False)]
    images = stack_images(items, input_shape(params.train.cnn21.image_size))
    folds = [load_trained(evaluate.fold_dir(project / "models/cnn21", k))[0] for k in (0, 1, 2)]
    expected = np.mean([_by_hand(m, images, 1.3, 0.2) for m in folds], axis=0)
    np.testing.assert_allclose(external.loc[[it.source for it in items], "prob"], expected, atol=2e-6)
    assert record["external_n"] == len(items) and record["external_patients"] == manifest["patient_id"].nunique()
    from sklearn.metrics import roc_auc_score

    assert record["external_roc_auc"] == pytest.approx(
        roc_auc_score([it.label for it in items], expected), abs=2e-6)


def test_a_disabled_external_cohort_is_not_scored(project: Path) -> None:
    import shutil

    params = load_params(project / "params.yaml")
    shutil.rmtree(project / "data/external")
    write_external_cohort(project, disabled=True)
    (project / "x.csv").write_text("stale")
    save_fold_models(project / "models/cnn21", "cnn21", params.train.cnn21.image_size, [0, 1, 2])
    record = evaluate.evaluate_model(params, "cnn21", _paths(project))
    assert not any(k.startswith("external_") for k in record)
    assert pd.read_csv(project / "x.csv").empty  # the DVC output exists, with no row


def test_seed_repeats_are_scored_and_their_spread_recorded(project: Path) -> None:
    """train.repeats > 1: each seed repeat's pooled out-of-fold (and external) ROC-AUC, their SD and range."""
    from sklearn.metrics import roc_auc_score

    params = load_params(project / "params.yaml")
    size = params.train.cnn21.image_size
    save_fold_models(project / "models/cnn21", "cnn21", size, [0, 1, 2])
    for k in (0, 1, 2):
        save_untrained(project / f"models/cnn21/repeat1/fold{k}", "cnn21", size, None, seed=100 + k)
    meta = json.loads((project / "models/cnn21/meta.json").read_text())
    write_json_atomic(project / "models/cnn21/meta.json", {**meta, "repeats": 2})
    record = evaluate.evaluate_model(params, "cnn21", _paths(project))
    assert record["repeats"] == 2 and record["seed_roc_auc_0"] == record["roc_auc"]
    # Repeat 1 by hand: each fold's repeat model on that fold's test part, pooled.
    shape, y, p = input_shape(size), [], []
    for k in (0, 1, 2):
        model, _ = load_trained(project / f"models/cnn21/repeat1/fold{k}")
        items = part_items(project / "data/split/splits.csv", project / "data/ingested", k, "test", CLASSES)
        p += list(predict_proba(model, "cnn21", stack_images(items, shape))[:, 1])
        y += [it.label for it in items]
    assert record["seed_roc_auc_1"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    values = [record["seed_roc_auc_0"], record["seed_roc_auc_1"]]
    assert record["seed_roc_auc_sd"] == pytest.approx(np.std(values, ddof=1))
    assert record["seed_roc_auc_range"] == pytest.approx(max(values) - min(values))
    assert {"seed_external_roc_auc_0", "seed_external_roc_auc_1", "seed_external_roc_auc_sd"} <= set(record)
