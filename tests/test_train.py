"""Tests for spinedxa.train and stages/train.py on tiny generated datasets in the contract formats.

Trainings use cnn21 at 32 px with one thread: a few seconds each. DDP (two gloo processes) is marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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

from spinedxa import tracking
from spinedxa.config import ConfigError, Params, deep_merge, params_from_dict
from spinedxa.data import write_image
from spinedxa.files import md5_file, sha256_file
from spinedxa.train import (
    FP32,
    CURVE_COLUMNS,
    Distributed,
    EarlyStopping,
    TrainPaths,
    build_optimizer,
    build_scheduler,
    class_weights,
    cpu_flags,
    dvc_md5,
    fingerprint,
    load_checkpoint,
    resolve_threads,
    save_checkpoint,
    select_fast_path,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
EXPERIMENT = "spinedxa-test"


# ------------------------------------------------------------------------------------------- fixtures


def make_dataset(root: Path, n_train: int = 8, n_val: int = 4, expand: int = 1, seed: int = 0) -> TrainPaths:
    """Ingested PNGs, splits.csv and an augmented index in the contract formats.

    The classes differ in texture (horizontal stripes for "normal"), not in mean brightness, which BatchNorm over a
    small batch of one class would normalise away.
    """
    rng = np.random.default_rng(seed)
    stripes = 0.25 * np.sin(np.arange(40) * 2 * np.pi / 6)[:, None]
    rows, aug = [], []
    for i in range(n_train + n_val + 2):
        label = ("normal", "osteoporosis")[i % 2]
        img = np.clip(0.35 + rng.uniform(0.0, 0.3, (40, 32)) + (stripes if label == "normal" else 0.0), 0.0, 1.0)
        sha = hashlib.sha256(f"scan{i}".encode()).hexdigest()
        rel = f"images/{sha[:16]}.png"
        write_image(root / "data/ingested" / rel, img)
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        rows.append(dict(source=f"{label}/scan_{i:04d}.dcm", sha256=sha, patient_id=f"P{i:012x}", label=label,
                         image=rel, split=split))
        for k in range(1, expand + 1) if split == "train" else ():
            arel = f"images/{sha[:16]}_aug{k}.png"
            write_image(root / "data/augmented" / arel, np.flipud(img))
            aug.append(dict(image=arel, parent_source=rows[-1]["source"], parent_sha256=sha, parent_image=rel,
                            patient_id=rows[-1]["patient_id"], label=label, k=k))
    (root / "data/split").mkdir(parents=True, exist_ok=True)
    (root / "data/augmented").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "data/split/splits.csv", index=False)
    pd.DataFrame(aug, columns=["image", "parent_source", "parent_sha256", "parent_image", "patient_id", "label",
                               "k"]).to_csv(root / "data/augmented/index.csv", index=False)
    return paths_for("cnn21")


def paths_for(model: str) -> TrainPaths:
    """The stage's paths as dvc.yaml passes them (relative to the repo root = cwd)."""
    return TrainPaths(Path("data/split/splits.csv"), Path("data/ingested"), Path("data/augmented"),
                      Path(f"models/{model}"), Path(f"reports/train/{model}.csv"), Path(f"checkpoints/{model}"))


def make_params(**train_overrides: object) -> Params:
    """Repo params with a tiny cnn21 (32 px, batch 4, 3 epochs); ``train_overrides`` go under ``train``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    overlay = {
        "augment": {"online": False},
        "train": {"patience": 0, "cnn21": {"image_size": 32, "epochs": 3, "batch_size": 4}},
        "mlflow": {"experiment": EXPERIMENT},
    }
    return params_from_dict(deep_merge(deep_merge(raw, overlay), {"train": train_overrides}))


def _raw(params: Params) -> dict:
    """``params`` back to a plain mapping (as params.yaml would hold it)."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """cwd = a tmp "repo root" with a tiny dataset, its own MLflow store (``mlflow_store``), one thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPINEDXA_THREADS", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    make_dataset(tmp_path)
    return tmp_path


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


class Killed(Exception):
    """Stands in for a kill after an epoch's checkpoint is on disk."""


def kill_after(epoch: int):
    def hook(done: int) -> None:
        if done == epoch:
            raise Killed(f"killed after epoch {done}")

    return hook


# ------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "enabled, flags, onednn_bf16, expected",
    [
        (False, {"avx512_bf16", "amx_bf16"}, True, "fp32"),
        (True, {"avx", "avx2", "fma"}, False, "cpu_fp32_channels_last"),  # this machine (AMD EPYC, AVX2)
        (True, {"avx512f", "avx512bw"}, True, "cpu_fp32_channels_last"),  # bf16 only emulated: not taken
        (True, {"avx512f", "avx512_bf16"}, True, "cpu_bf16_channels_last"),
        (True, {"amx_bf16", "amx_tile"}, True, "cpu_bf16_channels_last"),
        (True, {"amx_bf16"}, False, "cpu_fp32_channels_last"),  # torch built without oneDNN bf16
    ],
)
def test_select_fast_path_cpu(monkeypatch: pytest.MonkeyPatch, enabled, flags, onednn_bf16, expected) -> None:
    monkeypatch.setattr("spinedxa.train._onednn_bf16", lambda: onednn_bf16)
    fast = select_fast_path(CPU, enabled, frozenset(flags))
    assert fast.name == expected
    assert fast.channels_last == (expected != "fp32")
    assert (fast.autocast_dtype is torch.bfloat16) == ("bf16" in expected)
    assert fast.fused_optimizer == (expected != "fp32")
    assert not fast.grad_scaler


@pytest.mark.parametrize(
    "text, expected",
    [
        ("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t: other\n",
         {"fpu", "avx", "avx2", "fma"}),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", {"fp", "asimd", "bf16"}),
        ("processor\t: 0\n", set()),
    ],
)
def test_cpu_flags(tmp_path: Path, text: str, expected: set[str]) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text, encoding="utf-8")
    assert cpu_flags(path) == expected
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    "env, configured, local_world, expected",
    [
        ({"SPINEDXA_THREADS": "3"}, 8, 1, 3),
        ({"SPINEDXA_THREADS": ""}, 2, 1, 2),
        ({}, 5, 2, 5),
        ({}, 0, 1, len(os.sched_getaffinity(0))),
        ({}, 0, 64, 1),
    ],
)
def test_resolve_threads(env, configured, local_world, expected) -> None:
    assert resolve_threads(configured, local_world_size=local_world, env=env) == expected


@pytest.mark.parametrize(
    "env, configured, error",
    [({"SPINEDXA_THREADS": "abc"}, 0, ValueError), ({"SPINEDXA_THREADS": "0"}, 0, ValueError), ({}, -1, ConfigError)],
)
def test_resolve_threads_rejects(env, configured, error) -> None:
    with pytest.raises(error, match="SPINEDXA_THREADS|train.threads"):
        resolve_threads(configured, env=env)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Distributed(1, 0, 0, 1)),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, Distributed(2, 1, 1, 2)),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, Distributed(4, 3, 1, 2)),
    ],
)
def test_distributed_from_env(env, expected) -> None:
    ctx = Distributed.from_env(env)
    assert ctx == expected
    assert ctx.enabled == (expected.world_size > 1) and ctx.is_main == (expected.rank == 0)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"}])
def test_distributed_from_env_rejects(env) -> None:
    with pytest.raises(ValueError, match="WORLD_SIZE|RANK"):
        Distributed.from_env(env)


@pytest.mark.parametrize(
    "labels, expected",
    [([0, 0, 0, 1], [4 / 6, 2.0]), ([0, 1], [1.0, 1.0]), ([1] * 114 + [0] * 60, [174 / 120, 174 / 228])],
)
def test_class_weights_inverse_frequency(labels, expected) -> None:
    assert class_weights(labels, 2).tolist() == pytest.approx(expected)


def test_class_weights_rejects_missing_class() -> None:
    with pytest.raises(ValueError, match=r"class index \[1\]"):
        class_weights([0, 0, 0], 2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "optimizer, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_build_optimizer(optimizer: str, cls: type, fused: bool) -> None:
    cfg = make_params(cnn21={"optimizer": optimizer, "lr": 0.01, "weight_decay": 0.001}).train.cnn21
    param = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([param], cfg, fused=fused)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.001 and bool(group["fused"]) == fused
    param.grad = torch.ones(2)
    opt.step()  # the fused CPU kernel exists for this optimiser
    assert param.detach().lt(1.0).all()


@pytest.mark.parametrize(
    "scheduler, monitor, cls, lr_after_3",
    [
        ("cosine", "val_loss", torch.optim.lr_scheduler.CosineAnnealingLR, 0.0),
        ("step", "val_loss", torch.optim.lr_scheduler.StepLR, 0.1 * 0.1**3),
        ("plateau", "val_auc", torch.optim.lr_scheduler.ReduceLROnPlateau, 0.1 * 0.1),
        ("none", "val_loss", type(None), 0.1),
    ],
)
def test_build_scheduler(scheduler: str, monitor: str, cls: type, lr_after_3: float) -> None:
    cfg = make_params(cnn21={"scheduler": scheduler, "lr": 0.1, "epochs": 3}).train.cnn21
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = build_scheduler(opt, cfg, monitor=monitor, patience=2)
    assert type(sched) is cls
    for _ in range(3):  # plateau: AUC stuck at 0.5 for 3 epochs (patience 2 // 2 = 1) drops the rate once
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(0.5)
        elif sched is not None:
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_after_3, abs=1e-12)


@pytest.mark.parametrize(
    "monitor, patience, values, best_epoch, stops_after",
    [
        ("val_loss", 2, [1.0, 0.9, 0.95, 0.96, 0.5], 2, 4),
        ("val_auc", 2, [0.5, 0.7, 0.6, 0.8, 0.7, 0.7], 4, 6),
        ("val_auc", 1, [math.nan, 0.6, math.nan], 2, 3),  # NaN (one-class validation set) never improves
        ("val_loss", 0, [1.0, 2.0, 3.0, 4.0], 1, None),  # patience 0: never stop
    ],
)
def test_early_stopping(monitor, patience, values, best_epoch, stops_after) -> None:
    stopper, stopped = EarlyStopping(monitor, patience), None
    for epoch, value in enumerate(values, start=1):
        stopper.update(value, epoch)
        if stopper.should_stop:
            stopped = epoch
            break
    assert stopper.best_epoch == best_epoch
    assert stopped == stops_after


def test_dvc_md5_matches_dvc(tmp_path: Path) -> None:
    """Our hashes equal what DVC itself records (``dvc add`` writes the same md5 / .dir hash as dvc.lock)."""
    repo = tmp_path / "repo"
    make_dataset(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(dvc + ["add", "-q", "data/ingested", "data/split/splits.csv"], cwd=repo, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    for target in ("data/ingested", "data/split/splits.csv"):
        recorded = yaml.safe_load((repo / f"{target}.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
        assert dvc_md5(repo / target) == recorded
    assert dvc_md5(repo / "data/split/splits.csv") == md5_file(repo / "data/split/splits.csv")
    assert dvc_md5(repo / "data/ingested").endswith(".dir")
    with pytest.raises(FileNotFoundError, match="nope"):
        dvc_md5(repo / "nope")


@pytest.mark.parametrize(
    "change",
    [
        lambda p, d, w: (make_params(cnn21={"lr": 0.5}), d, w),
        lambda p, d, w: (make_params(seed=1), d, w),
        lambda p, d, w: (params_from_dict(deep_merge(_raw(p), {"augment": {"rotation_deg": 1.0}})), d, w),
        lambda p, d, w: (p, {**d, "data/ingested": "f" * 32 + ".dir"}, w),
        lambda p, d, w: (p, d, 2),
    ],
    ids=["model-param", "common-param", "augment-param", "data-digest", "world-size"],
)
def test_fingerprint_changes_with_what_determines_the_result(change) -> None:
    params, digests = make_params(), {"data/split/splits.csv": "0" * 32, "data/ingested": "1" * 32 + ".dir"}
    base = fingerprint(params, "cnn21", digests, 1)
    assert fingerprint(make_params(), "cnn21", dict(digests), 1) == base
    assert fingerprint(params, "resnet50", digests, 1) != base
    changed_params, changed_digests, world_size = change(params, digests, 1)
    assert fingerprint(changed_params, "cnn21", changed_digests, world_size) != base
    # Another model's block does not enter cnn21's fingerprint (one stage per model: only cnn21 retrains).
    assert fingerprint(make_params(vgg16={"lr": 0.5}), "cnn21", digests, 1) == base


def test_unreadable_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(path, "abc")
    assert load_checkpoint(tmp_path / "missing.pt", "abc") is None
    save_checkpoint(path, {"fingerprint": "abc", "epoch": 1})
    assert load_checkpoint(path, "abc") == {"fingerprint": "abc", "epoch": 1}


# ------------------------------------------------------------------------------------------- trainings


def test_training_writes_contract_outputs(workdir: Path) -> None:
    result = train_model(make_params(), "cnn21", paths_for("cnn21"))
    meta = json.loads((workdir / "models/cnn21/meta.json").read_text(encoding="utf-8"))
    contract = {"model", "image_size", "classes", "mlflow_run_id", "mlflow_tracking_uri", "model_sha256",
                "data_digests", "params", "epochs_run", "best_epoch", "seed", "git_commit"}
    assert contract <= meta.keys()
    assert meta["model"] == "cnn21" and meta["image_size"] == 32 and meta["classes"] == ["normal", "osteoporosis"]
    assert meta["model_sha256"] == sha256_file(workdir / "models/cnn21/model.pt")
    assert meta["data_digests"] == {
        "data/split/splits.csv": md5_file(workdir / "data/split/splits.csv"),
        "data/ingested": dvc_md5(workdir / "data/ingested"),
        "data/augmented": dvc_md5(workdir / "data/augmented"),
    }
    assert meta["params"]["epochs"] == 3 and meta["epochs_run"] == 3 and meta["seed"] == 0
    assert meta["fast_path"] == result.fast_path == "cpu_fp32_channels_last" and 1 <= meta["best_epoch"] <= 3
    curves = pd.read_csv(workdir / "reports/train/cnn21.csv")
    assert tuple(curves.columns) == CURVE_COLUMNS and curves["epoch"].tolist() == [1, 2, 3]
    assert curves["lr"].iloc[0] == 0.001 and curves["lr"].iloc[-1] < 0.001  # cosine schedule
    assert meta["best_epoch"] == int(curves.loc[curves["val_loss"].idxmin(), "epoch"])
    # The best epoch's weights, loadable as a plain state dict.
    from spinedxa.models import load_trained

    model, _ = load_trained(workdir / "models/cnn21")
    assert not model.training
    assert not (workdir / "checkpoints/cnn21/last.pt").exists()  # finished: checkpoint removed

    (run,) = tracking.find_runs(EXPERIMENT)
    assert run["run_id"] == meta["mlflow_run_id"] == result.run_id and run["status"] == "FINISHED"
    assert run["run_name"] == "cnn21"
    assert run["params"]["lr"] == "0.001" and run["params"]["train.seed"] == "0" and run["params"]["epochs"] == "3"
    assert [step for step, _ in run["history"]["val_loss"]] == [1, 2, 3]
    assert {"train_loss", "val_auc", "val_accuracy", "lr", "seconds"} <= run["history"].keys()
    assert run["tags"]["dvc_stage"] == "train@cnn21" and run["tags"]["seed"] == "0"
    assert run["tags"]["fast_path"] == "cpu_fp32_channels_last" and "git_commit" in run["tags"]
    assert run["models"] == ["model"]
    assert {d["name"]: d["digest"] for d in run["datasets"]} == {
        "splits.csv": meta["data_digests"]["data/split/splits.csv"],
        "ingested": meta["data_digests"]["data/ingested"],
        "augmented": meta["data_digests"]["data/augmented"],
    }
    # No absolute path (which could name a person) anywhere in the run.
    assert str(workdir) not in json.dumps(run)


def test_overfitting_a_few_images_drives_the_loss_down(workdir: Path) -> None:
    params = make_params(class_weighting=False, cnn21={"epochs": 8, "scheduler": "none"})
    result = train_model(params, "cnn21", paths_for("cnn21"))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_params_give_the_same_weights(workdir: Path) -> None:
    params = make_params(cnn21={"epochs": 2})
    params_online = params_from_dict(deep_merge(_raw(params), {"augment": {"online": True}}))
    for run in ("a", "b"):
        shutil.rmtree(workdir / "models", ignore_errors=True)
        train_model(params_online, "cnn21", paths_for("cnn21"))
        shutil.move(workdir / "models/cnn21", workdir / f"run_{run}")
    assert_same_weights(load_weights(workdir / "run_a"), load_weights(workdir / "run_b"))


def test_killed_training_resumes_to_the_same_weights(workdir: Path) -> None:
    params = make_params(cnn21={"epochs": 3, "scheduler": "plateau"}, monitor="val_auc", patience=4)
    train_model(params, "cnn21", paths_for("cnn21"))
    uninterrupted = load_weights(workdir / "models/cnn21")
    curves = pd.read_csv(workdir / "reports/train/cnn21.csv")
    shutil.rmtree(workdir / "models")

    with pytest.raises(Killed):
        train_model(params, "cnn21", paths_for("cnn21"), on_epoch_end=kill_after(1))
    assert (workdir / "checkpoints/cnn21/last.pt").is_file() and not (workdir / "models/cnn21").exists()
    resumed = train_model(params, "cnn21", paths_for("cnn21"))
    assert resumed.resumed_from == 1 and resumed.epochs_run == 3
    assert_same_weights(load_weights(workdir / "models/cnn21"), uninterrupted)
    cols = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr"]  # all but the wall-clock seconds
    pd.testing.assert_frame_equal(pd.read_csv(workdir / "reports/train/cnn21.csv")[cols], curves[cols])
    # The resumed training continued the killed one's MLflow run: one run with every epoch once.
    runs = {r["run_id"]: r for r in tracking.find_runs(EXPERIMENT)}
    continued = runs[resumed.run_id]
    assert continued["status"] == "FINISHED"
    assert [step for step, _ in continued["history"]["val_loss"]] == [1, 2, 3]


def test_stale_checkpoint_is_not_resumed(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Killed):
        train_model(make_params(), "cnn21", paths_for("cnn21"), on_epoch_end=kill_after(1))
    changed = make_params(cnn21={"lr": 0.002})
    with caplog.at_level("WARNING", logger="spinedxa.train"):
        result = train_model(changed, "cnn21", paths_for("cnn21"))
    assert result.resumed_from == 0 and result.epochs_run == 3
    assert "ignoring checkpoint checkpoints/cnn21/last.pt" in caplog.text
    # ... and equals a training from scratch with the changed params.
    fresh = load_weights(workdir / "models/cnn21")
    shutil.rmtree(workdir / "models")
    train_model(changed, "cnn21", paths_for("cnn21"))
    assert_same_weights(load_weights(workdir / "models/cnn21"), fresh)


def test_fast_path_costs_no_accuracy(workdir: Path) -> None:
    """fp32 vs the fast path on the same split: the same validation results (on AVX2, fast = fp32 channels_last)."""
    results = {}
    for fast in (False, True):
        results[fast] = train_model(make_params(fast=fast), "cnn21", paths_for("cnn21"))
    plain, fast = results[False], results[True]
    assert plain.fast_path == FP32.name and fast.fast_path != FP32.name
    for a, b in zip(plain.history, fast.history):
        assert b["val_accuracy"] == a["val_accuracy"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-2, abs=1e-3)
        assert b["val_auc"] == pytest.approx(a["val_auc"], abs=0.05, nan_ok=True)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"cnn21": {"image_size": 16}}, ConfigError, r"train.cnn21.image_size: 16 is below"),
        ({"device": "cuda"}, RuntimeError, "no CUDA device"),
    ],
)
def test_invalid_settings_are_rejected(workdir: Path, overrides, error, match) -> None:
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        overrides = {"cnn21": {"image_size": 16}}
        error, match = ConfigError, "image_size"
    with pytest.raises(error, match=match):
        train_model(make_params(**overrides), "cnn21", paths_for("cnn21"))


def test_two_stage_processes_in_parallel_on_a_fresh_store(workdir: Path) -> None:
    """Two trainings start at once against a store that does not exist yet; both finish, each with its run."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(_raw(make_params(cnn21={"epochs": 1}))), encoding="utf-8")
    assert not (workdir / "fresh.db").exists()
    env = {**os.environ, "SPINEDXA_THREADS": "1", "MLFLOW_TRACKING_URI": "sqlite:///fresh.db"}
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, str(REPO / "stages/train.py"), "--params", "params.yaml", "--model", "cnn21",
               "--splits", "data/split/splits.csv", "--images", "data/ingested", "--augmented", "data/augmented",
               "--out", f"models/{name}", "--curves", f"reports/train/{name}.csv",
               "--checkpoints", f"checkpoints/{name}"]
        procs.append(subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    run_ids = {json.loads((workdir / f"models/{n}/meta.json").read_text())["mlflow_run_id"] for n in ("a", "b")}
    runs = tracking.find_runs(EXPERIMENT, uri=f"sqlite:///{workdir / 'fresh.db'}")
    assert {r["run_id"] for r in runs} == run_ids and len(run_ids) == 2
    assert all(r["status"] == "FINISHED" for r in runs)


# Runs stages/train.py with cnn21's two per-process effects removed (dropout and BatchNorm), so that DDP must equal
# one process up to float rounding: the check of the sampler split, the per-process batch and gradient averaging.
_EXACT_RUNNER = """
import runpy, sys, torch
import spinedxa.models.cnn21 as cnn21
cnn21.DROPOUT = 0.0
torch.nn.BatchNorm2d = lambda channels: torch.nn.Identity()
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["exact", "cnn21"])
def test_ddp_two_cpu_processes_match_one_process(workdir: Path, variant: str) -> None:
    """torchrun with 2 gloo processes against one process, same effective batch (8 = 2 x 4).

    The global batches hold the same images (DistributedSampler, same seed) and DDP averages the gradients, so a DDP
    step equals a one-process step but for two per-process effects of cnn21: BatchNorm takes batch statistics per
    process (4 images instead of 8; SyncBatchNorm is CUDA-only) and dropout masks differ per rank. "exact" removes
    both and asserts equality to float rounding (rtol 1e-4); "cnn21" keeps them and asserts the validation results
    agree within what per-process BatchNorm over 4 images explains (measured: val_loss 0.86 vs 0.88 after one
    epoch, 1.88 vs 1.92 after two; training losses, taken with train-mode BatchNorm, differ more).
    """
    make_dataset(workdir, n_train=16, n_val=8)
    params = make_params(class_weighting=False, cnn21={"epochs": 2, "scheduler": "none", "batch_size": 8})
    (workdir / "params.yaml").write_text(yaml.safe_dump(_raw(params)), encoding="utf-8")
    stage = [str(REPO / "stages/train.py")]
    if variant == "exact":
        (workdir / "runner.py").write_text(_EXACT_RUNNER, encoding="utf-8")
        stage = [str(workdir / "runner.py"), *stage]
    args = ["--params", "params.yaml", "--model", "cnn21", "--splits", "data/split/splits.csv", "--images",
            "data/ingested", "--augmented", "data/augmented"]
    env = {**os.environ, "SPINEDXA_THREADS": "1"}
    launchers = {"one": [sys.executable], "ddp": [sys.executable, "-m", "torch.distributed.run",
                                                  "--nproc_per_node", "2", "--standalone"]}
    curves = {}
    for name, launcher in launchers.items():
        outs = ["--out", f"models/{name}", "--curves", f"reports/train/{name}.csv",
                "--checkpoints", f"checkpoints/{name}"]
        proc = subprocess.run(launcher + stage + args + outs, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        curves[name] = pd.read_csv(workdir / f"reports/train/{name}.csv")
    meta = json.loads((workdir / "models/ddp/meta.json").read_text(encoding="utf-8"))
    assert meta["world_size"] == 2 and meta["epochs_run"] == 2
    ddp, one = curves["ddp"], curves["one"]
    if variant == "exact":
        for column in ("train_loss", "val_loss", "val_auc", "val_accuracy"):
            np.testing.assert_allclose(ddp[column], one[column], rtol=1e-4, err_msg=column)
    else:
        np.testing.assert_allclose(ddp["val_loss"], one["val_loss"], rtol=0.2)
        np.testing.assert_allclose(ddp["val_auc"], one["val_auc"], atol=0.1)
        assert ddp["train_loss"].iloc[-1] < ddp["train_loss"].iloc[0]


@pytest.mark.slow
def test_data_digests_equal_dvc_lock_after_dvc_repro(tiny_repo: Path) -> None:
    """``dvc repro train@cnn21`` in a copy of the project: meta.json's data digests are dvc.lock's hashes."""
    from conftest import run

    env = {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "SPINEDXA_THREADS": "1"}
    run(["dvc", "repro", "train@cnn21"], tiny_repo, env=env, timeout=900)
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text(encoding="utf-8"))
    deps = {d["path"]: d["md5"] for d in lock["stages"]["train@cnn21"]["deps"]}
    meta = json.loads((tiny_repo / "models/cnn21/meta.json").read_text(encoding="utf-8"))
    assert set(meta["data_digests"]) == {"data/split/splits.csv", "data/ingested", "data/augmented"}
    assert meta["data_digests"] == {path: deps[path] for path in meta["data_digests"]}
    assert meta["git_commit"] == run(["git", "rev-parse", "HEAD"], tiny_repo).stdout.strip()
    (run_record,) = tracking.find_runs("spinedxa", uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    assert run_record["run_id"] == meta["mlflow_run_id"]
    assert {d["digest"] for d in run_record["datasets"]} == set(meta["data_digests"].values())
