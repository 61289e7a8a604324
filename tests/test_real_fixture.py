"""The real-image fixtures under tests/fixtures/real/ are complete: each dataset has its licence and its provenance,
every image is listed in PROVENANCE.md with its sha256, every image decodes, and the class folders are the declared
ones.

A dataset is a folder ``tests/fixtures/real/<name>/`` holding ``LICENSE`` (the source's licence, verbatim; more
licence files ``LICENSE-*`` where files come from several sources; PROVENANCE.md records each one's sha256),
``PROVENANCE.md`` and the images, either flat or in class folders named as the source labels them. PROVENANCE.md
has one table row per image, ``| <path relative to the dataset> | <sha256> | <bytes> | ... | <licence file> | ... |``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from spinedxa.files import sha256_file

from conftest import REPO

REAL = REPO / "tests" / "fixtures" / "real"

# Each dataset and its class folders (label -> least images it holds); {} for a flat dataset with no labels.
# A new dataset is declared here, so that a folder dropped in without its layout fails instead of passing unchecked.
EXPECTED: dict[str, dict[str, int]] = {
    "dicom": {},
}
MIN_FILES = {"dicom": 5}
MAX_BYTES = 2 * 1024 * 1024  # per dataset: fixtures stay small
DOC_FILES = ("PROVENANCE.md",)
ROW = re.compile(r"^\|\s*(?P<path>[^|]+?)\s*\|\s*(?P<sha>[0-9a-f]{64})\s*\|\s*(?P<size>\d+)\s*\|(?P<rest>.*)\|\s*$")


def _is_doc(rel: Path) -> bool:
    return len(rel.parts) == 1 and (rel.name in DOC_FILES or rel.name == "LICENSE" or rel.name.startswith("LICENSE-"))


def _images(dataset: Path) -> list[str]:
    return sorted(
        p.relative_to(dataset).as_posix()
        for p in dataset.rglob("*")
        if p.is_file() and not _is_doc(p.relative_to(dataset))
    )


def _rows(dataset: Path) -> dict[str, tuple[str, int, str]]:
    """PROVENANCE.md's table rows: path -> (sha256, bytes, rest of the row)."""
    rows: dict[str, tuple[str, int, str]] = {}
    for line in (dataset / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            assert m["path"] not in rows, f"{dataset.name}: {m['path']} listed twice in PROVENANCE.md"
            rows[m["path"]] = (m["sha"], int(m["size"]), m["rest"])
    return rows


def test_declared_datasets_are_the_ones_present():
    present = sorted(p.name for p in REAL.iterdir() if p.is_dir())
    assert present == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_licence_and_provenance_present(name):
    dataset = REAL / name
    licence = dataset / "LICENSE"
    assert licence.is_file() and licence.stat().st_size > 200, f"{name}: LICENSE missing or empty"
    provenance = (dataset / "PROVENANCE.md").read_text(encoding="utf-8")
    assert re.search(r"\b\d{4}-\d{2}-\d{2}\b", provenance), f"{name}: PROVENANCE.md gives no date (YYYY-MM-DD)"
    # every licence file a row names exists, and every licence file here is named by a row
    named = {f for _, _, rest in _rows(dataset).values() for f in re.findall(r"\bLICENSE(?:-[\w.-]+)?\b", rest)}
    here = {p.name for p in dataset.iterdir() if p.is_file() and _is_doc(Path(p.name)) and p.name != "PROVENANCE.md"}
    assert named, f"{name}: no PROVENANCE.md row names its licence file"
    assert named == here, f"{name}: licence files named in PROVENANCE.md {sorted(named)} != present {sorted(here)}"
    for licence_file in sorted(here):  # verbatim: the copy's hash is the one PROVENANCE.md records
        assert sha256_file(dataset / licence_file) in provenance, f"{name}: {licence_file} sha256 not in PROVENANCE.md"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_image_is_listed_with_its_hash(name):
    dataset = REAL / name
    images, rows = _images(dataset), _rows(dataset)
    assert len(images) >= MIN_FILES.get(name, 1)
    assert sorted(rows) == images, f"{name}: PROVENANCE.md rows and files on disk differ"
    for rel in images:
        sha, size, _ = rows[rel]
        path = dataset / rel
        assert path.stat().st_size == size, f"{name}/{rel}: size differs from PROVENANCE.md"
        assert sha256_file(path) == sha, f"{name}/{rel}: sha256 differs from PROVENANCE.md"
    assert sum((dataset / rel).stat().st_size for rel in images) <= MAX_BYTES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_folders_are_the_declared_ones(name):
    dataset = REAL / name
    expected = EXPECTED[name]
    images = _images(dataset)
    if not expected:
        assert all("/" not in rel for rel in images), f"{name}: a flat dataset has no class folders"
        return
    counts: dict[str, int] = {}
    for rel in images:
        label, sep, _ = rel.partition("/")
        assert sep, f"{name}/{rel}: an image outside the class folders"
        counts[label] = counts.get(label, 0) + 1
    assert sorted(counts) == sorted(expected)
    for label, least in expected.items():
        assert counts[label] >= least, f"{name}/{label}: {counts[label]} images, expected at least {least}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_images_decode(name):
    import pydicom
    from PIL import Image

    dataset = REAL / name
    for rel in _images(dataset):
        path = dataset / rel
        if path.suffix.lower() == ".dcm":
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
            assert pixels.ndim == 2 and pixels.size > 0, f"{name}/{rel}: not a 2-D image"
            assert (int(ds.Rows), int(ds.Columns)) == pixels.shape
            assert np.ptp(pixels) > 0, f"{name}/{rel}: constant image"
        else:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
                assert im.width > 0 and im.height > 0
                assert np.ptp(np.asarray(im.convert("L"))) > 0, f"{name}/{rel}: constant image"


def test_dicom_fixture_is_real_radiography():
    """The DICOM set is what PROVENANCE.md says: CR radiographs, two of them not a spine, three a cervical spine."""
    import pydicom

    parts = {}
    for rel in _images(REAL / "dicom"):
        ds = pydicom.dcmread(REAL / "dicom" / rel, stop_before_pixels=True)
        assert ds.Modality == "CR"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        parts[rel] = ds.BodyPartExamined
    assert parts == {
        "CR1_6154.dcm": "CSPINE",
        "CR2_6247.dcm": "CSPINE",
        "CR3_6278.dcm": "CSPINE",
        "RG1_J2KI.dcm": "CHEST",
        "RG3_J2KI.dcm": "EXTREMITY",
    }
