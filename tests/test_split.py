"""split: patient-grouped, stratified, reproducible; folds patient-disjoint; refuses bad input with clear errors."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, stage_main
from spinedxa.config import SplitConfig, params_from_dict
from spinedxa.files import sha256_file
from spinedxa.split import (
    OUTPUT_COLUMNS,
    SplitError,
    make_splits,
    min_patients_per_class,
    patient_labels,
    require_validation_success,
    split_patients,
)

CLASSES = ("normal", "osteoporosis")


def make_cohort(n_normal: int, n_osteo: int, followup: float = 0.2, n_quarantined: int = 2, seed: int = 0,
                mixed: float = 0.0) -> pd.DataFrame:
    """A manifest with ``n_normal`` + ``n_osteo`` patients; a ``followup`` share scanned twice (a ``mixed`` share of
    those with the other label on the second scan), plus quarantined files."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, label in enumerate([CLASSES[0]] * n_normal + [CLASSES[1]] * n_osteo):
        pid = "P" + hashlib.sha256(f"patient{p}".encode()).hexdigest()[:12]
        labels = [label]
        if rng.random() < followup:
            labels.append(CLASSES[1 - CLASSES.index(label)] if rng.random() < mixed else label)
        rows += [{"patient_id": pid, "label": lab, "status": "accepted"} for lab in labels]
    rows += [{"patient_id": "", "label": "", "status": "quarantined"}] * n_quarantined
    frame = pd.DataFrame(rows)
    frame["source"] = [f"scan_{k:05d}.dcm" for k in rng.permutation(len(frame))]  # rows not in patient order
    frame["sha256"] = [hashlib.sha256(s.encode()).hexdigest() for s in frame["source"]]
    frame["image"] = np.where(frame["status"] == "accepted", "images/" + frame["sha256"].str[:16] + ".png", "")
    return frame


def cfg(seed: int = 42, train: float = 0.6, val: float = 0.2, test: float = 0.2, folds: int = 0) -> SplitConfig:
    return SplitConfig(seed=seed, train=train, val=val, test=test, folds=folds)


COHORTS = {  # (normal patients, osteoporosis patients, follow-up share, mixed-label share of follow-ups)
    "tiny_profile": (12, 22, 0.15, 0.0),
    "paper_like": (52, 98, 0.15, 0.0),
    "many_followups": (20, 30, 0.6, 0.3),
    "minimum": (5, 5, 0.0, 0.0),
}


@pytest.mark.parametrize("seed", [0, 1, 7, 2025])
@pytest.mark.parametrize("shape", COHORTS.values(), ids=COHORTS.keys())
def test_no_patient_crosses_splits_and_every_split_holds_every_class(shape, seed):
    n_normal, n_osteo, followup, mixed = shape
    manifest = make_cohort(n_normal, n_osteo, followup, seed=seed, mixed=mixed)
    splits = make_splits(manifest, cfg(seed=seed), CLASSES)
    assert list(splits.columns) == list(OUTPUT_COLUMNS)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    accepted = manifest[manifest["status"] == "accepted"]
    assert sorted(splits["source"]) == sorted(accepted["source"])  # every accepted row once, no quarantined row
    assert splits["source"].is_monotonic_increasing
    assert (pd.crosstab(splits["split"], splits["label"]).reindex(index=["train", "val", "test"]) > 0).all().all()


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2), (0.5, 0.25, 0.25), (0.7, 0.15, 0.15), (0.8, 0.1, 0.1)])
def test_class_ratios_hold_per_split(fractions, seed):
    """Stated tolerance: in each split, each class's patient count is within 2 of fraction x class patients (one
    patient of rounding per stratified step, two steps), and the positive share of images is within 0.08 of the
    cohort's on a paper-sized cohort."""
    manifest = make_cohort(52, 98, 0.15, seed=seed)
    config = cfg(seed, *fractions)
    splits = make_splits(manifest, config, CLASSES)
    labels = patient_labels(splits, CLASSES)
    per_class = labels.value_counts()
    by_patient = splits.drop_duplicates("patient_id").set_index("patient_id")["split"]
    counts = pd.crosstab(by_patient, labels)
    overall_positive = (splits["label"] == CLASSES[1]).mean()
    for split, fraction in zip(("train", "val", "test"), fractions):
        for cls in CLASSES:
            got = counts.at[split, cls] if split in counts.index else 0
            assert abs(got - fraction * per_class[cls]) < 2, (split, cls, got)
        if fraction > 0:
            share = (splits.loc[splits["split"] == split, "label"] == CLASSES[1]).mean()
            assert abs(share - overall_positive) < 0.08, (split, share, overall_positive)
    assert set(splits["split"]) == {s for s, f in zip(("train", "val", "test"), fractions) if f > 0}


def test_same_seed_same_split_and_row_order_does_not_matter():
    manifest = make_cohort(20, 30, 0.3)
    first = make_splits(manifest, cfg(seed=3), CLASSES)
    shuffled = manifest.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(make_splits(shuffled, cfg(seed=3), CLASSES), first)


def test_different_seed_gives_a_different_split():
    manifest = make_cohort(20, 30, 0.3)
    assignments = {make_splits(manifest, cfg(seed=s), CLASSES)["split"].str.cat() for s in range(5)}
    assert len(assignments) == 5


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_are_patient_disjoint_stratified_and_exclude_test(folds):
    manifest = make_cohort(25, 40, 0.3, mixed=0.2)
    splits = make_splits(manifest, cfg(folds=folds), CLASSES)
    assert (splits.loc[splits["split"] == "test", "fold"] == -1).all()
    dev = splits[splits["split"] != "test"]
    assert sorted(dev["fold"].unique()) == list(range(folds))
    assert dev.groupby("patient_id")["fold"].nunique().max() == 1
    assert (pd.crosstab(dev["fold"], dev["label"]) > 0).all().all()
    pd.testing.assert_frame_equal(make_splits(manifest, cfg(folds=folds), CLASSES), splits)


def test_no_fold_column_without_folds():
    assert "fold" not in make_splits(make_cohort(10, 10), cfg(), CLASSES)


@pytest.mark.parametrize("scans, expected", [
    ([CLASSES[0]], CLASSES[0]),
    ([CLASSES[0], CLASSES[0], CLASSES[1]], CLASSES[0]),
    ([CLASSES[0], CLASSES[1]], CLASSES[1]),  # a tie goes to the positive class
    ([CLASSES[1], CLASSES[0]], CLASSES[1]),
])
def test_patient_label_is_the_majority(scans, expected):
    rows = pd.DataFrame({"patient_id": ["P1"] * len(scans), "label": scans})
    assert patient_labels(rows, CLASSES)["P1"] == expected


@pytest.mark.parametrize("fractions, expected", [
    ((0.6, 0.2, 0.2), 5), ((0.5, 0.25, 0.25), 4), ((0.7, 0.15, 0.15), 7), ((0.8, 0.1, 0.1), 10), ((0.34, 0.33, 0.33), 4),
])
def test_min_patients_per_class(fractions, expected):
    assert min_patients_per_class(cfg(0, *fractions)) == expected


@pytest.mark.parametrize("n_normal, n_osteo, config, message", [
    (4, 20, cfg(), r"\{'normal': 4\} patients per class, need at least 5"),
    (20, 3, cfg(train=0.5, val=0.25, test=0.25), r"\{'osteoporosis': 3\} patients per class, need at least 4"),
    (0, 20, cfg(), r"\{'normal': 0\}"),
    (6, 20, cfg(folds=8), r"split.folds: 8 folds need at least 8 train\+val patients per class"),
])
def test_too_few_patients_is_a_clear_error(n_normal, n_osteo, config, message):
    with pytest.raises(SplitError, match=message):
        make_splits(make_cohort(n_normal, n_osteo, followup=0.0), config, CLASSES)


@pytest.mark.parametrize("column, value, message", [
    ("label", "osteopenia", r"found labels \['osteopenia'\] and 0 row"),
    ("patient_id", "", r"found labels \[\] and 1 row\(s\) without patient_id"),
])
def test_rows_validate_would_block_are_refused(column, value, message):
    manifest = make_cohort(10, 10, followup=0.0)
    manifest.loc[0, column] = value  # row 0 is accepted
    with pytest.raises(SplitError, match=message):
        make_splits(manifest, cfg(), CLASSES)


def test_split_patients_returns_one_split_per_patient():
    labels = pd.Series([CLASSES[0]] * 10 + [CLASSES[1]] * 10, index=[f"P{i:012x}" for i in range(20)])
    assigned = split_patients(labels, cfg(), CLASSES)
    assert assigned.value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}


def write_manifest_and_validation(tmp_path: Path, manifest: pd.DataFrame, **validation) -> tuple[Path, Path]:
    path = tmp_path / "manifest.csv"
    manifest.to_csv(path, index=False)
    summary = {"success": True, "manifest_sha256": sha256_file(path), "blocking_failures": [], **validation}
    (tmp_path / "validation.json").write_text(json.dumps(summary))
    return path, tmp_path / "validation.json"


@pytest.mark.parametrize("validation, message", [
    ({"success": False, "blocking_failures": ["sha256_unique"]}, r"validation did not pass .*\['sha256_unique'\]"),
    ({"manifest_sha256": "0" * 64}, "differs from"),
    ({"success": None}, "validation did not pass"),
])
def test_refuses_unless_validation_passed_on_this_manifest(tmp_path, validation, message):
    manifest, summary = write_manifest_and_validation(tmp_path, make_cohort(10, 10), **validation)
    with pytest.raises(SplitError, match=message):
        require_validation_success(summary, manifest)


@pytest.mark.parametrize("folds", [0, 3])
def test_stage_writes_splits_and_summary(tmp_path, folds):
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["split"]["folds"] = folds
    params_from_dict(raw)  # the edited params are valid
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    manifest, validation = write_manifest_and_validation(tmp_path, make_cohort(30, 50, 0.2))
    out, summary_path = tmp_path / "data" / "split" / "splits.csv", tmp_path / "reports" / "split.json"
    stage_main("split")(["--params", str(tmp_path / "params.yaml"), "--manifest", str(manifest), "--validation",
                       str(validation), "--out", str(out), "--summary", str(summary_path)])
    splits = pd.read_csv(out)
    assert list(splits.columns) == list(OUTPUT_COLUMNS) + (["fold"] if folds else [])
    summary = json.loads(summary_path.read_text())
    assert summary["n_images"] == len(splits) and summary["n_patients"] == splits["patient_id"].nunique()
    assert sum(summary["patients"].values()) == summary["n_patients"]  # no patient counted in two splits
    assert sum(v["total"] for v in summary["images"].values()) == len(splits)
    assert summary["fraction_patients"]["train"] == pytest.approx(0.6, abs=0.03)
    assert ("folds" in summary) == bool(folds)
    if folds:
        assert sum(f["images"] for f in summary["folds"].values()) == summary["images"]["train"]["total"] + \
            summary["images"]["val"]["total"]
