"""A trivial, non-CNN baseline: logistic regression on ROI intensity and texture statistics.

If the CNNs cannot beat this, they have learnt nothing beyond "how bright is the spine". Lower bone mineral density
shows in a DXA image as lower intensity of the vertebrae and a coarser, lower-contrast trabecular texture, so the
features are:

* intensity of the region of interest (ROI): the central vertical band of the image, where the lumbar vertebrae lie
  on an AP spine scan (columns 30-70 %, rows 5-95 %; ingest keeps the scan's aspect ratio, so the band is the same
  part of every scan) - mean, standard deviation, 10th/50th/90th percentiles, and the ROI mean relative to the whole
  image (bone against soft tissue, insensitive to the overall exposure);
* grey-level co-occurrence texture of the ROI (Haralick et al. 1973, via ``skimage.feature.graycomatrix``):
  contrast, homogeneity, energy and correlation, averaged over distances 1 and 2 px and four directions;
* mean local standard deviation in 5 x 5 windows (fine trabecular variation).

The model is a scikit-learn pipeline (standardisation, then L2 logistic regression with balanced class weights, the
counterpart of the CNNs' inverse-frequency loss weighting). Its regularisation strength C is chosen on the
validation split by log-loss (a proper score that stays defined when a tiny validation split holds one class) and the
chosen model is refit on train + validation. It is scored on the same test split, with the same metrics, intervals
and output files as every CNN (:mod:`spinedxa.metrics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.feature import graycomatrix, graycoprops
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from spinedxa import metrics
from spinedxa.config import Params
from spinedxa.data import ImageItem, load_split, read_image

log = logging.getLogger(__name__)

#: Region of interest as fractions of the image: the central vertical band where the vertebrae lie.
ROI_COLUMNS = (0.30, 0.70)
ROI_ROWS = (0.05, 0.95)
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


def roi(img: np.ndarray) -> np.ndarray:
    """The central vertical band of ``img`` (``H x W`` in [0, 1]) where the vertebrae lie.

    Raises:
        ValueError: the band would be smaller than :data:`MIN_ROI_SIDE` pixels.
    """
    h, w = img.shape
    r0, r1 = int(round(ROI_ROWS[0] * h)), int(round(ROI_ROWS[1] * h))
    c0, c1 = int(round(ROI_COLUMNS[0] * w)), int(round(ROI_COLUMNS[1] * w))
    if min(r1 - r0, c1 - c0) < MIN_ROI_SIDE:
        raise ValueError(f"image of {h} x {w} px is too small for the baseline ROI (needs >= {MIN_ROI_SIDE} px)")
    return img[r0:r1, c0:c1]


def image_features(img: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one image (``H x W`` float in [0, 1])."""
    band = roi(img)
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
    """The fitted pipeline, the chosen C and the validation log-loss of every candidate (None: no validation)."""

    model: Pipeline
    c: float
    val_log_loss: dict[float, float] | None


def fit_baseline(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, seed: int
) -> FittedBaseline:
    """Choose C on the validation split by log-loss, then refit on train + validation.

    Without validation images the default C = 1 is fitted on train alone.

    Raises:
        ValueError: the training split does not hold both classes.
    """
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"baseline: the training split holds only class {np.unique(y_train).tolist()}; need both")
    if len(y_val) == 0:
        log.warning("baseline: no validation images; fitting C = 1.0 on the training split alone")
        return FittedBaseline(_pipeline(seed).fit(x_train, y_train), 1.0, None)
    x = np.vstack([x_train, x_val])
    y = np.concatenate([y_train, y_val])
    # PredefinedSplit: -1 = always in training, 0 = the single validation fold. refit=True refits on x, y.
    folds = PredefinedSplit(np.r_[np.full(len(y_train), -1), np.zeros(len(y_val), dtype=int)])
    search = GridSearchCV(
        _pipeline(seed),
        {"logisticregression__C": list(C_GRID)},
        scoring="neg_log_loss",
        cv=folds,
        refit=True,
    )
    search.fit(x, y)
    losses = {float(c): float(-s) for c, s in zip(C_GRID, search.cv_results_["mean_test_score"])}
    return FittedBaseline(search.best_estimator_, float(search.best_params_["logisticregression__C"]), losses)


def run_baseline(
    params: Params,
    *,
    splits_csv: str | Path,
    images_dir: str | Path,
    metrics_path: str | Path,
    predictions_path: str | Path,
    plots_dir: str | Path,
) -> dict[str, object]:
    """Fit the baseline, score it on the test split and write metrics, predictions and plot tables.

    Returns:
        The metrics record written to ``metrics_path``.

    Raises:
        ValueError: the test split is empty or holds a single class, or the training split holds a single class.
    """
    classes = params.data.classes
    items = {s: load_split(splits_csv, images_dir, s, classes) for s in ("train", "val", "test")}
    test = items["test"]
    labels = {s: np.array([it.label for it in its], dtype=int) for s, its in items.items()}
    if len(test) == 0 or len(np.unique(labels["test"])) < 2:
        raise ValueError(
            f"{splits_csv}: the test split must hold both classes {list(classes)}, "
            f"found {len(test)} image(s) of class(es) {sorted(set(labels['test'].tolist()))}"
        )
    fitted = fit_baseline(
        feature_matrix(items["train"]), labels["train"], feature_matrix(items["val"]), labels["val"],
        seed=params.evaluate.seed,
    )
    prob = fitted.model.predict_proba(feature_matrix(test))[:, 1]
    cfg = params.evaluate
    patient_ids = [it.patient_id for it in test]
    record: dict[str, object] = metrics.summarize(
        labels["test"], prob, patient_ids, threshold=cfg.threshold, n_resamples=cfg.bootstrap, seed=cfg.seed
    )
    record.update(model="baseline", mlflow_run_id=None, model_sha256=None, baseline_c=fitted.c)
    predictions = metrics.predictions_frame(
        [it.source for it in test], patient_ids, labels["test"], prob, classes=classes, threshold=cfg.threshold
    )
    metrics.write_evaluation(
        predictions, record, metrics_path=metrics_path, predictions_path=predictions_path, plots_dir=plots_dir
    )
    return record
