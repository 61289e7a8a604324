"""Cohorts the pipeline did not generate, end to end under `dvc repro` (tiny profile, temporary git copies):

* **Real radiographs** (``tests/fixtures/real/dicom``: CR images published openly with pydicom-data, MIT; see its
  PROVENANCE.md): tiles of a chest and a lower-leg radiograph, filed as a user's cohort comes, in class folders named
  in the user's own words, with a byte-identical copy inside a class, another across two classes and a folder the
  label map drops. One params change (``data.*``, ``ingest.roi: whole``) and no edit of the data: the duplicate rule,
  the label map, the square whole-image ROI, training, the report's words and ``spinedxa predict`` on a whole real
  DICOM. The labels are the anatomy the tiles show (true labels, not bone density): this checks that real pixels go
  through every stage, not that a model diagnoses anything.
* **The WHO's three classes** (``profiles/who3.yaml``) on the synthetic cohort: three outputs everywhere, the ordinal
  metrics, the report and predict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import Image

from conftest import REPO, discard_after, make_repo_copy, run
from spinedxa.config import apply_profile, load_params

REAL = REPO / "tests" / "fixtures" / "real" / "dicom"
TILE = 256
WHO = ("normal", "osteopenia", "osteoporosis")


def repro(repo: Path) -> None:
    run(["dvc", "repro"], repo, env={"MLFLOW_TRACKING_URI": ""})


def edit_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = raw
        *head, last = dotted.split(".")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def tiles(path: Path, n: int = 12) -> list[np.ndarray]:
    """``n`` TILE x TILE tiles from the interior of a real radiograph (its stored 16-bit values), row by row."""
    pixels = pydicom.dcmread(path).pixel_array
    h, w = pixels.shape
    rows, cols = 3, n // 3
    # Away from the edges, where lead markers and annotations would (rightly) be quarantined as burned-in text:
    # measured, a tile at (0.15, 0.1) of the chest and one at (0.8, 0.8) of the leg hold text the OCR reads.
    ys = np.linspace(0.2 * h, 0.7 * h - TILE, rows).astype(int)
    xs = np.linspace(0.2 * w, 0.7 * w - TILE, cols).astype(int)
    return [pixels[y:y + TILE, x:x + TILE].astype(np.uint16) for y in ys for x in xs]


def write_real_cohort(source: Path) -> None:
    """The user's folder: ``chest PA/`` and ``lower leg AP/`` tiles (16-bit PNG), a copy of a chest tile inside its
    class, a chest tile also filed under the leg (a label conflict), and ``c-spine/`` (three tiny cervical-spine
    radiographs, untouched) that the task leaves out."""
    for folder, dicom in (("chest PA", "RG1_J2KI.dcm"), ("lower leg AP", "RG3_J2KI.dcm")):
        (source / folder).mkdir(parents=True)
        for k, tile in enumerate(tiles(REAL / dicom)):
            Image.fromarray(tile).save(source / folder / f"tile_{k:02d}.png")
    shutil.copy(source / "chest PA" / "tile_00.png", source / "chest PA" / "tile_00 (copy).png")
    shutil.copy(source / "chest PA" / "tile_01.png", source / "lower leg AP" / "tile_99.png")
    (source / "c-spine").mkdir()
    for name in ("CR1_6154.dcm", "CR2_6247.dcm", "CR3_6278.dcm"):
        shutil.copy(REAL / name, source / "c-spine" / name)


# ------------------------------------------------------------------------------------------------ real radiographs


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    repo = make_repo_copy(discard_after(request, tmp_path_factory.mktemp("real")) / "repo")
    write_real_cohort(repo / "data" / "raw" / "cr_tiles")
    edit_params(repo, {  # the one params change a user makes: where the data is and what its labels mean
        "data.source": "data/raw/cr_tiles", "data.classes": ["chest", "lower_leg"],
        "data.class_map": {"chest PA": "chest", "lower leg AP": "lower_leg", "c-spine": "drop"},
        "data.name": "real CR radiograph tiles (pydicom-data, MIT)", "data.anatomy": "chest and lower leg",
        "data.modality": "CR radiograph", "ingest.roi": "whole", "external.enabled": False,
        "train.models": ["cnn21"],
    })
    load_params(repo / "params.yaml")  # valid
    repro(repo)
    return repo


def test_a_real_cohort_runs_end_to_end_as_it_comes(real: Path) -> None:
    manifest = pd.read_csv(real / "data/ingested/manifest.csv", dtype=str, keep_default_na=False).set_index("source")
    status = manifest["status"].where(manifest["status"] != "quarantined",
                                      manifest["reason"].str.partition(":")[0])
    # The copy that sorts first is kept (" (copy)" sorts before ".png"): a rule, whatever the file order.
    assert status["chest PA/tile_00.png"] == "duplicate"
    assert manifest.at["chest PA/tile_00.png", "duplicate_of"] == "chest PA/tile_00 (copy).png"
    assert status["chest PA/tile_01.png"] == status["lower leg AP/tile_99.png"] == "label_conflict"
    assert (status[[s for s in status.index if s.startswith("c-spine/")]] == "dropped").all()
    accepted = manifest[manifest["status"] == "accepted"]
    # 12 + 12 tiles and 2 copies: the two conflicting copies quarantined, one exact copy a duplicate -> 23 scans.
    assert len(accepted) == 23 and set(accepted["label"]) == {"chest", "lower_leg"}
    assert set(accepted["label_found"]) == {"chest PA", "lower leg AP"}
    assert (accepted["roi_height"] == accepted["roi_width"]).all()  # whole images, square
    ingest = json.loads((real / "reports/ingest.json").read_text())
    assert (ingest["n_dropped"], ingest["n_duplicates"], ingest["n_label_conflicts"]) == (3, 1, 2)
    assert ingest["patient_from"]["file"] == 23  # PNG tiles name no patient: each is its own, and it is said
    record = json.loads((real / "reports/metrics/cnn21.json").read_text())
    assert record["n_test"] == 23 and record["roc_auc"] is not None
    md = (real / "reports/comparison.md").read_text()
    assert md.startswith("# Lower_leg vs chest in the real CR radiograph tiles (pydicom-data, MIT)")
    assert "anatomy: chest and lower leg; modality: CR radiograph" in md
    assert "DXA" not in md.split("## Data", 1)[0]  # never called DXA
    assert "**23 accepted scans of 23 patients**" in md and "each of those is its own patient" in md
    assert "No external cohort was scored" in md


def test_predict_takes_a_whole_real_dicom(real: Path) -> None:
    out = run(["spinedxa", "predict", "--model", "models/cnn21", "--params", "params.yaml", "--csv", "p.csv",
               str(REAL / "RG1_J2KI.dcm"), str(REAL / "RG3_J2KI.dcm")], real)
    assert "2 of 2 file(s) predicted" in out.stdout
    rows = pd.read_csv(real / "p.csv")
    assert list(rows.columns[:3]) == ["file", "prob_chest", "prob_lower_leg"]
    assert np.allclose(rows["prob_chest"] + rows["prob_lower_leg"], 1.0, atol=2e-6)
    assert set(rows["status"]) == {"ok"} and set(rows["predicted"]) <= {"chest", "lower_leg"}


# ------------------------------------------------------------------------------------------------ three classes


@pytest.fixture(scope="module")
def who3(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    repo = make_repo_copy(discard_after(request, tmp_path_factory.mktemp("who3")) / "repo")
    apply_profile(repo / "params.yaml", repo / "profiles" / "who3.yaml")
    edit_params(repo, {"train.models": ["cnn21", "resnet50"], "synthesize.n_scans": 60,
                       "synthesize.n_osteoporosis": 24})
    repro(repo)
    return repo


def test_three_who_classes_run_end_to_end(who3: Path) -> None:
    params = load_params(who3 / "params.yaml")
    assert params.data.classes == WHO
    for model in ("cnn21", "resnet50", "baseline"):
        record = json.loads((who3 / f"reports/metrics/{model}.json").read_text())
        for key in ("roc_auc", "kappa_quadratic", "balanced_accuracy", *(f"roc_auc_{c}" for c in WHO),
                    "external_roc_auc", "external_kappa_quadratic"):
            assert key in record and f"{key}_ci_low" in record, (model, key)
        assert set(record["confusion"]) == set(WHO) and all(set(row) == set(WHO)
                                                            for row in record["confusion"].values())
        assert "tp" not in record
        predictions = pd.read_csv(who3 / f"reports/predictions/{model}.csv")
        assert [c for c in predictions.columns if c.startswith("prob_")] == [f"prob_{c}" for c in WHO]
        assert set(predictions["actual"]) == set(WHO)
    fold = json.loads((who3 / "models/cnn21/fold0/meta.json").read_text())
    assert fold["classes"] == list(WHO) and fold["calibration"]["method"] in ("temperature_on_val",
                                                                              "identity (one class on val)")
    md = (who3 / "reports/comparison.md").read_text()
    assert "ordinal, 3 classes: normal < osteopenia < osteoporosis" in md
    assert "| Quadratic-weighted kappa |" in md and "| ROC-AUC, osteopenia vs rest |" in md
    assert "| actual \\ predicted | normal | osteopenia | osteoporosis |" in md
    split = json.loads((who3 / "reports/split.json").read_text())
    assert all(split["folds"][k]["test"]["osteopenia"] > 0 for k in split["folds"])


def test_predict_gives_the_three_class_probabilities(who3: Path) -> None:
    scans = sorted((who3 / "data/raw/external").rglob("scan_000*.dcm"))[:3]
    out = run(["spinedxa", "predict", "--model", "models/resnet50", "--params", "params.yaml", *map(str, scans)],
              who3).stdout
    header = out.splitlines()[0].split(",")
    assert header[:4] == ["file", "prob_normal", "prob_osteopenia", "prob_osteoporosis"]
    for line in out.splitlines()[1:]:
        cells = line.split(",")
        if cells[5] == "ok":
            assert abs(sum(map(float, cells[1:4])) - 1.0) < 1e-5 and cells[4] in WHO
