"""Ingest: walk a source directory, label each file, decode and normalise it in worker processes, write the manifest.

Every file under the source is an input and gets exactly one manifest row (docs/CONTRACTS.md), accepted or quarantined
with a reason; the only exceptions are a top-level ``labels.csv``, which is the labelling, not an input, and
Snakemake's empty ``.snakemake_timestamp`` marker, which Snakemake writes into every directory output (the default
source is the synthesize stage's): with it counted, a Snakemake run's manifest would have one more row than
``dvc repro``'s. Other hidden files count (a ``.DS_Store`` is quarantined as ``not_an_image``).

Links and special files (docs/CONTRACTS.md): directory symlinks are followed when they lead out of the tree being
walked (a class folder linked from another disk), each real directory once, so a loop or a second link to a folder
gets one ``symlink_repeat`` row instead of an endless walk; a file symlink is read only if its target lies inside
``data.source`` (or inside the linked folder it sits in), else ``symlink_outside_source``, unread; a dangling link is
``symlink_dangling``; a FIFO, socket or device is ``unreadable`` and never opened (reading one could block forever).

Labelling: if ``<source>/labels.csv`` exists it is the only labelling (``path,label[,patient_id]``, paths relative to
the source, ``/``-separated); otherwise a file's top-level folder under the source is its label (``normal/``,
``osteopenia/``, ``osteoporosis/``). The label found goes through the task's label policy (:mod:`spinedxa.task`):
a class, or mapped by ``data.class_map`` onto a class or ``drop`` (status ``dropped``: read for its sha256, never
decoded, not a quarantine). A file with no label is quarantined ``no_label``; a label neither a class nor in the
map, ``unknown_label``. Once every file has its row, the duplicate rule (:mod:`spinedxa.duplicates`) resolves exact
copies: one kept, the others ``duplicate``; copies under different labels all ``label_conflict``.

Streaming: the directory is walked lazily and fed to a process pool in chunks with a bounded number in flight, rows
are appended to a temporary CSV as they arrive and sorted once at the end, when only the small rows (not images) are
held in memory. Each file is read once: its bytes give the sha256 and are decoded from memory. Per-file problems
never stop the run; systemic ones (source missing, labels.csv malformed, a worker process killed, no file accepted)
raise :class:`IngestError` after the summary has been written.

Workers: :class:`concurrent.futures.ProcessPoolExecutor`, which notices a worker that dies (the OOM killer's
SIGKILL, a crash in a codec) and fails its pending tasks with ``BrokenProcessPool``; ``multiprocessing.Pool`` never
reports such a task and would wait forever. Each worker caps its own address space (``ingest.worker_memory_mb`` above
its size at start-up), so a file that needs more memory than any sane image is quarantined ``too_large`` from the
``MemoryError`` instead of getting the worker, or the machine, killed.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import posixpath
import resource
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spinedxa import burnedin, deid, duplicates, roi as roi_locator
from spinedxa.config import IngestConfig
from spinedxa.errors import UserError
from spinedxa.task import Task
from spinedxa.contracts import manifest as manifest_contract, png16
from spinedxa.files import atomic_dir, write_checksums, write_json_atomic
from spinedxa.imaging import Decoded, QuarantineError, check_regular, decode_file, normalise

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
#: Snakemake's marker in a directory output (see the module docstring; .dvcignore keeps it out of DVC's hashes).
SNAKEMAKE_MARKER = ".snakemake_timestamp"
MANIFEST = manifest_contract.FILE_NAME
IMAGES_DIR = manifest_contract.IMAGES_DIR
ROI_DIR = manifest_contract.ROI_DIR
MANIFEST_COLUMNS = manifest_contract.COLUMNS
_LABEL_COLUMNS = ("path", "label", "patient_id")
_CHUNKSIZE = 16         # files per task sent to a worker: amortises IPC for ~ms-per-file work
_CHUNKS_PER_WORKER = 4  # chunks in flight per worker: bounds memory while keeping workers busy
# labels.csv is read whole (to report the line of a decoding error); a labelling of 10^6 files is ~50 MB.
_LABELS_MAX_BYTES = 256 * 2**20
# Files up to this size are read into memory once, for their sha256 and for decoding (pydicom parsing a path makes
# ~120 small reads per file: ~0.15 ms more per 100 kB DICOM than parsing the same bytes in memory, measured). Larger files are hashed
# in chunks and decoded from disk, so a worker's memory stays bounded whatever the source holds.
_IN_MEMORY_MAX = 32 * 2**20


class IngestError(UserError, RuntimeError):
    """A systemic problem that stops the stage (the summary has already been written)."""


class LabelsError(IngestError):
    """``labels.csv`` is malformed (the message names the file and line)."""


@dataclass(frozen=True)
class SourceItem:
    """One input file as found by the walk: path relative to the source, its label or the labelling problem."""

    source: str
    label: str = ""
    label_problem: str = ""  # "" or a quarantine reason string ("no_label: ...", "unknown_label: ...")
    patient_hint: str = ""   # labels.csv patient_id (PHI: only ever hashed)
    walk_problem: str = ""   # "" or a reason decided by the walk (links, special files): the file is never opened
    label_found: str = ""    # the label as found (folder name or labels.csv), before data.class_map
    dropped: str = ""        # "" or why data.class_map drops it (status dropped: hashed, never decoded)


@dataclass(frozen=True)
class FoundFile:
    """One entry of :func:`iter_files`: a ``/``-separated path relative to the walked root, and why it must not be
    read (``""``: read it), as a quarantine reason ``<code>: <detail>``."""

    rel: str
    problem: str = ""


@dataclass(frozen=True)
class FileJob:
    """Everything a worker needs to process one file (picklable, sent once per task chunk)."""

    source_dir: Path
    out_dir: Path  # the (temporary) output directory; images go to out_dir/images/
    settings: IngestConfig  # max_side, max_pixels, multiframe, burned_in_text, roi, roi_height, worker_memory_mb


def read_labels(path: Path, classes: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Read ``labels.csv`` into ``{relative posix path: (label, patient_id)}``.

    Encoding: UTF-8 (with or without a byte-order mark, as Excel's "CSV UTF-8" writes it) or UTF-16 with a
    byte-order mark (Excel's "Unicode Text"; the mark makes it unambiguous). Anything else, e.g. latin-1, is refused
    with the line of the first undecodable byte rather than guessed: a wrong guess would silently change paths.

    Raises:
        LabelsError: unreadable or too large, not UTF-8 / UTF-16 with BOM, a NUL character, a field over the csv
            module's limit (131,072 characters), wrong header, wrong number of fields, an empty, absolute or
            escaping path, or a duplicate path. Every message names the file, and the line where there is one.
    """
    out: dict[str, tuple[str, str]] = {}
    reader = csv.DictReader(io.StringIO(_labels_text(path), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        if header[:2] != ["path", "label"] or not set(header) <= set(_LABEL_COLUMNS) or len(set(header)) != len(header):
            raise LabelsError(f"{path}:1: header must be 'path,label' or 'path,label,patient_id'; got "
                              f"{len(header)} column(s) that are not these")
        reader.fieldnames = header
        for record in reader:
            line = reader.line_num
            if None in record or None in record.values():
                raise LabelsError(f"{path}:{line}: expected {len(header)} fields ({','.join(header)})")
            rel = _clean_relpath(record["path"], path, line)
            if rel == LABELS_FILE:
                raise LabelsError(f"{path}:{line}: labels.csv cannot label itself")
            if rel in out:
                raise LabelsError(f"{path}:{line}: duplicate path {rel!r}")
            out[rel] = (record["label"].strip(), (record.get("patient_id") or "").strip())
    except csv.Error as exc:
        # The csv module's messages are fixed texts ("field larger than field limit (131072)"), never content.
        # DictReader.line_num is only updated after a successful row; its csv.reader knows the line that failed.
        raise LabelsError(f"{path}:{max(reader.reader.line_num, 1)}: {exc}; paths and labels are short, one record per "
                          "line") from exc
    return out


def _labels_text(path: Path) -> str:
    """The text of labels.csv: UTF-8 (BOM optional) or UTF-16 with a BOM (see :func:`read_labels`)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(_LABELS_MAX_BYTES + 1)
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(raw) > _LABELS_MAX_BYTES:
        raise LabelsError(f"{path}: larger than {_LABELS_MAX_BYTES // 2**20} MiB; a labelling is a few bytes a file")
    utf16 = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not raw.startswith(codecs.BOM_UTF32_LE)
    encoding, name = ("utf-16", "UTF-16") if utf16 else ("utf-8-sig", "UTF-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].decode(encoding, errors="replace").count("\n") + 1
        hint = " (NUL bytes: UTF-16 without a byte-order mark?)" if not utf16 and b"\x00" in raw[:4096] else ""
        raise LabelsError(
            f"{path}:{line}: not valid {name} (undecodable byte at offset {exc.start}){hint}; save labels.csv as "
            "UTF-8 (e.g. Excel's 'CSV UTF-8') or as UTF-16 with a byte-order mark; latin-1 / Windows-1252 is not read"
        ) from exc
    if (nul := text.find("\x00")) >= 0:  # the csv module reads NUL as a character (Python >= 3.11)
        raise LabelsError(f"{path}:{text.count(chr(10), 0, nul) + 1}: contains a NUL character (UTF-16 or UTF-32 "
                          "without a byte-order mark?); save labels.csv as UTF-8")
    return text


def _clean_relpath(raw: str, labels: Path, line: int) -> str:
    rel = raw.strip().replace("\\", "/")
    norm = posixpath.normpath(rel) if rel else ""
    if not rel or rel.startswith("/") or norm == ".." or norm.startswith("../"):
        raise LabelsError(f"{labels}:{line}: path {raw!r} must be relative to the source directory and stay inside it")
    return norm


_REPEAT = ("symlink_repeat: a folder that is walked through another path already (a link back into the tree, a "
           "loop, or a second link to it); its files have rows under that path")
_OUTSIDE = ("symlink_outside_source: file link whose target is outside data.source (and outside the linked folder it "
            "is in); not read")


def iter_files(source: Path) -> Iterator[FoundFile]:
    """Yield every entry under ``source`` that is not a walked directory, lazily, sorted by name per directory.

    Hidden files are included. Directory symlinks that lead out of the tree being walked are followed, each real
    directory once; a link back into it (a loop or a second name), a file link pointing outside it, a dangling link
    and a special file are yielded with a ``problem`` (see the module docstring), never opened. "The tree being
    walked" is the real ``source`` plus the real targets of the directory links above the entry.

    Raises:
        IngestError: a directory cannot be listed (files would be missed silently otherwise).
    """
    def key(info: os.stat_result) -> tuple[int, int]:
        return info.st_dev, info.st_ino

    root = os.path.realpath(source)
    seen = {key(os.stat(source))}  # real directories already walked or queued
    stack: list[tuple[str, str, tuple[str, ...]]] = [("", os.fspath(source), (root,))]
    while stack:
        rel_dir, path, roots = stack.pop()
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            raise IngestError(f"cannot list {path}: {exc.strerror}") from exc
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            link = entry.is_symlink()
            try:
                info = os.stat(entry.path) if link else entry.stat(follow_symlinks=False)
            except OSError as exc:
                problem = {errno.ELOOP: "a cycle of links", errno.ENOENT: "its target does not exist",
                           errno.ENOTDIR: "its target does not exist"}.get(exc.errno, f"its target: {exc.strerror}")
                yield FoundFile(rel, f"symlink_dangling: {problem}" if link else
                                f"unreadable: {type(exc).__name__}: {exc.strerror}")
                continue
            if stat.S_ISDIR(info.st_mode):
                real = os.path.realpath(entry.path)
                if key(info) in seen or (link and any(_within(real, r) for r in roots)):
                    yield FoundFile(rel, _REPEAT)
                    continue
                seen.add(key(info))
                subdirs.append((rel, entry.path, (*roots, real) if link else roots))
            elif link and not any(_within(os.path.realpath(entry.path), r) for r in roots):
                yield FoundFile(rel, _OUTSIDE)
            elif not stat.S_ISREG(info.st_mode):
                yield FoundFile(rel, "unreadable: not a regular file (a FIFO, socket or device); not opened")
            else:
                yield FoundFile(rel)
        stack.extend(reversed(subdirs))  # depth first, in name order


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies under it (both real, absolute paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def iter_sources(
    source: Path, task: Task, labels: dict[str, tuple[str, str]] | None
) -> Iterator[SourceItem]:
    """Yield a labelled :class:`SourceItem` per input file (``labels`` from :func:`read_labels`; None: folders)."""
    for found in iter_files(source):
        rel = found.rel
        if rel.rpartition("/")[2] == SNAKEMAKE_MARKER and not found.problem and (source / rel).stat().st_size == 0:
            continue
        if found.problem:
            if rel != LABELS_FILE or labels is None:
                yield SourceItem(rel, walk_problem=found.problem)
            continue
        if labels is not None:
            if rel == LABELS_FILE:
                continue
            if rel not in labels:
                yield SourceItem(rel, label_problem=f"no_label: not listed in {LABELS_FILE}")
                continue
            label, patient = labels[rel]
            yield _labelled(rel, label, task, patient, where=LABELS_FILE)
        else:
            top, sep, _ = rel.partition("/")
            if not sep:
                yield SourceItem(rel, label_problem="no_label: file is not inside a class folder")
            else:
                yield _labelled(rel, top, task, "", where="folder")


def _labelled(rel: str, label: str, task: Task, patient: str, where: str) -> SourceItem:
    """The item of a labelled file, after the task's label policy (:meth:`spinedxa.task.Task.resolve`)."""
    resolved = task.resolve(label)
    found = resolved.found
    if resolved.outcome == "empty":
        return SourceItem(rel, label_problem=f"no_label: empty label in {where}", patient_hint=patient)
    if resolved.outcome == "unknown":
        return SourceItem(rel, label_problem=f"unknown_label: {where} label {found!r} is neither one of data.classes "
                          f"{list(task.classes)} nor a key of data.class_map", patient_hint=patient,
                          label_found=found)
    if resolved.outcome == "drop":
        return SourceItem(rel, patient_hint=patient, label_found=found,
                          dropped=f"dropped: data.class_map maps the {where} label {found!r} to drop")
    return SourceItem(rel, label=resolved.cls, patient_hint=patient, label_found=found)


@dataclass(frozen=True)
class Processed:
    """A decoded scan after ingest's steps: what is written for an accepted file.

    Attributes:
        image: the processed scan, uint16, longest side ``ingest.max_side`` (``images/``).
        box: the located L1-L4 region (or the whole image), in ``image`` coordinates.
        roi_image: the region, uint16, ``roi_height x roi_height / 2`` (``roi/``).
        redacted: burned-in text was blacked out (policy ``redact``).
    """

    image: np.ndarray
    box: roi_locator.Roi
    roi_image: np.ndarray
    redacted: bool


def process_pixels(decoded: Decoded, settings: IngestConfig, extra_phi: Sequence[str] = ()) -> Processed:
    """The steps after decoding, shared with ``spinedxa predict``: burned-in text screening on the decoded pixels
    at their original resolution (before any resizing blurs the glyphs; the header's PHI values, and ``extra_phi``
    such as a labels.csv patient id, always count when OCR reads them), normalisation, ROI location and extraction.

    Raises:
        QuarantineError: ``burned_in_text`` (quarantine policy, or text left after redaction) or ``no_roi``.
        burnedin.OcrUnavailableError: the OCR library or its models are missing (systemic).
    """
    screened = burnedin.screen(decoded.pixels, decoded.phi_values + tuple(extra_phi),
                               policy=settings.burned_in_text, margin_px=settings.burned_in_margin_px)
    if not screened.accepted:
        raise QuarantineError(burnedin.REASON, screened.detail)
    image = normalise(screened.image, settings.max_side)
    aspect = manifest_contract.roi_aspect(settings.roi)
    try:
        box = roi_locator.locate(image) if settings.roi == "locate" else roi_locator.whole(image, aspect)
    except roi_locator.RoiNotFound as exc:  # the message describes the image only, never a header value
        raise QuarantineError("no_roi", str(exc)) from None
    return Processed(image, box, roi_locator.extract(image, box, settings.roi_height, aspect), screened.redacted)


def process_file(item: SourceItem, job: FileJob) -> dict[str, Any]:
    """Process one input file (in a worker) and return its manifest row. Never raises for per-file problems.

    The accepted path is decode -> normalise -> (checks of the normalised image) -> encode -> write: any step may
    raise :class:`QuarantineError`, and nothing is written before all of them have passed.
    """
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(source=item.source, label=item.label, label_found=item.label_found, status="quarantined")
    path = job.source_dir / item.source
    unread_patient = deid.pseudonym("unreadable:" + item.source)  # nothing read: the file is its own patient
    if item.walk_problem:
        row.update(reason=item.walk_problem, patient_id=unread_patient)
        return row
    try:
        row["sha256"], data = _read(path)
    except OSError as exc:
        row.update(reason=f"unreadable: {type(exc).__name__}: {exc.strerror}", patient_id=unread_patient)
        return row
    except QuarantineError as exc:  # not a regular file (replaced by a FIFO after the walk)
        row.update(reason=str(exc), patient_id=unread_patient)
        return row
    if item.label_problem:
        row.update(reason=item.label_problem, patient_id=_fallback_patient(item, row["sha256"]),
                   patient_from=_fallback_from(item))
        return row
    if item.dropped:  # hashed (the duplicate rule compares it with the kept files), never decoded
        row.update(status="dropped", reason=item.dropped, patient_id=_fallback_patient(item, row["sha256"]),
                   patient_from=_fallback_from(item))
        return row
    decoded: Decoded | None = None  # once decoded, a later quarantine row still says which format it was
    try:
        decoded = decode_file(path, max_pixels=job.settings.max_pixels, multiframe=job.settings.multiframe,
                              pseudonymise=not item.patient_hint, data=data)
        del data  # the file's bytes are not needed past decoding: free them before the float copies below
        done = process_pixels(decoded, job.settings, (item.patient_hint,) if item.patient_hint else ())
        image, box = done.image, done.box
        png, roi_png = png16.encode(image), png16.encode(done.roi_image)
    except QuarantineError as exc:
        row.update(reason=str(exc), patient_id=_fallback_patient(item, row["sha256"]),
                   patient_from=_fallback_from(item), format=decoded.format if decoded is not None else "")
        return row
    except MemoryError:
        # Under the workers' address-space cap (_init_worker) or a ulimit: this file needs more memory than any
        # image within ingest.max_pixels should. Quarantined, so one hostile file does not stop the stage.
        reason = QuarantineError("too_large", f"decoding needs more memory than this process may use "
                                              f"(ingest.worker_memory_mb = {job.settings.worker_memory_mb}, or a "
                                              "ulimit)")
        row.update(reason=str(reason), patient_id=_fallback_patient(item, row["sha256"]),
                   patient_from=_fallback_from(item))
        return row
    name = f"{IMAGES_DIR}/{row['sha256'][:16]}.png"
    roi_name = f"{ROI_DIR}/{row['sha256'][:16]}.png"
    write_png16(job.out_dir / name, png)
    write_png16(job.out_dir / roi_name, roi_png)
    meta = decoded.meta
    row.update(
        status="accepted",
        patient_id=decoded.patient_id or _fallback_patient(item, row["sha256"]),
        patient_from="header" if decoded.patient_id else _fallback_from(item),
        pixel_sha256=pixel_digest(image),
        image=name,
        roi=roi_name,
        roi_top=box.top,
        roi_left=box.left,
        roi_height=box.height,
        roi_width=box.width,
        roi_method=box.method,
        redacted=done.redacted,
        width=image.shape[1],
        height=image.shape[0],
        orig_width=meta["orig_width"],
        orig_height=meta["orig_height"],
        format=decoded.format,
        modality=meta["modality"] or "",  # a DICOM defined term or "other" (deid.MODALITY_TERMS)
        photometric=meta["photometric"] or "",  # one of the supported values (imaging)
        bits_stored=meta["bits_stored"] if meta["bits_stored"] is not None else "",
        pixel_spacing_mm=meta["pixel_spacing_mm"] if meta["pixel_spacing_mm"] is not None else "",
        frames=meta["frames"],
        converted_from_color=decoded.converted_from_color,
        mean=round(float(image.mean()), 3),
        std=round(float(image.std()), 3),
        min=int(image.min()),
        max=int(image.max()),
        phash=phash16(image),
    )
    return row


def _fallback_patient(item: SourceItem, sha256: str) -> str:
    """Pseudonym for a file whose header names no patient: its labels.csv patient_id, else the file is its own."""
    return deid.patient_pseudonym(item.patient_hint) if item.patient_hint else deid.file_pseudonym(sha256)


def _fallback_from(item: SourceItem) -> str:
    """Where :func:`_fallback_patient` takes the patient from (manifest ``patient_from``)."""
    return "labels_csv" if item.patient_hint else "file"


def pixel_digest(image: np.ndarray) -> str:
    """sha256 of a processed image's pixels and shape: equal for files whose decoded content is identical."""
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode("ascii"))
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _read(path: Path) -> tuple[str, bytes | None]:
    """Return the sha256 of ``path`` and its content, or None for the content of a file over ``_IN_MEMORY_MAX``.

    Opened without blocking and checked to be a regular file first (a FIFO put in place of a file after the walk
    would block a plain open forever).

    Raises:
        OSError: the file cannot be opened or read.
        QuarantineError: ``unreadable``: not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        check_regular(info.st_mode)
        if info.st_size <= _IN_MEMORY_MAX:
            data = fh.read()
            return hashlib.sha256(data).hexdigest(), data
        return hashlib.file_digest(fh, "sha256").hexdigest(), None


def process_chunk(items: Sequence[SourceItem], job: FileJob) -> list[dict[str, Any]]:
    """:func:`process_file` for each item (one pool task)."""
    return [process_file(item, job) for item in items]



def write_png16(path: Path, image: np.ndarray | bytes) -> None:
    """Write a uint16 2-D array (or its :func:`spinedxa.contracts.png16.encode` bytes) as a 16-bit grayscale PNG.

    The file is created exclusively: two identical inputs share one sha256 and so one image name, and the second
    writer (possibly another worker) finds the first one's identical file and leaves it. The output directory as a
    whole is swapped in atomically by :func:`run_ingest`, so no per-file temporary is needed.

    Raises:
        ValueError: ``image`` is not a 2-D uint16 array.
    """
    encoded = image if isinstance(image, bytes) else png16.encode(image)
    try:
        with path.open("xb") as fh:
            fh.write(encoded)
    except FileExistsError:
        pass  # identical content (same sha256 of the same source bytes) is already there


def phash16(image: np.ndarray) -> str:
    """64-bit perceptual hash (16 hex chars) of a uint16 image: ``str(imagehash.phash(img8))`` with its defaults.

    ``img8`` is the top byte of each pixel: imagehash works on 8-bit mode "L", and Pillow clips (not scales) 16-bit
    values when converting. imagehash costs ~0.1 ms per image more than an in-house copy of its algorithm (0.41 vs
    0.31 ms, 256 x 192, measured), ~2 % of ingest's time per file: one implementation, the one validate's thresholds
    were set on.
    """
    return str(imagehash.phash(Image.fromarray((image >> 8).astype(np.uint8))))


def _chunks(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux ``/proc/self/statm``), or None where unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _init_worker(memory_mb: int) -> None:
    """Worker start-up: one BLAS thread (the workers are the parallelism) and an address-space cap.

    The cap (``RLIMIT_AS``) is the worker's size at start-up plus ``memory_mb``: relative, because what the imports
    already map (libraries, BLAS buffers) differs between machines. Past it, allocations fail with ``MemoryError``,
    which :func:`process_file` turns into a ``too_large`` row. Where ``RLIMIT_AS`` or ``/proc`` do not exist, no cap.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency; only workers need it

    threadpool_limits(1)
    current = _address_space()
    if memory_mb and current is not None and hasattr(resource, "RLIMIT_AS"):
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _rows(items: Iterator[SourceItem], job: FileJob, workers: int) -> Iterator[dict[str, Any]]:
    """Process items in-process (workers == 1) or in a pool, with a bounded number in flight so memory stays flat.

    At most ``workers x _CHUNKS_PER_WORKER`` chunks are pending (the walk is lazy and never drained into a queue),
    and a new chunk is submitted as soon as the oldest is collected, so workers never wait for a whole batch. The walk
    runs in this process, so its errors raise here.

    Raises:
        IngestError: a worker process died (naming the files that were in flight).
    """
    if workers == 1:
        yield from (process_file(item, job) for item in items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_init_worker,
                               initargs=(job.settings.worker_memory_mb,))
    pending: deque[tuple[list[SourceItem], Future[list[dict[str, Any]]]]] = deque()
    try:
        for chunk in _chunks(items, _CHUNKSIZE):
            pending.append((chunk, pool.submit(process_chunk, chunk, job)))
            if len(pending) >= workers * _CHUNKS_PER_WORKER:
                yield from pending[0][1].result()
                pending.popleft()
        while pending:
            yield from pending[0][1].result()
            pending.popleft()
    except BrokenProcessPool as exc:
        raise IngestError(f"{_broken_pool_message(pending)} ({exc})") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _broken_pool_message(pending: deque[tuple[list[SourceItem], Future[list[dict[str, Any]]]]]) -> str:
    """Name the files whose chunks were lost with a dead worker (all of them in the log, the first few here)."""
    lost = [item.source for chunk, future in pending
            if not future.done() or future.cancelled() or future.exception() is not None for item in chunk]
    log.error("ingest: a worker died while these %d file(s) were in flight: %s", len(lost), ", ".join(lost))
    shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more (all listed in the log)" if len(lost) > 5 else "")
    return (f"a worker process died (killed by a signal, e.g. by the out-of-memory killer, or crashed) while "
            f"ingesting one of {len(lost)} file(s): {shown}. No manifest was written. Run ingest again; if a worker "
            f"dies again on these files, move them out of data.source or lower ingest.worker_memory_mb so that a "
            f"file needing too much memory is quarantined instead")


def summarise(counts: dict[str, Counter], task: Task, labelling: str, error: str | None) -> dict[str, Any]:
    """Build the ``reports/ingest.json`` summary (a DVC metric: counts only, no identifiers) from the counters.

    ``quarantine_rate`` is the share of quarantined files among the files the task wanted: the files that
    ``data.class_map`` drops are not inputs of the task, so they are left out of both sides of the rate;
    duplicates of a kept scan count as inputs, never as quarantines.
    """
    n_files = sum(counts["status"].values())
    n_accepted, n_dropped = counts["status"]["accepted"], counts["status"]["dropped"]
    n_quarantined = counts["status"]["quarantined"]
    wanted = n_files - n_dropped
    return {
        "n_files": n_files,
        "n_accepted": n_accepted,
        "n_quarantined": n_quarantined,
        "n_dropped": n_dropped,
        "n_duplicates": counts["status"]["duplicate"],
        "quarantine_rate": round(n_quarantined / wanted, 6) if wanted else 0.0,
        "per_label": {c: counts["label"][c] for c in task.classes},  # accepted files per class
        "per_label_quarantined": {c: counts["label_quarantined"][c] for c in task.classes},
        # The labels as found in the data (folders or labels.csv), over every file that had one, and what became of
        # them: the data card's "labels found -> classes after the map".
        "per_label_found": {label: dict(sorted(by_status.items()))
                            for label, by_status in sorted(counts["label_found"].items())},
        "per_reason": dict(sorted(counts["reason"].items())),
        "per_format": dict(sorted(counts["format"].items())),
        "n_converted_from_color": counts["flags"]["converted_from_color"],
        # Burned-in text (OCR): files quarantined for it, and files accepted with their text regions blacked out.
        "n_burned_in_text": counts["reason"]["burned_in_text"],
        "n_redacted": counts["flags"]["redacted"],
        "n_labels_without_file": counts["flags"]["labels_without_file"],
        # Exact copies (spinedxa.duplicates): groups resolved to one kept scan, and groups under different labels.
        "n_duplicate_groups": counts["flags"]["duplicate_groups"],
        "n_label_conflict_groups": counts["flags"]["label_conflict_groups"],
        "n_label_conflicts": counts["reason"]["label_conflict"],
        # Accepted files whose patient comes from their header, labels.csv, or nothing (each its own patient).
        "patient_from": {k: counts["patient_from"][k] for k in manifest_contract.PATIENT_FROM},
        "labelling": labelling,
        "error": error,
    }


#: A rule applied to every row once all are in (after the duplicate rule), before anything is counted or written:
#: ``rule(rows, out_dir)`` may quarantine rows in place (e.g. the external cohort's copies of training scans).
RowRule = Callable[[list[dict[str, Any]], Path], None]


def run_ingest(
    source: Path, out_dir: Path, summary_path: Path, *, task: Task, settings: IngestConfig,
    workers: int = 1, progress: bool = True, extra_rule: RowRule | None = None,
) -> dict[str, Any]:
    """Ingest ``source`` into ``out_dir`` (images/, roi/, manifest.csv and their SHA256SUMS) and write
    the summary to ``summary_path``.

    Returns:
        The summary dict (also written to ``summary_path``).

    Raises:
        IngestError: source missing or unlistable, labels.csv malformed (:class:`LabelsError`), no input file, or no
            accepted file. The summary (with ``error``) is written first; the output directory is replaced only when
            the walk completed, so a failed run never leaves a partial ``out_dir``.
    """
    counts: dict[str, Counter] = {k: Counter() for k in ("status", "label", "label_quarantined", "reason", "format",
                                                          "flags", "patient_from")}
    counts["label_found"] = {}  # type: ignore[assignment]  # label found -> Counter of statuses
    labelling = "labels.csv" if (source / LABELS_FILE).is_file() else "folders"
    started = time.perf_counter()
    try:
        if not source.is_dir():
            raise IngestError(f"source directory {source} does not exist or is not a directory (data.source)")
        labels = read_labels(source / LABELS_FILE, task.classes) if labelling == "labels.csv" else None
        deid.load_key()  # create the key file once, here, rather than racing in the workers
        with atomic_dir(out_dir) as tmp:
            _ingest_into(source, tmp, task, settings, workers, labels, counts, progress, extra_rule)
            write_checksums(tmp)
    except (IngestError, deid.DeidKeyError, burnedin.OcrUnavailableError) as exc:
        write_json_atomic(summary_path, summarise(counts, task, labelling, str(exc)))
        if isinstance(exc, IngestError):
            raise
        raise IngestError(str(exc)) from exc
    error = None
    if counts["status"].total() == 0:
        error = f"source directory {source} contains no files"
    elif counts["status"]["accepted"] == 0:
        error = f"no file of {counts['status'].total()} was accepted; see per_reason in {summary_path}"
    summary = summarise(counts, task, labelling, error)
    write_json_atomic(summary_path, summary)
    seconds = time.perf_counter() - started
    log.info("ingest: %d files (%d accepted, %d quarantined, %d dropped by data.class_map, %d duplicates) in %.1f s, "
             "%.1f files/s with %d worker(s)", summary["n_files"], summary["n_accepted"], summary["n_quarantined"],
             summary["n_dropped"], summary["n_duplicates"], seconds, summary["n_files"] / seconds if seconds else 0.0,
             workers)
    own = summary["patient_from"]["file"]
    if own:
        log.warning("ingest: %d accepted file(s) name no patient (no DICOM PatientID or name + birth date, no "
                    "labels.csv patient_id): each is its own patient, so repeat scans of one person may land in "
                    "different folds; add a patient_id column to labels.csv to group them", own)
    if error:
        raise IngestError(error)
    return summary


def _ingest_into(
    source: Path, out: Path, task: Task, settings: IngestConfig, workers: int,
    labels: dict[str, tuple[str, str]] | None, counts: dict[str, Counter], progress: bool,
    extra_rule: RowRule | None = None,
) -> None:
    (out / IMAGES_DIR).mkdir()
    (out / ROI_DIR).mkdir()
    job = FileJob(source.resolve(), out, settings)
    unsorted = out / f".{MANIFEST}.unsorted"
    seen_labelled = 0
    with unsorted.open("w", newline="", encoding="utf-8") as fh, logging_redirect_tqdm(), \
            tqdm(desc="ingest", unit="file", disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        for row in _rows(iter_sources(source, task, labels), job, workers):
            writer.writerow(row)
            seen_labelled += labels is not None and row["source"] in labels
            bar.update()
    if labels is not None and len(labels) > seen_labelled:
        counts["flags"]["labels_without_file"] = len(labels) - seen_labelled
        log.warning("%s lists %d path(s) that are not in %s", LABELS_FILE, len(labels) - seen_labelled, source)
    # Rows are ~300 bytes: sorting them in memory is fine even for 10^5 files (the images were never held).
    with unsorted.open(newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh, fieldnames=MANIFEST_COLUMNS), key=lambda r: r["source"])
    written = {r[c] for r in rows if r["status"] == "accepted" for c in duplicates.IMAGE_COLUMNS}
    resolved = duplicates.resolve(rows)
    if extra_rule is not None:
        extra_rule(rows, out)
    for rel in duplicates.unreferenced_images(rows, written):
        (out / rel).unlink()
    counts["flags"].update(duplicate_groups=resolved["duplicate_groups"],
                           label_conflict_groups=resolved["label_conflict_groups"])
    for row in rows:
        _count(row, counts)
        if row["status"] == "quarantined":
            log.info("quarantined %s: %s", row["source"], row["reason"])
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    unsorted.unlink()


def _count(row: dict[str, Any], counts: dict[str, Counter]) -> None:
    counts["status"][row["status"]] += 1
    if row.get("label_found"):
        counts["label_found"].setdefault(row["label_found"], Counter())[row["status"]] += 1  # type: ignore[union-attr]
    if row["status"] == "accepted":
        counts["label"][row["label"]] += 1
        counts["format"][row["format"]] += 1
        counts["flags"]["converted_from_color"] += row["converted_from_color"] in (True, "True")
        counts["flags"]["redacted"] += row["redacted"] in (True, "True")
        counts["patient_from"][row["patient_from"]] += 1
    elif row["status"] == "quarantined":
        counts["reason"][row["reason"].partition(":")[0]] += 1
        if row["label"]:
            counts["label_quarantined"][row["label"]] += 1
