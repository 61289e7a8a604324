"""Tests for spinedxa.recipe: class weights, loss, optimiser, schedule, the first candidate epoch, early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from spinedxa.config import ConfigError
from spinedxa.recipe import (
    ANNEALED,
    EarlyStopping,
    Schedule,
    build_optimizer,
    build_scheduler,
    class_weights,
    criterion,
    first_candidate_epoch,
)
from train_factory import CPU, make_params


def _cfg(**overrides):
    return make_params(cnn21=overrides).train.cnn21


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    "labels, expected",
    [([0, 0, 0, 1], [4 / 6, 2.0]), ([0, 1], [1.0, 1.0]), ([1] * 114 + [0] * 60, [174 / 120, 174 / 228])],
)
def test_class_weights_inverse_frequency(labels, expected) -> None:
    weights = class_weights(labels, 2)
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx(expected)


def test_class_weights_rejects_missing_class() -> None:
    with pytest.raises(ValueError, match=r"class index \[1\]"):
        class_weights([0, 0, 0], 2)


@pytest.mark.parametrize("weighted, expected", [(True, [4 / 6, 2.0]), (False, None)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_criterion(weighted: bool, expected, smoothing: float) -> None:
    loss = criterion([0, 0, 0, 1], 2, class_weighting=weighted, label_smoothing=smoothing, device=CPU)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == smoothing
    assert (loss.weight.tolist() == pytest.approx(expected)) if weighted else loss.weight is None


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "optimizer, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_build_optimizer(optimizer: str, cls: type, fused: bool) -> None:
    cfg = _cfg(optimizer=optimizer, lr=0.01, weight_decay=0.001)
    param = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([param], cfg, fused=fused)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.001 and bool(group["fused"]) == fused
    if optimizer == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"]
    param.grad = torch.ones(2)
    opt.step()  # the fused CPU kernel exists for this optimiser
    assert param.detach().lt(1.0).all()


@pytest.mark.parametrize(
    "scheduler, monitor, cls, lr_after_3",
    [
        ("cosine", "val_loss", torch.optim.lr_scheduler.CosineAnnealingLR, 0.0),
        ("step", "val_loss", torch.optim.lr_scheduler.StepLR, 0.1 * 0.1**3),
        ("plateau", "val_auc", torch.optim.lr_scheduler.ReduceLROnPlateau, 0.1 * 0.1),
        ("none", "val_loss", type(None), 0.1),
    ],
)
def test_per_epoch_schedules(scheduler: str, monitor: str, cls: type, lr_after_3: float) -> None:
    cfg = _cfg(scheduler=scheduler, lr=0.1, epochs=3)
    opt = _optimizer()
    schedule = build_scheduler(opt, cfg, monitor=monitor, patience=2, steps_per_epoch=5)
    assert type(schedule.scheduler) is cls and not schedule.per_batch
    for _ in range(3):  # plateau: AUC stuck at 0.5 for 3 epochs (patience 2 // 2 = 1) drops the rate once
        for _ in range(5):
            opt.step()
            schedule.after_batch()  # a per-epoch schedule ignores batches
        schedule.after_epoch(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_after_3, abs=1e-12)


def test_onecycle_steps_per_batch() -> None:
    """One-cycle steps after every batch (epochs x batches steps in all), never after an epoch: warm-up from lr/25
    to the peak over the first 30 % of the batches, then anneal to lr/25/1e4 (PyTorch's OneCycleLR defaults)."""
    cfg = _cfg(scheduler="onecycle", lr=0.1, epochs=4)
    opt = _optimizer()
    schedule = build_scheduler(opt, cfg, monitor="val_auc", patience=0, steps_per_epoch=5)
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.OneCycleLR) and schedule.per_batch
    assert schedule.scheduler.total_steps == 20
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        for _ in range(5):
            opt.step()
            schedule.after_batch()
            lrs.append(opt.param_groups[0]["lr"])
        schedule.after_epoch(0.5)  # no extra step
        assert opt.param_groups[0]["lr"] == lrs[-1]
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 5  # peak after 30 % of 20 batches (-1 step)
    # lrs[b] is the rate batch b trains with: the 20th and last batch at the floor (the step after it is unused).
    assert lrs[19] == pytest.approx(0.1 / 25 / 1e4) and lrs[18] < 0.1 * ANNEALED


def test_schedule_state_round_trip() -> None:
    cfg = _cfg(scheduler="onecycle", lr=0.1, epochs=2)
    opt = _optimizer()
    schedule = build_scheduler(opt, cfg, monitor="val_auc", patience=0, steps_per_epoch=3)
    for _ in range(2):
        opt.step()
        schedule.after_batch()
    state = schedule.state_dict()
    opt2 = _optimizer()
    again = build_scheduler(opt2, cfg, monitor="val_auc", patience=0, steps_per_epoch=3)
    again.load_state_dict(state)
    opt.step(), schedule.after_batch(), opt2.step(), again.after_batch()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert Schedule(None).state_dict() is None
    Schedule(None).load_state_dict(None)  # none: nothing to restore


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 7, 10, 15, 30])
def test_first_candidate_epoch_is_the_first_annealed_epoch(epochs: int) -> None:
    """Under one-cycle, the first epoch at whose end the learning rate has annealed below ANNEALED of the peak
    (simulated with PyTorch's own OneCycleLR); epoch 1 under every other schedule."""
    cfg = _cfg(scheduler="onecycle", lr=1.0, epochs=epochs)
    opt = _optimizer(1.0)
    # Enough batches that no epoch boundary falls within a few steps of the threshold (the closest: epoch 6 of 7).
    steps = max(100, 7000 // epochs)
    schedule = build_scheduler(opt, cfg, monitor="val_auc", patience=0, steps_per_epoch=steps)
    opt.step()  # the rates, not the weights, matter here: one optimiser step keeps the scheduler's order check quiet
    annealed, peaked = [], False
    for _ in range(epochs):
        for _ in range(steps):
            schedule.after_batch()
            peaked = peaked or opt.param_groups[0]["lr"] == pytest.approx(1.0)
        annealed.append(peaked and opt.param_groups[0]["lr"] < ANNEALED)  # annealed, not still warming up
    expected = annealed.index(True) + 1
    assert first_candidate_epoch(cfg) == expected
    assert 1 <= expected <= epochs
    for scheduler in ("cosine", "step", "plateau", "none"):
        assert first_candidate_epoch(_cfg(scheduler=scheduler, epochs=epochs)) == 1


@pytest.mark.parametrize(
    "monitor, patience, start, values, best_epoch, stops_after",
    [
        ("val_loss", 2, 1, [1.0, 0.9, 0.95, 0.96, 0.5], 2, 4),
        ("val_auc", 2, 1, [0.5, 0.7, 0.6, 0.8, 0.7, 0.7], 4, 6),
        ("val_auc", 1, 1, [math.nan, 0.6, math.nan], 2, 3),  # NaN (one-class validation set) never improves
        ("val_auc", 0, 1, [math.nan, math.nan], 1, None),  # ... but the first candidate is always the best so far
        ("val_loss", 0, 1, [1.0, 2.0, 3.0, 4.0], 1, None),  # patience 0: never stop
        # A tie goes to the later epoch (AUCs on a dozen validation scans tie often).
        ("val_auc", 0, 1, [0.8, 0.8, 0.7, 0.8], 4, None),
        ("val_loss", 0, 1, [0.5, 0.5, 0.6], 2, None),
        # Epochs before the start are no candidates and do not count towards the patience.
        ("val_auc", 0, 3, [0.9, 0.95, 0.6, 0.7], 4, None),
        ("val_auc", 1, 3, [0.9, 0.95, 0.6, 0.5, 0.4], 3, 4),
    ],
)
def test_early_stopping(monitor, patience, start, values, best_epoch, stops_after) -> None:
    stopper, stopped = EarlyStopping(monitor, patience, start), None
    for epoch, value in enumerate(values, start=1):
        improved = stopper.update(value, epoch)
        assert improved == (stopper.best_epoch == epoch)
        if stopper.should_stop:
            stopped = epoch
            break
    assert stopper.best_epoch == best_epoch
    assert stopped == stops_after


@pytest.mark.parametrize(
    "overrides, match",
    [({"optimizer": "rmsprop"}, "optimizer 'rmsprop'"), ({"scheduler": "cyclic"}, "scheduler 'cyclic'")],
)
def test_unknown_choices_are_rejected(overrides, match) -> None:
    """The config already rejects these when params.yaml is read; the recipe names them too if it ever gets one."""
    cfg = _bypass(_cfg(), **overrides)
    with pytest.raises(ConfigError, match=match):
        opt = build_optimizer([torch.nn.Parameter(torch.ones(1))], cfg)
        build_scheduler(opt, cfg, monitor="val_auc", patience=0, steps_per_epoch=1)


def _bypass(cfg, **overrides):
    """A copy of the frozen config with values its own validation would refuse."""
    import copy

    out = copy.copy(cfg)
    for key, value in overrides.items():
        object.__setattr__(out, key, value)
    return out


# ------------------------------------------------------------------------------------------- fine-tuning


def _fine_tuned(**knobs):
    """cnn21 with pre-trained-like weights (random, but the network has BatchNorm statistics to keep), its optimiser
    and schedule as the train stage builds them for ``knobs``, and one batch."""
    from spinedxa.models import get_model
    from spinedxa.recipe import build_optimizer, build_scheduler
    from spinedxa.train import fine_tuning

    torch.manual_seed(0)
    cfg = _cfg(weights="pretrained", scheduler="onecycle", epochs=4, **knobs)
    model = get_model("cnn21", 2)
    parameters, tune = fine_tuning(model, "cnn21", cfg)
    optimizer = build_optimizer(parameters, cfg)
    return model, cfg, tune, optimizer, build_scheduler(optimizer, cfg, monitor="val_auc", patience=0,
                                                        steps_per_epoch=1)


def test_the_backbone_trains_at_its_factor_of_the_rate() -> None:
    model, cfg, _, optimizer, _ = _fine_tuned(backbone_lr_factor=0.1)
    backbone, head = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.fc.parameters()}  # the head rule's layers
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    # One-cycle peaks at lr x factor for the backbone, lr for the head (warm-up starts at a 25th of each).
    assert backbone["max_lr"] == pytest.approx(cfg.lr * 0.1) and head["max_lr"] == pytest.approx(cfg.lr)
    assert backbone["lr"] == pytest.approx(head["lr"] * 0.1)
    _, _, tune, default, _ = _fine_tuned()
    assert len(default.param_groups) == 1 and not tune.backbone  # defaults: one group, nothing frozen


def test_frozen_warm_up_steps_the_head_only_and_frozen_batchnorm_keeps_its_statistics() -> None:
    from spinedxa.loop import Session, train_one_epoch
    from spinedxa.models import get_spec
    from spinedxa.recipe import EarlyStopping
    from spinedxa.runtime import FastPath, Runtime, Distributed

    model, cfg, tune, optimizer, schedule = _fine_tuned(freeze_epochs=1, bn_mode="frozen")
    rt = Runtime(torch.device("cpu"), FastPath("fp32"), 1, Distributed())
    batches = [(torch.rand(4, 1, 64, 32), torch.tensor([0, 1, 0, 1]))]
    session = Session(model, optimizer, schedule, None, EarlyStopping("val_auc", 0), fine_tune=tune)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def changed() -> set[str]:
        return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    session.epoch = 1  # the frozen warm-up
    train_one_epoch(model, get_spec("cnn21"), batches, torch.nn.CrossEntropyLoss(), session, rt)
    assert changed() == {"fc.weight", "fc.bias"}  # no backbone weight, no BatchNorm statistic moved
    session.epoch = 2
    train_one_epoch(model, get_spec("cnn21"), batches, torch.nn.CrossEntropyLoss(), session, rt)
    moved = changed()
    assert any(k.endswith(".weight") and not k.startswith("fc.") for k in moved)  # now the backbone tunes
    assert not any(k.endswith(("running_mean", "running_var")) for k in moved)  # with its statistics kept
