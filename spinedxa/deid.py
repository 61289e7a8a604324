"""De-identification: keyed pseudonyms for patients and the allow-list of header facts that may leave ingest.

Design: a small, audited allow-list rather than a general de-identification library. Ingest never copies a DICOM
header forward; it *extracts* a handful of named acquisition facts (:data:`KEPT_FACTS`) and derives one keyed
pseudonym. Everything else in the header (names, dates, IDs, UIDs, institutions, private tags, free text) is simply
never read into an output, so there is nothing to scrub and no profile of a library to trust or keep up to date.
The allow-list is small enough to audit by eye; tests/test_deid.py proves that fake PHI in every classic field does
not reach any byte ingest writes.

Pseudonyms are ``P`` + the first 12 hex digits (48 bits) of HMAC-SHA256(key, namespaced identifier). The key is
never in the repository: ``$SPINEDXA_DEID_KEY`` if set, else ``.spinedxa/deid.key`` in the working directory
(created on first use with :func:`secrets.token_hex` and mode 0600; ``.spinedxa/`` is git-ignored). Without the key
a pseudonym cannot be linked back to a patient by hashing guessed IDs (an unkeyed hash could). 48 bits give a
birthday-collision probability of about n^2 / 2^49, i.e. ~2e-6 for 25,000 patients.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KEY_ENV = "SPINEDXA_DEID_KEY"
KEY_FILE = Path(".spinedxa") / "deid.key"
PSEUDONYM_HEX = 12  # P + 12 hex chars (docs/CONTRACTS.md)

# The allow-list: output field -> DICOM keyword(s) it is read from. Nothing outside this table is ever copied from a
# header. All are acquisition geometry or encoding facts, none identifies a person (DICOM PS3.15 Annex E lists none
# of these keywords among the attributes to remove or replace).
KEPT_FACTS: dict[str, tuple[str, ...]] = {
    "orig_height": ("Rows",),
    "orig_width": ("Columns",),
    "pixel_spacing_mm": ("PixelSpacing", "ImagerPixelSpacing"),
    "modality": ("Modality",),
    "photometric": ("PhotometricInterpretation",),
    "bits_stored": ("BitsStored",),
    "frames": ("NumberOfFrames",),
}
# Modality is written only as one of its defined terms (DICOM PS3.3 C.7.3.1.1.1, current and retired), anything else
# as "other": a free-text value (a name typed into the wrong field) must never reach the manifest.
MODALITY_TERMS: frozenset[str] = frozenset((
    "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC", "DX", "ECG",
    "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS",
    "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PA", "PLAN",
    "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD",
    "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US",
    "VA", "XA", "XAPROTOCOL", "XC",
    # retired
    "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF",
))
MODALITY_OTHER = "other"
# Plausible ranges of the numeric facts; a value outside (or not a number) is written as missing, never verbatim.
_PIXEL_SPACING_MM = (1e-3, 100.0)  # detector pixels from 1 um to 10 cm
_BITS_STORED = (1, 64)             # PS3.5 8.1.1: BitsStored <= BitsAllocated <= 64
# The only header elements a pseudonym is derived from (:func:`dicom_pseudonym`); none is ever output in clear.
PATIENT_KEYWORDS: tuple[str, ...] = ("PatientID", "PatientName", "PatientBirthDate")

# Identifier namespaces: a labels.csv patient_id and a DICOM PatientID name the same thing (so they share "id:"); the
# other fallbacks live in their own namespaces so that they can never collide with a real ID.
_NS_ID = "id:"
_NS_NAME_DOB = "name+dob:"
_NS_FILE = "sha256:"

_cached_key: tuple[tuple[str | None, str], bytes] | None = None


class DeidKeyError(RuntimeError):
    """The pseudonymisation key is unusable (an empty key file or environment variable)."""


def load_key() -> bytes:
    """Return the pseudonymisation key: ``$SPINEDXA_DEID_KEY``, else ``.spinedxa/deid.key`` (created if missing).

    The key file is created atomically with ``O_CREAT | O_EXCL`` and mode 0600, so parallel workers that start at
    once agree on one key. The result is cached per process (keyed on the environment value and working directory).

    Raises:
        DeidKeyError: the variable is set but empty, or the key file exists but is empty.
    """
    global _cached_key
    env = os.environ.get(KEY_ENV)
    cache_id = (env, os.getcwd())
    if _cached_key is not None and _cached_key[0] == cache_id:
        return _cached_key[1]
    if env is not None:
        if not env.strip():
            raise DeidKeyError(f"${KEY_ENV} is set but empty; unset it to use {KEY_FILE} or set a long random value")
        key = env.strip().encode("utf-8")
    else:
        key = _key_from_file(KEY_FILE)
    _cached_key = (cache_id, key)
    return key


def _key_from_file(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it between exists() and open(): read theirs below
        else:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(32) + "\n")  # 256-bit key, the HMAC-SHA256 block-safe size
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise DeidKeyError(f"{path.resolve()}: key file is empty; delete it to create a new key (pseudonyms change)")
    return key.encode("ascii")


def pseudonym(identifier: str) -> str:
    """Return the pseudonymous patient id (``P`` + 12 hex) for an already namespaced identifier.

    Callers normally use :func:`patient_pseudonym` / :func:`file_pseudonym`, which add the namespace.

    Raises:
        ValueError: ``identifier`` is empty.
        DeidKeyError: see :func:`load_key`.
    """
    if not identifier:
        raise ValueError("pseudonym(): the identifier is empty")
    digest = hmac.digest(load_key(), identifier.encode("utf-8"), "sha256").hex()  # one-shot C path of hmac.new
    return "P" + digest[:PSEUDONYM_HEX]


def patient_pseudonym(patient_id: str) -> str:
    """Pseudonym for a patient identifier (a DICOM PatientID or a labels.csv ``patient_id``)."""
    return pseudonym(_NS_ID + patient_id.strip())


def file_pseudonym(sha256: str) -> str:
    """Pseudonym for a file with no patient identifier: each such file becomes its own patient."""
    return pseudonym(_NS_FILE + sha256)


def dicom_pseudonym(ds: Any) -> str | None:
    """Pseudonym from a DICOM header: PatientID, else PatientName + PatientBirthDate, else ``None``.

    ``ds`` is a :class:`pydicom.Dataset`, or a mapping ``{keyword: value}`` of its elements (what
    :mod:`spinedxa.imaging` reads once per file); only :data:`PATIENT_KEYWORDS` are read and nothing is returned in
    clear.
    """
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if patient_id:
        return patient_pseudonym(patient_id)
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        birth = str(ds.get("PatientBirthDate", "") or "").strip()
        return pseudonym(f"{_NS_NAME_DOB}{name}|{birth}")
    return None


def kept_facts(ds: Any) -> dict[str, Any]:
    """Return the allow-listed acquisition facts of a DICOM header (:data:`KEPT_FACTS`), typed for the manifest.

    ``ds`` is a :class:`pydicom.Dataset` or a mapping ``{keyword: value}`` of its elements. Missing facts come back
    as ``None`` (``frames`` defaults to 1, the DICOM default for single-frame objects). Nothing is copied verbatim:
    ``modality`` is a defined term or ``"other"``, numbers are parsed and range-checked (else ``None``).
    """
    out: dict[str, Any] = {}
    for field, keywords in KEPT_FACTS.items():
        value = next((ds.get(k) for k in keywords if ds.get(k) not in (None, "")), None)
        out[field] = _typed(field, value)
    return out


def _typed(field: str, value: Any) -> Any:
    if field == "frames":
        return int(value) if value not in (None, "") else 1
    if value is None:
        return None
    if field == "modality":
        term = str(value).strip().upper()
        return term if term in MODALITY_TERMS else MODALITY_OTHER
    if field == "pixel_spacing_mm":
        # PixelSpacing is "row\\column" (PS3.3 C.7.6.2.1.1); DXA detectors are square, so the row spacing stands
        # for both. It describes the original image (orig_width x orig_height), not the resized PNG.
        first = value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
        return _in_range(_number(first, float), _PIXEL_SPACING_MM)
    if field == "bits_stored":
        return _in_range(_number(value, int), _BITS_STORED)
    if field in ("orig_height", "orig_width"):
        return int(value)
    return str(value)


def _number(value: Any, kind: type) -> float | int | None:
    """``value`` as a finite ``kind`` (int or float), or None if it is not one (free text in a numeric element)."""
    try:
        number = kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _in_range(number: float | int | None, bounds: tuple[float, float]) -> float | int | None:
    return number if number is not None and bounds[0] <= number <= bounds[1] else None
