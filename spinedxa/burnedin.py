"""Burned-in text: find text in the pixels, tell labels from PHI, and black it out.

DICOM headers are de-identified by construction (:mod:`spinedxa.deid`), but secondary captures often carry the
patient's name, ID, birth date and institution *in the pixels*, and the header's ``BurnedInAnnotation`` is often
unset. This module is the pixel side of de-identification:

* :func:`detect_text` runs OCR (RapidOCR 3.10: PP-OCRv6 text detection + recognition, ONNX models shipped inside the
  ``rapidocr`` wheel, run by onnxruntime on one CPU thread; nothing is downloaded) on a decoded 2-D image at its
  original resolution and returns :class:`TextBox` es: row/column bounds plus the recognised text, which stays in
  memory only.
* :func:`classify` decides which regions *count*: every region whose text matches a header PHI value of the same
  file (normalised, fuzzy), and every region outside the allow-list (:data:`ALLOW_PATTERNS`) of anatomical and
  technical labels. It returns a :class:`Finding` with counts and boxes only, never text.
* :func:`redact` sets the counted boxes (plus a margin) to the image minimum; :func:`screen` does all three and,
  after a redaction, OCRs the redacted image again to prove that nothing countable is left.

The allow-list (what does *not* count), matched against a region's whole text after upper-casing and removing
everything but letters and digits:

* vertebral levels and ranges: ``C1``-``C7``, ``T1``-``T12``, ``L1``-``L5``, ``S``/``S1`` (``L1``, ``L1-L4``, ``T12``);
* side and view markers: ``R``, ``L``, ``RT``, ``LT``, ``RIGHT``, ``LEFT``, ``AP``, ``PA``, ``LAT``;
* a scale bar's label: up to 4 digits and ``MM`` or ``CM`` (``5 cm``, ``10mm``, ``2.5 cm``);
* nothing at all: regions with no letter or digit (arrows, tick marks, lines).

Levels and scales are also tried with the usual OCR confusions mapped to digits (``I``/``l``/``|``/``!`` -> 1,
``O`` -> 0, ``S`` -> 5, ``Z`` -> 2), so ``LI`` reads as ``L1``. Anything else counts: a report page, a date, a
word. A region that matches a header PHI value counts even when it would pass the allow-list (a patient whose ID is
``L1``).

Never written anywhere: the recognised text. :class:`TextBox` keeps it out of its ``repr``; :class:`Finding`,
:class:`Screening` and every message hold counts and boxes only.

Limits (see README, de-identification): text the OCR model cannot see is not found: glyphs under ~6 px high after
the resize described at :data:`DETECT_MIN_SIDE`, text at near-zero contrast, heavily stylised or handwritten text.
Lines taller than :data:`MAX_LINE_FRACTION` of the image's short side that are read with little confidence are taken
for anatomy (the detector reads the vertebral column as a text line), so large, blurred lettering can be missed; one- or two-character regions read with low
confidence are dropped as specks (:data:`SPECK_SCORE`). Rotated or garbled text that is detected but misread still
counts (garbage is not on the allow-list). RapidOCR drops regions in which it recognises no character at all. PHI
matching gives the reason and overrides the allow-list; detection does not depend on it.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

REASON = "burned_in_text"
"""Quarantine reason code (to be listed in :data:`spinedxa.imaging.REASONS`)."""

Policy = Literal["quarantine", "redact"]
POLICIES: tuple[str, ...] = ("quarantine", "redact")

# Detection resolution. Normal DXA exports (384-2048 px a side) are read at their own resolution. Smaller images are
# enlarged until the short side is DETECT_MIN_SIDE: PP-OCR's detector is trained on text 10-40 px high and misses
# 5-7 px glyphs that a person can still read (measured on 160 x 120 synthetic scans with 7 px banners). Larger images
# are reduced until the long side is DETECT_MAX_SIDE, which bounds memory and time (cost grows with the pixel count)
# while 2048 px keeps a 12 pt banner of a 4k-wide report page above the detector's limit.
DETECT_MIN_SIDE = 384
DETECT_MAX_SIDE = 2048
# Window for the 8-bit image the OCR sees: the 0.1th-99.9th percentiles of the image (sampled), so that a few hot or
# dead pixels do not flatten low-contrast text, while saturated text (the usual case) clips to black or white.
WINDOW_PERCENTILES = (0.1, 99.9)
PERCENTILE_SAMPLE = 262_144
# What is not text. PP-OCR's detector reads the vertebral column of an AP spine image as a vertical text line and
# single vertebrae or pairs of pedicle rings as glyphs ("0.0", "P", "TR"): on the default synthetic cohort 59 of 174
# clean scans had such regions. All 144 of them on 274 clean scans (the default cohort, the tiny profile's 160 x 120
# and a 1024 x 768 cohort) had a line height (the short side of the box) of 12-60 % of the image's short side and a
# recognition confidence of at most 0.82, while banner and label lines measure 2-8 % and are read with >= 0.89.
# A region is therefore taken for anatomy when its line is taller than MAX_LINE_FRACTION of the short side (and than
# MIN_LINE_LIMIT_PX, for images of ~100 px) *and* it is read with less than ANATOMY_MAX_SCORE: large lettering that
# is read confidently (a banner strip, a title) stays text.
MAX_LINE_FRACTION = 0.10
MIN_LINE_LIMIT_PX = 16
ANATOMY_MAX_SCORE = 0.9
# Regions of at most SPECK_CHARS characters recognised with less confidence than SPECK_SCORE (RapidOCR's own default
# text_score) are specks (a pedicle ring read as "O"); nothing identifying fits in two characters.
SPECK_CHARS = 2
SPECK_SCORE = 0.5
OCR_THREADS = 1  # ingest parallelises over files (processes); more threads per OCR call only contend for the cores
DEFAULT_MARGIN_PX = 4

_MODEL_FILES = {  # RapidOCR 3.10 ships these in the wheel (rapidocr/models); given explicitly so nothing is fetched
    "Det.model_path": "PP-OCRv6_det_small.onnx",
    "Rec.model_path": "PP-OCRv6_rec_small.onnx",
    "Cls.model_path": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}

_LEVEL = r"(?:C[1-7]|T1[0-2]|T[1-9]|L[1-5]|S1?)"
ALLOW_PATTERNS: tuple[str, ...] = (
    rf"{_LEVEL}+",  # L1, L1L4 (from "L1-L4"), T12
    r"R|L|RT|LT|RIGHT|LEFT|AP|PA|LAT",
    r"\d{1,4}(?:MM|CM)",  # 5CM, 10MM, 25CM (from "2.5 cm")
    r"",  # no letter or digit: arrows, ticks, lines
)
"""Full-match regular expressions, on the normalised text (upper case, letters and digits only), of regions that
do not count. See the module docstring."""
_CONFUSABLE_DIGITS = str.maketrans({"I": "1", "O": "0", "S": "5", "Z": "2", "|": "1", "!": "1"})

# Header elements whose values count wherever OCR finds them (DICOM PS3.15 Annex E lists each among the attributes
# to remove or replace).
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StudyDate",
)
_NAME_STOP = frozenset({"DR", "MR", "MRS", "MS", "MD", "PROF", "JR", "SR", "PHD"})
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MIN_FUZZY = 6  # PHI tokens at least this long match with one OCR error per 6 characters; shorter ones exactly


class OcrUnavailableError(RuntimeError):
    """The OCR engine or its bundled models cannot be loaded (a broken install: a systemic problem)."""


@dataclass(frozen=True)
class Box:
    """Half-open pixel bounds ``[top, bottom) x [left, right)`` in the coordinates of the image given to OCR."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass(frozen=True)
class TextBox:
    """One detected text region. ``text`` is the recognised text: memory only, never in ``repr``, never persisted."""

    box: Box
    score: float  # recognition confidence, 0..1
    text: str = field(repr=False)


@dataclass(frozen=True)
class Finding:
    """What :func:`classify` decided about one image: counts and boxes, no text.

    Attributes:
        regions: text regions detected.
        allowed: regions on the allow-list (labels that do not count).
        counted: regions that count (outside the allow-list, or matching a header PHI value).
        phi: of the counted regions, those matching a header PHI value.
        boxes: the bounds of the counted regions.
    """

    regions: int
    allowed: int
    counted: int
    phi: int
    boxes: tuple[Box, ...] = ()

    @property
    def flagged(self) -> bool:
        """True when at least one region counts."""
        return self.counted > 0

    @property
    def detail(self) -> str:
        """A neutral description for a quarantine row (``reason`` is :data:`REASON`); empty when not flagged."""
        if not self.flagged:
            return ""
        phi = f", {self.phi} matching header PHI" if self.phi else ""
        return f"{self.counted} text region(s) outside the allow-list{phi}"

    def as_dict(self) -> dict[str, int]:
        """Counts for summaries (``reports/ingest.json``)."""
        return {"text_regions": self.regions, "allowed": self.allowed, "counted": self.counted, "phi": self.phi}


@dataclass(frozen=True)
class Screening:
    """The result of :func:`screen` for one image.

    Attributes:
        finding: the classification of the image as given.
        image: the image as given, or its redacted copy when ``redacted``.
        redacted: counted regions were blacked out (policy ``redact``).
        residual: counted regions that OCR still finds in the redacted image (0 when the redaction worked).
    """

    finding: Finding
    image: np.ndarray
    redacted: bool
    residual: int = 0

    @property
    def accepted(self) -> bool:
        """The image may be written: nothing counted, or everything counted was redacted and none is left."""
        return not self.finding.flagged or (self.redacted and self.residual == 0)

    @property
    def detail(self) -> str:
        """Why the image is not accepted (for a quarantine row with reason :data:`REASON`); empty when accepted."""
        if self.accepted:
            return ""
        if self.redacted:
            return f"redaction left {self.residual} text region(s) outside the allow-list"
        return self.finding.detail


# ==================================================================================================================
# Detection
# ==================================================================================================================

@functools.cache
def _engine() -> Any:
    """The per-process RapidOCR engine (models loaded once, ~1.5 s), configured from the wheel's own model files."""
    try:
        import rapidocr
        from rapidocr import RapidOCR
    except ImportError as exc:
        raise OcrUnavailableError(f"the OCR library is not installed ({exc.name}); run `make install`") from exc
    models = Path(rapidocr.__file__).parent / "models"
    params: dict[str, Any] = {key: str(models / name) for key, name in _MODEL_FILES.items()}
    missing = [name for name in _MODEL_FILES.values() if not (models / name).is_file()]
    if missing:
        raise OcrUnavailableError(f"{models}: bundled OCR model(s) {missing} missing; reinstall rapidocr==3.10.0")
    params.update({
        "Global.log_level": "error",
        "Global.use_cls": False,  # upright or 90-degree text; the 180-degree classifier is not needed to *detect*
        "Global.text_score": 0.0,  # keep every region, however unsure the recognition: an unsure region still counts
        "Global.max_side_len": DETECT_MAX_SIDE,
        "Det.limit_type": "max",  # never enlarged by RapidOCR (detect_text chose the resolution)
        "Det.limit_side_len": DETECT_MAX_SIDE,
        "EngineConfig.onnxruntime.intra_op_num_threads": OCR_THREADS,
        "EngineConfig.onnxruntime.inter_op_num_threads": OCR_THREADS,
    })
    return RapidOCR(params=params)


#: How onnxruntime words an allocation failure (C++ ``std::bad_alloc``; its memory arena's own message).
_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory")


@functools.cache
def _engine_error() -> type[Exception]:
    """The exception RapidOCR raises when an onnxruntime session fails (it wraps onnxruntime's own error)."""
    from rapidocr.inference_engine.onnxruntime.main import ONNXRuntimeError

    return ONNXRuntimeError


def _gray(image: np.ndarray) -> np.ndarray:
    """A 2-D float32 view of ``image``: grayscale as is, RGB(A) as ITU-R BT.709 luma (as ingest converts colour)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        img = img[..., :3].astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"image of shape {img.shape}: expected a 2-D grayscale or an (H, W, 3|4) colour array")
    if not (np.issubdtype(img.dtype, np.number) or img.dtype == np.bool_):
        raise ValueError(f"image dtype {img.dtype}: expected a numeric array")
    return img.astype(np.float32, copy=False)


def _detection_scale(height: int, width: int) -> float:
    """The resize factor for detection: 1 for normal sizes, see :data:`DETECT_MIN_SIDE` / :data:`DETECT_MAX_SIDE`."""
    up = DETECT_MIN_SIDE / min(height, width)
    down = DETECT_MAX_SIDE / max(height, width)
    return min(max(up, 1.0), down)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Window a float image to uint8 between its (sampled) robust percentiles; non-finite pixels become black."""
    finite = np.isfinite(img)
    if not finite.all():
        img = np.where(finite, img, np.nan)
    step = max(1, img.size // PERCENTILE_SAMPLE)
    sample = img.reshape(-1)[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(img.shape, dtype=np.uint8)
    lo, hi = np.percentile(sample, WINDOW_PERCENTILES)
    if not hi > lo:  # (nearly) constant, or a two-level image whose levels fall on one side of the percentiles
        lo, hi = float(sample.min()), float(sample.max())
    if not hi > lo:
        return np.zeros(img.shape, dtype=np.uint8)
    scaled = (img - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0).astype(np.uint8)


def detect_text(image: np.ndarray) -> list[TextBox]:
    """Find text regions in a decoded image and recognise their text (kept in memory only).

    Args:
        image: the decoded image at its original resolution: 2-D (any numeric dtype, bone bright or not: both
            polarities are detected) or (H, W, 3|4) colour, converted to luma.

    Returns:
        One :class:`TextBox` per text line, bounds in ``image``'s pixel coordinates, in reading order.

    Raises:
        ValueError: ``image`` is not a 2-D or colour numeric array.
        OcrUnavailableError: the OCR library or its models are missing.
        MemoryError: the detector could not allocate its buffers (ingest quarantines the file ``too_large``).
    """
    gray = _gray(image)
    height, width = gray.shape
    scale = _detection_scale(height, width)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Area averaging when reducing (no aliasing, memory of the small image only); bicubic when enlarging text.
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    u8 = _to_uint8(gray)
    engine = _engine()
    try:
        result = engine(np.repeat(u8[:, :, None], 3, axis=2))
    except _engine_error() as exc:
        # onnxruntime reports a failed allocation (under ingest's worker address-space cap: the detector needs
        # ~1 GB at 2048 px, measured) as a runtime error; as a MemoryError it quarantines the file (too_large)
        # instead of ending the stage.
        if any(marker in str(exc) for marker in _OUT_OF_MEMORY):
            raise MemoryError(f"text detection on a {u8.shape[0]} x {u8.shape[1]} image ran out of memory") from None
        raise
    if result.boxes is None or result.txts is None:
        return []
    sy, sx = u8.shape[0] / height, u8.shape[1] / width
    max_line = max(MAX_LINE_FRACTION * min(height, width), MIN_LINE_LIMIT_PX)
    out = []
    for quad, text, score in zip(result.boxes, result.txts, result.scores):
        quad = np.asarray(quad, dtype=np.float64)
        top = min(max(int(math.floor(quad[:, 1].min() / sy)), 0), height)
        left = min(max(int(math.floor(quad[:, 0].min() / sx)), 0), width)
        bottom = min(max(int(math.ceil(quad[:, 1].max() / sy)) + 1, top), height)
        right = min(max(int(math.ceil(quad[:, 0].max() / sx)) + 1, left), width)
        text, score = str(text), float(score)
        if min(bottom - top, right - left) > max_line and score < ANATOMY_MAX_SCORE:
            continue  # anatomy (see MAX_LINE_FRACTION)
        if score < SPECK_SCORE and len(_alnum(text)) <= SPECK_CHARS:
            continue  # a speck (see SPECK_SCORE)
        out.append(TextBox(Box(top, left, bottom, right), score, text))
    return out


# ==================================================================================================================
# Classification
# ==================================================================================================================

def _alnum(text: str) -> str:
    """The letters and digits of ``text``, any script, upper case (``L1-L4`` -> ``L1L4``; CJK kept)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).upper() if c.isalnum())


def normalise(text: str) -> str:
    """Upper-case ASCII letters and digits only (accents folded: ``Müller`` -> ``MULLER``)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Z0-9]", "", folded.upper())


def _date_forms(value: str) -> set[str]:
    """Normalised spellings of a DICOM date (YYYYMMDD) as a banner might print it."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", value.strip())
    if not m:
        return set()
    y, mo, d = m.groups()
    forms = {y + mo + d, d + mo + y, mo + d + y, d + mo + y[2:], mo + d + y[2:], y[2:] + mo + d}
    if 1 <= int(mo) <= 12:
        mon = _MONTHS[int(mo) - 1]
        forms |= {d + mon + y, mon + d + y, y + mon + d, d.lstrip("0") + mon + y}
    return forms


def phi_tokens(phi_values: Iterable[str]) -> frozenset[str]:
    """The normalised strings whose presence in a text region counts as header PHI.

    Person names (DICOM PN, ``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``) give each component of two or more characters
    except titles; dates (``YYYYMMDD``) give their usual printed forms; anything else gives its whole normalised value.
    """
    tokens: set[str] = set()
    for value in phi_values:
        value = str(value)
        if not value.strip():
            continue
        dates = _date_forms(value)
        if dates:
            tokens |= dates
            continue
        whole = normalise(value)
        if "^" in value or "," in value:  # a person name: its parts may be printed in any order
            parts = {normalise(p) for p in re.split(r"[\^,\s]+", value)}
            tokens |= {p for p in parts if len(p) >= 2 and p not in _NAME_STOP}
        elif whole:
            tokens.add(whole)
    return frozenset(tokens)


def _approx_contains(haystack: str, needle: str, max_errors: int) -> bool:
    """True when ``needle`` occurs in ``haystack`` with at most ``max_errors`` edits (Sellers' algorithm)."""
    if needle in haystack:
        return True
    if max_errors == 0 or len(haystack) < len(needle) - max_errors:
        return False
    prev = list(range(len(needle) + 1))  # column for the empty haystack prefix: a match may start anywhere
    for ch in haystack:
        cur = [0]
        for j, nc in enumerate(needle, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ch != nc)))
        if cur[-1] <= max_errors:
            return True
        prev = cur
    return False


def matches_phi(text: str, tokens: frozenset[str]) -> bool:
    """True when the normalised ``text`` contains a PHI token: long tokens fuzzily (OCR errors), short ones exactly."""
    norm = normalise(text)
    if not norm:
        return False
    words = {normalise(w) for w in re.split(r"\s+|[^\w]", text)}
    for token in tokens:
        if len(token) >= _MIN_FUZZY:
            if _approx_contains(norm, token, len(token) // _MIN_FUZZY):
                return True
        elif len(token) >= 4:
            if token in norm:
                return True
        elif token in words:
            return True  # 2-3 characters (a short name, an ID): a word of its own, never inside another word
    return False


@functools.lru_cache(maxsize=16)
def _compiled(allow: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in allow)


def is_allowed(text: str, allow: Sequence[str] = ALLOW_PATTERNS) -> bool:
    """True when a region's whole text is an allow-listed label (see :data:`ALLOW_PATTERNS`)."""
    plain = unicodedata.normalize("NFKC", text)
    norm = _alnum(plain)  # any script: a region read as Chinese characters is not "no letter or digit"

    def digits(part: str) -> str:  # OCR confusions read as digits (a lower-case l too, before upper-casing)
        return _alnum(part.replace("l", "1").upper().translate(_CONFUSABLE_DIGITS))

    candidates = {norm, digits(plain)}
    # Confusions keep a leading level letter (L, T, S, C) and unit letters (MM, CM) as they are.
    head = next((i for i, c in enumerate(plain) if c.isalnum()), None)
    if head is not None and plain[head].upper() in "CTLS":
        candidates.add(plain[head].upper() + digits(plain[head + 1:]))
    if norm.endswith(("MM", "CM")):
        candidates.add(digits(plain)[:-2] + norm[-2:])
    patterns = _compiled(tuple(allow))
    return any(p.fullmatch(c) for p in patterns for c in candidates)


def classify(
    boxes: Sequence[TextBox], phi_values: Iterable[str] = (), allow: Sequence[str] = ALLOW_PATTERNS
) -> Finding:
    """Decide which detected regions count.

    Args:
        boxes: from :func:`detect_text`.
        phi_values: the file's own header values that identify the patient (see :func:`header_phi_values`);
            a region containing one always counts.
        allow: full-match patterns of labels that do not count (default :data:`ALLOW_PATTERNS`).

    Returns:
        A :class:`Finding` (counts and the counted boxes; no text).
    """
    tokens = phi_tokens(phi_values)
    counted: list[Box] = []
    allowed = phi = 0
    for tb in boxes:
        if matches_phi(tb.text, tokens):
            phi += 1
            counted.append(tb.box)
        elif is_allowed(tb.text, allow):
            allowed += 1
        else:
            counted.append(tb.box)
    return Finding(regions=len(boxes), allowed=allowed, counted=len(counted), phi=phi, boxes=tuple(counted))


def header_phi_values(ds: Any) -> tuple[str, ...]:
    """The values of :data:`PHI_KEYWORDS` present in a pydicom dataset, as strings (for :func:`classify`).

    Memory only: callers pass them straight to :func:`classify` / :func:`screen`.
    """
    values: list[str] = []
    for keyword in PHI_KEYWORDS:
        value = ds.get(keyword) if hasattr(ds, "get") else None
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        values.extend(str(v) for v in items if str(v).strip())
    return tuple(values)


# ==================================================================================================================
# Redaction
# ==================================================================================================================

def redact(image: np.ndarray, boxes: Iterable[Box | TextBox], margin_px: int = DEFAULT_MARGIN_PX) -> np.ndarray:
    """A copy of ``image`` with every box, grown by ``margin_px`` on each side, set to the image's minimum.

    The minimum is black for a bone-bright image; any dtype and shape (2-D or colour) is kept.

    Raises:
        ValueError: ``margin_px`` is negative.
    """
    if margin_px < 0:
        raise ValueError(f"margin_px={margin_px}: expected >= 0")
    out = np.array(image, copy=True)
    finite = out[np.isfinite(out)] if np.issubdtype(out.dtype, np.floating) else out
    fill = finite.min() if finite.size else 0
    height, width = out.shape[:2]
    for item in boxes:
        b = item.box if isinstance(item, TextBox) else item
        out[max(b.top - margin_px, 0):min(b.bottom + margin_px, height),
            max(b.left - margin_px, 0):min(b.right + margin_px, width)] = fill
    return out


def screen(
    image: np.ndarray,
    phi_values: Iterable[str] = (),
    *,
    policy: Policy = "quarantine",
    margin_px: int = DEFAULT_MARGIN_PX,
    allow: Sequence[str] = ALLOW_PATTERNS,
) -> Screening:
    """Detect, classify and (policy ``redact``) redact burned-in text in one decoded image.

    With ``redact``, the redacted image is OCR'd again; regions that still count are reported as ``residual`` and
    the image is then not :attr:`Screening.accepted` (quarantine it).

    Raises:
        ValueError: unknown ``policy``, or an image :func:`detect_text` rejects.
        OcrUnavailableError: the OCR library or its models are missing.
    """
    if policy not in POLICIES:
        raise ValueError(f"burned_in_text policy {policy!r}; expected one of {list(POLICIES)}")
    phi_values = tuple(phi_values)
    finding = classify(detect_text(image), phi_values, allow)
    if not finding.flagged or policy == "quarantine":
        return Screening(finding, image, redacted=False)
    cleaned = redact(image, finding.boxes, margin_px)
    residual = classify(detect_text(cleaned), phi_values, allow).counted
    return Screening(finding, cleaned, redacted=True, residual=residual)
