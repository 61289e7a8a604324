"""spinedxa.transfer and the transfer stage: the paired ΔAUC on predictions whose AUCs are known, the small draws
(patient-grouped, stratified, independent of the pseudonyms), the disabled stage, and the whole comparison on a tiny
cohort: the train stage's condition reused from evaluate, the other trained on the same folds, small draws and the
external cohort, reports/transfer.json and MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from conftest import (REPO, dvc_argv, run_stage_main_in_fresh_interpreter, stage_main, write_cohort,
                      write_external_cohort, write_split_cohort)
from spinedxa import metrics, tracking, weights
from spinedxa.config import MODEL_NAMES, deep_merge, params_from_dict
from spinedxa.contracts import augmented as augmented_contract, predictions as predictions_contract
from spinedxa.contracts import splits as splits_contract, transfer as contract
from spinedxa.models.cnn21 import CNN21
from spinedxa.split import SplitError
from spinedxa.transfer import paired_delta, pooled, small_draws

CLASSES = ("normal", "osteoporosis")


def _params(**overlay: object):
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                     yaml.safe_load((REPO / "profiles/tiny.yaml").read_text()))
    return params_from_dict(deep_merge(raw, overlay))


def _frame(prob: np.ndarray, y: np.ndarray, patients: list[str], order: np.ndarray | None = None) -> pd.DataFrame:
    sources = [f"s{i:03d}" for i in range(len(y))]
    frame = metrics.predictions_frame(sources, patients, y, prob, classes=CLASSES, threshold=0.5)
    return frame.iloc[order].reset_index(drop=True) if order is not None else frame


def test_paired_delta_is_source_minus_scratch_on_the_same_scans_in_any_row_order() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    patients = [f"P{i // 2:03d}" for i in range(60)]  # two scans per patient: one bootstrap unit
    good, poor = np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.2, 60), 0, 1), rng.uniform(0, 1, 60)
    params = _params(evaluate={"bootstrap": 200, "seed": 3})
    delta = paired_delta(_frame(good, y, patients), _frame(poor, y, patients), params)
    assert delta["roc_auc"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, poor), abs=1e-9)
    assert delta["ci_low"] <= delta["roc_auc"] <= delta["ci_high"]
    assert (delta["n_scans"], delta["n_patients"]) == (60, 30)
    shuffled = paired_delta(_frame(good, y, patients, rng.permutation(60)), _frame(poor, y, patients), params)
    assert shuffled == delta  # rows are put in source order first: the bootstrap never depends on the file order
    same = paired_delta(_frame(good, y, patients), _frame(good, y, patients), params)
    assert (same["roc_auc"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="different scans"):
        paired_delta(_frame(good, y, patients).iloc[:50], _frame(poor, y, patients), params)
    # Small draws are pooled with the draw in the key: a scan drawn twice is two rows of one patient.
    both = paired_delta(pooled([_frame(good, y, patients)] * 2), pooled([_frame(poor, y, patients)] * 2), params,
                        ("draw", "source"))
    assert both["roc_auc"] == pytest.approx(delta["roc_auc"]) and both["n_patients"] == 30


def test_small_draws_are_patient_grouped_stratified_folds_that_ignore_the_pseudonyms(tmp_path: Path) -> None:
    table = write_split_cohort(tmp_path / "ingested", tmp_path / "splits.csv", n_patients=48, followup_every=3)
    params = _params(transfer={"small_size": 24, "small_draws": 2, "seed": 5})
    draws = small_draws(table, params)
    scans_all = table.drop_duplicates("source")
    assert len(draws) == 2 and len(scans_all) == 64
    for draw in draws:
        scans = draw.drop_duplicates("source")
        assert 18 <= len(scans) <= 30  # about small_size, in whole patients
        assert set(scans["source"]) <= set(table["source"])
        assert draw.groupby(["fold", "patient_id"])["split"].nunique().max() == 1  # a patient has one role per fold
        tested = draw[draw["split"] == "test"]
        assert tested["source"].is_unique and set(tested["source"]) == set(scans["source"])  # scored once each
        counts = draw.groupby(["fold", "split"])["label"].nunique()
        assert (counts == len(CLASSES)).all()  # every part of every fold holds both classes
        assert abs(scans["label"].eq("osteoporosis").mean() - 0.5) < 0.2  # stratified (the cohort is 50/50)
    assert set(draws[0]["source"]) != set(draws[1]["source"])  # each draw its own seed
    renamed = table.assign(patient_id="X" + table["patient_id"].str[::-1])  # other pseudonyms, same patients
    again = small_draws(renamed, params)
    for a, b in zip(draws, again):
        assert a[["source", "fold", "split"]].equals(b[["source", "fold", "split"]])
    with pytest.raises(SplitError, match=f"transfer.small_size: 70 is not below the cohort's {len(scans_all)} scans"):
        small_draws(table, _params(transfer={"small_size": 70}))
    with pytest.raises(SplitError, match="transfer.small_size: a draw of about 12"):
        small_draws(table, _params(transfer={"small_size": 12}))


def test_the_disabled_stage_writes_enabled_false_in_a_moment_without_torch(tmp_path: Path) -> None:
    argv = dvc_argv("transfer")
    code, torch_imported, seconds = run_stage_main_in_fresh_interpreter(
        "transfer", f"argv = {argv!r}; argv[argv.index('--params') + 1] = {str(REPO / 'params.yaml')!r}", tmp_path)
    assert (code, torch_imported) == (0, False)
    assert seconds < 20  # ~2 s on 2 shared cores
    assert json.loads((tmp_path / "reports/transfer.json").read_text()) == {"enabled": False}
    assert json.loads((tmp_path / "reports/transfer" / contract.DETAILS).read_text()) == {"enabled": False}


# ------------------------------------------------------------------------------------------- the whole comparison


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """The dvc.yaml layout after evaluate@cnn21: a 3-fold cohort, an external cohort, cnn21 trained (from scratch)
    and evaluated; the pretrain stage's output for cnn21 (a one-output cnn21 backbone, as it writes one)."""
    from spinedxa import evaluate
    from spinedxa.train import TrainPaths, train_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPINEDXA_THREADS", "1")
    overlay = {"train": {"models": ["cnn21"], "threads": 1, "cnn21": {"image_size": 64, "epochs": 2, "batch_size": 8}},
               "augment": {"online": False}, "evaluate": {"bootstrap": 50, "gradcam_images": 1},
               "runtime": {"train_processes": 1, "mlflow_experiment": "spinedxa-test"},
               "transfer": {"enabled": True, "models": ["cnn21"], "small_size": 20, "small_draws": 1}}
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                     yaml.safe_load((REPO / "profiles/tiny.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw, overlay)))
    params = params_from_dict(deep_merge(raw, overlay))
    write_cohort(tmp_path, n_patients=36)
    write_external_cohort(tmp_path)
    augmented_contract.write(tmp_path / "data/augmented" / augmented_contract.FILE_NAME,
                             pd.DataFrame(columns=list(augmented_contract.COLUMNS)))
    (tmp_path / "data/validated").mkdir(parents=True)
    torch.manual_seed(1)
    weights.write_pretrained("models/pretrained/cnn21", "cnn21", "cnn21",
                             weights.backbone_state(CNN21(num_classes=1)), {"wall_seconds": 12.0, "cpu": "test CPU"})
    for name in MODEL_NAMES[1:]:
        weights.write_pretrained_marker(f"models/pretrained/{name}", name)
    train_model(params, "cnn21", TrainPaths(Path("data/split/splits.csv"), Path("data/ingested"),
                                            Path("data/augmented"), Path("models/cnn21"),
                                            Path("reports/train/cnn21.csv"), Path("checkpoints/cnn21")))
    evaluate.evaluate_model(params, "cnn21", evaluate.EvaluatePaths(*(Path(p) for p in (
        "models/cnn21", "data/split/splits.csv", "data/ingested", "reports/metrics/cnn21.json",
        "reports/predictions/cnn21.csv", "reports/plots/cnn21", "reports/figures/gradcam_cnn21.png",
        "data/external", "reports/predictions/external/cnn21.csv", "reports/provenance/cnn21.json"))))
    return tmp_path


def test_the_stage_compares_pretrained_with_scratch_on_the_same_folds(project: Path) -> None:
    assert stage_main("transfer")(dvc_argv("transfer")) == 0
    record = contract.read("reports/transfer.json")
    details = contract.read_details("reports/transfer")
    entry = record["models"]["cnn21"]
    assert entry["scratch"]["available"] and entry["pretrained"]["available"]
    # The condition the train stage ran (scratch) is evaluate's predictions; the other was trained here.
    out = Path("reports/transfer/cnn21")
    scratch_full = predictions_contract.read(out / "scratch_full.csv")
    evaluated = predictions_contract.read("reports/predictions/cnn21.csv")
    assert scratch_full.equals(evaluated.sort_values("source").reset_index(drop=True))
    assert "evaluate stage" in details["conditions"]["cnn21"]["scratch"]["full_from"]
    assert details["conditions"]["cnn21"]["pretrained"]["weights"]["path"] == "models/pretrained/cnn21/model.pt"
    pre_full = predictions_contract.read(out / "pretrained_full.csv")
    assert list(pre_full["source"]) == list(scratch_full["source"])  # the same scans, each once, out of fold
    assert list(pre_full["fold"]) == list(scratch_full["fold"])  # ... by the same folds
    assert not np.allclose(pre_full["prob"], scratch_full["prob"])  # from other initial weights
    delta = entry["pretrained"]["delta"]
    expected = roc_auc_score(pre_full["y_true"], pre_full["prob"]) - roc_auc_score(scratch_full["y_true"],
                                                                                    scratch_full["prob"])
    assert delta["full"]["roc_auc"] == pytest.approx(expected, abs=1e-6)
    assert delta["full"]["n_scans"] == len(scratch_full)
    for cohort in contract.COHORTS:
        d = delta[cohort]
        assert d["ci_low"] is None or d["ci_low"] <= d["roc_auc"] <= d["ci_high"], cohort
    # The small draw: its own folds, the same for both conditions.
    draw = splits_contract.read(Path("reports/transfer") / contract.splits_name(0))
    tested = draw[draw["split"] == "test"]
    for name in ("scratch", "pretrained"):
        small = predictions_contract.read(out / f"{name}_small0.csv")
        assert dict(zip(small["source"], small["fold"])) == dict(zip(tested["source"], tested["fold"]))
    assert delta["small"]["n_scans"] == delta["small_draws"][0]["n_scans"] == len(tested) == record["small"]["n_scans"][0]
    # The external cohort: each condition's fold ensemble.
    external = predictions_contract.read("reports/predictions/external/cnn21.csv")
    assert delta["external"]["n_scans"] == len(external)
    assert record["trainings"] == 3 + 2 * 3  # pretrained on the full cohort's folds, both on the draw's
    assert record["pretrain"]["cnn21"]["wall_seconds"] == 12.0 and details["cpu"]
    assert not Path("checkpoints/transfer").exists()
    runs = [r for r in tracking.find_runs("spinedxa-test") if r["run_name"] == "transfer"]
    assert runs and runs[0]["metrics"]["transfer.models.cnn21.pretrained.delta.full.roc_auc"] == pytest.approx(
        delta["full"]["roc_auc"], abs=1e-6)
