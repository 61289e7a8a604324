"""The label policy (spinedxa.task) and the duplicate rule (spinedxa.duplicates), alone and through ingest: folder
layouts and labels.csv files (mapped, dropped, unknown, three classes) -> manifest statuses and task labels; exact
copies within and across labels -> one kept, or every copy a label conflict."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run
from spinedxa import duplicates
from spinedxa.config import IngestConfig
from spinedxa.ingest import run_ingest
from spinedxa.task import Task, TaskError

BINARY = ("normal", "osteoporosis")
WHO = ("normal", "osteopenia", "osteoporosis")


# ------------------------------------------------------------------------------------------------ the policy

@pytest.mark.parametrize("classes, class_map, label, outcome, cls", [
    (BINARY, {}, "normal", "class", "normal"),
    (BINARY, {}, "osteopenia", "unknown", ""),
    (BINARY, {"osteopenia": "osteoporosis"}, "osteopenia", "class", "osteoporosis"),  # "low BMD vs normal"
    (BINARY, {"osteopenia": "normal"}, "osteopenia", "class", "normal"),  # the paper's "osteoporosis vs not"
    (BINARY, {"osteopenia": "drop"}, "osteopenia", "drop", ""),
    (BINARY, {"osteopenia": "drop"}, " osteoporosis ", "class", "osteoporosis"),  # labels.csv cells are stripped
    (BINARY, {}, "", "empty", ""),
    (WHO, {}, "osteopenia", "class", "osteopenia"),
    (WHO, {"Osteopenia": "osteopenia", "OP": "osteoporosis"}, "OP", "class", "osteoporosis"),
    (WHO, {}, "fracture", "unknown", ""),
])
def test_resolve(classes, class_map, label, outcome, cls) -> None:
    resolved = Task(classes, class_map).resolve(label)
    assert (resolved.outcome, resolved.cls) == (outcome, cls)


@pytest.mark.parametrize("classes, class_map, message", [
    (("normal",), {}, "at least two"),
    (("normal", "normal"), {}, "at least two distinct"),
    (("normal", "os/teo"), {}, "not a usable class name"),
    (("normal", "drop"), {}, "not a usable class name"),
    (BINARY, {"osteopenia": "fracture"}, "data.class_map.osteopenia: 'fracture' is not a class"),
    (BINARY, {"normal": "osteoporosis"}, "data.class_map.normal: 'normal' is one of data.classes"),
    (BINARY, {" ": "normal"}, "an empty label"),
])
def test_inconsistent_classes_or_map_are_refused(classes, class_map, message) -> None:
    with pytest.raises(TaskError, match=message):
        Task(classes, class_map)


def test_kind_positive_and_decision() -> None:
    binary, who = Task(BINARY), Task(WHO)
    assert (binary.kind, binary.positive, binary.positive_index) == ("binary", "osteoporosis", 1)
    assert (who.kind, who.positive, who.positive_index) == ("ordinal", "osteoporosis", 2)
    p2 = np.array([[0.6, 0.4], [0.3, 0.7]])
    assert binary.decide(p2, 0.5).tolist() == [0, 1] and binary.decide(p2, 0.35).tolist() == [1, 1]
    p3 = np.array([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    assert who.decide(p3, 0.5).tolist() == [1, 2]  # argmax; the threshold is a binary notion
    assert "normal < osteopenia < osteoporosis" in who.describe()


# ------------------------------------------------------------------------------------------------ the rule


def _row(source: str, sha: str, label: str, status: str = "accepted", pixels: str = "", found: str = "") -> dict:
    return {"source": source, "sha256": sha, "pixel_sha256": pixels, "status": status,
            "label": label if status == "accepted" else "", "label_found": found or label, "reason": "",
            "duplicate_of": "", "image": f"images/{sha[:4]}.png" if status == "accepted" else "",
            "roi": f"roi/{sha[:4]}.png" if status == "accepted" else ""}


def test_same_label_copies_keep_the_first_source() -> None:
    rows = [_row("normal/b.png", "aa", "normal"), _row("normal/a.png", "aa", "normal"),
            _row("normal/c.png", "cc", "normal", pixels="px"), _row("normal/d.tif", "dd", "normal", pixels="px")]
    counts = duplicates.resolve(rows)
    by = {r["source"]: r for r in rows}
    assert by["normal/a.png"]["status"] == "accepted"  # sorts first: kept whatever the file order
    assert by["normal/b.png"]["status"] == "duplicate" and by["normal/b.png"]["duplicate_of"] == "normal/a.png"
    assert "raw bytes" in by["normal/b.png"]["reason"] and by["normal/b.png"]["image"] == ""
    assert by["normal/d.tif"]["status"] == "duplicate" and "decoded pixels" in by["normal/d.tif"]["reason"]
    assert counts == {"duplicate_groups": 2, "duplicates": 2, "label_conflict_groups": 0, "label_conflicts": 0}
    assert duplicates.unreferenced_images(rows, ["images/aa.png", "images/cc.png", "images/dd.png"]) == [
        "images/dd.png"]


def test_copies_under_two_labels_are_all_label_conflicts() -> None:
    rows = [_row("normal/x.png", "xx", "normal"), _row("osteoporosis/x.png", "xx", "osteoporosis"),
            _row("osteoporosis/y.png", "yy", "osteoporosis")]
    counts = duplicates.resolve(rows)
    statuses = {r["source"]: (r["status"], r["reason"].partition(":")[0]) for r in rows}
    assert statuses == {"normal/x.png": ("quarantined", "label_conflict"),
                        "osteoporosis/x.png": ("quarantined", "label_conflict"),
                        "osteoporosis/y.png": ("accepted", "")}
    assert counts["label_conflict_groups"] == 1 and counts["label_conflicts"] == 2


def test_a_copy_the_map_drops_conflicts_with_a_kept_class_but_not_with_itself() -> None:
    kept_and_dropped = [_row("normal/z.png", "zz", "normal"),
                        _row("osteopenia/z.png", "zz", "", status="dropped", found="osteopenia")]
    duplicates.resolve(kept_and_dropped)
    assert [r["status"] for r in kept_and_dropped] == ["quarantined", "quarantined"]
    both_dropped = [_row("osteopenia/a.png", "qq", "", status="dropped", found="osteopenia"),
                    _row("osteopenia/b.png", "qq", "", status="dropped", found="osteopenia")]
    assert duplicates.resolve(both_dropped)["duplicates"] == 0
    assert [r["status"] for r in both_dropped] == ["dropped", "dropped"]


# ------------------------------------------------------------------------------------------------ through ingest


def _png(path: Path, seed: int) -> Path:
    """A small grayscale PNG with distinct content per seed."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 200, 32)[None, :] * (0.5 + 0.5 * (seed % 7) / 7)
    Image.fromarray((ramp + rng.integers(0, 40, (40, 32))).clip(0, 255).astype(np.uint8)).save(path)
    return path


def _ingest(source: Path, tmp: Path, classes=BINARY, class_map=None) -> tuple[dict[str, dict], dict]:
    out, summary = tmp / "out", tmp / "ingest.json"
    settings = IngestConfig(max_side=32, max_pixels=10**6, roi="whole", roi_height=32)
    run_ingest(source, out, summary, task=Task(classes, class_map or {}), settings=settings, progress=False)
    with (out / "manifest.csv").open(newline="") as fh:
        rows = {r["source"]: r for r in csv.DictReader(fh)}
    return rows, json.loads(summary.read_text())


# A WHO-labelled folder cohort as real ones come: three class folders, a byte-identical copy within a class and one
# across two classes, and a label that is not a class.
def _who_folders(source: Path) -> None:
    for k, cls in enumerate(("normal", "normal", "osteopenia", "osteopenia", "osteoporosis", "osteoporosis")):
        _png(source / cls / f"s{k}.png", k)
    shutil.copy(source / "normal" / "s0.png", source / "normal" / "s0_copy.png")  # same label: one kept
    shutil.copy(source / "osteopenia" / "s2.png", source / "osteoporosis" / "s2_again.png")  # across labels
    _png(source / "fracture" / "f.png", 99)


LAYOUTS = {
    # class map -> {source: (status or reason code, task label)}
    "binary, osteopenia unknown": (BINARY, {}, {
        "normal/s0.png": ("accepted", "normal"), "normal/s0_copy.png": ("duplicate", "normal"),
        "normal/s1.png": ("accepted", "normal"), "osteopenia/s2.png": ("unknown_label", ""),
        "osteopenia/s3.png": ("unknown_label", ""), "osteoporosis/s2_again.png": ("accepted", "osteoporosis"),
        "osteoporosis/s4.png": ("accepted", "osteoporosis"), "osteoporosis/s5.png": ("accepted", "osteoporosis"),
        "fracture/f.png": ("unknown_label", "")}),
    "low BMD vs normal": (BINARY, {"osteopenia": "osteoporosis"}, {
        "normal/s0.png": ("accepted", "normal"), "normal/s0_copy.png": ("duplicate", "normal"),
        "normal/s1.png": ("accepted", "normal"), "osteopenia/s2.png": ("accepted", "osteoporosis"),
        "osteopenia/s3.png": ("accepted", "osteoporosis"), "osteoporosis/s2_again.png": ("duplicate", "osteoporosis"),
        "osteoporosis/s4.png": ("accepted", "osteoporosis"), "osteoporosis/s5.png": ("accepted", "osteoporosis"),
        "fracture/f.png": ("unknown_label", "")}),
    "osteopenia dropped": (BINARY, {"osteopenia": "drop"}, {
        "normal/s0.png": ("accepted", "normal"), "normal/s0_copy.png": ("duplicate", "normal"),
        "normal/s1.png": ("accepted", "normal"), "osteopenia/s2.png": ("label_conflict", ""),
        "osteopenia/s3.png": ("dropped", ""), "osteoporosis/s2_again.png": ("label_conflict", "osteoporosis"),
        "osteoporosis/s4.png": ("accepted", "osteoporosis"), "osteoporosis/s5.png": ("accepted", "osteoporosis"),
        "fracture/f.png": ("unknown_label", "")}),
    "three WHO classes": (WHO, {"fracture": "drop"}, {
        "normal/s0.png": ("accepted", "normal"), "normal/s0_copy.png": ("duplicate", "normal"),
        "normal/s1.png": ("accepted", "normal"), "osteopenia/s2.png": ("label_conflict", "osteopenia"),
        "osteopenia/s3.png": ("accepted", "osteopenia"),
        "osteoporosis/s2_again.png": ("label_conflict", "osteoporosis"),
        "osteoporosis/s4.png": ("accepted", "osteoporosis"), "osteoporosis/s5.png": ("accepted", "osteoporosis"),
        "fracture/f.png": ("dropped", "")}),
}


@pytest.mark.parametrize("classes, class_map, expected", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_folder_layouts_give_the_expected_statuses_and_labels(tmp_path: Path, classes, class_map, expected) -> None:
    source = tmp_path / "source"
    _who_folders(source)
    rows, summary = _ingest(source, tmp_path, classes, class_map)
    got = {s: (r["status"] if r["status"] in ("accepted", "duplicate", "dropped") else r["reason"].partition(":")[0],
               r["label"]) for s, r in rows.items()}
    assert got == expected
    for r in rows.values():
        assert r["label_found"] == r["source"].split("/")[0]  # the label as found, kept beside the task label
        if r["status"] == "duplicate":
            assert rows[r["duplicate_of"]]["status"] == "accepted" and r["image"] == ""
    # Dropped files and duplicates are not quarantines; the rate counts the files the task wanted.
    n_dropped = sum(v[0] == "dropped" for v in expected.values())
    n_quarantined = sum(v[0] not in ("accepted", "duplicate", "dropped") for v in expected.values())
    assert (summary["n_dropped"], summary["n_quarantined"]) == (n_dropped, n_quarantined)
    assert summary["quarantine_rate"] == round(n_quarantined / (len(expected) - n_dropped), 6)
    assert summary["per_label_found"]["normal"] == {"accepted": 2, "duplicate": 1}
    images = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")}
    assert images == {r[c] for r in rows.values() if r["status"] == "accepted" for c in ("image", "roi")}


LABELS_CSV = {
    "mapped and dropped": ("path,label,patient_id\na.png,Normal,p1\nb.png,T<=-2.5,p2\nc.png,borderline,p3\n"
                           "d.png,?,p4\n", BINARY, {"Normal": "normal", "T<=-2.5": "osteoporosis", "borderline": "drop"},
                           {"a.png": ("accepted", "normal"), "b.png": ("accepted", "osteoporosis"),
                            "c.png": ("dropped", ""), "d.png": ("unknown_label", "")}),
    "three classes": ("path,label\na.png,normal\nb.png,osteopenia\nc.png,osteoporosis\nd.png,\n", WHO, {},
                      {"a.png": ("accepted", "normal"), "b.png": ("accepted", "osteopenia"),
                       "c.png": ("accepted", "osteoporosis"), "d.png": ("no_label", "")}),
}


@pytest.mark.parametrize("text, classes, class_map, expected", LABELS_CSV.values(), ids=LABELS_CSV.keys())
def test_labels_csv_goes_through_the_same_policy(tmp_path: Path, text, classes, class_map, expected) -> None:
    source = tmp_path / "source"
    for k, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        _png(source / name, k)
    (source / "labels.csv").write_text(text, encoding="utf-8")
    rows, _ = _ingest(source, tmp_path, classes, class_map)
    got = {s: (r["status"] if r["status"] in ("accepted", "dropped") else r["reason"].partition(":")[0], r["label"])
           for s, r in rows.items()}
    assert got == expected


def test_a_file_without_a_patient_is_its_own_and_said_so(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for k in range(3):
        _png(source / "normal" / f"{k}.png", k)
    rows, summary = _ingest(source, tmp_path)
    assert {r["patient_from"] for r in rows.values()} == {"file"}
    assert summary["patient_from"] == {"header": 0, "labels_csv": 0, "file": 3}
    assert len({r["patient_id"] for r in rows.values()}) == 3


def test_a_params_error_exits_1_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    """A user's mistake in params.yaml is a message naming the key, exit status 1: never a traceback."""
    params = (REPO / "params.yaml").read_text().replace("class_map: {osteopenia: normal}",
                                                        "class_map: {osteopenia: normal}\n  clases: [a, b]")
    (tmp_path / "params.yaml").write_text(params)
    proc = run(["python", str(REPO / "stages" / "split.py"), "--params", "params.yaml", "--manifest", "m.csv",
                "--validated", "v", "--out", "s.csv", "--summary", "s.json"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "data.clases" in proc.stderr and "ERROR split:" in proc.stderr
    missing = run(["python", str(REPO / "stages" / "split.py"), "--params", str(REPO / "params.yaml"), "--manifest",
                   "m.csv", "--validated", "v", "--out", "s.csv", "--summary", "s.json"], cwd=tmp_path, check=False)
    # A missing input of an earlier stage (validate has not run) is a message too.
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "verdict.json" in missing.stderr
