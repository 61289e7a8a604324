"""The recipe of one training: loss, optimiser, learning-rate schedule, early stopping, and how pre-trained layers
are fine-tuned.

Which recipe each network gets is in params.yaml (``train.<model>``); the choices and their measurements are in the
README ("Recipes"). InceptionV3's auxiliary classifier adds 0.4 x its loss (:data:`AUX_LOSS_WEIGHT`).

Fine-tuning (``train.<model>.freeze_epochs``, ``backbone_lr_factor``, ``bn_mode``; :class:`FineTune`): which layers are
pre-trained and which are new is the head rule of :mod:`spinedxa.weights`. With the defaults (training from scratch)
the optimiser gets one parameter group, exactly as before these knobs existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn

from spinedxa.config import ConfigError, ModelTrainConfig

#: Weight of InceptionV3's auxiliary classifier loss (Szegedy et al. 2016, section 4; torchvision reference recipe).
AUX_LOSS_WEIGHT = 0.4
#: SGD momentum: the standard 0.9 of the ImageNet recipes (He et al. 2016; torchvision's reference train.py).
SGD_MOMENTUM = 0.9
#: Step schedule: divide the learning rate by 10 three times over the run (the ResNet recipe, He et al. 2016).
STEP_GAMMA = 0.1
STEP_DIVISIONS = 3
#: Plateau schedule: divide by 10 after half the early-stopping patience, so the rate drops before training stops.
PLATEAU_FACTOR = 0.1
#: Share of a one-cycle schedule spent warming up (PyTorch's OneCycleLR default pct_start, Smith & Topin 2019).
ONECYCLE_WARMUP = 0.3
#: Under one-cycle, epochs whose learning rate is below this share of the peak are the candidates for the kept epoch.
ANNEALED = 0.1


def class_weights(labels: Sequence[int], n_classes: int) -> Tensor:
    """Inverse-frequency class weights ``n / (k * n_c)`` (scikit-learn's "balanced"), as a float32 tensor.

    Raises:
        ValueError: a class has no training image (the message names its index).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    missing = [i for i, c in enumerate(counts) if c == 0]
    if missing:
        raise ValueError(f"training set has no image of class index {missing} (counts {counts.tolist()})")
    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


#: Key of an optimiser parameter group holding its learning rate as a multiple of ``cfg.lr`` (the schedule's peak).
LR_FACTOR = "lr_factor"


def parameter_groups(backbone: Sequence[nn.Parameter], head: Sequence[nn.Parameter],
                     cfg: ModelTrainConfig) -> list[dict[str, Any]]:
    """The optimiser's groups: the pre-trained layers at ``cfg.lr * cfg.backbone_lr_factor``, the new head at
    ``cfg.lr`` (each group's factor under :data:`LR_FACTOR`, which the schedule follows)."""
    return [{"params": list(backbone), "lr": cfg.lr * cfg.backbone_lr_factor, LR_FACTOR: cfg.backbone_lr_factor},
            {"params": list(head), "lr": cfg.lr, LR_FACTOR: 1.0}]


def build_optimizer(parameters: Any, cfg: ModelTrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum 0.9, Nesterov) with ``cfg.lr`` and ``cfg.weight_decay``.

    Args:
        parameters: the parameters, or groups from :func:`parameter_groups` (each at its own rate).
        fused: use the fused kernel (CPU and CUDA; see :class:`FastPath`); None leaves PyTorch's default.
    """
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "fused": fused or None}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, **common)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **common)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(parameters, momentum=SGD_MOMENTUM, nesterov=True, **common)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is not one of ['adam', 'adamw', 'sgd']")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate scheduler and when it steps: after every batch (one-cycle) or after every epoch."""

    scheduler: Any
    per_batch: bool = False

    def after_batch(self) -> None:
        """Step a per-batch schedule."""
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, monitored: float) -> None:
        """Step a per-epoch schedule (plateau: on the monitored validation value)."""
        if self.scheduler is None or self.per_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ModelTrainConfig, *, monitor: str, patience: int, steps_per_epoch: int
) -> Schedule:
    """The learning-rate schedule ``cfg.scheduler`` (scheduler None for ``none``).

    onecycle: warm up from lr/25 to ``cfg.lr`` over the first 30 % of the batches, then anneal (cosine) to lr/1e4
    (Smith & Topin 2019, "Super-convergence"; PyTorch's OneCycleLR defaults), stepped per batch: on 100-odd training
    images it trained every network here without the divergence a constant high rate caused (measured, README);
    cosine: anneals to 0 over ``cfg.epochs`` (Loshchilov & Hutter 2017, without restarts); step: / 10 every
    ``epochs // 3`` epochs; plateau: / 10 when the monitored value has not improved for ``patience // 2`` epochs.
    """
    if cfg.scheduler == "onecycle":
        total = max(1, cfg.epochs * steps_per_epoch)
        factors = [g.get(LR_FACTOR, 1.0) for g in optimizer.param_groups]
        peak = cfg.lr if all(f == 1.0 for f in factors) else [cfg.lr * f for f in factors]
        return Schedule(torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total,
                                                           pct_start=ONECYCLE_WARMUP), True)
    if cfg.scheduler == "cosine":
        return Schedule(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs)))
    if cfg.scheduler == "step":
        step = max(1, cfg.epochs // STEP_DIVISIONS)
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=STEP_GAMMA))
    if cfg.scheduler == "plateau":
        return Schedule(torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=_mode(monitor), factor=PLATEAU_FACTOR, patience=max(1, patience // 2)
        ))
    if cfg.scheduler == "none":
        return Schedule(None)
    raise ConfigError(f"scheduler {cfg.scheduler!r} is not one of ['onecycle', 'cosine', 'step', 'plateau', 'none']")


def criterion(labels: Sequence[int], n_classes: int, *, class_weighting: bool, label_smoothing: float,
              device: torch.device) -> nn.CrossEntropyLoss:
    """Cross-entropy, weighted by inverse class frequency when ``class_weighting`` (the cohort is 114:60), with
    ``label_smoothing`` (Szegedy et al. 2016, section 7): soft targets keep a big network trained on ~100 images
    from driving its logits to infinity on the training set."""
    weight = class_weights(labels, n_classes).to(device) if class_weighting else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def first_candidate_epoch(cfg: ModelTrainConfig) -> int:
    """The first epoch early stopping may keep: under one-cycle the first whose learning rate has annealed below
    :data:`ANNEALED` of its peak (cosine annealing after :data:`ONECYCLE_WARMUP` of the steps); else the first."""
    if cfg.scheduler != "onecycle":
        return 1
    # lr / peak = (1 + cos(pi t)) / 2 over the annealing phase t in [0, 1]: below ANNEALED from t = acos(2a - 1) / pi.
    t = math.acos(2 * ANNEALED - 1) / math.pi
    return min(cfg.epochs, math.ceil(cfg.epochs * (ONECYCLE_WARMUP + (1 - ONECYCLE_WARMUP) * t)))


def _mode(monitor: str) -> str:
    return "max" if monitor == "val_auc" else "min"


@dataclass
class EarlyStopping:
    """Tracks the best monitored value; ``should_stop`` after ``patience`` epochs without improvement (0: never).

    Epochs before ``start_epoch`` are not candidates and do not count towards the patience: under a one-cycle
    schedule the validation metrics are not informative until the learning rate has annealed (measured: cnn21's
    validation loss rose from 0.69 to 2.9 and stayed above 0.9 until epoch 19 of 30, while BatchNorm's running
    statistics lagged the fast-moving weights), so stopping or keeping an epoch there kept untrained networks.
    :func:`first_candidate_epoch` gives the start.
    """

    monitor: str
    patience: int
    start_epoch: int = 1
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s monitored value; return True when it is the new best.

        The first candidate epoch is always the best so far; a NaN (e.g. AUC on a one-class validation set) never
        improves. A tie goes to the later epoch: with a dozen validation scans AUCs tie often, and the later epoch
        has trained longer at a lower learning rate.
        """
        if epoch < self.start_epoch:
            return False
        better = value <= self.best if _mode(self.monitor) == "min" else value >= self.best
        if self.best_epoch == 0 or (math.isfinite(value) and (not math.isfinite(self.best) or better)):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience


@dataclass(frozen=True)
class FineTune:
    """How a training treats its pre-trained layers (``train.<model>``: ``freeze_epochs``, ``bn_mode``; the
    learning-rate factor is in the optimiser's groups, :func:`parameter_groups`).

    Attributes:
        backbone: the pre-trained layers' parameters (:func:`spinedxa.weights.split_parameters`).
        norms: their BatchNorm layers (:func:`spinedxa.weights.backbone_norms`).
        freeze_epochs: epochs ``1..freeze_epochs`` step the new head only: the backbone's gradients are dropped
            before each step (AdamW then skips those parameters, weight decay included), which works the same under
            DDP, where toggling ``requires_grad`` after wrapping does not.
        bn_frozen: the backbone's BatchNorm layers stay in eval mode while training: they normalise with the
            pre-trained running statistics and never update them (their affine weights still train).

    The default (nothing) is training from scratch: both hooks do nothing.
    """

    backbone: tuple[nn.Parameter, ...] = ()
    norms: tuple[nn.Module, ...] = ()
    freeze_epochs: int = 0
    bn_frozen: bool = False

    def set_modes(self) -> None:
        """After ``model.train()``: put the frozen BatchNorm layers back in eval mode."""
        if self.bn_frozen:
            for module in self.norms:
                module.eval()

    def drop_frozen_grads(self, epoch: int) -> None:
        """After the backward pass of epoch ``epoch``: drop the backbone's gradients during the frozen warm-up."""
        if epoch <= self.freeze_epochs:
            for param in self.backbone:
                param.grad = None
