"""Tests for spinedxa.train and stages/train.py (the stage: every fold's loaders, fit, calibration, outputs, MLflow) on
tiny generated k-fold cohorts in the contract formats (tests/train_factory.py).

cnn21 at image_size 64 (64 x 32 inputs), batch 4, one thread: a fold trains in about a second. Tests that need no
MLflow call :func:`train_fold` for one fold; :func:`train_model` (every fold, outputs, MLflow) where the stage is the
subject. DDP (two gloo processes) and ``dvc repro`` are marked slow. The units the stage calls have their own tests:
test_runtime, test_provenance, test_checkpoint, test_recipe, test_loop, test_calibration.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import spinedxa.data
import spinedxa.train
from spinedxa import tracking
from spinedxa.config import ConfigError
from spinedxa.contracts import augmented as augmented_contract, splits as splits_contract
from spinedxa.files import md5_file, sha256_file
from spinedxa.loop import CURVE_COLUMNS
from spinedxa.models import load_trained
from spinedxa.provenance import dvc_digests
from spinedxa.recipe import first_candidate_epoch
from spinedxa.runtime import FP32, select_fast_path
from spinedxa.train import DONE, LAST, FoldJob, check_config, train_fold, train_model
from train_factory import (
    CPU,
    EXPERIMENT,
    REPO,
    Killed,
    assert_same_weights,
    load_weights,
    kill_at_call,
    make_dataset,
    make_params,
    model_bytes,
    path_tolerance,
    scans_that_may_flip,
    paths_for,
    raw_params,
    train_workdir,  # noqa: F401 - the fixture
)

PATHS = paths_for("cnn21")
#: docs/CONTRACTS.md, "train@model": the keys of models/<m>/fold<k>/meta.json and of models/<m>/meta.json.
FOLD_META_KEYS = {
    "model", "variant", "batch_norm", "transform_input", "weights", "fold", "image_size", "input_shape", "classes",
    "mlflow_run_id", "mlflow_tracking_uri", "model_sha256", "data_digests", "params", "epochs_run", "best_epoch",
    "monitor", "best_value", "seed", "n_train_images", "n_val_images", "git_commit", "git_dirty", "device",
    "fast_path", "threads", "world_size",
}
MODEL_META_KEYS = {
    "model", "variant", "protocol", "folds", "weights", "mlflow_run_id", "mlflow_tracking_uri", "data_digests",
    "git_commit", "git_dirty", "device", "fast_path", "threads", "world_size",
}
#: Every curve column but the wall-clock seconds: what two runs of one training must reproduce exactly.
NUMERIC = [c for c in CURVE_COLUMNS if c != "seconds"]


@pytest.fixture
def workdir(train_workdir: Path) -> Path:  # noqa: F811 - the fixture imported above
    """cwd = a tmp repo root with a tiny 2-fold cohort, its own MLflow store, one thread (train_factory)."""
    return train_workdir


def job(params, fold: int = 0, model: str = "cnn21") -> FoldJob:
    """One fold's job as train_model makes it (the data digests as DVC computes them)."""
    return FoldJob(params, model, fold, PATHS, dvc_digests([PATHS.splits, PATHS.images, PATHS.augmented]))


def best_state(result) -> dict[str, torch.Tensor]:
    return torch.load(result.done, map_location="cpu", weights_only=True)["best_state"]


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The bytes torch.save writes for ``state`` (what model.pt holds)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def numeric(history: list[dict]) -> list[list[float]]:
    return [[row[c] for c in NUMERIC] for row in history]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- the stage's outputs


def test_training_writes_contract_outputs(workdir: Path) -> None:
    params = make_params()
    result = train_model(params, "cnn21", PATHS)
    cfg = params.train.cnn21
    expected_path = select_fast_path(CPU, True).name  # the machine decides: bf16 where the CPU computes it natively
    digests = {"data/split/splits.csv": md5_file(workdir / "data/split/splits.csv"),
               "data/ingested": dvc_digests([Path("data/ingested")])["data/ingested"],
               "data/augmented": dvc_digests([Path("data/augmented")])["data/augmented"]}
    assert digests["data/ingested"].endswith(".dir") and digests["data/augmented"].endswith(".dir")
    assert [r.fold for r in result.folds] == [0, 1]

    top = read_json(workdir / "models/cnn21/meta.json")
    assert MODEL_META_KEYS <= top.keys()
    assert top["model"] == top["variant"] == "cnn21" and top["protocol"] == "kfold" and top["folds"] == [0, 1]
    assert top["mlflow_run_id"] == result.run_id and top["data_digests"] == digests
    assert (top["fast_path"], top["device"], top["threads"], top["world_size"]) == (expected_path, "cpu", 1, 1)
    assert top["git_commit"] == "unknown" and top["git_dirty"] is None  # the tmp dir is no git work tree

    curves = pd.read_csv(workdir / "reports/train/cnn21.csv")
    assert tuple(curves.columns) == CURVE_COLUMNS
    assert curves["fold"].tolist() == [0, 0, 0, 1, 1, 1] and curves["epoch"].tolist() == [1, 2, 3] * 2

    runs = tracking.find_runs(EXPERIMENT)
    parents = [r for r in runs if r["parent_run_id"] is None]
    assert len(parents) == 1 and len(runs) == 3  # one parent run, one nested run per fold
    parent = parents[0]
    assert parent["run_id"] == result.run_id and parent["run_name"] == "cnn21" and parent["status"] == "FINISHED"
    assert parent["params"]["lr"] == str(cfg.lr) and parent["params"]["train.seed"] == "0"
    assert parent["params"]["split.protocol"] == "kfold" and parent["params"]["variant"] == "cnn21"
    assert {d["name"]: d["digest"] for d in parent["datasets"]} == {
        "splits.csv": digests["data/split/splits.csv"], "ingested": digests["data/ingested"],
        "augmented": digests["data/augmented"]}
    assert {d["context"] for d in parent["datasets"]} == {"training"}
    assert parent["models"] == []
    nested = {r["run_name"]: r for r in runs if r["parent_run_id"] == parent["run_id"]}
    assert set(nested) == {"cnn21/fold0", "cnn21/fold1"}
    for run in runs:
        assert run["status"] == "FINISHED"
        assert run["tags"]["dvc_stage"] == "train@cnn21" and run["tags"]["fast_path"] == expected_path
        assert run["tags"]["threads"] == "1" and run["tags"]["device"] == "cpu" and run["tags"]["world_size"] == "1"
        assert run["tags"]["git_commit"] == "unknown" and run["tags"]["git_dirty"] == "unknown"  # dirty: None

    for r in result.folds:
        k, out = r.fold, workdir / f"models/cnn21/fold{r.fold}"
        meta = read_json(out / "meta.json")
        assert FOLD_META_KEYS <= meta.keys()
        assert meta["model"] == meta["variant"] == "cnn21" and meta["batch_norm"] is False and meta["fold"] == k
        assert meta["weights"]["kind"] == "none" and meta["transform_input"] is False  # trained from scratch
        assert meta["image_size"] == 64 and meta["input_shape"] == [64, 32]
        assert meta["classes"] == ["normal", "osteoporosis"]
        assert meta["model_sha256"] == sha256_file(out / "model.pt") and meta["data_digests"] == digests
        assert meta["params"] == dataclasses.asdict(cfg) and meta["seed"] == 0 and meta["monitor"] == "val_auc"
        assert meta["epochs_run"] == 3 and meta["best_epoch"] >= first_candidate_epoch(cfg)
        fold_curve = curves[curves["fold"] == k].set_index("epoch")
        assert meta["best_value"] == pytest.approx(fold_curve.loc[meta["best_epoch"], "val_auc"])
        assert meta["n_train_images"] == 16 and meta["n_val_images"] == 4  # 8 scans + 8 offline copies; 4 scans
        assert meta["calibration"]["n"] == 4 and meta["calibration"] == r.calibration.record()
        assert (meta["fast_path"], meta["device"], meta["threads"], meta["world_size"]) == (expected_path, "cpu", 1, 1)
        assert meta["git_commit"] == "unknown" and meta["git_dirty"] is None
        run = nested[f"cnn21/fold{k}"]
        assert meta["mlflow_run_id"] == run["run_id"]
        assert run["params"]["fold"] == str(k) and run["params"]["n_train_images"] == "16"
        assert [step for step, _ in run["history"]["val_loss"]] == [1, 2, 3]
        assert {"train_loss", "val_auc", "val_accuracy", "lr", "seconds", "best_epoch"} <= run["history"].keys()
        assert run["metrics"]["best_epoch"] == meta["best_epoch"] and run["tags"]["fold"] == str(k)
        assert run["models"] == ["model"]  # the fold's model, with its signature
        model, loaded_meta = load_trained(out)  # the kept epoch's weights as a plain state dict
        assert not model.training and loaded_meta == meta
    assert not (workdir / "checkpoints/cnn21").exists()  # finished: a rerun trains afresh
    # No absolute path (which could name a person) anywhere in the runs or the meta files: the test store's absolute
    # sqlite path is recorded relative to the working directory (tracking.redact_uri).
    metas = [read_json(p) for p in (workdir / "models").rglob("meta.json")]
    assert {m["mlflow_tracking_uri"] for m in metas} == {tracking.redact_uri(tracking.tracking_uri())}
    assert str(workdir) not in json.dumps(runs) + json.dumps(metas)


@pytest.mark.parametrize("folds", [1, 2, 3], ids=["holdout", "2-fold", "3-fold"])
def test_each_fold_trains_only_on_its_own_train_part(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     folds: int) -> None:
    """Fold k's training set is exactly its train scans plus the offline copies of those scans; its validation set
    exactly its val scans; no file of its test part (nor any other file) is read while it trains."""
    shutil.rmtree(workdir / "data")
    cohort = make_dataset(workdir, folds=folds, n_train=6, n_val=4)
    datasets, reads = [], []

    class Recording(spinedxa.train.DXADataset):
        def __init__(self, items, *args, **kwargs) -> None:
            datasets.append([Path(it.path).as_posix() for it in items])
            super().__init__(items, *args, **kwargs)

    original_read = spinedxa.data.read_image

    def recording_read(path):
        reads.append(Path(path).as_posix())
        return original_read(path)

    monkeypatch.setattr(spinedxa.train, "DXADataset", Recording)
    monkeypatch.setattr(spinedxa.data, "read_image", recording_read)
    index = augmented_contract.read(workdir / "data/augmented/index.csv")
    params = make_params(cnn21={"epochs": 1})
    for k in cohort.folds:
        datasets.clear(), reads.clear()
        result = train_fold(job(params, k))
        train_scans = {f"data/ingested/{p}" for p in cohort.part(k, "train")}
        copies = {f"data/augmented/{p}" for p in index[index["parent_sha256"].isin(cohort.shas(k, "train"))]["image"]}
        others = set(index[~index["parent_sha256"].isin(cohort.shas(k, "train"))]["image"])
        assert others or folds == 1, "the cohort must hold copies of scans outside this fold's train part"
        val = {f"data/ingested/{p}" for p in cohort.part(k, "val")}
        test = {f"data/ingested/{p}" for p in cohort.part(k, "test")}
        train_set, val_set = datasets  # built in this order: training, then validation
        assert sorted(train_set) == sorted(train_scans | copies) and len(train_set) == len(train_scans | copies)
        assert sorted(val_set) == sorted(val)
        assert set(reads) == train_scans | copies | val  # calibration re-reads the val part, nothing else
        assert not set(reads) & test and not any("/images/" in r and "ingested" in r for r in reads)
        assert result.n_train == len(train_scans) + len(copies) == 12 and result.n_val == len(val) == 4


def test_kept_epoch_is_a_candidate_epoch_and_onecycle_steps_per_batch(workdir: Path) -> None:
    """Under one-cycle the kept epoch is the best monitored one from recipe.first_candidate_epoch on (a tie goes to
    the later epoch), and the learning rate moves once per training batch."""
    params = make_params(cnn21={"epochs": 7})
    cfg = params.train.cnn21
    first = first_candidate_epoch(cfg)
    assert 1 < first < 7
    result = train_fold(job(params))
    values = [row["val_auc"] for row in result.history]
    candidates = {e: v for e, v in enumerate(values, start=1) if e >= first}
    best = max(v for v in candidates.values())
    assert result.best_epoch == max(e for e, v in candidates.items() if v == best)  # later epochs win ties
    assert result.best_value == pytest.approx(best)
    # lr of each epoch = OneCycleLR's rate after (epoch - 1) x batches steps (16 training images / batch 4 = 4).
    steps = 4
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), max_lr=cfg.lr, total_steps=7 * steps,
        pct_start=0.3)
    expected = []
    for step in range(7 * steps):
        if step % steps == 0:
            expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-9)


def test_overfitting_a_few_images_drives_the_loss_down(workdir: Path) -> None:
    params = make_params(class_weighting=False, cnn21={"epochs": 8, "scheduler": "none", "label_smoothing": 0.0})
    losses = [row["train_loss"] for row in train_fold(job(params)).history]
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kill_after", [1, 2])
def test_killed_fold_resumes_to_byte_identical_weights(workdir: Path, kill_after: int) -> None:
    """With online augmentation (the RNG streams matter) and one-cycle (the schedule's state matters)."""
    params = make_params(augment={"online": True})
    uninterrupted = train_fold(job(params))
    weights, history = state_bytes(best_state(uninterrupted)), uninterrupted.history
    shutil.rmtree(workdir / "checkpoints")

    with pytest.raises(Killed):
        train_fold(job(params), on_epoch_end=kill_at_call(kill_after))
    fold_dir = workdir / "checkpoints/cnn21/fold0"
    assert (fold_dir / LAST).is_file() and not (fold_dir / DONE).exists()
    resumed = train_fold(job(params))
    assert resumed.resumed_from == kill_after and len(resumed.history) == 3
    assert state_bytes(best_state(resumed)) == weights
    assert numeric(resumed.history) == numeric(history)
    assert resumed.calibration == uninterrupted.calibration
    assert not (fold_dir / LAST).exists()  # replaced by done.pt


def test_killed_stage_resumes_and_skips_finished_folds(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage killed in fold 1 keeps fold 0's done.pt: the rerun trains only fold 1 (from its last epoch), gives
    byte-identical fold models, and continues the same MLflow parent run with one nested run per fold."""
    params = make_params()
    train_model(params, "cnn21", PATHS)
    uninterrupted = model_bytes(workdir / "models/cnn21")
    curves = pd.read_csv(workdir / "reports/train/cnn21.csv")
    shutil.rmtree(workdir / "models")
    before = {r["run_id"] for r in tracking.find_runs(EXPERIMENT)}

    with pytest.raises(Killed):  # fold 0's 3 epochs, then fold 1's first
        train_model(params, "cnn21", PATHS, on_epoch_end=kill_at_call(4))
    assert (workdir / "checkpoints/cnn21/fold0" / DONE).is_file()
    assert (workdir / "checkpoints/cnn21/fold1" / LAST).is_file()
    assert not (workdir / "models/cnn21").exists()

    fitted = []
    original_fit = spinedxa.train.fit

    def recording_fit(*args, **kwargs):
        fitted.append(args[6].fold)  # the FitPlan
        return original_fit(*args, **kwargs)

    monkeypatch.setattr(spinedxa.train, "fit", recording_fit)
    resumed = train_model(params, "cnn21", PATHS)
    assert fitted == [1]  # fold 0 came from its done.pt
    assert [(r.fold, r.resumed_from) for r in resumed.folds] == [(0, 3), (1, 1)]
    assert model_bytes(workdir / "models/cnn21") == uninterrupted
    again = pd.read_csv(workdir / "reports/train/cnn21.csv")
    pd.testing.assert_frame_equal(again[NUMERIC], curves[NUMERIC])

    runs = [r for r in tracking.find_runs(EXPERIMENT) if r["run_id"] not in before]
    (parent,) = [r for r in runs if r["parent_run_id"] is None]  # the killed attempt's parent run, reopened
    assert parent["run_id"] == resumed.run_id == read_json(workdir / "models/cnn21/meta.json")["mlflow_run_id"]
    nested = sorted((r["run_name"], r["parent_run_id"]) for r in runs if r["parent_run_id"] is not None)
    assert nested == [("cnn21/fold0", parent["run_id"]), ("cnn21/fold1", parent["run_id"])]
    assert all(r["status"] == "FINISHED" for r in runs)
    fold1 = next(r for r in runs if r["run_name"] == "cnn21/fold1")
    assert [step for step, _ in fold1["history"]["val_loss"]] == [1, 2, 3]


def test_finished_fold_is_skipped_unless_stale(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    params = make_params()
    first = train_fold(job(params))
    assert first.resumed_from == 0

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    with monkeypatch.context() as m:
        m.setattr(spinedxa.train, "fit", no_fit)
        again = train_fold(job(params))
    assert again.resumed_from == len(first.history) == 3
    assert numeric(again.history) == numeric(first.history) and again.calibration == first.calibration
    assert state_bytes(best_state(again)) == state_bytes(best_state(first))
    # Other params: done.pt's fingerprint no longer matches, so the fold trains again.
    with caplog.at_level("WARNING", logger="spinedxa.checkpoint"):
        changed = train_fold(job(make_params(cnn21={"lr": 0.002})))
    assert changed.resumed_from == 0 and "ignoring checkpoint checkpoints/cnn21/fold0/done.pt" in caplog.text


def test_stale_checkpoint_is_not_resumed(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Killed):
        train_fold(job(make_params()), on_epoch_end=kill_at_call(1))
    changed = make_params(cnn21={"lr": 0.002})
    with caplog.at_level("WARNING", logger="spinedxa.checkpoint"):
        result = train_fold(job(changed))
    assert result.resumed_from == 0 and len(result.history) == 3
    assert "ignoring checkpoint checkpoints/cnn21/fold0/last.pt" in caplog.text
    # ... and equals a training from scratch with the changed params.
    fresh = best_state(result)
    shutil.rmtree(workdir / "checkpoints")
    assert_same_weights(best_state(train_fold(job(changed))), fresh)


def test_checkpoint_under_another_thread_count_is_not_resumed(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The thread count changes the rounding (oneDNN splits reductions by thread), so it enters the fingerprint:
    a fold killed with one thread restarts, rather than resumes, with two."""
    with pytest.raises(Killed):
        train_fold(job(make_params()), on_epoch_end=kill_at_call(1))
    monkeypatch.setenv("SPINEDXA_THREADS", "2")
    try:
        with caplog.at_level("WARNING", logger="spinedxa.checkpoint"):
            result = train_fold(job(make_params()))
    finally:
        torch.set_num_threads(1)
    assert result.resumed_from == 0 and len(result.history) == 3 and result.runtime["threads"] == 2
    assert "ignoring checkpoint checkpoints/cnn21/fold0/last.pt" in caplog.text


def test_a_fold_of_another_fingerprint_is_not_resumed(workdir: Path) -> None:
    """Each fold has its own checkpoint directory and fingerprint: fold 1 never resumes fold 0's epochs."""
    params = make_params()
    with pytest.raises(Killed):
        train_fold(job(params, 0), on_epoch_end=kill_at_call(1))
    fold1 = train_fold(job(params, 1))
    assert fold1.resumed_from == 0 and (workdir / "checkpoints/cnn21/fold0" / LAST).is_file()
    assert train_fold(job(params, 0)).resumed_from == 1


# ------------------------------------------------------------------------------------------- reproducibility


def test_results_do_not_depend_on_the_process_count(workdir: Path) -> None:
    """runtime.train_processes 1 and 2 (folds side by side in spawned processes) give byte-identical fold models
    and identical curves and fold meta (bar the MLflow run ids): bookkeeping, never a result."""
    out = {}
    for n in (1, 2):
        train_model(make_params(runtime={"train_processes": n}), "cnn21", PATHS)
        shutil.move(workdir / "models/cnn21", workdir / f"models/p{n}")
        shutil.move(workdir / "reports/train/cnn21.csv", workdir / f"reports/train/p{n}.csv")
        out[n] = workdir / f"models/p{n}"
    assert model_bytes(out[1]) == model_bytes(out[2]) and len(model_bytes(out[1])) == 2
    curves = [pd.read_csv(workdir / f"reports/train/p{n}.csv") for n in (1, 2)]
    pd.testing.assert_frame_equal(curves[0][NUMERIC], curves[1][NUMERIC])
    for k in (0, 1):
        metas = [read_json(out[n] / f"fold{k}/meta.json") for n in (1, 2)]
        for meta in metas:
            meta.pop("mlflow_run_id")
        assert metas[0] == metas[1]


@pytest.mark.parametrize("path", ["this-machine", "cpu_fp32_channels_last"])
def test_fast_path_costs_no_accuracy(workdir: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """fp32 against the fast path on the same fold: the same validation results within the fast path's rounding.

    ``this-machine`` takes what this CPU selects (bf16 + channels_last with native bf16, else fp32 + channels_last);
    ``cpu_fp32_channels_last`` forces the AVX2 path on any CPU. The tolerance comes from the path taken
    (train_factory.path_tolerance); test_loop bounds a single fast step against fp32 more tightly.
    """
    if path != "this-machine":
        monkeypatch.setattr("spinedxa.runtime.cpu_has_native_bf16", lambda flags=None: False)
    expected = select_fast_path(CPU, True)
    plain = train_fold(job(make_params(fast=False)))
    shutil.rmtree(workdir / "checkpoints")
    fast = train_fold(job(make_params(fast=True)))
    assert plain.runtime["fast_path"] == FP32.name and fast.runtime["fast_path"] == expected.name != FP32.name
    rtol, flips = path_tolerance(expected), scans_that_may_flip(expected, plain.n_val)
    for a, b in zip(plain.history, fast.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=rtol)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=rtol)
        assert b["val_auc"] == pytest.approx(a["val_auc"], abs=0.05, nan_ok=True)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=flips)


# ------------------------------------------------------------------------------------------- bad settings and data


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"cnn21": {"image_size": 32}}, ConfigError, r"train.cnn21.image_size: 32 gives inputs of 32 x 16 px"),
        ({"cnn21": {"batch_norm": True}}, ValueError, "batch_norm"),
        ({"device": "cuda"}, RuntimeError, "no CUDA device"),
    ],
)
def test_invalid_settings_are_rejected_before_any_run(workdir: Path, overrides, error, match) -> None:
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(error, match=match):
        train_model(make_params(**overrides), "cnn21", PATHS)
    assert tracking.find_runs(EXPERIMENT) == []  # no FAILED run left behind
    assert not (workdir / "models").exists()


def test_batch_must_split_evenly_across_ranks() -> None:
    with pytest.raises(ConfigError, match="train.cnn21.batch_size: 4 is not divisible by the DDP world size 3"):
        check_config(make_params(), "cnn21", world_size=3)
    check_config(make_params(), "cnn21", world_size=2)


def test_a_fold_without_validation_scans_is_an_error(workdir: Path) -> None:
    frame = splits_contract.read(workdir / "data/split/splits.csv")
    frame = frame[~((frame["fold"] == 1) & (frame["split"] == "val"))]
    splits_contract.write(workdir / "data/split/splits.csv", frame)
    with pytest.raises(ValueError, match=r"splits.csv: fold 1 has 16 training and 0 validation images"):
        train_fold(job(make_params(), 1))


def test_missing_roi_image_names_the_file(workdir: Path) -> None:
    frame = splits_contract.read(workdir / "data/split/splits.csv")
    missing = splits_contract.part(frame, 0, "train")["roi"].iloc[0]
    (workdir / "data/ingested" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        train_fold(job(make_params(), 0))


# ------------------------------------------------------------------------------------------- stage processes


def _stage_cmd(name: str) -> list[str]:
    return ["--params", "params.yaml", "--model", "cnn21", "--splits", "data/split/splits.csv", "--images",
            "data/ingested", "--augmented", "data/augmented", "--out", f"models/{name}", "--curves",
            f"reports/train/{name}.csv", "--checkpoints", f"checkpoints/{name}"]


def test_two_stage_processes_in_parallel_on_a_fresh_store(workdir: Path) -> None:
    """Two trainings start at once against a store that does not exist yet; both finish, each with its runs."""
    shutil.rmtree(workdir / "data")
    make_dataset(workdir, folds=1)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw_params(make_params(cnn21={"epochs": 1}))),
                                         encoding="utf-8")
    assert not (workdir / "fresh.db").exists()
    env = {**os.environ, "SPINEDXA_THREADS": "1", "MLFLOW_TRACKING_URI": "sqlite:///fresh.db"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "stages/train.py"), *_stage_cmd(name)], cwd=workdir,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    parents = {read_json(workdir / f"models/{n}/meta.json")["mlflow_run_id"] for n in ("a", "b")}
    runs = tracking.find_runs(EXPERIMENT, uri=f"sqlite:///{workdir / 'fresh.db'}")
    assert {r["run_id"] for r in runs if r["parent_run_id"] is None} == parents and len(parents) == 2
    assert sorted(r["parent_run_id"] for r in runs if r["parent_run_id"]) == sorted(parents)  # one fold each
    assert all(r["status"] == "FINISHED" for r in runs)


# Runs stages/train.py with cnn21's two per-process effects removed (dropout and BatchNorm), so that DDP must equal
# one process up to the rounding of the path taken: the check of the sampler split, the per-process batch and the
# gradient averaging.
_EXACT_RUNNER = """
import runpy, sys, torch
import spinedxa.models.cnn21 as cnn21
cnn21.DROPOUT = 0.0
torch.nn.BatchNorm2d = lambda channels: torch.nn.Identity()
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_ddp_two_cpu_processes_match_one_process(workdir: Path, variant: str) -> None:
    """torchrun with 2 gloo processes against one process, same effective batch (8 = 2 x 4), one fold.

    The global batches hold the same images (DistributedSampler, same seed) and DDP averages the gradients, so a DDP
    step equals a one-process step but for two per-process effects of cnn21, removed here: BatchNorm takes batch
    statistics per process (SyncBatchNorm is CUDA-only) and dropout masks differ per rank. What remains is rounding:
    each rank sums its half batch. "exact" runs in fp32 (``train.fast: false``, rtol 1e-4: sums of a few hundred
    fp32 products reordered, then 2 epochs of steps); "fast" takes this machine's fast path with the tolerance of
    that path (train_factory.path_tolerance: bf16 rounds each rank's half batch differently from the whole).
    Measured on an AMD EPYC Zen 4 (AVX512-BF16), 1 thread per process: exact <= 1e-7 relative on train_loss and
    val_loss; fast (bf16) <= 6.4e-4 on train_loss, 2.2e-3 on val_loss; val_auc and val_accuracy equal in both.
    """
    shutil.rmtree(workdir / "data")
    make_dataset(workdir, folds=1, n_train=16, n_val=8)
    fast = variant == "fast"
    params = make_params(class_weighting=False, cnn21={"epochs": 2, "scheduler": "none", "batch_size": 8}, fast=fast)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw_params(params)), encoding="utf-8")
    (workdir / "runner.py").write_text(_EXACT_RUNNER, encoding="utf-8")
    stage = [str(workdir / "runner.py"), str(REPO / "stages/train.py")]
    env = {**os.environ, "SPINEDXA_THREADS": "1"}
    launchers = {"one": [sys.executable], "ddp": [sys.executable, "-m", "torch.distributed.run",
                                                  "--nproc_per_node", "2", "--standalone"]}
    curves = {}
    for name, launcher in launchers.items():
        proc = subprocess.run(launcher + stage + _stage_cmd(name), cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        curves[name] = pd.read_csv(workdir / f"reports/train/{name}.csv")
    path = select_fast_path(CPU, fast)
    meta = read_json(workdir / "models/ddp/fold0/meta.json")
    assert meta["world_size"] == 2 and meta["epochs_run"] == 2 and meta["threads"] == 1
    assert meta["fast_path"] == path.name and read_json(workdir / "models/one/fold0/meta.json")["world_size"] == 1
    rtol = 1e-4 if not fast else path_tolerance(path)
    ddp, one = curves["ddp"], curves["one"]
    assert len(ddp) == len(one) == 2
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(ddp[column], one[column], rtol=rtol, err_msg=column)
    np.testing.assert_allclose(ddp["val_auc"], one["val_auc"], atol=0.05 if fast else 1e-6)
    np.testing.assert_allclose(ddp["val_accuracy"], one["val_accuracy"], atol=scans_that_may_flip(path, 8))


@pytest.mark.slow
def test_data_digests_equal_dvc_lock_after_dvc_repro(tiny_repo: Path) -> None:
    """``dvc repro train@cnn21`` in a committed copy of the project: every fold's meta.json records dvc.lock's
    hashes of its inputs, the clean commit, and the parent MLflow run."""
    from conftest import run

    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "SPINEDXA_THREADS": "1"}
    run(["dvc", "repro", "train@cnn21"], tiny_repo, env=env, timeout=1800)
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text(encoding="utf-8"))
    deps = {d["path"]: d["md5"] for d in lock["stages"]["train@cnn21"]["deps"]}
    assert "data/ingested/SHA256SUMS" in deps and "data/ingested" not in deps
    # DVC's hash of each input: the stage's own dep, or for data/ingested (its readers declare its SHA256SUMS) the
    # output of the stage that wrote it, as `spinedxa audit` checks them
    locked = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])} | deps
    top = read_json(tiny_repo / "models/cnn21/meta.json")
    assert set(top["data_digests"]) == {"data/split/splits.csv", "data/ingested", "data/augmented"}
    assert top["data_digests"] == {path: locked[path] for path in top["data_digests"]}
    assert top["git_commit"] == run(["git", "rev-parse", "HEAD"], tiny_repo).stdout.strip()
    assert top["git_dirty"] is False  # a committed copy; dvc.lock and reports, rewritten by repro, do not count
    for k in top["folds"]:
        assert read_json(tiny_repo / f"models/cnn21/fold{k}/meta.json")["data_digests"] == top["data_digests"]
    experiment = yaml.safe_load((tiny_repo / "params.yaml").read_text(encoding="utf-8"))["runtime"]["mlflow_experiment"]
    runs = tracking.find_runs(experiment, uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    (parent,) = [r for r in runs if r["parent_run_id"] is None]
    assert parent["run_id"] == top["mlflow_run_id"] and len(runs) == 1 + len(top["folds"])
    assert {d["digest"] for d in parent["datasets"]} == set(top["data_digests"].values())


def test_seed_repeats_train_each_fold_again_with_their_own_seed(workdir: Path) -> None:
    """train.repeats: every fold trains again with seed + 1000 r (models/<m>/repeat<r>/fold<k>/); the first training
    stays the result (fold<k>/, the curves); the repeats differ from it only by the seed."""
    params = make_params(repeats=2)
    result = train_model(params, "cnn21", PATHS)
    assert [(r.repeat, r.fold) for r in result.folds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    top = read_json(workdir / "models/cnn21/meta.json")
    assert (top["folds"], top["repeats"], top["repeat_seeds"]) == ([0, 1], 2, [params.train.seed,
                                                                             params.train.seed + 1000])
    for k in (0, 1):
        first, again = read_json(workdir / f"models/cnn21/fold{k}/meta.json"), read_json(
            workdir / f"models/cnn21/repeat1/fold{k}/meta.json")
        assert (first["seed"], first["repeat"], again["seed"], again["repeat"]) == (params.train.seed, 0,
                                                                                     params.train.seed + 1000, 1)
        assert first["fold"] == again["fold"] == k and first["data_digests"] == again["data_digests"]
        assert first["model_sha256"] != again["model_sha256"]  # another seed, other weights
    curves = pd.read_csv(workdir / "reports/train/cnn21.csv")
    assert curves["fold"].tolist() == [0, 0, 0, 1, 1, 1]  # the first training's curves only
    names = sorted(r["run_name"] for r in tracking.find_runs(EXPERIMENT))
    assert names == ["cnn21", "cnn21/fold0", "cnn21/fold1", "cnn21/repeat1/fold0", "cnn21/repeat1/fold1"]
    # The result (repeat 0) is the same as a run without repeats: repeats add, they change nothing.
    single = load_weights(workdir / "models/cnn21/fold0")
    train_model(make_params(), "cnn21", PATHS)
    assert_same_weights(single, load_weights(workdir / "models/cnn21/fold0"))
    assert not (workdir / "models/cnn21/repeat1").exists()
