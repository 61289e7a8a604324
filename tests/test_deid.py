"""Pseudonyms, the key, the allow-list, and an end-to-end proof that fake PHI never leaves ingest."""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import re
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_factory import FAKE_PHI, gradient, make_dataset, write_dicom
from spinedxa import deid
from spinedxa.config import IngestConfig
from spinedxa.ingest import run_ingest
from spinedxa.task import Task

PSEUDONYM = re.compile(r"^P[0-9a-f]{12}$")


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $SPINEDXA_DEID_KEY, and a fresh working directory for .spinedxa/deid.key."""
    monkeypatch.delenv(deid.KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_pseudonym_format_and_determinism() -> None:
    first = deid.patient_pseudonym("PID-1")
    assert PSEUDONYM.match(first)
    assert deid.patient_pseudonym("PID-1") == first == deid.patient_pseudonym("  PID-1 ")
    assert deid.patient_pseudonym("PID-2") != first


@pytest.mark.parametrize("make, namespaced", [
    (deid.patient_pseudonym, "id:PID-1"),
    (deid.file_pseudonym, "sha256:" + "ab" * 32),
    (deid.pseudonym, "name+dob:Zyxwvut^Quintessa|19510423"),
])
def test_pseudonym_is_the_documented_hmac(monkeypatch: pytest.MonkeyPatch, make, namespaced: str) -> None:
    """P + the first 12 hex digits of HMAC-SHA256(key, namespaced identifier): pseudonyms must never drift."""
    monkeypatch.setenv(deid.KEY_ENV, "known-key")
    identifier = namespaced if make is deid.pseudonym else namespaced.split(":", 1)[1]
    expected = "P" + hmac.new(b"known-key", namespaced.encode(), hashlib.sha256).hexdigest()[:12]
    assert make(identifier) == expected


def test_namespaces_do_not_collide() -> None:
    assert deid.patient_pseudonym("abc") != deid.file_pseudonym("abc")


def test_pseudonym_depends_on_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deid.KEY_ENV, "key-one")
    one = deid.patient_pseudonym("PID-1")
    monkeypatch.setenv(deid.KEY_ENV, "key-two")
    assert deid.patient_pseudonym("PID-1") != one


def test_empty_identifier_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        deid.pseudonym("")


def test_key_file_created_once_with_mode_0600(no_env_key: Path) -> None:
    first = deid.patient_pseudonym("PID-1")
    key_file = no_env_key / ".spinedxa" / "deid.key"
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", key_file.read_text())
    assert deid.patient_pseudonym("PID-1") == first  # reused, not regenerated


def test_empty_env_key_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deid.KEY_ENV, "  ")
    with pytest.raises(deid.DeidKeyError, match="empty"):
        deid.load_key()


def test_empty_key_file_rejected(no_env_key: Path) -> None:
    (no_env_key / ".spinedxa").mkdir()
    (no_env_key / ".spinedxa" / "deid.key").write_text("\n")
    with pytest.raises(deid.DeidKeyError, match="key file is empty"):
        deid.load_key()


@pytest.mark.parametrize("header, same_as", [
    ({"PatientID": "ID-1", "PatientName": "A^B", "PatientBirthDate": "19500101"}, "id"),
    ({"PatientID": "  ", "PatientName": "A^B", "PatientBirthDate": "19500101"}, "name"),
    ({"PatientName": "A^B", "PatientBirthDate": "19500101"}, "name"),
    ({"PatientBirthDate": "19500101"}, None),
    ({}, None),
])
def test_dicom_identifier_fallbacks(header: dict[str, str], same_as: str | None) -> None:
    ds = _ds(**header)
    by_id = deid.patient_pseudonym("ID-1")
    by_name = deid.dicom_pseudonym(_ds(PatientName="A^B", PatientBirthDate="19500101"))
    expected = {"id": by_id, "name": by_name, None: None}[same_as]
    assert deid.dicom_pseudonym(ds) == expected
    assert by_id != by_name


def _ds(**elements: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def test_kept_facts_is_exactly_the_allow_list() -> None:
    ds = make_dataset(gradient())
    facts = deid.kept_facts(ds)
    assert set(facts) == set(deid.KEPT_FACTS)
    assert facts == {"orig_height": 40, "orig_width": 32, "pixel_spacing_mm": 0.5, "modality": "BMD",
                     "photometric": "MONOCHROME2", "bits_stored": 16, "frames": 1}
    assert not {str(v) for v in facts.values()} & set(FAKE_PHI.values())


def test_allow_list_holds_no_identifying_keyword() -> None:
    identifying = {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
                   "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "ReferringPhysicianName"}
    kept = {k for keywords in deid.KEPT_FACTS.values() for k in keywords}
    assert not kept & identifying


# --- end to end: nothing identifying in any byte ingest writes ----------------------------------------------------

LABEL_PATIENT = "LBL-PATIENT-31337"  # a labels.csv patient_id is PHI too


def phi_source(root: Path) -> Path:
    """A source with fake PHI in DICOM headers (several encodings) and in a labels.csv patient_id."""
    rng = np.random.default_rng(1)
    rows = ["path,label,patient_id"]
    encodings = [{}, {"photometric": "MONOCHROME1"}, {"compress": RLELossless}, {"compress": JPEG2000Lossless}]
    for i, kwargs in enumerate(encodings):
        pixels = (gradient() + rng.integers(0, 50, (40, 32))).astype(np.uint16)
        write_dicom(root / f"scan_{i}.dcm", pixels, **kwargs)
        rows.append(f"scan_{i}.dcm,{('normal', 'osteoporosis')[i % 2]},")
    Image.fromarray(gradient(maximum=255, dtype="uint8")).save(root / "extra.png")
    rows.append(f"extra.png,normal,{LABEL_PATIENT}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_no_phi_leaves_ingest(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                              capfd: pytest.CaptureFixture[str]) -> None:
    source = phi_source(tmp_path / "source")
    out, summary = tmp_path / "ingested", tmp_path / "reports" / "ingest.json"
    caplog.set_level(logging.DEBUG)
    result = run_ingest(source, out, summary, task=Task(("normal", "osteoporosis")),
                        settings=IngestConfig(max_side=32, max_pixels=10**6, multiframe="first", roi="whole"))
    assert result["n_accepted"] == 5

    written = [p for p in out.rglob("*") if p.is_file()] + [summary]
    assert len(written) == 1 + 2 * 5 + 1 + 1  # manifest, five images and their five ROI images, SHA256SUMS, summary
    captured = capfd.readouterr()
    texts = {str(p): p.read_bytes() for p in written}
    texts["log"] = caplog.text.encode()
    texts["stdout+stderr"] = (captured.out + captured.err).encode()
    for secret in [*FAKE_PHI.values(), LABEL_PATIENT]:
        for where, data in texts.items():
            assert secret.encode() not in data, f"{secret!r} leaked into {where}"
    for png in out.glob("images/*.png"):
        with Image.open(png) as img:
            assert img.mode == "I;16" and not getattr(img, "text", {}), f"{png} carries text chunks"
    with (out / "manifest.csv").open(newline="") as fh:
        patients = {row["patient_id"] for row in csv.DictReader(fh)}
    assert all(PSEUDONYM.match(p) for p in patients)
    # the four DICOMs share one PatientID -> one pseudonym; the PNG has its own (from labels.csv)
    assert len(patients) == 2 and deid.patient_pseudonym(LABEL_PATIENT) in patients


@pytest.mark.parametrize("facts, expected", [
    ({"Modality": "BMD"}, {"modality": "BMD"}),
    ({"Modality": " dx "}, {"modality": "DX"}),                              # a defined term, written canonically
    ({"Modality": FAKE_PHI["PatientName"]}, {"modality": "other"}),          # free text is never copied
    ({"Modality": "PID-8675309"}, {"modality": "other"}),
    ({}, {"modality": None}),
    ({"PixelSpacing": ["0.25", "0.25"]}, {"pixel_spacing_mm": 0.25}),
    ({"PixelSpacing": "Zyxwvut"}, {"pixel_spacing_mm": None}),               # not a number
    ({"PixelSpacing": [5551234567.0, 1.0]}, {"pixel_spacing_mm": None}),     # a number, but no pixel spacing
    ({"PixelSpacing": [float("nan"), 1.0]}, {"pixel_spacing_mm": None}),
    ({"BitsStored": 12}, {"bits_stored": 12}),
    ({"BitsStored": 8675309}, {"bits_stored": None}),
    ({"BitsStored": "Quintessa"}, {"bits_stored": None}),
])
def test_kept_facts_come_from_a_fixed_vocabulary_or_a_checked_range(facts: dict, expected: dict) -> None:
    got = deid.kept_facts(facts)
    assert {k: got[k] for k in expected} == expected


# --- header values that hold PHI: the code and a neutral description, never the value -----------------------------

SECRET = FAKE_PHI["PatientName"]


@pytest.mark.filterwarnings("ignore:The value length")  # the fixtures break VR length limits on purpose
@pytest.mark.parametrize("keyword, extra, status", [
    ("PhotometricInterpretation", {}, "quarantined"),
    ("Modality", {}, "accepted"),
    ("BurnedInAnnotation", {}, "accepted"),  # only YES quarantines; any other value is not echoed either
    ("VOILUTFunction", {}, "accepted"),      # no window to apply it to
    ("VOILUTFunction", {"WindowCenter": 2000, "WindowWidth": 1000}, "quarantined"),  # pydicom's error quotes it
])
def test_header_values_holding_phi_reach_no_output(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    capfd: pytest.CaptureFixture[str], keyword: str, extra: dict,
                                                    status: str) -> None:
    source = tmp_path / "source"
    write_dicom(source / "normal" / "x.dcm", gradient(), phi={}, extra={**extra, keyword: SECRET})
    write_dicom(source / "normal" / "ok.dcm", gradient()[::-1].copy(), phi={})
    out, summary = tmp_path / "ingested", tmp_path / "ingest.json"
    caplog.set_level(logging.DEBUG)
    run_ingest(source, out, summary, task=Task(("normal", "osteoporosis")), progress=False,
               settings=IngestConfig(max_side=32, max_pixels=10**6, roi="whole"))
    manifest = (out / "manifest.csv").read_text()
    row = next(line for line in manifest.splitlines() if line.startswith("normal/x.dcm,"))
    assert f",{status}," in row
    captured = capfd.readouterr()
    for where, text in {"manifest": manifest, "summary": summary.read_text(), "log": caplog.text,
                        "stdout+stderr": captured.out + captured.err}.items():
        for piece in (SECRET, *SECRET.split("^"), SECRET.upper()):
            assert piece not in text, f"{piece!r} leaked into {where}"
    if keyword == "Modality":
        assert ",other," in row
