"""Tests for spinedxa.loop: one epoch of training and of evaluation, the fit loop and its resume, and the numerics of
the fast paths against plain fp32."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.models.inception import InceptionOutputs

from spinedxa import checkpoint, loop
from spinedxa.loop import CURVE_COLUMNS, Batches, FitPlan, Session, cpu_state, evaluate_epoch, fit, train_one_epoch
from spinedxa.models import get_model, get_spec
from spinedxa.recipe import AUX_LOSS_WEIGHT, EarlyStopping, Schedule, build_scheduler, criterion
from spinedxa.runtime import FP32, Distributed, FastPath, Runtime, cpu_has_native_bf16, select_fast_path
from train_factory import BF16_EPS, CPU, ROI_SHAPE, make_params

SPEC = get_spec("cnn21")
#: The AVX2 fast path, which every x86-64 CPU can take (what select_fast_path gives without native bf16).
FP32_CHANNELS_LAST = FastPath("cpu_fp32_channels_last", True, fused_optimizer=True)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the stage runs (train.threads: 1): fast on a shared 2-core machine, and the
    measured tolerances below were taken with it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def textures(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ROI-shaped images in [0, 1] (about), labels alternating 0/1; class 0 has horizontal stripes."""
    g = torch.Generator().manual_seed(seed)
    h, w = ROI_SHAPE
    x, y = torch.rand(n, 1, h, w, generator=g), torch.arange(n) % 2
    x[y == 0] += 0.25 * torch.sin(torch.arange(h) * 2 * math.pi / 6)[:, None]
    return x, y


def runtime(fast: FastPath = FP32) -> Runtime:
    return Runtime(CPU, fast, torch.get_num_threads(), Distributed())


def network(fast: FastPath = FP32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get_model("cnn21", 2)
    return model.to(memory_format=torch.channels_last) if fast.channels_last else model


def loss_for(y: torch.Tensor, smoothing: float = 0.0) -> nn.CrossEntropyLoss:
    return criterion(y.tolist(), 2, class_weighting=True, label_smoothing=smoothing, device=CPU)


def batches(x: torch.Tensor, y: torch.Tensor, batch: int = 4, seed: int = 0) -> Batches:
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return Batches(DataLoader(ds, batch_size=batch, sampler=sampler, generator=generator),
                   DataLoader(ds, batch_size=batch), sampler, generator)


def session(model: nn.Module, *, lr: float = 0.01, schedule: Schedule | None = None,
            stopper: EarlyStopping | None = None) -> Session:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Session(model, optimizer, schedule or Schedule(None), None, stopper or EarlyStopping("val_loss", 0))


def onecycle_session(model: nn.Module, epochs: int, steps_per_epoch: int) -> Session:
    cfg = make_params(cnn21={"epochs": epochs, "scheduler": "onecycle", "lr": 0.01}).train.cnn21
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    schedule = build_scheduler(optimizer, cfg, monitor="val_auc", patience=0, steps_per_epoch=steps_per_epoch)
    return Session(model, optimizer, schedule, None, EarlyStopping("val_auc", 0))


# ------------------------------------------------------------------------------------------- one epoch


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_evaluate_epoch_weights_the_loss_over_the_whole_set(smoothing: float) -> None:
    """val_loss is the class-weighted mean over all images whatever the batch size (not a mean of batch means),
    without the label smoothing the training loss uses."""
    x, _ = textures(n=6)
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    model, loss_fn = network(), loss_for(y, smoothing)
    results = [evaluate_epoch(model, SPEC, DataLoader(TensorDataset(x, y), batch_size=b), loss_fn, runtime())
               for b in (2, 4, 6)]
    assert not model.training
    with torch.no_grad():
        logits = model(x)
    expected = float(nn.CrossEntropyLoss(weight=loss_fn.weight)(logits, y))
    assert [r["val_loss"] for r in results] == pytest.approx([expected] * 3, rel=1e-5)
    p = torch.softmax(logits, 1)[:, 1].numpy()
    assert results[0]["val_accuracy"] == pytest.approx(float(np.mean((p >= 0.5) == y.numpy())))
    assert 0.0 <= results[0]["val_auc"] <= 1.0


def test_evaluate_epoch_auc_is_nan_for_one_class() -> None:
    x, _ = textures(n=4)
    y = torch.zeros(4, dtype=torch.long)
    loss_fn = criterion([0, 1], 2, class_weighting=False, label_smoothing=0.0, device=CPU)
    result = evaluate_epoch(network(), SPEC, DataLoader(TensorDataset(x, y), batch_size=4), loss_fn, runtime())
    assert math.isnan(result["val_auc"]) and math.isfinite(result["val_loss"])


def test_train_one_epoch_counts_images_moves_the_weights_and_steps_per_batch() -> None:
    x, y = textures(n=10)
    model = network()
    s = onecycle_session(model, epochs=2, steps_per_epoch=3)
    before = copy.deepcopy(model.state_dict())
    total, count = train_one_epoch(model, SPEC, DataLoader(TensorDataset(x, y), batch_size=4), loss_for(y), s,
                                   runtime())
    assert count == 10 and math.isfinite(total) and total > 0
    assert model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and any(k.endswith("weight") for k in changed)
    assert s.schedule.scheduler.last_epoch == 3  # one-cycle stepped once per batch (10 images / 4 = 3 batches)


class _WithAux(nn.Module):
    """Returns InceptionV3's training output (logits and auxiliary logits) from two linear heads."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.aux = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> InceptionOutputs:
        x = x.flatten(1)
        return InceptionOutputs(self.main(x), self.aux(x))


def test_train_one_epoch_adds_the_auxiliary_loss() -> None:
    torch.manual_seed(0)
    model, x, y = _WithAux(), torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 1])
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        out = model(x)
        expected = float(loss_fn(out.logits, y) + AUX_LOSS_WEIGHT * loss_fn(out.aux_logits, y)) * 3
    s = session(model, lr=0.0)
    total, count = train_one_epoch(model, get_spec("inception_v3"), DataLoader(TensorDataset(x, y), batch_size=3),
                                   loss_fn, s, runtime())
    assert count == 3 and total == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------- fit


def test_fit_trains_logs_and_checkpoints_every_epoch(tmp_path: Path) -> None:
    x, y = textures()
    model, data = network(), batches(x, y)
    s = session(model)
    rows, saved = [], []

    def on_epoch(sess: Session, row: dict) -> None:
        rows.append(row)
        saved.append(checkpoint.load(tmp_path / "last.pt", "f" * 64)["epoch"])  # written before the callback

    plan = FitPlan(3, "val_loss", tmp_path / "last.pt", "f" * 64, fold=2)
    fit(model, SPEC, data, loss_for(y), s, runtime(), plan, on_epoch=on_epoch)
    assert [r["epoch"] for r in s.history] == [1, 2, 3] and rows == s.history and saved == [1, 2, 3]
    assert all(tuple(r) == CURVE_COLUMNS and r["fold"] == 2 for r in s.history)
    ckpt = checkpoint.load(tmp_path / "last.pt", "f" * 64)
    assert ckpt["epoch"] == 3 and ckpt["history"] == s.history and len(ckpt["rng"]) == 1
    # The best epoch's weights are kept (patience 0: never stops; the best is the lowest val_loss, ties later).
    losses = [r["val_loss"] for r in s.history]
    best = max(i for i, v in enumerate(losses, start=1) if v == min(losses))
    assert s.stopper.best_epoch == best and s.best_state is not None
    if best == 3:
        assert all(torch.equal(v, cpu_state(model)[k]) for k, v in s.best_state.items())
    # fit continues from session.epoch: a finished session trains no further.
    fit(model, SPEC, data, loss_for(y), s, runtime(), plan)
    assert len(s.history) == 3


def test_fit_stops_when_early_stopping_says_so(tmp_path: Path) -> None:
    x, y = textures()
    model, data = network(), batches(x, y)
    # A best no epoch can beat (val_loss < 0): patience 1 stops after the first epoch.
    s = session(model, stopper=EarlyStopping("val_loss", 1, best=-1.0, best_epoch=1))
    fit(model, SPEC, data, loss_for(y), s, runtime(), FitPlan(5, "val_loss", tmp_path / "last.pt", "f" * 64))
    assert len(s.history) == 1 and s.stopper.should_stop and s.best_state is None


def test_checkpoints_follow_the_interval_and_skip_the_last_epoch(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint_every_s 10 with epochs of 4 s (a fake clock): the first checkpoint after the epoch that ends 12 s
    in (epoch 4), none after the last epoch (epoch 5: its caller keeps the result)."""
    x, y = textures()
    model, data = network(), batches(x, y)
    s, clock, saved = session(model), {"now": 0.0}, []
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock["now"], perf_counter=time.perf_counter))

    def on_epoch(sess: Session, row: dict) -> None:
        last = checkpoint.load(tmp_path / "last.pt", "f" * 64)
        saved.append(None if last is None else last["epoch"])
        clock["now"] += 4.0

    plan = FitPlan(5, "val_loss", tmp_path / "last.pt", "f" * 64, checkpoint_every_s=10.0)
    fit(model, SPEC, data, loss_for(y), s, runtime(), plan, on_epoch=on_epoch)
    assert len(s.history) == 5 and saved == [None, None, None, 4, 4]


def test_a_fit_without_a_checkpoint_path_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay and pretraining never resume a fit: ``checkpoint=None`` writes nothing."""
    x, y = textures()
    model, data = network(), batches(x, y)
    s = session(model)
    monkeypatch.chdir(tmp_path)
    fit(model, SPEC, data, loss_for(y), s, runtime(), FitPlan(2, "val_loss", None, "f" * 64))
    assert len(s.history) == 2 and s.best_state is not None and not any(tmp_path.iterdir())


def test_cpu_state_is_a_detached_copy() -> None:
    model = network()
    state = cpu_state(model)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert not torch.equal(state["fc.weight"], model.fc.weight)
    assert all(v.is_contiguous() and not v.requires_grad for v in state.values())


def test_onecycle_rates_step_per_batch_through_fit(tmp_path: Path) -> None:
    """The ``lr`` column is each epoch's starting rate; one-cycle moves it once per training batch."""
    x, y = textures(n=12)
    model, data = network(), batches(x, y, batch=4)  # 3 batches per epoch
    s = onecycle_session(model, epochs=3, steps_per_epoch=len(data.train))
    fit(model, SPEC, data, loss_for(y), s, runtime(), FitPlan(3, "val_auc", tmp_path / "last.pt", "f" * 64))
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01), max_lr=0.01, total_steps=9, pct_start=0.3)
    expected = []
    for step in range(9):
        if step % 3 == 0:
            expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [r["lr"] for r in s.history] == pytest.approx(expected, rel=1e-12)


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 2])
def test_killed_fit_resumes_to_the_same_weights(tmp_path: Path, kill_after: int) -> None:
    """Resume restores the weights, optimiser, one-cycle schedule, early stopping, history and every RNG (dropout,
    the sampler's shuffle): the resumed fit ends with bit-identical weights."""
    x, y = textures()
    plan = FitPlan(3, "val_auc", tmp_path / "last.pt", "f" * 64)

    def start() -> tuple[nn.Module, Batches, Session]:
        torch.manual_seed(5)
        model, data = network(seed=5), batches(x, y, seed=5)
        return model, data, onecycle_session(model, epochs=3, steps_per_epoch=len(data.train))

    model, data, s = start()
    fit(model, SPEC, data, loss_for(y), s, runtime(), plan)
    uninterrupted, history = cpu_state(model), s.history
    plan.checkpoint.unlink()

    def kill(sess: Session, row: dict) -> None:
        if sess.epoch == kill_after:
            raise Killed

    model, data, s = start()
    with pytest.raises(Killed):
        fit(model, SPEC, data, loss_for(y), s, runtime(), plan, on_epoch=kill)
    # A new process: fresh objects (other weights, other RNG positions), then the checkpoint.
    torch.manual_seed(123)
    model, data, s = start()
    torch.manual_seed(456)
    s.restore(checkpoint.load(plan.checkpoint, plan.fingerprint), 0, data.generator)
    assert s.epoch == kill_after
    fit(model, SPEC, data, loss_for(y), s, runtime(), plan)
    resumed = cpu_state(model)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    drop = [c for c in CURVE_COLUMNS if c != "seconds"]
    assert [[r[c] for c in drop] for r in s.history] == [[r[c] for c in drop] for r in history]


# ------------------------------------------------------------------------------------------- fast paths


def _trajectory(path: FastPath, seed: int, x: torch.Tensor, y: torch.Tensor):
    """From the same initial weights: one forward loss and its gradient, then 5 epochs of SGD (20 steps) with the
    same dropout masks, and the validation metrics after them."""
    model, loss_fn, rt = network(path, seed=seed), loss_for(y), runtime(path)
    torch.manual_seed(100)
    model.train()
    with path.autocast(CPU):
        logits, _ = SPEC.unwrap(model(path.to_input(x, CPU)))
    assert logits.dtype == (path.autocast_dtype or torch.float32)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    s = session(model)
    losses = []
    for epoch in range(5):
        torch.manual_seed(200 + epoch)
        total, count = train_one_epoch(model, SPEC, DataLoader(TensorDataset(x, y), batch_size=4), loss_fn, s, rt)
        losses.append(total / count)
    val = evaluate_epoch(model, SPEC, DataLoader(TensorDataset(x, y), batch_size=16), loss_fn, rt)
    return float(loss.detach()), grad, np.array(losses), val


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX / ARM BF16): "
                    "its fast path is fp32 + channels_last, and bf16 would only be emulated")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_fast_path_tracks_fp32(seed: int) -> None:
    """The fast path this CPU takes (bf16 autocast + channels_last) against fp32, from the same initial weights.

    bf16 keeps 8 significant bits, so each rounding moves an operand by at most BF16_EPS = 2^-8 relative; autocast
    rounds only the operands of convolutions and linear layers and accumulates in fp32, and the loss is computed in
    fp32 (loop.train_one_epoch). Tolerances:
    - the loss of one forward pass within BF16_EPS = 3.9e-3: a mean over many products, its rounding errors mostly
      cancel (measured 2.5e-4..5.4e-4 relative, AMD EPYC Zen 4 with AVX512-BF16, 1 thread, seeds 0-2);
    - the gradient's direction within cosine 0.99 (8 degrees): backward goes through four bf16 convolutions, so
      per-element errors compound, but a step follows the direction (measured 0.9981..0.9984);
    - five epochs of SGD (20 steps) and the validation loss after them within 2 x BF16_EPS = 7.8e-3 (measured
      trajectory <= 2.1e-3, val_loss <= 1.9e-3).
    """
    fast = select_fast_path(CPU, True)
    assert fast.autocast_dtype is torch.bfloat16 and fast.channels_last
    x, y = textures(seed=seed)
    loss32, grad32, traj32, val32 = _trajectory(FP32, seed, x, y)
    loss16, grad16, traj16, val16 = _trajectory(fast, seed, x, y)
    assert loss16 == pytest.approx(loss32, rel=BF16_EPS)
    assert float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0)) >= 0.99
    np.testing.assert_allclose(traj16, traj32, rtol=2 * BF16_EPS)
    assert val16["val_loss"] == pytest.approx(val32["val_loss"], rel=2 * BF16_EPS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_channels_last_tracks_fp32(seed: int) -> None:
    """The AVX2 fast path (fp32, channels_last) changes only the order of fp32 reductions (oneDNN's NHWC kernels),
    so it costs no accuracy. Runs on every CPU.

    fp32's unit roundoff is 2^-24 = 6e-8; reordering a convolution's or a weight gradient's sums moves a result by
    ~1e-7..1e-6 relative. Tolerances (measured on an AMD EPYC Zen 4, 1 thread, seeds 0-2):
    - one forward loss within 1e-5 (measured <= 4.2e-7; bf16 is 2.5e-4..5.4e-4 off, so this tells the two apart);
    - the gradient's direction within cosine 1 - 1e-5 (measured 1 to rounding; bf16: 0.998);
    - 20 SGD steps and the validation loss after them within 1e-3: near chance level the losses are flat and the
      steps amplify the reordering (measured up to 1.8e-4 on the trajectory, 4.4e-5 on val_loss).
    """
    x, y = textures(seed=seed)
    loss32, grad32, traj32, val32 = _trajectory(FP32, seed, x, y)
    loss_cl, grad_cl, traj_cl, val_cl = _trajectory(FP32_CHANNELS_LAST, seed, x, y)
    assert loss_cl == pytest.approx(loss32, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(grad32, grad_cl, dim=0)) >= 1 - 1e-5
    np.testing.assert_allclose(traj_cl, traj32, rtol=1e-3)
    assert val_cl["val_loss"] == pytest.approx(val32["val_loss"], rel=1e-3)
