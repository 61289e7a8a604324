"""Training throughput per model against this machine's own measured peak, and what uses two cores best.

In one run, on this CPU:

1. **Peak.** The single-thread throughput of a large 3x3 convolution (forward, channels_last, batch 8, 128 channels
   at 56 x 56, the shape oneDNN runs fastest), in fp32 and in bf16 autocast: the machine's practical ceiling for
   convolution arithmetic, measured, never assumed.
2. **Per model, one thread:** images/s of the textbook fp32 loop (no autocast, contiguous tensors, per-tensor
   optimiser) and of spinedxa's training step (:func:`spinedxa.loop.train_one_epoch` with the fast path
   :func:`spinedxa.runtime.select_fast_path` picks here: bf16 autocast + channels_last + fused optimiser on CPUs with
   native bf16, fp32 channels_last elsewhere), at the params.yaml input size and batch size, and optionally a larger
   batch. Achieved GFLOP/s come from PyTorch's own FLOP counter (:class:`torch.utils.flop_counter.FlopCounterMode`,
   forward + backward of one step) and are given as a fraction of the peak of the precision each loop runs in.
3. **Two cores:** two training processes of one thread each (what the train stage does with
   ``runtime.train_processes: 2``) against one process with two threads, as aggregate images/s.

Timings alternate between the loops so load from other processes hits both alike; medians of the repeats, wall
clock and process CPU time. Writes ``reports/bench/train.json``.

Usage::

    python bench/train_throughput.py                       # every model at its params.yaml size and batch
    python bench/train_throughput.py --models resnet50 vgg16 --batch-sizes 16 32 --steps 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa.config import MODEL_NAMES, load_params  # noqa: E402
from spinedxa.data import input_shape  # noqa: E402
from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.loop import Session, train_one_epoch  # noqa: E402
from spinedxa.models import get_model, get_spec  # noqa: E402
from spinedxa.recipe import EarlyStopping, Schedule, build_optimizer  # noqa: E402
from spinedxa.runtime import Distributed, FastPath, Runtime, cpu_flags, select_fast_path  # noqa: E402

REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")
PEAK_SHAPE = (8, 128, 56, 56)  # batch, channels, height, width of the peak convolution


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def conv_peak(dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of a single-thread 3x3 convolution forward in ``dtype`` (bf16 via autocast), median of repeats."""
    n, c, h, w = PEAK_SHAPE
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    flops = 2 * n * c * c * 9 * h * w
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        conv(x)
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


class _Plain:
    """The textbook fp32 loop: forward, cross-entropy, backward, step (no autocast, default memory format)."""

    def __init__(self, name: str, model: nn.Module, lr: float) -> None:
        self.spec, self.model = get_spec(name), model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.loss = nn.CrossEntropyLoss()

    def run(self, loader: DataLoader) -> None:
        self.model.train()
        for x, y in loader:
            logits, aux = self.spec.unwrap(self.model(x))
            loss = self.loss(logits, y) + (0.4 * self.loss(aux, y) if aux is not None else 0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


class _Ours:
    """spinedxa's step: :func:`spinedxa.loop.train_one_epoch` with this machine's fast path and fused optimiser."""

    def __init__(self, name: str, model: nn.Module, cfg: Any, fast: FastPath) -> None:
        self.spec = get_spec(name)
        self.model = model.to(memory_format=torch.channels_last) if fast.channels_last else model
        optimizer = build_optimizer(self.model.parameters(), cfg, fused=fast.fused_optimizer)
        self.session = Session(self.model, optimizer, Schedule(None), None, EarlyStopping("val_loss", 0))
        self.rt = Runtime(torch.device("cpu"), fast, torch.get_num_threads(), Distributed())
        self.loss = nn.CrossEntropyLoss()

    def run(self, loader: DataLoader) -> None:
        train_one_epoch(self.model, self.spec, loader, self.loss, self.session, self.rt)


def _loader(shape: tuple[int, int], batch: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch * steps, 1, *shape, generator=g)
    y = torch.randint(0, 2, (batch * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def step_flops(name: str, shape: tuple[int, int], batch: int) -> int:
    """FLOPs of one training step (forward + backward) of ``batch`` images, from PyTorch's FLOP counter."""
    model, spec = get_model(name, 2), get_spec(name)
    model.train()
    x = torch.rand(batch, 1, *shape)
    with FlopCounterMode(display=False) as counter:
        logits, aux = spec.unwrap(model(x))
        (logits.sum() + (aux.sum() if aux is not None else 0)).backward()
    return int(counter.get_total_flops())


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, params: Any, batch: int, steps: int, repeats: int, fast: FastPath) -> dict[str, Any]:
    """Images/s of the plain loop and of ours for one model, one thread, and their fraction of the peak."""
    cfg = params.train.model(name)
    shape = input_shape(cfg.image_size)
    loader = _loader(shape, batch, steps)
    torch.manual_seed(0)
    loops = {"plain_fp32": _Plain(name, get_model(name, 2, batch_norm=cfg.batch_norm), cfg.lr),
             "ours": _Ours(name, get_model(name, 2, batch_norm=cfg.batch_norm), cfg, fast)}
    for loop in loops.values():  # warm-up: oneDNN primitive creation, allocator
        loop.run(_loader(shape, batch, 1))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in loops}
    for _ in range(repeats):
        for key, loop in loops.items():
            times[key].append(_timed(lambda: loop.run(loader)))
    images = batch * steps
    flops_per_image = step_flops(name, shape, batch) / batch
    out: dict[str, Any] = {"input": list(shape), "batch_size": batch, "gflop_per_image": round(flops_per_image / 1e9, 3)}
    for key, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out[key] = {"images_per_s": round(images / wall, 2), "images_per_cpu_s": round(images / cpu, 2),
                    "gflops": round(images * flops_per_image / cpu / 1e9, 1)}
    out["speedup"] = round(out["ours"]["images_per_cpu_s"] / out["plain_fp32"]["images_per_cpu_s"], 2)
    return out


def _worker(name: str, batch: int, steps: int, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    params = load_params(REPO / "params.yaml")
    cfg = params.train.model(name)
    shape = input_shape(cfg.image_size)
    loop = _Ours(name, get_model(name, 2, batch_norm=cfg.batch_norm), cfg,
                 select_fast_path(torch.device("cpu"), params.train.fast))
    loop.run(_loader(shape, batch, 1))
    wall, _ = _timed(lambda: loop.run(_loader(shape, batch, steps)))
    queue.put(batch * steps / wall)


def two_cores(name: str, batch: int, steps: int) -> dict[str, float]:
    """Aggregate images/s: two processes x one thread (the train stage's folds) vs one process x two threads."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for label, procs, threads in (("2_processes_x_1_thread", 2, 1), ("1_process_x_2_threads", 1, 2)):
        queue = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(name, batch, steps, threads, queue)) for _ in range(procs)]
        for w in workers:
            w.start()
        rates = [queue.get(timeout=1800) for _ in workers]
        for w in workers:
            w.join()
        out[label] = round(sum(rates), 2)
    out["ratio_processes_over_threads"] = round(out["2_processes_x_1_thread"] / out["1_process_x_2_threads"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None,
                        help="batch sizes to time (default: each model's params.yaml batch size)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-two-cores", action="store_true", help="skip the 2-process vs 2-thread comparison")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "train.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = load_params(REPO / "params.yaml")
    fast = select_fast_path(torch.device("cpu"), params.train.fast)
    flags = cpu_flags()
    peak = {"fp32": round(conv_peak(torch.float32, 7), 1), "bf16": round(conv_peak(torch.bfloat16, 7), 1)}
    ours_peak = peak["bf16"] if fast.autocast_dtype == torch.bfloat16 else peak["fp32"]
    print(f"CPU {cpu_model()}; flags {[f for f in REPORTED_FLAGS if f in flags]}; fast path {fast.name}")
    print(f"single-thread 3x3 conv peak: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s")
    print(f"{'model':13s} {'input':>9s} {'batch':>5s} {'GF/img':>6s} {'plain img/s':>11s} {'ours img/s':>10s} "
          f"{'speedup':>7s} {'plain %pk':>9s} {'ours %pk':>8s}")
    models: dict[str, Any] = {}
    for name in args.models:
        for batch in args.batch_sizes or [params.train.model(name).batch_size]:
            r = bench_model(name, params, batch, args.steps, args.repeats, fast)
            r["plain_fp32"]["fraction_of_peak"] = round(r["plain_fp32"]["gflops"] / peak["fp32"], 3)
            r["ours"]["fraction_of_peak"] = round(r["ours"]["gflops"] / ours_peak, 3)
            models.setdefault(name, []).append(r)
            print(f"{name:13s} {'x'.join(map(str, r['input'])):>9s} {batch:5d} {r['gflop_per_image']:6.2f} "
                  f"{r['plain_fp32']['images_per_cpu_s']:11.1f} {r['ours']['images_per_cpu_s']:10.1f} "
                  f"{r['speedup']:7.2f} {100 * r['plain_fp32']['fraction_of_peak']:8.0f}% "
                  f"{100 * r['ours']['fraction_of_peak']:7.0f}%")
    parallel = {}
    if not args.no_two_cores and (os.cpu_count() or 1) >= 2:
        for name in [m for m in ("resnet50", "vgg16") if m in args.models]:
            parallel[name] = two_cores(name, params.train.model(name).batch_size, args.steps)
            print(f"{name}: 2 processes x 1 thread {parallel[name]['2_processes_x_1_thread']} img/s, "
                  f"1 process x 2 threads {parallel[name]['1_process_x_2_threads']} img/s "
                  f"(ratio {parallel[name]['ratio_processes_over_threads']})")
    write_json_atomic(args.out, {
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "flags": [f for f in REPORTED_FLAGS if f in flags],
                "load_average": list(os.getloadavg())},
        "torch": torch.__version__, "fast_path": fast.name, "peak_gflops_1_thread": peak,
        "models": models, "two_cores": parallel,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
