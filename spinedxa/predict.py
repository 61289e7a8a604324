"""Predict on new scans with a trained model: the ingest path for one file at a time, then the model.

Each file goes through exactly what the training data went through: ``imaging.decode_file`` (DICOM / PNG / JPEG /
TIFF, sniffed by content; header values are never read out, so nothing identifying reaches the output) and
``imaging.normalise`` with the ``ingest`` params, the blank-image rule of ``validate``, then ``data.letterbox`` to the
model's ``image_size`` from the ``meta.json`` next to ``model.pt``. The output is one row per file: ``file,
prob_osteoporosis, predicted, status, error``; a file that cannot be used gets ``status=error`` and a reason, and
does not stop the others. Optionally a Grad-CAM overlay per file shows which regions drove the osteoporosis score.

Directories are walked as ingest walks ``data.source`` (``ingest.iter_files``: directory links followed, loop-safe,
each real directory once), hidden files skipped. Unlike ingest, predict reads a file link wherever it points: the
files are the user's own, and nothing of them but a probability is output. A dangling link gets an error row.
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from spinedxa.config import Params
from spinedxa.data import letterbox
from spinedxa.files import atomic_path, write_text_atomic
from spinedxa.imaging import QuarantineError, decode_file, normalise
from spinedxa.ingest import iter_files
from spinedxa.models import load_trained, predict_proba

U16_MAX = 65535.0  # normalise() windows to the full 16-bit range, as the ingested PNGs the models trained on
POSITIVE = 1  # index of "osteoporosis" in data.classes (docs/CONTRACTS.md)
BATCH = 32  # files decoded and predicted together: bounds memory for large directories


class BlankImageError(ValueError):
    """The image has no contrast after normalisation (validate would reject it as blank)."""


@dataclass(frozen=True)
class Prediction:
    """One output row."""

    file: str
    prob_osteoporosis: float | None
    predicted: str
    status: str  # "ok" | "error"
    error: str = ""


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The files to predict on: each input file as given, each directory's files recursively (sorted, hidden files
    skipped). A path that does not exist, a dangling link or a special file is kept, so that it gets an error row
    rather than vanishing; a directory link back into the walked tree is skipped (its files are listed once).

    Raises:
        IngestError: a directory cannot be listed.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = (f for f in iter_files(item) if not f.problem.startswith("symlink_repeat:"))
            files.extend(sorted(item / f.rel for f in found if not any(p.startswith(".") for p in f.rel.split("/"))))
        else:
            files.append(item)
    return files


def prepare_image(path: Path, params: Params, image_size: int) -> np.ndarray:
    """Decode, normalise and letterbox one file exactly as ingest + training do; float32 ``S x S`` in [0, 1].

    Raises:
        QuarantineError: the file cannot be used (the reason says why, as ingest's quarantine would).
        BlankImageError: the image has (almost) no contrast: std below ``validate.min_std``.
        ValueError: the decoded pixels are not finite.
    """
    if path.is_symlink() and not path.exists():
        raise QuarantineError("symlink_dangling", "its target does not exist")
    decoded = decode_file(path, max_pixels=params.ingest.max_pixels, multiframe=params.ingest.multiframe)
    image = normalise(decoded.pixels, params.ingest.max_side)
    if float(image.std()) < params.validate.min_std:
        raise BlankImageError(f"blank: intensity std {image.std():.3f} < validate.min_std {params.validate.min_std}")
    return letterbox(image.astype(np.float32) / np.float32(U16_MAX), image_size)


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(
    model_file: str | Path,
    files: Sequence[Path],
    params: Params,
    *,
    gradcam_dir: str | Path | None = None,
    device: str = "cpu",
) -> list[Prediction]:
    """Predict the probability of osteoporosis for each file (in input order).

    Args:
        model_file: ``models/<model>/model.pt`` (its directory, holding meta.json, is accepted too).
        files: the files (see :func:`collect_files`).
        params: the pipeline params (``ingest`` for decoding, ``validate.min_std``, ``evaluate.threshold``).
        gradcam_dir: write ``<file stem>.gradcam.png`` overlays there (None: no Grad-CAM).
        device: torch device for the model.

    Raises:
        FileNotFoundError: the model file or its meta.json does not exist.
        ValueError / RuntimeError: meta.json or the weights are unusable (see ``models.load_trained``), e.g. a
            model.pt that is not a weights-only state dict (an arbitrary pickle is refused, never run).
    """
    model_path = Path(model_file)
    model_dir = model_path if model_path.is_dir() else model_path.parent
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: model not found (run the train stage, or `dvc pull`)")
    model, meta = _load_model(model_dir, device)
    name, size, classes = meta["model"], int(meta["image_size"]), list(meta["classes"])
    threshold = params.evaluate.threshold
    cam_names = _gradcam_names(files) if gradcam_dir is not None else {}
    results: list[Prediction] = []
    for batch in _batches(files, BATCH):
        images: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(batch):
            try:
                images[i] = prepare_image(path, params, size)
            except (QuarantineError, BlankImageError) as exc:  # per-file problem: report it, go on with the others
                errors[i] = str(exc)
            except ValueError as exc:  # normalise() on an unusable decode (e.g. non-finite pixels)
                errors[i] = f"corrupt: {exc}"
        probs: dict[int, float] = {}
        if images:
            order = sorted(images)
            tensor = torch.from_numpy(np.stack([images[i] for i in order]))[:, None]
            probs = dict(zip(order, predict_proba(model, name, tensor, device=device).tolist()))
            if gradcam_dir is not None:
                from spinedxa.evaluate import gradcam_maps  # heavy (matplotlib, mlflow): only when asked for

                maps = gradcam_maps(model, name, tensor, target_class=POSITIVE)  # model is on `device` already
                for k, i in enumerate(order):
                    save_overlay(Path(gradcam_dir) / cam_names[batch[i]], images[i], maps[k])
        for i, path in enumerate(batch):
            if i in probs:
                p = probs[i]
                results.append(Prediction(str(path), round(p, 6), classes[int(p >= threshold)], "ok"))
            else:
                results.append(Prediction(str(path), None, "", "error", errors[i]))
    return results


def _load_model(model_dir: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """``models.load_trained``, with a model.pt that ``torch.load(weights_only=True)`` refuses reported by name.

    torch raises ``pickle.UnpicklingError`` for a pickle of anything but tensors and containers (a whole module, or a
    payload that would run code), ``EOFError`` / ``KeyError`` for an empty or non-pickle file, and ``TypeError`` when
    what it loaded is not a dict of tensors.

    Raises:
        ValueError: the weights file is not a weights-only state dict (nothing in it was executed).
    """
    try:
        return load_trained(model_dir, map_location=device)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{model_dir / 'model.pt'}: not a weights-only state dict as the train stage saves it "
            f"({type(exc).__name__}); refused without running anything in it. Re-save the weights with "
            "torch.save(model.state_dict(), path), or retrain"
        ) from exc


def save_overlay(path: Path, image: np.ndarray, heat: np.ndarray) -> None:
    """Write the scan with its Grad-CAM heat map blended on top (RGB PNG), atomically."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2).astype(np.float32)
    overlay = show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.6)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")


def _gradcam_names(files: Sequence[Path]) -> dict[Path, str]:
    """A distinct overlay file name per input: ``<stem>.gradcam.png``, ``<stem>-2.gradcam.png``, ..."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for path in files:
        stem = re.sub(r"[^\w.-]", "_", path.stem) or "image"
        name, n = f"{stem}.gradcam.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.gradcam.png"
        used.add(name)
        names[path] = name
    return names


def to_csv(rows: Sequence[Prediction]) -> str:
    """The rows as CSV text with the header ``file,prob_osteoporosis,predicted,status,error``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f.name for f in fields(Prediction)])
    for row in rows:
        writer.writerow(["" if v is None else v for v in astuple(row)])
    return buf.getvalue()


def write_csv(path: str | Path, rows: Sequence[Prediction]) -> None:
    """Write :func:`to_csv` to ``path`` atomically."""
    write_text_atomic(path, to_csv(rows))
