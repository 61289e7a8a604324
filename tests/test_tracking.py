"""Tests for spinedxa.tracking: store creation (also concurrent), runs, epochs, datasets, models, later metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spinedxa import tracking


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> str:
    """A fresh sqlite store in the test's tmp dir (conftest's ``mlflow_store``), with cwd = the tmp dir."""
    monkeypatch.chdir(tmp_path)
    return mlflow_store


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).eval()


@pytest.mark.parametrize(
    "env, expected",
    [
        (None, "sqlite:///mlflow.db"),
        ("", "sqlite:///mlflow.db"),
        ("http://mlflow.example.invalid:5000", "http://mlflow.example.invalid:5000"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ],
)
def test_tracking_uri_default_and_override(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert tracking.tracking_uri() == expected


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://host:5000", "http://host:5000"),
        ("http://alice:s3cret@host:5000/path", "http://host:5000/path"),
        ("https://token@mlflow.example.invalid", "https://mlflow.example.invalid"),
        ("postgresql://user:pw@db.example.invalid/mlflow", "postgresql://db.example.invalid/mlflow"),
    ],
)
def test_redact_uri_drops_credentials(uri: str, expected: str) -> None:
    assert tracking.redact_uri(uri) == expected


def test_telemetry_is_off_by_default() -> None:
    # MLflow 3 posts usage telemetry over the network unless told not to; the pipeline must stay offline.
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"].lower() == "true"


def test_init_store_creates_store_and_experiment_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    first = tracking.init_store(store, "exp")
    assert (tmp_path / "new" / "mlflow.db").is_file()
    assert tracking.init_store(store, "exp") == first
    assert tracking.init_store(store) is None
    assert tracking.find_runs("exp") == []
    assert tracking.find_runs("no-such-experiment") == []


def test_concurrent_first_creation_of_a_sqlite_store(tmp_path: Path) -> None:
    """Three processes create the same fresh store and experiment at once (unguarded, MLflow 3 crashes here)."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = "import sys; from spinedxa import tracking; print(tracking.init_store(sys.argv[1], 'exp'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    ids = {out.strip().splitlines()[-1] for out, _, _ in results}
    assert len(ids) == 1  # all three see the one experiment


def test_training_run_round_trip(store: str) -> None:
    example = np.zeros((1, 1, 16, 16), dtype=np.float32)
    with tracking.training_run(
        "exp", "cnn21", params={"lr": 0.001, "epochs": 2}, tags={"seed": "0", "dvc_stage": "train@cnn21"}
    ) as run_id:
        tracking.log_epoch({"val_loss": 0.7, "val_auc": 0.5}, 1)
        tracking.log_epoch({"val_loss": 0.6, "val_auc": 0.75}, 2)
        tracking.log_dataset("splits.csv", "0123456789abcdef0123456789abcdef", "data/split/splits.csv")
        tracking.log_dataset("ingested", "0123456789abcdef0123456789abcdef.dir", "data/ingested")
        model_uri = tracking.log_model(_tiny_model(), example)
    (run,) = tracking.find_runs("exp")
    assert run["run_id"] == run_id and run["run_name"] == "cnn21" and run["status"] == "FINISHED"
    assert run["params"] == {"lr": "0.001", "epochs": "2"}
    assert run["tags"] == {"seed": "0", "dvc_stage": "train@cnn21"}
    assert run["history"]["val_loss"] == [(1, 0.7), (2, 0.6)]
    assert run["metrics"]["val_auc"] == 0.75
    assert run["models"] == ["model"]
    assert model_uri.startswith("models:/")
    assert {(d["name"], d["digest"], d["context"]) for d in run["datasets"]} == {
        ("splits.csv", "0123456789abcdef0123456789abcdef", "training"),
        ("ingested", "0123456789abcdef0123456789abcdef.dir", "training"),
    }
    assert all('"uri": "data/' in d["source"] for d in run["datasets"])


def test_logged_model_has_signature_and_loads_back(store: str) -> None:
    import mlflow.pyfunc  # only to check the artifact from the outside, as a consumer would

    model, example = _tiny_model(), np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    with tracking.training_run("exp", "cnn21", params={}, tags={}):
        uri = tracking.log_model(model, example)
    loaded = mlflow.pyfunc.load_model(uri)
    assert loaded.metadata.signature is not None
    assert list(loaded.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 16, 16]
    with torch.no_grad():
        expected = model(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(loaded.predict(example), expected, rtol=1e-6)


def test_failed_block_marks_run_failed_and_propagates(store: str) -> None:
    with pytest.raises(KeyError, match="boom"):
        with tracking.training_run("exp", "vgg16", params={}, tags={}):
            raise KeyError("boom")
    (run,) = tracking.find_runs("exp")
    assert run["status"] == "FAILED"


def test_reopening_a_run_continues_it(store: str) -> None:
    with pytest.raises(InterruptedError):
        with tracking.training_run("exp", "cnn21", params={"lr": 1}, tags={"seed": "0"}) as run_id:
            tracking.log_epoch({"val_loss": 1.0}, 1)
            raise InterruptedError("killed")
    with tracking.training_run("exp", "cnn21", params={"lr": 1}, tags={"seed": "0"}, run_id=run_id) as again:
        tracking.log_epoch({"val_loss": 0.5}, 2)
    assert again == run_id
    (run,) = tracking.find_runs("exp")
    assert run["status"] == "FINISHED" and run["history"]["val_loss"] == [(1, 1.0), (2, 0.5)]


def test_unknown_run_id_starts_a_new_run(store: str) -> None:
    with tracking.training_run("exp", "cnn21", params={}, tags={}, run_id="0" * 32) as run_id:
        pass
    assert run_id != "0" * 32
    assert [r["run_id"] for r in tracking.find_runs("exp")] == [run_id]


def test_log_metrics_to_run_adds_metrics_and_artifacts(store: str, tmp_path: Path) -> None:
    with tracking.training_run("exp", "resnet50", params={}, tags={}) as run_id:
        tracking.log_epoch({"val_loss": 0.5}, 1)
    artifact = tmp_path / "resnet50.json"
    artifact.write_text('{"accuracy": 0.9}', encoding="utf-8")
    tracking.log_metrics_to_run(run_id, {"test_accuracy": 0.9, "test_roc_auc": 0.95}, artifacts=[artifact])
    (run,) = tracking.find_runs("exp")
    assert run["metrics"]["test_accuracy"] == 0.9 and run["metrics"]["test_roc_auc"] == 0.95
    from mlflow.tracking import MlflowClient

    assert [a.path for a in MlflowClient(store).list_artifacts(run_id)] == ["resnet50.json"]


@pytest.mark.parametrize(
    "run_id, artifacts, error, match",
    [
        ("f" * 32, (), tracking.RunNotFoundError, r"run 'f{32}' does not exist in tracking store 'sqlite:///"),
        (None, ("missing.json",), FileNotFoundError, r"missing\.json: artifact"),
    ],
)
def test_log_metrics_to_run_errors(store: str, run_id: str | None, artifacts: tuple, error: type, match: str) -> None:
    if run_id is None:
        with tracking.training_run("exp", "vgg19", params={}, tags={}) as run_id:
            pass
    with pytest.raises(error, match=match):
        tracking.log_metrics_to_run(run_id, {"x": 1.0}, artifacts=artifacts)


def test_dataset_source_must_be_relative(store: str, tmp_path: Path) -> None:
    with tracking.training_run("exp", "cnn21", params={}, tags={}):
        with pytest.raises(ValueError, match="repo-relative"):
            tracking.log_dataset("splits.csv", "0" * 32, str(tmp_path / "splits.csv"))


def test_no_login_name_or_absolute_path_in_automatic_tags(store: str, tmp_path: Path) -> None:
    """MLflow's automatic tags (OS login, absolute script path) are replaced on the run and on the logged model."""
    from mlflow.tracking import MlflowClient

    with tracking.training_run("exp", "cnn21", params={}, tags={}) as run_id:
        tracking.log_model(_tiny_model(), np.zeros((1, 1, 16, 16), dtype=np.float32))
    client = MlflowClient(store)
    run_tags = client.get_run(run_id).data.tags
    (model,) = client.search_logged_models(experiment_ids=[client.get_experiment_by_name("exp").experiment_id])
    for tags in (run_tags, model.tags):
        assert tags["mlflow.user"] == "spinedxa"
        assert not Path(tags["mlflow.source.name"]).is_absolute()
        assert not any(str(tmp_path) in v for v in tags.values())
