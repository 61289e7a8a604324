"""split: patient-grouped, stratified k-fold (or holdout) assignment; every scan scored once; independent of the
de-identification key and of file order; refuses bad input with errors naming the params key."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, stage_main
from spinedxa.config import ConfigError, SplitConfig, params_from_dict
from spinedxa.contracts import manifest as manifest_contract, splits as splits_contract
from spinedxa.files import sha256_file
from spinedxa.contracts import near_duplicates as near_duplicates_contract
from spinedxa.split import SplitError, groups, make_splits, patient_table, require_validation_success, summarize
from spinedxa.task import Task

CLASSES = ("normal", "osteoporosis")
ROLES = ("train", "val", "test")


def make_cohort(n_normal: int, n_osteo: int, followup: float = 0.2, n_quarantined: int = 2, seed: int = 0,
                mixed: float = 0.0, key: str = "key-a") -> pd.DataFrame:
    """A manifest with ``n_normal`` + ``n_osteo`` patients; a ``followup`` share scanned twice (a ``mixed`` share of
    those with the other label on the second scan), plus quarantined files. Pseudonyms are HMACs under ``key`` (as
    ingest makes them); file names and raw sha256 do not depend on it."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, label in enumerate([CLASSES[0]] * n_normal + [CLASSES[1]] * n_osteo):
        pid = "P" + hmac.new(key.encode(), f"patient{p}".encode(), hashlib.sha256).hexdigest()[:12]
        labels = [label]
        if rng.random() < followup:
            labels.append(CLASSES[1 - CLASSES.index(label)] if rng.random() < mixed else label)
        rows += [{"patient_id": pid, "label": lab, "status": "accepted"} for lab in labels]
    rows += [{"patient_id": "", "label": "", "status": "quarantined"}] * n_quarantined
    frame = pd.DataFrame(rows)
    frame["source"] = [f"scan_{k:05d}.dcm" for k in rng.permutation(len(frame))]  # rows not in patient order
    frame["sha256"] = [hashlib.sha256(s.encode()).hexdigest() for s in frame["source"]]
    accepted = frame["status"] == "accepted"
    frame["image"] = np.where(accepted, "images/" + frame["sha256"].str[:16] + ".png", "")
    frame["roi"] = np.where(accepted, "roi/" + frame["sha256"].str[:16] + ".png", "")
    return frame


def cfg(protocol: str = "kfold", seed: int = 42, folds: int = 3, val: float = 0.2, test: float = 0.2) -> SplitConfig:
    return SplitConfig(protocol=protocol, seed=seed, folds=folds, val=val, test=test)


def assignment(splits: pd.DataFrame) -> dict[tuple[str, int], str]:
    """(source, fold) -> role."""
    return {(s, int(f)): r for s, f, r in splits[["source", "fold", "split"]].itertuples(index=False)}


COHORTS = {  # (normal patients, osteoporosis patients, follow-up share, mixed-label share of follow-ups)
    "tiny_profile": (12, 22, 0.15, 0.0),
    "paper_like": (52, 98, 0.15, 0.0),
    "many_followups": (20, 30, 0.6, 0.3),
    "small": (8, 10, 0.2, 0.0),
}


@pytest.mark.parametrize("folds", [3, 5])
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("shape", COHORTS.values(), ids=COHORTS.keys())
def test_kfold_scores_every_scan_once_and_keeps_patients_apart(shape, seed, folds):
    n_normal, n_osteo, followup, mixed = shape
    manifest = make_cohort(n_normal, n_osteo, followup, seed=seed, mixed=mixed)
    config = cfg(seed=seed, folds=folds)
    splits = make_splits(manifest, config, CLASSES)
    accepted = manifest[manifest["status"] == "accepted"]

    assert sorted(splits.columns) == sorted(splits_contract.COLUMNS)  # the file's column order: see the stage test
    assert splits_contract.folds(splits) == list(range(folds))
    for fold, part in splits.groupby("fold"):  # every accepted scan once per fold, no quarantined row
        assert sorted(part["source"]) == sorted(accepted["source"]), fold
    # Every scan is test in exactly one fold: one out-of-fold prediction per scan.
    tested = splits_contract.out_of_fold(splits)
    assert sorted(tested["source"]) == sorted(accepted["source"])
    assert tested["source"].is_unique
    for fold, part in splits.groupby("fold"):
        # No patient in both the training part (train + val) and the held-out part of a fold.
        roles = part.groupby("patient_id")["split"].nunique()
        assert roles.max() == 1, fold
        test_patients = set(part.loc[part["split"] == "test", "patient_id"])
        training = part[part["split"] != "test"]
        assert test_patients.isdisjoint(training["patient_id"])
        # The validation subset lies inside the training part: a share of the fold's training patients.
        val_patients = set(part.loc[part["split"] == "val", "patient_id"])
        train_patients = set(part.loc[part["split"] == "train", "patient_id"])
        assert val_patients and val_patients <= set(training["patient_id"]) and val_patients.isdisjoint(train_patients)
        n_training = training["patient_id"].nunique()
        assert abs(len(val_patients) - config.val * n_training) <= 2, (fold, len(val_patients), n_training)
        assert (pd.crosstab(part["split"], part["label"]).reindex(index=list(ROLES)) > 0).all().all()
    # The test parts partition the patients, stratified: per class, fold sizes differ by at most one patient.
    test_rows = splits[splits["split"] == "test"].drop_duplicates("patient_id")
    assert sorted(test_rows["patient_id"]) == sorted(accepted["patient_id"].unique())
    labels = patient_table(accepted, CLASSES).set_index("group")["label"]
    group_of = dict(zip(accepted["patient_id"], groups(accepted)))
    per_fold = pd.crosstab(test_rows["fold"], test_rows["patient_id"].map(group_of).map(labels))
    assert (per_fold.max() - per_fold.min()).max() <= 1


@pytest.mark.parametrize("test_share, val_share", [(0.2, 0.2), (0.25, 0.15), (0.3, 0.25)])
def test_holdout_protocol_is_one_fold_with_a_test_share(test_share, val_share):
    manifest = make_cohort(30, 50, 0.2)
    splits = make_splits(manifest, cfg("holdout", test=test_share, val=val_share), CLASSES)
    accepted = manifest[manifest["status"] == "accepted"]
    assert splits_contract.folds(splits) == [0]
    assert sorted(splits["source"]) == sorted(accepted["source"])
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    patients = splits.drop_duplicates("patient_id")["split"].value_counts()
    n = patients.sum()
    assert abs(patients["test"] - test_share * n) <= 2
    assert abs(patients["val"] - val_share * (n - patients["test"])) <= 2
    assert (pd.crosstab(splits["split"], splits["label"]) > 0).all().all()


@pytest.mark.parametrize("protocol", ["kfold", "holdout"])
def test_assignment_does_not_depend_on_the_deidentification_key(protocol):
    """Two clones with different keys give every scan different pseudonyms but the same fold and role (issue 7)."""
    one = make_splits(make_cohort(20, 30, 0.3, key="clone-one"), cfg(protocol), CLASSES)
    two = make_splits(make_cohort(20, 30, 0.3, key="clone-two"), cfg(protocol), CLASSES)
    assert assignment(one) == assignment(two)
    pseudonyms = one.merge(two, on=["source", "fold"], suffixes=("_1", "_2"))
    assert (pseudonyms["patient_id_1"] != pseudonyms["patient_id_2"]).all()
    # ... and the grouping is the same: pseudonyms map one to one.
    assert pseudonyms.groupby("patient_id_1")["patient_id_2"].nunique().max() == 1


def test_ingest_under_two_keys_gives_the_same_split(tmp_path, monkeypatch):
    """The same raw files ingested under two SPINEDXA_DEID_KEY values: pseudonyms differ, every scan's fold and
    role are the same (the whole chain: DICOM PatientID -> HMAC pseudonym -> patient grouping -> folds)."""
    from dicom_factory import gradient, write_dicom
    from spinedxa.config import IngestConfig
    from spinedxa.ingest import run_ingest

    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    for p in range(12):
        label = CLASSES[p % 2]
        for visit in range(2 if p % 4 == 0 else 1):
            pixels = (gradient(48, 40) + rng.integers(0, 300, (48, 40))).astype(np.uint16)
            write_dicom(source / label / f"s{p:02d}_{visit}.dcm", pixels, phi={"PatientID": f"MRN-{p:04d}"})
    settings = IngestConfig(max_side=48, max_pixels=10**6, roi="whole", roi_height=32)
    manifests = []
    for key in ("clone-one-key", "clone-two-key"):
        monkeypatch.setenv("SPINEDXA_DEID_KEY", key)
        out = tmp_path / key
        run_ingest(source, out, tmp_path / f"{key}.json", task=Task(CLASSES), settings=settings, progress=False)
        manifests.append(manifest_contract.read(out / manifest_contract.FILE_NAME))
    assert (manifests[0]["status"] == "accepted").all()
    assert set(manifests[0]["patient_id"]).isdisjoint(manifests[1]["patient_id"])
    config = cfg(val=0.25)
    one, two = (make_splits(m, config, CLASSES) for m in manifests)
    assert assignment(one) == assignment(two)
    assert one["patient_id"].nunique() == two["patient_id"].nunique() == 12


@pytest.mark.parametrize("protocol", ["kfold", "holdout"])
def test_file_order_does_not_matter(protocol):
    manifest = make_cohort(20, 30, 0.3)
    first = make_splits(manifest, cfg(protocol, seed=3), CLASSES)
    for state in (1, 2):
        shuffled = manifest.sample(frac=1.0, random_state=state).reset_index(drop=True)
        pd.testing.assert_frame_equal(make_splits(shuffled, cfg(protocol, seed=3), CLASSES), first)


def test_different_seed_gives_a_different_assignment():
    manifest = make_cohort(20, 30, 0.3)
    assignments = {make_splits(manifest, cfg(seed=s), CLASSES)["split"].str.cat() for s in range(5)}
    assert len(assignments) == 5


def test_patient_order_is_the_smallest_raw_sha256():
    rows = pd.DataFrame({"patient_id": ["Pb", "Pb", "Pa"], "label": ["normal"] * 3,
                         "sha256": ["f" * 64, "1" * 64, "5" * 64]})
    table = patient_table(rows, CLASSES)
    # A group is named by its smallest raw sha256: Pb's group is "1...", Pa's "5...".
    assert list(table["group"]) == ["1" * 64, "5" * 64] and list(table["order"]) == ["1" * 64, "5" * 64]


def test_near_duplicates_of_two_patients_form_one_group():
    rows = pd.DataFrame({"patient_id": ["Pa", "Pb", "Pc", "Pd"], "label": ["normal"] * 4,
                         "sha256": ["a" * 64, "b" * 64, "c" * 64, "d" * 64]})
    pairs = pd.DataFrame({"sha256_a": ["b" * 64, "c" * 64], "sha256_b": ["c" * 64, "d" * 64]})
    assert groups(rows, pairs).tolist() == ["a" * 64, "b" * 64, "b" * 64, "b" * 64]  # transitive, smallest sha


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confirmed_near_duplicates_never_straddle_a_fold(seed):
    """Near-identical content of two patients (validate's confirmed pairs) is never in the training part and the
    held-out part of one fold."""
    manifest = make_cohort(20, 30, 0.2, seed=seed)
    accepted = manifest[manifest["status"] == "accepted"].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(accepted), size=(6, 2), replace=False)
    pairs = pd.DataFrame({"sha256_a": accepted.loc[picks[:, 0], "sha256"].to_numpy(),
                          "sha256_b": accepted.loc[picks[:, 1], "sha256"].to_numpy()})
    splits = make_splits(manifest, cfg(seed=seed), CLASSES, pairs)
    for fold, part in splits.groupby("fold"):
        role = dict(zip(part["sha256"], part["split"].where(part["split"] == "test", "training")))
        for a, b in zip(pairs["sha256_a"], pairs["sha256_b"]):
            assert role[a] == role[b], (fold, a[:8], b[:8])
    summary = summarize(splits, cfg(seed=seed), CLASSES, pairs)
    assert summary["n_near_duplicate_groups"] >= 1 and summary["n_groups"] < summary["n_patients"]


@pytest.mark.parametrize("scans, expected", [
    ([CLASSES[0]], CLASSES[0]),
    ([CLASSES[0], CLASSES[0], CLASSES[1]], CLASSES[0]),
    ([CLASSES[0], CLASSES[1]], CLASSES[1]),  # a tie goes to the positive class
    ([CLASSES[1], CLASSES[0]], CLASSES[1]),
])
def test_patient_label_is_the_majority(scans, expected):
    rows = pd.DataFrame({"patient_id": ["P1"] * len(scans), "label": scans,
                         "sha256": [f"{i:064x}" for i in range(len(scans))]})
    assert patient_table(rows, CLASSES).set_index("group").at["0" * 64, "label"] == expected


@pytest.mark.parametrize("n_normal, n_osteo, config, message", [
    (2, 20, cfg(folds=3),
     r"split\.folds=3 needs at least 3 patients per class, got \{'normal': 2, 'osteoporosis': 20\}"),
    (6, 20, cfg(folds=8), r"split\.folds=8 needs at least 8 patients per class"),
    (0, 20, cfg(), r"split\.folds=3 needs .*'normal': 0"),
    (6, 20, cfg(val=0.1), r"split\.val=0\.1 needs at least 10 patients per class"),
    (3, 20, cfg("holdout", test=0.25), r"split\.test=0\.25 needs at least 4 patients per class"),
    (5, 20, cfg("holdout", test=0.2, val=0.2), r"split\.val=0\.2 needs at least 5 patients per class"),  # after test
])
def test_too_few_patients_is_an_error_naming_the_key(n_normal, n_osteo, config, message):
    with pytest.raises(SplitError, match=message):
        make_splits(make_cohort(n_normal, n_osteo, followup=0.0), config, CLASSES)


@pytest.mark.parametrize("values, message", [
    ({"folds": 2}, r"split\.folds: 2 is out of range under protocol kfold; allowed: >= 3"),
    ({"val": 0.0}, r"split\.val"),
    ({"test": 1.0}, r"split\.test"),
    ({"protocol": "loo"}, r"split\.protocol"),
])
def test_split_config_rejects_unusable_values(values, message):
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["split"].update(values)
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


@pytest.mark.parametrize("column, value, message", [
    ("label", "osteopenia", r"found labels \['osteopenia'\] and 0 row"),
    ("patient_id", "", r"found labels \[\] and 1 row\(s\) without patient_id"),
])
def test_rows_validate_would_block_are_refused(column, value, message):
    manifest = make_cohort(10, 10, followup=0.0)
    manifest.loc[manifest.index[manifest["status"] == "accepted"][0], column] = value
    with pytest.raises(SplitError, match=message):
        make_splits(manifest, cfg(), CLASSES)


def write_manifest_and_validation(tmp_path: Path, manifest: pd.DataFrame, **validation) -> tuple[Path, Path]:
    """The manifest and the validate stage's output directory (verdict.json and no near-duplicate pair)."""
    path = tmp_path / "manifest.csv"
    manifest_contract.write(path, manifest.reindex(columns=manifest_contract.COLUMNS, fill_value=""))
    validated = tmp_path / "validated"
    validated.mkdir()
    summary = {"success": True, "manifest_sha256": sha256_file(path), "blocking_failures": [], **validation}
    (validated / "verdict.json").write_text(json.dumps(summary))
    near_duplicates_contract.write(validated / near_duplicates_contract.FILE_NAME,
                                   pd.DataFrame(columns=list(near_duplicates_contract.COLUMNS)))
    return path, validated


@pytest.mark.parametrize("validation, message", [
    ({"success": False, "blocking_failures": ["sha256_unique"]}, r"validation did not pass .*\['sha256_unique'\]"),
    ({"manifest_sha256": "0" * 64}, "differs from"),
    ({"success": None}, "validation did not pass"),
])
def test_refuses_unless_validation_passed_on_this_manifest(tmp_path, validation, message):
    manifest, summary = write_manifest_and_validation(tmp_path, make_cohort(10, 10), **validation)
    with pytest.raises(SplitError, match=message):
        require_validation_success(summary / "verdict.json", manifest)


def test_summary_counts_images_and_patients_per_fold_role_and_class():
    manifest = make_cohort(20, 30, 0.3)
    config = cfg()
    splits = make_splits(manifest, config, CLASSES)
    summary = summarize(splits, config, CLASSES)
    n_scans = int((manifest["status"] == "accepted").sum())
    assert (summary["protocol"], summary["n_folds"], summary["n_images"], summary["n_scored"]) == (
        "kfold", 3, n_scans, n_scans)
    for fold, entry in summary["folds"].items():
        part = splits[splits["fold"] == int(fold)]
        assert sum(entry[r]["total"] for r in ROLES) == n_scans
        assert sum(entry[r]["patients"] for r in ROLES) == summary["n_patients"]  # no patient in two roles
        for role in ROLES:
            assert entry[role]["total"] == sum(entry[role][c] for c in CLASSES) == (part["split"] == role).sum()


@pytest.mark.parametrize("protocol", ["kfold", "holdout"])
def test_stage_writes_splits_and_summary(tmp_path, protocol):
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["split"]["protocol"] = protocol
    params_from_dict(raw)  # the edited params are valid
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    manifest, validation = write_manifest_and_validation(tmp_path, make_cohort(30, 50, 0.2))
    out, summary_path = tmp_path / "data" / "split" / "splits.csv", tmp_path / "reports" / "split.json"
    assert stage_main("split")(["--params", str(tmp_path / "params.yaml"), "--manifest", str(manifest),
                                "--validated", str(validation), "--out", str(out), "--summary", str(summary_path)]) == 0
    splits = splits_contract.read(out)
    assert list(splits.columns) == list(splits_contract.COLUMNS)
    assert list(splits.sort_values(["fold", "source"])["source"]) == list(splits["source"])  # sorted on disk
    summary = json.loads(summary_path.read_text())
    n_folds = raw["split"]["folds"] if protocol == "kfold" else 1
    assert summary["protocol"] == protocol and summary["n_folds"] == n_folds == len(summary["folds"])
    assert summary["n_images"] == splits["source"].nunique() == len(splits) // n_folds
    assert summary["n_scored"] == (summary["n_images"] if protocol == "kfold" else (splits["split"] == "test").sum())
