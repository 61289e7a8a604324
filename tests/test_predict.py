"""spinedxa.predict: new scans through the ingest path and a trained model, one row per file, Grad-CAM overlays.

The model is a randomly initialised cnn21 saved the way the train stage saves one (model.pt + meta.json), at 32 px:
predictions are meaningless but the path from file to probability is the real one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import VENV_BIN, make_repo_copy, run
from dicom_factory import (
    FAKE_PHI,
    gradient,
    j2k_lying_size,
    jpeg_lying_size,
    make_dataset,
    write_deflate_bomb,
    write_dicom,
)
from PIL import Image

from spinedxa import cli, predict
from spinedxa.config import load_params
from spinedxa.data import letterbox, read_image
from spinedxa.imaging import decode_file, normalise
from spinedxa.ingest import write_png16
from spinedxa.models import get_model

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def params(repo_root: Path):
    return load_params(repo_root / "params.yaml")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("models") / "cnn21"
    model_dir.mkdir()
    torch.save(get_model("cnn21", 2).state_dict(), model_dir / "model.pt")
    meta = {"model": "cnn21", "image_size": IMAGE_SIZE, "classes": ["normal", "osteoporosis"]}
    (model_dir / "meta.json").write_text(json.dumps(meta))
    return model_dir / "model.pt"


def _png16(path: Path, rows: int = 48, cols: int = 36, constant: bool = False) -> Path:
    pixels = np.full((rows, cols), 1000, np.uint16) if constant else gradient(rows, cols, 65535)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# (file name, how to write it, expected status, expected start of the error)
CASES = [
    ("scan.dcm", lambda p: write_dicom(p), "ok", ""),
    ("scan_mono1.dcm", lambda p: write_dicom(p, photometric="MONOCHROME1"), "ok", ""),
    ("scan.png", lambda p: _png16(p), "ok", ""),
    ("scan.jpg", lambda p: Image.fromarray(gradient(30, 40, 255, "uint8")).save(p, format="JPEG"), "ok", ""),
    ("empty.dcm", lambda p: p.write_bytes(b""), "error", "zero_byte"),
    ("noise.bin", lambda p: p.write_bytes(bytes(range(256)) * 4), "error", "not_an_image"),
    ("flat.png", lambda p: _png16(p, constant=True), "error", "blank"),
    ("missing.dcm", lambda p: None, "error", "unreadable"),
    ("dangling.dcm", lambda p: p.symlink_to(p.with_name("gone.dcm")), "error", "symlink_dangling"),
    ("fifo.dcm", lambda p: os.mkfifo(p), "error", "unreadable: not a regular file"),
    ("deflate_bomb.dcm", lambda p: write_deflate_bomb(p, 2**30, rows=7000, cols=7000), "error", "too_large"),
    ("deflate_bomb_1x1.dcm", lambda p: write_deflate_bomb(p, 2**30), "error", "corrupt"),  # 1 GB from 1 MB
    ("j2k_lies.dcm", lambda p: j2k_lying_size(p), "error", "too_large"),
    ("jpeg_lies.dcm", lambda p: jpeg_lying_size(p), "error", "too_large"),
]


@pytest.mark.parametrize(("name", "write", "status", "error"), CASES, ids=[c[0] for c in CASES])
def test_each_file_gets_a_row(tmp_path: Path, model_file: Path, params, name, write, status, error) -> None:
    path = tmp_path / name
    write(path)
    (row,) = predict.predict_files(model_file, [path], params)
    assert (row.file, row.status) == (str(path), status)
    assert row.error.startswith(error), row.error
    if status == "ok":
        assert 0.0 <= row.prob_osteoporosis <= 1.0
        assert row.predicted == ("osteoporosis" if row.prob_osteoporosis >= params.evaluate.threshold else "normal")
    else:
        assert row.prob_osteoporosis is None and row.predicted == ""


def test_bad_files_do_not_stop_the_others_and_order_is_kept(tmp_path: Path, model_file: Path, params) -> None:
    files = []
    for name, write, _, _ in CASES:
        write(tmp_path / name)
        files.append(tmp_path / name)
    rows = predict.predict_files(model_file, files, params)
    assert [r.file for r in rows] == [str(f) for f in files]
    assert [r.status for r in rows] == [c[2] for c in CASES]


def test_input_is_prepared_exactly_as_for_training(tmp_path: Path, params) -> None:
    """decode -> normalise -> (16-bit PNG on disk, read back) -> letterbox, as ingest + training do."""
    source = write_dicom(tmp_path / "scan.dcm", gradient(60, 44))
    ingested = tmp_path / "ingested.png"
    write_png16(ingested, normalise(decode_file(source, max_pixels=10**8, multiframe="first").pixels,
                                    params.ingest.max_side))
    expected = letterbox(read_image(ingested), IMAGE_SIZE)
    np.testing.assert_array_equal(predict.prepare_image(source, params, IMAGE_SIZE), expected)


def test_prediction_matches_the_model_on_the_same_tensor(tmp_path: Path, model_file: Path, params) -> None:
    from spinedxa.models import load_trained, predict_proba

    path = _png16(tmp_path / "scan.png")
    (row,) = predict.predict_files(model_file, [path], params)
    model, _ = load_trained(model_file.parent)
    image = torch.from_numpy(predict.prepare_image(path, params, IMAGE_SIZE))[None, None]
    assert row.prob_osteoporosis == pytest.approx(float(predict_proba(model, "cnn21", image)[0]), abs=1e-6)


def test_no_phi_reaches_the_output(tmp_path: Path, model_file: Path, params) -> None:
    path = write_dicom(tmp_path / "scan.dcm")
    text = predict.to_csv(predict.predict_files(model_file, [path], params, gradcam_dir=tmp_path / "cam"))
    for value in FAKE_PHI.values():
        assert value not in text
        assert value.encode() not in (tmp_path / "cam" / "scan.gradcam.png").read_bytes()


def test_gradcam_overlays_one_per_usable_file(tmp_path: Path, model_file: Path, params) -> None:
    files = [_png16(tmp_path / "a" / "scan.png"), _png16(tmp_path / "b" / "scan.png", 30, 50),
             _png16(tmp_path / "flat.png", constant=True)]
    rows = predict.predict_files(model_file, files, params, gradcam_dir=tmp_path / "cam")
    assert [r.status for r in rows] == ["ok", "ok", "error"]
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["scan-2.gradcam.png", "scan.gradcam.png"]
    with Image.open(tmp_path / "cam" / "scan.gradcam.png") as img:
        assert (img.mode, img.size) == ("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        assert np.asarray(img).std() > 0


def test_collect_files_expands_directories(tmp_path: Path) -> None:
    for rel in ("d/b.dcm", "d/a.png", "d/sub/c.png", "d/.hidden", "d/.cache/x.png", "single.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files = predict.collect_files([tmp_path / "d", tmp_path / "single.dcm", tmp_path / "nowhere.dcm"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "d/a.png", "d/b.dcm", "d/sub/c.png", "single.dcm", "nowhere.dcm"]


def test_csv_has_the_contract_columns(tmp_path: Path, model_file: Path, params) -> None:
    rows = predict.predict_files(model_file, [_png16(tmp_path / "s.png"), tmp_path / "gone.png"], params)
    predict.write_csv(tmp_path / "out.csv", rows)
    table = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert list(table[0]) == ["file", "prob_osteoporosis", "predicted", "status", "error"]
    assert [t["status"] for t in table] == ["ok", "error"]
    assert table[1]["prob_osteoporosis"] == "" and table[1]["error"].startswith("unreadable")


@pytest.mark.parametrize(
    ("model", "exc", "match"),
    [("nowhere/model.pt", FileNotFoundError, "model not found"),
     ("no_meta/model.pt", FileNotFoundError, "meta.json: not found")],
)
def test_unusable_model_is_an_error(tmp_path: Path, params, model: str, exc: type, match: str) -> None:
    (tmp_path / "no_meta").mkdir()
    (tmp_path / "no_meta" / "model.pt").write_bytes(b"")
    with pytest.raises(exc, match=match):
        predict.predict_files(tmp_path / model, [tmp_path / "x.png"], params)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_predict_reproduces_evaluate_on_the_raw_test_files(tmp_path: Path) -> None:
    """The tiny pipeline up to one model's evaluation: predicting on the raw test files (DICOM, through decoding and
    normalisation again) gives the probabilities evaluate computed from the ingested PNGs."""
    repo = make_repo_copy(tmp_path / "repo")
    run([str(VENV_BIN / "dvc"), "repro", "evaluate@cnn21"], repo)
    expected = pd.read_csv(repo / "reports/predictions/cnn21.csv")
    raw = [f"data/raw/synthetic/{s}" for s in expected["source"]]
    run([str(VENV_BIN / "spinedxa"), "predict", "--model", "models/cnn21/model.pt", *raw, "--csv", "new.csv"], repo)
    got = pd.read_csv(repo / "new.csv")
    assert got["status"].eq("ok").all()
    np.testing.assert_allclose(got["prob_osteoporosis"], expected["prob"], atol=1e-5)
    assert (got["predicted"] == expected["predicted"]).all()


def test_directory_with_dangling_link_and_loop(tmp_path: Path, model_file: Path, params) -> None:
    """A folder given to predict: a dangling link gets an error row, a directory loop is walked once."""
    folder = tmp_path / "scans"
    _png16(folder / "a.png")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    files = predict.collect_files([folder])
    assert [f.relative_to(folder).as_posix() for f in files] == ["a.png", "gone.png"]
    rows = predict.predict_files(model_file, files, params)
    assert [(r.status, r.error.partition(":")[0]) for r in rows] == [("ok", ""), ("error", "symlink_dangling")]


@pytest.mark.filterwarnings("ignore:The value length")  # the fixture breaks the CS length limit on purpose
def test_header_value_is_not_echoed_in_predict_output(tmp_path: Path, model_file: Path, params) -> None:
    ds = make_dataset(gradient())
    ds.PhotometricInterpretation = FAKE_PHI["PatientName"]
    ds.save_as(tmp_path / "phi.dcm", enforce_file_format=True)
    (row,) = predict.predict_files(model_file, [tmp_path / "phi.dcm"], params)
    assert row.error.startswith("unsupported_photometric: ") and "Zyxwvut" not in row.error


def _evil_pickle(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "PWNED"),))
    torch.save({"weight": Payload()}, path)


@pytest.mark.parametrize("write", [
    _evil_pickle,                                                        # would run a command if unpickled
    lambda p: torch.save({"model": torch.nn.Linear(2, 2)}, p),           # a whole module, not a state dict
    lambda p: p.write_bytes(b""),                                        # empty
    lambda p: p.write_text("not a checkpoint"),
    lambda p: torch.save([torch.zeros(2)], p),                           # tensors, but not a dict of them
], ids=["code_payload", "whole_module", "empty", "text", "list"])
def test_unsafe_or_unusable_model_exits_2_with_a_message(tmp_path: Path, repo_root: Path, write,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    write(model_dir / "model.pt")
    (model_dir / "meta.json").write_text(json.dumps({"model": "cnn21", "image_size": 32,
                                                     "classes": ["normal", "osteoporosis"]}))
    scan = _png16(tmp_path / "s.png")
    code = cli.main(["predict", "--model", str(model_dir / "model.pt"), str(scan),
                     "--params", str(repo_root / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spinedxa predict: error: ") and "model.pt" in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()
