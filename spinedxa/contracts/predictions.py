"""``reports/predictions/<model>.csv``: one out-of-fold prediction per scored scan.

Columns: ``source, patient_id, fold, label, y_true, prob, pred, actual, predicted`` and one ``prob_<class>`` column
per class of ``data.classes`` (:func:`class_columns`). ``y_true``/``pred`` are class indices, ``actual``/``predicted``
class names (for DVC's confusion template), ``prob`` the probability of the last class (the positive class of the
binary task, the most severe of the ordinal one), ``prob_<class>`` the probability of each class (rows sum to 1),
``fold`` the fold whose held-out part scored the scan. Under the k-fold protocol every accepted scan appears exactly
once. Sorted by ``source``. Probabilities are written with :data:`DECIMALS` decimals (byte-stable across runs).

``patient_id`` holds the keyed pseudonyms of ingest, which differ between clones made with different
de-identification keys (by design: README "Reproducibility"); every other column is the same in every clone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from spinedxa.contracts import table

BASE_COLUMNS: tuple[str, ...] = ("source", "patient_id", "fold", "label", "y_true", "prob", "pred", "actual",
                                 "predicted")
COLUMNS = BASE_COLUMNS  # the required columns; the per-class ones follow the classes (class_columns)
PREFIX = "prob_"
#: Probabilities are written rounded to this many decimals.
DECIMALS = 6


def class_columns(classes: Sequence[str]) -> list[str]:
    """``prob_<class>`` for each class, in class order."""
    return [f"{PREFIX}{c}" for c in classes]


def classes_of(frame: pd.DataFrame) -> list[str]:
    """The classes a predictions table holds probabilities for, in column order."""
    return [c[len(PREFIX):] for c in frame.columns if c.startswith(PREFIX)]


def read(path: str | Path) -> pd.DataFrame:
    """Read a predictions file (``fold``, ``y_true``, ``pred`` as int; probabilities as float).

    Raises:
        FileNotFoundError: no such file.
        table.TableError: missing columns, non-numeric values, class indices out of range, probabilities outside
            [0, 1] or rows of class probabilities that do not sum to 1, or a scan listed twice.
    """
    frame = table.read(path, BASE_COLUMNS)
    for column in ("fold", "y_true", "pred"):
        frame[column] = table.int_column(frame, column, path)
    classes = classes_of(frame)
    if len(classes) < 2:
        raise table.TableError(f"{path}: expected a {PREFIX}<class> column per class (at least two)")
    for column in ["prob", *class_columns(classes)]:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or not np.all((values >= 0) & (values <= 1)):
            raise table.TableError(f"{path}: column {column!r} must hold probabilities in [0, 1]")
        frame[column] = values.astype(float)
    if not np.allclose(frame[class_columns(classes)].sum(axis=1), 1.0, atol=1e-4):
        raise table.TableError(f"{path}: the {PREFIX}<class> columns of a row must sum to 1")
    allowed = set(range(len(classes)))
    if not set(frame["y_true"]) <= allowed or not set(frame["pred"]) <= allowed:
        raise table.TableError(f"{path}: columns 'y_true' and 'pred' must hold class indices 0..{len(classes) - 1}")
    if frame["source"].duplicated().any():
        raise table.TableError(f"{path}: a scan is listed twice")
    return frame


def _class_order(frame: pd.DataFrame) -> list[str]:
    """The frame's classes in class-index order, as its ``y_true``/``label`` and ``pred``/``predicted`` pairs give
    it (a class seen in neither keeps its column's place after the others)."""
    index: dict[str, int] = {}
    for number, name in (("y_true", "label"), ("pred", "predicted")):
        if number in frame and name in frame:
            for i, c in zip(pd.to_numeric(frame[number], errors="coerce"), frame[name]):
                if pd.notna(i):
                    index.setdefault(str(c), int(i))
    found = classes_of(frame)
    return sorted(found, key=lambda c: (index.get(c, len(found) + found.index(c)), found.index(c)))


def write_empty(path: str | Path, classes: Sequence[str]) -> None:
    """A predictions file with the columns of ``classes`` and no row (a DVC output with nothing to score, e.g. no
    external cohort)."""
    write(path, pd.DataFrame(columns=[*BASE_COLUMNS, *class_columns(classes)]))


def write(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a predictions file sorted by source, class columns in class order, probabilities at :data:`DECIMALS`
    decimals (the same bytes whatever the frame's row and column order)."""
    out = frame.sort_values("source", kind="stable").copy()
    columns = [*BASE_COLUMNS, *class_columns(_class_order(out))]
    for column in ["prob", *class_columns(classes_of(out))]:
        out[column] = out[column].map(lambda v: f"{float(v):.{DECIMALS}f}")
    table.write(path, out, columns)
