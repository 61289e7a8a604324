"""Synthetic AP lumbar spine DXA cohort with known ground truth (the embedded default data set).

No public labelled DXA image set exists, so the default cohort is simulated. Each scan is a physical-ish forward
model of an AP lumbar spine DXA bone image:

* anatomy in millimetres (so every pixel size gives the same field of view): T11-L5 vertebral bodies with a cortical
  shell and bright endplates, dark disc spaces, pedicles (bright oval rings), spinous and transverse processes,
  12th ribs, the sacrum and the iliac crests at the L4/L5 level;
* areal density (g/cm^2) per vertebra scaled so that the mean over the L1-L4 bodies equals the subject's BMD;
  trabecular bone is lost faster than cortical bone, so osteoporotic bodies look "framed" (bright rim, lucent core);
* trabecular texture whose spatial structure degrades with the T-score (a TBS-like signal: coarser, sparser,
  vertically striated trabeculae in osteoporosis) while its histogram does not change;
* a residual soft-tissue layer of varying thickness and structure (psoas shadows, bowel gas), blur,
  thickness-dependent quantum noise and scan-line striping; then a per-scan display gamma, gain and offset, so that
  whole-image brightness and contrast do not give the label (see :func:`shortcut_audit`);
* optional confounders: osteophytes and compression fractures (both raise apparent BMD, as in real AP spine DXA)
  and scoliotic curvature.

The body (vertebral sizes, pelvis, confounders, soft-tissue build) comes from a per-patient seed and the acquisition
(positioning, bowel gas, noise, display) from a per-scan seed, so a patient's follow-up scan shows the same spine:
splitting by scan instead of by patient would leak.

Public API: :func:`synthesize_cohort` (write a cohort of DICOM files and its truth CSV), :func:`render_scan` (one
image, uint16, MONOCHROME2 orientation), :func:`simulate_scan` (the same with the masks and acquisition factors
used by audits), :func:`render_banner_copy`, :func:`plot_examples` and :func:`shortcut_audit`.

The truth CSV never holds PHI: the fake patient identities exist in the DICOM headers (so that de-identification in
``ingest`` is exercised on every run) and, for a share of scans (``burned_in_fraction``), burned into the pixels of
an extra secondary-capture copy ``<class>/scan_NNNN_sc.dcm``: a vendor-style banner with the fake name, patient ID,
birth date and institution in a corner (so that ingest's burned-in text check is exercised too). Another share
(``level_label_fraction``) of the scans carries benign ``L1``-``L4`` labels beside the vertebral bodies, which that
check must let through. Both overlays draw from their own random streams, so every other draw, and every pixel
outside the drawn text, is what it was without them.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from scipy.ndimage import find_objects, gaussian_filter
from scipy.ndimage import label as label_components
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from spinedxa.config import ExternalCohortConfig, SynthesizeConfig
from spinedxa.task import WHO_CLASSES
from spinedxa.files import atomic_dir, atomic_path, write_text_atomic

log = logging.getLogger(__name__)

# --- Densitometry --------------------------------------------------------------------------------------------------
# Areal BMD of the young-adult reference on a Hologic-like scale (L1-L4, g/cm^2): mean ~1.07, SD ~0.11
# (project spec; Hologic's own L1-L4 young-adult female reference is of this size). T = (BMD - mean) / SD.
BMD_YOUNG_MEAN = 1.07
BMD_YOUNG_SD = 0.11
# WHO 1994 (Technical Report Series 843): osteoporosis T <= -2.5, osteopenia -2.5 < T < -1, normal T >= -1.
T_OSTEOPOROSIS = -2.5
T_OSTEOPENIA = -1.0
# Class-conditional T-score distributions (truncated normals). The osteoporosis mass sits near the threshold so that
# the two classes overlap in the image (level variation, texture, confounders) and the task is not separable.
T_RANGE = (-4.5, 1.5)
T_OSTEO_MEAN, T_OSTEO_SD = -3.1, 0.6
T_NORMAL_MEAN, T_NORMAL_SD = -1.0, 1.0
T_FOLLOWUP_DRIFT_SD = 0.12  # ~1-2 % BMD change per year (least significant change of DXA is ~3 %)

# Level-specific BMD relative to the L1-L4 mean: BMD rises caudally (Hologic level reports, L1 < L4).
LEVEL_BMD_FACTOR = {"T11": 0.88, "T12": 0.91, "L1": 0.94, "L2": 0.99, "L3": 1.02, "L4": 1.05, "L5": 1.03}
ROI_LEVELS = ("L1", "L2", "L3", "L4")  # the standard AP spine DXA region of interest

# --- Anatomy (mm, adult, before the per-subject habitus scale) -----------------------------------------------------
# (level, body half-width, body half-height, disc height below, transverse-process length beyond the body).
# Lumbar bodies are ~40-50 mm wide (a little more in the fan-beam projection) and ~25-28 mm tall; discs ~8-12 mm,
# thickest at L4/L5 (Zhou et al. 2000, Eur Spine J 9:242; Panjabi et al. 1992, Spine 17:299). L3 has the longest
# transverse processes.
VERTEBRAE: tuple[tuple[str, float, float, float, float], ...] = (
    ("T11", 17.5, 10.5, 6.0, 0.0),
    ("T12", 19.0, 11.0, 7.0, 4.0),
    ("L1", 21.5, 12.5, 8.0, 12.0),
    ("L2", 22.5, 13.0, 9.0, 16.0),
    ("L3", 24.0, 13.5, 10.0, 22.0),
    ("L4", 25.5, 13.5, 11.0, 17.0),
    ("L5", 26.5, 13.0, 10.0, 15.0),
)
CORTEX_MM = 1.3  # lateral cortical shell of a lumbar body, ~1 mm or less of compact bone plus the blurred rim
ENDPLATE_MM = 1.2
PSF_SIGMA_MM = 0.6  # fan-beam DXA resolves ~1 mm (FWHM ~1.4 mm)

# --- Acquisition ---------------------------------------------------------------------------------------------------
SOFT_STRUCTURE = (0.4, 4.0)  # per-scan scale of soft-tissue structure (psoas, gas, thickness), log-uniform
DISPLAY_GAMMA = (0.6, 1.7)  # range of the per-scan display gamma (log-uniform)
DISPLAY_TOP_G_CM2 = 2.5  # bone-equivalent density shown at the top of the display span (densest pixels ~2-2.5)
DISPLAY_SPAN = (0.08, 0.8)  # fraction of full scale spanned by 0..DISPLAY_TOP_G_CM2 (log-uniform)
TWELVE_BIT_SHARE = 0.3  # share of scans stored with BitsStored 12 (older exports); the rest use 16
RESCALE_SHARE = 0.2  # share of scans whose stored values are shifted and undone by a RescaleIntercept
MAX_FRACTION_OF_RANGE = 0.95  # rendered values stay below this fraction of full scale (headroom for the intercept)



@dataclass(frozen=True)
class Scanner:
    """What a scanner adds to the body it images: blur, quantum noise and the vendor's display processing.

    The default is the first cohort's scanner (the constants above); the external cohort's second scanner
    (``synthesize.external``) changes each of these, so its scans differ from the training cohort's the way another
    site's do, while the anatomy, the bone loss and the labels follow the same forward model.
    """

    psf_sigma_mm: float = PSF_SIGMA_MM
    noise_scale: float = 1.0
    display_gamma: tuple[float, float] = DISPLAY_GAMMA
    display_span: tuple[float, float] = DISPLAY_SPAN


DEFAULT_SCANNER = Scanner()

# --- Fake identities (PHI lives only in DICOM headers; never in the truth CSV) -------------------------------------
_FAMILY = ("DOE", "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "MARTIN", "MUELLER",
           "SCHMIDT", "ROSSI", "BIANCHI", "DUBOIS", "LEFEVRE", "NOWAK", "KOWALSKI", "SILVA", "SANTOS", "KHAN", "AHMED",
           "CHEN", "WANG", "TANAKA", "SATO", "KIM", "PARK", "NGUYEN", "OKAFOR", "MENSAH", "HANSEN", "NIELSEN",
           "JANSEN", "DE VRIES", "PETROV", "IVANOVA", "FISCHER", "WEBER", "BAKER")
_GIVEN_F = ("JANE", "MARY", "ANNA", "MARIA", "ELENA", "SOFIA", "HELEN", "MARGARET", "RUTH", "LINDA", "SUSAN", "FATIMA",
            "AISHA", "YUKI", "MEI", "GRACE", "INGRID", "ASTRID", "CLAIRE", "ROSA", "IRENE", "BARBARA", "NORA", "EVA")
_GIVEN_M = ("JOHN", "PETER", "JAMES", "DAVID", "MICHAEL", "THOMAS", "HANS", "LUCA", "PIERRE", "AHMED", "KENJI",
            "WEI", "OMAR", "JAN", "PAUL", "GEORGE")
_INSTITUTIONS = ("ST. EXAMPLE GENERAL HOSPITAL", "NORTHFIELD BONE HEALTH CLINIC", "RIVERSIDE MEDICAL CENTER",
                 "LAKEVIEW UNIVERSITY HOSPITAL", "MAPLE GROVE DIAGNOSTIC IMAGING")
_FEMALE_SHARE = 0.85  # DXA cohorts for osteoporosis are mostly post-menopausal women

# --- Text in the pixels (exercises ingest's burned-in text check, spinedxa.burnedin) -------------------------------
# Both overlays draw from their own streams, SeedSequence((seed, stream[, scan])), never from the plan, acquisition or
# anatomy streams, so adding them changes no other draw: the scans keep their bytes except where text is drawn.
BANNER_STREAM = 0x42414E  # "BAN": which scans get a burned-in banner copy, and each banner's layout
LABEL_STREAM = 0x4C424C  # "LBL": which scans carry level labels, and on which side
BANNER_SUFFIX = "_sc"  # the copy is <class>/scan_NNNN_sc.dcm, a secondary capture of scan_NNNN
# Banner font: 2.2-4.5 % of the image height (11-23 px at 512, as vendor captures at typical export sizes), never
# under 8 px (Pillow's Aileron at 8 px has 6 px capitals: legible to a person, and to OCR after ingest's resize).
BANNER_FONT_FRACTION = (0.022, 0.045)
MIN_FONT_PX = 8
LABEL_FONT_MM = 5.5  # level labels: ~5 mm capitals, like the L1-L4 annotations of DXA analysis software
LABEL_GAP_MM = 25.0  # from the body's lateral edge to the label: beyond the transverse processes (<= 22 mm, L3)
_DATE_STYLES = ("%d.%m.%Y", "%m/%d/%Y", "%Y-%m-%d", "%d-%b-%Y")
_BANNER_STYLES = ("plain", "dark_bar", "light_bar")  # white text on the image, white on black, black on white


@dataclass(frozen=True)
class FakeIdentity:
    """Fake but realistic PHI written into a scan's DICOM header (never anywhere else)."""

    patient_name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str
    institution: str
    referring_physician: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str
    age_years: int


@dataclass(frozen=True)
class ScanPlan:
    """Everything needed to render and write one scan; drawn up front so parallel rendering stays deterministic."""

    index: int  # 1-based scan number, also the neutral file name scan_0001
    class_name: str
    label: int
    subject: int
    visit: int
    t_score: float
    osteophyte: bool
    fracture: bool
    scoliosis_deg: float
    photometric: str
    bits_stored: int
    rescale_intercept: int
    identity: FakeIdentity
    seed: np.random.SeedSequence  # this scan's acquisition
    anatomy_seed: np.random.SeedSequence  # the patient's body, shared by both visits
    level_labels: bool = False  # L1-L4 labels drawn beside the bodies (benign annotation)
    burned_in: bool = False  # the scanner also exported a secondary capture with a burned-in PHI banner

    @property
    def scan_id(self) -> str:
        return f"scan_{self.index:04d}"

    @property
    def source(self) -> str:
        """Path of the DICOM file relative to the cohort directory (``normal/scan_0001.dcm``)."""
        return f"{self.class_name}/{self.scan_id}.dcm"

    @property
    def banner_source(self) -> str:
        """Path of the burned-in banner copy (``normal/scan_0001_sc.dcm``); written only when ``burned_in``."""
        return f"{self.class_name}/{self.scan_id}{BANNER_SUFFIX}.dcm"


@dataclass(frozen=True)
class SyntheticScan:
    """One rendered scan with the hidden quantities audits need.

    ``image`` is uint16 in MONOCHROME2 orientation (bone bright):
    ``image = offset + gain * (attenuation / DISPLAY_TOP_G_CM2) ** gamma`` before quantisation, with attenuation in
    g/cm^2 bone-equivalent. ``roi_mask`` covers the L1-L4 vertebral bodies and ``soft_mask`` bone-free paraspinal
    soft tissue at the same heights. ``soft_tissue`` is the mean soft-tissue residual (g/cm^2), ``noise_sd`` the
    per-pixel quantum noise SD (g/cm^2).
    """

    image: np.ndarray
    roi_mask: np.ndarray
    soft_mask: np.ndarray
    gain: float
    offset: float
    gamma: float
    soft_tissue: float
    noise_sd: float


# ==================================================================================================================
# Sampling
# ==================================================================================================================

def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """One draw, uniform in log space between ``bounds`` (for scale factors)."""
    return float(np.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def t_to_bmd(t_score: float | np.ndarray) -> float | np.ndarray:
    """Areal L1-L4 BMD (g/cm^2) for a T-score on the Hologic-like reference scale."""
    return BMD_YOUNG_MEAN + BMD_YOUNG_SD * t_score


def who_class(t_score: float) -> str:
    """WHO category of a T-score: ``normal`` | ``osteopenia`` | ``osteoporosis``."""
    if t_score <= T_OSTEOPOROSIS:
        return "osteoporosis"
    if t_score < T_OSTEOPENIA:
        return "osteopenia"
    return "normal"


def _truncated_normal(rng: np.random.Generator, mean: float, sd: float, low: float, high: float) -> float:
    """One draw from N(mean, sd) restricted to (low, high], by rejection (the bounds hold >= 50 % of the mass)."""
    while True:
        x = rng.normal(mean, sd)
        if low < x <= high:
            return float(x)


def sample_t_score(rng: np.random.Generator, osteoporotic: bool) -> float:
    """Draw a T-score from the class-conditional distribution (osteoporosis: [-4.5, -2.5]; else (-2.5, 1.5])."""
    if osteoporotic:
        return _truncated_normal(rng, T_OSTEO_MEAN, T_OSTEO_SD, T_RANGE[0] - 1e-9, T_OSTEOPOROSIS)
    # Half a thousandth above the threshold, so that the T-score rounded to 3 decimals keeps its class.
    return _truncated_normal(rng, T_NORMAL_MEAN, T_NORMAL_SD, T_OSTEOPOROSIS + 5e-4, T_RANGE[1])


def _followup_counts(n_scans: int, followup_fraction: float) -> int:
    """Number of patients with a second scan among ``n_scans`` scans: k / (n - k) = fraction."""
    return int(round(followup_fraction * n_scans / (1.0 + followup_fraction)))


def _identity(rng: np.random.Generator, patient_id: str, osteoporotic: bool) -> tuple[dict, dt.date]:
    """Draw the per-patient part of a fake identity and a baseline study date."""
    female = rng.random() < _FEMALE_SHARE
    given = _GIVEN_F if female else _GIVEN_M
    # Osteoporosis is a disease of age: older patients in the positive class (header only, never an image cue).
    age = int(np.clip(rng.normal(69 if osteoporotic else 58, 8), 40, 92))
    study = dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = study - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    person = {
        "patient_name": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{given[rng.integers(len(given))]}",
        "patient_id": patient_id,
        "birth_date": birth.strftime("%Y%m%d"),
        "sex": "F" if female else "M",
        "institution": _INSTITUTIONS[rng.integers(len(_INSTITUTIONS))],
        "referring_physician": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN_M[rng.integers(len(_GIVEN_M))]}^^^DR",
    }
    return person, study


def _visit_identity(rng: np.random.Generator, person: dict, study: dt.date) -> FakeIdentity:
    """The fake identity of one visit: the patient's fields plus this study's date, time, accession and age."""
    born = dt.datetime.strptime(person["birth_date"], "%Y%m%d").date()
    age = study.year - born.year - ((study.month, study.day) < (born.month, born.day))
    return FakeIdentity(
        **person,
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{rng.integers(7, 18):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}",
        accession=f"A{rng.integers(10**7, 10**8)}",
        age_years=age,
    )


def plan_cohort(cfg: SynthesizeConfig) -> list[ScanPlan]:
    """Draw every subject, visit, T-score, confounder, storage choice and fake identity from ``cfg.seed``.

    Binary class counts are exact (``n_osteoporosis`` scans with T <= -2.5, the rest above); each scan is filed in the
    folder of its WHO class (``normal/``, ``osteopenia/``, ``osteoporosis/``: :func:`who_class` of its T-score), as
    real cohorts come, so the task's label map (``data.class_map``) decides what osteopenia is. A share of the
    patients (``followup_fraction`` of them) has a follow-up scan that keeps the patient's binary class, identity and
    confounders while the T-score drifts a little (it may cross the osteopenia boundary). Scan numbers are assigned in
    shuffled order, so neither the file name nor the subject number reveals the class.
    """
    # Independent streams: the plan, each scan's acquisition, each patient's anatomy (SeedSequence.spawn), so any
    # scan can be rendered alone, in any process, with the same bytes.
    plan_seq, scan_seq, patient_seq = np.random.SeedSequence(cfg.seed).spawn(3)
    rng = np.random.default_rng(plan_seq)

    patients: list[dict] = []
    for label, n_class in ((1, cfg.n_osteoporosis), (0, cfg.n_scans - cfg.n_osteoporosis)):
        n_follow = _followup_counts(n_class, cfg.followup_fraction)
        for k in range(n_class - n_follow):
            patients.append({"label": label, "visits": 2 if k < n_follow else 1})
    order = rng.permutation(len(patients))
    patients = [patients[i] for i in order]
    mrns = 1_000_000 + rng.choice(9_000_000, size=len(patients), replace=False)  # unique 7-digit record numbers

    anatomy_seeds = patient_seq.spawn(len(patients))
    scans: list[dict] = []
    for subject, patient in enumerate(patients, start=1):
        label = patient["label"]
        t0 = sample_t_score(rng, bool(label))
        # Confounders are patient properties drawn independently of the label, so none becomes a shortcut.
        osteophyte = bool(rng.random() < cfg.osteophyte_rate)
        fracture = bool(rng.random() < cfg.fracture_rate)
        scoliosis = float(np.round(rng.uniform(10.0, 30.0), 1)) if rng.random() < cfg.scoliosis_rate else 0.0
        person, study = _identity(rng, f"{mrns[subject - 1]:07d}", bool(label))
        t = t0
        for visit in range(1, patient["visits"] + 1):
            if visit > 1:
                study = study + dt.timedelta(days=int(rng.integers(330, 800)))
                lo, hi = (T_RANGE[0], T_OSTEOPOROSIS) if label else (T_OSTEOPOROSIS + 1e-3, T_RANGE[1])
                t = float(np.clip(t + rng.normal(-0.05, T_FOLLOWUP_DRIFT_SD), lo, hi))
            bits = 12 if rng.random() < TWELVE_BIT_SHARE else 16
            intercept = -(2 ** (bits - 5)) if rng.random() < RESCALE_SHARE else 0  # 3 % of full scale
            scans.append({
                "class_name": who_class(round(t, 3)), "label": label, "subject": subject, "visit": visit,
                "t_score": round(t, 3), "osteophyte": osteophyte, "fracture": fracture, "scoliosis_deg": scoliosis,
                "photometric": "MONOCHROME1" if rng.random() < cfg.monochrome1_fraction else "MONOCHROME2",
                "bits_stored": bits, "rescale_intercept": intercept,
                "identity": _visit_identity(rng, person, study), "anatomy_seed": anatomy_seeds[subject - 1],
            })
    scan_order = rng.permutation(len(scans))
    seeds = scan_seq.spawn(len(scans))
    plans = [ScanPlan(index=i + 1, seed=seeds[i], **scans[j]) for i, j in enumerate(scan_order)]
    # Overlays last, from their own streams (see BANNER_STREAM): exact counts, chosen independently of everything else.
    banner = _chosen(cfg.seed, BANNER_STREAM, len(plans), cfg.burned_in_fraction)
    labels = _chosen(cfg.seed, LABEL_STREAM, len(plans), cfg.level_label_fraction)
    return [replace(p, level_labels=k in labels, burned_in=k in banner) for k, p in enumerate(plans)]


def _chosen(seed: int, stream: int, n: int, fraction: float) -> set[int]:
    """``round(fraction * n)`` distinct indices out of ``range(n)``, drawn from the stream ``(seed, stream)``."""
    rng = np.random.default_rng(np.random.SeedSequence((seed, stream)))
    return {int(i) for i in rng.choice(n, size=int(round(fraction * n)), replace=False)}


# ==================================================================================================================
# Rendering
# ==================================================================================================================

@dataclass(frozen=True)
class _Grid:
    """Pixel grid with millimetre coordinates of pixel centres."""

    height: int
    width: int
    spacing: float

    def window(
        self, cy: float, cx: float, ry: float, rx: float, *, clip: bool = True
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """Slices of the window of half-sizes (ry, rx) mm around (cy, cx) and its row / column mm coordinates.

        With ``clip=False`` the window may reach beyond the image (see :meth:`overlap`).
        """
        s = self.spacing
        r0, r1 = int(math.floor((cy - ry) / s)), int(math.ceil((cy + ry) / s)) + 1
        c0, c1 = int(math.floor((cx - rx) / s)), int(math.ceil((cx + rx) / s)) + 1
        if clip:
            r0, r1, c0, c1 = max(r0, 0), min(r1, self.height), max(c0, 0), min(c1, self.width)
            r0, c0 = min(r0, r1), min(c0, c1)
        # float32 throughout the renderer: twice as fast, and far finer than 16-bit output needs.
        y = ((np.arange(r0, r1, dtype=np.float32) + 0.5) * np.float32(s))[:, None]
        x = ((np.arange(c0, c1, dtype=np.float32) + 0.5) * np.float32(s))[None, :]
        return (slice(r0, r1), slice(c0, c1)), y, x

    def overlap(self, sl: tuple[slice, slice]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """For an unclipped window: (slices into the image, slices into the window) of their intersection."""
        (rows, cols) = sl
        r0, r1 = min(max(rows.start, 0), self.height), min(max(rows.stop, 0), self.height)
        c0, c1 = min(max(cols.start, 0), self.width), min(max(cols.stop, 0), self.width)
        image = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
        local = (slice(r0 - rows.start, max(r0, r1) - rows.start), slice(c0 - cols.start, max(c0, c1) - cols.start))
        return image, local


@dataclass(frozen=True)
class _Vertebra:
    level: str
    cy: float
    cx: float
    angle: float  # radians, positive = clockwise tilt in the image
    a: float  # body half-width, mm
    b: float  # body half-height, mm
    disc: float  # disc height below, mm
    tp: float  # transverse process length, mm


def _texture_params(t_score: float, pat: np.random.Generator) -> tuple[float, float, float, float]:
    """TBS-like trabecular texture parameters for a T-score.

    Degraded microarchitecture shows as fewer, coarser grey-level variations (low TBS; Silva et al. 2014, J Bone Miner
    Res 29:518) and as vertical striation, because horizontal trabeculae are lost first (the classic radiographic sign
    of vertebral osteoporosis). Cortical bone is lost more slowly than trabecular bone, so the cortical share of areal
    BMD rises with bone loss ("framed" vertebrae). A per-patient jitter keeps the mapping from being exact.

    Returns:
        (grain sigma mm, vertical/horizontal anisotropy, modulation depth, cortical share)
    """
    q = float(np.clip((T_RANGE[1] - t_score) / (T_RANGE[1] - T_RANGE[0]), 0.0, 1.0))  # 0 healthy .. 1 severe
    qt = float(np.clip(q + pat.normal(0.0, 0.1), 0.0, 1.0))
    depth = pat.uniform(0.2, 0.32)  # independent of T: the histogram of the texture must not give the label
    share = 0.30 + 0.07 * q + pat.normal(0.0, 0.03)
    return 0.8 + 1.2 * qt, 1.0 + 1.5 * qt, depth, share


def _layout(pat: np.random.Generator, acq: np.random.Generator, grid: _Grid, scoliosis_deg: float,
            fracture_level: str | None) -> list[_Vertebra]:
    """Place T11-L5 along a (possibly scoliotic) spine axis: sizes from the patient, position from the visit."""
    habitus = pat.uniform(0.8, 1.2)
    fov_h, fov_w = grid.height * grid.spacing, grid.width * grid.spacing
    heights, widths, processes, tilts = [], [], [], []
    for level, a, b, disc, tp in VERTEBRAE:
        b_eff = b * habitus * (pat.uniform(0.6, 0.8) if level == fracture_level else pat.uniform(0.96, 1.04))
        heights.append((2 * b_eff, disc * habitus * pat.uniform(0.85, 1.15)))
        widths.append(a * habitus * pat.uniform(0.96, 1.04))
        processes.append(tp * habitus * pat.uniform(0.8, 1.2))
        tilts.append(math.radians(pat.normal(0.0, 1.0)))
    direction = 1.0 if pat.random() < 0.5 else -1.0  # side of the scoliotic convexity
    # Cumulative centre positions (mm from the top of T11), then anchor the L2/L3 disc near mid-field.
    centres, y = [], 0.0
    for body, disc in heights:
        centres.append(y + body / 2)
        y += body + disc
    l2 = [v[0] for v in VERTEBRAE].index("L2")
    anchor = centres[l2] + heights[l2][0] / 2 + heights[l2][1] / 2
    shift = fov_h * 0.47 + acq.uniform(-0.12, 0.12) * fov_h - anchor  # scan start varies (T11 .. L1)
    centres = [c + shift for c in centres]
    x0 = fov_w / 2 + acq.uniform(-0.06, 0.06) * fov_w
    roll = math.radians(acq.normal(0.0, 1.5))  # patient not perfectly aligned with the scan axis
    # Scoliosis: a single C-curve x(y) = A sin(pi (y - top) / span); the end tilts are +-theta, Cobb angle = 2 theta.
    top, span = centres[0], centres[-1] - centres[0]
    amp = direction * math.tan(math.radians(scoliosis_deg / 2)) * span / math.pi
    out = []
    for i, (level, *_rest) in enumerate(VERTEBRAE):
        phase = math.pi * (centres[i] - top) / span
        cx = x0 + amp * math.sin(phase) + (centres[i] - fov_h / 2) * math.tan(roll)
        angle = -math.atan(amp * math.pi / span * math.cos(phase)) + roll + tilts[i]
        out.append(_Vertebra(level, centres[i], cx, angle, widths[i], heights[i][0] / 2, heights[i][1], processes[i]))
    return out


def _ellipse_ring(u: np.ndarray, v: np.ndarray, ru: float, rv: float, rim: float) -> np.ndarray:
    """Filled ellipse (value 0.5) with a bright rim (value ~1): a tube of cortical bone seen end-on."""
    r = np.sqrt((u / ru) ** 2 + (v / rv) ** 2)
    return 0.5 * (r < 1.0) + np.exp(-(((r - 1.0) / rim) ** 2))


def _draw_vertebra(
    grid: _Grid, vert: _Vertebra, bmd_level: float, texture: np.ndarray, cortical_share: float,
    bone: np.ndarray, roi: np.ndarray | None,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Add one vertebra's areal density (g/cm^2) to ``bone``; return its (clipped) window and body mask.

    The body is an elliptic cylinder seen along its AP axis: path length through it falls off as sqrt(1 - u^2)
    towards the lateral margins, where the cortical shell is seen tangentially (bright rim); the endplates are seen
    edge-on (bright lines). Trabecular and cortical parts are scaled so that their mean over the body equals
    ``bmd_level`` with the given cortical share (AP spine BMD includes the overlapping posterior elements).
    """
    a, b = vert.a, vert.b
    cos, sin = math.cos(vert.angle), math.sin(vert.angle)
    half_u, half_v = a + vert.tp + 4.0, b + vert.disc + 4.0  # local half-extents, then the rotated bounding box
    # Unclipped, so that a vertebra cut by the image edge keeps its true density.
    window, y, x = grid.window(vert.cy, vert.cx, abs(half_u * sin) + abs(half_v * cos),
                               abs(half_u * cos) + abs(half_v * sin), clip=False)
    dy, dx = y - vert.cy, x - vert.cx
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # lateral, caudal (local frame)

    # Concave lateral waist; endplates slightly wider than mid-body.
    a_eff = a * (1.0 - 0.07 * (1.0 - np.clip(v / b, -1, 1) ** 2))
    body = (np.abs(v) <= b) & (np.abs(u) < a_eff)
    d_full = np.sqrt(np.clip(1.0 - (u / a_eff) ** 2, 0.0, 1.0)) * body
    a_in, b_in = a_eff - CORTEX_MM, b - ENDPLATE_MM
    inner = (np.abs(v) <= b_in) & (np.abs(u) < a_in)
    trab = (a_in / a_eff) * np.sqrt(np.clip(1.0 - (u / a_in) ** 2, 0.0, 1.0)) * inner
    cort = d_full - trab

    # Posterior elements, in units of the full body depth (they are thinner than the body but mostly cortical).
    post = np.zeros_like(u)
    for side in (-1.0, 1.0):
        post += 0.35 * _ellipse_ring(u - side * 0.6 * a, v + 0.38 * b, 0.17 * a, 0.27 * b, 0.22)  # pedicles
        if vert.tp > 0:  # transverse process: a bar from the pedicle outwards, tapering to a rounded tip
            along = side * u - 0.55 * a
            length = 0.45 * a + vert.tp
            inside = np.clip(along / length, 0.0, 1.0)
            half = 4.5 * (1.0 - 0.4 * inside)
            tp = np.exp(-(((v + 0.2 * b) / half) ** 2)) * (along > 0) * (along < length) * (1.0 - 0.5 * inside)
            post += 0.1 * tp
    spin_v = 0.55 * b + 0.4 * vert.disc  # spinous process: a teardrop overlapping the lower body and disc below
    post += 0.22 * _ellipse_ring(u, v - spin_v, 0.13 * a, 0.45 * b + 0.4 * vert.disc, 0.3)
    post += 0.07 * np.exp(-((np.abs(u) - 0.35 * a) / (0.12 * a)) ** 2) * (np.abs(v - 0.1 * b) < 0.5 * b)  # laminae

    n_body = max(int(body.sum()), 1)
    rho_t = (1.0 - cortical_share) * bmd_level / max(float(trab[body].sum()) / n_body, 1e-6)
    rho_c = cortical_share * bmd_level / max(float((cort + post)[body].sum()) / n_body, 1e-6)
    sl, local = grid.overlap(window)
    bone[sl] += rho_t * trab[local] * texture[sl] + rho_c * (cort + post)[local]  # texture has mean 1
    if roi is not None:
        roi[sl] |= body[local]
    return sl, body[local]


def _draw_osteophytes(grid: _Grid, vert: _Vertebra, pat: np.random.Generator, bmd: float, bone: np.ndarray) -> None:
    """Bony spurs at the lateral endplate corners: they add density and falsely raise AP spine BMD (ISCD)."""
    cos, sin = math.cos(vert.angle), math.sin(vert.angle)
    for side in (-1.0, 1.0):
        for end in (-1.0, 1.0):
            present, length, density = pat.random() < 0.5, pat.uniform(3.0, 8.0), pat.uniform(0.5, 0.9)
            if not present:
                continue
            cu, cv = side * (vert.a * 0.98 + length * 0.4), end * (vert.b - 1.0)
            cy = vert.cy + cu * sin + cv * cos
            cx = vert.cx + cu * cos - cv * sin
            sl, y, x = grid.window(cy, cx, length + 4.0, length + 4.0)
            du, dv = (x - cx) * cos + (y - cy) * sin, -(x - cx) * sin + (y - cy) * cos
            # A beak that curls towards the disc: elongated laterally, slanted towards the neighbouring endplate.
            spur = np.exp(-((du / length) ** 2 + ((dv + end * 0.35 * du * side) / 2.2) ** 2) * 2.0)
            bone[sl] += density * bmd * spur


def _draw_pelvis_and_ribs(grid: _Grid, verts: list[_Vertebra], bmd: float, pat: np.random.Generator,
                          bone: np.ndarray) -> None:
    """Iliac wings with their crests at the L4/L5 level, the top of the sacrum, and the 12th ribs."""
    by_level = {v.level: v for v in verts}
    l4, l5, t12 = by_level["L4"], by_level["L5"], by_level["T12"]
    fov_h = grid.height * grid.spacing
    # Iliac wings: large ellipses whose upper rim (the crest) rises to about the L4/L5 disc.
    for side in (-1.0, 1.0):
        cx = l5.cx + side * (l5.a + pat.uniform(62.0, 80.0))
        cy = l5.cy + pat.uniform(45.0, 60.0)
        rx, ry = pat.uniform(62.0, 75.0), (cy - (l5.cy - l5.b - 0.5 * l4.disc)) * pat.uniform(0.95, 1.05)
        sl, y, x = grid.window(cy, cx, ry + 3.0, rx + 3.0)
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        wing = np.clip((1.0 - r) / 0.08, 0.0, 1.0) * 0.28 + np.exp(-(((r - 0.985) / 0.035) ** 2)) * 0.5
        bone[sl] += bmd * wing * (side * (x - l5.cx) > l5.a * 0.9)
    # Sacrum: a wide, moderately dense wedge below the L5/S1 disc, fading caudally.
    top = l5.cy + l5.b + l5.disc
    sl, y, x = grid.window((top + fov_h) / 2, l5.cx, max(fov_h - top, 0.0) / 2 + 1.0, 1.3 * l5.a)
    depth = np.clip((y - top) / 60.0, 0.0, None)
    half = l5.a * (1.2 - 0.6 * np.clip(depth, 0, 1))
    edge = np.clip((half - np.abs(x - l5.cx)) / 4.0, 0.0, 1.0) * np.clip((y - top) / 4.0, 0.0, 1.0)
    bone[sl] += 0.4 * bmd * edge * np.exp(-depth)
    # 12th ribs: thin bands from the T12 transverse region laterally and downwards, fading towards their tips.
    for side in (-1.0, 1.0):
        angle = math.radians(pat.uniform(20.0, 40.0))
        x0, y0 = t12.cx + side * (t12.a * 0.9), t12.cy - 0.2 * t12.b
        ux, uy = side * math.cos(angle), math.sin(angle)
        length = pat.uniform(50.0, 100.0)
        x1, y1 = x0 + length * ux, y0 + length * uy
        sl, y, x = grid.window((y0 + y1) / 2, (x0 + x1) / 2, abs(y1 - y0) / 2 + 8.0, abs(x1 - x0) / 2 + 8.0)
        along = np.clip((x - x0) * ux + (y - y0) * uy, 0.0, length)
        dist = np.hypot(x - (x0 + along * ux), y - (y0 + along * uy))
        bone[sl] += 0.25 * bmd * np.exp(-((dist / 3.5) ** 2)) * (1.0 - 0.7 * along / length)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    """A Gaussian blob as the outer product of two 1-D profiles (cheap on a full image)."""
    return np.exp(-(((yy - cy) / sy) ** 2)) * np.exp(-(((xx - cx) / sx) ** 2))


def _soft_tissue(grid: _Grid, verts: list[_Vertebra], pat: np.random.Generator, acq: np.random.Generator,
                 yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, float]:
    """Residual soft tissue left in the bone image (g/cm^2 bone-equivalent) and its mean level.

    Dual-energy subtraction leaves a residual that grows with the thickness and fat fraction of the abdomen, is
    thicker at the midline, shows the psoas muscles along the spine and is lucent where bowel gas lies. The body
    (level, structure, psoas, thickness variations) belongs to the patient; bowel gas and weight change per visit.
    """
    fov_w, fov_h = grid.width * grid.spacing, grid.height * grid.spacing
    level = pat.uniform(0.12, 0.6) * acq.uniform(0.95, 1.05)
    structure = _log_uniform(pat, SOFT_STRUCTURE)
    psoas_amp = pat.uniform(0.03, 0.09)
    broad = [(pat.uniform(0.0, fov_h), pat.uniform(0.0, fov_w), pat.uniform(40.0, 90.0), pat.normal(0.0, 0.04))
             for _ in range(3)]
    spine_x = np.interp(yy[:, 0], [v.cy for v in verts], [v.cx for v in verts])[:, None]
    soft = level + structure * 0.3 * level * (1.0 - ((xx - spine_x) / (0.9 * fov_w)) ** 2)
    # Psoas: two bands diverging caudally from L1, lateral to the bodies.
    l1, l5 = verts[2], verts[-1]
    ramp = np.clip((yy - l1.cy) / (l5.cy - l1.cy), 0.0, 1.2)
    offset = l1.a + 4.0 + 28.0 * ramp
    psoas = np.exp(-(((np.abs(xx - spine_x) - offset) / (9.0 + 8.0 * ramp)) ** 2)) * (yy > l1.cy - 10.0)
    soft += structure * psoas_amp * psoas
    for cy, cx, s, amp in broad:  # slow thickness variations
        soft += structure * amp * _blob(yy, xx, cy, cx, s, s)
    for _ in range(int(acq.integers(2, 9))):  # bowel gas (lucent)
        cy, cx = acq.uniform(0.25, 1.0) * fov_h, acq.uniform(0.0, 1.0) * fov_w
        sy, sx, amp = acq.uniform(6.0, 20.0), acq.uniform(6.0, 25.0), acq.uniform(0.02, 0.12)
        soft -= structure * amp * _blob(yy, xx, cy, cx, sy, sx)
    return soft, level


def simulate_scan(
    rng: np.random.Generator,
    t_score: float,
    *,
    height: int,
    width: int,
    pixel_spacing_mm: float,
    bits_stored: int = 16,
    osteophyte: bool = False,
    fracture: bool = False,
    scoliosis_deg: float = 0.0,
    anatomy_rng: np.random.Generator | None = None,
    scanner: Scanner = DEFAULT_SCANNER,
) -> SyntheticScan:
    """Render one AP lumbar spine DXA scan and keep the masks and acquisition factors (see :class:`SyntheticScan`).

    Args:
        rng: the scan's own generator (consumed in a fixed order: same state, same image).
        t_score: the subject's T-score; BMD follows from :func:`t_to_bmd`.
        height, width: image size in pixels; pixel_spacing_mm: square pixel size (field of view = size x spacing).
        bits_stored: 12 or 16; the image uses up to 95 % of that range.
        osteophyte, fracture, scoliosis_deg: confounders (scoliosis as a Cobb angle in degrees, 0 = straight).
        anatomy_rng: the patient's generator for everything that belongs to the body (vertebral sizes, pelvis,
            confounder shapes, soft-tissue build), so that two visits of one patient share their anatomy;
            ``None`` draws the anatomy from ``rng`` too.
        scanner: the blur, noise and display processing of the scanner (:class:`Scanner`).

    Raises:
        ValueError: a size, spacing or bit depth outside the supported range.
    """
    if height < 32 or width < 32:
        raise ValueError(f"image size {height}x{width}: both sides must be at least 32 pixels")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel_spacing_mm {pixel_spacing_mm!r} must be > 0")
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored {bits_stored!r}: expected 12 or 16")
    pat, acq = (rng if anatomy_rng is None else anatomy_rng), rng
    grid = _Grid(height, width, float(pixel_spacing_mm))
    bmd = float(t_to_bmd(t_score))

    # Patient: geometry, microarchitecture, densities of each level and of the pelvis, confounders.
    fracture_level = str(pat.choice(["T12", "L1", "L1", "L2", "L3"])) if fracture else None  # thoracolumbar first
    fracture_gain = pat.uniform(0.15, 0.35)
    verts = _layout(pat, acq, grid, scoliosis_deg, fracture_level)
    sigma, aniso, depth, cortical_share = _texture_params(t_score, pat)
    level_bmd = {v.level: bmd * LEVEL_BMD_FACTOR[v.level] * pat.uniform(0.97, 1.03) for v in verts}
    # Spine and hip/pelvis densities are correlated but often discordant (r ~0.6-0.7 between sites).
    pelvis_bmd = bmd * float(np.exp(pat.normal(0.0, 0.15)))
    _, yy, xx = grid.window(height * grid.spacing / 2, width * grid.spacing / 2, height * grid.spacing,
                            width * grid.spacing)

    # Trabecular texture: Gaussian band-limited noise, coarser and more vertical when degraded. Its contrast is fixed
    # as seen through the scanner's blur, so bone loss changes the spatial structure (what TBS measures, a
    # variogram), not the histogram of the image.
    noise = gaussian_filter(acq.standard_normal((height, width), dtype=np.float32),
                            (sigma * aniso / grid.spacing, sigma / grid.spacing), mode="reflect")
    seen = float(gaussian_filter(noise, PSF_SIGMA_MM / grid.spacing, truncate=2.0).std())
    texture = 1.0 + depth * (noise - noise.mean()) / max(seen, 1e-9)

    bone = np.zeros((height, width), dtype=np.float32)
    roi = np.zeros((height, width), dtype=bool)
    for vert in verts:
        sl, body = _draw_vertebra(grid, vert, level_bmd[vert.level], texture, cortical_share, bone,
                                  roi if vert.level in ROI_LEVELS else None)
        if vert.level == fracture_level:
            # Compacted trabeculae and sclerotic endplates: a fractured body is denser (raises apparent BMD).
            bone[sl] += body * bone[sl] * fracture_gain
        if osteophyte and vert.level in ("L2", "L3", "L4", "L5") and pat.random() < 0.6:
            _draw_osteophytes(grid, vert, pat, bmd, bone)
    _draw_pelvis_and_ribs(grid, verts, pelvis_bmd, pat, bone)
    soft, soft_level = _soft_tissue(grid, verts, pat, acq, yy, xx)

    # Acquisition: blur, noise, striping, display processing.
    attenuation = gaussian_filter(bone + soft, scanner.psf_sigma_mm / grid.spacing, mode="nearest")
    # Quantum noise grows with patient thickness; per-pixel SD scales inversely with pixel size (fewer counts).
    noise_sd = acq.uniform(0.012, 0.03) * (1.0 + 1.5 * soft_level) * (0.5 / grid.spacing) * scanner.noise_scale
    attenuation += noise_sd * acq.standard_normal((height, width), dtype=np.float32)
    attenuation += 0.006 * acq.standard_normal((height, 1), dtype=np.float32)  # fan-beam scan-line striping

    full = 2**bits_stored - 1
    # Vendor display processing: a per-scan gamma on the bone image (monotone, so structure survives), then a
    # gain and offset. Together they make whole-image brightness and contrast uninformative about the label.
    gamma = _log_uniform(acq, scanner.display_gamma)
    display = (np.clip(attenuation, 0.0, None) / DISPLAY_TOP_G_CM2) ** gamma
    gain = full * _log_uniform(acq, scanner.display_span)  # exports use from a few hundred levels to most of the range
    offset = full * acq.uniform(0.01, MAX_FRACTION_OF_RANGE - 0.02 - gain / full)
    image = np.clip(np.rint(offset + gain * display), 0, MAX_FRACTION_OF_RANGE * full).astype(np.uint16)

    # Audit masks: L1-L4 bodies, and bone-free soft tissue within 80 mm of the spine at the same heights.
    spine_x = np.interp(yy[:, 0], [v.cy for v in verts], [v.cx for v in verts])[:, None]
    bone_free = gaussian_filter(bone, 3.0 / grid.spacing, truncate=2.0) < 0.01
    soft_mask = roi.any(axis=1)[:, None] & bone_free & (np.abs(xx - spine_x) < 80.0)
    return SyntheticScan(image, roi, soft_mask, float(gain), float(offset), gamma, float(soft_level), float(noise_sd))


def render_scan(
    rng: np.random.Generator,
    t_score: float,
    *,
    height: int,
    width: int,
    pixel_spacing_mm: float,
    bits_stored: int = 16,
    osteophyte: bool = False,
    fracture: bool = False,
    scoliosis_deg: float = 0.0,
    anatomy_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render one AP lumbar spine DXA image: uint16, 2-D, MONOCHROME2 orientation (bone bright).

    Same arguments as :func:`simulate_scan`, which also returns the masks and the acquisition factors.
    """
    return simulate_scan(
        rng, t_score, height=height, width=width, pixel_spacing_mm=pixel_spacing_mm, bits_stored=bits_stored,
        osteophyte=osteophyte, fracture=fracture, scoliosis_deg=scoliosis_deg, anatomy_rng=anatomy_rng,
    ).image


# ==================================================================================================================
# Text in the pixels
# ==================================================================================================================

def _draw_text(image: np.ndarray, items: Sequence[tuple[float, float, str]], size: int, value: float) -> np.ndarray:
    """``image`` with each ``(x, y, text)`` drawn at ``size`` px in Pillow's built-in font, anti-aliased, at ``value``.

    ``(x, y)`` is the top-left corner of the text in pixels. Text beyond the image is clipped.
    """
    height, width = image.shape
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    font = ImageFont.load_default(size=size)  # Aileron Regular, embedded in Pillow >= 10.1 (no font files)
    for x, y, text in items:
        draw.text((x, y), text, fill=255, font=font)
    alpha = np.asarray(mask, dtype=np.float32) / 255.0
    out = image.astype(np.float32) * (1.0 - alpha) + np.float32(value) * alpha
    return np.rint(out).astype(image.dtype)


def _text_width(text: str, size: int) -> float:
    return float(ImageFont.load_default(size=size).getlength(text))


def draw_level_labels(image: np.ndarray, roi_mask: np.ndarray, pixel_spacing_mm: float, side: int,
                      bits_stored: int) -> np.ndarray:
    """Label the L1-L4 bodies as DXA analysis software does: ``L1``..``L4`` lateral to each body, at its height.

    ``roi_mask`` holds the four bodies (:class:`SyntheticScan`); they are labelled top to bottom. ``side`` is -1
    (image left) or +1 (image right). The labels are small, white, and outside the vertebral column. If the mask does
    not split into four bodies (tiny images), the rows of the ROI are split into four equal bands instead.
    """
    rows = np.flatnonzero(roi_mask.any(axis=1))
    if rows.size == 0:
        return image
    components, n = label_components(roi_mask)
    if n == len(ROI_LEVELS):
        spans = sorted(find_objects(components), key=lambda sl: sl[0].start)
    else:
        edges = np.linspace(rows[0], rows[-1] + 1, len(ROI_LEVELS) + 1).round().astype(int)
        cols = np.flatnonzero(roi_mask.any(axis=0))
        spans = [(slice(a, b), slice(cols[0], cols[-1] + 1)) for a, b in zip(edges[:-1], edges[1:])]
    size = max(MIN_FONT_PX, int(round(LABEL_FONT_MM / pixel_spacing_mm)))
    gap = LABEL_GAP_MM / pixel_spacing_mm
    items = []
    for level, (rs, cs) in zip(ROI_LEVELS, spans):
        y = (rs.start + rs.stop) / 2 - size * 0.6
        x = cs.start - gap - _text_width(level, size) if side < 0 else cs.stop + gap
        items.append((float(np.clip(x, 1, image.shape[1] - _text_width(level, size) - 1)), float(y), level))
    return _draw_text(image, items, size, MAX_FRACTION_OF_RANGE * (2**bits_stored - 1))


def banner_lines(identity: FakeIdentity, rng: np.random.Generator) -> list[str]:
    """The lines of a vendor-style burned-in banner: name, patient ID, birth date, institution (formats vary)."""
    family, given = identity.patient_name.split("^")[:2]
    born = dt.datetime.strptime(identity.birth_date, "%Y%m%d").date()
    name = (f"{family}, {given}", f"{given} {family}", f"{family}^{given}")[rng.integers(3)]
    name_tag = ("NAME: ", "PATIENT: ", "")[rng.integers(3)]
    id_tag = ("ID: ", "PATIENT ID: ", "MRN: ")[rng.integers(3)]
    birth_tag = ("DOB: ", "BIRTH DATE: ")[rng.integers(2)]
    birth = born.strftime(_DATE_STYLES[rng.integers(len(_DATE_STYLES))]).upper()
    return [f"{name_tag}{name}", f"{id_tag}{identity.patient_id}", f"{birth_tag}{birth}", identity.institution]


def _wrap(lines: Sequence[str], size: int, max_width: float) -> list[str]:
    """Break lines at spaces so that each fits ``max_width`` pixels (a word longer than that stays whole)."""
    out = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            trial = f"{current} {word}".strip()
            if current and _text_width(trial, size) > max_width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    return out


def draw_banner(image: np.ndarray, lines: Sequence[str], rng: np.random.Generator, bits_stored: int) -> np.ndarray:
    """Burn a text banner into a corner chosen by ``rng`` (font size and style too), as a scanner's screen capture.

    Styles: white text straight on the image, white text on a black bar, black text on a white bar.
    """
    height, width = image.shape
    corner = int(rng.integers(4))  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    size = max(MIN_FONT_PX, int(round(rng.uniform(*BANNER_FONT_FRACTION) * height)))
    style = _BANNER_STYLES[rng.integers(len(_BANNER_STYLES))]
    margin = max(2, size // 3)
    lines = _wrap(lines, size, width - 2 * margin)
    line_height = int(round(size * 1.3))
    text_width = max(_text_width(t, size) for t in lines)
    x0 = margin if corner in (0, 2) else width - margin - text_width
    y0 = margin if corner in (0, 1) else height - margin - line_height * len(lines)
    items = [(max(x0, 0.0), float(y0 + i * line_height), t) for i, t in enumerate(lines)]
    white = MAX_FRACTION_OF_RANGE * (2**bits_stored - 1)
    out = image.copy()
    if style != "plain":
        pad = margin // 2 + 1
        top, left = max(int(y0) - pad, 0), max(int(x0) - pad, 0)
        bottom = min(int(y0 + line_height * len(lines)) + pad, height)
        right = min(int(np.ceil(x0 + text_width)) + pad, width)
        out[top:bottom, left:right] = 0 if style == "dark_bar" else int(white)
    return _draw_text(out, items, size, white if style != "light_bar" else 0)


def _overlay_rng(cfg: SynthesizeConfig, stream: int, plan: ScanPlan) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((cfg.seed, stream, plan.index)))


# ==================================================================================================================
# DICOM
# ==================================================================================================================

def _uid(seed: int, *parts: object) -> str:
    """Deterministic UID from the cohort seed and a path of names (pydicom hashes the sources with SHA-512)."""
    return generate_uid(entropy_srcs=["spinedxa-synthetic", str(seed), *map(str, parts)])


def to_stored(image: np.ndarray, photometric: str, bits_stored: int, rescale_intercept: int) -> np.ndarray:
    """Stored pixel values for a MONOCHROME2-oriented image.

    MONOCHROME2: ``stored = image - intercept``; MONOCHROME1 stores inverted values, ``stored = full - image``,
    so its modality values (``stored + intercept``) are ``full + intercept - image``: low means bright bone.

    Raises:
        ValueError: unknown photometric interpretation, or values that do not fit ``bits_stored``.
    """
    full = 2**bits_stored - 1
    if photometric == "MONOCHROME2":
        stored = image.astype(np.int64) - rescale_intercept
    elif photometric == "MONOCHROME1":
        stored = full - image.astype(np.int64)
    else:
        raise ValueError(f"photometric {photometric!r}: expected MONOCHROME1 or MONOCHROME2")
    if stored.min() < 0 or stored.max() > full:
        raise ValueError(f"stored values [{stored.min()}, {stored.max()}] do not fit BitsStored {bits_stored}")
    return stored.astype(np.uint16)


def build_dataset(plan: ScanPlan, image: np.ndarray, cohort_seed: int, pixel_spacing_mm: float,
                  *, capture: bool = False) -> pydicom.Dataset:
    """A Secondary Capture DICOM dataset (Modality BMD, explicit VR little endian) with fake PHI for one scan.

    ``capture=True``: the scan's burned-in banner copy, same study and header PHI, its own series and instance
    (``BurnedInAnnotation`` is left unset, as in the vendor files that motivate the pixel check).
    """
    who = plan.identity
    extra = ("capture",) if capture else ()
    study_uid = _uid(cohort_seed, "study", plan.subject, plan.visit)
    series_uid = _uid(cohort_seed, "series", plan.subject, plan.visit, *extra)
    sop_uid = _uid(cohort_seed, "sop", plan.subject, plan.visit, *extra)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = who.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = who.study_time
    ds.AccessionNumber = who.accession
    ds.Modality = "BMD"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "SYNTHETIC"
    ds.ManufacturerModelName = "spinedxa forward model"
    ds.InstitutionName = who.institution
    ds.ReferringPhysicianName = who.referring_physician
    ds.StudyDescription = "DXA LUMBAR SPINE"
    ds.SeriesDescription = "AP Spine L1-L4" + (" screen capture" if capture else "")
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = who.sex
    ds.PatientAge = f"{who.age_years:03d}Y"
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "AP"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{plan.visit}"
    ds.SeriesNumber = 2 if capture else 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # AP view as a radiograph: columns run to the patient's left, rows to the feet
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]

    stored = to_stored(image, plan.photometric, plan.bits_stored, plan.rescale_intercept)
    ds.set_pixel_data(stored, plan.photometric, plan.bits_stored, generate_instance_uid=False)
    ds.RescaleIntercept = plan.rescale_intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    # A display window as a modality would set it: 0.5-99.5th percentile of the modality values.
    modality = stored.astype(np.int64) + plan.rescale_intercept
    lo, hi = np.percentile(modality, [0.5, 99.5])
    ds.WindowCenter = int(round((lo + hi) / 2))
    ds.WindowWidth = max(int(round(hi - lo)), 1)
    return ds


# ==================================================================================================================
# Cohort
# ==================================================================================================================

TRUTH_COLUMNS = (
    "source", "subject", "visit", "t_score", "bmd_g_cm2", "who_class", "label", "osteophyte", "fracture",
    "scoliosis_deg", "photometric",
    # Text in the pixels: benign L1-L4 labels; a burned-in PHI banner (the *_sc.dcm copies, same label/subject/visit).
    "level_labels", "burned_in",
    # Nuisance ground truth and per-scan statistics for the shortcut audit (see shortcut_audit).
    "bits_stored", "rescale_intercept", "gain", "offset", "gamma", "soft_tissue", "noise_sd",
    "audit_mean", "audit_std", "audit_window_mean", "audit_window_std", "audit_body_signal",
)


def _scan_statistics(scan: SyntheticScan) -> dict[str, float]:
    """Whole-image statistics (raw and percentile-windowed) and the gain-normalised L1-L4 bone signal.

    All on the MONOCHROME2-oriented modality values, i.e. what a reader sees after undoing MONOCHROME1 inversion.
    The body signal is NaN when no bone-free soft tissue lies beside L1-L4 (possible only in tiny images).
    """
    img = scan.image.astype(np.float64)
    lo, hi = np.percentile(img, [1.0, 99.0])
    windowed = np.clip((img - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    calibrated = DISPLAY_TOP_G_CM2 * np.clip((img - scan.offset) / scan.gain, 0.0, None) ** (1.0 / scan.gamma)
    soft = float(calibrated[scan.soft_mask].mean()) if scan.soft_mask.any() else float("nan")
    return {
        "audit_mean": float(img.mean()), "audit_std": float(img.std()),
        "audit_window_mean": float(windowed.mean()), "audit_window_std": float(windowed.std()),
        # Bone minus the neighbouring soft-tissue baseline: the DXA principle, here with the known gain.
        "audit_body_signal": float(calibrated[scan.roi_mask].mean()) - soft,
    }


def _forward(plan: ScanPlan, cfg: SynthesizeConfig, scanner: Scanner = DEFAULT_SCANNER) -> SyntheticScan:
    """The forward model's scan for a plan (no text drawn)."""
    return simulate_scan(
        np.random.default_rng(plan.seed), plan.t_score, height=cfg.height, width=cfg.width,
        pixel_spacing_mm=cfg.pixel_spacing_mm, bits_stored=plan.bits_stored, osteophyte=plan.osteophyte,
        fracture=plan.fracture, scoliosis_deg=plan.scoliosis_deg, anatomy_rng=np.random.default_rng(plan.anatomy_seed),
        scanner=scanner,
    )


def _labelled(plan: ScanPlan, cfg: SynthesizeConfig, scan: SyntheticScan) -> np.ndarray:
    """The image written to ``plan.source``: the scan, with level labels when ``plan.level_labels``."""
    if not plan.level_labels:
        return scan.image
    side = -1 if _overlay_rng(cfg, LABEL_STREAM, plan).random() < 0.5 else 1
    return draw_level_labels(scan.image, scan.roi_mask, cfg.pixel_spacing_mm, side, plan.bits_stored)


def _render_plan(plan: ScanPlan, cfg: SynthesizeConfig, scanner: Scanner = DEFAULT_SCANNER) -> SyntheticScan:
    """The scan as written to ``plan.source`` (level labels included), with the forward model's masks and factors."""
    scan = _forward(plan, cfg, scanner)
    return replace(scan, image=_labelled(plan, cfg, scan))


def render_banner_copy(plan: ScanPlan, cfg: SynthesizeConfig, image: np.ndarray | None = None,
                       scanner: Scanner = DEFAULT_SCANNER) -> np.ndarray:
    """The pixels of a scan's burned-in banner copy: the scan as written (``image``, else re-rendered), plus its
    banner (fake PHI in a corner)."""
    image = _render_plan(plan, cfg, scanner).image if image is None else image
    rng = _overlay_rng(cfg, BANNER_STREAM, plan)
    return draw_banner(image, banner_lines(plan.identity, rng), rng, plan.bits_stored)


def _make_scan(plan: ScanPlan, cfg: SynthesizeConfig, out_dir: Path,
               scanner: Scanner = DEFAULT_SCANNER) -> list[dict[str, object]]:
    """Render, write and describe one scan, and its banner copy if it has one (runs in a worker process).

    The audit statistics describe the forward model's image, before any text is drawn: the text is chosen
    independently of the label, and level labels beside the spine would otherwise enter the soft-tissue baseline.
    """
    scan = _forward(plan, cfg, scanner)
    image = _labelled(plan, cfg, scan)
    path = out_dir / plan.source
    path.parent.mkdir(parents=True, exist_ok=True)
    build_dataset(plan, image, cfg.seed, cfg.pixel_spacing_mm).save_as(path, enforce_file_format=True)
    row = {
        "source": plan.source, "subject": plan.subject, "visit": plan.visit, "t_score": plan.t_score,
        "bmd_g_cm2": round(float(t_to_bmd(plan.t_score)), 4), "who_class": who_class(plan.t_score),
        "label": plan.label, "osteophyte": plan.osteophyte, "fracture": plan.fracture,
        "scoliosis_deg": plan.scoliosis_deg, "photometric": plan.photometric, "level_labels": plan.level_labels,
        "burned_in": False, "bits_stored": plan.bits_stored,
        "rescale_intercept": plan.rescale_intercept, "gain": scan.gain, "offset": scan.offset, "gamma": scan.gamma,
        "soft_tissue": scan.soft_tissue, "noise_sd": scan.noise_sd, **_scan_statistics(scan),
    }
    if not plan.burned_in:
        return [row]
    build_dataset(plan, render_banner_copy(plan, cfg, image, scanner), cfg.seed, cfg.pixel_spacing_mm, capture=True).save_as(
        out_dir / plan.banner_source, enforce_file_format=True)
    return [row, {**row, "source": plan.banner_source, "burned_in": True}]


def synthesize_cohort(
    cfg: SynthesizeConfig, out_dir: Path, truth_csv: Path, *, scanner: Scanner = DEFAULT_SCANNER, workers: int = 1
) -> pd.DataFrame:
    """Write the synthetic cohort as ``<out_dir>/<WHO class>/scan_NNNN.dcm`` and its ground truth to ``truth_csv``.

    The ``burned_in`` scans also get a banner copy ``<class>/scan_NNNN_sc.dcm`` (see :func:`render_banner_copy`).
    ``out_dir`` is replaced whole and atomically; ``truth_csv`` is written atomically. Scans are rendered by
    ``workers`` processes (``runtime.workers``); every scan has its own seed (SeedSequence spawn), so the bytes do not depend on the
    number of workers.

    Returns:
        The truth table (one row per file, sorted by ``source``; columns :data:`TRUTH_COLUMNS`): ``n_scans`` scans
        plus one row per banner copy, which has its scan's label, subject and visit and ``burned_in`` true.

    Raises:
        ValueError: invalid image geometry.
    """
    out_dir, truth_csv = Path(out_dir), Path(truth_csv)
    plans = plan_cohort(cfg)
    workers = max(1, min(workers, len(plans)))
    with atomic_dir(out_dir) as tmp:
        if workers == 1:
            per_scan = [_make_scan(p, cfg, tmp, scanner) for p in plans]
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                chunk = max(1, len(plans) // (4 * workers))
                n = len(plans)
                per_scan = list(pool.map(_make_scan, plans, [cfg] * n, [tmp] * n, [scanner] * n, chunksize=chunk))
    rows = [row for scan_rows in per_scan for row in scan_rows]
    truth = pd.DataFrame(rows, columns=list(TRUTH_COLUMNS)).sort_values("source", ignore_index=True)
    write_text_atomic(truth_csv, truth.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    scans = truth[~truth["burned_in"]]
    counts = ", ".join(f"{n} {name}" for name, n in scans["who_class"].value_counts().sort_index().items())
    log.info("synthesized %d scans (%s; %d with level labels) and %d burned-in banner copies into %s", len(scans),
             counts, int(scans["level_labels"].sum()), int(truth["burned_in"].sum()), out_dir)
    return truth


def external_cohort(cfg: SynthesizeConfig) -> tuple[SynthesizeConfig, Scanner] | None:
    """The external cohort's configuration and scanner: ``cfg`` with the ``synthesize.external`` block applied
    (its own seed, size, prevalence, pixel size and MONOCHROME1 share) and the second scanner; None without one."""
    ext: ExternalCohortConfig | None = cfg.external
    if ext is None:
        return None
    cohort = replace(cfg, seed=ext.seed, n_scans=ext.n_scans, n_osteoporosis=ext.n_osteoporosis,
                     pixel_spacing_mm=ext.pixel_spacing_mm, monochrome1_fraction=ext.monochrome1_fraction,
                     external=None)
    scanner = Scanner(psf_sigma_mm=ext.psf_sigma_mm, noise_scale=ext.noise_scale,
                      display_gamma=tuple(ext.display_gamma), display_span=tuple(ext.display_span))
    return cohort, scanner


# ==================================================================================================================
# Figure and audit
# ==================================================================================================================

def plot_examples(cfg: SynthesizeConfig, path: Path, per_class: int = 4, scanner: Scanner = DEFAULT_SCANNER,
                  title: str = "Synthetic AP lumbar spine DXA (display orientation)") -> None:
    """Save a PNG grid with the first ``per_class`` scans of each WHO class present (one row per class), bone bright.

    The scans are re-rendered from their seeds (identical to the files). Uses matplotlib's object API (no pyplot,
    so no GUI backend and no global state).
    """
    plans = plan_cohort(cfg)
    classes = [c for c in WHO_CLASSES if any(p.class_name == c for p in plans)]
    rows = [[p for p in plans if p.class_name == name][:per_class] for name in classes]
    fig = Figure(figsize=(2.2 * per_class, 2.9 * len(classes)))
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for r, (name, chosen) in enumerate(zip(classes, rows)):
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(chosen):
                continue
            plan = chosen[c]
            img = _render_plan(plan, cfg, scanner).image.astype(np.float64)
            lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            extras = [n for n, on in (("osteophyte", plan.osteophyte), ("fracture", plan.fracture),
                                      ("scoliosis", plan.scoliosis_deg > 0)) if on]
            ax.set_title(f"{plan.scan_id} [{name}]\nT={plan.t_score:+.1f} {who_class(plan.t_score)}"
                         + (f"\n{', '.join(extras)}" if extras else ""), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


@dataclass(frozen=True)
class ShortcutAudit:
    """Cross-validated ROC-AUCs of trivial shortcuts and the strength of the real bone signal."""

    auc_raw_mean_std: float  # logistic regression on whole-image mean and SD of the modality values
    auc_window_mean_std: float  # the same after a per-image 1-99 percentile window (what ingest-like scaling gives)
    auc_body_signal: float  # gain-normalised L1-L4 bone-minus-soft-tissue signal alone
    r_body_signal_bmd: float  # Pearson r of that signal with the true BMD

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


class AuditError(ValueError):
    """The cohort is too small for a cross-validated shortcut audit."""


AUDIT_FOLDS = 5


def shortcut_audit(truth: pd.DataFrame, seed: int = 0) -> ShortcutAudit:
    """Check that whole-image intensity statistics do not give the label while the bone signal is real.

    AUCs are out-of-fold (5-fold, stratified and grouped by subject so a patient's two scans stay together). The
    burned-in banner copies (``burned_in``) are left out: they repeat their scan and would weigh it twice.

    Raises:
        AuditError: a class has fewer than 5 subjects.
        KeyError: ``truth`` lacks the audit columns written by :func:`synthesize_cohort`.
    """
    if "burned_in" in truth:
        truth = truth[~truth["burned_in"].astype(bool)]
    per_class = truth.groupby("label")["subject"].nunique().reindex([0, 1], fill_value=0)
    if per_class.min() < AUDIT_FOLDS:
        raise AuditError(f"shortcut audit needs >= {AUDIT_FOLDS} subjects per class, got {per_class.to_dict()}")
    folds = StratifiedGroupKFold(n_splits=AUDIT_FOLDS, shuffle=True, random_state=seed)

    def cv_auc(frame: pd.DataFrame, columns: list[str]) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression())
        y = frame["label"].to_numpy()
        prob = cross_val_predict(model, frame[columns].to_numpy(), y, groups=frame["subject"].to_numpy(),
                                 cv=folds, method="predict_proba")[:, 1]
        return float(roc_auc_score(y, prob))

    body = truth.dropna(subset=["audit_body_signal"])  # NaN only where a tiny image has no paraspinal soft tissue
    return ShortcutAudit(
        auc_raw_mean_std=cv_auc(truth, ["audit_mean", "audit_std"]),
        auc_window_mean_std=cv_auc(truth, ["audit_window_mean", "audit_window_std"]),
        auc_body_signal=cv_auc(body, ["audit_body_signal"]),
        r_body_signal_bmd=float(np.corrcoef(body["audit_body_signal"], body["bmd_g_cm2"])[0, 1]),
    )
