"""The paper's likely protocol replayed on our cohort against a matched control: a labelled LEAKY ablation.

Naeem et al. 2025 report figures that fit a test set of 210 images (TP 104, FN 5, FP 1, TN 100) = 6 x 35: augmented
copies of about 35 test scans, i.e. augmentation before the split. That is a hypothesis from arithmetic; this module
measures what such a protocol does on our cohort, so the report can show the inflation instead of asserting it. It
trains cnn21 twice, with everything equal except the order of "augment" and "split", and never takes part in the
comparison of the honest models.

**The copies.** The WHOLE accepted cohort is expanded first: ``replay.copies`` augmented copies of every scan's ROI
image (the images the honest models see), with the training augmentation (:func:`spinedxa.augment.build_transform`),
copy ``k`` of a scan seeded by ``(augment.seed, sha256, k)`` (:func:`spinedxa.augment.copy_seed`): byte-stable, and
copy ``k`` is the image the honest ``augment`` stage would write as ``_aug<k>``. A copy is a pure function of its scan,
so the copies a run uses are the same files whether they are made before or after that run's split: both runs read
them from one expansion. Originals are never trained on.

**The two runs** (:data:`RUNS`):

- **leaky** (the paper's likely protocol, :func:`leaky_split`): augment, THEN split. The copies are split as images,
  at random, stratified by label only (as MATLAB's ``splitEachLabel``, the toolbox whose layer count gives "21
  layers"): ``replay.test_fraction`` test, then :data:`VAL_FRACTION` of the rest for validation, seed
  ``replay.seed``. Augmented siblings of one scan land on both sides: that is the point.
- **control** (:func:`control_split`): split, THEN augment. The scans are split by patient first, with the honest
  pipeline's splitter (:func:`spinedxa.split.assign`, holdout): ``replay.test_fraction`` of the patients test, then
  :data:`VAL_FRACTION` of the rest validation, patient-grouped and stratified, seed ``replay.seed``; then the control
  trains on the copies of its training scans and validates on the copies of its validation scans only. No copy of a
  held-out scan, and no image of a held-out patient, is ever read by it.

**Everything else is equal**, by construction: the network and recipe (``train.cnn21`` with ``replay.epochs`` epochs
for both, so one-cycle spans the same epochs: :func:`recipe`), the seeds (so the same initial weights), the loop, the
online augmentation, the kept-epoch rule (``train.monitor`` on each run's own validation part), the number of copies
per scan, the shares held out for test and validation (of images for leaky, of patients for control: about the same
share of images, so both train on about ``(1 - test) (1 - val)`` of all copies), test-time augmentation
(``train.tta``) at every prediction, and the task's calibration (Platt for two classes, temperature for more) fitted
on each run's own validation part (:func:`spinedxa.train.calibrate`, the train stage's). Both records hold these
settings as the runs used them (:data:`SHARED_SETTINGS`), and the tests check that they agree.

**Scoring.**

1. The leaky run on its own random test set of copies: the paper-like figure, with the honest protocol's metrics and
   patient bootstrap (:func:`score`), and the image-level bootstrap that treats copies as independent (what the
   paper's figures assume), under ``image_bootstrap_*`` keys.
2. The matched comparison (:func:`compare_matched`): both runs score the SAME scans, the control's held-out
   patients' original (un-augmented) scans. The leaky run trained on copies of nearly all of them (the leak: its
   record gives the share); the control saw no image of these patients. Leaky minus control on these scans, with a
   paired patient bootstrap (both runs on the same resamples; ROC-AUC through
   :func:`spinedxa.metrics.paired_bootstrap_auc`), is the inflation attributable to the order of augment and split.

Metrics follow the task's classes (``data.classes``): :func:`spinedxa.metrics.metric_keys` decides which, and every
probability is the ``N x K`` class matrix.

**Independent of the de-identification key.** The bootstraps number the patients in order of appearance
(:func:`spinedxa.metrics.patient_bootstrap_weights`), and the pseudonyms are keyed HMACs that differ between clones:
the matched scans are ordered by their patient's smallest raw sha256, then by source (:func:`matched_order`), the
leaky test copies by source, and the control's splitter orders patients by their smallest raw sha256.

**Cost.** Two trainings of about 700 images for ``replay.epochs`` epochs each: side by side in two one-thread
processes (:func:`train_runs`) when ``runtime.train_processes`` >= 2, as the train stage's folds, else one after the
other. Each process seeds and trains exactly as one process would, so the records do not depend on how many
(tests/test_replay.py; measured on the project's 2-core CPU: see README "Replay").

Everything it writes says *leaky* or *control* (file names in :mod:`spinedxa.contracts.replay`, keys, the MLflow run
``replay_leaky_ablation`` tagged ``leaky_ablation=true``); its metrics are DVC ``outs``, not ``metrics``, so
``dvc metrics diff`` never mixes them with the honest models'.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from spinedxa import metrics, tracking
from spinedxa.augment import augment_image, build_transform, copy_seed
from spinedxa.calibration import Calibration
from spinedxa.config import AugmentConfig, ModelTrainConfig, Params, SplitConfig
from spinedxa.contracts import augmented as augmented_contract, jsonfile, manifest as manifest_contract, png16
from spinedxa.contracts import predictions as predictions_contract, replay as replay_contract
from spinedxa.contracts import splits as splits_contract
from spinedxa.data import ImageItem, model_input_shape, part_items, stack_images
from spinedxa.files import atomic_dir
from spinedxa.loop import FitPlan, Session, fit
from spinedxa.models import get_spec, predict_proba, variant
from spinedxa.provenance import dvc_digests, provenance
from spinedxa.runtime import Runtime, training_pool
from spinedxa.split import SplitError, assign
from spinedxa.train import calibrate, prepare

log = logging.getLogger(__name__)

#: The network the paper proposes, the one the replay trains.
MODEL = "cnn21"
#: MLflow run name and tag of the ablation.
RUN_NAME = "replay_leaky_ablation"
LEAKY_TAG = "leaky_ablation"
PROTOCOL = "leaky_replay"
CONTROL_PROTOCOL = "matched_control"
#: The two runs, in training order (their per-epoch MLflow metrics are prefixed ``<run>_``).
RUNS = ("leaky", "control")
#: A copy's ``source``: its parent scan's source + ``#copy<k>``.
COPY_SUFFIX = "#copy"
#: Share of the training images (leaky) or patients (control) held out to choose the kept epoch and fit the
#: calibration: the honest protocol's ``split.val`` default (0.15 of each fold's training patients).
VAL_FRACTION = 0.15
#: Prefix of the leaky run's test metrics in MLflow (the honest models' are ``test_*``); the matched comparison's
#: are ``leaky_matched_*``, ``control_matched_*`` and ``inflation_*``.
MLFLOW_PREFIX = "leaky_test_"
#: Prefix of the image-level bootstrap intervals in the metrics record.
IMAGE_BOOTSTRAP = "image_bootstrap_"
#: How each run's calibration is fitted (recorded in both records).
CALIBRATION_FIT = "the task's calibration on the run's own validation part (spinedxa.train.calibrate)"
#: Settings both records hold, as the runs used them; they must be equal (the only difference is the split order).
SHARED_SETTINGS = ("model", "variant", "recipe", "input_shape", "epochs", "tta", "calibration_fit", "copies",
                   "test_fraction",
                   "val_fraction", "split_seed", "train_seed", "monitor", "threshold", "bootstrap_resamples",
                   "bootstrap_seed")
NOTE = ("LEAKY ABLATION, not a result: every scan was augmented before an image-level random split, so copies of "
        "one scan (and one patient) are in training and test. It measures how much this protocol can inflate the "
        "metrics on this cohort; never compare it with the honest out-of-fold models as a model result.")
CONTROL_NOTE = ("MATCHED CONTROL of the leaky ablation, not a model result: the leaky run's training with one "
                "change, the scans split by patient before the copies were made. It scores the held-out patients' "
                "original scans, which the leaky run scores too; leaky minus control on them (the inflation) is its "
                "only use.")


@dataclass(frozen=True)
class ReplayPaths:
    """The stage's inputs and outputs, as dvc.yaml passes them.

    Attributes:
        images: the ingest directory (``data/ingested``: ``manifest.csv`` and the ROI images it names).
        out: the augmented copies (``data/replay``: ``images/<sha16>_copy<k>.png`` and ``index.csv``).
        reports: ``reports/replay`` (the files of :mod:`spinedxa.contracts.replay`).
    """

    images: Path
    out: Path
    reports: Path


@dataclass(frozen=True)
class ReplayRecords:
    """The two metrics records the stage writes."""

    leaky: dict[str, Any]
    control: dict[str, Any]


# ------------------------------------------------------------------------------------------- the copies, the splits


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


def _copy_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The copies of ``index`` as split rows without a role: ``source`` = parent source + ``#copy<k>``, ``sha256`` =
    the parent's raw sha256 (the audit sees one file on every side), ``image`` = ``roi`` = the copy (relative to the
    replay's data directory), ``fold`` 0; in the order of ``index``."""
    return pd.DataFrame({
        "source": index["parent_source"] + COPY_SUFFIX + index["k"].astype(str),
        "sha256": index["parent_sha256"], "patient_id": index["patient_id"], "label": index["label"],
        "image": index["image"], "roi": index["image"], "fold": 0,
    }).reset_index(drop=True)


def leaky_split(index: pd.DataFrame, test_fraction: float, seed: int, val_fraction: float = VAL_FRACTION
                ) -> pd.DataFrame:
    """Augment, THEN split: the copies split as images, not patients (the paper's likely protocol).

    ``test_fraction`` of the images go to test and ``val_fraction`` of the rest to validation, at random with
    ``seed``, stratified by label only (no grouping by scan or patient). Rows in the splits contract
    (:func:`_copy_rows`). Depends only on the index (sorted by source) and the params, not on patient ids.

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
    table = _copy_rows(ordered).assign(split=role)
    return table[list(splits_contract.COLUMNS)].sort_values(["fold", "source"], kind="stable").reset_index(drop=True)


def control_split(scans: pd.DataFrame, index: pd.DataFrame, test_fraction: float, seed: int,
                  classes: Sequence[str], val_fraction: float = VAL_FRACTION) -> pd.DataFrame:
    """Split, THEN augment: the matched control's split, one row per image the control reads.

    The scans are split by patient first with the honest pipeline's splitter (:func:`spinedxa.split.assign`,
    holdout): ``test_fraction`` of the patients test, then ``val_fraction`` of the rest validation, patient-grouped,
    stratified by the patient's label, seed ``seed``, patients ordered by their smallest raw sha256 (independent of the
    pseudonyms). Then only the copies (``index``) of the training and validation scans are used: rows as in
    :func:`leaky_split` for those, and the held-out scans themselves as ``test`` rows (their manifest ``image`` and
    ``roi``, relative to ``data/ingested``). No copy of a held-out scan is listed, so the control never reads one.

    Raises:
        spinedxa.split.SplitError: too few patients of a class for the shares (the message names them).
    """
    cfg = SplitConfig(protocol="holdout", seed=seed, folds=1, val=val_fraction, test=test_fraction)
    try:
        scans_split = assign(scans[list(splits_contract.COLUMNS[:-2])], cfg, classes)
    except SplitError as exc:
        raise SplitError(f"replay (matched control): the patients cannot be split {1 - test_fraction:g}/"
                         f"{test_fraction:g} (replay.test_fraction) and {val_fraction:g} for validation: "
                         f"{exc}") from None
    role = index["parent_sha256"].map(dict(zip(scans_split["sha256"], scans_split["split"])))
    used = index[role.isin(["train", "val"])]
    copies = _copy_rows(used).assign(split=role[used.index].to_numpy())
    held_out = scans_split[scans_split["split"] == "test"]
    table = pd.concat([copies[list(splits_contract.COLUMNS)], held_out[list(splits_contract.COLUMNS)]],
                      ignore_index=True)
    return table.sort_values(["fold", "source"], kind="stable").reset_index(drop=True)


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


def matched_permutation(frame: pd.DataFrame) -> np.ndarray:
    """Positions that sort ``frame`` (columns ``sha256``, ``patient_id``, ``source``) by its patient's smallest raw
    sha256, then by source: the order of the matched scans for every bootstrap, which numbers patients in order of
    appearance. Neither key depends on the pseudonyms."""
    first = frame.groupby("patient_id")["sha256"].transform("min").to_numpy()
    return np.lexsort((frame["source"].to_numpy(), first))


def matched_order(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` in the order of :func:`matched_permutation`, with a fresh index."""
    return frame.iloc[matched_permutation(frame)].reset_index(drop=True)


def matched_shares(matched: pd.DataFrame, split: pd.DataFrame) -> dict[str, float]:
    """Shares of the matched scans (and their patients) that have a copy (an image) in ``split``'s training part."""
    train = split[split["split"] == "train"]
    return {"scans_in_train_share": float(matched["sha256"].isin(set(train["sha256"])).mean()),
            "patients_in_train_share": float(matched["patient_id"].isin(set(train["patient_id"])).mean())}


# ------------------------------------------------------------------------------------------- train


@dataclass(frozen=True)
class Fitted:
    """A trained replay network and what its fit did."""

    model: torch.nn.Module
    cfg: ModelTrainConfig
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
    fit(model, spec, data, loss_fn, session, rt, FitPlan(cfg.epochs, train.monitor, None, PROTOCOL), on_epoch=on_epoch)
    if session.best_state is None:
        raise RuntimeError(f"replay: no epoch of {MODEL} was trained (replay.epochs)")
    model.load_state_dict(session.best_state)
    return Fitted(model, cfg, session.history, session.stopper.best_epoch,
                  jsonfile.finite_or_none(session.stopper.best), rt.record(),
                  time.process_time() - cpu0, time.perf_counter() - wall0)


@dataclass(frozen=True)
class Run:
    """One of the two runs: its fitted network, its calibration, and the input shape and test-time augmentation it
    predicts with."""

    name: str
    fitted: Fitted
    calibration: Calibration
    tta: str
    shape: tuple[int, int]

    def predict(self, items: Sequence[ImageItem]) -> np.ndarray:
        """Calibrated class probabilities (``N x K``) of ``items``, with the run's test-time augmentation."""
        images = stack_images(items, self.shape)
        prob = predict_proba(self.fitted.model, MODEL, images, device=self.fitted.runtime["device"], tta=self.tta)
        return self.calibration.apply(prob)

    def settings(self, params: Params) -> dict[str, Any]:
        """What the run used, for its record (the :data:`SHARED_SETTINGS` must agree between the two runs)."""
        cfg, ev = self.fitted.cfg, params.evaluate
        return {
            "model": MODEL, "variant": variant(MODEL, cfg.batch_norm), "recipe": dataclasses.asdict(cfg),
            "input_shape": list(self.shape), "epochs": cfg.epochs, "epochs_run": len(self.fitted.history),
            "best_epoch": self.fitted.best_epoch, "monitor": params.train.monitor,
            "best_value": self.fitted.best_value, "tta": self.tta,
            "calibration_fit": CALIBRATION_FIT, "calibration": self.calibration.record(),
            "copies": params.replay.copies, "test_fraction": params.replay.test_fraction,
            "val_fraction": VAL_FRACTION, "split_seed": params.replay.seed, "train_seed": params.train.seed,
            "threshold": ev.threshold, "bootstrap_resamples": ev.bootstrap, "bootstrap_seed": ev.seed,
            "train_cpu_seconds": round(self.fitted.cpu_seconds, 1),
            "train_wall_seconds": round(self.fitted.wall_seconds, 1), **self.fitted.runtime,
        }


def train_run(params: Params, name: str, items: Mapping[str, list[ImageItem]],
              on_epoch: Callable[[Session, dict[str, float]], None] | None = None) -> Run:
    """Fit cnn21 on ``items["train"]`` (:func:`fit_cnn21`), then its calibration on ``items["val"]``."""
    fitted = fit_cnn21(params, items["train"], items["val"], on_epoch=on_epoch)
    fitted_calibration = calibrate(params, MODEL, fitted.model, items["val"], device=fitted.runtime["device"])
    return Run(name, fitted, fitted_calibration, params.train.tta,
               model_input_shape(fitted.cfg.image_size, params.ingest.roi))


def _log_epoch_line(name: str, epochs: int, row: Mapping[str, float]) -> None:
    log.info("replay %s %s epoch %d/%d: train_loss %.4f val_loss %.4f val_auc %.4f (%.1f s)", name, MODEL,
             row["epoch"], epochs, row["train_loss"], row["val_loss"], row["val_auc"], row["seconds"])


def _log_epoch_mlflow(name: str, row: Mapping[str, float]) -> None:
    tracking.log_epoch({f"{name}_{k}": v for k, v in row.items() if k not in ("epoch", "fold")}, int(row["epoch"]))


def _train_run_job(params: Params, name: str, items: Mapping[str, list[ImageItem]]) -> Run:
    """One run in a worker process: its progress goes to the log; the parent logs its epochs to MLflow."""
    return train_run(params, name, items,
                     on_epoch=lambda _session, row: _log_epoch_line(name, params.replay.epochs, row))


def train_runs(params: Params, items: Mapping[str, Mapping[str, list[ImageItem]]], processes: int) -> dict[str, Run]:
    """Both runs (:data:`RUNS`), side by side in ``min(processes, 2)`` processes, else one after the other;
    every epoch is logged to the active MLflow run under the run's prefix either way.

    Each run seeds and sets up its process as :func:`fit_cnn21` does, so the fitted networks are the same for any
    ``processes``. Afterwards this process is set up like a run's (threads, fast path) for the predictions.
    """
    runs: dict[str, Run] = {}
    if min(processes, len(RUNS)) <= 1:
        for name in RUNS:
            def report(_session: Session, row: dict[str, float], name: str = name) -> None:
                _log_epoch_line(name, params.replay.epochs, row)
                _log_epoch_mlflow(name, row)

            runs[name] = train_run(params, name, items[name], on_epoch=report)
        return runs
    with training_pool(len(RUNS), __name__) as pool:
        futures = {name: pool.submit(_train_run_job, params, name, items[name]) for name in RUNS}
        for name in RUNS:
            runs[name] = futures[name].result()
    for name in RUNS:
        for row in runs[name].fitted.history:
            _log_epoch_mlflow(name, row)
    Runtime.setup(params.train.device, params.train.fast, params.train.threads)  # predict as the runs' processes do
    return runs


# ------------------------------------------------------------------------------------------- score


def score(y_true: np.ndarray, prob: np.ndarray, patient_ids: np.ndarray, sources: np.ndarray, *,
          classes: Sequence[str], threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    """The honest protocol's metrics record (patient bootstrap) plus ``image_bootstrap_<metric>_ci_low/high``: the
    intervals an analysis that treats every copy as an independent image (the paper's figures) would report."""
    record: dict[str, Any] = metrics.summarize(y_true, prob, patient_ids, threshold=threshold,
                                               n_resamples=n_resamples, seed=seed, classes=classes)
    naive = metrics.summarize(y_true, prob, sources, threshold=threshold, n_resamples=n_resamples, seed=seed,
                              classes=classes)
    for key in metrics.metric_keys(classes):
        for side in ("ci_low", "ci_high"):
            record[f"{IMAGE_BOOTSTRAP}{key}_{side}"] = naive[f"{key}_{side}"]
    record["bootstrap_unit"] = "patient"
    return record


def paired_inflation(y_true: np.ndarray, prob_leaky: np.ndarray, prob_control: np.ndarray,
                     patient_ids: np.ndarray, *, classes: Sequence[str], threshold: float, n_resamples: int,
                     seed: int) -> dict[str, Any]:
    """Leaky minus control on the same scans, for every metric of the task (:func:`spinedxa.metrics.metric_keys`).

    A paired patient bootstrap: both runs are scored on the same resamples of patients
    (:func:`spinedxa.metrics.patient_bootstrap_weights`, numbering patients in order of appearance: pass the rows in
    :func:`matched_order`). ROC-AUC through :func:`spinedxa.metrics.paired_bootstrap_auc` (which adds ``roc_auc_se``
    and ``roc_auc_p_value``); the other metrics from the same weights. Keys ``<metric>``, ``<metric>_ci_low``,
    ``_ci_high``, ``_ci_skipped``; undefined values are None.
    """
    probs = (prob_leaky, prob_control)
    point_l, point_c = (metrics.point_metrics(y_true, p, threshold, classes) for p in probs)
    weights = metrics.patient_bootstrap_weights(patient_ids, n_resamples, seed)
    draws_l, draws_c = (metrics.weighted_metrics(y_true, p, weights, threshold, classes) for p in probs)
    out: dict[str, Any] = {}
    for key in metrics.metric_keys(classes):
        if key == "roc_auc":
            auc = metrics.paired_bootstrap_auc(y_true, prob_leaky, prob_control, patient_ids,
                                               n_resamples=n_resamples, seed=seed)
            difference, interval = auc.difference, auc.interval
            out.update(roc_auc_se=auc.se, roc_auc_p_value=auc.p_value)
        else:
            difference, interval = point_l[key] - point_c[key], metrics.percentile_interval(draws_l[key] - draws_c[key])
        out.update({key: jsonfile.finite_or_none(difference), f"{key}_ci_low": interval.low,
                    f"{key}_ci_high": interval.high, f"{key}_ci_skipped": interval.n_skipped})
    return out


def compare_matched(matched: pd.DataFrame, prob: Mapping[str, np.ndarray], *, classes: Sequence[str],
                    threshold: float, n_resamples: int, seed: int
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Both runs on the same scans: each run's metrics (patient bootstrap) and the paired inflation.

    Args:
        matched: one row per matched scan: ``source``, ``sha256``, ``patient_id``, ``y_true`` (class index), in any
            order (put in :func:`matched_order` first).
        prob: per run of :data:`RUNS`, its class probabilities (``N x K``), row ``i`` for row ``i`` of ``matched``.

    Returns:
        ``(leaky, control, inflation)``: :func:`spinedxa.metrics.summarize` of each run, and
        :func:`paired_inflation` with ``n_scans``, ``n_patients`` and the bootstrap's settings.
    """
    order = matched_permutation(matched)
    rows = matched.iloc[order].reset_index(drop=True)
    y, patients = rows["y_true"].to_numpy(dtype=int), rows["patient_id"].to_numpy()
    ordered = {run: np.asarray(prob[run], dtype=float)[order] for run in RUNS}
    summaries = [metrics.summarize(y, ordered[run], patients, threshold=threshold, n_resamples=n_resamples,
                                   seed=seed, classes=classes) for run in RUNS]
    inflation = paired_inflation(y, ordered["leaky"], ordered["control"], patients, classes=classes,
                                 threshold=threshold, n_resamples=n_resamples, seed=seed)
    inflation.update(n_scans=int(len(rows)), n_patients=int(rows["patient_id"].nunique()), bootstrap_unit="patient",
                     bootstrap_order="patients by the smallest raw sha256 of their scans",
                     bootstrap_resamples=int(n_resamples), bootstrap_seed=int(seed), threshold=float(threshold))
    return summaries[0], summaries[1], inflation


def mlflow_metrics(record: Mapping[str, Any], prefix: str = MLFLOW_PREFIX) -> dict[str, float]:
    """Numeric, finite top-level entries of the record, prefixed (never confused with the honest ``test_*``)."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


# ------------------------------------------------------------------------------------------- the stage


def _mlflow_params(params: Params) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "variant": variant(MODEL, recipe(params).batch_norm),
                           "protocol": PROTOCOL, "control": CONTROL_PROTOCOL, **dataclasses.asdict(recipe(params))}
    out.update({f"replay.{k}": v for k, v in dataclasses.asdict(params.replay).items()})
    out.update({f"augment.{k}": v for k, v in dataclasses.asdict(params.augment).items()})
    out.update({f"train.{k}": getattr(params.train, k)
                for k in ("seed", "device", "fast", "threads", "class_weighting", "monitor", "patience", "tta")})
    out.update(val_fraction=VAL_FRACTION, calibration_fit=CALIBRATION_FIT)
    return out


def _base_records(params: Params) -> ReplayRecords:
    common = {"leaky_ablation": True, "model": MODEL, "enabled": params.replay.enabled}
    return ReplayRecords({"protocol": PROTOCOL, "note": NOTE, **common},
                         {"protocol": CONTROL_PROTOCOL, "note": CONTROL_NOTE, **common})


def _write_reports(directory: Path, records: ReplayRecords, tables: Mapping[str, pd.DataFrame]) -> None:
    """Every file of :mod:`spinedxa.contracts.replay` into ``directory``, atomically as one directory."""
    c = replay_contract
    with atomic_dir(directory) as tmp:
        jsonfile.write(tmp / c.LEAKY_METRICS, records.leaky)
        jsonfile.write(tmp / c.CONTROL_METRICS, records.control)
        for name in (c.LEAKY_PREDICTIONS, c.LEAKY_MATCHED_PREDICTIONS, c.CONTROL_PREDICTIONS):
            predictions_contract.write(tmp / name, tables[name])
        for name in (c.LEAKY_SPLIT, c.CONTROL_SPLIT):
            splits_contract.write(tmp / name, tables[name])


def write_disabled(params: Params, paths: ReplayPaths) -> ReplayRecords:
    """``replay.enabled: false``: the same outputs, empty (the DAG keeps its shape), in well under a second."""
    records = _base_records(params)
    with atomic_dir(paths.out) as tmp:
        (tmp / augmented_contract.IMAGES_DIR).mkdir()
        augmented_contract.write(tmp / augmented_contract.FILE_NAME,
                                 pd.DataFrame(columns=list(augmented_contract.COLUMNS)))
    c = replay_contract
    empty_predictions = pd.DataFrame(columns=[*predictions_contract.BASE_COLUMNS,
                                              *predictions_contract.class_columns(params.data.classes)])
    empty_split = pd.DataFrame(columns=list(splits_contract.COLUMNS))
    _write_reports(paths.reports, records, {
        c.LEAKY_PREDICTIONS: empty_predictions, c.LEAKY_MATCHED_PREDICTIONS: empty_predictions,
        c.CONTROL_PREDICTIONS: empty_predictions, c.LEAKY_SPLIT: empty_split, c.CONTROL_SPLIT: empty_split})
    log.info("replay: disabled (replay.enabled false); wrote empty outputs to %s and %s", paths.out, paths.reports)
    return records


def _run_items(split: pd.DataFrame, bases: Mapping[str, Path], csv: Path, classes: Sequence[str]
               ) -> dict[str, list[ImageItem]]:
    """The images of each role of a run's split; ``bases`` gives the directory each role's paths are relative to."""
    return {role: part_items(csv, bases[role], 0, role, classes, table=split) for role in splits_contract.ROLES}


def run_replay(params: Params, paths: ReplayPaths, *, processes: int | None = None) -> ReplayRecords:
    """The whole ablation: expand, split both ways, train both runs (:func:`train_runs`, in ``processes`` processes,
    default ``runtime.train_processes``), score; write ``paths.out``, ``paths.reports`` and one MLflow run.

    Returns:
        The two records written to ``reports/replay`` (:mod:`spinedxa.contracts.replay`).

    Raises:
        ManifestError, FileNotFoundError, ValueError: unusable ingest output, or a cohort too small for the splits
            (the message names the file or the params).
    """
    if not params.replay.enabled:
        return write_disabled(params, paths)
    cfg, classes, ev, c = params.replay, params.data.classes, params.evaluate, replay_contract
    cpu0, wall0 = time.process_time(), time.perf_counter()
    scans = accepted_scans(Path(paths.images) / manifest_contract.FILE_NAME)
    with atomic_dir(paths.out) as tmp:
        index = expand_cohort(params.augment, cfg.copies, scans, paths.images, tmp)
        augmented_contract.write(tmp / augmented_contract.FILE_NAME, index)
    splits = {"leaky": leaky_split(index, cfg.test_fraction, cfg.seed),
              "control": control_split(scans, index, cfg.test_fraction, cfg.seed, classes)}
    shares = {run: leakage_shares(split) for run, split in splits.items()}
    copies_dir, ingested = Path(paths.out), Path(paths.images)
    items = {
        "leaky": _run_items(splits["leaky"], dict.fromkeys(splits_contract.ROLES, copies_dir),
                            paths.reports / c.LEAKY_SPLIT, classes),
        "control": _run_items(splits["control"], {"train": copies_dir, "val": copies_dir, "test": ingested},
                              paths.reports / c.CONTROL_SPLIT, classes),
    }
    # The matched scans: the control's held-out originals, in the key-independent order every bootstrap uses.
    matched = matched_order(splits["control"][splits["control"]["split"] == "test"])
    by_source = {it.source: it for it in items["control"]["test"]}
    matched_items = [by_source[source] for source in matched["source"]]
    log.info("replay: %d scans x %d copies = %d images. LEAKY: %d train, %d val, %d test images (%d scans), %.1f %% of "
             "test images have a sibling copy in training. CONTROL: %d train, %d val copies, %d held-out scans of %d "
             "patients, none in training", len(scans), cfg.copies, len(index), shares["leaky"]["n_train_images"],
             shares["leaky"]["n_val_images"], shares["leaky"]["n_test_images"], shares["leaky"]["n_test_scans"],
             100 * shares["leaky"]["test_images_parent_in_train_share"], shares["control"]["n_train_images"],
             shares["control"]["n_val_images"], len(matched), matched["patient_id"].nunique())

    prov = provenance()
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    tags = {LEAKY_TAG: "true", "protocol": PROTOCOL, "dvc_stage": "replay", **prov.record()}
    with tracking.training_run(experiment, RUN_NAME, params=_mlflow_params(params),
                               tags={k: str(v) for k, v in tags.items()}) as run_id:
        for path, digest in dvc_digests([Path(paths.images)]).items():
            tracking.log_dataset(Path(path).name, digest, path, context="training")
        runs = train_runs(params, items, params.runtime.train_processes if processes is None else processes)
        tracking.log_tags({k: str(v) for k, v in runs["leaky"].fitted.runtime.items()})

        # 1. the leaky run on its own random test set of copies (the paper-like figure)
        test = items["leaky"]["test"]
        prob_test = runs["leaky"].predict(test)
        y_test = np.array([it.label for it in test], dtype=int)
        sources, patients = np.array([it.source for it in test]), np.array([it.patient_id for it in test])
        # 2. both runs on the same matched scans (already in matched_order)
        matched = matched.assign(y_true=[it.label for it in matched_items])
        prob_matched = {run: runs[run].predict(matched_items) for run in RUNS}
        on_leaky, on_control, inflation = compare_matched(matched, prob_matched, classes=classes,
                                                          threshold=ev.threshold, n_resamples=ev.bootstrap,
                                                          seed=ev.seed)

        records = _base_records(params)
        elapsed = {"cpu_seconds": round(time.process_time() - cpu0, 1),
                   "wall_seconds": round(time.perf_counter() - wall0, 1), "mlflow_run_id": run_id, **prov.record()}
        records.leaky.update(score(y_test, prob_test, patients, sources, classes=classes, threshold=ev.threshold,
                                   n_resamples=ev.bootstrap, seed=ev.seed))
        records.leaky.update(shares["leaky"], n_scans=len(scans), n_images=len(index), **runs["leaky"].settings(params),
                             **{c.MATCHED: {**on_leaky, **matched_shares(matched, splits["leaky"])}}, **elapsed)
        records.control.update(on_control)
        records.control.update(shares["control"], n_scans=len(scans), n_images=len(splits["control"]),
                               **runs["control"].settings(params), **{c.INFLATION: inflation}, **elapsed)
        matched_predictions = {
            run: metrics.predictions_frame(matched["source"], matched["patient_id"], matched["y_true"].to_numpy(),
                                           prob_matched[run], classes=classes, threshold=ev.threshold)
            for run in RUNS}
        _write_reports(paths.reports, records, {
            c.LEAKY_PREDICTIONS: metrics.predictions_frame(sources, patients, y_test, prob_test, classes=classes,
                                                           threshold=ev.threshold),
            c.LEAKY_MATCHED_PREDICTIONS: matched_predictions["leaky"],
            c.CONTROL_PREDICTIONS: matched_predictions["control"],
            c.LEAKY_SPLIT: splits["leaky"], c.CONTROL_SPLIT: splits["control"]})
        logged = {**mlflow_metrics(records.leaky), **mlflow_metrics(on_leaky, "leaky_matched_"),
                  **mlflow_metrics(on_control, "control_matched_"), **mlflow_metrics(inflation, "inflation_")}
        tracking.log_metrics_to_run(run_id, logged, artifacts=[paths.reports / f for f in c.FILES])
    return records
