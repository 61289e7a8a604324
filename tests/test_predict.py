"""spinedxa.predict: new scans through the ingest path and the fold ensemble, one row per file, Grad-CAM overlays.

The model directory is laid out as the train stage writes it (``models/cnn21/{meta.json, fold0/, fold1/}``, each fold
a randomly initialised cnn21 state dict with its meta.json), at 64 x 32 px input: predictions are meaningless but the
path from file to probability is the real one. Most format cases run with ``ingest.roi: whole`` (tiny gradients are
no spines); the ROI, text-screening and ingest-equivalence cases use synthetic spine scans from
``spinedxa.synthesize`` with a burned-in banner drawn by ``synthesize.draw_banner``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
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

from spinedxa import cli, ingest, predict, synthesize
from spinedxa.config import load_params
from spinedxa.data import fit, input_shape, read_image
from spinedxa.files import sha256_file
from spinedxa.models import get_model, load_trained, predict_proba

IMAGE_SIZE = 64
SHAPE = input_shape(IMAGE_SIZE)
CLASSES = ["normal", "osteoporosis"]
# The fake patient's header values, printed in a vendor-style banner (synthesize.banner_lines' formats).
BANNER = ("ZYXWVUT, QUINTESSA", "ID: PID-8675309-XQ", "DOB: 23.04.1951", "ST FICTIONAL HOSPITAL")


def _with_ingest(params, **changes):
    return dataclasses.replace(params, ingest=dataclasses.replace(params.ingest, **changes))


@pytest.fixture(scope="module")
def params(repo_root: Path):
    """params.yaml as committed: ROI located, burned-in text quarantined."""
    return load_params(repo_root / "params.yaml")


@pytest.fixture(scope="module")
def whole(params):
    """params with ``ingest.roi: whole``: the tiny format fixtures are gradients, not spines."""
    return _with_ingest(params, roi="whole")


def write_fold_model(directory: Path, fold: int | None, seed: int, image_size: int = IMAGE_SIZE) -> Path:
    """A fold directory as the train stage writes it: a cnn21 state dict and its meta.json."""
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(get_model("cnn21", 2).state_dict(), directory / "model.pt")
    meta = {"model": "cnn21", "variant": "cnn21", "batch_norm": False, "image_size": image_size,
            "input_shape": list(input_shape(image_size)), "classes": CLASSES,
            "model_sha256": sha256_file(directory / "model.pt")}
    if fold is not None:
        meta["fold"] = fold
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def write_model_dir(directory: Path, folds=(0, 1)) -> Path:
    """``models/cnn21/``: one fold directory per fold (different weights) and the parent meta.json."""
    for k in folds:
        write_fold_model(directory / f"fold{k}", k, seed=k)
    (directory / "meta.json").write_text(json.dumps({"model": "cnn21", "variant": "cnn21", "protocol": "kfold",
                                                      "folds": list(folds), "mlflow_run_id": None}))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("models") / "cnn21")


def _png16(path: Path, rows: int = 48, cols: int = 36, constant: bool = False) -> Path:
    pixels = np.full((rows, cols), 1000, np.uint16) if constant else gradient(rows, cols, 65535)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def spine(seed: int = 3) -> np.ndarray:
    """A synthetic AP lumbar spine scan (uint16, 512 x 384, the default export size)."""
    return synthesize.render_scan(np.random.default_rng(seed), -2.0, height=512, width=384, pixel_spacing_mm=0.5)


def with_banner(image: np.ndarray, seed: int = 1) -> np.ndarray:
    """``image`` with the fake patient's banner burned into a corner."""
    return synthesize.draw_banner(image, BANNER, np.random.default_rng(seed), 16)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DICOM spine scans whose header carries the fake PHI: clean, and with the banner; a gradient (no spine)."""
    folder = tmp_path_factory.mktemp("scans")
    return {
        "clean": write_dicom(folder / "clean.dcm", spine()),
        "banner": write_dicom(folder / "banner.dcm", with_banner(spine())),
        "no_spine": _png16(folder / "gradient.png", 200, 150),
    }


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
def test_each_file_gets_a_row(tmp_path: Path, model_dir: Path, whole, name, write, status, error) -> None:
    path = tmp_path / name
    write(path)
    (row,) = predict.predict_files(model_dir, [path], whole)
    assert (row.file, row.status) == (str(path), status)
    assert row.error.startswith(error), row.error
    if status == "ok":
        assert 0.0 <= row.probabilities["osteoporosis"] <= 1.0
        assert row.predicted == ("osteoporosis" if row.probabilities["osteoporosis"] >= whole.evaluate.threshold else "normal")
        assert row.redacted is False
    else:
        assert row.probabilities == {} and row.predicted == "" and row.redacted is None


def test_bad_files_do_not_stop_the_others_and_order_is_kept(tmp_path: Path, model_dir: Path, whole) -> None:
    files = []
    for name, write, _, _ in CASES:
        write(tmp_path / name)
        files.append(tmp_path / name)
    rows = predict.predict_files(model_dir, files, whole)
    assert [r.file for r in rows] == [str(f) for f in files]
    assert [r.status for r in rows] == [c[2] for c in CASES]


# ---------------------------------------------------------------------------------------------------- the ensemble


def test_ensemble_is_the_mean_of_the_fold_models(tmp_path: Path, model_dir: Path, whole) -> None:
    files = [_png16(tmp_path / "a.png"), write_dicom(tmp_path / "b.dcm", gradient(60, 44)),
             _png16(tmp_path / "c.png", 30, 50)]
    ensemble = predict.predict_files(model_dir, files, whole)
    per_fold = [predict.predict_files(model_dir / f"fold{k}", files, whole) for k in (0, 1)]
    assert all(r.status == "ok" for r in ensemble)
    for i, row in enumerate(ensemble):
        folds = [rows[i].probabilities["osteoporosis"] for rows in per_fold]
        assert row.probabilities["osteoporosis"] == pytest.approx(np.mean(folds), abs=2e-6)
    # the two folds really differ, so a mean of one fold alone would fail the test
    assert max(abs(per_fold[0][i].probabilities["osteoporosis"] - per_fold[1][i].probabilities["osteoporosis"]) for i in range(3)) > 1e-4


def test_ensemble_loads_every_fold_in_order(model_dir: Path) -> None:
    ensemble = predict.load_ensemble(model_dir)
    assert [m.fold for m in ensemble.members] == [0, 1]
    assert [m.directory for m in ensemble.members] == [model_dir / "fold0", model_dir / "fold1"]
    assert (ensemble.name, ensemble.image_size, ensemble.shape) == ("cnn21", IMAGE_SIZE, SHAPE)
    assert "ensemble of 2 fold models, mean probability" in ensemble.describe()
    single = predict.load_ensemble(model_dir / "fold1" / "model.pt")
    assert [m.fold for m in single.members] == [1] and "one model" in single.describe()


def test_prediction_matches_the_fold_model_on_the_same_tensor(tmp_path: Path, model_dir: Path, whole) -> None:
    path = _png16(tmp_path / "scan.png")
    (row,) = predict.predict_files(model_dir / "fold0", [path], whole)
    model, _ = load_trained(model_dir / "fold0")
    image = torch.from_numpy(predict.prepare_image(path, whole, SHAPE).image)[None, None]
    assert row.probabilities["osteoporosis"] == pytest.approx(float(predict_proba(model, "cnn21", image)[0, 1]), abs=1e-6)


@pytest.mark.parametrize(
    ("breaks", "exc", "match"),
    [
        (lambda d: (d / "fold1" / "meta.json").write_text(json.dumps(
            {**json.loads((d / "fold1" / "meta.json").read_text()), "image_size": 96})),
         ValueError, "image_size is 96, but .*fold0/meta.json has 64"),
        (lambda d: (d / "fold1" / "model.pt").write_bytes((d / "fold0" / "model.pt").read_bytes()),
         ValueError, "fold1/model.pt: sha256 differs from model_sha256"),
        (lambda d: shutil.rmtree(d / "fold1"), ValueError, r"lists folds \[0, 1\].* folds \[0\]"),
        (lambda d: [shutil.rmtree(d / f"fold{k}") for k in (0, 1)], ValueError, r"lists folds \[0, 1\].* folds \[\]"),
        (lambda d: [shutil.rmtree(d), d.mkdir()], FileNotFoundError, "no model.pt and no fold model directories"),
    ],
    ids=["folds_disagree", "tampered_weights", "missing_fold", "no_folds", "empty"],
)
def test_unusable_model_directory_is_an_error(tmp_path: Path, whole, breaks, exc: type, match: str) -> None:
    directory = write_model_dir(tmp_path / "cnn21")
    breaks(directory)
    with pytest.raises(exc, match=match):
        predict.predict_files(directory, [_png16(tmp_path / "s.png")], whole)


# ---------------------------------------------------------------------------------------------------- ingest's path


def _ingest_roi(path: Path, params, tmp_path: Path) -> tuple[dict, np.ndarray | None]:
    """What ingest writes for ``path`` (run on a source holding only it): its manifest row and its ROI image, as
    training reads it."""
    source = tmp_path / "source"
    (source / "normal").mkdir(parents=True)
    shutil.copy(path, source / "normal" / path.name)
    out = tmp_path / "ingested"
    ingest.run_ingest(source, out, tmp_path / "ingest.json", task=params.data.task, settings=params.ingest,
                      progress=False)
    (row,) = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False).to_dict("records")
    return row, (read_image(out / row["roi"]) if row["status"] == "accepted" else None)


@pytest.mark.parametrize(("scan", "policy", "roi"), [("banner", "redact", "locate"), ("clean", "quarantine", "locate"),
                                                     ("clean", "quarantine", "whole")])
def test_input_is_exactly_what_ingest_writes_for_training(tmp_path: Path, params, scans, scan: str, policy: str,
                                                          roi: str) -> None:
    """decode -> text screening -> normalise -> ROI -> (16-bit PNG read back) -> fit, as ingest + training do."""
    cfg = _with_ingest(params, burned_in_text=policy, roi=roi)
    row, roi_image = _ingest_roi(scans[scan], cfg, tmp_path)
    assert row["status"] == "accepted", row["reason"]
    prepared = predict.prepare_image(scans[scan], cfg, SHAPE)
    np.testing.assert_array_equal(prepared.image, fit(roi_image, SHAPE))
    assert prepared.redacted == (scan == "banner") and row["redacted"] == str(prepared.redacted)


def test_burned_in_text_is_quarantined(model_dir: Path, params, scans) -> None:
    rows = predict.predict_files(model_dir, [scans["banner"], scans["clean"]], params)
    assert [(r.status, r.redacted) for r in rows] == [("error", None), ("ok", False)]
    assert rows[0].error.startswith("burned_in_text: ") and "matching header PHI" in rows[0].error
    text = predict.to_csv(rows)
    for value in (*FAKE_PHI.values(), *BANNER, "ZYXWVUT", "8675309"):
        assert value not in text


def test_burned_in_text_is_redacted_and_flagged(tmp_path: Path, model_dir: Path, params, scans) -> None:
    redact = _with_ingest(params, burned_in_text="redact")
    rows = predict.predict_files(model_dir, [scans["banner"], scans["clean"]], redact, gradcam_dir=tmp_path / "cam")
    assert [(r.status, r.redacted) for r in rows] == [("ok", True), ("ok", False)]
    table = pd.read_csv(io.StringIO(predict.to_csv(rows)))
    assert table["redacted"].tolist() == [True, False]
    assert (tmp_path / "cam" / "banner.gradcam.png").is_file()


def test_no_spine_gets_a_no_roi_row(model_dir: Path, params, scans) -> None:
    (row,) = predict.predict_files(model_dir, [scans["no_spine"]], params)
    assert row.status == "error" and row.error.startswith("no_roi: "), row.error


def test_a_spine_is_located_and_predicted(model_dir: Path, params, scans) -> None:
    (row,) = predict.predict_files(model_dir, [scans["clean"]], params)
    assert row.status == "ok" and 0.0 <= row.probabilities["osteoporosis"] <= 1.0


# ---------------------------------------------------------------------------------------------------- output


def test_no_phi_reaches_the_output(tmp_path: Path, model_dir: Path, whole) -> None:
    path = write_dicom(tmp_path / "scan.dcm")
    text = predict.to_csv(predict.predict_files(model_dir, [path], whole, gradcam_dir=tmp_path / "cam"))
    for value in FAKE_PHI.values():
        assert value not in text
        assert value.encode() not in (tmp_path / "cam" / "scan.gradcam.png").read_bytes()


def test_gradcam_overlays_one_per_usable_file(tmp_path: Path, model_dir: Path, whole) -> None:
    files = [_png16(tmp_path / "a" / "scan.png"), _png16(tmp_path / "b" / "scan.png", 30, 50),
             _png16(tmp_path / "flat.png", constant=True)]
    rows = predict.predict_files(model_dir, files, whole, gradcam_dir=tmp_path / "cam")
    assert [r.status for r in rows] == ["ok", "ok", "error"]
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["scan-2.gradcam.png", "scan.gradcam.png"]
    with Image.open(tmp_path / "cam" / "scan.gradcam.png") as img:
        assert (img.mode, img.size) == ("RGB", (SHAPE[1], SHAPE[0]))
        assert np.asarray(img).std() > 0


def test_gradcam_is_the_mean_of_the_fold_maps(tmp_path: Path, model_dir: Path, whole) -> None:
    from spinedxa.evaluate import gradcam_maps

    ensemble = predict.load_ensemble(model_dir)
    image = torch.from_numpy(predict.prepare_image(_png16(tmp_path / "s.png"), whole, SHAPE).image)[None, None]
    maps = [gradcam_maps(m.model, "cnn21", image)[0] for m in ensemble.members]
    np.testing.assert_allclose(ensemble.gradcam(image)[0], np.mean(maps, axis=0), atol=1e-6)


def test_collect_files_expands_directories(tmp_path: Path) -> None:
    for rel in ("d/b.dcm", "d/a.png", "d/sub/c.png", "d/.hidden", "d/.cache/x.png", "single.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files = predict.collect_files([tmp_path / "d", tmp_path / "single.dcm", tmp_path / "nowhere.dcm"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "d/a.png", "d/b.dcm", "d/sub/c.png", "single.dcm", "nowhere.dcm"]


def test_csv_has_the_contract_columns(tmp_path: Path, model_dir: Path, whole) -> None:
    rows = predict.predict_files(model_dir, [_png16(tmp_path / "s.png"), tmp_path / "gone.png"], whole)
    predict.write_csv(tmp_path / "out.csv", rows)
    table = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert list(table[0]) == ["file", "prob_normal", "prob_osteoporosis", "predicted", "status", "error", "redacted"]
    assert [(t["status"], t["redacted"]) for t in table] == [("ok", "False"), ("error", "")]
    assert table[1]["prob_osteoporosis"] == "" and table[1]["error"].startswith("unreadable")


@pytest.mark.parametrize(
    ("model", "exc", "match"),
    [("nowhere/model.pt", FileNotFoundError, "model not found"),
     ("nowhere", FileNotFoundError, "model not found"),
     ("no_meta/model.pt", FileNotFoundError, "meta.json: not found")],
)
def test_unusable_model_is_an_error(tmp_path: Path, whole, model: str, exc: type, match: str) -> None:
    (tmp_path / "no_meta").mkdir()
    (tmp_path / "no_meta" / "model.pt").write_bytes(b"")
    with pytest.raises(exc, match=match):
        predict.predict_files(tmp_path / model, [tmp_path / "x.png"], whole)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_predict_reproduces_evaluate_on_the_raw_test_files(tmp_path: Path) -> None:
    """The tiny pipeline up to one model's evaluation: predicting each scan's raw file (DICOM, through decoding, text
    screening, normalisation and the ROI again) with the fold model that scored it out of fold gives the
    probability evaluate computed from the ingested ROI PNGs."""
    repo = make_repo_copy(tmp_path / "repo")
    run([str(VENV_BIN / "dvc"), "repro", "evaluate@cnn21"], repo)
    expected = pd.read_csv(repo / "reports/predictions/cnn21.csv")
    for fold, part in expected.groupby("fold"):
        raw = [f"data/raw/synthetic/{s}" for s in part["source"]]
        run([str(VENV_BIN / "spinedxa"), "predict", "--model", f"models/cnn21/fold{fold}", *raw, "--csv",
             f"new{fold}.csv"], repo)
        got = pd.read_csv(repo / f"new{fold}.csv")
        assert got["status"].eq("ok").all()
        np.testing.assert_allclose(got["prob_osteoporosis"], part["prob"], atol=1e-5)
        assert (got["predicted"].to_numpy() == part["predicted"].to_numpy()).all()


def test_directory_with_dangling_link_and_loop(tmp_path: Path, model_dir: Path, whole) -> None:
    """A folder given to predict: a dangling link gets an error row, a directory loop is walked once."""
    folder = tmp_path / "scans"
    _png16(folder / "a.png")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    files = predict.collect_files([folder])
    assert [f.relative_to(folder).as_posix() for f in files] == ["a.png", "gone.png"]
    rows = predict.predict_files(model_dir, files, whole)
    assert [(r.status, r.error.partition(":")[0]) for r in rows] == [("ok", ""), ("error", "symlink_dangling")]


@pytest.mark.filterwarnings("ignore:The value length")  # the fixture breaks the CS length limit on purpose
def test_header_value_is_not_echoed_in_predict_output(tmp_path: Path, model_dir: Path, whole) -> None:
    ds = make_dataset(gradient())
    ds.PhotometricInterpretation = FAKE_PHI["PatientName"]
    ds.save_as(tmp_path / "phi.dcm", enforce_file_format=True)
    (row,) = predict.predict_files(model_dir, [tmp_path / "phi.dcm"], whole)
    assert row.error.startswith("unsupported_photometric: ") and "Zyxwvut" not in row.error


def _evil_pickle(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.parent / "PWNED"),))
    torch.save({"weight": Payload()}, path)


@pytest.mark.parametrize("layout", ["fold_dir", "model_dir"])
@pytest.mark.parametrize("write", [
    _evil_pickle,                                                        # would run a command if unpickled
    lambda p: torch.save({"model": torch.nn.Linear(2, 2)}, p),           # a whole module, not a state dict
    lambda p: p.write_bytes(b""),                                        # empty
    lambda p: p.write_text("not a checkpoint"),
    lambda p: torch.save([torch.zeros(2)], p),                           # tensors, but not a dict of them
], ids=["code_payload", "whole_module", "empty", "text", "list"])
def test_unsafe_or_unusable_model_exits_2_with_a_message(tmp_path: Path, repo_root: Path, write, layout: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fold_dir = tmp_path / "m" / "fold0"
    fold_dir.mkdir(parents=True)
    write(fold_dir / "model.pt")
    (fold_dir / "meta.json").write_text(json.dumps({"model": "cnn21", "fold": 0, "image_size": 64,
                                                    "classes": CLASSES}))
    scan = _png16(tmp_path / "s.png")
    model = fold_dir / "model.pt" if layout == "fold_dir" else tmp_path / "m"
    code = cli.main(["predict", "--model", str(model), str(scan), "--params", str(repo_root / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spinedxa predict: error: ") and "model.pt" in err and "Traceback" not in err
    assert not (tmp_path / "m" / "fold0" / "PWNED").exists()
