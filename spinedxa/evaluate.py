"""Evaluate one trained model out of fold: every scan scored once by the fold model that never saw it.

For each fold *k*, ``models/<m>/fold<k>/`` scores the ``test`` part of fold *k* (patients that fold's training,
early stopping and model selection never saw; the split stage assigns whole patients before any augmentation). The
pooled out-of-fold predictions of all folds get the metrics with patient-bootstrap intervals, the per-fold mean and
SD and the patient-level view (:func:`spinedxa.metrics.out_of_fold_record`), shared with the baseline, so every model
is scored the same way.

The **external cohort** (``data/external``, :mod:`spinedxa.external`), when there is one, is scored by the model's
fold ensemble: the mean of the fold models' calibrated class probabilities (with their test-time augmentation), the
model ``spinedxa predict`` uses. Its metrics join the record under ``external_*`` keys, its predictions go to their
own file. Nothing about it feeds back into any choice.

The metrics file holds numbers only (a DVC metric, written at a fixed precision); which models, runs and commits
produced them goes to a provenance file beside it (``reports/provenance/<model>.json``), read by the report and the
audit.

Grad-CAM (Selvaraju et al. 2017, via the ``grad-cam`` package) shows, for a few scored images, where the network's
last convolutional block found evidence for the last class (osteoporosis: the positive class of the binary task, the
most severe of the ordinal one), whatever the prediction: the same target for every panel keeps the heatmaps
comparable across images and models. A map without contrast (a network
whose last block does not respond, e.g. one that predicts one class for everything) is *flagged* in its panel and
counted in the metrics record (``gradcam_degenerate``), never drawn as if it were a finding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display backend
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from spinedxa import metrics, tracking
from spinedxa.calibration import Calibration
from spinedxa.config import Params
from spinedxa.contracts import external as external_cohort, jsonfile, predictions as predictions_contract
from spinedxa.contracts import splits as splits_contract
from spinedxa.data import ImageItem, model_input_shape, part_items, stack_images
from spinedxa.errors import UserError
from spinedxa.files import atomic_path, sha256_file
from spinedxa.models import get_spec, load_trained
from spinedxa.models import score as models_score
from spinedxa.runtime import resolve_device

log = logging.getLogger(__name__)

#: Prefix of the test metrics in the model's MLflow run (its training metrics are train_*/val_*).
MLFLOW_PREFIX = "test_"
#: A Grad-CAM map whose values span less than this (maps are normalised to [0, 1]) has no contrast: flagged.
DEGENERATE_SPAN = 1e-3
#: Sub-directory of models/<m>/ holding fold k's model.
FOLD_DIR = "fold{k}"


class ModelMismatchError(UserError, ValueError):
    """models/<m>/ does not hold the model, image size, classes or weights that params.yaml and meta.json promise."""


@dataclass(frozen=True)
class EvaluatePaths:
    """Inputs and outputs of ``evaluate@<model>`` (the arguments in dvc.yaml)."""

    model_dir: Path
    splits: Path
    images: Path
    metrics: Path
    predictions: Path
    plots: Path
    gradcam: Path
    external: Path | None = None  # data/external (the external cohort, or its disabled marker)
    external_predictions: Path | None = None  # reports/predictions/external/<model>.csv
    provenance: Path | None = None  # reports/provenance/<model>.json


def check_model_dir(model_dir: Path, meta: dict, name: str, image_size: int, classes: Sequence[str]) -> str:
    """Check ``meta.json`` against the stage's model, ``train.<model>.image_size`` and ``data.classes``.

    Returns:
        The sha256 of ``model.pt`` (verified against ``meta["model_sha256"]`` when recorded).

    Raises:
        ModelMismatchError: a value differs (the message names the file, the key and both values).
    """
    meta_path = model_dir / "meta.json"
    expected = {"model": name, "image_size": image_size, "classes": list(classes)}
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ModelMismatchError(f"{meta_path}: {key} is {meta.get(key)!r}, but params.yaml gives {want!r}")
    digest = sha256_file(model_dir / "model.pt")
    recorded = meta.get("model_sha256")
    if recorded and recorded != digest:
        raise ModelMismatchError(
            f"{model_dir / 'model.pt'}: sha256 {digest} differs from {recorded} recorded in {meta_path} "
            "(the weights were changed after training)"
        )
    return digest


def pick_gradcam_indices(y_true: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` test indices, taking the classes in turn from the last (most severe) class down, each in test
    order (deterministic)."""
    y = np.asarray(y_true)
    by_class = [list(np.flatnonzero(y == k)) for k in range(int(y.max(initial=1)), -1, -1)]
    picked: list[int] = []
    while len(picked) < n and any(by_class):
        for queue in by_class:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def gradcam_maps(model: nn.Module, name: str, images: torch.Tensor, target_class: int = -1) -> np.ndarray:
    """Grad-CAM heatmaps (``k x S x S`` in [0, 1]) of ``target_class`` at the model's registered Grad-CAM layer.

    The model runs in eval mode (pytorch_grad_cam sets it), where InceptionV3 returns a plain logits tensor.
    """
    layer = get_spec(name).gradcam_layer(model)
    device = next(model.parameters()).device
    if target_class < 0:  # the last class: the positive / most severe one
        target_class = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features + target_class
    with GradCAM(model=model, target_layers=[layer]) as cam:
        heat = cam(
            input_tensor=images.to(device, dtype=torch.float32),
            targets=[ClassifierOutputTarget(target_class) for _ in range(len(images))],
        )
    return np.nan_to_num(np.asarray(heat, dtype=np.float32))  # a flat map (all-zero gradients) normalises to 0/0


def degenerate_maps(maps: np.ndarray) -> np.ndarray:
    """True for each map without contrast (constant up to :data:`DEGENERATE_SPAN`)."""
    flat = maps.reshape(len(maps), -1)
    return (flat.max(axis=1) - flat.min(axis=1)) < DEGENERATE_SPAN


def write_gradcam_figure(
    path: str | Path,
    images: np.ndarray,
    maps: np.ndarray,
    y_true: Sequence[int],
    prob: Sequence[float],
    classes: Sequence[str],
    model_name: str,
) -> None:
    """A PNG grid: per test image the scan, then its Grad-CAM overlay, titled with true class and P(positive).

    Images are numbered, never named: file names of real cohorts can hold patient identifiers.
    """
    k = len(images)
    flat = degenerate_maps(maps)
    fig = Figure(figsize=(4.0, 3.4 * k))
    axes = fig.subplots(k, 2, squeeze=False)
    for row in range(k):
        gray = np.clip(images[row], 0.0, 1.0).astype(np.float32)
        overlay = show_cam_on_image(np.repeat(gray[..., None], 3, axis=2), maps[row], use_rgb=True)
        axes[row, 0].imshow(gray, cmap="gray", vmin=0.0, vmax=1.0)
        axes[row, 0].set_title(f"scored image {row + 1}: true {classes[int(y_true[row])]}", fontsize=8)
        if flat[row]:
            axes[row, 1].imshow(gray, cmap="gray", vmin=0.0, vmax=1.0, alpha=0.35)
            axes[row, 1].text(0.5, 0.5, "Grad-CAM map\nwithout contrast\n(degenerate: no\nlocalised evidence)",
                              ha="center", va="center", fontsize=7, color="red", transform=axes[row, 1].transAxes)
            axes[row, 1].set_title(f"DEGENERATE map: P = {float(prob[row]):.2f}", fontsize=8, color="red")
        else:
            axes[row, 1].imshow(overlay)
            axes[row, 1].set_title(f"Grad-CAM ({classes[-1]}): P = {float(prob[row]):.2f}", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    note = f" ({int(flat.sum())} of {k} maps degenerate)" if flat.any() else ""
    fig.suptitle(f"{model_name}: Grad-CAM on out-of-fold images{note}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def mlflow_metrics(record: dict[str, object]) -> dict[str, float]:
    """The numeric, defined entries of a metrics record, prefixed ``test_`` for the model's MLflow run."""
    return {
        f"{MLFLOW_PREFIX}{k}": float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def fold_dir(model_dir: Path, fold: int) -> Path:
    """``models/<m>/fold<k>``: where the train stage writes fold ``k``'s model."""
    return Path(model_dir) / FOLD_DIR.format(k=fold)


def evaluate_model(params: Params, name: str, paths: EvaluatePaths) -> dict[str, object]:
    """Score every fold's model on its held-out part, and the external cohort with the fold ensemble; write the pooled
    metrics, predictions, plots, provenance and Grad-CAM.

    The pooled metrics (prefixed ``test_``) go to the model's MLflow parent run and each fold's own metrics to its
    nested run (run ids in ``meta.json``); a model without run ids is evaluated with a warning and not logged.

    Returns:
        The metrics record written to ``paths.metrics``.

    Raises:
        ModelMismatchError: a fold's meta.json or model.pt do not match params.yaml (see :func:`check_model_dir`).
        ValueError: a fold's test part is empty.
        spinedxa.tracking.RunNotFoundError: meta.json names an MLflow run the tracking store does not have.
    """
    classes, cfg = params.data.classes, params.evaluate
    image_size = params.train.model(name).image_size
    shape = model_input_shape(image_size, params.ingest.roi)
    device = resolve_device(params.train.device)
    table = splits_contract.read(paths.splits)
    parts, digests, fold_records, fold_runs, kept, fold_models = [], {}, {}, {}, {}, []
    gradcam_pool: list[tuple[torch.nn.Module, torch.Tensor, np.ndarray, np.ndarray]] = []
    for fold in splits_contract.folds(table):
        model_dir = fold_dir(paths.model_dir, fold)
        model, meta = load_trained(model_dir)
        digests[str(fold)] = check_model_dir(model_dir, meta, name, image_size, classes)
        items = part_items(paths.splits, paths.images, fold, "test", classes, table=table)
        if not items:
            raise ValueError(f"{paths.splits}: fold {fold} has no test images")
        calibration = Calibration.from_record(meta.get("calibration"))
        tta = meta.get("tta", "none")
        prob = score(model, name, stack_images(items, shape), calibration, tta, device)
        y_true = np.array([it.label for it in items], dtype=int)
        frame = metrics.predictions_frame([it.source for it in items], [it.patient_id for it in items], y_true, prob,
                                          classes=classes, threshold=cfg.threshold, folds=[fold] * len(items))
        parts.append(frame)
        fold_runs[fold] = meta.get("mlflow_run_id")
        kept[str(fold)] = meta.get("best_epoch")
        fold_records[fold] = metrics.point_metrics(y_true, metrics.task_prob(frame), cfg.threshold, classes)
        gradcam_pool.append((model, stack_images(items, shape), y_true, metrics.positive_prob(prob)))
        fold_models.append((model, calibration, tta))
    predictions = pd.concat(parts, ignore_index=True).sort_values("source", kind="stable").reset_index(drop=True)
    record: dict[str, object] = metrics.out_of_fold_record(
        predictions, classes, protocol=params.split.protocol, threshold=cfg.threshold, n_resamples=cfg.bootstrap,
        seed=cfg.seed)
    record.update(kept_epoch=kept)
    external = score_external(fold_models, name, params, paths, shape, device)
    if external is not None:
        record.update(metrics.external_record(external, classes, threshold=cfg.threshold,
                                              n_resamples=cfg.bootstrap, seed=cfg.seed))
    record.update(seed_spread(params, name, paths, table, shape, device, predictions, external))
    flagged = _write_gradcam(gradcam_pool, name, cfg.gradcam_images, classes, paths.gradcam)
    record["gradcam_degenerate"] = flagged
    metrics.write_evaluation(predictions, record, metrics_path=paths.metrics, predictions_path=paths.predictions,
                             plots_dir=paths.plots)
    parent = jsonfile.read(Path(paths.model_dir) / "meta.json") if (Path(paths.model_dir) / "meta.json").is_file() \
        else {}
    # Which models produced the numbers: identifiers, never metrics (they differ between clones and runs).
    provenance = {
        "model": name, "variant": parent.get("variant", name), "mlflow_run_id": parent.get("mlflow_run_id"),
        "model_sha256": digests, "fast_path": parent.get("fast_path"), "threads": parent.get("threads"),
        "train_git_commit": parent.get("git_commit"), "train_git_dirty": parent.get("git_dirty"),
        "init_weights": parent.get("init_weights"),
    }
    if paths.provenance is not None:
        jsonfile.write(paths.provenance, provenance)
    _log({**record, **provenance}, fold_records, fold_runs, paths)
    return record


#: Sub-directory of models/<m>/ holding seed repeat r of fold k (train.repeats; spinedxa.train.repeat_dir).
REPEAT_DIR = "repeat{r}/fold{k}"


def seed_spread(params: Params, name: str, paths: EvaluatePaths, table: pd.DataFrame, shape: tuple[int, int],
                device: torch.device | str, first: pd.DataFrame, first_external: pd.DataFrame | None
                ) -> dict[str, float | int]:
    """How much the training seed alone moves the results (``train.repeats`` > 1): the pooled out-of-fold ROC-AUC
    (macro for the ordinal task) of every seed repeat, and of the external cohort's fold ensemble, with their SD and
    range. The first training (``seed_0``) is the result the report shows; nothing here chooses anything.

    Returns:
        ``{}`` for one training; else ``repeats``, ``seed_roc_auc_<r>``, ``seed_roc_auc_sd``, ``seed_roc_auc_range``
        (and ``seed_external_roc_auc_*`` with an external cohort).
    """
    parent = Path(paths.model_dir) / "meta.json"
    repeats = int(jsonfile.read(parent).get("repeats", 1)) if parent.is_file() else 1
    if repeats < 2:
        return {}
    classes, threshold = params.data.classes, params.evaluate.threshold
    aucs = [metrics.point_metrics(first["y_true"], metrics.task_prob(first), threshold, classes)["roc_auc"]]
    external_aucs = []
    if first_external is not None:
        external_aucs.append(metrics.point_metrics(first_external["y_true"], metrics.task_prob(first_external),
                                                   threshold, classes)["roc_auc"])
    for r in range(1, repeats):
        parts, members = [], []
        for fold in splits_contract.folds(table):
            model_dir = Path(paths.model_dir) / REPEAT_DIR.format(r=r, k=fold)
            model, meta = load_trained(model_dir)
            check_model_dir(model_dir, meta, name, params.train.model(name).image_size, classes)
            calibration, tta = Calibration.from_record(meta.get("calibration")), meta.get("tta", "none")
            items = part_items(paths.splits, paths.images, fold, "test", classes, table=table)
            prob = score(model, name, stack_images(items, shape), calibration, tta, device)
            parts.append(metrics.predictions_frame([it.source for it in items], [it.patient_id for it in items],
                                                   np.array([it.label for it in items]), prob, classes=classes,
                                                   threshold=threshold, folds=[fold] * len(items)))
            members.append((model, calibration, tta))
        pooled = pd.concat(parts, ignore_index=True)
        aucs.append(metrics.point_metrics(pooled["y_true"], metrics.task_prob(pooled), threshold, classes)["roc_auc"])
        if first_external is not None:
            ext = score_external(members, name, params, dataclasses.replace(paths, external_predictions=None), shape,
                                 device)
            external_aucs.append(metrics.point_metrics(ext["y_true"], metrics.task_prob(ext), threshold,
                                                       classes)["roc_auc"])
    out: dict[str, float | int] = {"repeats": repeats}
    for prefix, values in (("seed_roc_auc", aucs), ("seed_external_roc_auc", external_aucs)):
        if not values:
            continue
        out.update({f"{prefix}_{r}": v for r, v in enumerate(values)})
        out.update({f"{prefix}_sd": float(np.std(values, ddof=1)), f"{prefix}_range": float(np.ptp(values))})
    return out


def score(model: nn.Module, name: str, images: torch.Tensor, calibration: Calibration, tta: str,
          device: torch.device | str) -> np.ndarray:
    """:func:`spinedxa.models.score` (calibrated class probabilities with the fold's TTA)."""
    return models_score(model, name, images, calibration, tta=tta, device=device)


def score_external(fold_models: Sequence[tuple[nn.Module, Calibration, str]], name: str, params: Params,
                   paths: EvaluatePaths, shape: tuple[int, int], device: torch.device | str) -> pd.DataFrame | None:
    """The fold ensemble's predictions on the external cohort (None without one): the mean of the fold models'
    calibrated class probabilities; written to ``paths.external_predictions``."""
    if paths.external is None or not external_cohort.is_enabled(paths.external):
        if paths.external_predictions is not None:  # a DVC output: present, with no row
            predictions_contract.write_empty(paths.external_predictions, params.data.classes)
        return None
    rows = external_cohort.accepted_scans(paths.external)
    items = [ImageItem(Path(paths.external) / r.roi, params.data.task.index(r.label), r.source, r.patient_id)
             for r in rows.itertuples(index=False)]
    images = stack_images(items, shape)
    prob = np.mean([score(m, name, images, c, tta, device) for m, c, tta in fold_models], axis=0)
    frame = metrics.predictions_frame([it.source for it in items], [it.patient_id for it in items],
                                      np.array([it.label for it in items], dtype=int), prob,
                                      classes=params.data.classes, threshold=params.evaluate.threshold)
    if paths.external_predictions is not None:
        predictions_contract.write(paths.external_predictions, frame)
    return frame


def _write_gradcam(pool: Sequence[tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]], name: str, n: int,
                   classes: Sequence[str], path: Path) -> int:
    """Grad-CAM panels of ``n`` scored images (taken from the folds in turn); returns how many maps are degenerate."""
    picks: list[tuple[int, int]] = []  # (fold index, image index)
    queues = [pick_gradcam_indices(y, n) for _, _, y, _ in pool]
    while len(picks) < n and any(queues):
        for f, queue in enumerate(queues):
            if queue and len(picks) < n:
                picks.append((f, queue.pop(0)))
    images, maps, y_true, prob = [], [], [], []
    for f, i in picks:
        model, imgs, y, p = pool[f]
        maps.append(gradcam_maps(model, name, imgs[i: i + 1])[0])
        images.append(imgs[i, 0].numpy())
        y_true.append(int(y[i]))
        prob.append(float(p[i]))
    heat = np.stack(maps)
    write_gradcam_figure(path, np.stack(images), heat, y_true, prob, classes, name)
    flagged = int(degenerate_maps(heat).sum())
    if flagged:
        log.warning("%s: %d of %d Grad-CAM maps are degenerate (no contrast); flagged in %s", name, flagged,
                    len(picks), path)
    return flagged


def _log(record: dict[str, object], fold_records: dict[int, dict[str, float]], fold_runs: dict[int, str | None],
         paths: EvaluatePaths) -> None:
    """Pooled metrics and artifacts to the parent run; each fold's metrics to its nested run."""
    run_id = record.get("mlflow_run_id")
    if not run_id:
        log.warning("%s: meta.json has no mlflow_run_id; test metrics are not logged to MLflow", paths.model_dir)
        return
    artifacts = [paths.metrics, paths.predictions, paths.gradcam, *sorted(Path(paths.plots).glob("*.csv"))]
    artifacts += [p for p in (paths.external_predictions, paths.provenance) if p is not None and Path(p).is_file()]
    tracking.log_metrics_to_run(str(run_id), mlflow_metrics(record), artifacts=artifacts)
    for fold, fold_run in fold_runs.items():
        if fold_run:
            tracking.log_metrics_to_run(fold_run, mlflow_metrics(fold_records[fold]))
