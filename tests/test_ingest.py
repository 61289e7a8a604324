"""The ingest stage: walking and labelling, the manifest contract (whole image and ROI image per accepted scan),
summaries, systemic errors, the CLI. The tiny test images are not spines, so these runs use ``ingest.roi: whole``
(tests/test_roi.py covers ``locate`` and the ``no_roi`` quarantine)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from dicom_factory import CONSISTENT, gradient, hostile_corpus, write_deflate_bomb, write_dicom
from spinedxa import deid, ingest
from spinedxa.config import IngestConfig, load_params
from spinedxa.contracts import png16
from spinedxa.files import sha256_file
from spinedxa.task import Task
from spinedxa.ingest import MANIFEST_COLUMNS, IngestError, LabelsError, phash16, read_labels, run_ingest

CLASSES = ("normal", "osteoporosis")
REPO = Path(__file__).resolve().parents[1]


ROI_HEIGHT = 32  # the smallest allowed ROI image: 32 x 32 under ingest.roi: whole (32 x 16 when located)


def settings(max_side: int = 24, multiframe: str = "first", **kwargs) -> IngestConfig:
    return IngestConfig(max_side=max_side, max_pixels=10**6, multiframe=multiframe, roi="whole",
                        roi_height=ROI_HEIGHT, **kwargs)


def scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (gradient() + rng.integers(0, 200, (40, 32))).astype(np.uint16)


def folder_source(root: Path) -> dict[str, str]:
    """A class-folder source with good and bad files; returns {relative path: expected reason code or 'accepted'}."""
    expected: dict[str, str] = {}

    def add(rel: str, reason: str) -> Path:
        expected[rel] = reason
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        return root / rel

    write_dicom(add("normal/a.dcm", "accepted"), scan(1), phi={"PatientID": "SAME-PATIENT"})
    write_dicom(add("normal/b.dcm", "accepted"), scan(2), phi={"PatientID": "SAME-PATIENT"}, compress=RLELossless)
    write_dicom(add("osteoporosis/c.dcm", "accepted"), scan(3), photometric="MONOCHROME1", phi={})
    write_dicom(add("osteoporosis/deep/d.dcm", "accepted"), scan(4), phi={"PatientID": "OTHER"})
    Image.fromarray(scan(5)).save(add("osteoporosis/e.png", "accepted"))
    Image.fromarray(scan(6)).save(add("osteoporosis/f.tif", "accepted"))
    # Seed 21: the OCR reads a "2" (score 0.88) in the JPEG noise of scan(7), and of 4 in 40 such tiny noisy JPEGs.
    Image.fromarray((scan(21) // 16).astype(np.uint8)).save(add("normal/g.jpg", "accepted"))
    write_dicom(add("osteoporosis/mf.dcm", "accepted"), np.stack([scan(8), scan(9)]))
    add("normal/.DS_Store", "not_an_image").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    add("normal/empty.dcm", "zero_byte").write_bytes(b"")
    add("normal/notes.png", "not_an_image").write_text("a text file named .png")
    add("README.txt", "no_label").write_text("readme")
    write_dicom(add("unsorted/h.dcm", "unknown_label"), scan(10))
    write_dicom(add("normal/burned.dcm", "burned_in_annotation"), scan(11), extra={"BurnedInAnnotation": "YES"})
    return expected


def read_manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        return list(reader)


@pytest.mark.parametrize("workers", [1, 2])
def test_folder_source_manifest_contract(tmp_path: Path, workers: int) -> None:
    source = tmp_path / "source"
    expected = folder_source(source)
    out, summary_path = tmp_path / "ingested", tmp_path / "ingest.json"
    summary = run_ingest(source, out, summary_path, task=Task(CLASSES), settings=settings(), workers=workers,
                         progress=False)
    rows = read_manifest(out)

    sources = [r["source"] for r in rows]
    assert sources == sorted(expected) and len(set(sources)) == len(sources)  # each input exactly once, sorted
    for row in rows:
        want = expected[row["source"]]
        assert row["sha256"] == sha256_file(source / row["source"])
        assert re.fullmatch(r"P[0-9a-f]{12}", row["patient_id"])
        if want == "accepted":
            assert row["status"] == "accepted" and row["reason"] == ""
            image = out / row["image"]
            assert row["image"] == f"images/{row['sha256'][:16]}.png" and image.is_file()
            with Image.open(image) as img:
                assert img.mode == "I;16" and max(img.size) <= 24
                assert img.size == (int(row["width"]), int(row["height"]))
                pixels = np.asarray(img)
            assert int(row["max"]) == pixels.max() and abs(float(row["mean"]) - pixels.mean()) < 0.01
            assert re.fullmatch(r"[0-9a-f]{16}", row["phash"])
            assert row["label"] == row["source"].split("/")[0]
            # ingest.roi: whole: the ROI is the whole image letterboxed into a square, resized to roi_height.
            assert row["roi"] == f"roi/{row['sha256'][:16]}.png" and row["roi_method"] == "whole"
            assert png16.read(out / row["roi"]).shape == (ROI_HEIGHT, ROI_HEIGHT)
            assert int(row["roi_height"]) == int(row["roi_width"]) == max(int(row["height"]), int(row["width"]))
            assert row["redacted"] == "False"
        else:
            assert row["status"] == "quarantined" and row["reason"].split(":")[0] == want
            assert row["image"] == row["roi"] == row["phash"] == ""
    for folder in ("images", "roi"):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(
            f"{r['sha256'][:16]}.png" for r in rows if r["status"] == "accepted")

    by_source = {r["source"]: r for r in rows}
    assert by_source["normal/a.dcm"]["patient_id"] == by_source["normal/b.dcm"]["patient_id"]
    assert by_source["normal/a.dcm"]["patient_id"] != by_source["osteoporosis/deep/d.dcm"]["patient_id"]
    no_id = by_source["osteoporosis/c.dcm"]  # no PatientID, no name: each such file is its own patient
    assert no_id["patient_id"] == deid.file_pseudonym(no_id["sha256"])
    assert by_source["osteoporosis/mf.dcm"]["frames"] == "2"
    assert {by_source[s]["format"] for s in ("normal/a.dcm", "osteoporosis/e.png", "osteoporosis/f.tif",
                                             "normal/g.jpg")} == {"dicom", "png", "tiff", "jpeg"}

    on_disk = json.loads(summary_path.read_text())
    assert on_disk == summary
    n_ok = sum(v == "accepted" for v in expected.values())
    assert summary["n_files"] == len(expected) and summary["n_accepted"] == n_ok
    assert summary["n_quarantined"] == len(expected) - n_ok
    assert summary["quarantine_rate"] == pytest.approx((len(expected) - n_ok) / len(expected), abs=1e-6)
    assert summary["per_label"] == {"normal": 3, "osteoporosis": 5}
    assert summary["per_reason"] == {"burned_in_annotation": 1, "no_label": 1, "not_an_image": 2,
                                     "unknown_label": 1, "zero_byte": 1}
    assert summary["error"] is None and summary["labelling"] == "folders"


def test_outputs_are_deterministic_and_raw_input_untouched(tmp_path: Path) -> None:
    source = tmp_path / "source"
    folder_source(source)
    before = {p: sha256_file(p) for p in source.rglob("*") if p.is_file()}
    digests = []
    for run in ("one", "two"):
        out = tmp_path / run
        run_ingest(source, out, tmp_path / f"{run}.json", task=Task(CLASSES), settings=settings(), workers=2,
                   progress=False)
        digests.append({p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()})
    assert digests[0] == digests[1]
    assert {p: sha256_file(p) for p in source.rglob("*") if p.is_file()} == before


def test_output_dir_is_replaced_whole(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_dicom(source / "normal" / "a.dcm", scan(1))
    out = tmp_path / "ingested"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    run_ingest(source, out, tmp_path / "s.json", task=Task(CLASSES), settings=settings(), progress=False)
    assert not (out / "images" / "stale.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "images", "manifest.csv", "roi"]


def test_checksums_cover_every_ingested_file(tmp_path: Path) -> None:
    """SHA256SUMS (what the stages downstream declare as their DVC dep) lists every other file of the output, and
    ``sha256sum -c`` accepts it; a changed image fails the check."""
    source = tmp_path / "source"
    folder_source(source)
    out = tmp_path / "ingested"
    run_ingest(source, out, tmp_path / "s.json", task=Task(CLASSES), settings=settings(), progress=False)
    listed = [line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert listed == files and "manifest.csv" in listed and any(f.startswith("roi/") for f in listed)
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out).returncode == 0
    roi = next(out.glob("roi/*.png"))
    roi.write_bytes(roi.read_bytes() + b"\0")
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, capture_output=True).returncode == 1


# --- labels.csv ---------------------------------------------------------------------------------------------------

def test_labels_csv_source(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name, seed in (("x1.png", 1), ("x2.png", 2), ("sub/x3.png", 3), ("x4.png", 4), ("x5.png", 5)):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scan(seed)).save(source / name)
    write_dicom(source / "y.dcm", scan(6), phi={"PatientID": "DICOM-ID"})
    (source / "labels.csv").write_text(
        "path,label,patient_id\n"
        "x1.png,normal,PAT-A\n"
        "./x2.png,osteoporosis,PAT-A\n"
        "sub/x3.png,osteoporosis,\n"
        "x4.png,osteopenia,PAT-B\n"
        "y.dcm,normal,\n"
        "missing.png,normal,PAT-C\n"
    )
    out, summary_path = tmp_path / "ingested", tmp_path / "s.json"
    summary = run_ingest(source, out, summary_path, task=Task(CLASSES), settings=settings(), progress=False)
    rows = {r["source"]: r for r in read_manifest(out)}
    assert set(rows) == {"x1.png", "x2.png", "sub/x3.png", "x4.png", "x5.png", "y.dcm"}  # labels.csv is no input
    assert rows["x1.png"]["patient_id"] == rows["x2.png"]["patient_id"] == deid.patient_pseudonym("PAT-A")
    assert rows["sub/x3.png"]["patient_id"] == deid.file_pseudonym(rows["sub/x3.png"]["sha256"])
    assert rows["y.dcm"]["patient_id"] == deid.patient_pseudonym("DICOM-ID")
    assert rows["x4.png"]["reason"].startswith("unknown_label: ") and "osteopenia" in rows["x4.png"]["reason"]
    assert rows["x5.png"]["reason"].startswith("no_label: ")
    assert rows["x2.png"]["label"] == "osteoporosis" and rows["x1.png"]["status"] == "accepted"
    assert summary["labelling"] == "labels.csv" and summary["n_labels_without_file"] == 1
    assert summary["per_reason"] == {"no_label": 1, "unknown_label": 1}


@pytest.mark.parametrize("text, match", [
    ("file,label\na.png,normal\n", "header"),
    ("path,label,patient_id,extra\na.png,normal,P,x\n", "header"),
    ("path\na.png\n", "header"),
    ("", "header"),
    ("path,label\na.png,normal,extra\n", r":2: expected 2 fields"),
    ("path,label,patient_id\na.png\n", r":2: expected 3 fields"),
    ("path,label\na.png,normal\na.png,osteoporosis\n", r":3: duplicate path"),
    ("path,label\n/etc/a.png,normal\n", "must be relative"),
    ("path,label\n../a.png,normal\n", "must be relative"),
    ("path,label\n,normal\n", "must be relative"),
    ("path,label\nlabels.csv,normal\n", "cannot label itself"),
])
def test_malformed_labels_csv(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(LabelsError, match=match):
        read_labels(tmp_path / "labels.csv", CLASSES)


def test_malformed_labels_stop_the_stage_after_the_summary(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_dicom(source / "a.dcm", scan(1))
    (source / "labels.csv").write_text("file,label\na.dcm,normal\n")
    summary_path = tmp_path / "s.json"
    with pytest.raises(LabelsError, match="header"):
        run_ingest(source, tmp_path / "out", summary_path, task=Task(CLASSES), settings=settings(), progress=False)
    assert "header" in json.loads(summary_path.read_text())["error"]
    assert not (tmp_path / "out").exists()


# --- systemic errors ----------------------------------------------------------------------------------------------

def _missing(source: Path) -> None:
    pass


def _empty(source: Path) -> None:
    (source / "normal").mkdir(parents=True)


def _all_bad(source: Path) -> None:
    (source / "normal").mkdir(parents=True)
    (source / "normal" / "a.dcm").write_bytes(b"")
    (source / "normal" / "b.png").write_text("text")


@pytest.mark.parametrize("make, match, manifest_rows", [
    (_missing, "does not exist", None),
    (_empty, "contains no files", 0),
    (_all_bad, "no file of 2 was accepted", 2),
])
def test_systemic_problems_raise_after_the_summary(tmp_path: Path, make, match: str,
                                                   manifest_rows: int | None) -> None:
    source, out, summary_path = tmp_path / "source", tmp_path / "out", tmp_path / "s.json"
    make(source)
    with pytest.raises(IngestError, match=match):
        run_ingest(source, out, summary_path, task=Task(CLASSES), settings=settings(), progress=False)
    summary = json.loads(summary_path.read_text())
    assert re.search(match, summary["error"]) and summary["n_accepted"] == 0
    if manifest_rows is None:
        assert not out.exists()
    else:
        assert len(read_manifest(out)) == manifest_rows  # kept for diagnosis: why was everything quarantined?


# --- the stage's command line (as dvc.yaml calls it) --------------------------------------------------------------

def _params_file(tmp_path: Path) -> Path:
    """The repo's params.yaml with one ingest worker and ``ingest.roi: whole`` (the test images are not spines)."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runtime"]["workers"] = 1
    raw["ingest"].update(roi="whole", roi_height=ROI_HEIGHT)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_stage_cli(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("stage_ingest", REPO / "stages" / "ingest.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    main = stage.main
    source = tmp_path / "source"
    write_dicom(source / "normal" / "a.dcm", scan(1))
    write_dicom(source / "osteoporosis" / "b.dcm", scan(2))
    params = _params_file(tmp_path)
    figure = tmp_path / "roi_examples.png"
    args = ["--params", str(params), "--out", str(tmp_path / "out"), "--summary", str(tmp_path / "s.json"),
            "--roi-figure", str(figure), "--no-progress"]
    assert main([*args, "--source", str(source)]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["n_accepted"] == 2
    assert figure.is_file()
    assert main([*args, "--source", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in json.loads((tmp_path / "s.json").read_text())["error"]


# --- pHash and the read-once path ---------------------------------------------------------------------------------

def _u16(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 65535).astype(np.uint16)


_RNG = np.random.default_rng(7)
PHASH_IMAGES = {
    "noise": _u16(_RNG.integers(0, 65536, (64, 48))),
    "scan": _u16(scan(3).astype(np.float64) * 16),
    "dxa_size": _u16(np.kron(scan(4), np.ones((6, 6))) * 16.0 + _RNG.normal(0, 900, (240, 192))),
    "constant": np.full((40, 32), 30000, np.uint16),
    "black": np.zeros((32, 32), np.uint16),
    "mirror_symmetric": _u16(np.abs(np.linspace(-1, 1, 48))[None, :] * np.linspace(0, 65535, 64)[:, None]),
    "checkerboard": _u16((np.indices((64, 64)).sum(0) % 2) * 65535.0),
    "one_pixel": np.full((1, 1), 12345, np.uint16),
    "thin": _u16(_RNG.integers(0, 65536, (3, 200))),
    "landscape": _u16(np.linspace(0, 65535, 256)[None, :].repeat(100, 0)),
}


@pytest.mark.parametrize("name", sorted(PHASH_IMAGES))
def test_phash16_hashes_the_top_byte(name: str) -> None:
    """16 hex chars of imagehash's pHash of the top byte: noise below 256 (the low byte) does not change it."""
    image = PHASH_IMAGES[name]
    value = phash16(image)
    assert re.fullmatch(r"[0-9a-f]{16}", value)
    low_noise = (image & np.uint16(0xFF00)) | _RNG.integers(0, 256, image.shape).astype(np.uint16)
    assert phash16(low_noise) == value


def test_phash16_tells_different_images_apart() -> None:
    distinct = {phash16(PHASH_IMAGES[n]) for n in ("noise", "scan", "dxa_size", "checkerboard", "landscape")}
    assert len(distinct) == 5


def test_png_writer_is_lossless_deterministic_and_carries_no_text(tmp_path: Path) -> None:
    image = PHASH_IMAGES["dxa_size"]
    first, second = png16.encode(image), png16.encode(image.copy())
    assert first == second  # byte-identical for identical input: no timestamp
    assert b"tIME" not in first and b"tEXt" not in first and b"iTXt" not in first and b"zTXt" not in first
    ingest.write_png16(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), image)
    ingest.write_png16(tmp_path / "a.png", np.zeros((2, 2), np.uint16))  # an existing name is left as it is
    assert (tmp_path / "a.png").read_bytes() == first
    ingest.write_png16(tmp_path / "b.png", first)  # encoded bytes are written as they are
    assert (tmp_path / "b.png").read_bytes() == first


@pytest.mark.parametrize("bad, message", [(np.zeros((4, 4, 3), np.uint16), r"expected a 2-D image"),
                                          (np.full((4, 4), 2.0), r"values must lie in \[0, 1\]")])
def test_png_writer_rejects_other_arrays(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ingest.write_png16(tmp_path / "x.png", bad)
    assert not (tmp_path / "x.png").exists()


def test_large_files_stream_to_the_same_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files over the in-memory limit are hashed in chunks and decoded from disk, with byte-identical outputs."""
    source = tmp_path / "source"
    folder_source(source)
    digests = []
    for limit in (ingest._IN_MEMORY_MAX, 0):
        monkeypatch.setattr(ingest, "_IN_MEMORY_MAX", limit)
        out = tmp_path / f"out_{limit}"
        run_ingest(source, out, tmp_path / f"{limit}.json", task=Task(CLASSES), settings=settings(), progress=False)
        digests.append({p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()})
    assert digests[0] == digests[1] and len(digests[0]) == 2 + 2 * 8  # manifest, SHA256SUMS, 8 accepted images + ROIs


# --- links and special files --------------------------------------------------------------------------------------

def _rows_by_source(tmp_path: Path, source: Path, workers: int = 1) -> dict[str, dict[str, str]]:
    out = tmp_path / "out"
    run_ingest(source, out, tmp_path / "s.json", task=Task(CLASSES), settings=settings(), workers=workers,
               progress=False)
    return {r["source"]: r for r in read_manifest(out)}


def _linked_class_folder(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(tmp_path / "elsewhere" / "normal" / "a.dcm", scan(1))
    write_dicom(tmp_path / "elsewhere" / "normal" / "deep" / "b.dcm", scan(2))
    source.mkdir()
    (source / "normal").symlink_to(tmp_path / "elsewhere" / "normal", target_is_directory=True)
    return {"normal/a.dcm": "accepted", "normal/deep/b.dcm": "accepted"}


def _linked_sub_folder(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(source / "osteoporosis" / "c.dcm", scan(3))
    write_dicom(tmp_path / "disk2" / "d.dcm", scan(4))
    (source / "osteoporosis" / "disk2").symlink_to(tmp_path / "disk2", target_is_directory=True)
    return {"osteoporosis/c.dcm": "accepted", "osteoporosis/disk2/d.dcm": "accepted"}


def _loop(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(source / "normal" / "a.dcm", scan(1))
    (source / "normal" / "again").symlink_to("..", target_is_directory=True)   # -> source: a loop
    (source / "normal" / "self").symlink_to(".", target_is_directory=True)     # -> normal itself
    return {"normal/a.dcm": "accepted", "normal/again": "symlink_repeat", "normal/self": "symlink_repeat"}


def _loop_through_outside(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(tmp_path / "ext" / "e.dcm", scan(5))
    (tmp_path / "ext" / "back").symlink_to(source, target_is_directory=True)  # outside -> back into the source
    (tmp_path / "ext" / "round").symlink_to(tmp_path / "ext", target_is_directory=True)
    source.mkdir(parents=True, exist_ok=True)
    (source / "normal").symlink_to(tmp_path / "ext", target_is_directory=True)
    (source / "osteoporosis").symlink_to(tmp_path / "ext", target_is_directory=True)  # a second link to it
    return {"normal/e.dcm": "accepted", "normal/back": "symlink_repeat", "normal/round": "symlink_repeat",
            "osteoporosis": "symlink_repeat"}


def _file_links(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(source / "normal" / "a.dcm", scan(1))
    (source / "normal" / "inside.dcm").symlink_to("a.dcm")
    write_dicom(tmp_path / "private" / "secret.dcm", scan(9))
    (source / "normal" / "outside.dcm").symlink_to(tmp_path / "private" / "secret.dcm")
    (source / "normal" / "etc.dcm").symlink_to("/etc/passwd")
    (source / "normal" / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (source / "normal" / "cycle1.dcm").symlink_to("cycle2.dcm")
    (source / "normal" / "cycle2.dcm").symlink_to("cycle1.dcm")
    # inside.dcm reads a.dcm: an exact copy of a kept scan (the duplicate rule keeps the source that sorts first).
    return {"normal/a.dcm": "accepted", "normal/inside.dcm": "duplicate", "normal/outside.dcm": "symlink_outside_source",
            "normal/etc.dcm": "symlink_outside_source", "normal/gone.dcm": "symlink_dangling",
            "normal/cycle1.dcm": "symlink_dangling", "normal/cycle2.dcm": "symlink_dangling"}


def _special_files(tmp_path: Path, source: Path) -> dict[str, str]:
    write_dicom(source / "normal" / "a.dcm", scan(1))
    os.mkfifo(source / "normal" / "pipe.dcm")  # opening it for reading would block forever
    return {"normal/a.dcm": "accepted", "normal/pipe.dcm": "unreadable"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("make", [_linked_class_folder, _linked_sub_folder, _loop, _loop_through_outside,
                                  _file_links, _special_files])
def test_every_link_and_special_file_gets_one_row(tmp_path: Path, make, workers: int) -> None:
    source = tmp_path / "source"
    expected = make(tmp_path, source)
    rows = _rows_by_source(tmp_path, source, workers)
    assert {s: (r["status"] if r["status"] == "accepted" else r["reason"].partition(":")[0])
            for s, r in rows.items()} == expected
    for row in rows.values():
        if row["reason"].startswith(("symlink_", "unreadable")):
            assert row["sha256"] == "" and re.fullmatch(r"P[0-9a-f]{12}", row["patient_id"])  # never read
    if "normal/inside.dcm" in rows:
        assert rows["normal/inside.dcm"]["sha256"] == rows["normal/a.dcm"]["sha256"]


def test_iter_files_follows_each_real_directory_once(tmp_path: Path) -> None:
    """A tree of links that would be walked exponentially often (each level links the next twice) is walked once."""
    for level in range(12):
        (tmp_path / f"d{level}").mkdir()
        (tmp_path / f"d{level}" / "f.bin").write_bytes(b"x")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").symlink_to(tmp_path / "d0", target_is_directory=True)
    for level in range(11):
        for name in ("x", "y"):
            (tmp_path / f"d{level}" / name).symlink_to(tmp_path / f"d{level + 1}", target_is_directory=True)
    found = list(ingest.iter_files(tmp_path / "src"))
    files = [f.rel for f in found if not f.problem]
    assert len(files) == 12 and len(found) == 12 + 11  # 12 files; 11 second links, one row each


# --- labels.csv: encodings and oversized fields -------------------------------------------------------------------

LABELS_TEXT = "path,label\nnormal/é.png,normal\nb.png,osteoporosis\n"


@pytest.mark.parametrize("raw", [
    LABELS_TEXT.encode("utf-8"),
    b"\xef\xbb\xbf" + LABELS_TEXT.encode("utf-8"),          # Excel's "CSV UTF-8"
    LABELS_TEXT.encode("utf-16"),                           # BOM + native order
    b"\xff\xfe" + LABELS_TEXT.encode("utf-16-le"),
    b"\xfe\xff" + LABELS_TEXT.encode("utf-16-be"),
], ids=["utf8", "utf8_bom", "utf16", "utf16le_bom", "utf16be_bom"])
def test_labels_csv_in_utf8_or_utf16_with_bom(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "labels.csv").write_bytes(raw)
    assert read_labels(tmp_path / "labels.csv", CLASSES) == {"normal/é.png": ("normal", ""),
                                                            "b.png": ("osteoporosis", "")}


BAD_LABELS = {
    "latin1": (LABELS_TEXT.encode("latin-1"), r"labels\.csv:2: not valid UTF-8"),
    "cp1252_line4": ("path,label\na.png,normal\nb.png,normal\nc\u00e9.png,normal\n".encode("cp1252"),
                     r"labels\.csv:4: not valid UTF-8"),
    "utf16_no_bom": (LABELS_TEXT.encode("utf-16-le"), r"labels\.csv:2: not valid UTF-8 .*UTF-16 without a byte-order"),
    "utf16_no_bom_ascii": ("path,label\na.png,normal\n".encode("utf-16-le"),
                           r"labels\.csv:1: contains a NUL character .*without a byte-order mark"),
    "utf16_odd_length": (b"\xff\xfe" + "path,label\na.png,normal\n".encode("utf-16-le")[:-1],
                         r"labels\.csv:\d+: not valid UTF-16"),
    "long_field": (f"path,label\na.png,normal\n{'x' * 131_073}.png,normal\n".encode(),
                   r"labels\.csv:3: field larger than field limit"),
    "unclosed_quote": (f"path,label\n\"{'y' * 200_000},normal\n".encode(), r"labels\.csv:\d+: field larger than"),
    "nul": (b"path,label\na.png,nor\x00mal\n", r"labels\.csv:2: contains a NUL character"),
    "no_header": (b"Zyxwvut^Quintessa,PID-8675309-XQ\n", r"labels\.csv:1: header must be"),
}


@pytest.mark.parametrize("raw, match", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
def test_unreadable_labels_csv_names_the_file_and_line(tmp_path: Path, raw: bytes, match: str) -> None:
    (tmp_path / "labels.csv").write_bytes(raw)
    with pytest.raises(LabelsError, match=match) as info:
        read_labels(tmp_path / "labels.csv", CLASSES)
    assert "Zyxwvut" not in str(info.value) and "8675309" not in str(info.value)  # content is never echoed


@pytest.mark.parametrize("raw", [LABELS_TEXT.encode("latin-1"), f"path,label\n{'x' * 131_073},normal\n".encode()],
                         ids=["latin1", "long_field"])
def test_bad_labels_csv_stops_the_stage_with_exit_1_after_the_summary(tmp_path: Path, raw: bytes,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("stage_ingest", REPO / "stages" / "ingest.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    source = tmp_path / "source"
    write_dicom(source / "a.dcm", scan(1))
    (source / "labels.csv").write_bytes(raw)
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    summary = tmp_path / "s.json"
    assert stage.main(["--params", str(params), "--source", str(source), "--out", str(tmp_path / "out"),
                       "--summary", str(summary), "--roi-figure", str(tmp_path / "roi.png"), "--no-progress"]) == 1
    error = json.loads(summary.read_text())["error"]
    assert re.search(r"labels\.csv:\d+: ", error)
    assert "Traceback" not in capfd.readouterr().err and not (tmp_path / "out").exists()
    assert not (tmp_path / "roi.png").exists()


# --- a worker that dies must not hang the stage -------------------------------------------------------------------

def _killing_process_file(item, job):
    """Stand-in for process_file in the workers (test only): the file named kill.dcm takes its worker down."""
    if item.source.endswith("kill.dcm"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process_file(item, job)


def _slow_process_file(item, job):
    time.sleep(0.5)
    return _real_process_file(item, job)


_real_process_file = ingest.process_file


def _forked_children(me: psutil.Process) -> list[psutil.Process]:
    """``me``'s children forked from it (its command line), oldest first; one that has exited meanwhile is none."""
    children = []
    for child in me.children():
        try:
            if child.cmdline() == me.cmdline():
                children.append(child)
        except psutil.NoSuchProcess:  # exited between the listing and the look: not a worker to kill any more
            continue
    return children


def _kill_a_worker_when_busy(stop: threading.Event) -> None:
    """From outside, as the OOM killer does: SIGKILL the first worker process of this test process.

    Its workers are forked from it (same command line); other children (a training pool's forkserver that an earlier
    test in this process started, multiprocessing's resource tracker) are not ingest's and are left alone."""
    me = psutil.Process()
    while not stop.is_set():
        workers = _forked_children(me)
        if workers:
            time.sleep(0.3)  # let it take a chunk
            os.kill(workers[0].pid, signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the stand-in process function reaches the workers only when they are forked")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["worker_kills_itself", "killed_from_outside"])
def test_a_killed_worker_ends_the_stage_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           how: str) -> None:
    source = tmp_path / "source"
    for i in range(40):
        write_dicom(source / "normal" / f"s{i:02d}.dcm", scan(i))
    write_dicom(source / "normal" / "kill.dcm", scan(99))
    monkeypatch.setattr(ingest, "process_file",
                        _killing_process_file if how == "worker_kills_itself" else _slow_process_file)
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_when_busy, args=(stop,), daemon=True)
    if how == "killed_from_outside":
        killer.start()
    summary, out = tmp_path / "s.json", tmp_path / "out"
    started = time.monotonic()
    try:
        with pytest.raises(IngestError, match=r"a worker process died .* ingesting one of \d+ file\(s\): normal/"):
            run_ingest(source, out, summary, task=Task(CLASSES), settings=settings(), workers=2, progress=False)
    finally:
        stop.set()
    assert time.monotonic() - started < 60
    assert "a worker process died" in json.loads(summary.read_text())["error"]
    assert not out.exists()  # no partial output


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_AS") or not Path("/proc/self/statm").exists(),
                    reason="the workers' memory cap needs RLIMIT_AS and /proc")
@pytest.mark.timeout(120)
def test_worker_memory_cap_turns_a_consistent_bomb_into_a_quarantine_row(tmp_path: Path) -> None:
    """An 8000 x 8000 deflated image (125 kB on disk, 128 MB inflated, header and data consistent, within a generous
    max_pixels) needs more than the worker may use: a too_large row, the stage goes on."""
    source = tmp_path / "source"
    write_deflate_bomb(source / "normal" / "big.dcm", 8000 * 8000 * 2 + 4096, rows=8000, cols=8000)
    write_dicom(source / "normal" / "ok.dcm", scan(1))
    write_dicom(source / "osteoporosis" / "ok2.dcm", scan(2))
    cfg = dataclasses.replace(settings(), max_pixels=10**8, worker_memory_mb=64)
    out = tmp_path / "out"
    run_ingest(source, out, tmp_path / "s.json", task=Task(CLASSES), settings=cfg, workers=2, progress=False)
    rows = {r["source"]: r for r in read_manifest(out)}
    assert rows["normal/big.dcm"]["reason"].startswith("too_large: decoding needs more memory than this process")
    assert rows["normal/ok.dcm"]["status"] == rows["osteoporosis/ok2.dcm"]["status"] == "accepted"


def _ocr_out_of_memory(*args, **kwargs):
    """Stand-in for the RapidOCR engine (test only): fails as onnxruntime does when an allocation fails."""
    from spinedxa import burnedin

    raise burnedin._engine_error()("RUNTIME_EXCEPTION : Non-zero status code returned while running Resize node. "
                                   "Status Message: std::bad_alloc")


def test_ocr_out_of_memory_quarantines_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation failure inside the OCR engine is a per-file problem (too_large), never the end of the stage."""
    from spinedxa import burnedin

    source = tmp_path / "source"
    write_dicom(source / "normal" / "a.dcm", scan(1))
    write_dicom(source / "osteoporosis" / "b.dcm", scan(2))
    real_engine = burnedin._engine

    def engine():
        real = real_engine()
        # Small scans are enlarged to 384 px for detection; the big one is reduced to 2048 px and "runs out".
        return lambda image: _ocr_out_of_memory() if max(image.shape) > 1000 else real(image)

    monkeypatch.setattr(burnedin, "_engine", engine)
    write_dicom(source / "normal" / "big.dcm", np.kron(scan(3), np.ones((60, 60), dtype=np.uint16)))  # 2400 x 1920
    out = tmp_path / "out"
    run_ingest(source, out, tmp_path / "s.json", task=Task(CLASSES), settings=dataclasses.replace(
        settings(), max_pixels=10**7), progress=False)
    rows = {r["source"]: r for r in read_manifest(out)}
    assert rows["normal/big.dcm"]["reason"].startswith("too_large: decoding needs more memory")
    assert rows["normal/a.dcm"]["status"] == rows["osteoporosis/b.dcm"]["status"] == "accepted"


# --- peak memory on hostile files ---------------------------------------------------------------------------------

_MEMORY_CHILD = """
import dataclasses, json, resource, sys
from pathlib import Path
from spinedxa.config import load_params
from spinedxa.ingest import run_ingest
params = load_params(sys.argv[1])

def hwm():  # VmHWM: ru_maxrss of an exec'd process starts at its parent's peak
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

imported = hwm()  # what the imports alone map (numpy, scipy, pandas, cv2, pydicom: ~230-270 MiB, machine-dependent)
run_ingest(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), task=params.data.task,
           settings=dataclasses.replace(params.ingest, roi="whole", worker_memory_mb=int(sys.argv[5])), workers=2,
           progress=False)
print(json.dumps({"parent_imported_kib": imported, "parent_kib": hwm(), "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


#: The one consistent image of the hostile corpus (dicom_factory.CONSISTENT): within max_pixels, but decoding it and screening it for burned-in
#: text (detected at 2048 px) needs more than :data:`SMALL_CAP_MB` of address space (the detector alone peaks at
#: ~1 GB RSS there, measured), so under that cap it is quarantined too_large and the stage goes on.
SMALL_CAP_MB = 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("corpus", ["lying", "consistent"])
def test_peak_memory_on_hostile_files_stays_bounded(tmp_path: Path, corpus: str) -> None:
    """Ingest (the repo's params, two workers) on the hostile fixtures of tests/dicom_factory.HOSTILE: each gets its
    row, and memory stays bounded whatever the files say. ``lying``: every file whose header lies or that inflates
    out of proportion (1 GB deflate bombs, 12000 x 12000 codestreams behind 64 x 64 headers, ...), all at once: the
    whole process tree well under 1 GiB. ``consistent``: a true 7000 x 7000 image: its worker stops at its cap."""
    from dicom_factory import HOSTILE

    source = tmp_path / "source"
    names = [n for n in HOSTILE if (n == CONSISTENT) == (corpus == "consistent")]
    expected = hostile_corpus(source, names)
    if corpus == "consistent":
        expected[f"normal/{CONSISTENT}.dcm"] = "too_large"
    out = tmp_path / "out"
    cap = SMALL_CAP_MB if corpus == "consistent" else load_params(REPO / "params.yaml").ingest.worker_memory_mb
    proc = subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, str(REPO / "params.yaml"), str(source), str(out),
                             str(tmp_path / "s.json"), str(cap)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "SPINEDXA_DEID_KEY": "test-key"})
    root, sampled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            sampled = max(sampled, sum(p.memory_info().rss for p in (root, *root.children(recursive=True))))
        except psutil.NoSuchProcess:
            pass  # a worker exited between listing and reading
        time.sleep(0.02)
    assert proc.returncode == 0
    peaks = json.loads(proc.stdout.read().strip().splitlines()[-1])
    rows = {r["source"]: r["status"] if r["status"] == "accepted" else r["reason"].partition(":")[0]
            for r in read_manifest(out)}
    assert rows == expected
    mib = 2**20
    # The parent walks, hashes and writes; it never decodes pixels: its peak stays within 64 MiB of its imports.
    assert (peaks["parent_kib"] - peaks["parent_imported_kib"]) * 1024 < 64 * mib, peaks
    if corpus == "lying":  # measured: tree 605 MiB, worker 276 MiB (each worker holds the OCR models, ~150 MiB)
        assert sampled < 1024 * mib, f"process tree peaked at {sampled / mib:.0f} MiB"
        assert peaks["worker_kib"] * 1024 < 512 * mib, peaks
    else:  # the worker's address-space cap (its size at start-up + worker_memory_mb) holds it
        assert peaks["worker_kib"] * 1024 < (cap + 256) * mib, peaks


def test_snakemakes_directory_marker_is_not_an_input(tmp_path: Path) -> None:
    """Snakemake writes an empty ``.snakemake_timestamp`` into every directory output (the default source is one): it
    is not an input, or a Snakemake run's manifest would have one more row than ``dvc repro``'s (found by
    tests/test_cluster.py). A non-empty file of that name is a file like any other."""
    from spinedxa.ingest import iter_sources

    for rel, content in ((".snakemake_timestamp", b""), ("normal/.snakemake_timestamp", b""), ("normal/a.png", b"x"),
                         ("osteoporosis/.snakemake_timestamp", b"not Snakemake's")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    assert [i.source for i in iter_sources(tmp_path, Task(CLASSES), None)] == ["normal/a.png",
                                                                               "osteoporosis/.snakemake_timestamp"]
