"""Tests for spinedxa.runtime: CPU flags, fast-path policy, threads, device, torchrun environment, Runtime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from spinedxa.config import ConfigError
from spinedxa.runtime import (
    FP32,
    NATIVE_BF16_FLAGS,
    THREADS_ENV,
    Distributed,
    Runtime,
    _onednn_bf16,
    broadcast,
    cpu_flags,
    cpu_has_native_bf16,
    gather,
    process_group,
    resolve_device,
    resolve_threads,
    select_fast_path,
)

CPU = torch.device("cpu")


@pytest.fixture
def keep_threads():
    """Runtime.setup sets torch's intra-op thread count: put it back after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "enabled, flags, onednn_bf16, expected",
    [
        (False, {"avx512_bf16", "amx_bf16"}, True, "fp32"),
        (True, {"avx", "avx2", "fma"}, False, "cpu_fp32_channels_last"),  # AVX2 only (e.g. AMD EPYC Zen 2/3)
        (True, {"avx512f", "avx512bw"}, True, "cpu_fp32_channels_last"),  # bf16 only emulated: not taken
        (True, {"avx512f", "avx512_bf16"}, True, "cpu_bf16_channels_last"),  # e.g. AMD EPYC Zen 4
        (True, {"amx_bf16", "amx_tile"}, True, "cpu_bf16_channels_last"),  # e.g. Intel Xeon Sapphire Rapids
        (True, {"fp", "asimd", "bf16"}, True, "cpu_bf16_channels_last"),  # ARM with BF16 (e.g. Graviton 3)
        (True, {"amx_bf16"}, False, "cpu_fp32_channels_last"),  # torch built without oneDNN bf16
    ],
)
def test_select_fast_path_cpu(monkeypatch: pytest.MonkeyPatch, enabled, flags, onednn_bf16, expected) -> None:
    monkeypatch.setattr("spinedxa.runtime._onednn_bf16", lambda: onednn_bf16)
    fast = select_fast_path(CPU, enabled, frozenset(flags))
    assert fast.name == expected
    assert fast.channels_last == (expected != "fp32")
    assert (fast.autocast_dtype is torch.bfloat16) == ("bf16" in expected)
    assert fast.autocast_dtype is None or "bf16" in expected
    assert fast.fused_optimizer == (expected != "fp32")
    assert not fast.grad_scaler


@pytest.mark.parametrize(
    "bf16, expected, dtype, scaler",
    [(True, "cuda_amp_bf16", torch.bfloat16, False), (False, "cuda_amp_fp16", torch.float16, True)],
)
def test_select_fast_path_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str, dtype, scaler) -> None:
    """The CUDA policy without a GPU: bf16 autocast where the GPU has it, else fp16 with a GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    fast = select_fast_path(torch.device("cuda", 0), True)
    assert (fast.name, fast.autocast_dtype, fast.grad_scaler) == (expected, dtype, scaler)
    assert fast.channels_last and fast.fused_optimizer
    assert select_fast_path(torch.device("cuda", 0), False) == FP32


def test_select_fast_path_follows_this_machine() -> None:
    """Without given flags the policy reads this CPU: bf16 exactly where /proc/cpuinfo names a native bf16 flag and
    oneDNN has bf16 kernels (never a hard-coded expectation: the development CPU changes between sessions)."""
    native = bool(NATIVE_BF16_FLAGS & cpu_flags()) and _onednn_bf16()
    assert cpu_has_native_bf16() == native
    expected = "cpu_bf16_channels_last" if native else "cpu_fp32_channels_last"
    assert select_fast_path(CPU, True).name == expected
    assert select_fast_path(CPU, False) == FP32


@pytest.mark.parametrize(
    "text, expected",
    [
        ("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t: other\n",
         {"fpu", "avx", "avx2", "fma"}),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", {"fp", "asimd", "bf16"}),
        ("processor\t: 0\n", set()),
    ],
)
def test_cpu_flags(tmp_path, text: str, expected: set[str]) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text, encoding="utf-8")
    assert cpu_flags(path) == expected
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("fast", [False, True])
def test_fast_path_memory_format_and_autocast(fast: bool) -> None:
    path = select_fast_path(CPU, fast)
    x = path.to_input(torch.zeros(2, 3, 8, 8), CPU)
    assert x.is_contiguous(memory_format=torch.channels_last) == path.channels_last == fast
    layer = torch.nn.Linear(4, 2)
    with path.autocast(CPU):
        out = layer(torch.ones(1, 4))
    assert out.dtype == (path.autocast_dtype or torch.float32)


@pytest.mark.parametrize(
    "env, configured, local_world, expected",
    [
        ({THREADS_ENV: "3"}, 8, 1, 3),
        ({THREADS_ENV: " 2 "}, 0, 1, 2),
        ({THREADS_ENV: ""}, 2, 1, 2),
        ({}, 5, 2, 5),
        ({}, 0, 1, len(os.sched_getaffinity(0))),
        ({}, 0, 64, 1),  # DDP processes share the cores, at least one thread each
    ],
)
def test_resolve_threads(env, configured, local_world, expected) -> None:
    assert resolve_threads(configured, local_world_size=local_world, env=env) == expected


@pytest.mark.parametrize(
    "env, configured, error",
    [({THREADS_ENV: "abc"}, 0, ValueError), ({THREADS_ENV: "0"}, 0, ValueError), ({THREADS_ENV: "-2"}, 1, ValueError),
     ({}, -1, ConfigError)],
)
def test_resolve_threads_rejects(env, configured, error) -> None:
    with pytest.raises(error, match="SPINEDXA_THREADS|train.threads"):
        resolve_threads(configured, env=env)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto", 0).type == "cuda"
    else:
        assert resolve_device("auto") == CPU
        with pytest.raises(RuntimeError, match="train.device is 'cuda'"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Distributed(1, 0, 0, 1)),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, Distributed(2, 1, 1, 2)),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, Distributed(4, 3, 1, 2)),
    ],
)
def test_distributed_from_env(env, expected) -> None:
    ctx = Distributed.from_env(env)
    assert ctx == expected
    assert ctx.enabled == (expected.world_size > 1) and ctx.is_main == (expected.rank == 0)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"},
                                 {"WORLD_SIZE": "2", "RANK": "-1"}])
def test_distributed_from_env_rejects(env) -> None:
    with pytest.raises(ValueError, match="WORLD_SIZE|RANK"):
        Distributed.from_env(env)


@pytest.mark.parametrize(
    "env, fast, expected_threads, expected_world",
    [
        ({THREADS_ENV: "2"}, False, 2, 1),
        ({THREADS_ENV: "1", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, True, 1, 2),
        ({"WORLD_SIZE": "64", "RANK": "0"}, True, 1, 64),  # 0 threads = this process's share of the cores
    ],
)
def test_runtime_setup(keep_threads, env, fast: bool, expected_threads: int, expected_world: int) -> None:
    rt = Runtime.setup("cpu", fast, 0, env=env)
    assert rt.device == CPU and rt.threads == expected_threads and rt.dist.world_size == expected_world
    assert torch.get_num_threads() == expected_threads  # applied, not only recorded
    assert rt.fast == select_fast_path(CPU, fast)
    assert rt.record() == {"fast_path": rt.fast.name, "device": "cpu", "threads": expected_threads,
                           "world_size": expected_world}


def test_runtime_record_is_the_same_on_every_rank() -> None:
    """The record enters the checkpoint fingerprint, which every rank of one job must compute alike."""
    records = [Runtime(CPU, FP32, 1, Distributed(2, r, r, 2)).record() for r in (0, 1)]
    assert records[0] == records[1] and "rank" not in records[0]


def test_one_process_collectives_are_identities() -> None:
    ctx = Distributed()
    assert broadcast(ctx, {"a": 1}) == {"a": 1}
    assert gather(ctx, 3) == [3]
    with process_group(ctx, CPU):  # no process group for one process
        assert not torch.distributed.is_initialized()


def test_runtime_imports_neither_sklearn_nor_mlflow() -> None:
    """evaluate and predict resolve a device through this module: it must not pull in the training stack."""
    code = ("import sys, spinedxa.runtime; heavy = {'sklearn', 'mlflow', 'dvc', 'spinedxa.train', 'spinedxa.tracking',"
            " 'spinedxa.loop', 'spinedxa.recipe'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
