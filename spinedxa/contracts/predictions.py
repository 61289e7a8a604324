"""``reports/predictions/<model>.csv``: one out-of-fold prediction per scored scan.

Columns: ``source, patient_id, fold, label, y_true, prob, pred, actual, predicted`` (``actual``/``predicted`` are
class names, for DVC's confusion template; ``fold`` is the fold whose held-out part scored the scan). Under the
k-fold protocol every accepted scan appears exactly once. Sorted by ``source``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinedxa.contracts import table

COLUMNS: tuple[str, ...] = ("source", "patient_id", "fold", "label", "y_true", "prob", "pred", "actual", "predicted")


def read(path: str | Path) -> pd.DataFrame:
    """Read a predictions file (``fold``, ``y_true``, ``pred`` as int; ``prob`` as float).

    Raises:
        FileNotFoundError: no such file.
        table.TableError: missing columns, non-numeric values, labels outside 0/1, probabilities outside [0, 1],
            or a scan listed twice.
    """
    frame = table.read(path, COLUMNS)
    for column in ("fold", "y_true", "pred"):
        frame[column] = table.int_column(frame, column, path)
    prob = pd.to_numeric(frame["prob"], errors="coerce")
    if prob.isna().any() or not np.all((prob >= 0) & (prob <= 1)):
        raise table.TableError(f"{path}: column 'prob' must hold probabilities in [0, 1]")
    frame["prob"] = prob.astype(float)
    if not set(frame["y_true"]) <= {0, 1} or not set(frame["pred"]) <= {0, 1}:
        raise table.TableError(f"{path}: columns 'y_true' and 'pred' must hold 0/1")
    if frame["source"].duplicated().any():
        raise table.TableError(f"{path}: a scan is listed twice")
    return frame


def write(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a predictions file sorted by source (probabilities with full float precision)."""
    table.write(path, frame.sort_values("source", kind="stable"), COLUMNS)
