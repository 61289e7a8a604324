"""Tests for spinedxa.burnedin: OCR of text burned into the pixels, the allow-list, PHI matching and redaction.

The text fixtures are drawn here with Pillow's built-in font on a synthetic 512 x 384 scan (the default export size;
render_scan), one OCR call each (~0.1-0.4 s on one core). The cohort test synthesizes 24 small scans with banner
copies and level labels and checks each file as ingest will.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from skimage.color import rgb2gray

from conftest import REPO, run
from spinedxa import burnedin
from spinedxa.burnedin import (
    ALLOW_PATTERNS,
    Box,
    Finding,
    TextBox,
    classify,
    detect_text,
    header_phi_values,
    is_allowed,
    matches_phi,
    phi_tokens,
    redact,
    screen,
)
from spinedxa.config import SynthesizeConfig
from spinedxa.imaging import decode_file
from spinedxa.synthesize import draw_level_labels, render_scan, simulate_scan, synthesize_cohort

# The fixture patient: header values (DICOM forms) and the banner that prints them.
PHI = ("DOE^JANE", "4821937", "19510314", "ST. EXAMPLE GENERAL HOSPITAL")
BANNER = ("DOE, JANE", "ID: 4821937", "DOB: 14.03.1951", "ST. EXAMPLE GENERAL HOSPITAL")
PHI_STRINGS = ("DOE", "JANE", "4821937", "1951", "HOSPITAL")  # none may be readable after redaction
H, W = 512, 384


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    """A clean synthetic AP spine scan, uint16, bone bright."""
    return render_scan(np.random.default_rng(5), -2.2, height=H, width=W, pixel_spacing_mm=0.5)


def with_text(image: np.ndarray, lines=BANNER, corner: str = "tl", size: int = 14, value: float | None = None,
              bar: float | None = None) -> np.ndarray:
    """``image`` with ``lines`` drawn in a corner (``tl``/``tr``/``bl``/``br``) at ``value`` (default: the maximum),
    optionally on a filled bar of value ``bar``."""
    height, width = image.shape
    font = ImageFont.load_default(size=size)
    step = int(size * 1.3)
    text_w = max(font.getlength(t) for t in lines)
    x = 6 if corner[1] == "l" else width - 6 - text_w
    y = 6 if corner[0] == "t" else height - 6 - step * len(lines)
    out = image.astype(np.float64)
    if bar is not None:
        out[max(int(y) - 3, 0):int(y + step * len(lines)) + 3, max(int(x) - 3, 0):int(x + text_w) + 3] = bar
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for i, line in enumerate(lines):
        draw.text((x, y + i * step), line, fill=255, font=font)
    alpha = np.asarray(mask, dtype=np.float64) / 255.0
    value = float(image.max()) if value is None else value
    return np.rint(out * (1 - alpha) + value * alpha).astype(image.dtype)


def _low_contrast(img: np.ndarray) -> np.ndarray:
    # Text 12 % of the dynamic range above the local background (soft tissue in the top-right corner).
    lo, hi = np.percentile(img, [1, 99])
    return with_text(img, corner="tr", value=float(np.median(img[:80, -200:])) + 0.12 * (hi - lo))


def _rgb_to_gray(img: np.ndarray) -> np.ndarray:
    # An ultrasound-like colour capture: yellow text on the gray scan, converted as ingest converts colour.
    gray8 = (img.astype(np.float64) / img.max() * 200).astype(np.uint8)
    rgb = np.stack([gray8] * 3, axis=-1)
    mask = with_text(np.zeros_like(gray8), corner="tl", value=255) > 127
    rgb[mask] = (255, 230, 0)
    return rgb2gray(rgb).astype(np.float32)


# name -> function of the clean scan giving the image OCR sees, and the corner where the text is.
TEXT_FIXTURES = {
    "top-left": (lambda s: with_text(s, corner="tl"), "tl"),
    "top-right": (lambda s: with_text(s, corner="tr"), "tr"),
    "bottom-left": (lambda s: with_text(s, corner="bl"), "bl"),
    "bottom-right": (lambda s: with_text(s, corner="br"), "br"),
    "small-font-9px": (lambda s: with_text(s, corner="tl", size=9), "tl"),
    "large-font-28px": (lambda s: with_text(s, ["DOE, JANE", "ID: 4821937"], corner="br", size=28), "br"),
    "low-contrast": (_low_contrast, "tr"),
    "white-on-black": (lambda s: with_text(s, corner="bl", bar=0.0), "bl"),
    "black-on-white": (lambda s: with_text(s, corner="tr", value=0.0, bar=float(s.max())), "tr"),
    "monochrome1-inverted": (lambda s: (65535 - with_text(s, corner="br")).astype(np.uint16), "br"),
    "rgb-to-gray": (_rgb_to_gray, "tl"),
    "uint8": (lambda s: (with_text(s, corner="tl") // 256).astype(np.uint8), "tl"),
    "float-modality-units": (lambda s: with_text(s, corner="bl").astype(np.float32) * 0.01 - 300.0, "bl"),
}


def in_corner(box: Box, corner: str, shape: tuple[int, int]) -> bool:
    """The box lies in the corner's half of the rows and reaches into its half of the columns (lines are
    left-aligned, so a short line of a right-hand banner may start left of the middle)."""
    rows = (box.top + box.bottom) / 2 < shape[0] / 2
    cols = box.left < shape[1] / 2 if corner[1] == "l" else box.right > shape[1] / 2
    return rows == (corner[0] == "t") and cols


# --------------------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("name", list(TEXT_FIXTURES))
def test_text_fixtures_are_detected_and_phi_counted(scan: np.ndarray, name: str):
    make, corner = TEXT_FIXTURES[name]
    image = make(scan)
    boxes = detect_text(image)
    finding = classify(boxes, PHI)
    assert finding.flagged and finding.counted >= 2, name
    assert finding.phi >= 2, name  # the name and the ID at least are read and matched to the header
    assert all(in_corner(b, corner, image.shape[:2]) for b in finding.boxes), name
    assert all(0 <= b.top < b.bottom <= image.shape[0] and 0 <= b.left < b.right <= image.shape[1]
               for b in finding.boxes)


def test_colour_input_is_read_as_luma(scan: np.ndarray):
    gray = (scan.astype(np.float64) / scan.max() * 200).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    rgb[with_text(np.zeros_like(gray), corner="br", value=255) > 127] = (0, 255, 255)
    assert classify(detect_text(rgb), PHI).phi >= 2


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(160, 120, 8), (128, 512, 18), (3000, 2400, 56)],  # enlarged / a wide strip / reduced (bounded memory)
)
def test_small_and_large_images_map_boxes_back(height: int, width: int, size: int):
    rng = np.random.default_rng(0)
    background = rng.normal(2000, 50, (height, width)).astype(np.float32)
    image = with_text(background, ["DOE, JANE", "ID: 4821937"], corner="br", size=size, value=6000.0)
    finding = classify(detect_text(image), PHI)
    assert finding.phi >= 1
    assert all(in_corner(b, "br", image.shape) and b.bottom <= height and b.right <= width for b in finding.boxes)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clean_scans_are_not_flagged(seed: int):
    img = render_scan(np.random.default_rng(seed), -1.5 - seed * 0.5, height=H, width=W, pixel_spacing_mm=0.5,
                      osteophyte=seed == 1, fracture=seed == 2, scoliosis_deg=20.0 if seed == 3 else 0.0)
    assert not classify(detect_text(img), PHI).flagged


@pytest.mark.parametrize(
    "image",
    [np.zeros((256, 256), np.uint16), np.full((200, 300), 7.5, np.float32),
     np.random.default_rng(0).integers(0, 4096, (384, 512)).astype(np.uint16),
     np.tile(np.linspace(0, 1, 384, dtype=np.float32), (512, 1)),
     np.where(np.eye(64, dtype=bool), np.nan, 1.0)],
    ids=["zeros", "constant", "noise", "gradient", "nan-diagonal"],
)
def test_text_free_images_have_no_text(image: np.ndarray):
    assert detect_text(image) == []


def test_level_labels_are_allowed():
    scan = simulate_scan(np.random.default_rng(11), -2.0, height=H, width=W, pixel_spacing_mm=0.5)
    labelled = draw_level_labels(scan.image, scan.roi_mask, 0.5, side=-1, bits_stored=16)
    boxes = detect_text(labelled)
    finding = classify(boxes, PHI)
    assert len(boxes) >= 3 and finding.allowed == len(boxes) and not finding.flagged


@pytest.mark.parametrize(
    "image", [np.zeros(10), np.zeros((4, 4, 4, 4)), np.zeros((8, 8, 2)), np.array([["a", "b"]], dtype=object)],
    ids=["1-D", "4-D", "two-channel", "object"],
)
def test_detect_text_rejects_non_images(image: np.ndarray):
    with pytest.raises(ValueError, match="expected"):
        detect_text(image)


# --------------------------------------------------------------------------------------------------- classification

@pytest.mark.parametrize(
    ("text", "allowed"),
    [("L1", True), ("L4", True), ("L1-L4", True), ("T12", True), ("S1", True), ("LI", True), ("L|", True),
     ("LS", True), ("Ll", True),
     ("5 CM", True), ("1O mm", True),
     ("R", True), ("LEFT", True), ("AP", True), ("5 cm", True), ("10mm", True), ("2.5 cm", True), ("→", True),
     ("--", True), ("", True),
     ("L6", False), ("T13", False), ("DOE", False), ("14.03.1951", False), ("AP SPINE", False), ("5 kg", False),
     ("JANE DOE", False), ("婴婴医", False), ("12345 cm", False)],
)
def test_allow_list(text: str, allowed: bool):
    assert is_allowed(text) is allowed


@pytest.mark.parametrize(
    ("text", "phi"),
    [("DOE, JANE", True), ("JANE DOE", True), ("Patient: Doe^Jane", True), ("ID: 4821937", True),
     ("ID: 4B21937", True),  # one OCR error in seven characters
     ("DOB: 14.03.1951", True), ("03/14/1951", True), ("1951-03-14", True), ("14-MAR-1951", True),
     ("14.03.51", True), ("ST. EXAMPLE GENERAL HOSPITAL", True), ("ST EXAMPLE GENERAL HOSP1TAL", True),
     ("L1", False), ("5 cm", False), ("ID: 1234567", False), ("DOB: 15.04.1962", False), ("", False),
     ("RIVERSIDE MEDICAL CENTER", False)],
)
def test_header_phi_matching(text: str, phi: bool):
    assert matches_phi(text, phi_tokens(PHI)) is phi


@pytest.mark.parametrize(
    ("text", "phi"), [("LI", True), ("Dr. Li", True), ("CLINIC", False), ("LIMIT", False)],
)
def test_short_name_parts_match_whole_words_only(text: str, phi: bool):
    assert matches_phi(text, phi_tokens(["LI^WEI"])) is phi


def test_phi_tokens_skip_titles_and_blanks():
    tokens = phi_tokens(["SMITH^JOHN^^DR", "", "  "])
    assert {"SMITH", "JOHN"} <= tokens and "DR" not in tokens and "" not in tokens


def test_header_phi_always_counts_even_when_allow_listed():
    box = TextBox(Box(0, 0, 10, 20), 0.99, "L1")
    assert classify([box]).allowed == 1 and not classify([box]).flagged
    finding = classify([box], phi_values=["L1"])  # a patient whose ID reads like a level label
    assert finding.counted == finding.phi == 1 and finding.boxes == (box.box,)


def test_classify_counts_and_detail_name_no_text():
    boxes = [TextBox(Box(0, 0, 10, 90), 0.98, "DOE, JANE"), TextBox(Box(20, 0, 30, 40), 0.97, "REPORT"),
             TextBox(Box(50, 50, 60, 62), 1.0, "L2")]
    finding = classify(boxes, PHI)
    assert finding == Finding(regions=3, allowed=1, counted=2, phi=1, boxes=(boxes[0].box, boxes[1].box))
    assert finding.detail == "2 text region(s) outside the allow-list, 1 matching header PHI"
    assert finding.as_dict() == {"text_regions": 3, "allowed": 1, "counted": 2, "phi": 1}
    assert classify([], PHI).detail == "" and not classify([], PHI).flagged


def test_recognised_text_never_reaches_repr_or_results():
    box = TextBox(Box(1, 2, 3, 4), 0.9, "DOE, JANE")
    finding = classify([box], PHI)
    shown = " ".join([repr(box), str(box), repr(finding), finding.detail, str(finding.as_dict())])
    assert "DOE" not in shown and "JANE" not in shown
    assert not any(f.name == "text" for f in dataclasses.fields(Finding))


def test_ocr_writes_no_text_to_logs_or_output(scan: np.ndarray, caplog: pytest.LogCaptureFixture, capfd):
    with caplog.at_level(logging.DEBUG):
        result = screen(with_text(scan, corner="tl"), PHI, policy="redact")
    out, err = capfd.readouterr()
    seen = caplog.text + out + err + result.detail + repr(result.finding)
    assert result.finding.phi >= 2
    assert not any(s in seen.upper() for s in PHI_STRINGS)


def test_header_phi_values_reads_the_phi_keywords():
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "4821937", "19510314"
    ds.InstitutionName, ds.OtherPatientIDs = "ST. EXAMPLE GENERAL HOSPITAL", ["X1", "X2"]
    ds.Modality, ds.PatientSex = "BMD", "F"  # not PHI keywords: not returned
    values = header_phi_values(ds)
    assert set(values) == {"DOE^JANE", "4821937", "19510314", "ST. EXAMPLE GENERAL HOSPITAL", "X1", "X2"}
    assert header_phi_values(pydicom.Dataset()) == ()


# --------------------------------------------------------------------------------------------------- redaction

def test_redact_blacks_out_boxes_with_margin_and_keeps_the_rest():
    image = np.arange(100, 100 + 20 * 30, dtype=np.uint16).reshape(20, 30)
    out = redact(image, [Box(5, 5, 8, 10), TextBox(Box(0, 25, 3, 30), 1.0, "x")], margin_px=2)
    assert out.dtype == image.dtype and image[0, 0] == 100  # a copy; the input is unchanged
    assert (out[3:10, 3:12] == 100).all() and (out[0:5, 23:30] == 100).all()
    keep = np.ones(image.shape, bool)
    keep[3:10, 3:12] = keep[0:5, 23:30] = False
    assert np.array_equal(out[keep], image[keep])
    with pytest.raises(ValueError, match="margin_px"):
        redact(image, [], margin_px=-1)


@pytest.mark.parametrize("name", ["top-left", "bottom-right", "large-font-28px", "black-on-white",
                                  "monochrome1-inverted"])
def test_redact_mode_leaves_no_phi_readable(scan: np.ndarray, name: str):
    image = TEXT_FIXTURES[name][0](scan)
    result = screen(image, PHI, policy="redact")
    assert result.finding.flagged and result.redacted and result.residual == 0 and result.accepted
    assert result.image.shape == image.shape and result.image.dtype == image.dtype
    again = detect_text(result.image)
    assert not [b for b in again if matches_phi(b.text, phi_tokens(PHI))]
    assert not any(s in normalised for b in again for normalised in [burnedin.normalise(b.text)]
                   for s in PHI_STRINGS)


def test_quarantine_mode_keeps_the_image_and_is_not_accepted(scan: np.ndarray):
    image = with_text(scan, corner="tr")
    result = screen(image, PHI)
    assert not result.accepted and not result.redacted and result.image is image
    assert result.detail.startswith(f"{result.finding.counted} text region(s) outside the allow-list")
    clean = screen(scan, PHI, policy="redact")
    assert clean.accepted and not clean.redacted and clean.image is scan


def test_screen_rejects_unknown_policy(scan: np.ndarray):
    with pytest.raises(ValueError, match="quarantine"):
        screen(scan, policy="blur")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- the cohort

def test_synthetic_cohort_banners_flagged_clean_scans_not(tmp_path: Path):
    """Every banner copy of a small synthesized cohort is flagged (and matched to its header); no scan is."""
    cfg = SynthesizeConfig(seed=3, n_scans=20, n_osteoporosis=12, followup_fraction=0.2, height=160, width=120,
                           pixel_spacing_mm=1.6, monochrome1_fraction=0.3, osteophyte_rate=0.1, fracture_rate=0.1,
                           scoliosis_rate=0.1, burned_in_fraction=0.2, level_label_fraction=0.3)
    truth = synthesize_cohort(cfg, tmp_path / "raw", tmp_path / "truth.csv")
    scans = truth[~truth["burned_in"]]
    assert truth["burned_in"].sum() == 4 and scans["level_labels"].sum() == 6 and len(scans) == 20
    rows = []
    for record in truth.itertuples(index=False):
        path = tmp_path / "raw" / record.source
        decoded = decode_file(path, max_pixels=10**7, multiframe="first")
        phi = header_phi_values(pydicom.dcmread(path, stop_before_pixels=True))
        finding = screen(decoded.pixels, phi).finding
        rows.append({"burned_in": record.burned_in, "flagged": finding.flagged, "phi": finding.phi})
    result = pd.DataFrame(rows)
    assert result.loc[result["burned_in"], "flagged"].all()
    assert (result.loc[result["burned_in"], "phi"] >= 2).all()
    assert not result.loc[~result["burned_in"], "flagged"].any()


def test_allow_patterns_are_documented():
    """Every allow-list pattern is described in the module docstring (the documented allow-list)."""
    doc = burnedin.__doc__ or ""
    for example in ("L1", "T12", "RIGHT", "5 cm", "arrows"):
        assert example in doc
    assert all(is_allowed(example) for example in ("L1", "T12", "RIGHT", "5 cm", "<-"))
    assert ALLOW_PATTERNS == burnedin.ALLOW_PATTERNS


def test_ocr_needs_no_network(tmp_path: Path):
    """The engine starts and reads text with every HTTP(S) request sent to a closed port: nothing is downloaded."""
    script = (
        "import numpy as np\n"
        "from PIL import Image, ImageDraw, ImageFont\n"
        "from spinedxa import burnedin\n"
        "img = Image.new('L', (384, 128), 0)\n"
        "ImageDraw.Draw(img).text((8, 8), 'ID: 4821937', fill=255, font=ImageFont.load_default(size=16))\n"
        "print(burnedin.classify(burnedin.detect_text(np.asarray(img)), ['4821937']).phi)\n"
    )
    dead = "http://127.0.0.1:9"
    proc = run([sys.executable, "-c", script], cwd=tmp_path,
               env={"PYTHONPATH": str(REPO), "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "NO_PROXY": "",
                    "http_proxy": dead, "https_proxy": dead, "no_proxy": ""}, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "1"
