"""The leaky replay ablation and its matched control: expansion before the split, the image-level split that leaks,
the control's patient split made before its copies, the paired comparison on the same scans (independent of the
de-identification key), the disabled stub, and the outputs' contracts (one tiny end-to-end run of both with MLflow)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, dvc_argv, stage_main
from spinedxa import metrics, replay, tracking
from spinedxa.augment import augment_image, build_transform, copy_seed
from spinedxa.config import Params, load_params
from spinedxa.contracts import augmented as augmented_contract, jsonfile, manifest as manifest_contract, png16
from spinedxa.contracts import predictions as predictions_contract, replay as replay_contract
from spinedxa.contracts import splits as splits_contract

CLASSES = ("normal", "osteoporosis")


def write_ingested(root: Path, n_patients: int = 20, *, followup_every: int = 3, seed: int = 0,
                   classes: tuple[str, ...] = CLASSES) -> Path:
    """A tiny ``data/ingested``: ROI PNGs (64 x 32) and a manifest with accepted rows, one quarantined row, and a
    follow-up scan for every ``followup_every``-th patient. Patient ``p`` has class ``p % len(classes)``; more severe
    classes have a darker, noisier column. 20 patients (10 per class of two) are the fewest the control's patient
    split takes at 0.2 test and 0.15 validation."""
    rng = np.random.default_rng(seed)
    ingested = root / "ingested"
    (ingested / manifest_contract.ROI_DIR).mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        label = p % len(classes)
        severity = label / (len(classes) - 1)
        for visit in range(2 if p % followup_every == 0 else 1):
            source = f"{classes[label]}/scan_{p:03d}_{visit}.dcm"
            sha = hashlib.sha256(source.encode()).hexdigest()
            img = np.clip(0.15 + rng.normal(0, 0.02, (64, 32)), 0, 1)
            img[:, 10:22] = np.clip((0.75 - 0.25 * severity) + rng.normal(0, 0.03 + 0.05 * severity, (64, 12)), 0, 1)
            roi = f"{manifest_contract.ROI_DIR}/{sha[:16]}.png"
            png16.write(ingested / roi, img)
            rows.append(_manifest_row(source=source, sha256=sha, status="accepted", label=classes[label],
                                      patient_id=f"P{p:012x}", image=roi, roi=roi))
    rows.append(_manifest_row(source=f"{classes[0]}/broken.dcm", sha256=hashlib.sha256(b"x").hexdigest(),
                              status="quarantined", reason="corrupt: truncated", label=classes[0]))
    manifest_contract.write(ingested / manifest_contract.FILE_NAME, pd.DataFrame(rows))
    return ingested


def _manifest_row(**values: str) -> dict[str, str]:
    """A manifest row: ``values``, every other column empty."""
    return {column: "" for column in manifest_contract.COLUMNS} | values


def tiny_params(classes: tuple[str, ...] = CLASSES, **replay_values: object) -> Params:
    """The repo's params with a small cnn21 (64 px, batch 8, one thread), 50 bootstrap resamples, the task's
    ``classes`` and ``replay`` overrides."""
    p = load_params(REPO / "params.yaml")
    cnn21 = dataclasses.replace(p.train.cnn21, image_size=64, batch_size=8)
    data = p.data if classes == CLASSES else dataclasses.replace(p.data, classes=classes, class_map={})
    return dataclasses.replace(
        p, data=data,
        train=dataclasses.replace(p.train, cnn21=cnn21, threads=1, device="cpu"),
        evaluate=dataclasses.replace(p.evaluate, bootstrap=50),
        replay=dataclasses.replace(p.replay, **replay_values),
    )


@pytest.fixture
def ingested(tmp_path: Path) -> Path:
    return write_ingested(tmp_path)


@pytest.fixture
def index(ingested: Path, tmp_path: Path) -> pd.DataFrame:
    scans = replay.accepted_scans(ingested / manifest_contract.FILE_NAME)
    return replay.expand_cohort(load_params(REPO / "params.yaml").augment, 6, scans, ingested, tmp_path / "replay")


# ------------------------------------------------------------------------------------------- expansion


def test_expansion_makes_copies_of_every_accepted_scan_and_no_original(ingested: Path, index: pd.DataFrame,
                                                                       tmp_path: Path) -> None:
    manifest = manifest_contract.read(ingested / manifest_contract.FILE_NAME)
    accepted = manifest[manifest["status"] == "accepted"]
    assert len(index) == 6 * len(accepted)
    assert set(index["parent_sha256"]) == set(accepted["sha256"])  # the quarantined row is never expanded
    assert all(sorted(g) == [1, 2, 3, 4, 5, 6] for _, g in index.groupby("parent_sha256")["k"])
    assert not set(index["image"]) & set(accepted["roi"])
    # Copy k is augment's copy k of the ROI image (same transform, same seed): nothing replay-specific.
    cfg = load_params(REPO / "params.yaml").augment
    row = index.iloc[3]
    parent = torch.from_numpy(png16.read(ingested / row.parent_image)).unsqueeze(0)
    expected = augment_image(parent, build_transform(cfg), copy_seed(cfg.seed, row.parent_sha256, int(row.k)))
    assert (tmp_path / "replay" / row.image).read_bytes() == png16.encode(expected.squeeze(0).numpy())


def test_expansion_is_byte_stable(ingested: Path, tmp_path: Path) -> None:
    cfg = load_params(REPO / "params.yaml").augment
    scans = replay.accepted_scans(ingested / manifest_contract.FILE_NAME)
    first = replay.expand_cohort(cfg, 2, scans, ingested, tmp_path / "a")
    torch.manual_seed(123)  # the global RNG state must not matter
    second = replay.expand_cohort(cfg, 2, scans.iloc[::-1], ingested, tmp_path / "b")  # nor the order
    assert sorted(first["image"]) == sorted(second["image"])
    for rel in first["image"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_accepted_scans_refuses_a_manifest_without_accepted_rows(tmp_path: Path) -> None:
    row = _manifest_row(source="a.dcm", sha256="0" * 64, status="quarantined", reason="corrupt")
    manifest_contract.write(tmp_path / "manifest.csv", pd.DataFrame([row]))
    with pytest.raises(ValueError, match="no accepted scan"):
        replay.accepted_scans(tmp_path / "manifest.csv")


# ------------------------------------------------------------------------------------------- the leaky split


def test_leaky_split_puts_augmented_siblings_of_one_scan_on_both_sides(index: pd.DataFrame) -> None:
    split = replay.leaky_split(index, 0.2, seed=11)
    roles = split.groupby("sha256")["split"].agg(set)
    both = roles[roles.map(lambda r: {"train", "test"} <= r)]
    assert len(both) > 0, "no scan has copies in both train and test: the replay would not be leaky"
    patients = split.groupby("patient_id")["split"].agg(set)
    assert patients.map(lambda r: {"train", "test"} <= r).any()
    # Every copy exactly once, no originals, fold 0, the requested share of images in test (stratified by label).
    assert len(split) == len(index) and split["source"].is_unique
    assert split["source"].str.contains(replay.COPY_SUFFIX, regex=False).all()
    assert set(split["fold"]) == {0}
    n_test = int((split["split"] == "test").sum())
    assert n_test == int(np.ceil(0.2 * len(index)))
    for label in CLASSES:
        assert {"train", "val", "test"} <= set(split.loc[split["label"] == label, "split"])


def test_leaky_split_is_deterministic_and_seeded(index: pd.DataFrame) -> None:
    a = replay.leaky_split(index, 0.2, seed=11)
    b = replay.leaky_split(index.sample(frac=1.0, random_state=0), 0.2, seed=11)  # input order does not matter
    c = replay.leaky_split(index, 0.2, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


def test_leaky_split_follows_the_splits_contract(index: pd.DataFrame, tmp_path: Path) -> None:
    split = replay.leaky_split(index, 0.2, seed=11)
    splits_contract.write(tmp_path / "s.csv", split)
    back = splits_contract.read(tmp_path / "s.csv")
    assert tuple(back.columns) == splits_contract.COLUMNS
    row = back.iloc[0]
    parent = index[(index["parent_source"] + "#copy" + index["k"].astype(str)) == row.source].iloc[0]
    assert row.sha256 == parent.parent_sha256  # the parent's raw sha256: the audit sees one file on both sides
    assert row.image == row.roi == parent.image  # the copy, relative to the replay's data directory


def test_leaky_split_refuses_too_few_images() -> None:
    tiny = pd.DataFrame({"image": ["a", "b", "c"], "parent_source": ["x", "y", "z"], "parent_sha256": ["1", "2", "3"],
                         "parent_image": ["a", "b", "c"], "patient_id": ["P1", "P2", "P3"],
                         "label": ["normal", "osteoporosis", "normal"], "k": [1, 1, 1]})
    with pytest.raises(ValueError, match="cannot be split"):
        replay.leaky_split(tiny, 0.2, seed=0)


def _split(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A split table from ``(sha256, patient_id, split)`` rows."""
    return pd.DataFrame([{"source": f"s{i}", "sha256": sha, "patient_id": pid, "label": "normal", "image": "",
                          "roi": "", "fold": 0, "split": role} for i, (sha, pid, role) in enumerate(rows)])


@pytest.mark.parametrize(
    "rows, expected",
    [
        # Two test copies of scan a (a also in train), one of scan b (b only in val; its patient P1 is in train).
        ([("a", "P1", "train"), ("a", "P1", "test"), ("a", "P1", "test"), ("b", "P1", "test"), ("b", "P1", "val")],
         {"n_test_images": 3, "n_test_scans": 2, "n_test_patients": 1, "test_images_parent_in_train": 2,
          "test_images_parent_in_train_share": 2 / 3, "test_images_patient_in_train": 3,
          "test_images_patient_in_train_share": 1.0, "test_scans_in_train_share": 0.5}),
        # Nothing shared: an honest split.
        ([("a", "P1", "train"), ("b", "P2", "val"), ("c", "P3", "test"), ("d", "P4", "test")],
         {"n_test_images": 2, "n_test_scans": 2, "n_test_patients": 2, "test_images_parent_in_train": 0,
          "test_images_parent_in_train_share": 0.0, "test_images_patient_in_train": 0,
          "test_images_patient_in_train_share": 0.0, "test_scans_in_train_share": 0.0}),
        # A patient's other scan in train, not the scan itself.
        ([("a", "P1", "train"), ("b", "P1", "test"), ("c", "P2", "test"), ("c", "P2", "train")],
         {"n_test_images": 2, "n_test_scans": 2, "n_test_patients": 2, "test_images_parent_in_train": 1,
          "test_images_parent_in_train_share": 0.5, "test_images_patient_in_train": 2,
          "test_images_patient_in_train_share": 1.0, "test_scans_in_train_share": 0.5}),
    ],
    ids=["siblings_and_patient", "honest", "patient_only"],
)
def test_leakage_shares(rows: list[tuple[str, str, str]], expected: dict[str, float]) -> None:
    shares = replay.leakage_shares(_split(rows))
    for key, value in expected.items():
        assert shares[key] == pytest.approx(value), key


# ------------------------------------------------------------------------------------------- scoring


def test_score_gives_patient_and_image_level_intervals() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1] * 6, 4)  # 12 scans x 4 copies: copies of a scan share their label and look alike
    logit = 1.5 * (2 * y - 1) + np.repeat(rng.normal(0, 2.0, 12), 4) + rng.normal(0, 0.3, len(y))
    prob = 1 / (1 + np.exp(-logit))
    sources = np.array([f"s{i}" for i in range(len(y))])
    patients = np.repeat([f"P{i}" for i in range(12)], 4)
    record = replay.score(y, prob, patients, sources, classes=CLASSES, threshold=0.5, n_resamples=200, seed=0)
    assert record["n_test_patients"] == 12 and record["bootstrap_unit"] == "patient"
    width = {k: record[f"{p}roc_auc_ci_high"] - record[f"{p}roc_auc_ci_low"] for k, p in
             (("patient", ""), ("image", replay.IMAGE_BOOTSTRAP))}
    assert width["image"] < width["patient"]  # treating correlated copies as independent narrows the interval
    same = replay.score(y, prob, sources, sources, classes=CLASSES, threshold=0.5, n_resamples=200, seed=0)
    assert same["accuracy_ci_low"] == same["image_bootstrap_accuracy_ci_low"]  # one unit per image: identical


# ------------------------------------------------------------------------------------------- the matched control


def _scans(ingested: Path) -> pd.DataFrame:
    return replay.accepted_scans(ingested / manifest_contract.FILE_NAME)


def test_control_holds_out_patients_before_any_copy_is_used(ingested: Path, index: pd.DataFrame) -> None:
    control = replay.control_split(_scans(ingested), index, 0.2, seed=11, classes=CLASSES)
    test, seen = control[control["split"] == "test"], control[control["split"] != "test"]
    # The held-out part is original scans; training and validation are copies, of their own scans only.
    assert not test["source"].str.contains(replay.COPY_SUFFIX, regex=False).any()
    assert seen["source"].str.contains(replay.COPY_SUFFIX, regex=False).all()
    assert not set(seen["sha256"]) & set(test["sha256"]), "a copy of a held-out scan is in the control's training"
    assert not set(seen["patient_id"]) & set(test["patient_id"]), "a held-out patient has an image in training"
    assert not set(control.loc[control["split"] == "train", "patient_id"]) & set(
        control.loc[control["split"] == "val", "patient_id"])
    assert (seen.groupby("sha256").size() == 6).all()  # every copy of every training and validation scan
    shares = replay.leakage_shares(control)
    assert shares["test_images_patient_in_train_share"] == 0.0 and shares["test_scans_in_train_share"] == 0.0
    for role in ("train", "val", "test"):  # stratified: both classes in every part
        assert set(control.loc[control["split"] == role, "label"]) == set(CLASSES), role
    # The leaky split of the same copies does put siblings of one scan on both sides (the only difference).
    leaky = replay.leaky_split(index, 0.2, seed=11)
    roles = leaky.groupby("sha256")["split"].agg(set)
    assert roles.map(lambda r: {"train", "test"} <= r).any()
    # The same share of the cohort held out for test, within the rounding of whole patients.
    assert abs(test["sha256"].nunique() / len(_scans(ingested)) - 0.2) < 0.1
    splits_contract.write(Path(ingested) / "control.csv", control)  # in the splits contract
    assert len(splits_contract.read(Path(ingested) / "control.csv")) == len(control)


def test_control_split_does_not_depend_on_the_pseudonyms(ingested: Path, index: pd.DataFrame) -> None:
    scans = _scans(ingested)
    first = replay.control_split(scans, index, 0.2, seed=11, classes=CLASSES)
    rekey = {pid: "P" + hashlib.sha256(f"other-key:{pid}".encode()).hexdigest()[:12] for pid in scans["patient_id"]}
    second = replay.control_split(scans.assign(patient_id=scans["patient_id"].map(rekey)),
                                  index.assign(patient_id=index["patient_id"].map(rekey)), 0.2, seed=11,
                                  classes=CLASSES)
    assert first["source"].tolist() == second["source"].tolist()
    assert first["split"].tolist() == second["split"].tolist()


def test_control_split_refuses_too_few_patients(tmp_path: Path) -> None:
    ingested = write_ingested(tmp_path, n_patients=8)
    scans = _scans(ingested)
    index = replay.expand_cohort(load_params(REPO / "params.yaml").augment, 1, scans, ingested, tmp_path / "r")
    with pytest.raises(ValueError, match=r"matched control.*replay.test_fraction"):
        replay.control_split(scans, index, 0.2, seed=11, classes=CLASSES)


# ------------------------------------------------------------------------------------------- the matched comparison


def _matched(n_patients: int = 16, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Matched scans (every third patient has two) and each run's class probabilities (``N x 2``): the leaky run
    separates the classes better than the control."""
    rng = np.random.default_rng(seed)
    rows, logits = [], {"leaky": [], "control": []}
    for p in range(n_patients):
        y = p % 2
        for visit in range(2 if p % 3 == 0 else 1):
            source = f"s{p:02d}_{visit}"
            rows.append({"source": source, "sha256": hashlib.sha256(source.encode()).hexdigest(),
                         "patient_id": f"P{p:02d}", "y_true": y})
            logits["leaky"].append(2.5 * (2 * y - 1) + rng.normal(0, 1.0))
            logits["control"].append(0.8 * (2 * y - 1) + rng.normal(0, 1.0))
    prob = {}
    for run, z in logits.items():
        q = 1 / (1 + np.exp(-np.array(z)))
        prob[run] = np.column_stack([1 - q, q])
    return pd.DataFrame(rows), prob


def _compare(frame: pd.DataFrame, prob: dict[str, np.ndarray], n_resamples: int = 300) -> tuple[dict, dict, dict]:
    return replay.compare_matched(frame, prob, classes=CLASSES, threshold=0.5, n_resamples=n_resamples, seed=0)


def test_compare_matched_is_paired_on_the_same_scans() -> None:
    frame, prob = _matched()
    leaky, control, inflation = _compare(frame, prob)
    assert leaky["n_test"] == control["n_test"] == inflation["n_scans"] == len(frame)
    assert inflation["n_patients"] == 16 and inflation["bootstrap_unit"] == "patient"
    for key in ("roc_auc", "accuracy", "f1"):
        assert inflation[key] == pytest.approx(leaky[key] - control[key]), key
        assert inflation[f"{key}_ci_low"] <= inflation[key] <= inflation[f"{key}_ci_high"], key
    # ROC-AUC's interval is metrics.paired_bootstrap_auc's, on the rows in the key-independent order.
    order = replay.matched_permutation(frame)
    rows = frame.iloc[order]
    direct = metrics.paired_bootstrap_auc(rows["y_true"].to_numpy(), prob["leaky"][order], prob["control"][order],
                                          rows["patient_id"].to_numpy(), n_resamples=300, seed=0)
    assert (inflation["roc_auc_ci_low"], inflation["roc_auc_ci_high"]) == (direct.interval.low, direct.interval.high)
    assert inflation["roc_auc_p_value"] == direct.p_value
    # One model against itself: no inflation, and a paired interval of exactly 0.
    _, _, none = _compare(frame, {"leaky": prob["leaky"], "control": prob["leaky"]}, n_resamples=100)
    assert none["roc_auc"] == none["roc_auc_ci_low"] == none["roc_auc_ci_high"] == 0.0


def test_compare_matched_does_not_depend_on_the_pseudonyms_or_the_row_order() -> None:
    frame, prob = _matched()
    first = _compare(frame, prob)
    # Another de-identification key renames (and so reorders) the patients; the rows arrive in another order.
    rekey = {pid: hashlib.sha256(f"other-key:{pid}".encode()).hexdigest()[:12] for pid in frame["patient_id"]}
    shuffle = np.random.default_rng(3).permutation(len(frame))
    moved = frame.assign(patient_id=frame["patient_id"].map(rekey)).iloc[shuffle].reset_index(drop=True)
    second = _compare(moved, {run: p[shuffle] for run, p in prob.items()})
    assert first == second
    # The test can fail: numbering the patients by pseudonym instead moves the interval.
    by_id = np.argsort(moved["patient_id"].to_numpy(), kind="stable")
    naive = metrics.paired_bootstrap_auc(moved["y_true"].to_numpy()[by_id], prob["leaky"][shuffle][by_id],
                                         prob["control"][shuffle][by_id], moved["patient_id"].to_numpy()[by_id],
                                         n_resamples=300, seed=0)
    assert (naive.interval.low, naive.interval.high) != (first[2]["roc_auc_ci_low"], first[2]["roc_auc_ci_high"])


# ------------------------------------------------------------------------------------------- the stage


def test_disabled_writes_both_runs_empty_without_reading_the_cohort(tmp_path: Path) -> None:
    paths = replay.ReplayPaths(tmp_path / "missing-ingested", tmp_path / "data" / "replay", tmp_path / "reports")
    records = replay.run_replay(tiny_params(enabled=False), paths)
    for record, name, protocol in ((records.leaky, replay_contract.LEAKY_METRICS, "leaky_replay"),
                                   (records.control, replay_contract.CONTROL_METRICS, "matched_control")):
        assert record["enabled"] is False and record["leaky_ablation"] is True and record["protocol"] == protocol
        assert jsonfile.read(paths.reports / name) == record
    assert sorted(p.name for p in paths.reports.iterdir()) == sorted(replay_contract.FILES)
    for name in (replay_contract.LEAKY_SPLIT, replay_contract.CONTROL_SPLIT):
        assert splits_contract.read(paths.reports / name).empty
    for name in (replay_contract.LEAKY_PREDICTIONS, replay_contract.LEAKY_MATCHED_PREDICTIONS,
                 replay_contract.CONTROL_PREDICTIONS):
        assert predictions_contract.read(paths.reports / name).empty
    assert augmented_contract.read(paths.out / augmented_contract.FILE_NAME).empty
    assert not any((paths.out / augmented_contract.IMAGES_DIR).iterdir())


def test_stage_command_of_dvc_yaml_writes_the_stub_when_disabled(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["replay"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    stage_main("replay")(dvc_argv("replay"))
    for name in (replay_contract.LEAKY_METRICS, replay_contract.CONTROL_METRICS):
        assert jsonfile.read(tmp_path / "reports/replay" / name)["enabled"] is False
    assert (tmp_path / "data/replay" / augmented_contract.FILE_NAME).is_file()


def test_stage_says_plainly_when_the_cohort_is_too_small_for_the_control(tmp_path: Path, capsys,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write_ingested(tmp_path / "data", n_patients=8)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert stage_main("replay")(dvc_argv("replay")) == 1  # a user error: one message, no traceback
    err = capsys.readouterr().err
    assert "matched control" in err and "replay.test_fraction" in err and "Traceback" not in err


def test_replay_end_to_end_runs_leaky_and_control_alike(ingested: Path, tmp_path: Path, mlflow_store: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "replay-test")
    paths = replay.ReplayPaths(ingested, tmp_path / "data" / "replay", tmp_path / "reports" / "replay")
    params = tiny_params(enabled=True, copies=3, epochs=1)
    records = replay.run_replay(params, paths)
    leaky, control = records.leaky, records.control
    c = replay_contract

    # The leaky run: every copy split at random; it scores its own test copies.
    split = splits_contract.read(paths.reports / c.LEAKY_SPLIT)
    n_scans = len(_scans(ingested))
    assert len(split) == 3 * n_scans and set(split["split"]) == {"train", "val", "test"}
    assert all((paths.out / rel).is_file() for rel in split["roi"])
    predictions = predictions_contract.read(paths.reports / c.LEAKY_PREDICTIONS)
    assert sorted(predictions["source"]) == sorted(split.loc[split["split"] == "test", "source"])
    assert leaky["n_test_images"] == leaky["n_test"] == len(predictions)
    assert leaky["n_test_scans"] == split.loc[split["split"] == "test", "sha256"].nunique()
    assert leaky["leaky_ablation"] is True and leaky["protocol"] == "leaky_replay" and leaky["epochs_run"] == 1
    for key in ("accuracy", "f1", "precision", "recall", "roc_auc"):
        assert f"{key}_ci_low" in leaky and f"image_bootstrap_{key}_ci_high" in leaky

    # The control: its training and validation copies come from patients it never scores.
    ctl = splits_contract.read(paths.reports / c.CONTROL_SPLIT)
    held_out = ctl[ctl["split"] == "test"]
    trained = ctl[ctl["split"] != "test"]
    assert not set(trained["patient_id"]) & set(held_out["patient_id"])
    assert not set(trained["sha256"]) & set(held_out["sha256"])
    assert all((paths.out / rel).is_file() for rel in trained["roi"])
    assert all((ingested / rel).is_file() for rel in held_out["roi"])  # the originals
    assert control["protocol"] == "matched_control" and control["test_scans_in_train_share"] == 0.0
    assert control["n_train_images"] == int((ctl["split"] == "train").sum())

    # Both runs score the same scans: the control's held-out originals.
    matched = {run: predictions_contract.read(paths.reports / name)
               for run, name in (("leaky", c.LEAKY_MATCHED_PREDICTIONS), ("control", c.CONTROL_PREDICTIONS))}
    assert matched["leaky"]["source"].tolist() == matched["control"]["source"].tolist()
    assert sorted(matched["control"]["source"]) == sorted(held_out["source"])
    assert (matched["leaky"]["y_true"] == matched["control"]["y_true"]).all()
    inflation = control[c.INFLATION]
    assert inflation["n_scans"] == len(held_out) == control["n_test"] == leaky[c.MATCHED]["n_test"]
    assert inflation["roc_auc"] == pytest.approx(leaky[c.MATCHED]["roc_auc"] - control["roc_auc"])
    assert 0.0 <= leaky[c.MATCHED]["scans_in_train_share"] <= 1.0

    # Everything equal but the order of augment and split.
    for key in replay.SHARED_SETTINGS:
        assert leaky[key] == control[key], key
    assert leaky["recipe"]["epochs"] == 1 and leaky["tta"] == params.train.tta
    assert leaky["epochs_run"] == control["epochs_run"] == 1
    for record in (leaky, control):  # each calibrated on its own validation part
        assert record["calibration"]["n"] == record["n_val_images"]
    assert jsonfile.read(paths.reports / c.LEAKY_METRICS) == leaky
    assert jsonfile.read(paths.reports / c.CONTROL_METRICS) == control

    runs = [r for r in tracking.find_runs("replay-test") if r["run_name"] == replay.RUN_NAME]
    assert len(runs) == 1 and runs[0]["run_id"] == leaky["mlflow_run_id"] == control["mlflow_run_id"]
    run = runs[0]
    assert run["tags"]["leaky_ablation"] == "true" and run["tags"]["dvc_stage"] == "replay"
    assert {"leaky_test_accuracy", "leaky_matched_roc_auc", "control_matched_roc_auc", "inflation_roc_auc",
            "leaky_train_loss", "control_train_loss"} <= set(run["metrics"])
    assert not any(k.startswith("test_") for k in run["metrics"])
    assert run["params"]["epochs"] == "1" and run["params"]["replay.copies"] == "3"
    assert run["params"]["train.tta"] == params.train.tta


def test_replay_follows_the_task_classes(tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three ordered (WHO) classes: both runs, the matched comparison and every table follow data.classes."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "replay-who")
    who = ("normal", "osteopenia", "osteoporosis")
    ingested = write_ingested(tmp_path, n_patients=30, classes=who)
    paths = replay.ReplayPaths(ingested, tmp_path / "data" / "replay", tmp_path / "reports" / "replay")
    records = replay.run_replay(tiny_params(classes=who, enabled=True, copies=2, epochs=1), paths)
    leaky, control, c = records.leaky, records.control, replay_contract
    for record in (leaky, leaky[c.MATCHED], control, control[c.INFLATION]):
        assert set(metrics.metric_keys(who)) <= set(record), sorted(set(metrics.metric_keys(who)) - set(record))
    for key in replay.SHARED_SETTINGS:
        assert leaky[key] == control[key], key
    assert leaky["calibration"]["method"].startswith(("temperature", "identity"))
    held_out = splits_contract.read(paths.reports / c.CONTROL_SPLIT).query("split == 'test'")
    assert set(held_out["label"]) == set(who)  # stratified by the three classes
    for name in (c.LEAKY_MATCHED_PREDICTIONS, c.CONTROL_PREDICTIONS):
        frame = predictions_contract.read(paths.reports / name)
        assert predictions_contract.classes_of(frame) == list(who)
        assert sorted(frame["source"]) == sorted(held_out["source"])


def test_replay_runs_side_by_side_give_what_one_process_gives(ingested: Path, tmp_path: Path, mlflow_store: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The two trainings in two spawned processes (runtime.train_processes >= 2) and one after the other in this
    process: the same records (but the timings and the MLflow run) and byte-identical tables; every epoch of both
    runs reaches MLflow either way."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "replay-processes")
    params = tiny_params(enabled=True, copies=2, epochs=2)
    out: dict[int, tuple[replay.ReplayRecords, Path]] = {}
    for processes in (1, 2):
        root = tmp_path / f"p{processes}"
        paths = replay.ReplayPaths(ingested, root / "data", root / "reports")
        out[processes] = replay.run_replay(params, paths, processes=processes), paths.reports
    varying = {"cpu_seconds", "wall_seconds", "mlflow_run_id", "train_cpu_seconds", "train_wall_seconds"}
    for run in ("leaky", "control"):
        one, two = (getattr(out[p][0], run) for p in (1, 2))
        assert {k: v for k, v in one.items() if k not in varying} == {k: v for k, v in two.items() if k not in varying}
    for name in replay_contract.FILES:
        if name.endswith(".csv"):
            assert (out[1][1] / name).read_bytes() == (out[2][1] / name).read_bytes(), name
    runs = {r["run_id"]: r for r in tracking.find_runs("replay-processes")}
    for record, _ in out.values():
        history = runs[record.leaky["mlflow_run_id"]]["history"]
        for key in ("leaky_train_loss", "control_train_loss", "leaky_val_auc", "control_val_auc"):
            assert [step for step, _ in history[key]] == [1, 2], key
