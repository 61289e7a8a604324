"""Tiny DICOM (and other image) files for tests, with known fake PHI in the header.

Independent of spinedxa.synthesize on purpose: decoding tests must not depend on the synthetic cohort generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

# Distinctive fake PHI (>= 8 characters each, so that a chance match inside binary PNG data is impossible in practice).
FAKE_PHI: dict[str, str] = {
    "PatientName": "Zyxwvut^Quintessa",
    "PatientID": "PID-8675309-XQ",
    "PatientBirthDate": "19510423",
    "InstitutionName": "St Fictional Hospital of Nowhere",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "Houseman^Gregorius",
    "PerformingPhysicianName": "Quackenbush^Hortensia",
    "OperatorsName": "Opsworth^Bartholomew",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222222",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.33333333333333",
    "StudyDate": "20240229",
    "StudyID": "STUDY-424242",
    "PatientAddress": "42 Imaginary Lane, Faketown",
}


def gradient(rows: int = 40, cols: int = 32, maximum: int = 4095, dtype: str = "uint16") -> np.ndarray:
    """A diagonal ramp from 0 to ``maximum`` (distinct values, so inversions and windows are visible)."""
    r = np.linspace(0.0, 1.0, rows)[:, None]
    c = np.linspace(0.0, 1.0, cols)[None, :]
    return np.rint((r + c) / 2.0 * maximum).astype(dtype)


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    phi: dict[str, str] | None = None,
    modality: str = "BMD",
    extra: dict[str, object] | None = None,
) -> pydicom.Dataset:
    """Build an in-memory DICOM dataset around ``pixels`` (frames first for multi-frame, samples last for colour)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = modality
    ds.PixelSpacing = [0.5, 0.5]
    for keyword, value in (FAKE_PHI if phi is None else phi).items():
        setattr(ds, keyword, value)
    bits = bits_stored if bits_stored is not None else pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray | None = None, *, compress: str | None = None, **kwargs) -> Path:
    """Write a tiny DICOM file (see :func:`make_dataset`); ``compress``: a transfer syntax UID for Dataset.compress."""
    ds = make_dataset(gradient() if pixels is None else pixels, **kwargs)
    if compress is not None:
        ds.compress(compress, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_no_pixels(path: Path) -> Path:
    """A DICOM file with a header (and fake PHI) but no Pixel Data element."""
    ds = make_dataset(gradient(4, 4))
    del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def truncate(src: Path, dest: Path, fraction: float = 0.6) -> Path:
    """Copy the first ``fraction`` of ``src`` to ``dest`` (a transfer cut short)."""
    data = src.read_bytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest
