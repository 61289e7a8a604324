"""Does pretraining help? Each weights source against training from scratch, on the same folds, paired.

For each network of ``transfer.models`` and each source of ``transfer.sources`` (``pretrained``: the pretrain stage's
backbone; ``imagenet``: torchvision's file, when it has been brought into ``weights/<model>/``), two conditions train
alike except where their weights start:

- **scratch**: ``train.<model>`` with ``weights: none`` and the fine-tuning knobs at their defaults;
- **<source>**: ``train.<model>`` with ``weights: <source>`` and its fine-tuning knobs (``freeze_epochs``,
  ``backbone_lr_factor``, ``bn_mode``: chosen on the folds' validation parts, never on these results).

Both go through the train stage's fold training (:func:`spinedxa.train.train_fold`: seeds, loaders, loop, kept epoch
on the fold's validation part, the task's calibration on it, checkpoints, folds side by side in
``runtime.train_processes`` processes) and are scored like evaluate scores (:func:`spinedxa.models.score`: the
calibrated probabilities with ``train.tta``), on three cohorts:

- **full**: every scan once, out of fold, on the pipeline's folds (``data/split/splits.csv``). The condition whose
  recipe is exactly ``train.<model>`` is not trained again: its predictions are the evaluate stage's
  (``reports/predictions/<model>.csv``).
- **small**: ``transfer.small_draws`` patient-grouped subsamples of about ``transfer.small_size`` scans, drawn
  stratified by the patients' labels (patients ordered by their smallest raw sha256, seed ``transfer.seed + d``), each
  split into ``split.folds`` folds by the pipeline's splitter (:func:`spinedxa.split.assign`, near-duplicate groups
  kept together); both conditions train on the same folds of the same draw. Pooled over the draws (a patient drawn
  twice is one bootstrap unit) and per draw.
- **external**: the external cohort, scored by each condition's fold ensemble of its full-cohort models (the mean of
  the fold models' calibrated probabilities; the evaluate stage's own for the reused condition).

The difference is source minus scratch in ROC-AUC (macro one-vs-rest for the ordinal task), with a paired patient
bootstrap (:func:`spinedxa.metrics.paired_bootstrap_auc`: both conditions on the same resamples; rows ordered by
source, which does not depend on the de-identification key), ``evaluate.bootstrap`` resamples, seed
``evaluate.seed``. A source that is not available here (no file in ``weights/<model>/``, a network the pretrain stage
did not pretrain, ImageNet for cnn21) is recorded as such, with the reason, and not trained.

**What pretraining saw** is recorded beside the numbers (:mod:`spinedxa.pretrain`): a synthetic pool from seeds
disjoint from the cohort's and the external cohort's, through the training cohort's scanner; never a held-out part of
any fold, nor the external cohort.

With ``transfer.enabled: false`` the stage writes ``{"enabled": false}`` and nothing else, without importing torch.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from spinedxa import metrics
from spinedxa.config import ModelTrainConfig, Params, SplitConfig
from spinedxa.contracts import jsonfile, near_duplicates as near_duplicates_contract, predictions as predictions_contract
from spinedxa.contracts import splits as splits_contract, transfer as contract
from spinedxa.contracts.transfer import SCRATCH
from spinedxa.files import atomic_dir, sha256_file
from spinedxa.split import SplitError, assign, groups, patient_table
from spinedxa import weights as weights_policy

if TYPE_CHECKING:
    from spinedxa.calibration import Calibration
    from spinedxa.train import FoldJob

log = logging.getLogger(__name__)

#: MLflow run name of the comparison.
RUN_NAME = "transfer"


@dataclass(frozen=True)
class TransferPaths:
    """The stage's inputs and outputs, as dvc.yaml passes them.

    Attributes:
        splits, images, augmented: as the train stage reads them.
        validated: ``data/validated`` (its confirmed near-duplicates group patients in the small draws' folds).
        external: ``data/external`` (the external cohort, or its disabled marker).
        predictions: ``reports/predictions`` (the evaluate stage's, reused for the condition the train stage ran).
        weights: ``weights`` (``weights/<model>/``: files such as ImageNet's).
        pretrained: ``models/pretrained`` (the pretrain stage's backbones and records).
        checkpoints: where the trainings checkpoint (removed when the stage finishes).
        metrics: ``reports/transfer.json``; details: ``reports/transfer``.
    """

    splits: Path
    images: Path
    augmented: Path
    validated: Path
    external: Path
    predictions: Path
    weights: Path
    pretrained: Path
    checkpoints: Path
    metrics: Path
    details: Path


@dataclass(frozen=True)
class Condition:
    """One way to start a network: ``scratch`` or a weights source, its recipe and resolved weights.

    Attributes:
        reason: why the source is not available here (empty when it is).
    """

    name: str
    cfg: ModelTrainConfig
    init: weights_policy.WeightsSource | None = None
    reason: str = ""

    @property
    def available(self) -> bool:
        return not self.reason


# ------------------------------------------------------------------------------------------- conditions and draws


def conditions(params: Params, model: str, paths: TransferPaths) -> list[Condition]:
    """``scratch`` and each source of ``transfer.sources`` for ``model``, resolved (a source whose file is missing
    gets its reason instead of weights)."""
    base = params.train.model(model)
    scratch = dataclasses.replace(base, weights=weights_policy.NONE, freeze_epochs=0, backbone_lr_factor=1.0,
                                  bn_mode="train")
    out = [Condition(SCRATCH, scratch, weights_policy.resolve(model, scratch))]
    for source in params.transfer.sources:
        cfg = dataclasses.replace(base, weights=source)
        try:
            init = weights_policy.resolve(model, cfg, paths.weights / model, paths.pretrained / model)
        except (weights_policy.WeightsNotFoundError, weights_policy.WeightsError, ValueError) as exc:
            out.append(Condition(source, cfg, reason=str(exc)))
            continue
        out.append(Condition(source, cfg, init))
    return out


def reused(params: Params, model: str, condition: Condition) -> bool:
    """True when ``condition`` is the train stage's own recipe: its full-cohort predictions are evaluate's."""
    return condition.cfg == params.train.model(model)


def small_draws(table: pd.DataFrame, params: Params, pairs: pd.DataFrame | None = None) -> list[pd.DataFrame]:
    """The small cohorts: ``transfer.small_draws`` patient-grouped, stratified subsamples of about
    ``transfer.small_size`` scans of the split table's scans, each as a split table of ``split.folds`` folds.

    Groups (patients, joined by confirmed near-duplicates) are ordered by their smallest raw sha256 and drawn with
    seed ``transfer.seed + d``: independent of the de-identification key.

    Raises:
        SplitError: the cohort is too small for a draw of that size, or a draw too small for the folds (the message
            names ``transfer.small_size``).
    """
    cfg, classes = params.transfer, params.data.classes
    scans = (table.drop_duplicates("source")[list(splits_contract.COLUMNS[:-2])].sort_values("source", kind="stable")
             .reset_index(drop=True))
    units = patient_table(scans, classes, pairs)
    group_of = groups(scans, pairs)
    if cfg.small_size >= len(scans):
        raise SplitError(f"transfer.small_size: {cfg.small_size} is not below the cohort's {len(scans)} scans; "
                         "allowed: a smaller size (a small cohort is a subsample)")
    folds = SplitConfig(protocol="kfold", seed=params.split.seed, folds=max(3, params.split.folds),
                        val=params.split.val, test=params.split.test)
    out = []
    for d in range(cfg.small_draws):
        try:
            chosen, _ = train_test_split(units["group"].to_numpy(), train_size=cfg.small_size / len(scans),
                                         stratify=units["label"].to_numpy(), random_state=cfg.seed + d)
            out.append(assign(scans[group_of.isin(set(chosen))], folds, classes, pairs))
        except (ValueError, SplitError) as exc:
            raise SplitError(f"transfer.small_size: a draw of about {cfg.small_size} of {len(scans)} scans cannot be "
                             f"split into {folds.folds} folds with every class in every part ({exc}); allowed: a "
                             "larger size") from None
    return out


# ------------------------------------------------------------------------------------------- scoring and comparing


def ordered(frame: pd.DataFrame, keys: Sequence[str] = ("source",)) -> pd.DataFrame:
    """``frame`` sorted by ``keys`` (by source: the bootstrap's patient numbering then does not depend on the
    de-identification key)."""
    return frame.sort_values(list(keys), kind="stable").reset_index(drop=True)


def roc_auc(frame: pd.DataFrame, params: Params) -> float | None:
    """The ROC-AUC of a predictions table (macro one-vs-rest for the ordinal task); None when undefined."""
    value = metrics.point_metrics(frame["y_true"].to_numpy(), metrics.task_prob(frame), params.evaluate.threshold,
                                  params.data.classes)["roc_auc"]
    return jsonfile.finite_or_none(value)


def paired_delta(source: pd.DataFrame, scratch: pd.DataFrame, params: Params,
                 keys: Sequence[str] = ("source",)) -> dict[str, Any]:
    """Source minus scratch in ROC-AUC on the same scans (joined on ``keys``), paired patient bootstrap.

    Raises:
        ValueError: the two tables do not hold the same scans, or disagree on a label.
    """
    a, b = ordered(source, keys), ordered(scratch, keys)
    if len(a) != len(b) or not (a[list(keys)].to_numpy() == b[list(keys)].to_numpy()).all():
        raise ValueError(f"transfer: the conditions were scored on different scans ({len(a)} and {len(b)} rows)")
    if not (a["y_true"].to_numpy() == b["y_true"].to_numpy()).all():
        raise ValueError("transfer: the conditions disagree on a scan's label")
    ev = params.evaluate
    result = metrics.paired_bootstrap_auc(a["y_true"].to_numpy(), metrics.task_prob(a), metrics.task_prob(b),
                                          a["patient_id"].to_numpy(), n_resamples=ev.bootstrap, seed=ev.seed)
    return {"roc_auc": jsonfile.finite_or_none(result.difference), "ci_low": result.interval.low,
            "ci_high": result.interval.high, "ci_skipped": result.interval.n_skipped, "se": result.se,
            "p_value": result.p_value, "n_scans": int(len(a)), "n_patients": int(a["patient_id"].nunique())}


def pooled(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The small draws' predictions as one table, each row tagged with its ``draw`` (a scan may be in several)."""
    return pd.concat([f.assign(draw=d) for d, f in enumerate(frames)], ignore_index=True)


# ------------------------------------------------------------------------------------------- training


@dataclass
class Plan:
    """What one model needs trained: per (condition, cohort) the split table and where its folds checkpoint."""

    jobs: list[FoldJob] = field(default_factory=list)
    tables: dict[tuple[str, str], tuple[Path, pd.DataFrame]] = field(default_factory=dict)


def _job_params(params: Params, model: str, cfg: ModelTrainConfig) -> Params:
    """``params`` with ``train.<model>`` replaced by ``cfg``."""
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **{model: cfg}))


def plan_model(params: Params, model: str, paths: TransferPaths, conds: Sequence[Condition],
               tables: Mapping[str, tuple[Path, pd.DataFrame]], digests: Mapping[str, str]) -> Plan:
    """Every fold training ``model`` needs: each available condition on each cohort's table (``full``, ``small<d>``),
    except the condition the train stage ran, on the full cohort (reused)."""
    from spinedxa.train import FoldJob, TrainPaths, check_config

    plan = Plan()
    for cond in conds:
        if not cond.available:
            continue
        job_params = _job_params(params, model, cond.cfg)
        check_config(job_params, model)
        for cohort, (csv, table) in tables.items():
            if cohort == "full" and reused(params, model, cond):
                continue
            work = paths.checkpoints / model / cond.name / cohort
            tpaths = TrainPaths(csv, paths.images, paths.augmented, work / "unused", work / "unused.csv", work,
                                paths.weights / model, paths.pretrained / model)
            plan.tables[(cond.name, cohort)] = (work, table)
            plan.jobs += [FoldJob(job_params, model, k, tpaths, {**digests, "splits": sha256_file(csv)}, cond.init)
                          for k in splits_contract.folds(table)]
    return plan


@dataclass(frozen=True)
class FoldModel:
    """A trained fold model ready to score: the network, its calibration and test-time augmentation."""

    fold: int
    model: Any
    calibration: Calibration
    tta: str


def load_fold(params: Params, model: str, cfg: ModelTrainConfig, done: Path, fold: int,
              calibration: Calibration) -> FoldModel:
    """The kept weights of a finished fold (its ``done.pt``) in a fresh network, in eval mode."""
    import torch

    from spinedxa.models import from_state

    kept = torch.load(done, map_location="cpu", weights_only=True)["best_state"]
    net = from_state(model, len(params.data.classes), kept, source=done, **weights_policy.architecture(model, cfg))
    return FoldModel(fold, net.eval(), calibration, params.train.tta)


def score_out_of_fold(params: Params, model: str, cfg: ModelTrainConfig, table: pd.DataFrame, images: Path,
                      csv: Path, folds: Sequence[FoldModel]) -> pd.DataFrame:
    """Each fold model on its fold's held-out part, as evaluate scores: one predictions table, sorted by source."""
    from spinedxa.data import model_input_shape, part_items, stack_images
    from spinedxa.models import score

    shape = model_input_shape(cfg.image_size, params.ingest.roi)
    classes, parts = params.data.classes, []
    for fm in folds:
        items = part_items(csv, images, fm.fold, "test", classes, table=table)
        prob = score(fm.model, model, stack_images(items, shape), fm.calibration, tta=fm.tta)
        parts.append(metrics.predictions_frame([it.source for it in items], [it.patient_id for it in items],
                                               np.array([it.label for it in items], dtype=int), prob,
                                               classes=classes, threshold=params.evaluate.threshold,
                                               folds=[fm.fold] * len(items)))
    return ordered(pd.concat(parts, ignore_index=True))


def score_external(params: Params, model: str, cfg: ModelTrainConfig, paths: TransferPaths,
                   folds: Sequence[FoldModel]) -> pd.DataFrame | None:
    """The fold ensemble on the external cohort (evaluate's :func:`spinedxa.evaluate.score_external`); None without
    one."""
    from spinedxa.data import model_input_shape
    from spinedxa.evaluate import EvaluatePaths, score_external as ensemble

    unused = paths.checkpoints / "unused"
    where = EvaluatePaths(unused, paths.splits, paths.images, unused, unused, unused, unused, external=paths.external)
    frame = ensemble([(fm.model, fm.calibration, fm.tta) for fm in folds], model, params, where,
                     model_input_shape(cfg.image_size, params.ingest.roi), "cpu")
    return None if frame is None else ordered(frame)


# ------------------------------------------------------------------------------------------- the stage


def write_disabled(paths: TransferPaths) -> dict[str, Any]:
    """``{"enabled": false}`` in both files; no torch, well under a second."""
    record = {"enabled": False}
    with atomic_dir(paths.details) as tmp:
        jsonfile.write(tmp / contract.DETAILS, record)
    metrics.write_metrics(paths.metrics, record)
    log.info("transfer: disabled (transfer.enabled false); wrote %s", paths.metrics)
    return record


def _pretrain_cost(paths: TransferPaths, models: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per pretrained model: its cost and pool (numbers), and what the pretraining saw (words)."""
    numbers, words = {}, {}
    for name, record in weights_policy.pretrained_records(paths.pretrained, models).items():
        numbers[name] = {k: record.get(k) for k in ("wall_seconds", "cpu_seconds", "pool_scans", "epochs", "val_r",
                                                    "val_auc_osteoporosis", "render_seconds")}
        words[name] = {"pool_seed": record.get("pool_seed"), "pool_scanner": record.get("pool_scanner"),
                       "pool_disjoint_from": record.get("pool_disjoint_from"), "target": record.get("target"),
                       "cpu": record.get("cpu"), "fast_path": record.get("fast_path")}
    return numbers, words


def run_transfer(params: Params, paths: TransferPaths) -> dict[str, Any]:
    """The whole comparison: train what is not reused, score, compare; write ``paths.metrics``, ``paths.details``
    and one MLflow run.

    Returns:
        The record written to ``paths.metrics`` (:mod:`spinedxa.contracts.transfer`).

    Raises:
        SplitError: a small draw cannot be made or split (names ``transfer.small_size``).
        ConfigError: a condition's recipe does not fit its network.
        FileNotFoundError: an input is missing (the evaluate stage's predictions, the split table).
    """
    if not params.transfer.enabled:
        return write_disabled(paths)
    from spinedxa import tracking
    from spinedxa.provenance import dvc_digests, provenance
    from spinedxa.runtime import cpu_model
    from spinedxa.train import run_folds

    wall0 = time.perf_counter()
    cfg, classes = params.transfer, params.data.classes
    models = [m for m in params.train.models if m in cfg.models]
    table = splits_contract.read(paths.splits)
    pairs_file = paths.validated / near_duplicates_contract.FILE_NAME
    pairs = near_duplicates_contract.read(pairs_file) if pairs_file.is_file() else None
    draws = small_draws(table, params, pairs)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    tables: dict[str, tuple[Path, pd.DataFrame]] = {"full": (paths.splits, table)}
    for d, draw in enumerate(draws):
        csv = paths.checkpoints / contract.splits_name(d)
        splits_contract.write(csv, draw)
        tables[f"small{d}"] = (csv, splits_contract.read(csv))
    digests = dvc_digests([paths.images, paths.augmented])
    conds = {m: conditions(params, m, paths) for m in models}
    for m in models:
        for c in conds[m]:
            if c.init is not None and c.init.pretrained:
                weights_policy.verify(c.init)
    plans = {m: plan_model(params, m, paths, conds[m], tables, digests) for m in models}
    jobs = [job for m in models for job in plans[m].jobs]
    log.info("transfer: %d fold trainings (%s; %d small draws of about %d scans)", len(jobs), ", ".join(models),
             len(draws), cfg.small_size)
    # A fold's done.pt is <its checkpoints>/fold<k>/done.pt: the checkpoints directory names the condition and cohort.
    finished = ({(r.done.parent.parent, r.fold): r for r in run_folds(jobs, params.runtime.train_processes, None)}
                if jobs else {})

    predictions: dict[str, dict[str, dict[str, pd.DataFrame | None]]] = {}
    for m in models:
        predictions[m] = {}
        for cond in conds[m]:
            if not cond.available:
                continue
            got: dict[str, pd.DataFrame | None] = {}
            for cohort, (csv, cohort_table) in tables.items():
                if cohort == "full" and reused(params, m, cond):
                    got["full"] = ordered(predictions_contract.read(paths.predictions / f"{m}.csv"))
                    external = paths.predictions / "external" / f"{m}.csv"
                    frame = predictions_contract.read(external) if external.is_file() else None
                    got["external"] = ordered(frame) if frame is not None and len(frame) else None
                    continue
                work, _ = plans[m].tables[(cond.name, cohort)]
                folds = [load_fold(params, m, cond.cfg, finished[(work, k)].done, k, finished[(work, k)].calibration)
                         for k in splits_contract.folds(cohort_table)]
                got[cohort] = score_out_of_fold(params, m, cond.cfg, cohort_table, paths.images, csv, folds)
                if cohort == "full":
                    got["external"] = score_external(params, m, cond.cfg, paths, folds)
            predictions[m][cond.name] = got

    record, details = _compare(params, models, conds, predictions, draws)
    pretrain_numbers, saw = _pretrain_cost(paths, models)
    prov = provenance()
    record.update(pretrain=pretrain_numbers, bootstrap_resamples=params.evaluate.bootstrap,
                  bootstrap_seed=params.evaluate.seed, trainings=len(jobs),
                  wall_seconds=round(time.perf_counter() - wall0, 1))
    details.update(cpu=cpu_model(), pretraining_saw=saw, **prov.record())
    with atomic_dir(paths.details) as tmp:
        jsonfile.write(tmp / contract.DETAILS, details)
        for d, draw in enumerate(draws):
            splits_contract.write(tmp / contract.splits_name(d), draw)
        for m, by_condition in predictions.items():
            for name, got in by_condition.items():
                for cohort, frame in got.items():
                    if frame is not None:
                        (tmp / m).mkdir(exist_ok=True)
                        predictions_contract.write(tmp / contract.predictions_name(m, name, cohort), frame)
    metrics.write_metrics(paths.metrics, record)
    numbers: dict[str, float] = {}
    tracking.flatten_metrics("transfer", metrics.rounded(record), numbers)
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    with tracking.training_run(experiment, RUN_NAME, params={"transfer.models": ",".join(models),
                                                            "transfer.sources": ",".join(cfg.sources),
                                                            "transfer.small_size": cfg.small_size,
                                                            "transfer.small_draws": cfg.small_draws,
                                                            "transfer.seed": cfg.seed},
                               tags={"dvc_stage": "transfer", **{k: str(v) for k, v in prov.record().items()}}) as rid:
        tracking.log_epoch(numbers, 0)
    tracking.log_metrics_to_run(rid, {}, artifacts=[paths.metrics, paths.details / contract.DETAILS])
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: a rerun must train afresh
    return record


def _compare(params: Params, models: Sequence[str], conds: Mapping[str, Sequence[Condition]],
             predictions: Mapping[str, Mapping[str, Mapping[str, pd.DataFrame | None]]],
             draws: Sequence[pd.DataFrame]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record's ``models`` and ``small`` entries, and the details' ``conditions``."""
    n_draws = len(draws)
    record: dict[str, Any] = {"enabled": True, "models": {}, "small": {
        "size": params.transfer.small_size, "draws": n_draws,
        "n_scans": [int(d["source"].nunique()) for d in draws],
        "n_patients": [int(d["patient_id"].nunique()) for d in draws]}}
    details: dict[str, Any] = {"enabled": True, "conditions": {}}
    for m in models:
        entry: dict[str, Any] = {}
        words: dict[str, Any] = {}
        got = predictions[m]
        for cond in conds[m]:
            words[cond.name] = {"available": cond.available, "reason": cond.reason,
                                "weights": cond.init.record() if cond.init is not None else None,
                                "recipe": dataclasses.asdict(cond.cfg),
                                "full_from": ("the evaluate stage's predictions (the train stage's models)"
                                              if reused(params, m, cond) else "trained by this stage")}
            if not cond.available:
                entry[cond.name] = {"available": False}
                continue
            frames = got[cond.name]
            small = [frames[f"small{d}"] for d in range(n_draws)]
            item: dict[str, Any] = {
                "available": True, "full_roc_auc": roc_auc(frames["full"], params),
                "small_roc_auc": roc_auc(pooled(small), params) if small else None,
                "small_draw_roc_auc": [roc_auc(f, params) for f in small],
                "external_roc_auc": roc_auc(frames["external"], params) if frames.get("external") is not None
                else None}
            if cond.name != SCRATCH:
                base = got[SCRATCH]
                delta = {"full": paired_delta(frames["full"], base["full"], params)}
                if small:
                    delta["small"] = paired_delta(pooled(small), pooled([base[f"small{d}"] for d in range(n_draws)]),
                                                  params, ("draw", "source"))
                    delta["small_draws"] = [paired_delta(small[d], base[f"small{d}"], params) for d in range(n_draws)]
                if frames.get("external") is not None and base.get("external") is not None:
                    delta["external"] = paired_delta(frames["external"], base["external"], params)
                item["delta"] = delta
            entry[cond.name] = item
        record["models"][m] = entry
        details["conditions"][m] = words
    return record, details
