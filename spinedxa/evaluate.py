"""Evaluate one trained model on the held-out test split: metrics with patient-level CIs, curves, Grad-CAM, MLflow.

Only the ``test`` rows of the splits CSV are scored; they belong to patients the model never saw in training or model
selection (the split stage splits by patient before any augmentation). Metrics, intervals and output files come from
:mod:`spinedxa.metrics`, shared with the baseline, so every model is scored the same way.

Grad-CAM (Selvaraju et al. 2017, via the ``grad-cam`` package) shows, for a few test images, where the network's
last convolutional block found evidence for *osteoporosis* (the positive class, whatever the prediction): the same
target for every panel keeps the heatmaps comparable across images and models.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API needs no pyplot state and no display backend
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from spinedxa import metrics, tracking
from spinedxa.config import Params
from spinedxa.data import load_split, stack_images
from spinedxa.files import atomic_path, sha256_file
from spinedxa.models import get_spec, load_trained, predict_proba
from spinedxa.train import resolve_device

log = logging.getLogger(__name__)

#: Prefix of the test metrics in the model's MLflow run (its training metrics are train_*/val_*).
MLFLOW_PREFIX = "test_"


class ModelMismatchError(ValueError):
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
    """Up to ``n`` test indices, alternating osteoporosis and normal images in test order (deterministic)."""
    y = np.asarray(y_true)
    by_class = [list(np.flatnonzero(y == 1)), list(np.flatnonzero(y == 0))]
    picked: list[int] = []
    while len(picked) < n and any(by_class):
        for queue in by_class:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def gradcam_maps(model: nn.Module, name: str, images: torch.Tensor, target_class: int = 1) -> np.ndarray:
    """Grad-CAM heatmaps (``k x S x S`` in [0, 1]) of ``target_class`` at the model's registered Grad-CAM layer.

    The model runs in eval mode (pytorch_grad_cam sets it), where InceptionV3 returns a plain logits tensor.
    """
    layer = get_spec(name).gradcam_layer(model)
    device = next(model.parameters()).device
    with GradCAM(model=model, target_layers=[layer]) as cam:
        heat = cam(
            input_tensor=images.to(device, dtype=torch.float32),
            targets=[ClassifierOutputTarget(target_class) for _ in range(len(images))],
        )
    return np.nan_to_num(np.asarray(heat, dtype=np.float32))  # a flat map (all-zero gradients) normalises to 0/0


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
    fig = Figure(figsize=(5.0, 2.6 * k))
    axes = fig.subplots(k, 2, squeeze=False)
    for row in range(k):
        gray = np.clip(images[row], 0.0, 1.0).astype(np.float32)
        overlay = show_cam_on_image(np.repeat(gray[..., None], 3, axis=2), maps[row], use_rgb=True)
        axes[row, 0].imshow(gray, cmap="gray", vmin=0.0, vmax=1.0)
        axes[row, 0].set_title(f"test image {row + 1}: true {classes[int(y_true[row])]}", fontsize=8)
        axes[row, 1].imshow(overlay)
        axes[row, 1].set_title(f"Grad-CAM ({classes[1]}): P = {float(prob[row]):.2f}", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(f"{model_name}: Grad-CAM on held-out test images", fontsize=9)
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


def evaluate_model(params: Params, name: str, paths: EvaluatePaths) -> dict[str, object]:
    """Score ``models/<name>`` on the test split and write metrics, predictions, plot tables and Grad-CAM figure.

    The metrics (prefixed ``test_``) and the output files are also logged to the model's MLflow training run
    (``mlflow_run_id`` in meta.json); a model without a run id is evaluated with a warning and not logged.

    Returns:
        The metrics record written to ``paths.metrics``.

    Raises:
        ModelMismatchError: meta.json or model.pt do not match params.yaml (see :func:`check_model_dir`).
        ValueError: the test split is empty or holds a single class.
        spinedxa.tracking.RunNotFoundError: meta.json names an MLflow run the tracking store does not have.
    """
    classes = params.data.classes
    image_size = params.train.model(name).image_size
    cfg = params.evaluate
    model, meta = load_trained(paths.model_dir)
    digest = check_model_dir(paths.model_dir, meta, name, image_size, classes)

    items = load_split(paths.splits, paths.images, "test", classes)
    y_true = np.array([it.label for it in items], dtype=int)
    if len(items) == 0 or len(np.unique(y_true)) < 2:
        raise ValueError(
            f"{paths.splits}: the test split must hold both classes {list(classes)}, "
            f"found {len(items)} image(s) of class(es) {sorted(set(y_true.tolist()))}"
        )
    images = stack_images(items, image_size)
    prob = predict_proba(model, name, images, device=resolve_device(params.train.device))
    patient_ids = [it.patient_id for it in items]

    record: dict[str, object] = metrics.summarize(
        y_true, prob, patient_ids, threshold=cfg.threshold, n_resamples=cfg.bootstrap, seed=cfg.seed
    )
    record.update(model=name, mlflow_run_id=meta.get("mlflow_run_id"), model_sha256=digest)
    predictions = metrics.predictions_frame(
        [it.source for it in items], patient_ids, y_true, prob, classes=classes, threshold=cfg.threshold
    )
    metrics.write_evaluation(
        predictions, record, metrics_path=paths.metrics, predictions_path=paths.predictions, plots_dir=paths.plots
    )

    picks = pick_gradcam_indices(y_true, cfg.gradcam_images)
    maps = gradcam_maps(model, name, images[picks])
    write_gradcam_figure(
        paths.gradcam, images[picks, 0].numpy(), maps, y_true[picks], prob[picks], classes, name
    )

    run_id = meta.get("mlflow_run_id")
    if run_id:
        artifacts = [paths.metrics, paths.predictions, paths.gradcam, *sorted(Path(paths.plots).glob("*.csv"))]
        tracking.log_metrics_to_run(run_id, mlflow_metrics(record), artifacts=artifacts)
    else:
        log.warning("%s: meta.json has no mlflow_run_id; test metrics are not logged to MLflow", paths.model_dir)
    return record
