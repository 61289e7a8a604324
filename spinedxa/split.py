"""Patient-grouped, stratified assignment of the accepted scans to folds and roles (train / val / test).

The unit is the patient, never the image: every scan of a patient has the same role in a fold, so a follow-up scan
(or an augmented copy, made later) cannot leak into the part of a fold that scores it.

**Protocols** (``split.protocol``):

- ``kfold`` (default): the patients are dealt into ``split.folds`` stratified folds; in fold *k* the scans of fold *k*
  are ``test`` and the rest are training data, of which a stratified ``split.val`` share of the patients is ``val``
  (early stopping, model selection). Every scan is ``test`` in exactly one fold, so every scan is scored once, out
  of fold. 174 scans are too few for one holdout split: 37 test images give a ROC-AUC interval of about +-0.2.
- ``holdout``: one fold (``0``): a stratified ``split.test`` share of the patients is ``test``, then ``split.val`` of
  the rest is ``val``.

**Independent of the de-identification key, file order and machine.** Patients are sorted by a value that does not
depend on the pseudonym: the smallest raw sha256 among their scans (the pseudonyms are keyed HMACs and differ between
clones). The sorted patient table, the labels and ``split.seed`` alone decide the assignment, through scikit-learn's
seeded ``StratifiedKFold`` / ``train_test_split``. A patient's label for stratification is the majority label of
their scans (a tie goes to the positive class, so progressing patients count as positive).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from spinedxa.config import Params, SplitConfig
from spinedxa.contracts import jsonfile, manifest as manifest_contract, splits as splits_contract
from spinedxa.files import sha256_file

ROLES = splits_contract.ROLES


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


def patient_table(rows: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per patient, sorted by the key-independent ``order`` (smallest raw sha256 of the patient's scans).

    Returns:
        Columns ``patient_id``, ``order``, ``label`` (majority label; a tie goes to the class listed later in
        ``classes``, the positive class), with a fresh index.
    """
    counts = pd.crosstab(rows["patient_id"], rows["label"]).reindex(columns=list(classes), fill_value=0)
    label = counts[list(classes)[::-1]].idxmax(axis=1)  # idxmax keeps the first maximum
    order = rows.groupby("patient_id")["sha256"].min()
    table = pd.DataFrame({"patient_id": label.index, "label": label.to_numpy(),
                          "order": order.reindex(label.index).to_numpy()})
    return table.sort_values("order", kind="stable").reset_index(drop=True)


def _check_per_class(labels: pd.Series, need: int, what: str, classes: Sequence[str]) -> None:
    per_class = labels.value_counts().reindex(list(classes), fill_value=0)
    short = per_class[per_class < need]
    if not short.empty:
        raise SplitError(f"{what} needs at least {need} patients per class, got {per_class.to_dict()}; "
                         "add data or change split.*")


def _val_subset(train: pd.DataFrame, cfg: SplitConfig, seed: int, classes: Sequence[str]) -> set[str]:
    """Patients of ``train`` (a patient table) held out for validation: a stratified ``cfg.val`` share."""
    _check_per_class(train["label"], math.ceil(1 / cfg.val - 1e-9), f"split.val={cfg.val}", classes)
    # Plain numpy arrays: scikit-learn cannot index pandas' Arrow-backed string index.
    _, val_ids = train_test_split(train["patient_id"].to_numpy(), test_size=cfg.val,
                                  stratify=train["label"].to_numpy(), random_state=seed)
    return set(val_ids)


def assign(rows: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str]) -> pd.DataFrame:
    """The split table (docs/CONTRACTS.md) for accepted manifest ``rows``.

    Returns:
        One row per (scan, fold) with the columns of :data:`spinedxa.contracts.splits.COLUMNS`.

    Raises:
        SplitError: a class has too few patients for the folds or fractions.
    """
    patients = patient_table(rows, classes)
    roles: list[pd.DataFrame] = []
    if cfg.protocol == "kfold":
        _check_per_class(patients["label"], cfg.folds, f"split.folds={cfg.folds}", classes)
        splitter = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        dealt = splitter.split(np.zeros(len(patients)), patients["label"].to_numpy())
        for k, (train_idx, test_idx) in enumerate(dealt):
            val = _val_subset(patients.iloc[train_idx], cfg, cfg.seed + k, classes)
            role = pd.Series("train", index=patients["patient_id"], dtype=object)
            role[patients["patient_id"].iloc[test_idx].to_numpy()] = "test"
            role[list(val)] = "val"
            roles.append(pd.DataFrame({"patient_id": role.index, "split": role.to_numpy(), "fold": k}))
    else:
        _check_per_class(patients["label"], math.ceil(1 / cfg.test - 1e-9), f"split.test={cfg.test}", classes)
        rest_ids, test_ids = train_test_split(patients["patient_id"].to_numpy(), test_size=cfg.test,
                                              stratify=patients["label"].to_numpy(), random_state=cfg.seed)
        rest = patients[patients["patient_id"].isin(set(rest_ids))]
        val = _val_subset(rest, cfg, cfg.seed, classes)
        role = pd.Series("train", index=patients["patient_id"], dtype=object)
        role[test_ids] = "test"
        role[list(val)] = "val"
        roles.append(pd.DataFrame({"patient_id": role.index, "split": role.to_numpy(), "fold": 0}))
    table = rows.merge(pd.concat(roles, ignore_index=True), on="patient_id", how="left", validate="many_to_many")
    _check_every_part_has_every_class(table, classes)
    return table.sort_values(["fold", "source"], kind="stable").reset_index(drop=True)


def _check_every_part_has_every_class(table: pd.DataFrame, classes: Sequence[str]) -> None:
    counts = pd.crosstab([table["fold"], table["split"]], table["label"]).reindex(columns=list(classes), fill_value=0)
    empty = counts[(counts == 0).any(axis=1)]
    if not empty.empty:  # a safety net behind the per-class counts above
        raise SplitError(f"a part of a fold lacks a class (images per fold, role and class: "
                         f"{empty.to_dict('index')}); add data or change split.*")


def make_splits(manifest: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str]) -> pd.DataFrame:
    """The split table for the accepted rows of ``manifest``.

    Raises:
        SplitError: an accepted row lacks a known label or a patient id, or the cohort is too small.
    """
    rows = manifest.loc[manifest["status"] == "accepted", list(splits_contract.COLUMNS[:-2])].copy()
    # validate blocks these upstream; checked again because a silent mislabel here would skew stratification.
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown or (rows["patient_id"] == "").any():
        raise SplitError(f"accepted rows need a label in {list(classes)} and a patient_id; found labels {unknown} and "
                         f"{int((rows['patient_id'] == '').sum())} row(s) without patient_id (run validate)")
    return assign(rows, cfg, classes)


def summarize(splits: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str]) -> dict[str, Any]:
    """The JSON summary (a DVC metric): per fold, images and patients per role and class."""
    scans = splits.drop_duplicates("source")
    summary: dict[str, Any] = {
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "n_folds": int(splits["fold"].nunique()),
        "n_images": int(len(scans)),
        "n_patients": int(scans["patient_id"].nunique()),
        "n_scored": int((splits["split"] == "test").sum()),
        "folds": {},
    }
    for fold, part in splits.groupby("fold"):
        entry: dict[str, Any] = {}
        for role in ROLES:
            sub = part[part["split"] == role]
            entry[role] = {**{c: int((sub["label"] == c).sum()) for c in classes}, "total": int(len(sub)),
                           "patients": int(sub["patient_id"].nunique())}
        summary["folds"][str(fold)] = entry
    return summary


def split_manifest(
    manifest_path: str | Path, validation_path: str | Path, params: Params, out: str | Path, summary_path: str | Path
) -> dict[str, Any]:
    """Check the validation gate, assign folds and roles, write the split table and its summary.

    Returns:
        The summary written to ``summary_path``.

    Raises:
        SplitError: validation failed or is stale, or the cohort is too small for the folds or fractions.
    """
    require_validation_success(validation_path, manifest_path)
    manifest = manifest_contract.read(manifest_path)
    splits = make_splits(manifest, params.split, params.data.classes)
    splits_contract.write(out, splits)
    summary = summarize(splits, params.split, params.data.classes)
    jsonfile.write(summary_path, summary)
    return summary
