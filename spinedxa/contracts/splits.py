"""``data/split/splits.csv``: which scans each fold trains on, validates on and tests on.

One row per (scan, fold): ``source, sha256, patient_id, label, image, roi, fold, split``, with ``split`` (the role of
the scan in that fold) one of ``train``, ``val``, ``test``. Under the k-fold protocol every accepted scan has a row
in every fold and is ``test`` in exactly one; under the holdout protocol there is one fold, ``0``. Rows are sorted by
``fold`` then ``source``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinedxa.contracts import table

COLUMNS: tuple[str, ...] = ("source", "sha256", "patient_id", "label", "image", "roi", "fold", "split")
ROLES: tuple[str, ...] = ("train", "val", "test")


def read(path: str | Path) -> pd.DataFrame:
    """Read and check the split table (``fold`` as int).

    Raises:
        FileNotFoundError: no such file.
        table.TableError: missing columns, a role outside :data:`ROLES`, a non-integer fold, or a scan listed twice
            in one fold (the message names the file).
    """
    frame = table.read(path, COLUMNS)
    frame["fold"] = table.int_column(frame, "fold", path)
    bad = sorted(set(frame["split"]) - set(ROLES))
    if bad:
        raise table.TableError(f"{path}: unknown split value(s) {bad}; expected {list(ROLES)}")
    if frame.duplicated(["fold", "source"]).any():
        raise table.TableError(f"{path}: a scan is listed twice in one fold")
    return frame


def write(path: str | Path, frame: pd.DataFrame) -> None:
    """Write the split table, sorted by fold then source."""
    table.write(path, frame.sort_values(["fold", "source"], kind="stable"), COLUMNS)


def folds(frame: pd.DataFrame) -> list[int]:
    """The fold ids in the table, ascending."""
    return sorted(int(f) for f in frame["fold"].unique())


def part(frame: pd.DataFrame, fold: int, role: str) -> pd.DataFrame:
    """The rows of ``fold`` in ``role``, in source order.

    Raises:
        ValueError: unknown role or fold.
    """
    if role not in ROLES:
        raise ValueError(f"unknown split role {role!r}; expected one of {list(ROLES)}")
    if fold not in set(frame["fold"]):
        raise ValueError(f"fold {fold} is not in the split table (folds {folds(frame)})")
    return frame[(frame["fold"] == fold) & (frame["split"] == role)].sort_values("source", kind="stable")


def out_of_fold(frame: pd.DataFrame) -> pd.DataFrame:
    """Every ``test`` row: under k-fold, each scan exactly once, with the fold that scores it."""
    return frame[frame["split"] == "test"].sort_values("source", kind="stable")
