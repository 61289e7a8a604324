"""Decoding (DICOM in many encodings, PNG, JPEG, TIFF), quarantine reasons, and normalisation."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
import pydicom
import pydicom.encaps
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import JPEG2000Lossless, JPEG2000TransferSyntaxes, RLELossless

from dicom_factory import (
    FAKE_PHI,
    gradient,
    j2k_lying_size,
    jpeg_frame,
    jpeg_lying_size,
    make_dataset,
    truncate,
    write_deflate_bomb,
    write_dicom,
    write_encapsulated,
    write_no_pixels,
)
from spinedxa import imaging
from spinedxa.imaging import REASONS, QuarantineError, decode_file, inflate_limit, normalise, target_size

LIMIT = 10_000_000


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(path)


def decode(path: Path, **kwargs) -> object:
    return decode_file(path, max_pixels=kwargs.pop("max_pixels", LIMIT), multiframe=kwargs.pop("multiframe", "first"),
                       **kwargs)


def reason_of(path: Path, **kwargs) -> str:
    with pytest.raises(QuarantineError) as info:
        decode(path, **kwargs)
    assert info.value.reason in REASONS
    return info.value.reason


# --- pydicom's bundled files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm",               # RLE Lossless
    "MR_small_jp2klossless.dcm",      # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_implicit.dcm",          # Implicit VR
    "MR_small_bigendian.dcm",         # Explicit VR big endian
])
def test_lossless_encodings_match_the_uncompressed_reference(name: str) -> None:
    reference = decode(bundled("MR_small.dcm"))
    decoded = decode(bundled(name))
    np.testing.assert_array_equal(decoded.pixels, reference.pixels)
    assert decoded.meta["orig_width"] == 64 and decoded.format == "dicom"


@pytest.mark.parametrize("name, shape, converted", [
    ("CT_small.dcm", (128, 128), False),               # signed 16-bit with rescale slope/intercept
    ("JPGExtended.dcm", (1024, 256), False),           # JPEG extended, 12-bit
    ("JPEG2000.dcm", (1024, 256), False),              # JPEG 2000 lossy
    ("SC_rgb_jpeg_dcmtk.dcm", (100, 100), True),       # JPEG baseline, YBR_FULL
    ("SC_rgb_jpeg_gdcm.dcm", (100, 100), True),        # JPEG baseline, YBR_FULL_422
    ("SC_ybr_full_422_uncompressed.dcm", (100, 100), True),
    ("SC_rgb_rle.dcm", (100, 100), True),              # RLE, RGB
    ("SC_rgb_small_odd.dcm", (3, 3), True),
    ("image_dfl.dcm", (512, 512), False),              # deflated transfer syntax
])
def test_bundled_files_decode(name: str, shape: tuple[int, int], converted: bool) -> None:
    decoded = decode(bundled(name))
    assert decoded.pixels.shape == shape
    assert decoded.pixels.dtype == np.float32
    assert decoded.converted_from_color is converted
    assert np.isfinite(decoded.pixels).all() and decoded.pixels.std() > 0


def test_ct_rescale_is_applied() -> None:
    decoded = decode(bundled("CT_small.dcm"))
    assert decoded.pixels.min() < 0 or decoded.pixels.max() > 1000  # Hounsfield-like values, not raw counts
    assert decoded.meta["modality"] == "CT" and decoded.meta["bits_stored"] == 16


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "truncated"),
    ("rtplan_truncated.dcm", "truncated"),
    ("examples_palette.dcm", "unsupported_photometric"),
    ("rtplan.dcm", "no_pixel_data"),
    ("test-SR.dcm", "no_pixel_data"),
])
def test_bundled_files_quarantined(name: str, reason: str) -> None:
    assert reason_of(bundled(name)) == reason


def test_unsupported_photometric_detail_names_a_defined_term() -> None:
    with pytest.raises(QuarantineError, match="unsupported_photometric: PALETTE COLOR is not supported"):
        decode(bundled("examples_palette.dcm"))


# --- generated DICOM ----------------------------------------------------------------------------------------------

def ybr(rgb: np.ndarray) -> np.ndarray:
    return convert_color_space(rgb, "RGB", "YBR_FULL")


RGB = np.stack([gradient(maximum=255, dtype="uint8"), gradient(maximum=255, dtype="uint8")[::-1],
                np.full((40, 32), 128, np.uint8)], axis=-1)


@pytest.mark.parametrize("kwargs, bits, converted", [
    ({}, 16, False),
    ({"photometric": "MONOCHROME1"}, 16, False),
    ({"pixels": gradient(maximum=255, dtype="uint8")}, 8, False),
    ({"bits_stored": 12}, 12, False),
    ({"pixels": gradient(maximum=2000, dtype="int16") - 1000}, 16, False),  # signed
    ({"compress": RLELossless}, 16, False),
    ({"compress": JPEG2000Lossless}, 16, False),
    ({"pixels": RGB, "photometric": "RGB"}, 8, True),
    ({"pixels": ybr(RGB), "photometric": "YBR_FULL"}, 8, True),
    ({"pixels": RGB, "photometric": "RGB", "compress": RLELossless}, 8, True),
])
def test_generated_dicom_decodes(tmp_path: Path, kwargs: dict, bits: int, converted: bool) -> None:
    decoded = decode(write_dicom(tmp_path / "x.dcm", **kwargs))
    assert decoded.pixels.shape == (40, 32)
    assert decoded.meta["bits_stored"] == bits
    assert decoded.converted_from_color is converted
    assert decoded.meta["modality"] == "BMD" and decoded.meta["pixel_spacing_mm"] == 0.5


def test_monochrome1_is_inverted_to_bone_bright(tmp_path: Path) -> None:
    pixels = gradient()
    m2 = decode(write_dicom(tmp_path / "m2.dcm", pixels)).pixels
    m1 = decode(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")).pixels
    np.testing.assert_allclose(m1, m2.max() + m2.min() - m2)
    assert m2[0, 0] == 0 and m1[0, 0] == 4095  # the same stored 0 is dark in MONOCHROME2, bright in MONOCHROME1


def test_compressed_equals_uncompressed(tmp_path: Path) -> None:
    raw = decode(write_dicom(tmp_path / "raw.dcm")).pixels
    for uid in (RLELossless, JPEG2000Lossless):
        np.testing.assert_array_equal(decode(write_dicom(tmp_path / "c.dcm", compress=uid)).pixels, raw)


def test_rescale_slope_intercept(tmp_path: Path) -> None:
    pixels = gradient()
    decoded = decode(write_dicom(tmp_path / "r.dcm", pixels, extra={"RescaleSlope": 2, "RescaleIntercept": -1000}))
    np.testing.assert_allclose(decoded.pixels, pixels * 2.0 - 1000.0)


def test_voi_window_is_applied(tmp_path: Path) -> None:
    pixels = gradient()
    decoded = decode(write_dicom(tmp_path / "w.dcm", pixels, extra={"WindowCenter": 2048, "WindowWidth": 1024}))
    low, high = pixels < 1536, pixels > 2560  # outside the window: clipped to its ends
    assert np.ptp(decoded.pixels[low]) == 0 and np.ptp(decoded.pixels[high]) == 0
    assert decoded.pixels[high].min() > decoded.pixels[low].max()


@pytest.mark.parametrize("extra", [
    {"WindowCenter": 2048, "WindowWidth": 1024},
    {"WindowCenter": [1000, 3000], "WindowWidth": [500, 800]},  # several windows: the first is used
    {"WindowCenter": 1500, "WindowWidth": 2000, "RescaleSlope": 2, "RescaleIntercept": -1000},
    {"WindowCenter": 2048, "WindowWidth": 1024, "VOILUTFunction": "SIGMOID"},
])
def test_window_matches_pydicom_after_normalise(tmp_path: Path, extra: dict) -> None:
    """The fast LINEAR window (a clip) gives the same normalised image as pydicom's full windowing."""
    path = write_dicom(tmp_path / "w.dcm", gradient(64, 48), extra=extra)
    ds = pydicom.dcmread(path)
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    ours = normalise(decode(path).pixels, 256).astype(int)
    assert np.abs(ours - normalise(reference, 256).astype(int)).max() <= 1


def test_bits_stored_masks_unused_high_bits(tmp_path: Path) -> None:
    ds = make_dataset(gradient())
    ds.PixelData = (gradient() | np.uint16(0xF000)).tobytes()  # garbage above bit 11 (e.g. old overlay bits)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    decoded = decode(tmp_path / "b.dcm")
    np.testing.assert_array_equal(decoded.pixels, gradient().astype(np.float32))


FRAMES = np.stack([np.full((8, 8), v, np.uint16) for v in (10, 20, 30, 40)])


@pytest.mark.parametrize("rule, expected", [("first", 10), ("middle", 30), ("reject", None)])
def test_multiframe_rule(tmp_path: Path, rule: str, expected: int | None) -> None:
    path = write_dicom(tmp_path / "mf.dcm", FRAMES)
    if expected is None:
        assert reason_of(path, multiframe=rule) == "multiframe_rejected"
    else:
        decoded = decode(path, multiframe=rule)
        assert decoded.pixels.shape == (8, 8) and float(decoded.pixels[0, 0]) == expected
        assert decoded.meta["frames"] == 4


def test_too_large_is_decided_from_the_header_before_decoding(tmp_path: Path) -> None:
    ds = make_dataset(gradient(4, 4))
    ds.Rows = ds.Columns = 30_000  # the header claims 9e8 pixels; the pixel data is 32 bytes
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    with pytest.raises(QuarantineError, match=r"too_large: .*30000 x 30000 x 1 = 900_000_000 > .* 50_000_000"):
        decode(tmp_path / "bomb.dcm", max_pixels=50_000_000)


@pytest.mark.parametrize("max_pixels, frames, ok", [(40 * 32, 1, True), (40 * 32 - 1, 1, False),
                                                    (40 * 32 * 3, 3, True), (40 * 32 * 3 - 1, 3, False)])
def test_pixel_limit_counts_frames(tmp_path: Path, max_pixels: int, frames: int, ok: bool) -> None:
    path = write_dicom(tmp_path / "f.dcm", np.stack([gradient()] * frames) if frames > 1 else gradient())
    if ok:
        assert decode(path, max_pixels=max_pixels).pixels.shape == (40, 32)
    else:
        assert reason_of(path, max_pixels=max_pixels) == "too_large"


def _burned(path: Path) -> Path:
    return write_dicom(path, extra={"BurnedInAnnotation": "YES"})


def _palette(path: Path) -> Path:
    ds = make_dataset(gradient(maximum=255, dtype="uint8"))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "zero_byte"),
    (lambda p: p.write_text("not an image, just text\n"), "not_an_image"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "corrupt"),
    (lambda p: p.write_bytes(b"GIF89a" + b"\x00" * 40), "unsupported_format"),
    (lambda p: write_no_pixels(p), "no_pixel_data"),
    (lambda p: truncate(write_dicom(p.with_suffix(".full")), p, 0.8), "truncated"),
    (lambda p: truncate(write_dicom(p.with_suffix(".full"), compress=RLELossless), p, 0.8), "truncated"),
    (lambda p: truncate(write_dicom(p.with_suffix(".full")), p, 0.3), "truncated"),
    (_burned, "burned_in_annotation"),
    (_palette, "unsupported_photometric"),
])
def test_bad_files_are_quarantined(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad.dcm"
    make(path)
    assert reason_of(path) == reason


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "scan.png").write_text("hello")
    assert reason_of(tmp_path / "scan.png") == "not_an_image"


def test_pseudonymise_returns_only_a_pseudonym(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "p.dcm")
    assert decode(path).patient_id is None
    patient = decode(path, pseudonymise=True).patient_id
    assert patient is not None and len(patient) == 13 and patient.startswith("P")


def test_quarantine_error_rejects_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="unknown quarantine reason"):
        QuarantineError("bad_vibes", "x")
    assert str(QuarantineError("too_large", "9 > 8")) == "too_large: 9 > 8"


# --- PNG / JPEG / TIFF --------------------------------------------------------------------------------------------

GRAY8 = gradient(maximum=255, dtype="uint8")
GRAY16 = gradient(maximum=60000, dtype="uint16")


def save(path: Path, image: Image.Image | list[Image.Image], **kwargs) -> Path:
    if isinstance(image, list):
        image[0].save(path, save_all=True, append_images=image[1:], **kwargs)
    else:
        image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("name, image, fmt, bits, converted", [
    ("g8.png", Image.fromarray(GRAY8), "png", 8, False),
    ("g16.png", Image.fromarray(GRAY16), "png", 16, False),
    ("rgb.png", Image.fromarray(RGB), "png", 8, True),
    ("pal.png", Image.fromarray(RGB).convert("P"), "png", 8, True),
    ("la.png", Image.fromarray(GRAY8).convert("LA"), "png", 8, False),
    ("g.jpg", Image.fromarray(GRAY8), "jpeg", 8, False),
    ("rgb.jpg", Image.fromarray(RGB), "jpeg", 8, True),
    ("g16.tif", Image.fromarray(GRAY16), "tiff", 16, False),
    ("g8.tif", Image.fromarray(GRAY8), "tiff", 8, False),
    ("rgb.tif", Image.fromarray(RGB), "tiff", 8, True),
])
def test_pil_formats(tmp_path: Path, name: str, image: Image.Image, fmt: str, bits: int, converted: bool) -> None:
    decoded = decode(save(tmp_path / name, image))
    assert decoded.format == fmt and decoded.meta["bits_stored"] == bits
    assert decoded.converted_from_color is converted
    assert decoded.pixels.shape == (40, 32) and decoded.pixels.dtype == np.float32
    if fmt != "jpeg" and not converted:
        source = GRAY16 if bits == 16 else GRAY8
        np.testing.assert_array_equal(decoded.pixels, source.astype(np.float32))  # lossless, values untouched


def test_format_is_sniffed_from_content_not_name(tmp_path: Path) -> None:
    decoded = decode(save(tmp_path / "really_a_png.dcm", Image.fromarray(GRAY8), format="PNG"))
    assert decoded.format == "png"


@pytest.mark.parametrize("rule, expected", [("first", 10), ("middle", 30), ("reject", None)])
def test_multipage_tiff_follows_the_multiframe_rule(tmp_path: Path, rule: str, expected: int | None) -> None:
    path = save(tmp_path / "pages.tif", [Image.fromarray(f.astype(np.uint8)) for f in FRAMES])
    if expected is None:
        assert reason_of(path, multiframe=rule) == "multiframe_rejected"
    else:
        assert float(decode(path, multiframe=rule).pixels[0, 0]) == expected


@pytest.mark.parametrize("name, image", [("t.png", Image.fromarray(GRAY16)), ("t.jpg", Image.fromarray(GRAY8)),
                                         ("t.tif", Image.fromarray(GRAY16))])
def test_truncated_pil_files(tmp_path: Path, name: str, image: Image.Image) -> None:
    full = save(tmp_path / f"full_{name}", image)
    assert reason_of(truncate(full, tmp_path / name, 0.6)) in ("truncated", "corrupt")


def test_pil_too_large_checked_on_header(tmp_path: Path) -> None:
    path = save(tmp_path / "big.png", Image.fromarray(GRAY8))
    assert reason_of(path, max_pixels=40 * 32 - 1) == "too_large"


# --- normalise ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, max_side, expected", [
    ((40, 32), 256, (40, 32)),      # never enlarged
    ((512, 384), 256, (256, 192)),  # portrait, aspect kept
    ((384, 512), 256, (192, 256)),  # landscape
    ((1000, 10), 100, (100, 1)),    # extreme aspect, at least one pixel
    ((300, 300), 96, (96, 96)),
])
def test_normalise_shape(shape: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    out = normalise(rng.normal(1000.0, 50.0, shape).astype(np.float32), max_side)
    assert out.shape == expected == target_size(*shape, max_side)
    assert out.dtype == np.uint16


def test_normalise_windows_to_full_range_and_keeps_order() -> None:
    pixels = gradient(64, 48).astype(np.float32)
    pixels[0, 0] = 1e6  # one hot pixel must not compress the rest of the range
    out = normalise(pixels, 256)
    assert out.min() == 0 and out.max() == 65535
    assert np.all(np.diff(out[5:, 10].astype(int)) >= 0)  # monotone ramp stays monotone
    assert np.median(out) > 20000  # the hot pixel was clipped, not used as the maximum


@pytest.mark.parametrize("pixels, max_side, match", [
    (np.zeros((4, 4, 3), np.float32), 64, "2-D"),
    (np.zeros((0, 4), np.float32), 64, "2-D"),
    (np.full((4, 4), np.nan, np.float32), 64, "NaN"),
    (np.zeros((4, 4), np.float32), 0, "max_side"),
])
def test_normalise_rejects_bad_input(pixels: np.ndarray, max_side: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalise(pixels, max_side)


def test_normalise_constant_image_is_zero() -> None:
    assert not normalise(np.full((10, 10), 7.0, np.float32), 64).any()


@pytest.mark.parametrize("kwargs, match", [({"multiframe": "all"}, "multiframe"), ({"max_pixels": 0}, "max_pixels")])
def test_decode_file_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode(write_dicom(tmp_path / "a.dcm"), **kwargs)


# --- decoding from bytes already read (ingest reads each file once) ------------------------------------------------

def _window_m1(path: Path) -> Path:
    return write_dicom(path, photometric="MONOCHROME1", extra={"WindowCenter": 2048, "WindowWidth": 1024,
                                                               "RescaleSlope": 2, "RescaleIntercept": -10})


@pytest.mark.parametrize("make", [
    lambda p: write_dicom(p),
    _window_m1,
    lambda p: write_dicom(p, compress=RLELossless),
    lambda p: write_dicom(p, np.stack([gradient(), gradient()[::-1]])),
    lambda p: write_dicom(p, RGB, photometric="RGB"),
    lambda p: save(p, Image.fromarray(GRAY16), format="PNG"),
    lambda p: save(p, Image.fromarray(GRAY8), format="JPEG"),
    lambda p: save(p, Image.fromarray(RGB), format="TIFF"),
    lambda p: save(p, [Image.fromarray(f.astype(np.uint8)) for f in FRAMES], format="TIFF"),  # multi-page
    lambda p: truncate(write_dicom(p.with_suffix(".full")), p, 0.8),
    lambda p: truncate(write_dicom(p.with_suffix(".full"), compress=RLELossless), p, 0.8),
    lambda p: write_no_pixels(p),
    _burned,
    lambda p: p.write_bytes(b""),
    lambda p: p.write_text("not an image, just text\n"),
])
def test_decoding_bytes_equals_decoding_the_path(tmp_path: Path, make) -> None:
    path = tmp_path / "x.bin"
    make(path)
    results = []
    for data in (None, path.read_bytes()):
        try:
            d = decode(path, pseudonymise=True, data=data, multiframe="middle")
            results.append((d.pixels.tobytes(), d.pixels.shape, d.meta, d.format, d.converted_from_color,
                            d.patient_id))
        except QuarantineError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


def test_bytes_are_decoded_without_opening_the_path(tmp_path: Path) -> None:
    data = write_dicom(tmp_path / "a.dcm").read_bytes()
    decoded = decode(tmp_path / "never_written.dcm", data=data)  # the path only names the file
    np.testing.assert_array_equal(decoded.pixels, gradient().astype(np.float32))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.name)


def test_pydicom_log_records_stay_out_of_the_logs(tmp_path: Path) -> None:
    """pydicom logs a traceback per failed decoding plugin on a child logger: none may reach the root handlers.

    (pytest's caplog also listens on non-propagating loggers, so a plain root handler is the witness here.)
    """
    data = bytearray(write_dicom(tmp_path / "j.dcm", compress=JPEG2000Lossless).read_bytes())
    data[-200:-100] = b"\xff" * 100  # a damaged codestream, same length: every JPEG 2000 plugin fails
    (tmp_path / "j.dcm").write_bytes(bytes(data))
    root, witness = logging.getLogger(), _Collect()
    root.addHandler(witness)
    try:
        assert reason_of(tmp_path / "j.dcm") == "corrupt"
        logging.getLogger("pydicom.pixels.decoders.base").error("a record from pydicom")
        logging.getLogger("spinedxa.test").error("a record from elsewhere")  # the witness works
    finally:
        root.removeHandler(witness)
    assert witness.names == ["spinedxa.test"]


# --- hostile files: the check runs before the memory it protects is allocated ---------------------------------------

SMALL = 10_000  # max_pixels for the hostile cases: the inflation limit is then 2 x 10,000 bytes + 8 MiB


def _deflate_over_the_limit(p: Path) -> Path:
    # The header claims 3000 x 3000 (more than SMALL, but the inflation check comes first); ~9 KB on disk.
    return write_deflate_bomb(p, inflate_limit(SMALL) + 2**20, rows=3000, cols=3000)


def _deflate_1x1_bomb(p: Path) -> Path:
    return write_deflate_bomb(p, 64 * 2**20)  # header 1 x 1, 64 MB inflated, ~64 KB on disk


def _deflate_excess(p: Path) -> Path:
    return write_deflate_bomb(p, 2**20)  # under the inflation limit, but 1 MB of pixel data for a 1 x 1 header


def _deflate_cut(p: Path) -> Path:
    data = _deflate_excess(p).read_bytes()
    p.write_bytes(data[:-200])
    return p


def _deflate_garbage(p: Path) -> Path:
    data = bytearray(_deflate_excess(p).read_bytes())
    start = data.index(b"1.2.840.10008.1.2.1.99") + 40  # past the file meta, into the deflate stream
    data[start:start + 64] = b"\xff" * 64
    p.write_bytes(bytes(data))
    return p


def _native_excess(p: Path) -> Path:
    ds = make_dataset(gradient(2, 2))
    ds.PixelData = bytes(2**17)  # 128 KiB of pixel data behind a 2 x 2 header
    ds.save_as(p, enforce_file_format=True)
    return p


def _frames_negative(p: Path) -> Path:
    return write_dicom(p, extra={"NumberOfFrames": -5})


@pytest.mark.parametrize("make, reason, detail", [
    (_deflate_over_the_limit, "too_large", r"inflates to more than .* \(the limit for ingest.max_pixels"),
    (_deflate_1x1_bomb, "corrupt", "inflates to more than .* far more than its header declares"),
    (_deflate_excess, "corrupt", "far more than the 2 bytes"),
    (_deflate_cut, "truncated", "deflated data set ends early"),
    (_deflate_garbage, "corrupt", "not a valid deflate stream"),
    (lambda p: j2k_lying_size(p), "too_large", r"codestream's own size \(SIZ\) .* 12000 x 12000"),
    (lambda p: j2k_lying_size(p, claimed=96), "corrupt", r"\(SIZ\) 96 x 96 x 1 differs from .* 64 x 64 x 1"),
    (lambda p: jpeg_lying_size(p), "too_large", r"codestream's own size \(SOF\) .* 12000 x 12000"),
    (lambda p: jpeg_lying_size(p, claimed=80), "corrupt", r"\(SOF\) 80 x 80 x 1 differs from .* 64 x 64 x 1"),
    (lambda p: write_encapsulated(p, b"\xff\xd8\xff\xd9", "1.2.840.10008.1.2.4.50", rows=8, cols=8), "corrupt",
     "no readable SOF marker"),
    (_native_excess, "corrupt", "far more than the 8 bytes"),
    (_frames_negative, "corrupt", "NumberOfFrames=-5"),
], ids=["deflate_bomb_max_pixels", "deflate_bomb_1x1", "deflate_excess", "deflate_truncated", "deflate_invalid",
        "j2k_siz_too_large", "j2k_siz_mismatch", "jpeg_sof_too_large", "jpeg_sof_mismatch", "jpeg_no_sof", "native_excess",
        "frames_negative"])
def test_hostile_files_are_quarantined_before_decoding(tmp_path: Path, make, reason: str, detail: str) -> None:
    path = make(tmp_path / "hostile.dcm")
    assert path.stat().st_size < 256 * 2**10  # small on disk, whatever they claim
    for data in (None, path.read_bytes()):  # from the path (predict) and from bytes already read (ingest)
        with pytest.raises(QuarantineError) as info:
            decode(path, max_pixels=SMALL if make is _deflate_over_the_limit else 50_000_000, data=data)
        assert info.value.reason == reason
        assert re.search(detail, info.value.detail), info.value.detail


@pytest.mark.parametrize("inflated, side, max_pixels, reason", [
    (inflate_limit(SMALL) + 2**20, 3000, SMALL, "too_large"),  # past the max_pixels limit
    (4 * 2**20, 1, 50_000_000, "corrupt"),                       # within it, far past what its 1 x 1 header says
], ids=["past_max_pixels", "past_its_header"])
def test_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inflated: int,
                                                      side: int, max_pixels: int, reason: str) -> None:
    """The bounded inflation stops at the limit: pydicom (which would inflate it whole) is never called."""
    path = write_deflate_bomb(tmp_path / "bomb.dcm", inflated, rows=side, cols=side)
    monkeypatch.setattr(imaging.pydicom, "dcmread", lambda *a, **k: pytest.fail("dcmread called on a bomb"))
    with pytest.raises(QuarantineError) as info:
        decode(path, max_pixels=max_pixels)
    assert info.value.reason == reason and "deflated data set inflates to more than" in info.value.detail


def test_deflated_file_within_the_limit_decodes(tmp_path: Path) -> None:
    """A consistent deflated file (header and pixel data agree) under the limit is decoded as usual."""
    path = write_deflate_bomb(tmp_path / "ok.dcm", 100 * 80 * 2 + 2048, rows=100, cols=80)
    decoded = decode(path)
    assert decoded.pixels.shape == (100, 80)


@pytest.mark.parametrize("claimed_ok", [True, False])
def test_codestream_check_passes_honest_jpeg(tmp_path: Path, claimed_ok: bool) -> None:
    """A baseline JPEG whose SOF matches Rows/Columns decodes (the check does not reject valid files)."""
    pixels = gradient(48, 40, 255, "uint8")
    rows = 48 if claimed_ok else 47
    path = write_encapsulated(tmp_path / "j.dcm", jpeg_frame(pixels), "1.2.840.10008.1.2.4.50", rows=rows, cols=40)
    if claimed_ok:
        decoded = decode(path)
        assert decoded.pixels.shape == (48, 40)
        assert np.abs(decoded.pixels - pixels).max() < 16  # lossy, but the same image
    else:
        assert reason_of(path) == "corrupt"


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jls_lossy_line.dcm",
                                  "examples_jpeg2k.dcm", "693_J2KI.dcm"])
def test_codestream_sizes_of_bundled_files_match_their_headers(name: str) -> None:
    ds = pydicom.dcmread(bundled(name))
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    parse = imaging.j2k_size if ds.file_meta.TransferSyntaxUID in JPEG2000TransferSyntaxes else imaging.jpeg_size
    assert parse(frame) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)


def test_codestream_check_happens_before_any_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = j2k_lying_size(tmp_path / "j.dcm")
    monkeypatch.setattr(imaging, "get_decoder", lambda ts: _NoDecode())
    assert reason_of(path) == "too_large"


class _NoDecode:
    is_available = True
    missing_dependencies: list[str] = []

    def as_array(self, *args, **kwargs):
        pytest.fail("the codec was called on a codestream that lies about its size")


# --- header values are never echoed -------------------------------------------------------------------------------

def _bad_photometric(p: Path) -> Path:
    ds = make_dataset(gradient())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the value breaks the CS length limit: it is meant to
        ds.PhotometricInterpretation = FAKE_PHI["PatientName"]
    ds.save_as(p, enforce_file_format=True)
    return p


def _private_transfer_syntax(p: Path) -> Path:
    ds = make_dataset(gradient())
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.77777777777777"
    ds.save_as(p, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return p


@pytest.mark.parametrize("make, reason, secret", [
    (_bad_photometric, "unsupported_photometric", FAKE_PHI["PatientName"]),
    (_private_transfer_syntax, "unsupported_transfer_syntax", "77777777777777"),
])
def test_header_values_are_never_quoted(tmp_path: Path, make, reason: str, secret: str) -> None:
    path = make(tmp_path / "x.dcm")
    with pytest.raises(QuarantineError) as info:
        decode(path)
    assert info.value.reason == reason
    assert secret.upper() not in str(info.value).upper() and "^" not in str(info.value)


def test_photometric_message_describes_an_unknown_value(tmp_path: Path) -> None:
    with pytest.raises(QuarantineError, match="not one of the DICOM defined terms"):
        decode(_bad_photometric(tmp_path / "x.dcm"))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "scan.dcm"
    os.mkfifo(fifo)
    with pytest.raises(QuarantineError, match="unreadable: not a regular file"):
        decode(fifo)
