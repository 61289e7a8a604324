"""CSV tables of strings with required columns: the one reader and writer every CSV contract uses."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import pandas as pd

from spinedxa.files import atomic_path


class TableError(ValueError):
    """A table file is missing required columns or holds a malformed value (the message names file, row, column)."""


def read(path: str | Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with every cell a string (empty cells stay ``""``: hashes, ids and reasons are never parsed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TableError: a ``required`` column is missing, or the file is not a readable CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not a readable CSV table ({type(exc).__name__})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


def write(path: str | Path, frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """Write ``frame[columns]`` atomically as CSV (``\\n`` line ends, minimal quoting): byte-stable for equal input.

    Raises:
        TableError: ``frame`` lacks one of ``columns``.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: cannot write, frame lacks column(s) {missing}")
    with atomic_path(path) as tmp:
        frame.loc[:, list(columns)].to_csv(tmp, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def int_column(frame: pd.DataFrame, column: str, path: str | Path) -> pd.Series:
    """``frame[column]`` as integers.

    Raises:
        TableError: a cell is not an integer (the message names the file, the row and the column).
    """
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise TableError(f"{path}: row {row + 2}: column {column!r} must hold integers")
    return values.astype(int)
