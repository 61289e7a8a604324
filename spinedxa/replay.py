"""The paper's likely protocol, replayed on our cohort as a labelled LEAKY ablation (never part of the comparison).

Naeem et al. 2025 report figures that fit a test set of 210 images (TP 104, FN 5, FP 1, TN 100) = 6 x 35: augmented
copies of about 35 test scans, i.e. augmentation before the split. That is a hypothesis from arithmetic; this module
measures what such a protocol does on our cohort, so the report can show the inflation instead of asserting it:

1. expand the WHOLE accepted cohort first: ``replay.copies`` augmented copies of every scan's ROI image (the images
   the honest models see), with the training augmentation (:func:`spinedxa.augment.build_transform`), copy ``k`` of a
   scan seeded by ``(augment.seed, sha256, k)`` (:func:`spinedxa.augment.copy_seed`): byte-stable, and copy ``k`` is
   the same image the honest ``augment`` stage would write as ``_aug<k>``. Originals are not used;
2. split the copies (images, not patients) at random, stratified by label only (as MATLAB's ``splitEachLabel``, the
   toolbox whose layer count gives "21 layers"): ``replay.test_fraction`` test, then :data:`VAL_FRACTION` of the rest
   for validation, seed ``replay.seed``. Augmented siblings of one scan land on both sides: that is the point;
3. train cnn21 with its own recipe (``train.cnn21``, ``train.*``, ``augment.online``) for ``replay.epochs`` epochs
   through the package's loop (:func:`spinedxa.loop.fit`), the validation images choosing the kept epoch;
4. score the test images with the honest protocol's metrics and patient bootstrap (:func:`spinedxa.metrics.summarize`),
   and also with the image-level bootstrap that treats copies as independent (what the paper's figures assume),
   under ``image_bootstrap_*`` keys.

Everything it writes says *leaky* (file names, keys, the MLflow run ``replay_leaky_ablation`` tagged
``leaky_ablation=true``); its metrics are DVC ``outs``, not ``metrics``, so ``dvc metrics diff`` never mixes them
with the honest models'.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from spinedxa import metrics, tracking
from spinedxa.augment import augment_image, build_transform, copy_seed
from spinedxa.config import AugmentConfig, ModelTrainConfig, Params
from spinedxa.contracts import augmented as augmented_contract, jsonfile, manifest as manifest_contract, png16
from spinedxa.contracts import predictions as predictions_contract, splits as splits_contract
from spinedxa.data import ImageItem, input_shape, part_items, stack_images
from spinedxa.files import atomic_dir
from spinedxa.loop import FitPlan, Session, fit
from spinedxa.models import get_spec, predict_proba, variant
from spinedxa.provenance import dvc_digests, provenance
from spinedxa.runtime import Runtime
from spinedxa.train import prepare

log = logging.getLogger(__name__)

#: The network the paper proposes, the one the replay trains.
MODEL = "cnn21"
#: MLflow run name and tag of the ablation.
RUN_NAME = "replay_leaky_ablation"
LEAKY_TAG = "leaky_ablation"
PROTOCOL = "leaky_replay"
#: Files inside the reports directory (reports/replay), named so that nobody mistakes them for honest results.
METRICS_FILE = "leaky_replay_metrics.json"
PREDICTIONS_FILE = "leaky_replay_predictions.csv"
SPLIT_FILE = "leaky_split.csv"
#: A copy's ``source``: its parent scan's source + ``#copy<k>``.
COPY_SUFFIX = "#copy"
#: Share of the training images held out (at random, the same leaky way) to choose the kept epoch: the honest
#: protocol's ``split.val`` default (0.15 of each fold's training patients), so both keep epochs the same way.
VAL_FRACTION = 0.15
#: Prefix of the replay's test metrics in MLflow (the honest models' are ``test_*``).
MLFLOW_PREFIX = "leaky_test_"
#: Prefix of the image-level bootstrap intervals in the metrics record.
IMAGE_BOOTSTRAP = "image_bootstrap_"
NOTE = ("LEAKY ABLATION, not a result: every scan was augmented before an image-level random split, so copies of "
        "one scan (and one patient) are in training and test. It measures how much this protocol can inflate the "
        "metrics on this cohort; never compare it with the honest out-of-fold models as a model result.")


@dataclass(frozen=True)
class ReplayPaths:
    """The stage's inputs and outputs, as dvc.yaml passes them.

    Attributes:
        images: the ingest directory (``data/ingested``: ``manifest.csv`` and the ROI images it names).
        out: the augmented copies (``data/replay``: ``images/<sha16>_copy<k>.png`` and ``index.csv``).
        reports: ``reports/replay`` (:data:`METRICS_FILE`, :data:`PREDICTIONS_FILE`, :data:`SPLIT_FILE`).
    """

    images: Path
    out: Path
    reports: Path


# ------------------------------------------------------------------------------------------- 1. expand, 2. split


def accepted_scans(manifest_csv: str | Path) -> pd.DataFrame:
    """The accepted rows of the manifest, sorted by source (the replay's parents).

    Raises:
        ManifestError: a required column is missing or the manifest is empty.
        ValueError: no accepted scan, or an accepted row without a sha256 or ROI image.
    """
    frame = manifest_contract.read(manifest_csv)
    accepted = frame[frame["status"] == "accepted"].sort_values("source", kind="stable").reset_index(drop=True)
    if accepted.empty:
        raise ValueError(f"{manifest_csv}: no accepted scan to replay")
    bad = accepted[(accepted["sha256"].str.len() < 16) | (accepted["roi"] == "")]
    if not bad.empty:
        raise ValueError(f"{manifest_csv}: {len(bad)} accepted row(s) without a sha256 or ROI image, e.g. "
                         f"{bad['source'].iloc[0]!r}")
    return accepted


def expand_cohort(cfg: AugmentConfig, copies: int, scans: pd.DataFrame, images_dir: str | Path,
                  out_dir: Path) -> pd.DataFrame:
    """Write ``copies`` augmented copies of every scan's ROI image into ``out_dir`` (a fresh directory).

    Copy ``k`` is seeded by :func:`~spinedxa.augment.copy_seed` ``(cfg.seed, sha256, k)``, in one thread (contrast's
    mean is a float reduction whose order follows the thread count): byte-identical for the same params and input.

    Returns:
        The index (:mod:`spinedxa.contracts.augmented`), one row per copy, sorted by parent source and ``k``.
    """
    transform = build_transform(cfg)
    (out_dir / augmented_contract.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in scans.itertuples(index=False):
            parent = torch.from_numpy(png16.read(Path(images_dir) / row.roi)).unsqueeze(0)
            for k in range(1, copies + 1):
                rel = f"{augmented_contract.IMAGES_DIR}/{row.sha256[:16]}_copy{k}.png"
                image = augment_image(parent, transform, copy_seed(cfg.seed, row.sha256, k))
                png16.write(out_dir / rel, image.squeeze(0).numpy(), atomic=False)
                records.append({"image": rel, "parent_source": row.source, "parent_sha256": row.sha256,
                                "parent_image": row.roi, "patient_id": row.patient_id, "label": row.label, "k": k})
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(records, columns=list(augmented_contract.COLUMNS))


def leaky_split(index: pd.DataFrame, test_fraction: float, seed: int, val_fraction: float = VAL_FRACTION
                ) -> pd.DataFrame:
    """Split the copies as images, not patients: the paper's likely protocol, in the splits contract.

    ``test_fraction`` of the images go to test and ``val_fraction`` of the rest to validation, at random with
    ``seed``, stratified by label only (no grouping by scan or patient). Rows: ``source`` = parent source +
    ``#copy<k>``, ``sha256`` = the parent's raw sha256, ``image`` = ``roi`` = the copy (relative to the replay's data
    directory), ``fold`` 0. Depends only on the index (sorted by source) and the params, not on patient ids.

    Raises:
        ValueError: too few images of a class to put some in every part.
    """
    ordered = index.sort_values(["parent_source", "k"], kind="stable").reset_index(drop=True)
    positions, labels = np.arange(len(ordered)), ordered["label"].to_numpy()
    try:
        rest, test = train_test_split(positions, test_size=test_fraction, random_state=seed, stratify=labels)
        train, val = train_test_split(rest, test_size=val_fraction, random_state=seed, stratify=labels[rest])
    except ValueError as exc:  # scikit-learn: a class with too few members for a stratified part
        raise ValueError(f"replay: {len(ordered)} images cannot be split {1 - test_fraction:g}/{test_fraction:g} "
                         f"and {val_fraction:g} for validation with both classes in every part ({exc})") from None
    role = np.empty(len(ordered), dtype=object)
    role[train], role[val], role[test] = "train", "val", "test"
    return pd.DataFrame({
        "source": ordered["parent_source"] + COPY_SUFFIX + ordered["k"].astype(str),
        "sha256": ordered["parent_sha256"], "patient_id": ordered["patient_id"], "label": ordered["label"],
        "image": ordered["image"], "roi": ordered["image"], "fold": 0, "split": role,
    }, columns=list(splits_contract.COLUMNS)).sort_values(["fold", "source"], kind="stable").reset_index(drop=True)


def leakage_shares(split: pd.DataFrame) -> dict[str, float | int]:
    """How leaky the split is: test images (and their scans, patients) that training also saw copies of.

    Keys: ``n_test_images``, ``n_test_scans`` (distinct parents), ``n_test_patients``, ``n_train_images``,
    ``n_val_images``, ``test_images_parent_in_train`` / ``_share`` (a copy of the test image's own scan is a training
    image), ``test_images_patient_in_train`` / ``_share`` (any image of its patient is), ``test_scans_in_train_share``.
    """
    test, train = split[split["split"] == "test"], split[split["split"] == "train"]
    parent_in = test["sha256"].isin(set(train["sha256"]))
    patient_in = test["patient_id"].isin(set(train["patient_id"]))
    scans = test.drop_duplicates("sha256")
    n = len(test)
    return {
        "n_test_images": n, "n_test_scans": int(test["sha256"].nunique()),
        "n_test_patients": int(test["patient_id"].nunique()),
        "n_train_images": len(train), "n_val_images": int((split["split"] == "val").sum()),
        "test_images_parent_in_train": int(parent_in.sum()),
        "test_images_parent_in_train_share": float(parent_in.mean()) if n else 0.0,
        "test_images_patient_in_train": int(patient_in.sum()),
        "test_images_patient_in_train_share": float(patient_in.mean()) if n else 0.0,
        "test_scans_in_train_share": float(scans["sha256"].isin(set(train["sha256"])).mean()) if n else 0.0,
    }


# ------------------------------------------------------------------------------------------- 3. train


@dataclass(frozen=True)
class Fitted:
    """A trained replay network and what its fit did."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float | None
    runtime: dict[str, Any]
    cpu_seconds: float
    wall_seconds: float


def recipe(params: Params) -> ModelTrainConfig:
    """cnn21's own recipe (``train.cnn21``) with ``replay.epochs`` epochs (one-cycle spans the replay's epochs)."""
    return dataclasses.replace(params.train.model(MODEL), epochs=params.replay.epochs)


def fit_cnn21(params: Params, train_items: list[ImageItem], val_items: list[ImageItem],
              on_epoch: Callable[[Session, dict[str, float]], None] | None = None) -> Fitted:
    """Train cnn21 on ``train_items`` with its recipe, keeping the best ``train.monitor`` epoch on ``val_items``.

    The same seeds, loader, loss, optimiser, schedule and loop as the ``train`` stage's folds (spinedxa.train), in
    one process without resuming (the epoch checkpoint goes to a temporary directory): the replay takes minutes.

    Raises:
        RuntimeError: started under torchrun (the replay runs in one process).
        ValueError: no training or validation image, or a class missing from training.
    """
    train, cfg, spec = params.train, recipe(params), get_spec(MODEL)
    rt = Runtime.setup(train.device, train.fast, train.threads)
    if rt.dist.enabled:
        raise RuntimeError("replay runs in one process; start stages/replay.py without torchrun")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    prepared = prepare(params, MODEL, cfg, (train_items, val_items), rt)  # the train stage's set-up of a fold
    model, data, loss_fn, session = prepared.model, prepared.data, prepared.loss_fn, prepared.session
    with tempfile.TemporaryDirectory(prefix="spinedxa-replay-") as tmp:
        fit(model, spec, data, loss_fn, session, rt, FitPlan(cfg.epochs, train.monitor, Path(tmp) / "last.pt",
                                                             PROTOCOL), on_epoch=on_epoch)
    if session.best_state is None:
        raise RuntimeError(f"replay: no epoch of {MODEL} was trained (replay.epochs)")
    model.load_state_dict(session.best_state)
    return Fitted(model, session.history, session.stopper.best_epoch,
                  jsonfile.finite_or_none(session.stopper.best), rt.record(),
                  time.process_time() - cpu0, time.perf_counter() - wall0)


# ------------------------------------------------------------------------------------------- 4. score


def score(y_true: np.ndarray, prob: np.ndarray, patient_ids: np.ndarray, sources: np.ndarray, *, threshold: float,
          n_resamples: int, seed: int) -> dict[str, Any]:
    """The honest protocol's metrics record (patient bootstrap) plus ``image_bootstrap_<metric>_ci_low/high``: the
    intervals an analysis that treats every copy as an independent image (the paper's figures) would report."""
    record: dict[str, Any] = metrics.summarize(y_true, prob, patient_ids, threshold=threshold,
                                               n_resamples=n_resamples, seed=seed)
    naive = metrics.summarize(y_true, prob, sources, threshold=threshold, n_resamples=n_resamples, seed=seed)
    for key in metrics.METRIC_KEYS:
        for side in ("ci_low", "ci_high"):
            record[f"{IMAGE_BOOTSTRAP}{key}_{side}"] = naive[f"{key}_{side}"]
    record["bootstrap_unit"] = "patient"
    return record


def mlflow_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite entries of the record, prefixed :data:`MLFLOW_PREFIX` (never confused with ``test_*``)."""
    return {f"{MLFLOW_PREFIX}{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


# ------------------------------------------------------------------------------------------- the stage


def _mlflow_params(params: Params) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "variant": variant(MODEL, recipe(params).batch_norm),
                           "protocol": PROTOCOL, **dataclasses.asdict(recipe(params))}
    out.update({f"replay.{k}": v for k, v in dataclasses.asdict(params.replay).items()})
    out.update({f"augment.{k}": v for k, v in dataclasses.asdict(params.augment).items()})
    out.update({f"train.{k}": getattr(params.train, k)
                for k in ("seed", "device", "fast", "threads", "class_weighting", "monitor", "patience")})
    out["val_fraction"] = VAL_FRACTION
    return out


def _base_record(params: Params) -> dict[str, Any]:
    return {"leaky_ablation": True, "protocol": PROTOCOL, "note": NOTE, "model": MODEL,
            "enabled": params.replay.enabled}


def write_disabled(params: Params, paths: ReplayPaths) -> dict[str, Any]:
    """``replay.enabled: false``: the same outputs, empty (the DAG keeps its shape), in well under a second."""
    record = _base_record(params)
    with atomic_dir(paths.out) as tmp:
        (tmp / augmented_contract.IMAGES_DIR).mkdir()
        augmented_contract.write(tmp / augmented_contract.FILE_NAME,
                                 pd.DataFrame(columns=list(augmented_contract.COLUMNS)))
    with atomic_dir(paths.reports) as tmp:
        jsonfile.write(tmp / METRICS_FILE, record)
        predictions_contract.write(tmp / PREDICTIONS_FILE, pd.DataFrame(columns=list(predictions_contract.COLUMNS)))
        splits_contract.write(tmp / SPLIT_FILE, pd.DataFrame(columns=list(splits_contract.COLUMNS)))
    log.info("replay: disabled (replay.enabled false); wrote empty outputs to %s and %s", paths.out, paths.reports)
    return record


def run_replay(params: Params, paths: ReplayPaths) -> dict[str, Any]:
    """The whole ablation: expand, split, train, score; write ``paths.out`` and ``paths.reports`` and one MLflow run.

    Returns:
        The metrics record written to ``reports/replay/leaky_replay_metrics.json``.

    Raises:
        ManifestError, FileNotFoundError, ValueError: unusable ingest output (the message names the file).
    """
    if not params.replay.enabled:
        return write_disabled(params, paths)
    cfg, classes, ev = params.replay, params.data.classes, params.evaluate
    cpu0, wall0 = time.process_time(), time.perf_counter()
    scans = accepted_scans(Path(paths.images) / manifest_contract.FILE_NAME)
    with atomic_dir(paths.out) as tmp:
        index = expand_cohort(params.augment, cfg.copies, scans, paths.images, tmp)
        augmented_contract.write(tmp / augmented_contract.FILE_NAME, index)
    split = leaky_split(index, cfg.test_fraction, cfg.seed)
    shares = leakage_shares(split)
    log.info("replay (LEAKY): %d scans x %d copies = %d images; %d train, %d val, %d test images of %d scans; "
             "%.1f %% of test images have a sibling copy in training", len(scans), cfg.copies, len(index),
             shares["n_train_images"], shares["n_val_images"], shares["n_test_images"], shares["n_test_scans"],
             100 * shares["test_images_parent_in_train_share"])
    items = {role: part_items(paths.reports / SPLIT_FILE, paths.out, 0, role, classes, table=split)
             for role in splits_contract.ROLES}

    def report(session: Session, row: dict[str, float]) -> None:
        log.info("replay %s epoch %d/%d: train_loss %.4f val_loss %.4f val_auc %.4f (%.1f s)", MODEL, row["epoch"],
                 cfg.epochs, row["train_loss"], row["val_loss"], row["val_auc"], row["seconds"])
        tracking.log_epoch({k: v for k, v in row.items() if k not in ("epoch", "fold")}, int(row["epoch"]))

    prov = provenance()
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    tags = {LEAKY_TAG: "true", "protocol": PROTOCOL, "dvc_stage": "replay", **prov.record()}
    with tracking.training_run(experiment, RUN_NAME, params=_mlflow_params(params),
                               tags={k: str(v) for k, v in tags.items()}) as run_id:
        for path, digest in dvc_digests([Path(paths.images)]).items():
            tracking.log_dataset(Path(path).name, digest, path, context="training")
        fitted = fit_cnn21(params, items["train"], items["val"], on_epoch=report)
        tracking.log_tags({k: str(v) for k, v in fitted.runtime.items()})
        test = items["test"]
        shape = input_shape(recipe(params).image_size)
        prob = predict_proba(fitted.model, MODEL, stack_images(test, shape), device=fitted.runtime["device"])
        y_true = np.array([it.label for it in test], dtype=int)
        sources = np.array([it.source for it in test])
        patients = np.array([it.patient_id for it in test])
        record = _base_record(params)
        record.update(score(y_true, prob, patients, sources, threshold=ev.threshold, n_resamples=ev.bootstrap,
                            seed=ev.seed))
        record.update(shares)
        record.update(
            variant=variant(MODEL, recipe(params).batch_norm), n_scans=len(scans), n_images=len(index),
            copies=cfg.copies, test_fraction=cfg.test_fraction, val_fraction=VAL_FRACTION, split_seed=cfg.seed,
            epochs=cfg.epochs, epochs_run=len(fitted.history), best_epoch=fitted.best_epoch,
            monitor=params.train.monitor, best_value=fitted.best_value, train_cpu_seconds=round(fitted.cpu_seconds, 1),
            train_wall_seconds=round(fitted.wall_seconds, 1), mlflow_run_id=run_id, **prov.record(),
            **fitted.runtime,
        )
        record.update(cpu_seconds=round(time.process_time() - cpu0, 1),
                      wall_seconds=round(time.perf_counter() - wall0, 1))
        predictions = metrics.predictions_frame(sources, patients, y_true, prob, classes=classes,
                                                threshold=ev.threshold)
        with atomic_dir(paths.reports) as tmp:
            jsonfile.write(tmp / METRICS_FILE, record)
            predictions_contract.write(tmp / PREDICTIONS_FILE, predictions)
            splits_contract.write(tmp / SPLIT_FILE, split)
        tracking.log_metrics_to_run(run_id, mlflow_metrics(record),
                                    artifacts=[paths.reports / f for f in (METRICS_FILE, PREDICTIONS_FILE, SPLIT_FILE)])
    return record
