"""The ``spinedxa`` command line: subcommands, exit codes (0 ok, 1 found a problem, 2 could not run), messages."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import VENV_BIN, run
from PIL import Image

from spinedxa.cli import main
from spinedxa.models import get_model


@pytest.fixture
def params_copy(tmp_path: Path, repo_root: Path) -> Path:
    return Path(shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml"))


def test_console_script_is_installed() -> None:
    out = run([str(VENV_BIN / "spinedxa"), "--help"], Path.cwd()).stdout
    assert all(cmd in out for cmd in ("profile", "audit", "predict"))


# ---------------------------------------------------------------------------------------------------- profile


def test_profile_merges_into_params(params_copy: Path, repo_root: Path, capsys) -> None:
    before = yaml.safe_load(params_copy.read_text())
    profile = yaml.safe_load((repo_root / "profiles/tiny.yaml").read_text())
    assert main(["profile", "apply", str(repo_root / "profiles/tiny.yaml"), "--params", str(params_copy)]) == 0
    merged = yaml.safe_load(params_copy.read_text())
    assert merged["synthesize"]["n_scans"] == profile["synthesize"]["n_scans"]
    assert merged["train"]["cnn21"]["epochs"] == profile["train"]["cnn21"]["epochs"]
    assert "lr" not in profile["train"]["cnn21"]
    assert merged["train"]["cnn21"]["lr"] == before["train"]["cnn21"]["lr"]  # keys the profile does not set are kept
    assert "profiles/tiny.yaml applied" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"train": {"cnn21": {"lr": "fast"}}}, "train.cnn21.lr: expected a number"),
        ({"split": {"shuffle": True}}, "unknown key(s) ['split.shuffle']"),
        ({"split": {"val": 1.5}}, "split.val: 1.5 is out of range"),
        ({"split": {"folds": 1}}, "split.folds: 1 is out of range under protocol kfold"),
    ],
)
def test_invalid_profile_changes_nothing(params_copy: Path, tmp_path: Path, overlay: dict, message: str,
                                         capsys) -> None:
    before = params_copy.read_text()
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump(overlay))
    for action in ("apply", "show", "run"):
        assert main(["profile", action, str(profile), "--params", str(params_copy)]) == 2
        err = capsys.readouterr().err
        assert "bad.yaml" in err and message in err
        assert params_copy.read_text() == before


def test_missing_profile_names_the_file(params_copy: Path, tmp_path: Path, capsys) -> None:
    assert main(["profile", "apply", str(tmp_path / "nope.yaml"), "--params", str(params_copy)]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_profile_show_gives_dvc_set_params_and_keeps_params_yaml(params_copy: Path, repo_root: Path,
                                                                  capsys) -> None:
    """`show` (and `run`, which passes them to `dvc exp run -S`) leave params.yaml the committed default."""
    before = params_copy.read_text()
    assert main(["profile", "show", str(repo_root / "profiles/tiny.yaml"), "--params", str(params_copy)]) == 0
    lines = capsys.readouterr().out.split()
    assert "synthesize.n_scans=40" in lines and "replay.enabled=false" in lines
    assert all("=" in line for line in lines)
    assert params_copy.read_text() == before


# ---------------------------------------------------------------------------------------------------- audit


def test_audit_needs_something_to_audit(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit"])
    assert info.value.code == 2
    assert "--leakage" in capsys.readouterr().err


def _leakage_repo(root: Path, params: Path, test_patient: str) -> Path:
    """Default-located splits/manifest/index for two images in one fold; the test image belongs to
    ``test_patient``."""
    root.mkdir()
    shutil.copy(params, root / "params.yaml")
    for rel in ("data/split", "data/ingested", "data/augmented"):
        (root / rel).mkdir(parents=True)
    pd.DataFrame([
        {"source": "a.dcm", "sha256": "s1", "patient_id": "P1", "label": "normal", "image": "i/a.png",
         "roi": "r/a.png", "fold": 0, "split": "train"},
        {"source": "b.dcm", "sha256": "s2", "patient_id": test_patient, "label": "normal", "image": "i/b.png",
         "roi": "r/b.png", "fold": 0, "split": "test"},
    ]).to_csv(root / "data/split/splits.csv", index=False)
    pd.DataFrame([
        {"source": "a.dcm", "sha256": "s1", "status": "accepted", "patient_id": "P1", "image": "i/a.png",
         "phash": "0f0f0f0f0f0f0f0f"},
        {"source": "b.dcm", "sha256": "s2", "status": "accepted", "patient_id": test_patient, "image": "i/b.png",
         "phash": "f0f0f0f0f0f0f0f0"},
    ]).to_csv(root / "data/ingested/manifest.csv", index=False)
    pd.DataFrame([{"image": "images/s1_aug1.png", "parent_source": "a.dcm", "parent_sha256": "s1",
                   "parent_image": "i/a.png", "patient_id": "P1", "label": "normal", "k": 1}]).to_csv(
        root / "data/augmented/index.csv", index=False)
    return root


@pytest.mark.parametrize(("test_patient", "code", "last_line"), [("P2", 0, "OK"), ("P1", 1, "FAILED")])
def test_audit_leakage_exit_code(tmp_path: Path, params_copy: Path, test_patient: str, code: int, last_line: str,
                                 capsys) -> None:
    root = _leakage_repo(tmp_path / "repo", params_copy, test_patient)
    assert main(["audit", "--leakage", "--root", str(root)]) == code
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith(last_line)
    if code:
        assert "LEAK fold 0: patient P1 in test+train: a.dcm, b.dcm" in out


def test_audit_leakage_json(tmp_path: Path, params_copy: Path, capsys) -> None:
    root = _leakage_repo(tmp_path / "repo", params_copy, "P1")
    assert main(["audit", "--leakage", "--json", "--root", str(root)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["leakage"]["patients"] == [{"fold": 0, "patient_id": "P1", "roles": ["test", "train"],
                                             "sources": ["a.dcm", "b.dcm"]}]
    assert report["leakage"]["augmented_checked"] is True and report["leakage"]["n_augmented"] == 1


def test_audit_missing_input_is_an_error(tmp_path: Path, params_copy: Path, capsys) -> None:
    assert main(["audit", "--leakage", "--root", str(tmp_path)]) == 2
    assert "splits.csv: not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/cnn21/`` as the train stage writes it: two fold directories and the parent meta.json."""
    model_dir = tmp_path_factory.mktemp("models") / "cnn21"
    for fold in (0, 1):
        (model_dir / f"fold{fold}").mkdir(parents=True)
        torch.manual_seed(fold)
        torch.save(get_model("cnn21", 2).state_dict(), model_dir / f"fold{fold}" / "model.pt")
        (model_dir / f"fold{fold}" / "meta.json").write_text(json.dumps(
            {"model": "cnn21", "fold": fold, "image_size": 64, "classes": ["normal", "osteoporosis"]}))
    (model_dir / "meta.json").write_text(json.dumps({"model": "cnn21", "folds": [0, 1]}))
    return model_dir


@pytest.fixture(scope="module")
def whole_params(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """params.yaml with ``ingest.roi: whole`` (the test scans are gradients, not spines)."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["ingest"]["roi"] = "whole"
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _scan(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint16) * 1600, (48, 1))).save(path)
    return path


def test_predict_prints_csv_and_reports_bad_files(tmp_path: Path, model_file: Path, whole_params: Path,
                                                  capsys) -> None:
    scans = tmp_path / "scans"
    _scan(scans / "a.png")
    (scans / "broken.dcm").write_bytes(b"\0" * 10)
    code = main(["predict", "--model", str(model_file), str(scans), "--params", str(whole_params)])
    captured = capsys.readouterr()
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [(Path(r["file"]).name, r["status"], r["redacted"]) for r in rows] == [
        ("a.png", "ok", "False"), ("broken.dcm", "error", "")]
    assert f"error: {scans / 'broken.dcm'}: " in captured.err
    assert "spinedxa predict: cnn21: ensemble of 2 fold models, mean probability" in captured.err


@pytest.mark.parametrize("model", ["models/cnn21", "models/cnn21/fold1"])
def test_predict_writes_csv_and_gradcam(tmp_path: Path, model_file: Path, whole_params: Path, model: str,
                                        capsys) -> None:
    scan = _scan(tmp_path / "a.png")
    model_path = model_file if model == "models/cnn21" else model_file / "fold1"
    args = ["predict", "--model", str(model_path), str(scan), "--csv", str(tmp_path / "out.csv"),
            "--gradcam-dir", str(tmp_path / "cam"), "--params", str(whole_params)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "1 of 1 file(s) predicted" in captured.out
    assert ("ensemble of 2" if model == "models/cnn21" else "one model") in captured.err
    assert pd.read_csv(tmp_path / "out.csv")["status"].tolist() == ["ok"]
    assert (tmp_path / "cam" / "a.gradcam.png").is_file()


def test_predict_without_a_spine_reports_no_roi(tmp_path: Path, model_file: Path, repo_root: Path,
                                                capsys) -> None:
    """With params.yaml as committed (ingest.roi: locate) a gradient has no lumbar column: exit 1, named."""
    scan = _scan(tmp_path / "a.png")
    assert main(["predict", "--model", str(model_file), str(scan), "--params", str(repo_root / "params.yaml")]) == 1
    assert f"error: {scan}: no_roi: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "inputs", "code", "message"),
    [
        ("model", ["broken.dcm"], 1, "error: "),  # no file usable: exit 1, each named on stderr
        ("nowhere/model.pt", ["broken.dcm"], 2, "model not found"),
        ("model", ["empty_dir"], 2, "no files found"),
    ],
)
def test_predict_exit_codes(tmp_path: Path, model_file: Path, whole_params: Path, model: str, inputs: list[str],
                            code: int, message: str, capsys) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 10)
    (tmp_path / "empty_dir").mkdir()
    model_arg = str(model_file) if model == "model" else str(tmp_path / model)
    args = ["predict", "--model", model_arg, *[str(tmp_path / i) for i in inputs], "--params", str(whole_params)]
    assert main(args) == code
    assert message in capsys.readouterr().err
