"""``data/ingested/manifest.csv``: one row per input file, accepted or quarantined with a reason.

Columns (docs/CONTRACTS.md, "ingest"): :data:`COLUMNS`. Extra columns are allowed when reading (validate scans every
column for PHI). Ingest writes it; validate, split, report and audit read it through :func:`read`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from spinedxa.contracts import table

FILE_NAME = "manifest.csv"  # inside the ingest output directory
IMAGES_DIR = "images"  # processed whole images, <sha256[:16]>.png
ROI_DIR = "roi"  # the located L1-L4 region of each accepted image, <sha256[:16]>.png
#: Shape of every ROI image (height / width): the L1-L4 column is ~130 mm tall and ~60 mm wide with its transverse
#: process roots (Zhou et al. 2000, Eur Spine J 9:242), so 2:1 holds it with little empty space. Models take inputs
#: of this shape: ``image_size`` rows, ``image_size / ROI_ASPECT`` columns.
ROI_ASPECT = 2
COLUMNS: tuple[str, ...] = (
    "source", "sha256", "status", "reason", "label", "patient_id", "image", "roi", "roi_top", "roi_left",
    "roi_height", "roi_width", "roi_method", "redacted", "width", "height", "orig_width", "orig_height", "format",
    "modality", "photometric", "bits_stored", "pixel_spacing_mm", "frames", "converted_from_color", "mean", "std",
    "min", "max", "phash",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "width", "height", "orig_width", "orig_height", "bits_stored", "pixel_spacing_mm", "frames", "mean", "std",
    "min", "max", "roi_top", "roi_left", "roi_height", "roi_width",
)
STATUSES: tuple[str, ...] = ("accepted", "quarantined")


class ManifestError(table.TableError):
    """The manifest lacks required columns or has no rows (the message names the file)."""


def read(path: str | Path, columns: Sequence[str] = COLUMNS) -> pd.DataFrame:
    """Read the manifest as text (empty cells stay ``""``), checking that ``columns`` are present and rows exist.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ManifestError: a required column is missing or the manifest has no rows.
    """
    try:
        frame = table.read(path, columns)
    except table.TableError as exc:
        raise ManifestError(f"{exc} (docs/CONTRACTS.md)") from None
    if frame.empty:
        raise ManifestError(f"{path}: the manifest has no rows; ingest lists every input file exactly once")
    return frame


def write(path: str | Path, rows: pd.DataFrame) -> None:
    """Write the manifest, sorted by ``source``."""
    table.write(path, rows.sort_values("source", kind="stable"), COLUMNS)
