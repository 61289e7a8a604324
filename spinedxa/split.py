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

**Groups.** The unit dealt into folds is a *group*: a patient, or several patients joined by a confirmed
near-duplicate (validate's pHash + SSIM check, ``data/validated/near_duplicates.csv``), so near-identical content of
two "patients" (a rescan filed under another ID, a copy re-exported) never sits in the training part and the held-out
part of one fold.

**Independent of the de-identification key, file order and machine.** Groups are sorted by a value that does not
depend on the pseudonym: the smallest raw sha256 among their scans (the pseudonyms are keyed HMACs and differ between
clones). The sorted group table, the labels and ``split.seed`` alone decide the assignment, through scikit-learn's
seeded ``StratifiedKFold`` / ``train_test_split``. A group's label for stratification is the majority label of its
scans (a tie goes to the class listed later in ``data.classes``, the more severe one, so progressing patients count
as the worse class).
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
from spinedxa.contracts import jsonfile, manifest as manifest_contract, near_duplicates as near_duplicates_contract
from spinedxa.contracts import splits as splits_contract
from spinedxa.errors import UserError
from spinedxa.files import sha256_file

ROLES = splits_contract.ROLES
#: The validate stage's verdict inside its output directory (data/validated).
VERDICT_FILE = "verdict.json"


class SplitError(UserError, ValueError):
    """The split cannot be made as asked (validation failed, too few patients for the fractions or folds)."""


def require_validation_success(verdict_path: str | Path, manifest_path: str | Path) -> None:
    """Refuse to split unless the validate stage passed on this very manifest.

    Raises:
        SplitError: the verdict says ``success`` is not true, or it was made on another manifest.
        FileNotFoundError: there is no verdict (validate has not run).
    """
    validation_path = verdict_path
    summary = json.loads(Path(verdict_path).read_text(encoding="utf-8"))
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


def groups(rows: pd.DataFrame, pairs: pd.DataFrame | None = None) -> pd.Series:
    """The split group of each row (indexed like ``rows``): its patient, joined with every patient that shares a
    confirmed near-duplicate with it (transitively). A group is named by its smallest raw sha256 (key-independent).
    """
    patients = sorted(set(rows["patient_id"]))
    parent = {p: p for p in patients}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    if pairs is not None and len(pairs):
        patient_of = dict(zip(rows["sha256"], rows["patient_id"]))
        for a, b in zip(pairs["sha256_a"], pairs["sha256_b"]):
            if a in patient_of and b in patient_of:
                ra, rb = find(patient_of[a]), find(patient_of[b])
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    root = rows["patient_id"].map(find)
    smallest = rows.groupby(root)["sha256"].min()
    return root.map(smallest).rename("group")


def patient_table(rows: pd.DataFrame, classes: Sequence[str], pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per split group (a patient, or patients joined by near-duplicates: :func:`groups`), sorted by the
    key-independent ``order`` (smallest raw sha256 of the group's scans).

    Returns:
        Columns ``group``, ``order``, ``label`` (majority label; a tie goes to the class listed later in ``classes``,
        the more severe one), with a fresh index.
    """
    rows = rows.assign(group=groups(rows, pairs))
    counts = pd.crosstab(rows["group"], rows["label"]).reindex(columns=list(classes), fill_value=0)
    label = counts[list(classes)[::-1]].idxmax(axis=1)  # idxmax keeps the first maximum
    table = pd.DataFrame({"group": label.index, "label": label.to_numpy(), "order": label.index})
    return table.sort_values("order", kind="stable").reset_index(drop=True)


def _check_per_class(labels: pd.Series, need: int, what: str, classes: Sequence[str]) -> None:
    per_class = labels.value_counts().reindex(list(classes), fill_value=0)
    short = per_class[per_class < need]
    if not short.empty:
        raise SplitError(f"{what} needs at least {need} patients per class, got {per_class.to_dict()}; "
                         "add data or change split.*")


def _val_subset(train: pd.DataFrame, cfg: SplitConfig, seed: int, classes: Sequence[str]) -> set[str]:
    """Groups of ``train`` (a group table) held out for validation: a stratified ``cfg.val`` share."""
    _check_per_class(train["label"], math.ceil(1 / cfg.val - 1e-9), f"split.val={cfg.val}", classes)
    # Plain numpy arrays: scikit-learn cannot index pandas' Arrow-backed string index.
    _, val_ids = train_test_split(train["group"].to_numpy(), test_size=cfg.val,
                                  stratify=train["label"].to_numpy(), random_state=seed)
    return set(val_ids)


def assign(rows: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str],
           pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The split table (docs/CONTRACTS.md) for accepted manifest ``rows``; ``pairs``: confirmed near-duplicates.

    Returns:
        One row per (scan, fold) with the columns of :data:`spinedxa.contracts.splits.COLUMNS`.

    Raises:
        SplitError: a class has too few groups (patients) for the folds or fractions.
    """
    rows = rows.assign(group=groups(rows, pairs))
    units = patient_table(rows.drop(columns="group"), classes, pairs)
    roles: list[pd.DataFrame] = []
    if cfg.protocol == "kfold":
        _check_per_class(units["label"], cfg.folds, f"split.folds={cfg.folds}", classes)
        splitter = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        dealt = splitter.split(np.zeros(len(units)), units["label"].to_numpy())
        for k, (train_idx, test_idx) in enumerate(dealt):
            val = _val_subset(units.iloc[train_idx], cfg, cfg.seed + k, classes)
            role = pd.Series("train", index=units["group"], dtype=object)
            role[units["group"].iloc[test_idx].to_numpy()] = "test"
            role[list(val)] = "val"
            roles.append(pd.DataFrame({"group": role.index, "split": role.to_numpy(), "fold": k}))
    else:
        _check_per_class(units["label"], math.ceil(1 / cfg.test - 1e-9), f"split.test={cfg.test}", classes)
        rest_ids, test_ids = train_test_split(units["group"].to_numpy(), test_size=cfg.test,
                                              stratify=units["label"].to_numpy(), random_state=cfg.seed)
        rest = units[units["group"].isin(set(rest_ids))]
        val = _val_subset(rest, cfg, cfg.seed, classes)
        role = pd.Series("train", index=units["group"], dtype=object)
        role[test_ids] = "test"
        role[list(val)] = "val"
        roles.append(pd.DataFrame({"group": role.index, "split": role.to_numpy(), "fold": 0}))
    table = rows.merge(pd.concat(roles, ignore_index=True), on="group", how="left", validate="many_to_many")
    table = table.drop(columns="group")
    _check_every_part_has_every_class(table, classes)
    return table.sort_values(["fold", "source"], kind="stable").reset_index(drop=True)


def _check_every_part_has_every_class(table: pd.DataFrame, classes: Sequence[str]) -> None:
    counts = pd.crosstab([table["fold"], table["split"]], table["label"]).reindex(columns=list(classes), fill_value=0)
    empty = counts[(counts == 0).any(axis=1)]
    if not empty.empty:  # a safety net behind the per-class counts above
        raise SplitError(f"a part of a fold lacks a class (images per fold, role and class: "
                         f"{empty.to_dict('index')}); add data or change split.*")


def make_splits(manifest: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str],
                pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The split table for the accepted rows of ``manifest`` (``pairs``: confirmed near-duplicates to group).

    Raises:
        SplitError: an accepted row lacks a known label or a patient id, or the cohort is too small.
    """
    rows = manifest.loc[manifest["status"] == "accepted", list(splits_contract.COLUMNS[:-2])].copy()
    # validate blocks these upstream; checked again because a silent mislabel here would skew stratification.
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown or (rows["patient_id"] == "").any():
        raise SplitError(f"accepted rows need a label in {list(classes)} and a patient_id; found labels {unknown} and "
                         f"{int((rows['patient_id'] == '').sum())} row(s) without patient_id (run validate)")
    return assign(rows, cfg, classes, pairs)


def summarize(splits: pd.DataFrame, cfg: SplitConfig, classes: Sequence[str],
              pairs: pd.DataFrame | None = None) -> dict[str, Any]:
    """The JSON summary (a DVC metric): per fold, images and patients per role and class; split groups."""
    scans = splits.drop_duplicates("source")
    unit = groups(scans.reset_index(drop=True), pairs)
    summary: dict[str, Any] = {
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "n_folds": int(splits["fold"].nunique()),
        "n_images": int(len(scans)),
        "n_patients": int(scans["patient_id"].nunique()),
        "n_groups": int(unit.nunique()),
        # Groups of more than one patient (joined by confirmed near-duplicates) and the patients in them.
        "n_near_duplicate_groups": int((scans.reset_index(drop=True).groupby(unit)["patient_id"].nunique() > 1).sum()),
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
    manifest_path: str | Path, validated_dir: str | Path, params: Params, out: str | Path, summary_path: str | Path
) -> dict[str, Any]:
    """Check the validation gate, group near-duplicates, assign folds and roles, write the table and its summary.

    Returns:
        The summary written to ``summary_path``.

    Raises:
        SplitError: validation failed or is stale, or the cohort is too small for the folds or fractions.
    """
    validated_dir = Path(validated_dir)
    require_validation_success(validated_dir / VERDICT_FILE, manifest_path)
    manifest = manifest_contract.read(manifest_path)
    pairs = near_duplicates_contract.read(validated_dir / near_duplicates_contract.FILE_NAME)
    splits = make_splits(manifest, params.split, params.data.classes, pairs)
    splits_contract.write(out, splits)
    summary = summarize(splits, params.split, params.data.classes, pairs)
    jsonfile.write(summary_path, summary)
    return summary
