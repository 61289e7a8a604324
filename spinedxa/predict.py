"""Predict on new scans with a trained model: the ingest path for one file at a time, then the fold ensemble.

Which model predicts: ``--model models/<m>`` is the **ensemble of the fold models** the train stage wrote
(``models/<m>/fold<k>/``): a file's class probabilities are the mean of the fold models' calibrated probabilities. Each
fold model was trained on (k-1)/k of the cohort and scored out of fold by evaluate; no model was refit on all scans,
so the ensemble is made only of models whose out-of-fold performance the report shows. A single fold directory
(``models/<m>/fold0``, or its ``model.pt``) predicts with that one model.

Each file goes through exactly what the training data went through (:func:`prepare_image`): ``imaging.decode_file``
(DICOM / PNG / JPEG / TIFF, sniffed by content), the burned-in text screening of ingest (``spinedxa.burnedin.screen``
with the header's PHI values and ``ingest.burned_in_text``: ``quarantine`` gives an error row ``burned_in_text: ...``,
``redact`` predicts on the redacted image and sets ``redacted``), ``imaging.normalise`` to ``ingest.max_side``, the
L1-L4 region (``spinedxa.roi.locate``, or the whole image under ``ingest.roi: whole``; none found: ``no_roi: ...``)
extracted at ``ingest.roi_height``, the blank-image rule of validate, then ``data.fit`` to the model's input shape
(``input_shape`` from meta.json). Header values are never output: an error names the file and a reason code.

The output is one row per file: ``file``, one ``prob_<class>`` column per class of the model (``prob_normal,
prob_osteoporosis`` for the binary task; ``prob_normal, prob_osteopenia, prob_osteoporosis`` for the WHO task),
``predicted, status, error, redacted``; the predicted class follows the task (:meth:`spinedxa.task.Task.decide`:
``evaluate.threshold`` on the positive class, or the most probable class). A file that cannot be used gets
``status=error`` and a reason, and does not stop the others. Optionally a Grad-CAM overlay per file (on the model
input, i.e. the ROI) shows which regions drove the score of the last class (osteoporosis): the mean of the fold
models' Grad-CAM maps, each normalised to [0, 1] as pytorch-grad-cam does, so it explains the ensemble's score.

Directories are walked as ingest walks ``data.source`` (``ingest.iter_files``: directory links followed, loop-safe,
each real directory once), hidden files skipped. Unlike ingest, predict reads a file link wherever it points: the
files are the user's own, and nothing of them but a probability is output. A dangling link gets an error row.

Memory: every fold model is held at once (k x the model's size), and files are prepared and predicted
:data:`BATCH` at a time.
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from spinedxa.audit import fold_model_dirs
from spinedxa.calibration import Calibration
from spinedxa.config import Params
from spinedxa.contracts import jsonfile
from spinedxa.contracts.png16 import U16_MAX
from spinedxa.data import fit, input_shape
from spinedxa.files import atomic_path, sha256_file, write_text_atomic
from spinedxa.imaging import QuarantineError, decode_file
from spinedxa.ingest import iter_files, process_pixels
from spinedxa.models import load_trained, score
from spinedxa.task import Task

POSITIVE = -1  # Grad-CAM explains the last class (osteoporosis: positive or most severe; docs/CONTRACTS.md)
BATCH = 32  # files decoded and predicted together: bounds memory for large directories
WEIGHTS = "model.pt"
META = "meta.json"
_AGREE = ("model", "image_size", "classes")  # what every fold model of an ensemble must share


class BlankImageError(ValueError):
    """The image has no contrast after normalisation (validate would reject it as blank)."""


@dataclass(frozen=True)
class Prediction:
    """One output row: ``probabilities`` per class (empty on error rows), ``redacted`` None on error rows."""

    file: str
    probabilities: dict[str, float]
    predicted: str
    status: str  # "ok" | "error"
    error: str = ""
    redacted: bool | None = None


@dataclass(frozen=True)
class Prepared:
    """One file ready for the model: ``image`` (float32 ``H x W`` in [0, 1], the model's input shape)."""

    image: np.ndarray
    redacted: bool


@dataclass(frozen=True)
class FoldModel:
    """One member of the ensemble: its fold (None when meta.json names none), directory, and how it scores: its
    test-time augmentation and its Platt calibration (both from meta.json, as evaluate applies them)."""

    fold: int | None
    directory: Path
    model: torch.nn.Module
    tta: str = "none"
    calibration: Calibration = Calibration()

    def predict(self, name: str, images: torch.Tensor, device: str = "cpu") -> np.ndarray:
        """Calibrated class probabilities (``N x K``): exactly what evaluate scores for this fold."""
        return score(self.model, name, images, self.calibration, tta=self.tta, device=device)


@dataclass(frozen=True)
class Ensemble:
    """The fold models of one trained model; they share ``name``, ``image_size`` and ``classes``."""

    name: str
    image_size: int
    classes: tuple[str, ...]
    members: tuple[FoldModel, ...]
    input_hw: tuple[int, int] | None = None  # meta.json input_shape (its aspect follows ingest.roi at training)

    @property
    def shape(self) -> tuple[int, int]:
        """The model input ``(height, width)``."""
        return self.input_hw or input_shape(self.image_size)

    def predict(self, images: torch.Tensor, device: str = "cpu") -> np.ndarray:
        """Mean over the fold models of their calibrated class probabilities (``N x K``) for ``N x 1 x H x W``."""
        return np.mean([m.predict(self.name, images, device=device) for m in self.members], axis=0)

    def gradcam(self, images: torch.Tensor) -> np.ndarray:
        """Mean over the fold models of their Grad-CAM maps of the positive class (``N x H x W`` in [0, 1])."""
        from spinedxa.evaluate import gradcam_maps  # heavy (matplotlib, mlflow): only when asked for

        return np.mean([gradcam_maps(m.model, self.name, images, target_class=POSITIVE) for m in self.members],
                       axis=0)

    def describe(self) -> str:
        """One line: which model predicts, and how."""
        dirs = ", ".join(m.directory.as_posix() for m in self.members)
        if len(self.members) == 1:
            return f"{self.name}: one model ({dirs})"
        return f"{self.name}: ensemble of {len(self.members)} fold models, mean probability ({dirs})"


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


def prepare_image(path: Path, params: Params, shape: tuple[int, int]) -> Prepared:
    """Decode one file and take it through ingest's steps (``ingest.process_pixels``) and validate's blank rule, then
    fit its ROI to the model input ``shape`` exactly as training reads an ingested ROI PNG.

    Raises:
        QuarantineError: the file cannot be used (the reason says why, as ingest's quarantine would).
        BlankImageError: the processed image has (almost) no contrast: std below ``validate.min_std``.
        ValueError: the decoded pixels are unusable (e.g. not finite).
    """
    if path.is_symlink() and not path.exists():
        raise QuarantineError("symlink_dangling", "its target does not exist")
    decoded = decode_file(path, max_pixels=params.ingest.max_pixels, multiframe=params.ingest.multiframe)
    done = process_pixels(decoded, params.ingest)
    del decoded
    std = float(done.image.std())
    if std < params.validate.min_std:
        raise BlankImageError(f"blank: intensity std {std:.3f} < validate.min_std {params.validate.min_std}")
    # As png16.read reads the ROI PNG that training uses: uint16 / 65535 as float32.
    return Prepared(fit((done.roi_image / float(U16_MAX)).astype(np.float32), shape), done.redacted)


def model_dirs(model: str | Path) -> list[Path]:
    """The model directories ``--model`` names: a fold directory (or its ``model.pt``) alone, or every fold
    directory of ``models/<m>/`` in fold order.

    Raises:
        FileNotFoundError: nothing there, or a directory with neither ``model.pt`` nor fold directories.
        ValueError: the fold directories do not match ``models/<m>/meta.json`` (see ``audit.fold_model_dirs``).
    """
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model not found (run the train stage, or `dvc pull`)")
    if not path.is_dir():
        return [path.parent]
    if (path / WEIGHTS).exists():
        return [path]
    folds = fold_model_dirs(path)
    if not folds:
        raise FileNotFoundError(f"{path}: no {WEIGHTS} and no fold model directories (fold<k>/{WEIGHTS} with "
                                f"{META}, as the train stage writes them); run the train stage, or `dvc pull`")
    return list(folds.values())


def load_ensemble(model: str | Path, device: str = "cpu") -> Ensemble:
    """Load the model(s) ``--model`` names (:func:`model_dirs`) in eval mode on ``device``.

    Raises:
        FileNotFoundError: a model directory, its meta.json or model.pt is missing.
        ValueError: a ``model.pt`` is not a weights-only state dict (refused, nothing in it run), differs from the
            ``model_sha256`` its meta.json records, or the fold models disagree on model, image size or classes.
        RuntimeError: the weights do not fit the architecture meta.json names.
    """
    members, metas = [], []
    for directory in model_dirs(model):
        net, meta = _load_model(directory, device)
        members.append(FoldModel(meta.get("fold"), directory, net, str(meta.get("tta", "none")),
                                 Calibration.from_record(meta.get("calibration"))))
        metas.append(meta)
    first = metas[0]
    for member, meta in zip(members[1:], metas[1:]):
        for key in _AGREE:
            if meta.get(key) != first.get(key):
                raise ValueError(f"{member.directory / META}: {key} is {meta.get(key)!r}, but "
                                 f"{members[0].directory / META} has {first.get(key)!r}; the fold models of one "
                                 "ensemble must agree")
    if "image_size" not in first:
        raise ValueError(f"{members[0].directory / META}: missing key(s) ['image_size']")
    shape = first.get("input_shape")
    return Ensemble(first["model"], int(first["image_size"]), tuple(first["classes"]), tuple(members),
                    (int(shape[0]), int(shape[1])) if shape else None)


def _load_model(model_dir: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """``models.load_trained``, with the weights checked against meta.json's ``model_sha256`` first and a model.pt
    that ``torch.load(weights_only=True)`` refuses reported by name.

    torch raises ``pickle.UnpicklingError`` for a pickle of anything but tensors and containers (a whole module, or a
    payload that would run code), ``EOFError`` / ``KeyError`` for an empty or non-pickle file, and ``TypeError`` when
    what it loaded is not a dict of tensors.

    Raises:
        ValueError: the weights file is not a weights-only state dict (nothing in it was executed), or its sha256
            differs from the one recorded at training.
    """
    weights, meta_path = model_dir / WEIGHTS, model_dir / META
    if weights.is_file() and meta_path.is_file():
        recorded = jsonfile.read(meta_path).get("model_sha256")
        if recorded and sha256_file(weights) != recorded:
            raise ValueError(f"{weights}: sha256 differs from model_sha256 in {meta_path} (the weights were changed "
                             "after training); refused")
    try:
        return load_trained(model_dir, map_location=device)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{weights}: not a weights-only state dict as the train stage saves it "
            f"({type(exc).__name__}); refused without running anything in it. Re-save the weights with "
            "torch.save(model.state_dict(), path), or retrain"
        ) from exc


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_files(
    model: str | Path | Ensemble,
    files: Sequence[Path],
    params: Params,
    *,
    gradcam_dir: str | Path | None = None,
    device: str = "cpu",
) -> list[Prediction]:
    """Predict the class probabilities of each file (in input order).

    Args:
        model: ``models/<m>`` (the fold ensemble), a fold directory or its ``model.pt``, or a loaded
            :class:`Ensemble`.
        files: the files (see :func:`collect_files`).
        params: the pipeline params (``ingest`` for decoding, text screening and the ROI, ``validate.min_std``,
            ``evaluate.threshold``).
        gradcam_dir: write ``<file stem>.gradcam.png`` overlays there (None: no Grad-CAM).
        device: torch device for the model.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: the model cannot be used (see :func:`load_ensemble`).
        burnedin.OcrUnavailableError: the text screening cannot run.
    """
    ensemble = model if isinstance(model, Ensemble) else load_ensemble(model, device)
    threshold = params.evaluate.threshold
    task = Task(ensemble.classes)
    cam_names = _gradcam_names(files) if gradcam_dir is not None else {}
    results: list[Prediction] = []
    for batch in _batches(files, BATCH):
        prepared: dict[int, Prepared] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(batch):
            try:
                prepared[i] = prepare_image(path, params, ensemble.shape)
            except (QuarantineError, BlankImageError) as exc:  # per-file problem: report it, go on with the others
                errors[i] = str(exc)
            except ValueError as exc:  # normalise() on an unusable decode (e.g. non-finite pixels)
                errors[i] = f"corrupt: {exc}"
        probs: dict[int, np.ndarray] = {}
        if prepared:
            order = sorted(prepared)
            tensor = torch.from_numpy(np.stack([prepared[i].image for i in order]))[:, None]
            probs = dict(zip(order, ensemble.predict(tensor, device)))
            if gradcam_dir is not None:
                maps = ensemble.gradcam(tensor)
                for k, i in enumerate(order):
                    save_overlay(Path(gradcam_dir) / cam_names[batch[i]], prepared[i].image, maps[k])
        for i, path in enumerate(batch):
            if i in probs:
                p = probs[i]
                predicted = ensemble.classes[int(task.decide(p[None, :], threshold)[0])]
                results.append(Prediction(str(path), {c: round(float(v), 6) for c, v in zip(ensemble.classes, p)},
                                          predicted, "ok", redacted=prepared[i].redacted))
            else:
                results.append(Prediction(str(path), {}, "", "error", errors[i]))
    return results


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


def to_csv(rows: Sequence[Prediction], classes: Sequence[str] | None = None) -> str:
    """The rows as CSV text with the header ``file,prob_<class>...,predicted,status,error,redacted`` (the classes
    of the model, or those the ok rows hold)."""
    if classes is None:
        classes = next((list(r.probabilities) for r in rows if r.probabilities), [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", *(f"prob_{c}" for c in classes), "predicted", "status", "error", "redacted"])
    for row in rows:
        probs = ["" if row.probabilities.get(c) is None else row.probabilities[c] for c in classes]
        tail = ["" if v is None else v for v in (row.predicted, row.status, row.error, row.redacted)]
        writer.writerow([row.file, *probs, *tail])  # booleans as True/False, as in the manifest
    return buf.getvalue()


def write_csv(path: str | Path, rows: Sequence[Prediction], classes: Sequence[str] | None = None) -> None:
    """Write :func:`to_csv` to ``path`` atomically."""
    write_text_atomic(path, to_csv(rows, classes))
