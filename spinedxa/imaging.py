"""Decoding of DICOM / PNG / JPEG / TIFF files into bone-bright float images, and normalisation to 16-bit PNG range.

Used by the ``ingest`` stage and by ``predict`` on new files. Two public calls:

* :func:`decode_file` reads one file and returns a :class:`Decoded` (float32 2-D pixels, bone bright, plus the
  allow-listed acquisition facts of :mod:`spinedxa.deid`), or raises :class:`QuarantineError` with a reason code from
  :data:`REASONS` and a detail naming the bad value. The kind of file is sniffed from its first bytes, never from its
  name, so a text file called ``x.png`` is ``not_an_image``.
* :func:`normalise` resizes (anti-aliased, aspect kept, never enlarged) and windows a decoded image to uint16.

DICOM follows the standard grayscale pipeline (PS3.3 C.11, PS3.4 N.2.1): decode (pydicom masks unused high bits
to BitsStored and sign-extends) -> Modality LUT / Rescale Slope+Intercept -> VOI LUT or window (where present) ->
MONOCHROME1 inverted so that bone is bright. Colour images (RGB, YBR_* secondary captures) become grayscale (ITU-R BT.709 luma, through
:func:`skimage.color.rgb2gray`) and are flagged ``converted_from_color``.

Header values that could be PHI never reach an exception message or a log: pydicom's warnings and log records (they
can quote element values, e.g. an invalid date) are silenced, header-parsing and codec errors are reported by type and
a fixed description only, and a coded value (Photometric Interpretation, Transfer Syntax) is named only when it is one
of the DICOM defined terms; anything else is described, never quoted.

Memory stays bounded whatever a file claims (each check runs before the memory it protects is allocated):

* rows x columns x frames against ``max_pixels``, from the header (PIL: from the image header);
* a deflated data set (Deflated Explicit VR Little Endian) is inflated once, streamed and discarded, up to
  :func:`inflate_limit` bytes before pydicom inflates it for real;
* native Pixel Data may not be much longer than Rows x Columns x Frames x Samples x BitsAllocated declare (checked on
  the element's length, before its value is read);
* a JPEG / JPEG-LS / JPEG 2000 frame's own size (its SOF / SIZ marker) must fit ``max_pixels`` and equal
  Rows x Columns, checked on the codestream before any codec sees it (a decoder allocates what the codestream says).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import _get_jpg_parameters, get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    UID_dictionary,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from spinedxa import burnedin, deid

# pydicom logs (and warns about) invalid element values verbatim, e.g. a malformed PatientBirthDate: keep them out.
# Its modules log to child loggers ("pydicom.pixels.decoders.base" logs a traceback per failed decoding plugin), whose
# records would still reach the root handlers through "pydicom" unless it stops propagating them.
logging.getLogger("pydicom").disabled = True
logging.getLogger("pydicom").propagate = False

REASONS: tuple[str, ...] = (
    "zero_byte",
    "unreadable",
    "not_an_image",
    "unsupported_format",
    "corrupt",
    "truncated",
    "no_pixel_data",
    "unsupported_photometric",
    "unsupported_transfer_syntax",
    "too_large",
    "multiframe_rejected",
    "burned_in_annotation",
    "burned_in_text",
    "no_roi",
    "no_label",
    "unknown_label",
    "symlink_dangling",
    "symlink_outside_source",
    "symlink_repeat",
)
"""The fixed vocabulary of quarantine reasons (the part of ``manifest.reason`` before the colon)."""

Multiframe = Literal["first", "middle", "reject"]
FORMATS: tuple[str, ...] = ("dicom", "png", "jpeg", "tiff")

# The defined terms of Photometric Interpretation (DICOM PS3.3 C.7.6.3.1.2, current and retired): the only values
# of that element a message may name; anything else is described without being quoted.
PHOTOMETRIC_TERMS: tuple[str, ...] = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
)
_GRAY = ("MONOCHROME1", "MONOCHROME2")
# pydicom converts YBR_FULL / YBR_FULL_422 to RGB on decoding; JPEG 2000 decoders undo YBR_ICT / YBR_RCT themselves.
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements larger than this are read from disk only when used, so a file whose header already fails the pixel limit
# never has its (possibly huge) pixel data read into memory.
_DEFER_SIZE = "16 MB"
_UNDEFINED_LENGTH = 0xFFFFFFFF  # sequences / encapsulated pixel data (PS3.5 7.1.1)
# Inflation bound of a deflated data set: the pixel data of max_pixels 16-bit samples (DXA stores 16-bit grayscale;
# an 8-bit RGB image of up to 2/3 of max_pixels fits too) plus 8 MiB for the rest of the header (private groups of
# DXA exports are tens of kB). pydicom inflates the whole data set in memory and copies the pixel data once more,
# so a deflated file costs at most about twice this limit (~216 MB at the default max_pixels of 50 M).
INFLATE_BYTES_PER_PIXEL = 2
INFLATE_HEADER_BYTES = 8 * 2**20
_INFLATE_CHUNK = 2**20  # compressed bytes read, and inflated bytes produced, per step of the bounded inflation
# The first inflated bytes are parsed for the header (up to the pixel data), which then bounds the inflation more
# tightly (_declared_end); 256 kB hold the headers of DXA exports, private groups included, many times over.
_INFLATE_HEAD = 256 * 2**10
_INFLATE_TAIL_BYTES = 2**20  # elements after the pixel data (signatures, trailing padding)
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")  # 22 characters: stored without padding
# Native Pixel Data may exceed what the header declares by padding (one byte to even length; some writers pad to a
# block): more than twice the declared size plus 64 kB is a file whose header does not describe its pixel data.
_PIXEL_EXCESS_FACTOR = 2
_PIXEL_EXCESS_BYTES = 64 * 2**10
# Exceptions pydicom raises on malformed headers (it has no common base class for them).
_HEADER_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError,
                  AttributeError, OverflowError, struct.error, NotImplementedError)

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_OTHER_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 (JP2)"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"RIFF", "RIFF/WebP"),
)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_PIL_COLOR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_PIL_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16,
             "I": 32, "F": 32, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8, "YCbCr": 8, "LAB": 8, "HSV": 8}

# Robust window for normalise(): the 0.5th and 99.5th percentiles map to 0 and 65535. The same percentiles are used to
# clip intensities in nnU-Net's CT normalisation (Isensee et al. 2021, Nature Methods 18:203); they ignore the few
# saturated pixels of DXA exports (metal, calibration markers) without clipping bone.
WINDOW_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE = 16_384
U16_MAX = 65535
_LONG_NUMBER = re.compile(r"\d{7,}")


class QuarantineError(Exception):
    """A per-file problem: the file goes to the quarantine with ``reason`` (from :data:`REASONS`) and ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; expected one of {list(REASONS)}")
        # Long digit runs are grouped (900_000_000) so that validate's PHI scan, which treats 7+ digit runs as possible
        # record numbers, is not tripped by a pixel count. Details never hold header values, so nothing is hidden.
        detail = _LONG_NUMBER.sub(lambda m: f"{int(m.group()):_}", detail)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Decoded:
    """One decoded image.

    Attributes:
        pixels: float32, 2-D (rows, columns), bone bright; values in the file's own units (after rescale / VOI).
        meta: the allow-listed acquisition facts (:data:`spinedxa.deid.KEPT_FACTS`): ``orig_height``, ``orig_width``,
            ``pixel_spacing_mm``, ``modality``, ``photometric``, ``bits_stored``, ``frames``.
        format: ``dicom`` | ``png`` | ``jpeg`` | ``tiff``.
        converted_from_color: the source was colour and was converted to grayscale.
        patient_id: pseudonym from the DICOM header when asked for (``pseudonymise=True``) and present, else None.
    """

    pixels: np.ndarray
    meta: dict[str, Any]
    format: str
    converted_from_color: bool
    patient_id: str | None = field(default=None)
    # The header's PHI values (names, IDs, dates, institution) for the burned-in text check only: memory only, never
    # written, logged or shown (repr=False keeps them out of tracebacks and debug prints).
    phi_values: tuple[str, ...] = field(default=(), repr=False)


def decode_file(
    path: str | Path, *, max_pixels: int, multiframe: Multiframe, pseudonymise: bool = False,
    data: bytes | None = None,
) -> Decoded:
    """Decode one image file into bone-bright float32 pixels.

    Args:
        path: the file (DICOM, PNG, JPEG or TIFF; recognised by content).
        max_pixels: rows x columns x frames above which the file is rejected, checked from the header before decoding.
        multiframe: which frame of a multi-frame file to keep: ``first``, ``middle`` (index frames // 2) or
            ``reject`` the file.
        pseudonymise: also derive the patient pseudonym from the DICOM header (needs the de-identification key).
        data: the file's content when the caller has already read it (ingest reads each file once, for its sha256
            and for decoding); ``path`` is then not opened. None: read from ``path``, large pixel data lazily.

    Raises:
        QuarantineError: the file cannot or must not be used; ``reason`` is one of :data:`REASONS`.
        ValueError: ``multiframe`` or ``max_pixels`` is invalid (a caller bug, not a file problem).
    """
    if multiframe not in ("first", "middle", "reject"):
        raise ValueError(f"multiframe={multiframe!r}; expected 'first', 'middle' or 'reject'")
    if max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels}; expected a positive pixel count")
    path = Path(path)
    if data is not None:
        size, head = len(data), data[:132]
    else:
        size, head = _head(path)
    if size == 0:
        raise QuarantineError("zero_byte", "file is empty")
    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    if head[128:132] == b"DICM":
        return _decode_dicom(source, size, max_pixels, multiframe, pseudonymise, force=False)
    kind = next((k for magic, k in _SIGNATURES if head.startswith(magic)), None)
    if kind is not None:
        return _decode_pil(source, kind, max_pixels, multiframe)
    other = next((name for magic, name in _OTHER_IMAGES if head.startswith(magic)), None)
    if other is not None:
        raise QuarantineError("unsupported_format", f"{other}; expected DICOM, PNG, JPEG or TIFF")
    if head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08", b"\x00\x02") and size > 8:
        # Legacy DICOM without the Part 10 preamble starts with a group 0002 or 0008 element (either endianness).
        return _decode_dicom(source, size, max_pixels, multiframe, pseudonymise, force=True)
    raise QuarantineError("not_an_image", f"{size} bytes with no DICOM/PNG/JPEG/TIFF signature")


def _head(path: Path) -> tuple[int, bytes]:
    """Size and first 132 bytes of a regular file (a FIFO, socket or device is refused unopened: it could block).

    Raises:
        QuarantineError: ``unreadable`` (missing, not a regular file, no permission).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO would block a plain open()
    except OSError as exc:
        raise QuarantineError("unreadable", f"{type(exc).__name__}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        check_regular(info.st_mode)
        try:
            return info.st_size, fh.read(132)
        except OSError as exc:
            raise QuarantineError("unreadable", f"{type(exc).__name__}: {exc.strerror}") from exc


def check_regular(mode: int) -> None:
    """Raise ``unreadable`` unless ``mode`` (an ``st_mode``) is a regular file: never read a FIFO, socket or device."""
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise QuarantineError("unreadable", f"not a regular file ({kind})")


def inflate_limit(max_pixels: int) -> int:
    """Bytes a deflated DICOM data set may inflate to (see :data:`INFLATE_BYTES_PER_PIXEL`)."""
    return max_pixels * INFLATE_BYTES_PER_PIXEL + INFLATE_HEADER_BYTES


def _check_inflation(fp: Any, limit: int) -> None:
    """Inflate the raw deflate stream from ``fp``'s position, discarding the output, and stop past the limit.

    The limit is ``limit`` (from ``max_pixels``), tightened once the first :data:`_INFLATE_HEAD` inflated bytes
    are in, if they hold the header up to the pixel data: then the data set may not inflate to much more than that
    header declares (:func:`_declared_end`), so a file whose header says 1 x 1 is stopped after a few MB. Memory is
    bounded by :data:`_INFLATE_CHUNK` whatever the stream holds (deflate expands up to ~1032:1, so a 1 MB file can
    hold 1 GB).

    Raises:
        QuarantineError: ``too_large`` past the limit, ``corrupt`` past what the header declares or for an invalid
            stream, ``truncated`` if it ends early.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 and pydicom's reader use
    total, head, declared = 0, bytearray(), None
    try:
        while not inflater.eof and (chunk := fp.read(_INFLATE_CHUNK)):
            while chunk:
                out = inflater.decompress(chunk, _INFLATE_CHUNK)
                total += len(out)
                if len(head) < _INFLATE_HEAD:
                    head += out[:_INFLATE_HEAD - len(head)]
                    if len(head) == _INFLATE_HEAD:
                        declared = _declared_end(bytes(head))
                if declared is not None and total > declared:
                    raise QuarantineError(
                        "corrupt", f"the deflated data set inflates to more than {declared} bytes, far more than "
                        "its header declares for its pixel data")
                if total > limit:
                    raise QuarantineError(
                        "too_large", f"the deflated data set inflates to more than {limit} bytes (the limit for "
                        f"ingest.max_pixels x {INFLATE_BYTES_PER_PIXEL} bytes + {INFLATE_HEADER_BYTES} bytes)")
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise QuarantineError("corrupt", "the deflated data set is not a valid deflate stream") from exc
    if not inflater.eof:
        raise QuarantineError("truncated", "the deflated data set ends early")


def _declared_end(head: bytes) -> int | None:
    """Where an inflated data set should end at the most, from its first bytes: the offset of its pixel data plus
    :data:`_PIXEL_EXCESS_FACTOR` times the size Rows x Columns x ... declare, plus :data:`_INFLATE_TAIL_BYTES` for
    elements after the pixel data. None when ``head`` does not reach the pixel data or lacks what the size needs."""
    fp = DicomBytesIO(head)
    fp.is_little_endian, fp.is_implicit_VR = True, False  # PS3.5 A.5: deflated data sets are Explicit VR LE
    try:
        ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                          stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS)
        start = fp.tell()
        if struct.unpack("<HH", head[start:start + 4]) not in ((t.group, t.elem) for t in _PIXEL_TAGS):
            return None  # the header did not fit in head
        expected = get_expected_length(ds, "bytes")
    except _HEADER_ERRORS:
        return None  # pydicom's own parse decides what is wrong with the header
    return start + _PIXEL_EXCESS_FACTOR * expected + _INFLATE_TAIL_BYTES


def _frame_index(frames: int, multiframe: Multiframe) -> int:
    if frames <= 1:
        return 0
    if multiframe == "reject":
        raise QuarantineError("multiframe_rejected", f"{frames} frames with ingest.multiframe=reject")
    return 0 if multiframe == "first" else frames // 2


def _check_size(rows: int, cols: int, frames: int, max_pixels: int, what: str = "rows x columns x frames") -> None:
    n = rows * cols * frames
    if n > max_pixels:
        raise QuarantineError("too_large",
                              f"{what} = {rows} x {cols} x {frames} = {n} > ingest.max_pixels {max_pixels}")


def _ts_name(tsyntax: UID) -> str:
    """The transfer syntax's registered name; a UID that is not in the DICOM registry is described, not quoted."""
    return tsyntax.name if tsyntax in UID_dictionary else "a transfer syntax that is not in the DICOM registry"


def _decode_dicom(
    source: Path | io.BytesIO, size: int, max_pixels: int, multiframe: Multiframe, pseudonymise: bool, force: bool
) -> Decoded:
    with warnings.catch_warnings(record=True) as caught:
        # pydicom warnings can quote element values (names, dates): record them (never shown) instead of printing.
        warnings.simplefilter("always")
        try:
            _bound_inflation(source, force, max_pixels)
            # Content already in memory is parsed as is; from a path, pixel data larger than _DEFER_SIZE stays on
            # disk until the header checks have passed.
            ds = pydicom.dcmread(source, defer_size=_DEFER_SIZE if isinstance(source, Path) else None, force=force)
        except EOFError as exc:
            raise QuarantineError("truncated", "DICOM header ends early") from exc
        except _HEADER_ERRORS as exc:
            # The message may quote header bytes, so only the exception type is reported.
            raise QuarantineError("corrupt" if not force else "not_an_image",
                                  f"DICOM header could not be parsed ({type(exc).__name__})") from exc
        try:
            tsyntax = _transfer_syntax(ds)
            if _is_truncated(ds, size, tsyntax, caught):
                raise QuarantineError("truncated", "the file ends inside a DICOM element")
            return _decode_dataset(ds, tsyntax, max_pixels, multiframe, pseudonymise)
        except QuarantineError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            # An element pydicom could not convert (e.g. Rows "abc"): type only, the value may be anything.
            raise QuarantineError("corrupt", f"invalid DICOM element value ({type(exc).__name__})") from exc


def _bound_inflation(source: Path | io.BytesIO, force: bool, max_pixels: int) -> None:
    """For a deflated data set, check its inflated size (:func:`_check_inflation`) before pydicom inflates it whole.

    The file meta is read the way :func:`pydicom.dcmread` reads it (its own preamble and file-meta readers; the public
    ``read_file_meta_info`` only takes a path), so the transfer syntax seen here is the one pydicom acts on, and the
    stream starts where pydicom's inflation starts. Header errors are left to :func:`pydicom.dcmread`, which reports
    them in the usual way.
    """
    if isinstance(source, io.BytesIO) and _DEFLATED_UID not in source.getvalue():  # getvalue(): the bytes, uncopied
        return  # the deflated transfer syntax's UID is nowhere in the file: skip the parse (~0.3 ms)
    fp = source.open("rb") if isinstance(source, Path) else source
    try:
        read_preamble(fp, force)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            _check_inflation(fp, inflate_limit(max_pixels))
    except QuarantineError:
        raise
    except _HEADER_ERRORS:
        pass  # the same parse fails again in dcmread, which maps the error to a reason
    finally:
        if isinstance(source, Path):
            fp.close()
        else:
            fp.seek(0)


def _is_truncated(ds: pydicom.Dataset, size: int, tsyntax: UID, caught: list[warnings.WarningMessage]) -> bool:
    """True when the file ends before the data it declares: pydicom reads short values silently (or only warns).

    Runs before any element of ``ds`` is read: only elements still in their raw (as read) form carry file offsets.
    """
    if any("end of file" in str(w.message).lower() for w in caught):
        return True
    group_length = ds.file_meta.get("FileMetaInformationGroupLength") if hasattr(ds, "file_meta") else None
    if group_length is not None and ds.preamble is not None and 132 + 12 + int(group_length) > size:
        return True  # 128-byte preamble + "DICM" + the 12-byte group length element itself (PS3.10 7.1)
    if tsyntax == DeflatedExplicitVRLittleEndian:
        return False  # element offsets refer to the inflated stream, not to the file
    # ds.values() is the elements as stored, like ds.elements() without its per-element lookup by tag.
    end = max((elem.value_tell + elem.length for elem in ds.values()
               if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH), default=0)
    # A value cut short, or 1-7 stray bytes after the last element: the start of an element header (8 bytes, PS3.5
    # 7.1.2) that pydicom drops silently.
    return end > size or 0 < size - end < 8


def _tags(keywords: Iterable[str]) -> tuple[tuple[str, BaseTag], ...]:
    return tuple((keyword, BaseTag(tag_for_keyword(keyword))) for keyword in keywords)


# The header elements decoding reads, each looked up once per file by its tag into a plain dict (_header), instead
# of ~30 Dataset.get("Keyword") calls per file, each of which maps the keyword to a tag and, for an absent element,
# raises and catches an AttributeError (pydicom 3.0).
_PIXEL_TAGS = tuple(tag for _, tag in _tags(_PIXEL_KEYWORDS))
_IMAGE_TAGS = _tags((
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BurnedInAnnotation",
    "RescaleSlope",
    "RescaleIntercept", "ModalityLUTSequence", "VOILUTSequence", "VOILUTFunction", "WindowCenter", "WindowWidth",
))
# Read only after the pixels decoded, as before this lookup existed: a file with several problems keeps its reason.
_FACT_TAGS = _tags(dict.fromkeys(k for keywords in deid.KEPT_FACTS.values() for k in keywords))
_PATIENT_TAGS = _tags(deid.PATIENT_KEYWORDS)


def _header(ds: pydicom.Dataset, tags: tuple[tuple[str, BaseTag], ...]) -> dict[str, Any]:
    """``{keyword: value}`` of the elements of ``tags`` present in ``ds`` (the values ``ds.get(keyword)`` returns)."""
    return {keyword: ds[tag].value for keyword, tag in tags if tag in ds}


def _decode_dataset(
    ds: pydicom.Dataset, tsyntax: UID, max_pixels: int, multiframe: Multiframe, pseudonymise: bool
) -> Decoded:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise QuarantineError("no_pixel_data", "no (7FE0,0010) Pixel Data element")
    header = _header(ds, _IMAGE_TAGS)
    if str(header.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        # Burned-in text (name, date of birth) is a known PHI risk of DXA exports; unflagged text is NOT detected.
        raise QuarantineError("burned_in_annotation", "BurnedInAnnotation=YES")
    rows, cols = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise QuarantineError("corrupt", f"Rows={rows} Columns={cols}")
    frames = int(header.get("NumberOfFrames") or 1)
    if frames < 1:
        raise QuarantineError("corrupt", f"NumberOfFrames={frames}; expected a positive count")
    _check_size(rows, cols, frames, max_pixels)
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GRAY + _COLOR:
        raise QuarantineError("unsupported_photometric", _photometric_detail(photometric))
    index = _frame_index(frames, multiframe)
    name = _ts_name(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise QuarantineError("unsupported_transfer_syntax", f"{name}: no decoder") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoding plugin installed"
        raise QuarantineError("unsupported_transfer_syntax", f"{name}: {missing}")
    if tsyntax.is_encapsulated:
        _check_codestream(ds, tsyntax, index, frames, (rows, cols, int(header.get("SamplesPerPixel") or 1)),
                          max_pixels)
    else:
        _check_native_length(ds)
    try:
        # view_only: native pixel data comes back as a read-only view on the element's bytes instead of a copy (every
        # path below makes its own float copy), 2 bytes a pixel less at the peak.
        arr, _ = decoder.as_array(ds, index=index, view_only=True)
    except ValueError as exc:
        # pydicom's messages can quote element values: only the kind of problem is reported.
        if "less than expected" in str(exc):
            raise QuarantineError("truncated", f"{name}: the pixel data is shorter than the header declares") from exc
        raise QuarantineError("corrupt", f"{name}: the pixel data could not be decoded ({type(exc).__name__})") from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise QuarantineError("corrupt", f"{name}: the codec could not decode the pixel data "
                                         f"({type(exc).__name__})") from exc

    converted = photometric in _COLOR or arr.ndim == 3
    if converted:
        pixels = _luma(arr[..., :3]) if arr.ndim == 3 else arr.astype(np.float64)
    else:
        pixels = _apply_voi(_apply_modality(arr, header, ds), header, ds)
        if photometric == "MONOCHROME1":
            pixels = _invert(pixels)
    meta = deid.kept_facts(_header(ds, _FACT_TAGS))
    meta.update(orig_height=int(pixels.shape[0]), orig_width=int(pixels.shape[1]), frames=frames,
                photometric=photometric)
    return Decoded(
        pixels=_as_float2d(pixels),
        meta=meta,
        format="dicom",
        converted_from_color=converted,
        patient_id=deid.dicom_pseudonym(_header(ds, _PATIENT_TAGS)) if pseudonymise else None,
        phi_values=burnedin.header_phi_values(ds),
    )


def _photometric_detail(photometric: str) -> str:
    """Why a Photometric Interpretation is refused, naming it only if it is a DICOM defined term (else it could be
    anything a writer put there, a patient's name included)."""
    expected = ", ".join(_GRAY + _COLOR)
    if not photometric:
        return f"PhotometricInterpretation is missing; expected one of {expected}"
    if photometric in PHOTOMETRIC_TERMS:
        return f"{photometric} is not supported; expected one of {expected}"
    return (f"PhotometricInterpretation is not one of the DICOM defined terms (value not shown); "
            f"expected one of {expected}")


def _pixel_element_length(ds: pydicom.Dataset) -> int | None:
    """Length in bytes of the pixel data element as stored (None: undefined length), without reading a deferred value.

    ``Dataset.get_item`` returns the element as read (a RawDataElement, whose value a deferred read has not loaded);
    indexing ``ds[tag]`` would read the value.
    """
    tag = next(tag for tag in _PIXEL_TAGS if tag in ds)
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return None if elem.length == _UNDEFINED_LENGTH else elem.length
    value = elem.value
    return len(value) if isinstance(value, (bytes, bytearray)) else None


def _check_native_length(ds: pydicom.Dataset) -> None:
    """Refuse native pixel data much longer than the header declares, before it is read (see the module docstring)."""
    length = _pixel_element_length(ds)
    if length is None:
        return
    expected = get_expected_length(ds, "bytes")
    if length > _PIXEL_EXCESS_FACTOR * expected + _PIXEL_EXCESS_BYTES:
        raise QuarantineError(
            "corrupt", f"the pixel data holds {length} bytes, far more than the {expected} bytes that "
            "Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated declare")


def _check_codestream(
    ds: pydicom.Dataset, tsyntax: UID, index: int, frames: int, header_shape: tuple[int, int, int], max_pixels: int
) -> None:
    """Check the frame's codestream's own size (JPEG / JPEG-LS SOF, JPEG 2000 SIZ) before a codec allocates it.

    A codec allocates what its codestream declares, whatever Rows and Columns say, so both the limit and agreement
    with the header are checked on the codestream itself. Other encapsulated syntaxes (RLE, deflate-based, video)
    decode into the header's size.

    Raises:
        QuarantineError: ``too_large`` (the codestream's pixels exceed ``max_pixels``) or ``corrupt`` (no frame, no
            readable size marker, or a size or component count different from Rows, Columns, SamplesPerPixel).
    """
    if tsyntax in JPEG2000TransferSyntaxes:
        marker, parse = "SIZ", j2k_size
    elif tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
        marker, parse = "SOF", jpeg_size
    else:
        return
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as exc:
        raise QuarantineError("corrupt", f"encapsulated pixel data: frame {index} cannot be located "
                                         f"({type(exc).__name__})") from exc
    size = parse(frame)
    if size is None:
        raise QuarantineError("corrupt", f"{_ts_name(tsyntax)}: the codestream has no readable {marker} marker")
    rows, cols, components = size
    _check_size(rows, cols, frames, max_pixels, what=f"the codestream's own size ({marker}) x frames")
    if (rows, cols, components) != header_shape:
        raise QuarantineError(
            "corrupt", f"the codestream's own size ({marker}) {rows} x {cols} x {components} differs from "
            f"Rows x Columns x SamplesPerPixel {header_shape[0]} x {header_shape[1]} x {header_shape[2]}")


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # ISO/IEC 15444-1 I.5.1: the first box of a JP2 file


def j2k_size(codestream: bytes) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from a JPEG 2000 codestream's SIZ marker (ISO/IEC 15444-1 A.5.1), else None.

    :func:`pydicom.pixels.utils.get_j2k_parameters` finds the same marker (and skips a JP2 wrapper, which some
    writers put in DICOM against PS3.5 A.4.4) but returns only precision and sign, so the size fields are read here:
    SOC, SIZ, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (32-bit), four tile fields, Csiz (16-bit). The image is
    (Xsiz - XOsiz) x (Ysiz - YOsiz). Reads a few bytes; allocates nothing.
    """
    offset = 0
    if codestream.startswith(_JP2_SIGNATURE):
        offset = 12
        while offset + 8 <= len(codestream):  # boxes: 32-bit length, 4-byte type; find the contiguous codestream
            length = int.from_bytes(codestream[offset:offset + 4], "big")
            if codestream[offset + 4:offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None  # 0 (to the end) or 1 (64-bit length) before jp2c: not a layout DICOM writers use
            offset += length
    siz = codestream[offset:offset + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", siz[8:24])
    (csiz,) = struct.unpack(">H", siz[40:42])
    if xsiz <= xosiz or ysiz <= yosiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, csiz


def jpeg_size(codestream: bytes) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from a JPEG or JPEG-LS frame header (SOF), by pydicom's own marker parser.

    ``pydicom.pixels.utils._get_jpg_parameters`` is what pydicom's decoders use to read JPEG parameters (private but
    pinned with pydicom < 4; tests/test_imaging.py covers it). A height of 0 (defined later by a DNL marker) cannot
    be checked and gives None.
    """
    info = _get_jpg_parameters(codestream)
    if not info.get("height") or not info.get("width"):
        return None
    return int(info["height"]), int(info["width"]), int(info.get("components", 0))


def _apply_modality(arr: np.ndarray, header: dict[str, Any], ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT or Rescale Slope/Intercept (PS3.3 C.11.1), in float32.

    A Modality LUT Sequence goes through :func:`pydicom.pixels.apply_modality_lut`. A rescale is computed here in
    float32 (exact for the 16-bit stored values times the small slopes of DXA exports) instead of pydicom's float64:
    half the memory traffic, ~0.5 ms less per 256 x 192 image (measured), and an identity rescale costs nothing.
    """
    if header.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds).astype(np.float32)
    pixels = arr.astype(np.float32)
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        pixels *= np.float32(slope)
    if intercept != 0.0:
        pixels += np.float32(intercept)
    return pixels


def _apply_voi(pixels: np.ndarray, header: dict[str, Any], ds: pydicom.Dataset) -> np.ndarray:
    """Apply the first VOI LUT or window of ``ds`` (PS3.3 C.11.2), if any.

    A LINEAR window maps [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2] linearly onto the output range and clips
    outside it (PS3.3 C.11.2.1.2.1). :func:`normalise` then maps robust percentiles linearly onto 0..65535, which
    absorbs any increasing linear map, so only the clipping changes the result: it is applied as a clip in modality
    units, ~20x cheaper than :func:`pydicom.pixels.apply_windowing` (1.1 ms of a 256 x 192 image, measured). VOI LUT
    sequences and the non-linear SIGMOID / LINEAR_EXACT functions go through pydicom. A window width below 1 is
    invalid (PS3.3 C.11.2.1.2) and ignored rather than failing the image.
    """
    function = str(header.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if header.get("VOILUTSequence") or function != "LINEAR":
        return apply_voi_lut(pixels, ds, index=0)
    if header.get("WindowCenter") is None or header.get("WindowWidth") is None:
        return pixels
    center, width = _first(header["WindowCenter"]), _first(header["WindowWidth"])
    if width < 1:
        return pixels
    return np.clip(pixels, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2, out=pixels)


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued numeric element (several windows: the first is the default)."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The file's transfer syntax; for files without file meta, the one pydicom detected while reading."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        return UID(str(tsyntax))
    implicit, little = ds.original_encoding
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = uid  # the in-memory copy only: raw input is never written
    return uid


def _invert(pixels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 -> bone bright: reflect the values within their own range."""
    pixels = pixels.astype(np.float32, copy=False)
    return pixels.max() + pixels.min() - pixels


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.709 luma of an RGB array, by :func:`skimage.color.rgb2gray` (values scaled to 0..1).

    Imported on first use: scikit-image pulls in scipy.linalg, ~0.45 s of start-up (python -X importtime) that the
    grayscale files of a DXA export never need.
    """
    from skimage.color import rgb2gray

    return rgb2gray(rgb)


def _as_float2d(pixels: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(pixels, dtype=np.float32)
    if out.ndim != 2:
        raise QuarantineError("corrupt", f"decoded pixel array has shape {out.shape}; expected 2-D")
    if not _all_finite(out):
        raise QuarantineError("corrupt", "pixel values include NaN or infinity")
    return out


def _all_finite(pixels: np.ndarray) -> bool:
    """No NaN or infinity in ``pixels``: min and max propagate NaN, so two reductions decide it without the 1-byte-a-
    pixel temporary of ``np.isfinite(pixels).all()``."""
    return pixels.size == 0 or bool(np.isfinite(pixels.min()) and np.isfinite(pixels.max()))


def _decode_pil(source: Path | io.BytesIO, kind: str, max_pixels: int, multiframe: Multiframe) -> Decoded:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the bomb guard (it runs on the header, before decoding). PIL's
            # DecompressionBombError (at 2 x Image.MAX_IMAGE_PIXELS) stays as a backstop and maps to too_large.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=[_PIL_FORMATS[kind]]) as img:
                width, height = img.size
                frames = int(getattr(img, "n_frames", 1))
                _check_size(height, width, frames, max_pixels)
                index = _frame_index(frames, multiframe)
                if index:
                    img.seek(index)
                img.load()
                return _from_pil(img, kind, frames)
    except QuarantineError:
        raise
    except Image.DecompressionBombError as exc:
        raise QuarantineError("too_large", f"{kind}: more pixels than Pillow's decompression-bomb limit") from exc
    except UnidentifiedImageError as exc:
        raise QuarantineError("corrupt", f"{kind} signature but the header cannot be parsed") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow's messages can quote bytes of the file (e.g. a TIFF header): only the kind of problem is reported.
        if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
            raise QuarantineError("truncated", f"{kind}: the image data ends early") from exc
        raise QuarantineError("corrupt", f"{kind}: the image data could not be decoded ({type(exc).__name__})") from exc


def _from_pil(img: Image.Image, kind: str, frames: int) -> Decoded:
    mode = img.mode
    bits = _PIL_BITS.get(mode)
    if bits is None:
        raise QuarantineError("unsupported_photometric", f"{kind} mode {mode}")
    converted = mode in _PIL_COLOR_MODES
    if converted:
        pixels = _luma(np.asarray(img.convert("RGB")))
    elif mode in ("LA", "1"):
        pixels = np.asarray(img.convert("L"))  # drop alpha / expand bilevel; grayscale either way
    else:
        pixels = np.asarray(img)
    meta = {
        "orig_height": int(pixels.shape[0]),
        "orig_width": int(pixels.shape[1]),
        "pixel_spacing_mm": None,  # PNG pHYs / TIFF resolution are rarely set from the detector: not trusted
        "modality": None,
        "photometric": "RGB" if converted else "MONOCHROME2",
        "bits_stored": bits,
        "frames": frames,
    }
    return Decoded(pixels=_as_float2d(pixels), meta=meta, format=kind, converted_from_color=converted)


def target_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Return (height, width) scaled so that the longest side is at most ``max_side``, aspect kept, never enlarged."""
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def _percentile_sample(img: np.ndarray) -> np.ndarray:
    """The pixels on a regular grid of at most :data:`PERCENTILE_SAMPLE` points (all pixels of a small image).

    Percentiles need a partial sort, the costliest step of normalise() (about 1 ms for 256 x 192 under load,
    measured). With n = 16,384 samples the standard error of the 0.5th percentile is sqrt(p (1 - p) / n) = 0.06
    percentile points, far below what the window needs, and a regular grid keeps the result deterministic.
    """
    step = max(1, int(np.ceil(np.sqrt(img.size / PERCENTILE_SAMPLE))))
    return img[::step, ::step]


def normalise(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Resize and window a decoded image to uint16 (0..65535), bone bright.

    The image is first shrunk, if its longest side exceeds ``max_side``, with Pillow's Lanczos filter (its support
    widens with the reduction factor, so downscaling is anti-aliased); the aspect ratio is kept and nothing is
    padded or enlarged. Then the 0.5th / 99.5th percentiles (:data:`WINDOW_PERCENTILES`, estimated on a regular grid
    of at most 16,384 pixels) map linearly to 0 / 65535, with clipping. A constant image becomes all zeros (validate
    flags it as blank).

    Raises:
        ValueError: ``pixels`` is not a finite 2-D array, or ``max_side`` < 1.
    """
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f"normalise: expected a non-empty 2-D array, got shape {pixels.shape}")
    if max_side < 1:
        raise ValueError(f"normalise: max_side={max_side}; expected >= 1")
    img = np.asarray(pixels, dtype=np.float32)
    if not _all_finite(img):
        raise ValueError("normalise: pixels include NaN or infinity")
    height, width = img.shape
    new_h, new_w = target_size(height, width, max_side)
    if (new_h, new_w) != (height, width):
        # frombuffer shares the float32 buffer with Pillow (Image.fromarray would copy it: 4 bytes a pixel more).
        source = Image.frombuffer("F", (width, height), np.ascontiguousarray(img), "raw", "F", 0, 1)
        img = np.asarray(source.resize((new_w, new_h), Image.Resampling.LANCZOS))
    lo, hi = np.percentile(_percentile_sample(img), WINDOW_PERCENTILES)
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint16)
    out = np.subtract(img, np.float32(lo))  # one float32 buffer, updated in place (same values as out-of-place)
    out *= np.float32(U16_MAX / (hi - lo))
    np.clip(out, 0, U16_MAX, out=out)
    return np.rint(out, out=out).astype(np.uint16)
