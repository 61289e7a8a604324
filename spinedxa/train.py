"""Training of one model: data, loss, optimiser, schedule, early stopping, checkpoints, fast paths, DDP, outputs.

:func:`train_model` is the whole ``train@<model>`` stage. It

- trains on the training split plus its offline augmented copies (optionally augmented again on the fly) and
  monitors the validation split (``train.monitor``: ``val_loss`` or ``val_auc``), stopping after ``train.patience``
  epochs without improvement and keeping the best epoch's weights;
- weights the cross-entropy by inverse class frequency (``train.class_weighting``; the cohort is 114 osteoporosis
  to 60 normal), adds InceptionV3's auxiliary loss with weight 0.4 (Szegedy et al. 2016, "Rethinking the Inception
  Architecture", section 4; torchvision's reference recipe uses the same 0.4);
- is reproducible: the same params give bit-identical weights on CPU (seeded torch/numpy/python RNGs, a seeded
  sampler and loader generator, deterministic algorithms), and a killed run resumes from its last checkpoint to the
  same result. A checkpoint carries a fingerprint of everything that determines the result (the model's params
  block, the common train params, augment params, classes, data digests, world size); any other fingerprint is
  ignored, with a warning, never resumed. A finished training removes its checkpoint, so a rerun (for instance after
  a code change, which the fingerprint cannot see) trains afresh;
- takes a fast path when ``train.fast`` is true (see :func:`select_fast_path`) and records which one ran;
- runs under ``torchrun`` as DDP when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA); rank 0 writes every output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from spinedxa import tracking
from spinedxa.augment import build_transform
from spinedxa.config import ConfigError, ModelTrainConfig, Params
from spinedxa.data import DXADataset, load_split, load_training_items
from spinedxa.files import atomic_dir, atomic_path, sha256_file, write_json_atomic, write_text_atomic
from spinedxa.models import ModelSpec, get_model, get_spec

log = logging.getLogger(__name__)

#: Weight of InceptionV3's auxiliary classifier loss (Szegedy et al. 2016, section 4; torchvision reference recipe).
AUX_LOSS_WEIGHT = 0.4
#: SGD momentum: the standard 0.9 of the ImageNet recipes (He et al. 2016; torchvision's reference train.py).
SGD_MOMENTUM = 0.9
#: Step schedule: divide the learning rate by 10 three times over the run (the ResNet recipe, He et al. 2016).
STEP_GAMMA = 0.1
STEP_DIVISIONS = 3
#: Plateau schedule: divide by 10 after half the early-stopping patience, so the rate drops before training stops.
PLATEAU_FACTOR = 0.1
#: Training-curve columns (docs/CONTRACTS.md).
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds")
#: The train params every model shares (dvc.yaml lists them per train stage); all enter the checkpoint fingerprint.
COMMON_TRAIN_KEYS = ("seed", "device", "fast", "threads", "class_weighting", "monitor", "patience", "num_workers")
CHECKPOINT_FILE = "last.pt"
#: Environment variable that overrides ``train.threads`` (Snakemake sets it per job from its thread count).
THREADS_ENV = "SPINEDXA_THREADS"
#: CPU feature flags (/proc/cpuinfo) meaning native bf16 arithmetic: x86 AVX512-BF16 or AMX-BF16, ARM BF16.
#: Without them oneDNN emulates bf16 (AVX-512 only) or has no bf16 kernels at all (AVX2), slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class TrainPaths:
    """The stage's inputs and outputs, exactly as dvc.yaml passes them (repo-relative)."""

    splits: Path
    images: Path
    augmented: Path
    out: Path
    curves: Path
    checkpoints: Path


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` did (the same on every rank; ``run_id`` is None off rank 0)."""

    model: str
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]]
    fast_path: str
    resumed_from: int
    run_id: str | None


# ------------------------------------------------------------------------------------------- hardware, fast paths


@dataclass(frozen=True)
class FastPath:
    """How the training step runs: memory format, autocast dtype, gradient scaling.

    Attributes:
        name: recorded in meta.json and MLflow: ``fp32``, ``cpu_fp32_channels_last``, ``cpu_bf16_channels_last``,
            ``cuda_amp_bf16`` or ``cuda_amp_fp16``.
        channels_last: model and input in NHWC (oneDNN / cuDNN prefer it for convolutions).
        autocast_dtype: mixed-precision dtype, or None for fp32.
        grad_scaler: use ``torch.amp.GradScaler`` (fp16 gradients underflow without it).
        fused_optimizer: the optimiser's fused kernel (one pass over all parameters). PyTorch's default on CPU is a
            per-tensor loop: for VGG-16's 134 M parameters an Adam step took 1.6 s against 0.15 s fused (measured
            here, 1 thread), a fifth of a whole training step at 96 px and batch 16.
    """

    name: str
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False
    fused_optimizer: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for ``device`` (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def to_input(self, x: Tensor, device: torch.device) -> Tensor:
        """Move a batch to ``device`` in this path's memory format."""
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


FP32 = FastPath("fp32")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """CPU feature flags (x86 ``flags``, ARM ``Features``) of the first CPU; empty where /proc/cpuinfo is absent."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: report no flags, so no feature-dependent path is taken
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when oneDNN has bf16 kernels here and the CPU computes bf16 natively (not emulated)."""
    flags = cpu_flags() if flags is None else flags
    return _onednn_bf16() and bool(NATIVE_BF16_FLAGS & flags)


def _onednn_bf16() -> bool:
    """oneDNN's own bf16 check. It is also true on plain AVX-512, where bf16 is emulated by conversion and slower
    than fp32: :func:`cpu_has_native_bf16` therefore also asks for a native bf16 flag."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def select_fast_path(device: torch.device, enabled: bool, flags: frozenset[str] | None = None) -> FastPath:
    """Choose the training fast path for ``device`` (``train.fast``).

    - disabled: plain fp32, contiguous, the optimiser's default (per-tensor) implementation;
    - CUDA: autocast bf16 where the GPU supports it (no scaler needed), else fp16 with a GradScaler; channels_last;
    - CPU with native bf16 (AVX512-BF16 / AMX / ARM BF16): bf16 autocast + channels_last;
    - other CPUs (e.g. AVX2): fp32 with channels_last, which oneDNN's fp32 convolutions also prefer (bf16 autocast
      ran 5x slower than fp32 on the AVX2 development machine).
    Every fast path uses the fused optimiser. bench/train_throughput.py measures the result against a plain fp32
    loop (AVX2, 1 thread: 1.15-1.35x per CPU-second for the five models; reports/bench/train.json).
    """
    if not enabled:
        return FP32
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return FastPath("cuda_amp_bf16", True, torch.bfloat16, fused_optimizer=True)
        return FastPath("cuda_amp_fp16", True, torch.float16, grad_scaler=True, fused_optimizer=True)
    if cpu_has_native_bf16(flags):
        return FastPath("cpu_bf16_channels_last", True, torch.bfloat16, fused_optimizer=True)
    return FastPath("cpu_fp32_channels_last", True, fused_optimizer=True)


def resolve_threads(configured: int, *, local_world_size: int = 1, env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads: ``$SPINEDXA_THREADS`` when set, else ``train.threads``, else (0) this process's share of cores.

    Raises:
        ValueError: ``SPINEDXA_THREADS`` is not a positive integer.
        ConfigError: ``train.threads`` is negative.
    """
    env = os.environ if env is None else env
    raw = env.get(THREADS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
        return int(raw)
    if configured < 0:
        raise ConfigError(f"train.threads: {configured} must be >= 0 (0 = all cores)")
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)  # DDP processes on one machine share its cores


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto | cpu | cuda) to a torch device; the local rank picks the GPU under DDP.

    Raises:
        RuntimeError: ``cuda`` asked for and no CUDA device is available.
    """
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if setting == "cuda":
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world size 1 when run plainly)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Distributed":
        """Read ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` as torchrun sets them.

        Raises:
            ValueError: a variable is not an integer, or the ranks are inconsistent.
        """
        env = os.environ if env is None else env
        values = {}
        for key, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
            raw = env.get(key)
            if raw is None:
                values[key] = default
                continue
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None
        world = values["WORLD_SIZE"]
        local_world = values["LOCAL_WORLD_SIZE"] if values["LOCAL_WORLD_SIZE"] is not None else world
        if world < 1 or not 0 <= values["RANK"] < world:
            raise ValueError(f"inconsistent torchrun environment: RANK={values['RANK']} WORLD_SIZE={world}")
        return cls(world, values["RANK"], values["LOCAL_RANK"], local_world)


@contextlib.contextmanager
def process_group(ctx: Distributed, device: torch.device) -> Iterator[None]:
    """Initialise the DDP process group (NCCL on CUDA, gloo on CPU) for the block; a no-op for one process."""
    if not ctx.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _broadcast(ctx: Distributed, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity for one process)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(ctx: Distributed, obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------------------------------- data digests


def dvc_md5(path: str | Path) -> str:
    """The hash DVC 3 records in dvc.lock for ``path``: md5 of a file, or ``<md5>.dir`` of a directory.

    Delegates to :func:`spinedxa.dag.dvc_hash` (DVC's own hashing, with the repository's ``.dvcignore`` applied, so
    Snakemake's ``.snakemake_timestamp`` markers do not change the digest), run from the repository root.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from spinedxa.dag import dvc_hash

    return dvc_hash(path)


def display_path(path: Path) -> str:
    """``path`` relative to the working directory (the repo root), else its name: never an absolute path, which
    could name a person (a home directory), in meta.json or MLflow."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


def data_digests(paths: TrainPaths) -> dict[str, str]:
    """DVC hashes of the training inputs, keyed by their repo-relative paths (meta.json ``data_digests``)."""
    return {display_path(p): dvc_md5(p) for p in (paths.splits, paths.images, paths.augmented)}


def fingerprint(params: Params, model: str, digests: Mapping[str, str], world_size: int) -> str:
    """sha256 of everything that determines a training's result; a checkpoint resumes only under the same one."""
    train = params.train
    blob = {
        "model": model,
        "block": dataclasses.asdict(train.model(model)),
        "train": {key: getattr(train, key) for key in COMMON_TRAIN_KEYS},
        "augment": dataclasses.asdict(params.augment),
        "classes": list(params.data.classes),
        "data": dict(sorted(digests.items())),
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit hash, or ``unknown`` (with a warning) outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        log.warning("git commit unknown (%s); recording 'unknown'", exc)
        return "unknown"
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------- loss, optimiser, schedule


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


def build_optimizer(parameters: Any, cfg: ModelTrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum 0.9, Nesterov) with ``cfg.lr`` and ``cfg.weight_decay``.

    Args:
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ModelTrainConfig, *, monitor: str, patience: int
) -> Any:
    """The per-epoch learning-rate schedule ``cfg.scheduler``, or None for ``none``.

    cosine: anneals to 0 over ``cfg.epochs`` (Loshchilov & Hutter 2017, without restarts); step: / 10 every
    ``epochs // 3`` epochs; plateau: / 10 when the monitored value has not improved for ``patience // 2`` epochs.
    """
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    if cfg.scheduler == "step":
        step = max(1, cfg.epochs // STEP_DIVISIONS)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=STEP_GAMMA)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=_mode(monitor), factor=PLATEAU_FACTOR, patience=max(1, patience // 2)
        )
    if cfg.scheduler == "none":
        return None
    raise ConfigError(f"scheduler {cfg.scheduler!r} is not one of ['cosine', 'step', 'plateau', 'none']")


def _mode(monitor: str) -> str:
    return "max" if monitor == "val_auc" else "min"


@dataclass
class EarlyStopping:
    """Tracks the best monitored value; ``should_stop`` after ``patience`` epochs without improvement (0: never)."""

    monitor: str
    patience: int
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s monitored value; return True when it is the new best.

        The first epoch is always the best so far; a NaN (e.g. AUC on a one-class validation set) never improves.
        """
        better = value < self.best if _mode(self.monitor) == "min" else value > self.best
        if self.best_epoch == 0 or (math.isfinite(value) and (not math.isfinite(self.best) or better)):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience


# ------------------------------------------------------------------------------------------- RNG and checkpoints


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the training draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "loader": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached"])
    )
    random.setstate(_as_tuple(state["python"]))
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` needs the tuple it gave)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically: a kill during the write leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when its fingerprint matches; None (with a warning) when absent or stale.

    Raises:
        RuntimeError: the file exists but cannot be read as a checkpoint (the message names it).
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise RuntimeError(f"{path}: not a readable checkpoint ({exc}); delete it to train from scratch") from exc
    found = state.get("fingerprint") if isinstance(state, dict) else None
    if found != expected_fingerprint:
        log.warning(
            "ignoring checkpoint %s: its fingerprint %s does not match this training's %s "
            "(params or data changed); training from scratch",
            path, str(found)[:12], expected_fingerprint[:12],
        )
        return None
    return state


# ------------------------------------------------------------------------------------------- epochs


def _raw(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous CPU copy of the model's state dict (independent of later training steps)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _raw(model).state_dict().items()}


def train_one_epoch(
    model: nn.Module,
    spec: ModelSpec,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    fast: FastPath,
    *,
    desc: str,
    show_progress: bool,
) -> tuple[float, int]:
    """One pass over ``loader``; returns (sum of per-image losses, number of images) on this process."""
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, leave=False, disable=not show_progress):
        x, y = fast.to_input(x, device), y.to(device, non_blocking=True)
        with fast.autocast(device):
            logits, aux = spec.unwrap(model(x))
            # The loss in fp32: autocast would otherwise compute the softmax of fp16 logits.
            loss = criterion(logits.float(), y)
            if aux is not None:
                loss = loss + AUX_LOSS_WEIGHT * criterion(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total, count


@torch.no_grad()
def evaluate_epoch(
    model: nn.Module, spec: ModelSpec, loader: DataLoader, criterion: nn.Module, device: torch.device, fast: FastPath
) -> dict[str, float]:
    """Validation ``val_loss`` (class-weighted like training), ``val_auc`` (NaN for one class) and ``val_accuracy``."""
    model.eval()
    weighted, weight_sum, probs, labels = 0.0, 0.0, [], []
    per_image = nn.CrossEntropyLoss(weight=criterion.weight, reduction="none")
    for x, y in loader:
        x, y = fast.to_input(x, device), y.to(device)
        with fast.autocast(device):
            logits, _ = spec.unwrap(model(x))
        logits = logits.float()
        # Weighted mean over the whole set (sum w_y * loss / sum w_y), as CrossEntropyLoss does within a batch.
        weighted += float(per_image(logits, y).sum())
        weight_sum += float(criterion.weight[y].sum()) if criterion.weight is not None else len(y)
        probs.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        labels.append(y.cpu())
    p, t = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    auc = float(roc_auc_score(t, p)) if len(np.unique(t)) == 2 else math.nan
    return {"val_loss": weighted / weight_sum, "val_auc": auc, "val_accuracy": float(np.mean((p >= 0.5) == t))}


# ------------------------------------------------------------------------------------------- the stage


def _mlflow_params(params: Params, model: str, threads: int, world: int, n_train: int, n_val: int) -> dict[str, Any]:
    train = params.train
    out: dict[str, Any] = {"model": model, **dataclasses.asdict(train.model(model))}
    out.update({f"train.{k}": getattr(train, k) for k in COMMON_TRAIN_KEYS})
    out.update({f"augment.{k}": v for k, v in dataclasses.asdict(params.augment).items()})
    out.update({"threads_used": threads, "world_size": world, "n_train_images": n_train, "n_val_images": n_val})
    return out


def _curves_csv(history: Sequence[Mapping[str, float]]) -> str:
    buf = io.StringIO()
    pd.DataFrame(list(history), columns=list(CURVE_COLUMNS)).to_csv(buf, index=False)
    return buf.getvalue()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train_model(
    params: Params,
    model_name: str,
    paths: TrainPaths,
    *,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model_name`` and write its outputs (rank 0): model.pt, meta.json, curves CSV, MLflow run.

    Args:
        params: the typed params.
        model_name: one of ``train.models``.
        paths: inputs and outputs as dvc.yaml passes them.
        on_epoch_end: called with the epoch number after each epoch's checkpoint is written (on every rank), e.g.
            to stop a training early in tests; an exception it raises propagates and leaves the checkpoint behind.

    Raises:
        ConfigError: a train param does not fit this model or world size (the message names the key).
        FileNotFoundError, ValueError: missing or malformed input data (the message names the file).
    """
    ctx = Distributed.from_env()
    train, cfg = params.train, params.train.model(model_name)
    spec = get_spec(model_name)
    if cfg.image_size < spec.min_size:
        raise ConfigError(
            f"train.{model_name}.image_size: {cfg.image_size} is below the model's minimum of {spec.min_size} px"
        )
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.{model_name}.batch_size: {cfg.batch_size} is not divisible by the DDP world size {ctx.world_size}"
        )
    device = resolve_device(train.device, ctx.local_rank)
    if device.type == "cuda":
        # cuBLAS needs this for deterministic results (CUDA docs, "Reproducibility"); set before cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    threads = resolve_threads(train.threads, local_world_size=ctx.local_world_size)
    torch.set_num_threads(threads)
    fast = select_fast_path(device, train.fast)
    with process_group(ctx, device):
        return _train(params, model_name, paths, ctx, device, fast, threads, on_epoch_end)


@dataclass
class _Session:
    """The mutable state of one training: everything a checkpoint saves and a resume restores."""

    model: nn.Module  # the bare module, not its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    stopper: EarlyStopping
    generator: torch.Generator
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    run_id: str | None = None

    def checkpoint(self, fp: str, rng: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The checkpoint of the epoch just finished (``rng``: every rank's RNG states, in rank order)."""
        return {
            "fingerprint": fp, "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "early_stopping": dataclasses.asdict(self.stopper), "best_state": self.best_state,
            "history": self.history, "rng": rng, "mlflow_run_id": self.run_id,
        }

    def restore(self, ckpt: Mapping[str, Any], rank: int) -> None:
        """Continue from ``ckpt`` (this rank's RNG states included)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.stopper = EarlyStopping(**ckpt["early_stopping"])
        self.epoch, self.history, self.best_state = ckpt["epoch"], list(ckpt["history"]), ckpt["best_state"]
        self.run_id = ckpt["mlflow_run_id"]
        _set_rng_state(ckpt["rng"][rank], self.generator)

    def end_epoch(self, metrics: Mapping[str, float], monitor: str) -> None:
        """Early-stopping bookkeeping (keeping the best weights) and the schedule's step."""
        if self.stopper.update(metrics[monitor], self.epoch):
            self.best_state = _cpu_state(self.model)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics[monitor])
        elif self.scheduler is not None:
            self.scheduler.step()


@dataclass(frozen=True)
class _Loaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler
    generator: torch.Generator


def _make_loaders(params: Params, name: str, paths: TrainPaths, ctx: Distributed, device: torch.device) -> _Loaders:
    """Training (offline copies included, online augmentation if on) and validation loaders for this rank."""
    cfg, seed, classes = params.train.model(name), params.train.seed, params.data.classes
    transform = build_transform(params.augment) if params.augment.online else None
    train_items = load_training_items(paths.splits, paths.images, paths.augmented, classes)
    val_items = load_split(paths.splits, paths.images, "val", classes)
    if not train_items or not val_items:
        raise ValueError(
            f"{paths.splits}: {len(train_items)} training and {len(val_items)} validation images; both must be > 0"
        )
    train_ds = DXADataset(train_items, cfg.image_size, transform=transform)
    val_ds = DXADataset(val_items, cfg.image_size)
    # DistributedSampler also for one process: its permutation depends only on (seed, epoch), so a resumed run
    # draws the same batches, and a DDP run's global batches are the one-process batches split across ranks.
    per_process = cfg.batch_size // ctx.world_size
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + ctx.rank)  # seeds the loader's worker processes (num_workers > 0)
    loader = DataLoader(
        train_ds, batch_size=per_process, sampler=sampler, num_workers=params.train.num_workers, generator=generator,
        pin_memory=device.type == "cuda",
        # A last batch of one image gives BatchNorm no batch statistics (InceptionV3's aux head fails): drop it.
        drop_last=len(sampler) % per_process == 1,
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=params.train.num_workers)
    return _Loaders(loader, val_loader, sampler, generator)


def _make_model(name: str, cfg: ModelTrainConfig, n_classes: int, ctx: Distributed, device: torch.device,
                fast: FastPath) -> tuple[nn.Module, nn.Module]:
    """The model on ``device`` in the fast path's memory format: (what to train, the bare module)."""
    model = get_model(name, n_classes, weights=None if cfg.weights == "none" else cfg.weights).to(device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not ctx.enabled:
        return model, model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one BatchNorm batch across GPUs, as in one process
    # On CPU (gloo) BatchNorm stays per process (SyncBatchNorm is CUDA-only): batch statistics come from each
    # process's share of the batch; DDP broadcasts rank 0's running statistics, so all ranks evaluate alike.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None), model


def _train(
    params: Params,
    name: str,
    paths: TrainPaths,
    ctx: Distributed,
    device: torch.device,
    fast: FastPath,
    threads: int,
    on_epoch_end: Callable[[int], None] | None,
) -> TrainResult:
    train, cfg = params.train, params.train.model(name)
    spec = get_spec(name)
    digests = _broadcast(ctx, data_digests(paths) if ctx.is_main else None)
    fp = fingerprint(params, name, digests, ctx.world_size)

    # Seeds before anything random (model init): every rank builds the same initial weights.
    torch.manual_seed(train.seed)
    np.random.seed(train.seed)
    random.seed(train.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False

    loaders = _make_loaders(params, name, paths, ctx, device)
    model, bare = _make_model(name, cfg, len(params.data.classes), ctx, device, fast)
    labels = loaders.train.dataset.labels
    weight = class_weights(labels, len(params.data.classes)).to(device) if train.class_weighting else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = build_optimizer(bare.parameters(), cfg, fused=fast.fused_optimizer)
    session = _Session(
        bare, optimizer, build_scheduler(optimizer, cfg, monitor=train.monitor, patience=train.patience),
        torch.amp.GradScaler(device.type) if fast.grad_scaler else None,
        EarlyStopping(train.monitor, train.patience), loaders.generator,
    )
    # A different seed per rank for dropout and online augmentation (rank 0 keeps the one-process stream).
    torch.manual_seed(train.seed + ctx.rank)

    ckpt_path = paths.checkpoints / CHECKPOINT_FILE
    ckpt = load_checkpoint(ckpt_path, fp)
    if ckpt is not None:
        session.restore(ckpt, ctx.rank)
        log.info("%s: resuming from checkpoint %s after epoch %d", name, ckpt_path, session.epoch)
    resumed_from, checkpoint_run = session.epoch, session.run_id

    run = (
        tracking.training_run(
            params.mlflow.experiment, name,
            params=_mlflow_params(params, name, threads, ctx.world_size, len(loaders.train.dataset),
                                  len(loaders.val.dataset)),
            tags={"git_commit": git_commit(), "dvc_stage": f"train@{name}", "seed": str(train.seed),
                  "fast_path": fast.name, "device": device.type, "world_size": str(ctx.world_size)},
            run_id=checkpoint_run,
        )
        if ctx.is_main
        else contextlib.nullcontext(None)
    )
    with run as active_run:
        session.run_id = active_run
        if ctx.is_main and session.run_id != checkpoint_run:
            # A new run: a fresh training, or a checkpoint whose run is not in this store (its epochs are re-logged).
            for key, digest in digests.items():
                tracking.log_dataset(Path(key).name, digest, key, context="training")
            for row in session.history:
                tracking.log_epoch(_epoch_metrics(row), int(row["epoch"]))
        log.info("%s: %d training, %d validation images, %s, fast path %s, %d thread(s), world size %d",
                 name, len(loaders.train.dataset), len(loaders.val.dataset), device, fast.name, threads,
                 ctx.world_size)

        while session.epoch < cfg.epochs and not session.stopper.should_stop:
            session.epoch += 1
            started = time.perf_counter()
            loaders.sampler.set_epoch(session.epoch)
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, count = train_one_epoch(
                model, spec, loaders.train, criterion, optimizer, session.scaler, device, fast,
                desc=f"{name} epoch {session.epoch}/{cfg.epochs}", show_progress=ctx.is_main,
            )
            if ctx.enabled:
                totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                loss_sum, count = totals.tolist()
            metrics = evaluate_epoch(bare, spec, loaders.val, criterion, device, fast) if ctx.is_main else None
            metrics = _broadcast(ctx, metrics)  # every rank takes the same schedule and stopping decisions
            session.end_epoch(metrics, train.monitor)
            row = {"epoch": session.epoch, "train_loss": loss_sum / count, **metrics, "lr": lr,
                   "seconds": time.perf_counter() - started}
            session.history.append(row)
            rng = _gather(ctx, _rng_state(loaders.generator))
            if ctx.is_main:
                save_checkpoint(ckpt_path, session.checkpoint(fp, rng))
                tracking.log_epoch(_epoch_metrics(row), session.epoch)
                log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f val_auc %.4f val_accuracy %.4f (%.1f s)",
                         name, session.epoch, cfg.epochs, row["train_loss"], row["val_loss"], row["val_auc"],
                         row["val_accuracy"], row["seconds"])
            if on_epoch_end is not None:
                on_epoch_end(session.epoch)
        if session.stopper.should_stop:
            log.info("%s: early stop after epoch %d (best epoch %d, %s %.4f)", name, session.epoch,
                     session.stopper.best_epoch, train.monitor, session.stopper.best)

        if ctx.is_main:
            _write_outputs(params, name, paths, session, digests, fast, device, ctx)
            ckpt_path.unlink(missing_ok=True)  # finished: a rerun must train afresh (see the module docstring)
    return TrainResult(name, len(session.history), session.stopper.best_epoch, session.history, fast.name,
                       resumed_from, session.run_id)


def _epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "epoch"}


def _write_outputs(
    params: Params,
    name: str,
    paths: TrainPaths,
    session: _Session,
    digests: Mapping[str, str],
    fast: FastPath,
    device: torch.device,
    ctx: Distributed,
) -> None:
    """Log the best model and summary to MLflow, then write models/<m>/ (atomically, as one directory) and curves."""
    cfg = params.train.model(name)
    stopper, history = session.stopper, session.history
    if session.best_state is None:
        raise RuntimeError(f"{name}: no epoch was trained (train.{name}.epochs = {cfg.epochs})")
    # The MLflow copy: a fresh fp32, contiguous, CPU model in eval mode with the best weights.
    export = get_model(name, len(params.data.classes))
    export.load_state_dict(session.best_state)
    export.eval()
    example = np.zeros((1, 1, cfg.image_size, cfg.image_size), dtype=np.float32)
    tracking.log_model(export, example)
    tracking.log_epoch({"best_epoch": stopper.best_epoch, "epochs_run": len(history),
                        f"best_{params.train.monitor}": stopper.best}, len(history))

    with atomic_dir(paths.out) as tmp:
        torch.save(session.best_state, tmp / "model.pt")
        meta = {
            "model": name,
            "image_size": cfg.image_size,
            "classes": list(params.data.classes),
            "mlflow_run_id": session.run_id,
            "mlflow_tracking_uri": tracking.redact_uri(tracking.tracking_uri()),
            "model_sha256": sha256_file(tmp / "model.pt"),
            "data_digests": dict(digests),
            "params": dataclasses.asdict(cfg),
            "epochs_run": len(history),
            "best_epoch": stopper.best_epoch,
            "monitor": params.train.monitor,
            "best_value": _finite_or_none(stopper.best),
            "seed": params.train.seed,
            "git_commit": git_commit(),
            "fast_path": fast.name,
            "device": device.type,
            "world_size": ctx.world_size,
        }
        write_json_atomic(tmp / "meta.json", meta)
    write_text_atomic(paths.curves, _curves_csv(history))
