"""A trivial, non-CNN baseline: logistic regression on ROI intensity and texture statistics.

If the CNNs cannot beat this, they have learnt nothing beyond "how bright is the spine". Lower bone mineral density
shows in a DXA image as lower intensity of the vertebrae and a coarser, lower-contrast trabecular texture, so the
features are:

* intensity of the vertebral bodies: the central band of the located L1-L4 region of interest, the same ROI image
  the CNNs see (:mod:`spinedxa.roi`; columns 25-75 %, where the bodies lie between the paraspinal soft tissue on
  either side) - mean, standard deviation, 10th/50th/90th percentiles, and the band mean relative to the whole ROI
  (bone against soft tissue, insensitive to the overall exposure);
* grey-level co-occurrence texture of the band (Haralick et al. 1973, via ``skimage.feature.graycomatrix``):
  contrast, homogeneity, energy and correlation, averaged over distances 1 and 2 px and four directions;
* mean local standard deviation in 5 x 5 windows (fine trabecular variation).

The model is a scikit-learn pipeline (standardisation, then L2 logistic regression with balanced class weights, the
counterpart of the CNNs' inverse-frequency loss weighting; multinomial for three or more classes). Its regularisation
strength C is chosen on the validation part of each fold by log-loss (a proper score that stays defined when a tiny
validation part holds one class); the model is fitted on the fold's training part only, exactly what the CNNs train
on. Like every CNN's, each fold's probabilities are then calibrated on that fold's validation part with the task's
calibration (:mod:`spinedxa.calibration`: Platt for two classes, temperature for more), so the pooled comparison is
like for like. Each fold's model scores that fold's held-out scans, the fold ensemble (mean calibrated probability)
scores the external cohort, and the predictions get the same metrics, intervals and output files as every CNN
(:mod:`spinedxa.metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.feature import graycomatrix, graycoprops
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from spinedxa import calibration as calibration_policy, metrics
from spinedxa.calibration import Calibration
from spinedxa.config import Params
from spinedxa.contracts import external as external_cohort, jsonfile, predictions as predictions_contract
from spinedxa.contracts import splits as splits_contract
from spinedxa.provenance import provenance
from spinedxa.contracts.splits import ROLES
from spinedxa.data import ImageItem, part_items, read_image

log = logging.getLogger(__name__)

#: The vertebral band as fractions of the ROI image: the ROI holds the L1-L4 bodies between the T12/L1 and L4/L5
#: discs, with the paraspinal soft tissue on either side (spinedxa.roi: body width plus 0.4 body widths per side).
BAND_COLUMNS = (0.25, 0.75)
BAND_ROWS = (0.03, 0.97)
#: Grey levels for the co-occurrence matrix; 32 levels is a common choice for GLCM texture on medical images
#: (fewer levels stabilise the statistics on small ROIs; see Lofstedt et al. 2019, PLoS ONE 14(2): e0212110).
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LOCAL_STD_WINDOW = 5
#: Candidate regularisation strengths (inverse L2 penalty), a decade grid around scikit-learn's default C = 1.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Smallest ROI side in pixels for which the texture statistics mean anything.
MIN_ROI_SIDE = 8

FEATURE_NAMES: tuple[str, ...] = (
    "roi_mean",
    "roi_std",
    "roi_p10",
    "roi_p50",
    "roi_p90",
    "roi_to_image_mean",
    *(f"glcm_{p}" for p in GLCM_PROPS),
    "local_std_mean",
)


def vertebral_band(img: np.ndarray) -> np.ndarray:
    """The central vertical band of an ROI image (``H x W`` in [0, 1]) where the vertebral bodies lie.

    Raises:
        ValueError: the band would be smaller than :data:`MIN_ROI_SIDE` pixels.
    """
    h, w = img.shape
    r0, r1 = int(round(BAND_ROWS[0] * h)), int(round(BAND_ROWS[1] * h))
    c0, c1 = int(round(BAND_COLUMNS[0] * w)), int(round(BAND_COLUMNS[1] * w))
    if min(r1 - r0, c1 - c0) < MIN_ROI_SIDE:
        raise ValueError(f"image of {h} x {w} px is too small for the baseline's vertebral band (needs >= {MIN_ROI_SIDE} px)")
    return img[r0:r1, c0:c1]


def image_features(img: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one image (``H x W`` float in [0, 1])."""
    band = vertebral_band(img)
    p10, p50, p90 = np.percentile(band, [10, 50, 90])
    image_mean = float(img.mean())
    # A fixed grey-level range (not per-image min/max) keeps texture comparable across images of different exposure.
    levels = np.minimum((band * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)
    glcm = graycomatrix(levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
    texture = [float(np.nanmean(graycoprops(glcm, prop))) for prop in GLCM_PROPS]
    mean = ndimage.uniform_filter(band, LOCAL_STD_WINDOW)
    mean_sq = ndimage.uniform_filter(band * band, LOCAL_STD_WINDOW)
    local_std = np.sqrt(np.clip(mean_sq - mean * mean, 0.0, None))
    return np.array(
        [
            band.mean(),
            band.std(),
            p10,
            p50,
            p90,
            band.mean() / image_mean if image_mean > 0 else 0.0,  # an all-black image has no soft-tissue reference
            *texture,
            local_std.mean(),
        ],
        dtype=float,
    )


def feature_matrix(items: Sequence[ImageItem]) -> np.ndarray:
    """Features of every item, ``len(items) x len(FEATURE_NAMES)``.

    Raises:
        ValueError: an image is too small for the ROI (the message names the file).
    """
    rows = []
    for item in items:
        try:
            rows.append(image_features(read_image(item.path)))
        except ValueError as exc:
            raise ValueError(f"{item.path}: {exc}") from exc
    return np.vstack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))


def _pipeline(seed: int, c: float = 1.0) -> Pipeline:
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed),
    )


@dataclass(frozen=True)
class FittedBaseline:
    """The fitted pipeline, the chosen C and the validation log-loss of every candidate (None: no validation).

    ``fold`` and ``test_metrics`` (point metrics on the fold's held-out part) are filled by :func:`run_baseline`.
    """

    model: Pipeline
    c: float
    val_log_loss: dict[float, float] | None
    fold: int = 0
    test_metrics: dict[str, float] | None = None
    calibration: Calibration = Calibration()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (``N x K``) of feature rows ``x``."""
        return self.calibration.apply(self.model.predict_proba(x))


def fit_baseline(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, seed: int,
    n_classes: int | None = None,
) -> FittedBaseline:
    """Fit on the training part for every C of :data:`C_GRID`; keep the one with the lowest validation log-loss,
    then calibrate it on the validation part (as every CNN fold is calibrated).

    The model is fitted on exactly the images the CNNs train on in this fold (the validation part only chooses C
    and the calibration, as it only chooses the CNNs' best epoch and theirs), so the comparison is like for like.

    Raises:
        ValueError: the training part does not hold both classes.
    """
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"baseline: the training part holds only class {np.unique(y_train).tolist()}; need both")
    if len(y_val) == 0:
        log.warning("baseline: no validation images; fitting C = 1.0 on the training part alone, uncalibrated")
        return FittedBaseline(_pipeline(seed).fit(x_train, y_train), 1.0, None)
    fits = {c: _pipeline(seed, c).fit(x_train, y_train) for c in C_GRID}
    labels = list(range(n_classes)) if n_classes else sorted(set(y_train))
    losses = {float(c): float(log_loss(y_val, _full(m, x_val, labels), labels=labels)) for c, m in fits.items()}
    best = min(C_GRID, key=lambda c: (losses[float(c)], c))  # ties: the stronger regularisation (smaller C)
    chosen = fits[best]
    return FittedBaseline(chosen, float(best), losses,
                          calibration=calibration_policy.fit(_full(chosen, x_val, labels), y_val, seed=seed))


def _full(model: Pipeline, x: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``predict_proba`` with a column for every class in ``labels`` (a class absent from training gets 0)."""
    prob = model.predict_proba(x)
    out = np.zeros((len(x), len(labels)))
    for j, c in enumerate(model.classes_):
        out[:, list(labels).index(int(c))] = prob[:, j]
    return out


@dataclass(frozen=True)
class BaselinePaths:
    """Inputs and outputs of the ``baseline`` stage (the arguments in dvc.yaml)."""

    splits: Path
    images: Path
    metrics: Path
    predictions: Path
    plots: Path
    external: Path | None = None  # data/external
    external_predictions: Path | None = None  # reports/predictions/external/baseline.csv
    provenance: Path | None = None  # reports/provenance/baseline.json


def run_baseline(params: Params, paths: BaselinePaths) -> tuple[dict[str, object], list[FittedBaseline]]:
    """Fit the baseline in every fold, score each fold's held-out part, and write the pooled out-of-fold results.

    Returns:
        The metrics record written to ``paths.metrics`` and the fitted model of each fold.

    Raises:
        ValueError: a fold's test part is empty, or its training part holds a single class.
    """
    classes, cfg = params.data.classes, params.evaluate
    table = splits_contract.read(paths.splits)
    parts, fitted = [], []
    features: dict[str, np.ndarray] = {}  # per source: every scan is read once, whatever the number of folds

    def matrix(items: Sequence[ImageItem]) -> np.ndarray:
        for item in items:
            if item.source not in features:
                features[item.source] = feature_matrix([item])[0]
        return np.vstack([features[it.source] for it in items]) if items else np.zeros((0, len(FEATURE_NAMES)))

    for fold in splits_contract.folds(table):
        items = {r: part_items(paths.splits, paths.images, fold, r, classes, table=table) for r in ROLES}
        if not items["test"]:
            raise ValueError(f"{paths.splits}: fold {fold} has no test images")
        y = {r: np.array([it.label for it in its], dtype=int) for r, its in items.items()}
        model = fit_baseline(matrix(items["train"]), y["train"], matrix(items["val"]), y["val"], seed=cfg.seed,
                             n_classes=len(classes))
        prob = model.predict(matrix(items["test"]))
        frame = metrics.predictions_frame(
            [it.source for it in items["test"]], [it.patient_id for it in items["test"]], y["test"], prob,
            classes=classes, threshold=cfg.threshold, folds=[fold] * len(prob))
        fitted.append(dataclasses.replace(model, fold=fold, test_metrics=metrics.point_metrics(
            y["test"], metrics.task_prob(frame), cfg.threshold, classes)))
        parts.append(frame)
    predictions = pd.concat(parts, ignore_index=True).sort_values("source", kind="stable").reset_index(drop=True)
    record = metrics.out_of_fold_record(predictions, classes, protocol=params.split.protocol,
                                        threshold=cfg.threshold, n_resamples=cfg.bootstrap, seed=cfg.seed)
    record.update(baseline_c=[m.c for m in fitted])
    external = _score_external(params, paths, fitted)
    if external is not None:
        record.update(metrics.external_record(external, classes, threshold=cfg.threshold,
                                              n_resamples=cfg.bootstrap, seed=cfg.seed))
    metrics.write_evaluation(predictions, record, metrics_path=paths.metrics, predictions_path=paths.predictions,
                             plots_dir=paths.plots)
    if paths.provenance is not None:
        jsonfile.write(paths.provenance, {"model": "baseline", "variant": "logistic_regression", "mlflow_run_id": None,
                                          "model_sha256": None, "calibration": [m.calibration.record() for m in fitted],
                                          **provenance().record()})
    return record, fitted


def _score_external(params: Params, paths: BaselinePaths, fitted: Sequence[FittedBaseline]) -> pd.DataFrame | None:
    """The fold ensemble (mean calibrated probability of the fold models) on the external cohort; None without one."""
    if paths.external is None or not external_cohort.is_enabled(paths.external):
        if paths.external_predictions is not None:  # a DVC output: present, with no row
            predictions_contract.write_empty(paths.external_predictions, params.data.classes)
        return None
    rows = external_cohort.accepted_scans(paths.external)
    task = params.data.task
    items = [ImageItem(Path(paths.external) / r.roi, task.index(r.label), r.source, r.patient_id)
             for r in rows.itertuples(index=False)]
    x = feature_matrix(items)
    prob = np.mean([m.predict(x) for m in fitted], axis=0)
    frame = metrics.predictions_frame([it.source for it in items], [it.patient_id for it in items],
                                      np.array([it.label for it in items], dtype=int), prob,
                                      classes=params.data.classes, threshold=params.evaluate.threshold)
    if paths.external_predictions is not None:
        predictions_contract.write(paths.external_predictions, frame)
    return frame


def log_baseline(params: Params, paths: BaselinePaths, record: dict[str, object],
                 fitted: Sequence[FittedBaseline]) -> str:
    """Log the baseline to MLflow like a CNN: a parent run with the pooled metrics (``test_*``) and the output files,
    and one nested run per fold with its chosen C, validation log-losses and fold metrics. Returns the parent id."""
    from spinedxa import tracking

    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    prov = provenance()
    tags = {"git_commit": prov.commit, "git_dirty": "unknown" if prov.dirty is None else str(prov.dirty).lower(), "dvc_stage": "baseline"}
    base_params = {"model": "logistic_regression", "features": ",".join(FEATURE_NAMES),
                   "c_grid": ",".join(map(str, C_GRID)), "class_weight": "balanced", "seed": params.evaluate.seed}
    numbers = {f"test_{k}": float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    with tracking.training_run(experiment, "baseline", params=base_params, tags=tags) as parent:
        for fit in fitted:
            fold_metrics = {f"test_{k}": float(v) for k, v in (fit.test_metrics or {}).items() if np.isfinite(v)}
            losses = {f"val_log_loss_c{c:g}": v for c, v in (fit.val_log_loss or {}).items()}
            with tracking.training_run(experiment, f"baseline/fold{fit.fold}",
                                       params={**base_params, "fold": fit.fold, "c": fit.c},
                                       tags={**tags, "fold": str(fit.fold)}, parent_run_id=parent):
                tracking.log_epoch({**fold_metrics, **losses}, 0)
    artifacts = [paths.metrics, paths.predictions, *sorted(Path(paths.plots).glob("*.csv"))]
    artifacts += [p for p in (paths.external_predictions,) if p is not None and Path(p).is_file()]
    tracking.log_metrics_to_run(parent, numbers, artifacts=artifacts)
    # The provenance file names its MLflow run, as every CNN's does (the audit follows it).
    if paths.provenance is not None:
        jsonfile.write(paths.provenance, {**jsonfile.read(paths.provenance), "mlflow_run_id": parent})
    return parent
