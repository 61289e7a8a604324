"""Data validation of the ingest manifest with great-expectations (GE 1.x).

This is the only module of the package that imports great_expectations (its API changed completely between 0.x and
1.x; keeping it behind one module keeps the next migration small). GE is imported lazily, inside the functions that
run it, because importing it costs 6-12 s on this project's CI machine (measured) and :func:`read_manifest` and the
pandas checks below are also used without GE.

Design: pairwise checks (near-duplicates: perceptual-hash candidates confirmed by SSIM on the ingested images) and
aggregate checks (counts per class, quarantine rate) are computed with pandas/numpy into *derived columns* of one
table, one row per manifest row, which GE then asserts on. So every check is a named GE expectation in the Data
Docs, each with ``meta = {name, severity}`` and a human description. Cells that look like PHI are redacted before the
table reaches GE, so neither the Data Docs nor the JSON summary can repeat an identifier that slipped through ingest.

Usage::

    summary = validate_manifest("data/ingested/manifest.csv", params, "reports/validation", "reports/validation.json")
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from skimage.metrics import structural_similarity
from skimage.transform import resize

from spinedxa.config import Params, ValidateConfig
from spinedxa.contracts import manifest as manifest_contract, near_duplicates as near_duplicates_contract, png16
from spinedxa.errors import UserError
from spinedxa.files import atomic_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

Severity = Literal["error", "warning"]

# The ingest manifest's contract (columns, statuses, its reader) has one owner: spinedxa.contracts.manifest.
MANIFEST_COLUMNS = manifest_contract.COLUMNS
NUMERIC_COLUMNS = manifest_contract.NUMERIC_COLUMNS
STATUSES = manifest_contract.STATUSES
ManifestError = manifest_contract.ManifestError
read_manifest = manifest_contract.read
# Near-duplicate confirmation compares images at 64x64. Measured on the default synthetic cohort (174 scans): SSIM of
# different subjects <= 0.74; rescaled, brightened (+5 %), gamma 0.9 or noisy (1 %) copies of a scan >= 0.97.
SSIM_SIZE = (64, 64)
PHASH_BITS = 64  # imagehash.phash default hash_size=8 -> 8x8 = 64 bits, written as 16 hex chars (docs/CONTRACTS.md)

# Formats of the manifest's known non-PHI columns (docs/CONTRACTS.md). A cell in one of these columns that matches its
# format is not scanned for PHI (a sha256 or a hex image name can contain long digit runs by chance).
_NUMBER = r"-?\d{1,6}(?:\.\d+)?(?:[eE][-+]?\d+)?"  # stats of 16-bit images and sizes never need 7+ integer digits
KNOWN_FORMATS: dict[str, re.Pattern[str]] = {
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "pixel_sha256": re.compile(r"[0-9a-f]{64}"),
    "patient_from": re.compile("|".join(manifest_contract.PATIENT_FROM)),
    "phash": re.compile(r"[0-9a-f]{%d}" % (PHASH_BITS // 4)),
    "patient_id": re.compile(r"P[0-9a-f]{12}"),  # keyed HMAC pseudonym: P + 12 hex chars
    "image": re.compile(r"images/[0-9a-f]+\.png"),
    "roi": re.compile(r"roi/[0-9a-f]+\.png"),
    **{col: re.compile(_NUMBER) for col in NUMERIC_COLUMNS},
}
# Columns whose values must be pseudonyms: any other value there is a real identifier that escaped ingest.
PSEUDONYM_COLUMNS: tuple[str, ...] = ("patient_id",)

# PHI-like patterns searched in every cell that is not in a known format.
PHI_PATTERNS: dict[str, re.Pattern[str]] = {
    # DICOM PN value: family^given^middle^prefix^suffix (DICOM PS3.5 section 6.2, VR "PN"), e.g. "DOE^JANE".
    "person_name": re.compile(r"[A-Za-z]\^|\^[A-Za-z]"),
    # DICOM DA value YYYYMMDD (PS3.5 table 6.2-1) and ISO 8601 YYYY-MM-DD (or with / or .), years 1900-2099.
    "date": re.compile(r"(?<!\d)(?:19|20)\d{2}([-/.]?)(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])(?!\d)"),
    # DICOM UID: dot-separated numeric components under an ISO root 0, 1 or 2 (PS3.5 section 9.1), e.g. 1.2.840....;
    # four or more components so that version-like strings (1.2.3) do not match. UIDs under the DICOM standard's own
    # root 1.2.840.10008 (transfer syntaxes, SOP classes: PS3.6 annex A) name no instance and are allowed.
    "dicom_uid": re.compile(r"(?<![\d.])(?!1\.2\.840\.10008\.)[012](?:\.\d+){3,}"),
    # Medical record and accession numbers are commonly 7-10 digit runs; neutral file names (scan_0001) use fewer.
    "digit_run": re.compile(r"\d{7,}"),
}
# Ingest writes quarantine reasons from fixed templates that quote quantities ("rows x columns x frames = 10000 x
# 10000 x 1 = 100000000 > ingest.max_pixels 50000000", "12345678 bytes with no ... signature"). A number next to an
# arithmetic or comparison operator, a unit, or after a params key is a quantity, not an identifier: masked before
# the scan, in these columns only (a raw file name in `source` gets no such benefit of the doubt).
QUANTITY = re.compile(
    r"(?:[=<>x]\s*|\b[a-z_]+\.[a-z_]+\s+)\d+|\d+(?=\s*(?:[=<>x]\s|bytes\b|px\b|pixels\b))"
)
QUANTITY_COLUMNS: tuple[str, ...] = ("reason",)
REDACTED = "<redacted>"

# Derived columns added for GE (never written to the manifest).
ROW_REF = "row_ref"
BAD_FIELDS = "bad_fields"
NEAR_DUP_SAME = "near_duplicate_same_patient"
NEAR_DUP_OTHER = "near_duplicate_other_patient"
PHI_SUSPECT = "phi_suspect"
IS_QUARANTINED = "is_quarantined"

# Fields an accepted row must carry (non-empty; numeric ones must parse), so that a later check cannot pass vacuously
# on a missing value (GE's map expectations skip nulls).
REQUIRED_TEXT = ("sha256", "label", "patient_id", "image", "phash")
REQUIRED_NUMERIC = ("width", "height", "orig_width", "orig_height", "std")

SUITE_NAME = "manifest"
#: Inside the validated directory (data/validated): the verdict and the manifest sha256 it was made on.
VERDICT_FILE = "verdict.json"
#: What the user can change when a blocking check fails (printed under the failure; no traceback).
WHAT_TO_CHANGE: dict[str, str] = {
    "label_in_classes": "give every accepted file a label among data.classes, or map its label with data.class_map",
    "accepted_fields_well_formed": "re-run ingest (the manifest and data/ingested disagree)",
    "sha256_unique": "re-run ingest: its duplicate rule resolves exact copies",
    "width_in_range": "move the too small / too large images out of data.source, or change validate.min_side / "
                      "validate.max_side",
    "height_in_range": "move the too small / too large images out of data.source, or change validate.min_side / "
                       "validate.max_side",
    "not_blank": "move the blank images out of data.source, or lower validate.min_std",
    "quarantine_rate": "see per_reason in the cohort's ingest summary (reports/ingest.json; reports/external/"
                       "ingest.json for the external cohort): fix or remove the quarantined files, map unknown labels "
                       "with data.class_map, or raise validate.max_quarantine_rate",
    "no_phi": "rename the files whose names carry identifiers (the offending rows are redacted in the Data Docs)",
}
MAX_LISTED_ROWS = 20  # offending rows named per expectation in messages and in the JSON summary


class ValidationFailed(UserError, RuntimeError):
    """One or more blocking (severity ``error``) expectations failed; raised after the report was written."""

    def __init__(self, manifest: str | Path, failures: Sequence[CheckResult], docs: str | Path, summary: str | Path):
        self.failures = list(failures)
        lines = [f"{manifest}: {len(self.failures)} blocking validation failure(s):"]
        for r in self.failures:
            lines.append(f"  - {r.message()}")
            if r.name in WHAT_TO_CHANGE:
                lines.append(f"    what to change: {WHAT_TO_CHANGE[r.name]}")
        lines.append(f"Details: {Path(docs) / 'index.html'} and {summary}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Check:
    """One named check, expressed as one GE expectation over the annotated manifest table.

    ``expectation`` is the class name in ``great_expectations.expectations``; ``accepted_only`` restricts a
    row-level expectation to ``status == accepted`` rows through a GE row condition.
    """

    name: str
    severity: Severity
    description: str
    expectation: str
    kwargs: Mapping[str, Any]
    accepted_only: bool = True


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one :class:`Check` (offending rows are named by ``source``, or redacted when PHI-like)."""

    name: str
    severity: Severity
    description: str
    success: bool
    unexpected_count: int | None  # None for table-level checks (sums, means)
    observed_value: float | None = None
    offending: tuple[str, ...] = ()
    offending_values: tuple[str, ...] = ()  # the (redacted) value that failed, per offending row
    exception: str | None = None

    def message(self) -> str:
        """One line naming the check, what was expected and the offending rows or the observed value."""
        text = f"{self.name} ({self.description})"
        if self.exception:
            return f"{text}: the expectation raised {self.exception}"
        if self.unexpected_count is None:
            return f"{text}: observed {self.observed_value!r}"
        rows = "; ".join(f"{ref} [{value}]" for ref, value in zip(self.offending, self.offending_values))
        more = self.unexpected_count - min(len(self.offending), MAX_LISTED_ROWS)
        return f"{text}: {self.unexpected_count} offending row(s): {rows}" + (f" (+{more} more)" if more > 0 else "")

    def to_json(self) -> dict[str, Any]:
        """The per-expectation entry of the JSON summary."""
        return {
            "name": self.name,
            "severity": self.severity,
            "success": self.success,
            "unexpected_count": self.unexpected_count,
            "observed_value": self.observed_value,
            "offending": list(self.offending[:MAX_LISTED_ROWS]),
            "offending_values": list(self.offending_values[:MAX_LISTED_ROWS]),
            "description": self.description,
            **({"exception": self.exception} if self.exception else {}),
        }


@dataclass(frozen=True)
class Annotated:
    """The manifest made ready for GE (redacted, numeric columns parsed, derived columns added) and its counts."""

    table: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    near_duplicates: pd.DataFrame | None = None  # confirmed pairs (spinedxa.contracts.near_duplicates columns)


def find_phi(manifest: pd.DataFrame) -> pd.DataFrame:
    """Flag cells that look like PHI.

    A cell in a known-format column (:data:`KNOWN_FORMATS`) that matches its format is clean; a pseudonym column
    holding anything else is flagged ``not_pseudonymous``; every other non-empty cell is searched for
    :data:`PHI_PATTERNS` (quantities in ingest's quarantine reasons masked first: :data:`QUANTITY`).

    Returns:
        A frame shaped like ``manifest`` whose cells are ``""`` (clean) or the matched kinds (``"date,digit_run"``).
    """
    kinds = pd.DataFrame("", index=manifest.index, columns=manifest.columns, dtype=object)
    for col in manifest.columns:
        values = manifest[col].astype(object).where(manifest[col].notna(), "").astype(str)
        scan = values != ""
        if col in KNOWN_FORMATS:
            scan &= ~values.str.fullmatch(KNOWN_FORMATS[col].pattern)
        text = values.str.replace(QUANTITY.pattern, "#", regex=True) if col in QUANTITY_COLUMNS else values
        hits = {kind: scan & text.map(lambda v, p=pattern: p.search(v) is not None).astype(bool)
                for kind, pattern in PHI_PATTERNS.items()}
        if col in PSEUDONYM_COLUMNS:
            hits = {"not_pseudonymous": scan, **hits}
        kinds[col] = _join_labels(pd.DataFrame({k: np.where(hit, k, "") for k, hit in hits.items()}), ",")
    return kinds


def _join_labels(labels: pd.DataFrame, sep: str) -> pd.Series:
    """Per row, the non-empty cells of ``labels`` joined by ``sep`` (``""`` when all are empty)."""
    out = pd.Series("", index=labels.index, dtype=object)
    for col in labels.columns:
        cell = labels[col].astype(str)
        out = out + np.where((out != "") & (cell != ""), sep, "") + cell
    return out


def _none_if_empty(values: pd.Series) -> pd.Series:
    """``""`` -> None, so that GE's expect_column_values_to_be_null counts a clean row as null."""
    return values.astype(object).where(values != "", None)


def phash_to_uint64(hashes: Sequence[str]) -> np.ndarray:
    """Convert 16-hex-char perceptual hashes to an array of unsigned 64-bit integers.

    Raises:
        ValueError: a hash is not :data:`PHASH_BITS` bits of hex (the message names the value).
    """
    pattern = KNOWN_FORMATS["phash"]
    for h in hashes:
        if not pattern.fullmatch(h):
            raise ValueError(f"phash {h!r} is not {PHASH_BITS // 4} lowercase hex characters")
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def near_duplicate_pairs(hashes: Sequence[str], max_distance: int, block: int = 1024) -> pd.DataFrame:
    """All pairs of perceptual hashes within ``max_distance`` bits (Hamming distance).

    Computed block-wise (``block`` rows against all) so memory stays O(block * n) rather than O(n^2).

    Returns:
        Columns ``i``, ``j`` (positions in ``hashes``, ``i < j``) and ``distance``.
    """
    h = phash_to_uint64(hashes)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(h), block):
        dist = np.bitwise_count(h[start:start + block, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        upper = jj > ii
        found.append((ii[upper], jj[upper], dist[ii[upper] - start, jj[upper]]))
    if not found:
        return pd.DataFrame({"i": [], "j": [], "distance": []}, dtype=int)
    i, j, d = (np.concatenate(parts) for parts in zip(*found))
    return pd.DataFrame({"i": i.astype(int), "j": j.astype(int), "distance": d.astype(int)})


def image_similarity(path_a: str | Path, path_b: str | Path) -> float:
    """SSIM (scikit-image) of two images resized to :data:`SSIM_SIZE`, in [-1, 1]; 1 means identical."""
    a, b = (resize(png16.read(p).astype(np.float64), SSIM_SIZE, anti_aliasing=True) for p in (path_a, path_b))
    return float(structural_similarity(a, b, data_range=1.0))


def find_near_duplicates(
    manifest: pd.DataFrame, rows: pd.Index, images_root: Path, cfg: ValidateConfig
) -> pd.DataFrame:
    """Near-duplicate pairs among ``rows`` of ``manifest``: pHash candidates confirmed by SSIM.

    pHash alone cannot tell spine scans of different people apart (on the default synthetic cohort, 7 of 15,028
    different-subject pairs fall within 4 bits), so each candidate within ``cfg.phash_max_distance`` is confirmed
    when the SSIM of the two images is at least ``cfg.near_duplicate_min_ssim`` (0 disables the confirmation).

    Returns:
        Columns ``a``, ``b`` (manifest index labels), ``distance``, ``ssim`` (NaN when not computed or an image
        file is missing), ``same_patient`` and ``confirmed``; one row per candidate pair.
    """
    pairs = near_duplicate_pairs(manifest.loc[rows, "phash"].tolist(), cfg.phash_max_distance)
    pairs["a"], pairs["b"] = rows[pairs["i"]], rows[pairs["j"]]
    patient, image = manifest["patient_id"], manifest["image"]
    pairs["same_patient"] = patient[pairs["a"]].to_numpy() == patient[pairs["b"]].to_numpy()
    pairs["ssim"] = np.nan
    if cfg.near_duplicate_min_ssim > 0:
        for k, (a, b) in enumerate(zip(pairs["a"], pairs["b"])):
            files = images_root / image[a], images_root / image[b]
            if all(f.is_file() for f in files):  # a missing file is reported by accepted_fields_well_formed
                pairs.loc[k, "ssim"] = image_similarity(*files)
        pairs["confirmed"] = pairs["ssim"] >= cfg.near_duplicate_min_ssim
    else:
        pairs["confirmed"] = True
    return pairs.drop(columns=["i", "j"])


def annotate(manifest: pd.DataFrame, classes: Sequence[str], cfg: ValidateConfig, images_root: Path) -> Annotated:
    """Redact PHI-like cells and add the derived columns the GE suite asserts on.

    Derived columns: ``row_ref`` (the row's ``source``, or its manifest line when ``source`` itself looks like
    PHI), ``bad_fields`` (accepted rows: required fields missing or malformed, image file missing under
    ``images_root``), ``near_duplicate_same_patient`` and ``near_duplicate_other_patient`` (confirmed partners, see
    :func:`find_near_duplicates`), ``phi_suspect`` (``column (kinds)`` list), ``is_quarantined`` (0/1) and
    ``accepted_<class>`` (0/1) per class.
    """
    phi = find_phi(manifest)
    flagged = phi != ""
    table = manifest.mask(flagged, REDACTED)
    for col in NUMERIC_COLUMNS:
        table[col] = pd.to_numeric(table[col], errors="coerce")  # "" and junk -> NaN, reported by bad_fields
    accepted = manifest["status"] == "accepted"

    # A CSV line number (header = line 1) names a row without repeating a PHI-like source.
    line = pd.Series(manifest.index + 2, index=manifest.index).astype(str)
    table[ROW_REF] = manifest["source"].where(~flagged["source"], "manifest line " + line + " (source redacted)")

    kinds = {c: phi[c].str.replace(",", ", ") for c in phi}
    suspects = pd.DataFrame({c: np.where(flagged[c], f"{c} (" + kinds[c] + ")", "") for c in phi}, index=phi.index)
    table[PHI_SUSPECT] = _none_if_empty(_join_labels(suspects, "; "))

    bad = pd.DataFrame({c: manifest[c] == "" for c in REQUIRED_TEXT})
    for col in ("sha256", "phash"):
        bad[col] |= ~manifest[col].str.fullmatch(KNOWN_FORMATS[col].pattern)
    for col in REQUIRED_NUMERIC:
        bad[col] = table[col].isna()
    bad["image file"] = ~bad["image"] & ~manifest["image"].map(lambda rel: (images_root / rel).is_file()).astype(bool)
    bad.loc[~accepted] = False
    table[BAD_FIELDS] = _none_if_empty(_join_labels(pd.DataFrame({c: np.where(bad[c], c, "") for c in bad}), ", "))

    pairs = find_near_duplicates(manifest, manifest.index[accepted & ~bad["phash"]], images_root, cfg)
    confirmed = pairs[pairs["confirmed"]]
    partners: dict[tuple[str, int], list[str]] = {}
    for a, b, d, sim, same in confirmed[["a", "b", "distance", "ssim", "same_patient"]].itertuples(index=False):
        col = NEAR_DUP_SAME if same else NEAR_DUP_OTHER
        how = f"pHash distance {d}" + ("" if np.isnan(sim) else f", SSIM {sim:.3f}")
        partners.setdefault((col, a), []).append(f"{table.at[b, ROW_REF]} ({how})")
        partners.setdefault((col, b), []).append(f"{table.at[a, ROW_REF]} ({how})")
    for col in (NEAR_DUP_SAME, NEAR_DUP_OTHER):
        table[col] = None
    for (col, idx), names in partners.items():
        table.at[idx, col] = "; ".join(names)

    # Files the label map drops are not inputs of the task: no value, so they count on neither side of the rate.
    table[IS_QUARANTINED] = (manifest["status"] == "quarantined").astype(float).where(manifest["status"] != "dropped")
    labels = manifest["label"].where(accepted)
    for cls in classes:
        table[f"accepted_{cls}"] = (labels == cls).astype(int)

    stats = {
        "n_rows": len(manifest),
        "n_accepted": int(accepted.sum()),
        "n_quarantined": int(table[IS_QUARANTINED].sum()),
        "n_dropped": int((manifest["status"] == "dropped").sum()),
        "n_duplicates": int((manifest["status"] == "duplicate").sum()),
        "quarantine_rate": round(float(table[IS_QUARANTINED].mean()), 6) if table[IS_QUARANTINED].notna().any()
        else 0.0,
        "n_accepted_per_class": {cls: int(table[f"accepted_{cls}"].sum()) for cls in classes},
        "n_accepted_patients": int(manifest.loc[accepted, "patient_id"].nunique()),
        "n_phash_candidate_pairs": len(pairs),
        "n_near_duplicates_within_patient": int(confirmed["same_patient"].sum()),
        "n_near_duplicates_across_patients": int((~confirmed["same_patient"]).sum()),
        # Patients joined into one split group by confirmed near-duplicates across patients (spinedxa.split).
        "n_patients_in_near_duplicate_groups": int(len(set(manifest.loc[confirmed.loc[~confirmed["same_patient"], "a"],
                                                                      "patient_id"])
                                                   | set(manifest.loc[confirmed.loc[~confirmed["same_patient"], "b"],
                                                                      "patient_id"]))),
        "n_phi_suspect_cells": int(flagged.to_numpy().sum()),
        "n_phi_suspect_rows": int(table[PHI_SUSPECT].notna().sum()),
    }
    pairs_out = pd.DataFrame({
        "sha256_a": manifest.loc[confirmed["a"], "sha256"].to_numpy(),
        "sha256_b": manifest.loc[confirmed["b"], "sha256"].to_numpy(),
        "phash_distance": confirmed["distance"].to_numpy(), "ssim": confirmed["ssim"].to_numpy(),
        "same_patient": confirmed["same_patient"].to_numpy(),
    }, columns=list(near_duplicates_contract.COLUMNS))
    return Annotated(table=table, stats=stats, near_duplicates=pairs_out)


def define_checks(classes: Sequence[str], cfg: ValidateConfig) -> list[Check]:
    """The validation suite: one :class:`Check` per named expectation, with its severity and description."""
    near = (f"pHash within {cfg.phash_max_distance} bits and SSIM >= {cfg.near_duplicate_min_ssim} "
            "(validate.phash_max_distance, validate.near_duplicate_min_ssim)")
    return [
        Check("status_known", "error", f"every row's status is one of {list(STATUSES)}",
              "ExpectColumnValuesToBeInSet", {"column": "status", "value_set": list(STATUSES)}, accepted_only=False),
        Check("label_in_classes", "error", f"accepted rows are labelled with one of data.classes {list(classes)}",
              "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": list(classes)}),
        Check("accepted_fields_well_formed", "error",
              f"accepted rows carry {list(REQUIRED_TEXT)} (sha256, phash as hex), numeric {list(REQUIRED_NUMERIC)} "
              "and an existing image file",
              "ExpectColumnValuesToBeNull", {"column": BAD_FIELDS}),
        Check("sha256_unique", "error",
              "raw-file sha256 is unique among accepted files (ingest's duplicate rule keeps one of each exact copy)",
              "ExpectColumnValuesToBeUnique", {"column": "sha256"}),
        Check("no_near_duplicates_across_patients", "warning",
              f"no two patients share a near-identical image ({near}); where they do, the split puts them in one "
              "group, so the copies never straddle a fold",
              "ExpectColumnValuesToBeNull", {"column": NEAR_DUP_OTHER}),
        Check("no_near_duplicates_within_patient", "warning",
              f"no patient has two near-identical images ({near}); a repeat scan is plausible, so a warning",
              "ExpectColumnValuesToBeNull", {"column": NEAR_DUP_SAME}),
        Check("width_in_range", "error",
              f"source image width in [{cfg.min_side}, {cfg.max_side}] px (validate.min_side, validate.max_side)",
              "ExpectColumnValuesToBeBetween",
              {"column": "orig_width", "min_value": cfg.min_side, "max_value": cfg.max_side}),
        Check("height_in_range", "error",
              f"source image height in [{cfg.min_side}, {cfg.max_side}] px (validate.min_side, validate.max_side)",
              "ExpectColumnValuesToBeBetween",
              {"column": "orig_height", "min_value": cfg.min_side, "max_value": cfg.max_side}),
        Check("not_blank", "error", f"image intensity std >= {cfg.min_std} on the 0-65535 scale (validate.min_std)",
              "ExpectColumnValuesToBeBetween", {"column": "std", "min_value": cfg.min_std}),
        *[
            Check(f"min_per_class_{cls}", "error",
                  f"at least {cfg.min_per_class} accepted '{cls}' images (validate.min_per_class)",
                  "ExpectColumnSumToBeBetween", {"column": f"accepted_{cls}", "min_value": cfg.min_per_class},
                  accepted_only=False)
            for cls in classes
        ],
        Check("quarantine_rate", "error",
              f"share of quarantined files <= {cfg.max_quarantine_rate} (validate.max_quarantine_rate)",
              "ExpectColumnMeanToBeBetween", {"column": IS_QUARANTINED, "max_value": cfg.max_quarantine_rate},
              accepted_only=False),
        Check("no_phi", "error",
              "no PHI-like value in any column (DICOM person names, dates, UIDs, 7+ digit runs, non-pseudonymous "
              "patient_id); offending cells are redacted in this report",
              "ExpectColumnValuesToBeNull", {"column": PHI_SUSPECT}, accepted_only=False),
    ]


def _build_suite(checks: Sequence[Check]) -> Any:
    """Turn ``checks`` into a ``gx.ExpectationSuite`` (GE imported lazily: see the module docstring)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        expectation_cls = getattr(gxe, check.expectation)
        extra = {"row_condition": Column("status") == "accepted"} if check.accepted_only else {}
        suite.add_expectation(expectation_cls(
            **check.kwargs, **extra,
            description=f"[{check.severity}] **{check.name}**: {check.description}",
            meta={"name": check.name, "severity": check.severity},
        ))
    return suite


def run_checks(table: pd.DataFrame, checks: Sequence[Check], docs_dir: str | Path) -> list[CheckResult]:
    """Run ``checks`` over ``table`` with a GE checkpoint and write the Data Docs site into ``docs_dir``.

    An ephemeral GE context (nothing written outside ``docs_dir``) with a pandas dataframe asset, one validation
    definition and a checkpoint whose UpdateDataDocsAction builds a local site rooted at ``docs_dir`` (replaced
    whole, atomically), then made stable and offline (:func:`stabilize_site`, :func:`vendor_assets`).
    """
    # GE logs hundreds of INFO lines per run (docs decorators, datasource config): keep only its warnings and errors.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    by_name = {c.name: c for c in checks}
    with atomic_dir(docs_dir) as site_dir:
        site = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),  # suites and results live in memory only
            data_docs_sites={"local_site": site},
            analytics_enabled=False,  # the pipeline runs offline
            progress_bars=ProgressBarsConfig(globally=False),  # one bar per metric would flood the stage's log
        ))
        batch = context.data_sources.add_pandas(SUITE_NAME).add_dataframe_asset(SUITE_NAME)
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=SUITE_NAME,
            data=batch.add_batch_definition_whole_dataframe("whole_manifest"),
            suite=context.suites.add(_build_suite(checks)),
        ))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_REF]},
        ))
        outcome = checkpoint.run(batch_parameters={"dataframe": table}, run_id=gx.RunIdentifier(run_name="validate"))
        stabilize_site(site_dir)
        prune_unreferenced_assets(site_dir)
        vendor_assets(site_dir)

    results: list[CheckResult] = []
    for suite_result in outcome.run_results.values():
        for r in suite_result.results:
            check = by_name[r.expectation_config.meta["name"]]
            info = r.exception_info or {}
            raised = info.get("raised_exception", False)
            unexpected = (r.result.get("unexpected_index_list") or [])[:MAX_LISTED_ROWS]
            observed = r.result.get("observed_value")
            results.append(CheckResult(
                name=check.name,
                severity=check.severity,
                description=check.description,
                success=bool(r.success),
                unexpected_count=None if "unexpected_count" not in r.result else int(r.result["unexpected_count"]),
                observed_value=None if observed is None else float(observed),
                offending=tuple(str(row[ROW_REF]) for row in unexpected),
                offending_values=tuple(str(row.get(check.kwargs["column"])) for row in unexpected),
                exception=str(info.get("exception_message")) if raised else None,
            ))
    order = {c.name: i for i, c in enumerate(checks)}
    return sorted(results, key=lambda r: order[r.name])


# --- Data Docs: stable paths and bytes, readable offline ------------------------------------------------------
# GE writes each validation result to validations/<suite>/<run name>/<run time>/<batch>.html and stamps the pages
# with the run time, the batch load time, a random UUID per collapsible block and a time-stamped logo URL, so every
# run of the same data replaced one ~1,900-line page by another in git. The pages also load Bootstrap, jQuery and
# Font Awesome from CDNs (unstyled offline). The fixes below post-process GE's output; they assume GE 1.x's page
# layout and stop with an error naming the page and the URL if a GE version references an asset not vendored.
WEB_ASSETS = Path(__file__).parent / "templates" / "web"  # vendored by workflow/vendor_web_assets.py
VENDOR_DIR = "static/vendor"  # where a site keeps its copy of WEB_ASSETS
NOT_RECORDED = "not recorded"  # what the pages say instead of a time (the run's time is in git and dvc.lock)
# GE's time stamps: run ids and batch load times (20261127T052352.533419Z), ISO (2026-11-27T05:23:52Z), and the
# index table's "2026-11-27 05:23:52 UTC" with its numeric sort key.
TIMESTAMPS = (
    re.compile(r"\d{8}T\d{6}\.\d{6}Z"),
    re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z"),
    re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC"),
)
RUN_TIME_SORT = re.compile(r"('_run_time_sort': )[\d.]+")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# GE's logos come from its S3 bucket (with a ?d=<now> query); the package ships logo-long.png itself.
GE_S3_IMAGE = re.compile(
    r"https://great-expectations-web-assets\.s3[\w.-]*\.amazonaws\.com/[\w.-]+\.png(?:\?[^\"')\s]*)?"
)
# Links between the site's own pages, at whatever depth GE wrote them.
SITE_LINK = re.compile(r"(?<=[\"'])(?:\.\./)+(?=index\.html|static/|expectations/|validations/)")
VEGA_TAG = re.compile(r"<script src=\"https://cdn\.jsdelivr\.net/npm/vega[\w-]*@[\d.]+\"></script>\n?")
SRI_ATTRIBUTES = re.compile(r"\s+(?:integrity|crossorigin)=\"[^\"]*\"")
# What a browser would fetch from elsewhere: <script src>, <link href>, <img src> and CSS url() (plain <a> links are
# not fetched and may point anywhere).
EXTERNAL_ASSET = re.compile(
    r"<(?:script|img|link)\b[^>]*?\b(?:src|href)=[\"']((?:https?:)?//[^\"']+)|url\(\s*[\"']?((?:https?:)?//[^\"')]+)",
    flags=re.IGNORECASE,
)


def external_assets(html: str) -> list[str]:
    """URLs of scripts, stylesheets, images and CSS resources that ``html`` would load from another host."""
    return [a or b for a, b in EXTERNAL_ASSET.findall(html)]


def web_asset_urls() -> dict[str, str]:
    """CDN URL in GE's pages -> vendored file (relative to :data:`WEB_ASSETS`), from ``assets.json``."""
    manifest = json.loads((WEB_ASSETS / "assets.json").read_text(encoding="utf-8"))
    return manifest["urls"]


def stabilize_site(site_dir: Path) -> dict[str, str]:
    """Give ``site_dir``'s validation pages fixed names and make every page byte-stable and offline.

    Each ``validations/<suite>/<run>/<time>/<batch>.html`` becomes ``validations/<suite>.html`` (one validation of
    one suite per run, as :func:`run_checks` makes). In every page: links between pages are rewritten for the new
    depth, time stamps read :data:`NOT_RECORDED`, GE's random element ids become counters, CDN assets point at the
    vendored copies under ``static/vendor`` (:func:`vendor_assets`), Vega tags are dropped from pages that draw no
    chart, and GE's S3 logos point at its packaged ``static/images/logo-long.png``.

    Returns:
        Old -> new relative path of each moved page.

    Raises:
        RuntimeError: two validation pages would share a name, or a page still loads something from another host.
    """
    moved: dict[str, str] = {}
    validations = site_dir / "validations"
    for page in sorted(validations.rglob("*.html")) if validations.is_dir() else []:
        rel = page.relative_to(site_dir)
        if len(rel.parts) <= 2:
            continue
        target = validations / f"{rel.parts[1]}.html"
        if target.exists() or target.relative_to(site_dir).as_posix() in moved.values():
            raise RuntimeError(f"{site_dir}: two validation pages for suite {rel.parts[1]!r}; expected one per run")
        moved[rel.as_posix()] = target.relative_to(site_dir).as_posix()
        page.rename(target)
    for folder in sorted((p for p in validations.rglob("*") if p.is_dir()), reverse=True) if moved else []:
        if not any(folder.iterdir()):
            folder.rmdir()
    urls = web_asset_urls()
    for page in sorted(site_dir.rglob("*.html")):
        rel = page.relative_to(site_dir)
        up = "../" * (len(rel.parts) - 1)
        html = page.read_text(encoding="utf-8")
        for old, new in moved.items():
            html = html.replace(old, new)
        html = SITE_LINK.sub(up, html)
        html = GE_S3_IMAGE.sub(f"{up}static/images/logo-long.png", html)
        for url, local in urls.items():
            html = html.replace(f'"{url}"', f'"{up}{VENDOR_DIR}/{local}"')
        html = SRI_ATTRIBUTES.sub("", html)  # hashes of CDN copies; crossorigin would block file:// loads
        if "vegaEmbed(" not in html:
            html = VEGA_TAG.sub("", html)
        html = RUN_TIME_SORT.sub(r"\g<1>0", html)
        for pattern in TIMESTAMPS:
            html = pattern.sub(NOT_RECORDED, html)
        ids: dict[str, str] = {}
        html = UUID.sub(lambda m: ids.setdefault(m.group(0), f"id{len(ids) + 1}"), html)
        remote = external_assets(html)
        if remote:
            raise RuntimeError(
                f"{page}: loads {remote[0]} from another host; vendor it (workflow/vendor_web_assets.py) so the "
                "Data Docs stay readable offline"
            )
        page.write_text(html, encoding="utf-8")
    return moved


def vendor_assets(site_dir: Path) -> None:
    """Copy the vendored web assets and their licences into ``site_dir/static/vendor``."""
    target = site_dir / VENDOR_DIR
    for src in sorted(WEB_ASSETS.rglob("*")):
        if src.is_file() and src.name != "assets.json":
            dest = target / src.relative_to(WEB_ASSETS)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def prune_unreferenced_assets(site_dir: Path) -> list[Path]:
    """Delete files under ``site_dir/static`` that no page or stylesheet of the site mentions by name.

    The Data Docs directory is a git-tracked report (``cache: false`` in dvc.yaml), and GE copies ~4 MB of static
    assets into every site (fonts and tutorial GIFs, measured with GE 1.24) that these pages never reference; only
    ~30 KB are used.

    Returns:
        The deleted files.
    """
    pages = "".join(p.read_text(encoding="utf-8") for p in site_dir.rglob("*") if p.suffix in (".html", ".css"))
    unused = [p for p in (site_dir / "static").rglob("*") if p.is_file() and p.name not in pages]
    for path in unused:
        path.unlink()
    for folder in sorted((site_dir / "static").rglob("*"), reverse=True):  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return unused


def summarize(stats: Mapping[str, Any], results: Sequence[CheckResult], docs_dir: str | Path) -> dict[str, Any]:
    """The JSON summary (a DVC metric): overall success, counts, blocking failures, warnings, per-expectation.

    Counts and verdicts only: the hash of the manifest the verdict was made on (which holds keyed pseudonyms, so it
    differs between clones) goes to the verdict file beside the near-duplicate pairs (:func:`validate_manifest`).
    """
    from great_expectations import __version__ as gx_version

    blocking = [r.name for r in results if not r.success and r.severity == "error"]
    return {
        "success": not blocking,
        **stats,
        "blocking_failures": blocking,
        "warnings": [r.name for r in results if not r.success and r.severity == "warning"],
        "n_expectations": len(results),
        "expectations": [r.to_json() for r in results],
        "docs": str(Path(docs_dir) / "index.html"),
        "great_expectations_version": gx_version,
    }


def validate_manifest(
    manifest_path: str | Path, params: Params, docs_dir: str | Path, summary_path: str | Path,
    validated_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Validate the ingest manifest; write the Data Docs, the JSON summary and ``validated_dir`` (the confirmed
    near-duplicate pairs for the split, and the verdict tied to this very manifest); then fail on blocking findings.

    Returns:
        The summary written to ``summary_path``.

    Raises:
        ManifestError: the manifest breaks its contract (nothing is written).
        ValidationFailed: an ``error`` expectation failed (raised after every output was written).
    """
    manifest = read_manifest(manifest_path)
    # Image paths are relative to the manifest's directory, data/ingested (docs/CONTRACTS.md).
    annotated = annotate(manifest, params.data.classes, params.validate, Path(manifest_path).parent)
    results = run_checks(annotated.table, define_checks(params.data.classes, params.validate), docs_dir)
    summary = summarize(annotated.stats, results, docs_dir)
    write_json_atomic(summary_path, summary)
    with contextlib.nullcontext(None) if validated_dir is None else atomic_dir(validated_dir) as tmp:
        if tmp is not None:
            near_duplicates_contract.write(tmp / near_duplicates_contract.FILE_NAME, annotated.near_duplicates)
            write_json_atomic(tmp / VERDICT_FILE, {"success": summary["success"],
                                                   "blocking_failures": summary["blocking_failures"],
                                                   "manifest_sha256": sha256_file(manifest_path)})
    for r in results:
        if not r.success and r.severity == "warning":
            log.warning("%s: %s", manifest_path, r.message())
    failures = [r for r in results if not r.success and r.severity == "error"]
    if failures:
        raise ValidationFailed(manifest_path, failures, docs_dir, summary_path)
    return summary
