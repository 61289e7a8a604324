"""The ``train@<model>`` stage: train one network on every fold, write the fold models, log them to MLflow.

For each fold of the split table (k-fold: ``split.folds``; holdout: one), the network trains on that fold's
``train`` part (plus the offline copies of exactly those scans, with online augmentation when on) and its ``val``
part drives early stopping and the kept epoch; the fold's ``test`` part is never read here. Folds are independent
trainings, run side by side in ``runtime.train_processes`` processes of ``train.threads`` threads each: a fold's
result depends on its params, data and runtime facts (fast path, threads), never on how many run at once or in which
order.

Reproducible and resumable: seeded torch/numpy/python RNGs, a seeded sampler and loader generator, deterministic
algorithms (same params, same machine: bit-identical weights); every fold checkpoints each epoch under a fingerprint
(:mod:`spinedxa.checkpoint`) and a finished fold leaves ``done.pt``, so a killed stage resumes where it stopped and
never resumes a stale checkpoint. Under ``torchrun`` (``WORLD_SIZE > 1``) every rank trains the folds one after the
other with DDP (gloo on CPU, NCCL on CUDA); rank 0 writes every output.

Initial weights (``train.<model>.weights``) come from :mod:`spinedxa.weights`: resolved and verified before any fold
starts (a missing file stops the stage with a message naming the command that brings it in), verified again by each
fold that loads them, and named in every fold's meta.json, MLflow params and checkpoint fingerprint. How pre-trained
layers are tuned (a frozen warm-up, a lower backbone rate, frozen BatchNorm statistics) is the recipe's
(:class:`spinedxa.recipe.FineTune`), chosen on the folds' validation parts only.

MLflow: one parent run per model (its pooled out-of-fold metrics are added by ``evaluate``) with one nested run per
fold (params, per-epoch metrics, the fold's model with its signature, the training data as dataset inputs whose
digests are their DVC hashes, tags for the git commit, dirty flag, DVC stage, fast path and threads). The main
process logs them as folds finish, so two training processes never write to one SQLite store at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import shutil
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from spinedxa import checkpoint, tracking, weights as pretrained
from spinedxa.augment import build_transform, flip_only
from spinedxa.config import ConfigError, ModelTrainConfig, Params
from spinedxa.contracts import jsonfile, splits as splits_contract, table
from spinedxa import calibration as calibration_policy
from spinedxa.calibration import Calibration
from spinedxa.data import DXADataset, model_input_shape, part_items, stack_images, training_items
from spinedxa.files import atomic_dir, sha256_file
from spinedxa.loop import CURVE_COLUMNS, Batches, FitPlan, Session, fit
from spinedxa.models import from_state, get_model, get_spec, predict_proba, variant
from spinedxa.provenance import dvc_digests, provenance
from spinedxa.recipe import (EarlyStopping, FineTune, build_optimizer, build_scheduler, criterion,
                             first_candidate_epoch, parameter_groups)
from spinedxa.runtime import Runtime, process_group, seed_everything, training_pool

log = logging.getLogger(__name__)

LAST = "last.pt"  # a fold's checkpoint after its latest epoch
DONE = "done.pt"  # a finished fold: best weights and history, under the fold's fingerprint
LOGGED = "mlflow.json"  # the MLflow run a finished fold was logged to
PARENT = "mlflow_parent.json"  # the model's parent run (reused when the stage resumes)
#: Repeat r of a fold trains with seed train.seed + r * REPEAT_SEED_STRIDE (far from every other seed in params).
REPEAT_SEED_STRIDE = 1000


def repeat_dir(fold: int, repeat: int = 0) -> str:
    """Where repeat ``repeat`` of fold ``fold`` lives under models/<m>/ (and the checkpoints): ``fold<k>`` for the
    first training (the result), ``repeat<r>/fold<k>`` for the seed repeats (``train.repeats``)."""
    return f"fold{fold}" if repeat == 0 else f"repeat{repeat}/fold{fold}"


def repeat_params(params: Params, repeat: int) -> Params:
    """``params`` with the seed of repeat ``repeat`` (``train.seed + repeat * REPEAT_SEED_STRIDE``)."""
    if repeat == 0:
        return params
    train = dataclasses.replace(params.train, seed=params.train.seed + repeat * REPEAT_SEED_STRIDE)
    return dataclasses.replace(params, train=train)


@dataclass(frozen=True)
class TrainPaths:
    """The stage's inputs and outputs, exactly as dvc.yaml passes them (repo-relative)."""

    splits: Path
    images: Path
    augmented: Path
    out: Path
    curves: Path
    checkpoints: Path
    weights: Path | None = None  # weights/<model>: the files train.<model>.weights may name (None: that default)
    pretrained: Path | None = None  # models/pretrained/<model>: the pretrain stage's backbone (None: that default)


@dataclass(frozen=True)
class FoldJob:
    """Everything one fold's training needs (picklable: sent to a worker process)."""

    params: Params
    model: str
    fold: int
    paths: TrainPaths
    digests: Mapping[str, str]
    init: pretrained.WeightsSource | None = None  # where the weights start (None: resolved from paths.weights)
    repeat: int = 0  # the seed repeat (train.repeats); params already carry its seed (repeat_params)


@dataclass(frozen=True)
class FoldResult:
    """What a finished fold hands back: where its ``done.pt`` is and what it did."""

    fold: int
    done: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float | None
    runtime: dict[str, Any]
    n_train: int
    n_val: int
    resumed_from: int
    calibration: Calibration
    repeat: int = 0


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` did."""

    model: str
    folds: list[FoldResult]
    run_id: str | None


def check_config(params: Params, name: str, world_size: int = 1) -> None:
    """Reject train params that do not fit this model or world size before any work.

    Raises:
        ConfigError: the message names the key.
    """
    cfg, spec = params.train.model(name), get_spec(name)
    height, width = model_input_shape(cfg.image_size, params.ingest.roi)
    if min(height, width) < spec.min_size:
        raise ConfigError(f"train.{name}.image_size: {cfg.image_size} gives inputs of {height} x {width} px, below "
                          f"{name}'s minimum of {spec.min_size} px per side; allowed: >= {spec.min_size * 2}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"train.{name}.batch_size: {cfg.batch_size} is not divisible by the DDP world size "
                          f"{world_size}")
    if cfg.fine_tunes and cfg.weights == pretrained.NONE:
        raise ConfigError(f"train.{name}: freeze_epochs {cfg.freeze_epochs}, backbone_lr_factor "
                          f"{cfg.backbone_lr_factor}, bn_mode {cfg.bn_mode} tune pre-trained layers, but weights is "
                          "none; allowed with weights: none: freeze_epochs 0, backbone_lr_factor 1.0, bn_mode train")
    if cfg.freeze_epochs >= cfg.epochs:
        raise ConfigError(f"train.{name}.freeze_epochs: {cfg.freeze_epochs} leaves no epoch to tune the pre-trained "
                          f"layers; allowed: < epochs ({cfg.epochs})")
    with torch.device("meta"):  # batch_norm on a non-VGG: ValueError (built without memory or initialisation)
        get_model(name, len(params.data.classes), **pretrained.architecture(name, cfg))


# ------------------------------------------------------------------------------------------- one fold


@dataclass
class Prepared:
    """One training ready to :func:`spinedxa.loop.fit`: what runs the batches, the loaders, the loss, the session."""

    model: nn.Module  # the DDP wrapper under torchrun, else the bare module (session.model)
    data: Batches
    loss_fn: nn.CrossEntropyLoss
    session: Session


def prepare(params: Params, name: str, cfg: ModelTrainConfig, items: tuple[Sequence[Any], Sequence[Any]],
            rt: Runtime, init: pretrained.WeightsSource | None = None) -> Prepared:
    """Seeds, loaders, network, loss, optimiser, schedule and early stopping of one training of ``name``.

    The one set-up of every training: each fold of the train stage, and the replay ablation (which passes its own
    ``cfg`` and items). ``items`` is ``(training items, validation items)``; ``init`` where the weights start
    (default: ``cfg.weights`` resolved in ``weights/<name>``).

    Raises:
        ValueError: no training or validation image, or a class missing from the training items.
    """
    train_items, val_items = items
    if not train_items or not val_items:
        raise ValueError(f"{name}: {len(train_items)} training and {len(val_items)} validation images; both must be "
                         "> 0")
    train, seed = params.train, params.train.seed
    seed_everything(seed)  # before anything random (the model's initial weights): every fold and rank alike
    shape = model_input_shape(cfg.image_size, params.ingest.roi)
    augment = params.augment if cfg.augment == "full" else flip_only(params.augment)
    transform = build_transform(augment) if params.augment.online else None
    train_ds, val_ds = DXADataset(train_items, shape, transform=transform), DXADataset(val_items, shape)
    # DistributedSampler also for one process: its permutation depends only on (seed, epoch), so a resumed run
    # draws the same batches, and a DDP run's global batches are the one-process batches split across ranks.
    per_process = cfg.batch_size // rt.dist.world_size
    sampler = DistributedSampler(train_ds, num_replicas=rt.dist.world_size, rank=rt.dist.rank, shuffle=True,
                                 seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + rt.dist.rank)
    loader = DataLoader(train_ds, batch_size=per_process, sampler=sampler, generator=generator,
                        pin_memory=rt.device.type == "cuda",
                        # A last batch of one image gives BatchNorm no batch statistics: drop it.
                        drop_last=len(sampler) % per_process == 1)
    data = Batches(loader, DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False), sampler, generator)
    model, bare = _network(params, name, cfg, rt, init or pretrained.resolve(name, cfg))
    loss_fn = criterion(train_ds.labels, len(params.data.classes), class_weighting=train.class_weighting,
                        label_smoothing=cfg.label_smoothing, device=rt.device)
    parameters, fine_tune = fine_tuning(bare, name, cfg)
    optimizer = build_optimizer(parameters, cfg, fused=rt.fast.fused_optimizer)
    schedule = build_scheduler(optimizer, cfg, monitor=train.monitor, patience=train.patience,
                               steps_per_epoch=len(loader))
    scaler = torch.amp.GradScaler(rt.device.type) if rt.fast.grad_scaler else None
    stopper = EarlyStopping(train.monitor, train.patience, first_candidate_epoch(cfg))
    torch.manual_seed(seed + rt.dist.rank)  # dropout and online augmentation differ per rank
    return Prepared(model, data, loss_fn, Session(bare, optimizer, schedule, scaler, stopper,
                                                 grad_clip=cfg.grad_clip, fine_tune=fine_tune))


def fine_tuning(model: nn.Module, name: str, cfg: ModelTrainConfig) -> tuple[Any, FineTune]:
    """The optimiser's parameters and the :class:`~spinedxa.recipe.FineTune` of ``cfg``: from scratch (the default
    knobs) all parameters in one group and no fine-tuning; else the pre-trained layers and the new head (the head
    rule of :mod:`spinedxa.weights`) in their own groups when the backbone's rate differs."""
    if not cfg.fine_tunes:
        return model.parameters(), FineTune()
    backbone, head = pretrained.split_parameters(model, name)
    groups = parameter_groups(backbone, head, cfg) if cfg.backbone_lr_factor != 1.0 else model.parameters()
    return groups, FineTune(tuple(backbone), tuple(pretrained.backbone_norms(model, name)), cfg.freeze_epochs,
                            cfg.bn_mode == "frozen")


def _network(params: Params, name: str, cfg: ModelTrainConfig, rt: Runtime,
             init: pretrained.WeightsSource) -> tuple[nn.Module, nn.Module]:
    """The model, from its initial weights, on the device in the fast path's memory format: (what runs the batches,
    the bare module)."""
    model = pretrained.build_model(name, len(params.data.classes), cfg, init).to(rt.device)
    if rt.fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not rt.dist.enabled:
        return model, model
    if rt.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one BatchNorm batch across GPUs, as in one process
    # On CPU (gloo) BatchNorm stays per process (SyncBatchNorm is CUDA-only); DDP broadcasts rank 0's buffers.
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None), model


def train_fold(job: FoldJob, on_epoch_end: Callable[[int], None] | None = None) -> FoldResult:
    """Train one fold to its ``done.pt`` (or return the existing one when its fingerprint matches).

    Args:
        job: the fold and its inputs.
        on_epoch_end: called with the epoch number after each epoch and its checkpoint, if one is due (tests use it
            to kill a fit).

    Raises:
        ConfigError, FileNotFoundError, ValueError: unusable params or input data (the message names the key/file).
    """
    params, train = job.params, job.params.train
    cfg, spec = train.model(job.model), get_spec(job.model)
    rt = Runtime.setup(train.device, train.fast, train.threads)
    init = job.init or pretrained.resolve(job.model, cfg, job.paths.weights, job.paths.pretrained)
    fp = checkpoint.fingerprint(params, job.model, job.fold, {**job.digests, **init.digest()}, rt.record())
    fold_dir = job.paths.checkpoints / repeat_dir(job.fold, job.repeat)
    done = checkpoint.load(fold_dir / DONE, fp)
    if done is not None:
        log.info("%s fold %d: already trained (%s)", job.model, job.fold, fold_dir / DONE)
        return _result(job, fold_dir / DONE, done, rt, resumed_from=len(done["history"]))
    classes = params.data.classes
    items = (training_items(job.paths.splits, job.paths.images, job.paths.augmented, job.fold, classes),
             part_items(job.paths.splits, job.paths.images, job.fold, "val", classes))
    if not items[0] or not items[1]:
        raise ValueError(f"{job.paths.splits}: fold {job.fold} has {len(items[0])} training and {len(items[1])} "
                         "validation images; both must be > 0")
    with process_group(rt.dist, rt.device):
        prepared = prepare(params, job.model, cfg, items, rt, init)
        model, data, loss_fn, session = prepared.model, prepared.data, prepared.loss_fn, prepared.session
        state = checkpoint.load(fold_dir / LAST, fp)
        if state is not None:
            session.restore(state, rt.dist.rank, data.generator)
            log.info("%s fold %d: resuming after epoch %d", job.model, job.fold, session.epoch)
        resumed_from = session.epoch
        log.info("%s fold %d: %d training, %d validation images, %s, fast path %s, %d thread(s), world size %d",
                 job.model, job.fold, len(data.train.dataset), len(data.val.dataset), rt.device, rt.fast.name,
                 rt.threads, rt.dist.world_size)

        def report(s: Session, row: dict[str, float]) -> None:
            log.info("%s fold %d epoch %d/%d: train_loss %.4f val_loss %.4f val_auc %.4f (%.1f s)", job.model,
                     job.fold, row["epoch"], cfg.epochs, row["train_loss"], row["val_loss"], row["val_auc"],
                     row["seconds"])
            if on_epoch_end is not None:
                on_epoch_end(s.epoch)

        fit(model, spec, data, loss_fn, session, rt,
            FitPlan(cfg.epochs, train.monitor, fold_dir / LAST, fp, job.fold, params.runtime.checkpoint_every_s),
            on_epoch=report)
        if session.best_state is None:
            raise RuntimeError(f"{job.model} fold {job.fold}: no epoch was trained (train.{job.model}.epochs)")
        calibration = _calibrate(job, session.best_state, data.val.dataset.items)
        result = {"fingerprint": fp, "best_state": session.best_state, "history": session.history,
                  "calibration": calibration.record(),
                  "best_epoch": session.stopper.best_epoch, "best_value": session.stopper.best,
                  "n_train": len(data.train.dataset), "n_val": len(data.val.dataset), "resumed_from": resumed_from}
        if rt.dist.is_main:
            checkpoint.save(fold_dir / DONE, result)
            (fold_dir / LAST).unlink(missing_ok=True)
    return _result(job, fold_dir / DONE, result, rt, resumed_from=resumed_from)


def calibrate(params: Params, name: str, model: nn.Module, val_items: Sequence[Any], *,
              device: str | torch.device = "cpu") -> Calibration:
    """The task's calibration of a kept model (Platt for two classes, temperature for more), fitted on its own
    validation part (:mod:`spinedxa.calibration`), on the fp32 predictions with ``train.tta`` that evaluate and
    predict will make.

    The one calibration of every training: each fold of the train stage, and both runs of the replay ablation.
    """
    cfg = params.train.model(name)
    shape = model_input_shape(cfg.image_size, params.ingest.roi)
    prob = predict_proba(model, name, stack_images(val_items, shape), device=device, tta=params.train.tta)
    return calibration_policy.fit(prob, [it.label for it in val_items], seed=params.train.seed)


def _calibrate(job: FoldJob, state: Mapping[str, torch.Tensor], val_items: Sequence[Any]) -> Calibration:
    """:func:`calibrate` of the fold's kept weights (on the CPU, in a fresh network)."""
    cfg = job.params.train.model(job.model)
    model = from_state(job.model, len(job.params.data.classes), state, **pretrained.architecture(job.model, cfg))
    return calibrate(job.params, job.model, model, val_items)


def _result(job: FoldJob, done: Path, state: Mapping[str, Any], rt: Runtime, *, resumed_from: int) -> FoldResult:
    return FoldResult(job.fold, done, list(state["history"]), int(state["best_epoch"]),
                      jsonfile.finite_or_none(state["best_value"]), rt.record(), int(state["n_train"]),
                      int(state["n_val"]), resumed_from, Calibration.from_record(state["calibration"]), job.repeat)


# ------------------------------------------------------------------------------------------- the stage


def train_model(params: Params, name: str, paths: TrainPaths, *, processes: int | None = None,
                on_epoch_end: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``name`` on every fold and write ``models/<name>/`` (one ``fold<k>/`` per fold), the curves and MLflow.

    Args:
        processes: folds trained side by side (default ``runtime.train_processes``; 1 under torchrun and when a
            test passes ``on_epoch_end``).
        on_epoch_end: called after each epoch (and its checkpoint, if one is due); forces one process.

    Raises:
        ConfigError: a train param does not fit this model (the message names the key).
        spinedxa.weights.WeightsNotFoundError: the weights file ``train.<name>.weights`` names is not in the project
            (the message names the command that brings it in).
        spinedxa.weights.WeightsError: that file differs from its record or does not fit the network.
        FileNotFoundError, ValueError: missing or malformed input data (the message names the file).
        RuntimeError: a training process died (e.g. killed for memory); the finished folds are kept for a rerun.
    """
    rt_env = Runtime.setup(params.train.device, params.train.fast, params.train.threads)
    check_config(params, name, rt_env.dist.world_size)
    init = pretrained.resolve(name, params.train.model(name), paths.weights, paths.pretrained)
    if init.pretrained:
        pretrained.verify(init)  # before any work; each fold verifies again when it loads the file
    folds = splits_contract.folds(splits_contract.read(paths.splits))
    digests = dvc_digests([paths.splits, paths.images, paths.augmented])
    jobs = [FoldJob(repeat_params(params, r), name, k, paths, digests, init, r)
            for r in range(params.train.repeats) for k in folds]
    n = 1 if rt_env.dist.enabled or on_epoch_end is not None else (processes or params.runtime.train_processes)
    main = rt_env.dist.is_main
    experiment = tracking.experiment_name(params.runtime.mlflow_experiment)
    run = (_parent_run(params, name, paths, experiment, digests, rt_env, init) if main
           else contextlib.nullcontext(None))
    with run as parent:
        results = []
        for result in run_folds(jobs, n, on_epoch_end):
            if main:
                _log_fold(params, name, paths, experiment, parent, result, init)
            results.append(result)
        results.sort(key=lambda r: (r.repeat, r.fold))
        if main:
            _write_outputs(params, name, paths, results, parent, digests, init)
            shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: a rerun must train afresh
    return TrainResult(name, results, parent)


def run_folds(jobs: Sequence[FoldJob], processes: int, on_epoch_end: Callable[[int], None] | None):
    """Yield each fold's result as it finishes (in one process, in fold order)."""
    if processes <= 1 or len(jobs) == 1:
        for job in jobs:
            yield train_fold(job, on_epoch_end)
        return
    with training_pool(min(processes, len(jobs)), __name__) as pool:
        futures = {pool.submit(train_fold, job): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BrokenProcessPool as exc:
            pending = sorted(job.fold for f, job in futures.items() if not f.done() or f.exception() is not None)
            raise RuntimeError(f"{jobs[0].model}: a training process died (killed, e.g. for memory) while training "
                               f"fold(s) {pending}; finished folds are kept in {jobs[0].paths.checkpoints}: rerun "
                               "the stage to continue") from exc


def _mlflow_params(params: Params, name: str, init: pretrained.WeightsSource) -> dict[str, Any]:
    train = params.train
    out: dict[str, Any] = {"model": name, "variant": variant(name, train.model(name).batch_norm),
                           **dataclasses.asdict(train.model(name)), **init.mlflow_params()}
    out.update({f"train.{k}": getattr(train, k) for k in checkpoint.COMMON_TRAIN_KEYS})
    out.update({f"augment.{k}": v for k, v in dataclasses.asdict(params.augment).items()})
    out.update({"split.protocol": params.split.protocol, "split.folds": params.split.folds})
    return out


def _tags(name: str, runtime: Mapping[str, Any], **extra: str) -> dict[str, str]:
    prov = provenance()
    return {"git_commit": prov.commit, "git_dirty": "unknown" if prov.dirty is None else str(prov.dirty).lower(), "dvc_stage": f"train@{name}",
            **{k: str(v) for k, v in runtime.items()}, **extra}


def _parent_run(params: Params, name: str, paths: TrainPaths, experiment: str, digests: Mapping[str, str],
                rt: Runtime, init: pretrained.WeightsSource) -> contextlib.AbstractContextManager[str]:
    """The model's parent run; a resumed stage reopens the run of its earlier attempt (kept in the checkpoints)."""
    marker = paths.checkpoints / PARENT
    key = checkpoint.fingerprint(params, name, -1, {**digests, **init.digest()}, rt.record())
    previous = jsonfile.read(marker) if marker.is_file() else {}
    run_id = previous.get("run_id") if previous.get("fingerprint") == key else None

    @contextlib.contextmanager
    def opened():
        with tracking.training_run(experiment, name, params=_mlflow_params(params, name, init),
                                   tags=_tags(name, rt.record(), seed=str(params.train.seed)), run_id=run_id) as rid:
            marker.parent.mkdir(parents=True, exist_ok=True)
            jsonfile.write(marker, {"fingerprint": key, "run_id": rid})
            if rid != run_id:
                for path, digest in digests.items():
                    tracking.log_dataset(Path(path).name, digest, path, context="training")
            yield rid

    return opened()


def _log_fold(params: Params, name: str, paths: TrainPaths, experiment: str, parent: str,
              result: FoldResult, init: pretrained.WeightsSource) -> None:
    """One nested run for a finished fold (skipped when a resumed stage had logged it already)."""
    marker = result.done.parent / LOGGED
    if marker.is_file() and tracking.run_exists(jsonfile.read(marker).get("run_id", "")):
        return
    cfg = params.train.model(name)
    seeded = repeat_params(params, result.repeat)
    repeat = {"repeat": str(result.repeat)} if result.repeat else {}
    with tracking.training_run(experiment, f"{name}/{repeat_dir(result.fold, result.repeat)}",
                               params={**_mlflow_params(seeded, name, init), "fold": result.fold,
                                       "n_train_images": result.n_train, "n_val_images": result.n_val},
                               tags=_tags(name, result.runtime, fold=str(result.fold), seed=str(seeded.train.seed),
                                          **repeat), parent_run_id=parent) as rid:
        for row in result.history:
            tracking.log_epoch({k: v for k, v in row.items() if k not in ("epoch", "fold")}, int(row["epoch"]))
        kept = torch.load(result.done, map_location="cpu", weights_only=True)["best_state"]
        export = from_state(name, len(params.data.classes), kept, source=result.done,
                            **pretrained.architecture(name, cfg)).eval()
        shape = model_input_shape(cfg.image_size, params.ingest.roi)
        tracking.log_model(export, np.zeros((1, 1, *shape), dtype=np.float32))
        tracking.log_epoch({"best_epoch": result.best_epoch, "epochs_run": len(result.history)}, len(result.history))
    jsonfile.write(marker, {"run_id": rid})


def _write_outputs(params: Params, name: str, paths: TrainPaths, results: Sequence[FoldResult], parent: str,
                   digests: Mapping[str, str], init: pretrained.WeightsSource) -> None:
    """``models/<name>/fold<k>/{model.pt, meta.json}`` and ``models/<name>/meta.json`` (atomically, as one
    directory), then the training curves of every fold. Each fold's meta.json names the weights it started from
    (``weights``) and the builder arguments that rebuild it (``batch_norm``, ``transform_input``). Seed repeats
    (``train.repeats``) go to ``models/<name>/repeat<r>/fold<k>/``; the curves are the first training's."""
    cfg, prov = params.train.model(name), provenance()
    with atomic_dir(paths.out) as tmp:
        for r in results:
            fold_out = tmp / repeat_dir(r.fold, r.repeat)
            fold_out.mkdir(parents=True)
            state = torch.load(r.done, map_location="cpu", weights_only=True)["best_state"]
            torch.save(state, fold_out / "model.pt")
            logged = r.done.parent / LOGGED
            meta = {
                "model": name, "variant": variant(name, cfg.batch_norm), **pretrained.architecture(name, cfg),
                "weights": init.record(), "fold": r.fold, "image_size": cfg.image_size,
                "input_shape": list(model_input_shape(cfg.image_size, params.ingest.roi)),
                "classes": list(params.data.classes),
                "mlflow_run_id": jsonfile.read(logged)["run_id"] if logged.is_file() else None,
                "mlflow_tracking_uri": tracking.redact_uri(tracking.tracking_uri()),
                "model_sha256": sha256_file(fold_out / "model.pt"), "data_digests": dict(digests),
                "params": dataclasses.asdict(cfg), "epochs_run": len(r.history), "best_epoch": r.best_epoch,
                "monitor": params.train.monitor, "best_value": r.best_value,
                "seed": repeat_params(params, r.repeat).train.seed, "repeat": r.repeat,
                "n_train_images": r.n_train, "n_val_images": r.n_val, "calibration": r.calibration.record(),
                "tta": params.train.tta,
                **prov.record(), **r.runtime,
            }
            jsonfile.write(fold_out / "meta.json", meta)
        first = [r for r in results if r.repeat == 0]
        jsonfile.write(tmp / "meta.json", {
            "model": name, "variant": variant(name, cfg.batch_norm), "protocol": params.split.protocol,
            "folds": [r.fold for r in first], "repeats": params.train.repeats,
            "repeat_seeds": [repeat_params(params, k).train.seed for k in range(params.train.repeats)],
            "weights": init.record(), "mlflow_run_id": parent,
            "mlflow_tracking_uri": tracking.redact_uri(tracking.tracking_uri()), "data_digests": dict(digests),
            **prov.record(), **results[0].runtime,
        })
    rows = [row for r in results if r.repeat == 0 for row in r.history]
    table.write(paths.curves, pd.DataFrame(rows, columns=list(CURVE_COLUMNS)), CURVE_COLUMNS)
