"""``data/augmented/index.csv``: the offline augmented copies, one row per copy, and where they come from.

Columns: ``image`` (relative to ``data/augmented``), ``parent_source``, ``parent_sha256``, ``parent_image`` (the
parent's ROI image, relative to ``data/ingested``), ``patient_id``, ``label``, ``k`` (copy number, 1..expand).
A copy is used only in the folds where its parent is a training scan (:func:`spinedxa.data.training_items`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinedxa.contracts import table

FILE_NAME = "index.csv"
IMAGES_DIR = "images"
COLUMNS: tuple[str, ...] = ("image", "parent_source", "parent_sha256", "parent_image", "patient_id", "label", "k")


def read(path: str | Path) -> pd.DataFrame:
    """Read the index (``k`` as int).

    Raises:
        FileNotFoundError: no such file.
        table.TableError: missing columns or a non-integer ``k``.
    """
    frame = table.read(path, COLUMNS)
    frame["k"] = table.int_column(frame, "k", path)
    return frame


def write(path: str | Path, frame: pd.DataFrame) -> None:
    """Write the index, sorted by parent source then copy number."""
    table.write(path, frame.sort_values(["parent_source", "k"], kind="stable"), COLUMNS)
