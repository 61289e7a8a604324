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
#: Shape of every located ROI image (height / width): the L1-L4 column is ~130 mm tall and ~60 mm wide with its
#: transverse process roots (Zhou et al. 2000, Eur Spine J 9:242), so 2:1 holds it with little empty space. Models
#: take inputs of the ROI's shape: ``image_size`` rows, ``image_size / aspect`` columns.
ROI_ASPECT = 2
#: The ROI's aspect per ``ingest.roi``: the located L1-L4 column is 2:1; a whole image (another anatomy, or crops
#: made elsewhere) is letterboxed into a square, the shape that wastes least on average for radiographs of any
#: orientation (a square knee radiograph keeps all its pixels; a 2:1 portrait would be half padding).
ROI_ASPECTS: dict[str, int] = {"locate": ROI_ASPECT, "whole": 1}


def input_shape(image_size: int, aspect: float = ROI_ASPECT) -> tuple[int, int]:
    """``(height, width)`` of a model input of ``image_size`` rows: the ROI's shape (``aspect : 1``; 2:1 for the
    located L1-L4 column, square for whole images: :func:`roi_aspect`)."""
    return image_size, max(1, int(round(image_size / aspect)))


def model_input_shape(image_size: int, roi_mode: str) -> tuple[int, int]:
    """The input shape of a model trained with ``image_size`` on ROIs made with ``ingest.roi`` = ``roi_mode``."""
    return input_shape(image_size, roi_aspect(roi_mode))


def roi_aspect(mode: str) -> int:
    """Height / width of the ROI images (and the model inputs) for ``ingest.roi`` = ``mode``.

    Raises:
        ValueError: unknown mode.
    """
    try:
        return ROI_ASPECTS[mode]
    except KeyError:
        raise ValueError(f"ingest.roi {mode!r}; expected one of {list(ROI_ASPECTS)}") from None
COLUMNS: tuple[str, ...] = (
    "source", "sha256", "status", "reason", "label", "label_found", "duplicate_of", "patient_id", "patient_from",
    "pixel_sha256", "image", "roi", "roi_top", "roi_left",
    "roi_height", "roi_width", "roi_method", "redacted", "width", "height", "orig_width", "orig_height", "format",
    "modality", "photometric", "bits_stored", "pixel_spacing_mm", "frames", "converted_from_color", "mean", "std",
    "min", "max", "phash",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
    "width", "height", "orig_width", "orig_height", "bits_stored", "pixel_spacing_mm", "frames", "mean", "std",
    "min", "max", "roi_top", "roi_left", "roi_height", "roi_width",
)
#: accepted; quarantined (with a reason); dropped (data.class_map maps its label to drop: not a quarantine);
#: duplicate (an exact copy of an accepted scan, named in duplicate_of: not a quarantine; spinedxa.duplicates).
STATUSES: tuple[str, ...] = ("accepted", "quarantined", "dropped", "duplicate")
#: Where a row's patient_id comes from: the DICOM header (PatientID, else name + birth date), labels.csv's
#: patient_id, or nothing (the file is its own patient: said in the log and the report's data card).
PATIENT_FROM: tuple[str, ...] = ("header", "labels_csv", "file")


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
