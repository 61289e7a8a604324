"""Where and how a training runs: device, threads, the fast path (mixed precision, memory format), torchrun/DDP.

Everything here depends on the machine, not on the data: :func:`select_fast_path` reads the CPU's feature flags,
:func:`resolve_threads` the environment. What it decides (fast path name, thread count) is recorded in meta.json,
MLflow and the checkpoint fingerprint, because it changes the numerics: bf16 autocast and fp32 differ in the last
digits, and so do different thread counts (the order of floating-point reductions). Expected tolerance between two
machines is therefore not zero; the README states it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from spinedxa import forkserver
from spinedxa.config import ConfigError

#: Environment variable that overrides ``train.threads`` (Snakemake sets it per job from its thread count).
THREADS_ENV = "SPINEDXA_THREADS"
#: CPU feature flags (/proc/cpuinfo) meaning native bf16 arithmetic: x86 AVX512-BF16 or AMX-BF16, ARM BF16.
#: Without them oneDNN emulates bf16 (AVX-512 only) or has no bf16 kernels at all (AVX2), slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


# ------------------------------------------------------------------------------------------- fast paths


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


def broadcast(ctx: Distributed, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity for one process)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ctx: Distributed, obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------------------------------- one bundle


@dataclass(frozen=True)
class Runtime:
    """What a training process runs on: device, fast path, intra-op threads, place in a torchrun job."""

    device: torch.device
    fast: FastPath
    threads: int
    dist: Distributed

    @classmethod
    def setup(cls, device: str, fast: bool, threads: int, *, env: Mapping[str, str] | None = None) -> "Runtime":
        """Resolve ``train.device``, ``train.fast`` and ``train.threads`` for this process and apply the threads.

        Raises:
            RuntimeError, ValueError, ConfigError: see :func:`resolve_device`, :func:`resolve_threads`.
        """
        ctx = Distributed.from_env(env)
        resolved = resolve_device(device, ctx.local_rank)
        if resolved.type == "cuda":
            # cuBLAS needs this for deterministic results (CUDA docs, "Reproducibility"); set before cuBLAS starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        n = resolve_threads(threads, local_world_size=ctx.local_world_size, env=env)
        torch.set_num_threads(n)
        return cls(resolved, select_fast_path(resolved, fast), n, ctx)

    def record(self) -> dict[str, Any]:
        """The facts that change numerics, for meta.json, MLflow tags and the checkpoint fingerprint."""
        return {"device": self.device.type, "fast_path": self.fast.name, "threads": self.threads,
                "world_size": self.dist.world_size}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere), for costs in reports."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's RNGs and ask for deterministic algorithms (every training's first step)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def training_pool(processes: int, preload: str) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``processes`` training processes, forked from a fresh server process that has imported ``preload``
    (the module whose functions the pool runs) and nothing else: each process logs like the stage and dies with it
    (:func:`init_worker`).

    Not ``fork`` from the stage: by then it has MLflow's threads and a set-up torch runtime whose locks a forked
    child could inherit held. Not ``spawn``: every process would import torch, torchvision, MLflow and scikit-learn
    again (~4 s of CPU each; measured with three processes on 2 cores: 25-30 s to start the pool with spawn, 8-13 s
    with the preloaded forkserver). The server only imports; each process then seeds and sets its own threads
    (:meth:`Runtime.setup`), so what it computes is what a spawned one computes (tests/test_train.py). A stage that
    started the server early (:func:`spinedxa.forkserver.start_early`) gets its processes from that one.
    """
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=forkserver.context(preload), initializer=init_worker,
                                                  initargs=(logging.getLogger().getEffectiveLevel(),))


def init_worker(level: int) -> None:
    """A training process logs like the stage (its progress lines reach the stage's stderr) and dies with it.

    Without the parent-death signal, killing the stage (Ctrl-C, ``kill``, the OOM killer) would leave its training
    processes running on as orphans (measured: they ran to the end of their epochs).
    """
    import sys

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)  # mlflow adds a handler
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1  # prctl(2)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
