"""Patient-grouped, stratified train/val/test split of the accepted manifest rows, with optional k folds.

The unit of splitting is the patient, never the image: every scan of a patient lands in the same split, so a
follow-up scan (or an augmented copy, made later from the training split only) cannot leak into val or test. This is
the leakage that a 210-image test set built from ~35 images x 6 augmentations would suffer: what the paper's reported
figures fit (README, "Train, evaluate, report").

Method: one row per patient, labelled by the patient's majority label, split twice with scikit-learn's stratified
``train_test_split`` (test off the whole cohort, then val off the rest). Splitting the patient table keeps the
fractions exact at patient level (stratified counts within one patient per class per step), which
``StratifiedGroupKFold`` over images cannot promise for unequal fractions. Optional folds over train+val use
``StratifiedGroupKFold`` with patients as groups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from spinedxa.config import Params, SplitConfig
from spinedxa.files import atomic_path, sha256_file, write_json_atomic
from spinedxa.validate import read_manifest

SPLITS: tuple[str, ...] = ("train", "val", "test")
INPUT_COLUMNS: tuple[str, ...] = ("source", "sha256", "status", "label", "patient_id", "image")
OUTPUT_COLUMNS: tuple[str, ...] = ("source", "sha256", "patient_id", "label", "image", "split")  # docs/CONTRACTS.md
TEST_FOLD = -1  # the fold of test rows when split.folds >= 2 (docs/CONTRACTS.md)


class SplitError(ValueError):
    """The split cannot be made as asked (validation failed, too few patients for the fractions or folds)."""


def require_validation_success(validation_path: str | Path, manifest_path: str | Path) -> None:
    """Refuse to split unless the validate stage passed on this very manifest.

    Raises:
        SplitError: the summary says ``success`` is not true, or it was computed for another manifest.
        FileNotFoundError: there is no validation summary.
    """
    summary = json.loads(Path(validation_path).read_text(encoding="utf-8"))
    if summary.get("success") is not True:
        raise SplitError(
            f"{validation_path}: validation did not pass (success: {summary.get('success')!r}, blocking failures: "
            f"{summary.get('blocking_failures')}); fix the data or params.yaml validate.* and rerun validate"
        )
    recorded, actual = summary.get("manifest_sha256"), sha256_file(manifest_path)
    if recorded != actual:
        raise SplitError(
            f"{validation_path}: validated manifest sha256 {recorded!r} differs from {manifest_path} ({actual}); "
            "rerun validate on the current manifest"
        )


def patient_labels(rows: pd.DataFrame, classes: Sequence[str]) -> pd.Series:
    """Each patient's label for stratification: the majority label of their scans.

    A tie (e.g. a normal baseline and an osteoporotic follow-up) goes to the class listed later in ``classes``, the
    positive class, so that progressing patients count as positive.

    Returns:
        Labels indexed by ``patient_id``, sorted by ``patient_id`` (the split depends on the seed, not on row order).
    """
    counts = pd.crosstab(rows["patient_id"], rows["label"]).reindex(columns=list(classes), fill_value=0)
    return counts[list(classes)[::-1]].idxmax(axis=1).sort_index()  # idxmax keeps the first maximum


def min_patients_per_class(cfg: SplitConfig) -> int:
    """Patients each class needs so that every split with a non-zero fraction gets at least one of them."""
    smallest = min(f for f in (cfg.train, cfg.val, cfg.test) if f > 0)
    return math.ceil(1 / smallest - 1e-9)  # tolerance: 1 / 0.2 may come out as 5.000000000000001


def split_patients(labels: pd.Series, cfg: SplitConfig, classes: Sequence[str]) -> pd.Series:
    """Assign each patient to ``train``, ``val`` or ``test``, stratified by patient label.

    Raises:
        SplitError: a class has too few patients for the fractions, or a split ended up without some class.
    """
    need = min_patients_per_class(cfg)
    per_class = labels.value_counts().reindex(list(classes), fill_value=0)
    short = per_class[per_class < need]
    if not short.empty:
        raise SplitError(
            f"too few patients for split fractions train={cfg.train}, val={cfg.val}, test={cfg.test}: "
            f"{short.to_dict()} patients per class, need at least {need} per class so that every split holds every "
            "class; add data or change the fractions"
        )
    assigned = pd.Series("train", index=labels.index, dtype=object)
    rest = labels
    # Plain numpy arrays: scikit-learn cannot index pandas' Arrow-backed string index.
    if cfg.test > 0:
        rest_ids, test_ids = train_test_split(labels.index.to_numpy(), test_size=cfg.test,
                                              stratify=labels.to_numpy(), random_state=cfg.seed)
        assigned[test_ids] = "test"
        rest = labels[rest_ids]
    if cfg.val > 0:
        _, val_ids = train_test_split(rest.index.to_numpy(), test_size=cfg.val / (cfg.train + cfg.val),
                                      stratify=rest.to_numpy(), random_state=cfg.seed)
        assigned[val_ids] = "val"
    wanted = [s for s in SPLITS if getattr(cfg, s) > 0]
    table = pd.crosstab(assigned, labels).reindex(index=wanted, columns=list(classes), fill_value=0)
    if (table == 0).to_numpy().any():  # a safety net behind the count check above
        raise SplitError(f"a split lacks a class (patients per split and class: {table.to_dict('index')}); "
                         "add data or change the fractions")
    return assigned


def assign_folds(rows: pd.DataFrame, folds: int, seed: int, classes: Sequence[str]) -> pd.Series:
    """Patient-grouped, stratified k-fold index (0..folds-1) for ``rows`` (train+val rows).

    Raises:
        SplitError: a class has fewer patients than ``folds`` (some fold would lack it).
    """
    labels = patient_labels(rows, classes)
    per_class = labels.value_counts().reindex(list(classes), fill_value=0)
    if (per_class < folds).any():
        raise SplitError(f"split.folds: {folds} folds need at least {folds} train+val patients per class, "
                         f"got {per_class.to_dict()}")
    ordered = rows.sort_values("source")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = pd.Series(TEST_FOLD, index=ordered.index, dtype=int)
    groups, y = ordered["patient_id"].to_numpy(), ordered["label"].to_numpy()
    for k, (_, held_out) in enumerate(splitter.split(groups, y, groups=groups)):
        fold.iloc[held_out] = k
    return fold.reindex(rows.index)


def make_splits(manifest: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str]) -> pd.DataFrame:
    """The split table: accepted rows only, sorted by ``source``, with ``split`` (and ``fold`` when folds >= 2)."""
    rows = manifest.loc[manifest["status"] == "accepted", list(OUTPUT_COLUMNS[:-1])]
    rows = rows.sort_values("source").reset_index(drop=True)
    # validate blocks these upstream; checked again because a silent mislabel here would skew stratification.
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown or (rows["patient_id"] == "").any():
        raise SplitError(f"accepted rows need a label in {list(classes)} and a patient_id; found labels {unknown} and "
                         f"{int((rows['patient_id'] == '').sum())} row(s) without patient_id (run validate)")
    assigned = split_patients(patient_labels(rows, classes), cfg, classes)
    rows["split"] = rows["patient_id"].map(assigned)
    if cfg.folds >= 2:
        rows["fold"] = TEST_FOLD
        development = rows["split"] != "test"
        rows.loc[development, "fold"] = assign_folds(rows[development], cfg.folds, cfg.seed, classes)
    return rows


def summarize(splits: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str]) -> dict[str, Any]:
    """The JSON summary: images and patients per split and class, actual fractions, fold sizes."""
    images = pd.crosstab(splits["split"], splits["label"]).reindex(index=list(SPLITS), columns=list(classes),
                                                                     fill_value=0)
    patients = splits.groupby("split")["patient_id"].nunique().reindex(list(SPLITS), fill_value=0)
    n_images, n_patients = len(splits), splits["patient_id"].nunique()
    summary: dict[str, Any] = {
        "seed": cfg.seed,
        "n_images": n_images,
        "n_patients": n_patients,
        "images": {s: {**{c: int(images.at[s, c]) for c in classes}, "total": int(images.loc[s].sum())}
                   for s in SPLITS},
        "patients": {s: int(patients[s]) for s in SPLITS},
        "fraction_requested": {s: getattr(cfg, s) for s in SPLITS},
        "fraction_images": {s: round(float(images.loc[s].sum()) / n_images, 4) for s in SPLITS},
        "fraction_patients": {s: round(float(patients[s]) / n_patients, 4) for s in SPLITS},
        # Share of the positive class (classes[1]) per split: stratification keeps these close to each other.
        "positive_share": {s: round(float(images.at[s, classes[1]]) / max(int(images.loc[s].sum()), 1), 4)
                           for s in SPLITS},
    }
    if "fold" in splits:
        dev = splits[splits["fold"] != TEST_FOLD]
        summary["folds"] = {
            str(k): {"images": int(len(g)), "patients": int(g["patient_id"].nunique()),
                     **{c: int((g["label"] == c).sum()) for c in classes}}
            for k, g in dev.groupby("fold")
        }
    return summary


def split_manifest(
    manifest_path: str | Path, validation_path: str | Path, params: Params, out: str | Path, summary_path: str | Path
) -> dict[str, Any]:
    """Check the validation gate, split the accepted rows, write the split table and its summary.

    Returns:
        The summary written to ``summary_path``.

    Raises:
        SplitError: validation failed or is stale, or the cohort is too small for the fractions or folds.
    """
    require_validation_success(validation_path, manifest_path)
    manifest = read_manifest(manifest_path, INPUT_COLUMNS)
    splits = make_splits(manifest, params.split, params.data.classes)
    with atomic_path(out) as tmp:
        splits.to_csv(tmp, index=False)
    summary = summarize(splits, params.split, params.data.classes)
    write_json_atomic(summary_path, summary)
    return summary
