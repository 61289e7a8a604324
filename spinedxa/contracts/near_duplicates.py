"""``data/validated/near_duplicates.csv``: the confirmed near-duplicate pairs among the accepted scans.

Validate writes it (perceptual-hash candidates confirmed by SSIM, :mod:`spinedxa.validate`); split reads it and puts
the patients of each pair in one group, so near-identical content never sits in the training part and the held-out
part of one fold (:mod:`spinedxa.split`). Pairs are named by the raw sha256 of both scans (never by file name or
patient), sorted, so the file is the same in every clone.

Columns: :data:`COLUMNS` (``sha256_a < sha256_b``; ``same_patient`` is ``True``/``False``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinedxa.contracts import table

FILE_NAME = "near_duplicates.csv"
COLUMNS: tuple[str, ...] = ("sha256_a", "sha256_b", "phash_distance", "ssim", "same_patient")


def read(path: str | Path) -> pd.DataFrame:
    """Read the pairs (strings; ``phash_distance`` as int).

    Raises:
        FileNotFoundError: no such file.
        table.TableError: missing columns or a non-integer distance.
    """
    frame = table.read(path, COLUMNS)
    frame["phash_distance"] = table.int_column(frame, "phash_distance", path)
    return frame


def write(path: str | Path, pairs: pd.DataFrame) -> None:
    """Write the pairs with ``sha256_a < sha256_b``, sorted, SSIM at 4 decimals (byte-stable)."""
    out = pairs.copy()
    swap = out["sha256_a"] > out["sha256_b"]
    out.loc[swap, ["sha256_a", "sha256_b"]] = out.loc[swap, ["sha256_b", "sha256_a"]].to_numpy()
    out["ssim"] = out["ssim"].map(lambda v: "" if pd.isna(v) else f"{float(v):.4f}")
    out["same_patient"] = out["same_patient"].map(lambda v: "True" if bool(v) else "False")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.write(path, out.sort_values(["sha256_a", "sha256_b"], kind="stable"), COLUMNS)
