"""Ingest: walk a source directory, label each file, decode and normalise it in worker processes, write the manifest.

Every file under the source is an input and gets exactly one manifest row (docs/CONTRACTS.md), accepted or quarantined
with a reason; the only exception is a top-level ``labels.csv``, which is the labelling, not an input. Hidden files
count too (a ``.DS_Store`` is quarantined as ``not_an_image``).

Labelling: if ``<source>/labels.csv`` exists it is the only labelling (``path,label[,patient_id]``, paths relative to
the source, ``/``-separated); otherwise a file's top-level folder under the source is its label (``normal/``,
``osteoporosis/``; names from ``data.classes``). A file with no label is quarantined ``no_label``; a label that is
not a class, ``unknown_label``.

Streaming: the directory is walked lazily and fed to a process pool in chunks with a bounded number in flight, rows
are appended to a temporary CSV as they arrive and sorted once at the end, when only the small rows (not images) are
held in memory. Each file is read once: its bytes give the sha256 and are decoded from memory. Per-file problems
never stop the run; systemic ones (source missing, labels.csv malformed, no file accepted) raise
:class:`IngestError` after the summary has been written.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import multiprocessing
import os
import posixpath
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.fftpack
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from spinedxa import deid
from spinedxa.config import IngestConfig
from spinedxa.files import atomic_dir, sha256_file, write_json_atomic
from spinedxa.imaging import Multiframe, QuarantineError, decode_file, normalise

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
MANIFEST = "manifest.csv"
IMAGES_DIR = "images"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "source", "sha256", "status", "reason", "label", "patient_id", "image", "width", "height", "orig_width",
    "orig_height", "format", "modality", "photometric", "bits_stored", "pixel_spacing_mm", "frames",
    "converted_from_color", "mean", "std", "min", "max", "phash",
)
_LABEL_COLUMNS = ("path", "label", "patient_id")
_CHUNKSIZE = 16         # files per task sent to a worker: amortises IPC for ~ms-per-file work
_CHUNKS_PER_WORKER = 4  # chunks in flight per worker: bounds memory while keeping workers busy
# Files up to this size are read into memory once, for their sha256 and for decoding (pydicom parsing a path makes
# ~120 small reads per file: ~0.15 ms more per 100 kB DICOM than parsing the same bytes in memory, measured). Larger files are hashed
# in chunks and decoded from disk, so a worker's memory stays bounded whatever the source holds.
_IN_MEMORY_MAX = 32 * 2**20


class IngestError(RuntimeError):
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


@dataclass(frozen=True)
class FileJob:
    """Everything a worker needs to process one file (picklable, sent once per task chunk)."""

    source_dir: Path
    out_dir: Path  # the (temporary) output directory; images go to out_dir/images/
    max_side: int
    max_pixels: int
    multiframe: Multiframe


def read_labels(path: Path, classes: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Read ``labels.csv`` into ``{relative posix path: (label, patient_id)}``.

    Raises:
        LabelsError: wrong header, wrong number of fields, an empty, absolute or escaping path, or a duplicate path.
    """
    out: dict[str, tuple[str, str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if header[:2] != ["path", "label"] or not set(header) <= set(_LABEL_COLUMNS) or len(set(header)) != len(header):
            raise LabelsError(f"{path}: header must be 'path,label' or 'path,label,patient_id'; got {header}")
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
    return out


def _clean_relpath(raw: str, labels: Path, line: int) -> str:
    rel = raw.strip().replace("\\", "/")
    norm = posixpath.normpath(rel) if rel else ""
    if not rel or rel.startswith("/") or norm == ".." or norm.startswith("../"):
        raise LabelsError(f"{labels}:{line}: path {raw!r} must be relative to the source directory and stay inside it")
    return norm


def iter_files(source: Path) -> Iterator[str]:
    """Yield every file under ``source`` lazily, as ``/``-separated paths relative to it (hidden files included).

    Raises:
        IngestError: a directory under ``source`` cannot be listed (files would be missed silently otherwise).
    """
    def fail(exc: OSError) -> None:
        raise IngestError(f"cannot list {exc.filename}: {exc.strerror}") from exc

    for dirpath, dirnames, filenames in os.walk(source, onerror=fail):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(source).as_posix()
        for name in sorted(filenames):
            yield name if rel_dir == "." else f"{rel_dir}/{name}"


def iter_sources(
    source: Path, classes: Sequence[str], labels: dict[str, tuple[str, str]] | None
) -> Iterator[SourceItem]:
    """Yield a labelled :class:`SourceItem` per input file (``labels`` from :func:`read_labels`; None: folders)."""
    for rel in iter_files(source):
        if labels is not None:
            if rel == LABELS_FILE:
                continue
            if rel not in labels:
                yield SourceItem(rel, label_problem=f"no_label: not listed in {LABELS_FILE}")
                continue
            label, patient = labels[rel]
            yield _labelled(rel, label, classes, patient, where=LABELS_FILE)
        else:
            top, sep, _ = rel.partition("/")
            if not sep:
                yield SourceItem(rel, label_problem="no_label: file is not inside a class folder")
            else:
                yield _labelled(rel, top, classes, "", where="folder")


def _labelled(rel: str, label: str, classes: Sequence[str], patient: str, where: str) -> SourceItem:
    if not label:
        return SourceItem(rel, label_problem=f"no_label: empty label in {where}", patient_hint=patient)
    if label not in classes:
        return SourceItem(rel, label_problem=f"unknown_label: {where} label {label!r} is not one of {list(classes)}",
                          patient_hint=patient)
    return SourceItem(rel, label=label, patient_hint=patient)


def process_file(item: SourceItem, job: FileJob) -> dict[str, Any]:
    """Process one input file (in a worker) and return its manifest row. Never raises for per-file problems."""
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(source=item.source, label=item.label, status="quarantined")
    path = job.source_dir / item.source
    try:
        row["sha256"], data = _read(path)
    except OSError as exc:
        row.update(reason=f"unreadable: {type(exc).__name__}: {exc.strerror}",
                   patient_id=deid.pseudonym("unreadable:" + item.source))
        return row
    if item.label_problem:
        row.update(reason=item.label_problem, patient_id=_fallback_patient(item, row["sha256"]))
        return row
    try:
        decoded = decode_file(path, max_pixels=job.max_pixels, multiframe=job.multiframe,
                              pseudonymise=not item.patient_hint, data=data)
    except QuarantineError as exc:
        row.update(reason=str(exc), patient_id=_fallback_patient(item, row["sha256"]))
        return row
    image = normalise(decoded.pixels, job.max_side)
    name = f"{IMAGES_DIR}/{row['sha256'][:16]}.png"
    write_png16(job.out_dir / name, image)
    meta = decoded.meta
    row.update(
        status="accepted",
        patient_id=decoded.patient_id or _fallback_patient(item, row["sha256"]),
        image=name,
        width=image.shape[1],
        height=image.shape[0],
        orig_width=meta["orig_width"],
        orig_height=meta["orig_height"],
        format=decoded.format,
        modality=meta["modality"] or "",
        photometric=meta["photometric"] or "",
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


def _read(path: Path) -> tuple[str, bytes | None]:
    """Return the sha256 of ``path`` and its content, or None for the content of a file over ``_IN_MEMORY_MAX``."""
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size <= _IN_MEMORY_MAX:
            data = fh.read()
            return hashlib.sha256(data).hexdigest(), data
    return sha256_file(path), None


def process_chunk(items: Sequence[SourceItem], job: FileJob) -> list[dict[str, Any]]:
    """:func:`process_file` for each item (one pool task)."""
    return [process_file(item, job) for item in items]


# PNG settings: stored (level 0) deflate, no row filter. Measured on 256 x 192 16-bit images (CPU time per image):
# OpenCV level 0 0.15 ms; level 1 1.8-3.5 ms for only 10-20 % smaller files (16-bit detector noise hardly compresses);
# Pillow level 0 2.3 ms, level 1 5.6 ms. The bare DICOM decode is ~1.4 ms, so compression would dominate ingest.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def write_png16(path: Path, image: np.ndarray) -> None:
    """Write a uint16 2-D array as a 16-bit grayscale PNG (no text chunks).

    The file is created exclusively: two identical inputs share one sha256 and so one image name, and the second
    writer (possibly another worker) finds the first one's identical file and leaves it. The output directory as a
    whole is swapped in atomically by :func:`run_ingest`, so no per-file temporary is needed.

    Raises:
        ValueError: ``image`` is not a 2-D uint16 array.
    """
    if image.ndim != 2 or image.dtype != np.uint16:
        raise ValueError(f"{path}: expected a 2-D uint16 image, got {image.dtype} {image.shape}")
    ok, encoded = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the PNG")
    try:
        with path.open("xb") as fh:
            fh.write(encoded)
    except FileExistsError:
        pass  # identical content (same sha256 of the same source bytes) is already there


PHASH_SIZE = 8        # imagehash.phash defaults: an 8 x 8 = 64-bit hash ...
PHASH_HIGHFREQ = 4    # ... from the DCT of a 32 x 32 thumbnail


def phash16(image: np.ndarray) -> str:
    """64-bit perceptual hash (16 hex chars) of a uint16 image: the same hex as ``str(imagehash.phash(img8))``.

    ``img8`` is the top byte of each pixel: imagehash works on 8-bit mode "L", and Pillow clips (not scales) 16-bit
    values when converting. The steps are imagehash 4.3's ``phash`` with its defaults: Lanczos resize to 32 x 32,
    2-D DCT-II (scipy.fftpack), the 8 x 8 lowest frequencies compared with their median, bits row-major with the
    first as the most significant. Computed here without imagehash's ImageHash object and bit-string formatting
    (~0.15 ms less per image, measured); tests/test_ingest.py checks the hex against imagehash's on varied images.
    """
    side = PHASH_SIZE * PHASH_HIGHFREQ
    thumb = Image.fromarray((image >> 8).astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(np.asarray(thumb), axis=0), axis=1)
    low = dct[:PHASH_SIZE, :PHASH_SIZE]
    return np.packbits(low > np.median(low)).tobytes().hex()


def _chunks(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _rows(items: Iterator[SourceItem], job: FileJob, workers: int) -> Iterator[dict[str, Any]]:
    """Process items in-process (workers == 1) or in a pool, with a bounded number in flight so memory stays flat.

    Pool.imap would drain the whole (lazy) walk into its task queue; here at most ``workers x _CHUNKS_PER_WORKER``
    chunks are pending, and a new chunk is submitted as soon as the oldest is collected, so workers never wait for
    a whole batch to finish. The walk runs in this process, so its errors raise here.
    """
    if workers == 1:
        yield from (process_file(item, job) for item in items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque[AsyncResult[list[dict[str, Any]]]] = deque()
        for chunk in _chunks(items, _CHUNKSIZE):
            pending.append(pool.apply_async(process_chunk, (chunk, job)))
            if len(pending) >= workers * _CHUNKS_PER_WORKER:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def summarise(counts: dict[str, Counter], classes: Sequence[str], labelling: str, error: str | None) -> dict[str, Any]:
    """Build the ``reports/ingest.json`` summary from the running counters."""
    n_files = sum(counts["status"].values())
    n_accepted = counts["status"]["accepted"]
    return {
        "n_files": n_files,
        "n_accepted": n_accepted,
        "n_quarantined": n_files - n_accepted,
        "quarantine_rate": round((n_files - n_accepted) / n_files, 6) if n_files else 0.0,
        "per_label": {c: counts["label"][c] for c in classes},  # accepted files per class
        "per_label_quarantined": {c: counts["label_quarantined"][c] for c in classes},
        "per_reason": dict(sorted(counts["reason"].items())),
        "per_format": dict(sorted(counts["format"].items())),
        "n_converted_from_color": counts["flags"]["converted_from_color"],
        "n_labels_without_file": counts["flags"]["labels_without_file"],
        "labelling": labelling,
        "error": error,
    }


def run_ingest(
    source: Path, out_dir: Path, summary_path: Path, *, classes: Sequence[str], settings: IngestConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest ``source`` into ``out_dir`` (images/ + manifest.csv) and write the summary to ``summary_path``.

    Returns:
        The summary dict (also written to ``summary_path``).

    Raises:
        IngestError: source missing or unlistable, labels.csv malformed (:class:`LabelsError`), no input file, or no
            accepted file. The summary (with ``error``) is written first; the output directory is replaced only when
            the walk completed, so a failed run never leaves a partial ``out_dir``.
    """
    counts: dict[str, Counter] = {k: Counter() for k in ("status", "label", "label_quarantined", "reason", "format",
                                                          "flags")}
    labelling = "labels.csv" if (source / LABELS_FILE).is_file() else "folders"
    started = time.perf_counter()
    try:
        if not source.is_dir():
            raise IngestError(f"source directory {source} does not exist or is not a directory (data.source)")
        labels = read_labels(source / LABELS_FILE, classes) if labelling == "labels.csv" else None
        deid.load_key()  # create the key file once, here, rather than racing in the workers
        with atomic_dir(out_dir) as tmp:
            _ingest_into(source, tmp, classes, settings, labels, counts, progress)
    except (IngestError, deid.DeidKeyError) as exc:
        write_json_atomic(summary_path, summarise(counts, classes, labelling, str(exc)))
        if isinstance(exc, IngestError):
            raise
        raise IngestError(str(exc)) from exc
    error = None
    if counts["status"].total() == 0:
        error = f"source directory {source} contains no files"
    elif counts["status"]["accepted"] == 0:
        error = f"no file of {counts['status'].total()} was accepted; see per_reason in {summary_path}"
    summary = summarise(counts, classes, labelling, error)
    write_json_atomic(summary_path, summary)
    seconds = time.perf_counter() - started
    log.info("ingest: %d files (%d accepted, %d quarantined) in %.1f s, %.1f files/s with %d worker(s)",
             summary["n_files"], summary["n_accepted"], summary["n_quarantined"], seconds,
             summary["n_files"] / seconds if seconds else 0.0, settings.workers)
    if error:
        raise IngestError(error)
    return summary


def _ingest_into(
    source: Path, out: Path, classes: Sequence[str], settings: IngestConfig,
    labels: dict[str, tuple[str, str]] | None, counts: dict[str, Counter], progress: bool,
) -> None:
    (out / IMAGES_DIR).mkdir()
    job = FileJob(source.resolve(), out, settings.max_side, settings.max_pixels, settings.multiframe)
    unsorted = out / f".{MANIFEST}.unsorted"
    seen_labelled = 0
    with unsorted.open("w", newline="", encoding="utf-8") as fh, logging_redirect_tqdm(), \
            tqdm(desc="ingest", unit="file", disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        for row in _rows(iter_sources(source, classes, labels), job, settings.workers):
            writer.writerow(row)
            _count(row, counts)
            seen_labelled += labels is not None and row["source"] in labels
            if row["status"] != "accepted":
                log.info("quarantined %s: %s", row["source"], row["reason"])
            bar.update()
    if labels is not None and len(labels) > seen_labelled:
        counts["flags"]["labels_without_file"] = len(labels) - seen_labelled
        log.warning("%s lists %d path(s) that are not in %s", LABELS_FILE, len(labels) - seen_labelled, source)
    # Rows are ~300 bytes: sorting them in memory is fine even for 10^5 files (the images were never held).
    with unsorted.open(newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh, fieldnames=MANIFEST_COLUMNS), key=lambda r: r["source"])
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    unsorted.unlink()


def _count(row: dict[str, Any], counts: dict[str, Counter]) -> None:
    counts["status"][row["status"]] += 1
    if row["status"] == "accepted":
        counts["label"][row["label"]] += 1
        counts["format"][row["format"]] += 1
        counts["flags"]["converted_from_color"] += bool(row["converted_from_color"])
    else:
        counts["reason"][row["reason"].partition(":")[0]] += 1
        if row["label"]:
            counts["label_quarantined"][row["label"]] += 1
