"""Tiny DICOM (and other image) files for tests, with known fake PHI in the header.

Independent of spinedxa.synthesize on purpose: decoding tests must not depend on the synthetic cohort generator.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.filewriter
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

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


# --- hostile files: small on disk, huge (or lying) once decoded ------------------------------------------------------

def _deflated_zeros(n_bytes: int) -> bytes:
    """A raw deflate stream (no zlib header) that inflates to ``n_bytes`` zero bytes, built in milliseconds.

    One 16 MiB block of zeros is compressed once and ended with a full flush, which byte-aligns the output and resets
    the compressor, so the same bytes can be repeated; an empty final block ends the stream. Deflate expands at most
    ~1032:1, so 1 GB takes ~1 MB.
    """
    block = 16 * 2**20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail_comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = tail_comp.compress(bytes(n_bytes % block)) + tail_comp.flush(zlib.Z_FULL_FLUSH)
    return segment * (n_bytes // block) + tail + b"\x03\x00"  # 0x03 0x00: an empty fixed-Huffman final block


def write_deflate_bomb(path: Path, inflated_bytes: int, *, rows: int = 1, cols: int = 1) -> Path:
    """A Deflated Explicit VR Little Endian DICOM whose header says ``rows x cols`` 16-bit pixels but whose data set
    inflates to about ``inflated_bytes``: its Pixel Data element declares and holds that many zero bytes."""
    ds = make_dataset(np.zeros((rows, cols), np.uint16))
    del ds.PixelData
    header = DicomBytesIO()
    header.is_implicit_VR, header.is_little_endian = False, True  # the inflated form: Explicit VR little endian
    pydicom.filewriter.write_dataset(header, ds)
    n = inflated_bytes - len(header.getvalue()) - 12
    n -= n % 2
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)  # (7FE0,0010) OW, 4-byte length (PS3.5 7.1.2)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    prefix = comp.compress(header.getvalue() + element) + comp.flush(zlib.Z_FULL_FLUSH)
    body = _deflated_zeros(n)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue() + prefix + body)
    return path


def _j2k_codestream(pixels: np.ndarray) -> bytes:
    ds = make_dataset(pixels)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)


def write_encapsulated(path: Path, frame: bytes, uid: str, *, rows: int, cols: int, bits: int = 8,
                       photometric: str = "MONOCHROME2") -> Path:
    """A DICOM with one encapsulated ``frame`` whose header says ``rows x cols`` (which may differ from the frame's)."""
    ds = make_dataset(np.zeros((rows, cols), np.uint8 if bits <= 8 else np.uint16), photometric=photometric)
    ds.file_meta.TransferSyntaxUID = uid
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if bits <= 8 else (16, bits, bits - 1)
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def j2k_lying_size(path: Path, claimed: int = 12_000, actual: int = 64) -> Path:
    """JPEG 2000 pixel data whose SIZ marker says ``claimed x claimed`` (one tile) while Rows/Columns say
    ``actual x actual``: the codestream is a real ``actual``-pixel one with its size fields patched."""
    stream = bytearray(_j2k_codestream(gradient(actual, actual)))
    assert stream[:4] == b"\xff\x4f\xff\x51"
    struct.pack_into(">4I", stream, 8, claimed, claimed, 0, 0)        # Xsiz, Ysiz, XOsiz, YOsiz
    struct.pack_into(">4I", stream, 24, claimed, claimed, 0, 0)       # XTsiz, YTsiz, XTOsiz, YTOsiz: one tile
    return write_encapsulated(path, bytes(stream), JPEG2000Lossless, rows=actual, cols=actual, bits=12)


def jpeg_lying_size(path: Path, claimed: int = 12_000, actual: int = 64) -> Path:
    """Baseline JPEG pixel data whose SOF0 says ``claimed x claimed`` while Rows/Columns say ``actual x actual``."""
    buffer = io.BytesIO()
    Image.fromarray(gradient(actual, actual, 255, "uint8")).save(buffer, format="JPEG", quality=90)
    stream = bytearray(buffer.getvalue())
    sof = stream.index(b"\xff\xc0")
    struct.pack_into(">HH", stream, sof + 5, claimed, claimed)  # SOF0: marker, length, precision, height, width
    return write_encapsulated(path, bytes(stream), JPEGBaseline8Bit, rows=actual, cols=actual)


def jpeg_frame(pixels: np.ndarray) -> bytes:
    """A baseline JPEG codestream of 8-bit grayscale ``pixels`` (Pillow's encoder: pydicom encodes no JPEG)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_claiming(path: Path, side: int) -> Path:
    """A PNG whose IHDR says ``side x side`` (16-bit gray) with one tiny IDAT: Pillow reads the size from IHDR."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path


def _header_claiming(path: Path, side: int) -> Path:
    ds = make_dataset(gradient(4, 4))
    ds.Rows = ds.Columns = side  # the pixel data stays 32 bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def _native_excess(path: Path) -> Path:
    ds = make_dataset(gradient(2, 2))
    ds.PixelData = bytes(2**17)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_file_claiming(path: Path, side: int) -> Path:
    stream = bytearray(jpeg_frame(gradient(64, 64, 255, "uint8")))
    struct.pack_into(">HH", stream, stream.index(b"\xff\xc0") + 5, side, side)
    path.write_bytes(bytes(stream))
    return path


#: The one hostile fixture whose size is true: a 96 kB deflated 7000 x 7000 image that max_pixels admits.
CONSISTENT = "deflate_7000x7000_consistent"

# name -> (writer, expected status or reason code at the default params: max_pixels 50 M)
HOSTILE: dict[str, tuple] = {
    "deflate_1gb_1x1": (lambda p: write_deflate_bomb(p, 2**30), "corrupt"),
    "deflate_1gb_claims_7000x7000": (lambda p: write_deflate_bomb(p, 2**30, rows=7000, cols=7000), "too_large"),
    "deflate_100mb_1x1": (lambda p: write_deflate_bomb(p, 100 * 2**20), "corrupt"),
    CONSISTENT: (lambda p: write_deflate_bomb(p, 7000 * 7000 * 2 + 4096, rows=7000, cols=7000),
                                     "accepted"),
    "j2k_siz_12000_rows_64": (lambda p: j2k_lying_size(p), "too_large"),
    "jpeg_sof_12000_rows_64": (lambda p: jpeg_lying_size(p), "too_large"),
    "header_30000x30000": (lambda p: _header_claiming(p, 30_000), "too_large"),
    "native_excess_128k_for_2x2": (_native_excess, "corrupt"),
    "png_ihdr_30000x30000": (lambda p: _png_claiming(p, 30_000), "too_large"),
    "jpeg_file_sof_12000": (lambda p: _jpeg_file_claiming(p, 12_000), "too_large"),
}


def hostile_corpus(root: Path, names: list[str] | None = None) -> dict[str, str]:
    """Write the :data:`HOSTILE` files (or ``names`` of them) under ``root/normal/`` plus two ordinary scans under
    ``root/osteoporosis/``; return ``{source path: expected status or reason code}``."""
    expected = {}
    for name in names or list(HOSTILE):
        write, outcome = HOSTILE[name]
        path = root / "normal" / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        expected[f"normal/{name}.dcm"] = outcome
    for i in range(2):
        write_dicom(root / "osteoporosis" / f"ok{i}.dcm", gradient(40 + i, 32))
        expected[f"osteoporosis/ok{i}.dcm"] = "accepted"
    return expected
