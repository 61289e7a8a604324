"""The training loop: forward, loss, backward, step, evaluate, keep the best, checkpoint.

:func:`fit` reads top to bottom like nanoGPT's ``train.py``; what it calls lives in its own small modules: the
device, fast path and DDP helpers in :mod:`spinedxa.runtime`, loss/optimiser/schedule/early stopping in
:mod:`spinedxa.recipe`, fingerprints, RNG states and checkpoint files in :mod:`spinedxa.checkpoint`. Logging is a
callback (``on_epoch``), so the loop knows nothing about MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from spinedxa import checkpoint
from spinedxa.models import ModelSpec
from spinedxa.recipe import AUX_LOSS_WEIGHT, EarlyStopping, FineTune, Schedule
from spinedxa.runtime import Runtime, broadcast, gather

#: Training-curve columns (docs/CONTRACTS.md).
CURVE_COLUMNS = ("fold", "epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds")


@dataclass(frozen=True)
class Batches:
    """The loaders of one fit: training (shuffled by a seeded sampler) and validation."""

    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    generator: torch.Generator


@dataclass
class Session:
    """The mutable state of one fit: everything a checkpoint saves and a resume restores."""

    model: nn.Module  # the bare module, not its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    stopper: EarlyStopping
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the MLflow run id, kept across a resume
    grad_clip: float = 0.0  # clip the gradients' global L2 norm to this before each step (0: no clipping)
    fine_tune: FineTune = field(default_factory=FineTune)  # frozen warm-up and BatchNorm mode (default: none)

    def state(self, fingerprint: str, rng: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The checkpoint of the epoch just finished (``rng``: every rank's RNG states, in rank order)."""
        return {
            "fingerprint": fingerprint, "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "early_stopping": dataclasses.asdict(self.stopper), "best_state": self.best_state,
            "history": self.history, "rng": rng, "extra": self.extra,
        }

    def restore(self, state: Mapping[str, Any], rank: int, generator: torch.Generator) -> None:
        """Continue from a checkpoint (this rank's RNG states included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.stopper = EarlyStopping(**state["early_stopping"])
        self.epoch, self.history, self.best_state = state["epoch"], list(state["history"]), state["best_state"]
        self.extra = dict(state["extra"])
        checkpoint.set_rng_state(state["rng"][rank], generator)


@dataclass(frozen=True)
class FitPlan:
    """How long to train and where to checkpoint.

    Attributes:
        epochs: the most epochs to run (early stopping may end sooner).
        monitor: ``val_loss`` or ``val_auc`` (early stopping and the kept epoch).
        checkpoint: the checkpoint file (rank 0 writes it), or None for a fit that is never resumed.
        fingerprint: :func:`spinedxa.checkpoint.fingerprint` of this fit.
        fold: the fold, for the curves.
        checkpoint_every_s: 0 writes the checkpoint after every epoch. Otherwise after the first epoch that ends at
            least this many seconds after the fit started or last wrote one, and never after the fit's last epoch
            (its caller keeps the result). A checkpoint of a large network is slow to write (VGG-16 with AdamW: 0.5
            GB, ~1.5 s on this project's CPUs, as long as a training epoch at 64 px); a kill loses at most this
            long. Results never depend on it: a resume is bit-identical from whichever epoch it starts.
    """

    epochs: int
    monitor: str
    checkpoint: Path | None
    fingerprint: str
    fold: int = 0
    checkpoint_every_s: float = 0.0


def _checkpoint_due(plan: FitPlan, session: Session, last_saved: float) -> bool:
    """Whether the epoch just finished writes ``plan.checkpoint`` (see :class:`FitPlan`)."""
    if plan.checkpoint is None:
        return False
    if plan.checkpoint_every_s <= 0:
        return True
    finished = session.epoch >= plan.epochs or session.stopper.should_stop
    return not finished and time.monotonic() - last_saved >= plan.checkpoint_every_s


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous CPU copy of the model's state dict (independent of later training steps)."""
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in bare.state_dict().items()}


def train_one_epoch(model: nn.Module, spec: ModelSpec, batches: DataLoader, loss_fn: nn.Module, session: Session,
                    rt: Runtime) -> tuple[float, int]:
    """One pass over the training batches; returns (sum of per-image losses, number of images) on this process."""
    model.train()
    session.fine_tune.set_modes()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = rt.fast.to_input(x, rt.device), y.to(rt.device, non_blocking=True)
        with rt.fast.autocast(rt.device):
            logits, aux = spec.unwrap(model(x))
            loss = loss_fn(logits.float(), y)  # in fp32: autocast would take the softmax of bf16/fp16 logits
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * loss_fn(aux.float(), y)
        session.optimizer.zero_grad(set_to_none=True)
        if session.scaler is not None:
            session.scaler.scale(loss).backward()
            session.fine_tune.drop_frozen_grads(session.epoch)
            if session.grad_clip > 0:
                session.scaler.unscale_(session.optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(session.model.parameters(), session.grad_clip)
            session.scaler.step(session.optimizer)
            session.scaler.update()
        else:
            loss.backward()
            session.fine_tune.drop_frozen_grads(session.epoch)
            if session.grad_clip > 0:
                nn.utils.clip_grad_norm_(session.model.parameters(), session.grad_clip)
            session.optimizer.step()
        session.schedule.after_batch()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total, count


@torch.no_grad()
def evaluate_epoch(model: nn.Module, spec: ModelSpec, batches: DataLoader, loss_fn: nn.CrossEntropyLoss,
                   rt: Runtime) -> dict[str, float]:
    """Validation ``val_loss`` (class-weighted like training, no smoothing), ``val_auc`` (:func:`validation_auc`) and
    ``val_accuracy`` (argmax)."""
    model.eval()
    weighted, weight_sum, probs, labels = 0.0, 0.0, [], []
    per_image = nn.CrossEntropyLoss(weight=loss_fn.weight, reduction="none")
    for x, y in batches:
        x, y = rt.fast.to_input(x, rt.device), y.to(rt.device)
        with rt.fast.autocast(rt.device):
            logits, _ = spec.unwrap(model(x))
        logits = logits.float()
        # Weighted mean over the whole set (sum w_y * loss / sum w_y), as CrossEntropyLoss does within a batch.
        weighted += float(per_image(logits, y).sum())
        weight_sum += float(loss_fn.weight[y].sum()) if loss_fn.weight is not None else len(y)
        probs.append(torch.softmax(logits, dim=1).cpu())
        labels.append(y.cpu())
    p, t = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return {"val_loss": weighted / weight_sum, "val_auc": validation_auc(t, p),
            "val_accuracy": float(np.mean(p.argmax(axis=1) == t))}


def validation_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """ROC-AUC of the validation part that picks the kept epoch: of P(positive) for two classes, else the mean of the
    one-vs-rest AUCs of the classes present with both positives and negatives (NaN when none is)."""
    if prob.shape[1] == 2:
        return float(roc_auc_score(y, prob[:, 1])) if len(np.unique(y)) == 2 else math.nan
    per_class = [roc_auc_score(y == k, prob[:, k]) for k in range(prob.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(per_class)) if per_class else math.nan


#: ``evaluate(model, spec, val batches, loss_fn, rt)``: the validation metrics of one epoch (``plan.monitor`` among them).
Evaluate = Callable[[nn.Module, ModelSpec, DataLoader, nn.Module, Runtime], dict[str, float]]


def fit(model: nn.Module, spec: ModelSpec, data: Batches, loss_fn: nn.Module, session: Session,
        rt: Runtime, plan: FitPlan, on_epoch: Callable[[Session, dict[str, float]], None] | None = None,
        evaluate: Evaluate | None = None) -> Session:
    """Train until ``plan.epochs`` or early stopping, keeping the best epoch's weights in ``session.best_state``.

    ``model`` is what runs the batches (a DDP wrapper under torchrun); ``session.model`` the bare module. Rank 0
    writes checkpoints as ``plan`` says, so a killed fit resumes from the last one (see :meth:`Session.restore`).
    ``on_epoch(session, row)`` runs after each epoch (and after its checkpoint, when one is written), on every rank.
    ``evaluate`` scores the validation batches (default :func:`evaluate_epoch`, the classifiers'; the pretraining's
    regression passes its own).
    """
    evaluate = evaluate or evaluate_epoch
    last_saved = time.monotonic()
    while session.epoch < plan.epochs and not session.stopper.should_stop:
        session.epoch += 1
        started = time.perf_counter()
        data.sampler.set_epoch(session.epoch)
        lr = session.optimizer.param_groups[-1]["lr"]  # the head's: the recipe's rate (one group from scratch)
        loss_sum, count = train_one_epoch(model, spec, data.train, loss_fn, session, rt)
        if rt.dist.enabled:
            totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=rt.device)
            dist.all_reduce(totals)
            loss_sum, count = totals.tolist()
        metrics = evaluate(session.model, spec, data.val, loss_fn, rt) if rt.dist.is_main else None
        metrics = broadcast(rt.dist, metrics)  # every rank takes the same schedule and stopping decisions
        if session.stopper.update(metrics[plan.monitor], session.epoch):
            session.best_state = cpu_state(session.model)
        session.schedule.after_epoch(metrics[plan.monitor])
        row = {"fold": plan.fold, "epoch": session.epoch, "train_loss": loss_sum / count, **metrics, "lr": lr,
               "seconds": time.perf_counter() - started}
        session.history.append(row)
        rng = gather(rt.dist, checkpoint.rng_state(data.generator))
        if rt.dist.is_main and _checkpoint_due(plan, session, last_saved):
            checkpoint.save(plan.checkpoint, session.state(plan.fingerprint, rng))
            last_saved = time.monotonic()
        if on_epoch is not None:
            on_epoch(session, row)
    return session
