"""Training throughput: our training step (spinedxa.train, fast path as chosen for this machine) against a plain fp32
PyTorch loop, per model, side by side in one run, and the seconds one epoch takes at the params.yaml sizes.

Both loops train the same freshly initialised model on the same random batches with the same batch size, image size,
optimiser (the model's params.yaml block) and thread count. Timings alternate between the loops (plain, ours, plain,
ours, ...) so that load from other processes hits both alike; the median of the repeats is reported, as wall-clock
images/s and as images per CPU-second (process time), which a busy shared machine distorts far less.

Usage::

    python bench/train_throughput.py                          # every model at its params.yaml size and batch
    python bench/train_throughput.py --image-size 128 --batch-size 16 --steps 3 --models cnn21 vgg16
    python bench/train_throughput.py --variants plain ours bf16   # also time bf16 autocast (emulated w/o AVX512-BF16)

Writes ``reports/bench/train.json`` (``--out``): CPU flags seen, the fast path taken, images/s per loop, speed-ups,
the load average, and per-model epoch estimates (CPU-seconds, and wall seconds on an idle machine) for the default
pipeline's ~105 x (1 + augment.expand) training and ~35 validation images.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa.config import MODEL_NAMES, load_params  # noqa: E402
from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.models import get_model, get_spec  # noqa: E402
from spinedxa.train import (  # noqa: E402
    FP32,
    FastPath,
    build_optimizer,
    cpu_flags,
    cpu_has_native_bf16,
    resolve_threads,
    select_fast_path,
    train_one_epoch,
)

# Flags worth reporting: the ones that decide oneDNN's kernels and the bf16 path.
REPORTED_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                  "amx_int8", "bf16", "asimd", "sve")
# The default pipeline: 174 scans split 60/20/20 give ~105 training and ~35 validation images (params.yaml split),
# the training set expanded by augment.expand offline copies.
N_TRAIN_ORIGINALS, N_VAL = 105, 35


def plain_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, unwrap) -> None:
    """The textbook fp32 loop: forward, cross-entropy, backward, step (no autocast, default memory format)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    for x, y in loader:
        logits, _ = unwrap(model(x))
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def our_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, spec, fast: FastPath) -> None:
    """spinedxa's training step (train_one_epoch: aux loss, fast path, loss in fp32)."""
    train_one_epoch(model, spec, loader, nn.CrossEntropyLoss(), optimizer, None, torch.device("cpu"), fast,
                    desc="", show_progress=False)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``. On a shared machine the CPU time of a 1-thread run is close
    to what the wall time would be on an idle one; the wall time includes waiting for other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def eval_images_per_cpu_s(model: nn.Module, x: torch.Tensor, fast: FastPath, repeats: int) -> float:
    """Inference images per CPU-second (forward only, no gradients)."""
    model.eval()
    xx = fast.to_input(x, torch.device("cpu"))
    with fast.autocast(torch.device("cpu")):
        model(xx)  # warm-up
        cpu_seconds = statistics.median(_timed(lambda: model(xx))[1] for _ in range(repeats))
    return len(x) / cpu_seconds


def bench_model(name: str, image_size: int, batch_size: int, steps: int, warmup: int, repeats: int,
                variants: list[str], ours: FastPath, cfg) -> dict:
    spec = get_spec(name)
    gen = torch.Generator().manual_seed(0)
    n = batch_size * steps
    images = torch.rand(n, 1, image_size, image_size, generator=gen)
    data = TensorDataset(images, torch.randint(0, 2, (n,), generator=gen))
    warm = TensorDataset(*(t[: batch_size * warmup] for t in data.tensors))
    torch.manual_seed(0)
    base = get_model(name, 2)
    paths = {
        "plain": FP32,
        "ours": ours,
        "bf16": FastPath("cpu_bf16_channels_last", True, torch.bfloat16, fused_optimizer=True),
    }
    setups = {}
    for variant in variants:
        model = copy.deepcopy(base)
        fast = paths[variant]
        if fast.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # The plain loop keeps PyTorch's default optimiser implementation; ours uses its fast path's choice.
        opt = build_optimizer(model.parameters(), cfg, fused=variant != "plain" and fast.fused_optimizer)
        if variant == "plain":
            run = lambda loader, m=model, o=opt: plain_steps(m, loader, o, spec.unwrap)  # noqa: E731
        else:
            run = lambda loader, m=model, o=opt, f=fast: our_steps(m, loader, o, spec, f)  # noqa: E731
        run(DataLoader(warm, batch_size=batch_size))
        setups[variant] = (model, fast, run)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    loader = DataLoader(data, batch_size=batch_size)
    for _ in range(repeats):  # alternate, so that background load hits every variant alike
        for variant in variants:
            times[variant].append(_timed(lambda: setups[variant][2](loader)))
    ips = {v: n / statistics.median(w for w, _ in t) for v, t in times.items()}
    cpu_ips = {v: n / statistics.median(c for _, c in t) for v, t in times.items()}
    model, fast, _ = setups["ours"] if "ours" in setups else setups[variants[0]]
    eval_ips = eval_images_per_cpu_s(model, data.tensors[0][:batch_size], fast, repeats)
    row = {"model": name, "image_size": image_size, "batch_size": batch_size, "steps": steps, "repeats": repeats,
           "images_per_s": {v: round(x, 3) for v, x in ips.items()},
           "images_per_cpu_s": {v: round(x, 3) for v, x in cpu_ips.items()},
           "eval_images_per_cpu_s": round(eval_ips, 3)}
    if "plain" in ips:
        row["speedup"] = {v: round(x / ips["plain"], 3) for v, x in ips.items() if v != "plain"}
        row["speedup_cpu_time"] = {v: round(x / cpu_ips["plain"], 3) for v, x in cpu_ips.items() if v != "plain"}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--image-size", type=int, help="default: each model's train.<model>.image_size")
    parser.add_argument("--batch-size", type=int, help="default: each model's train.<model>.batch_size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, oneDNN kernels)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="default: train.threads / $SPINEDXA_THREADS rules")
    parser.add_argument("--variants", nargs="+", default=["plain", "ours"], choices=["plain", "ours", "bf16"])
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/train.json")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    threads = args.threads or resolve_threads(params.train.threads)
    torch.set_num_threads(threads)
    flags = cpu_flags()
    ours = select_fast_path(torch.device("cpu"), params.train.fast, flags)
    n_train = N_TRAIN_ORIGINALS * (1 + params.augment.expand)
    load_before = os.getloadavg()
    rows = []
    print(f"fast path: {ours.name}; threads {threads}; CPU flags {sorted(flags & set(REPORTED_FLAGS))}")
    header = f"{'model':<13}{'px':>5}{'batch':>6}" + "".join(f"{v + ' img/s':>14}" for v in args.variants)
    print(header + f"{'speed-up':>10}{'epoch cpu-s':>12}")
    for name in args.models:
        cfg = params.train.model(name)
        # InceptionV3 accepts no less than 75 px (torchvision's min_size): smaller --image-size is raised to it.
        size = max(args.image_size or cfg.image_size, get_spec(name).min_size)
        batch = args.batch_size or cfg.batch_size
        row = bench_model(name, size, batch, args.steps, args.warmup, args.repeats, args.variants, ours, cfg)
        train_ips = row["images_per_cpu_s"].get("ours", next(iter(row["images_per_cpu_s"].values())))
        # CPU-seconds of one epoch; divided by the threads it is the wall time on an otherwise idle machine
        # (assuming linear scaling with threads, which oneDNN roughly reaches on 2 cores).
        row["epoch_cpu_seconds"] = round(n_train / train_ips + N_VAL / row["eval_images_per_cpu_s"], 1)
        row["epoch_seconds_estimate"] = round(row["epoch_cpu_seconds"] / threads, 1)
        rows.append(row)
        speed = row.get("speedup", {}).get("ours")
        print(f"{name:<13}{size:>5}{batch:>6}" + "".join(f"{row['images_per_s'][v]:>14.2f}" for v in args.variants)
              + (f"{speed:>9.2f}x" if speed else f"{'':>10}") + f"{row['epoch_cpu_seconds']:>12.1f}", flush=True)
    report = {
        "cpu": {"processor": _cpu_model(), "machine": platform.machine(),
                "flags_seen": sorted(flags & set(REPORTED_FLAGS)), "native_bf16": cpu_has_native_bf16(flags)},
        "torch": torch.__version__,
        "threads": threads,
        "fast_path": ours.name,
        "variants": {"plain": "textbook fp32 loop, contiguous", "ours": f"spinedxa.train step, {ours.name}",
                     "bf16": "spinedxa.train step, bf16 autocast + channels_last (forced)"},
        "epoch_estimate_images": {"train": n_train, "val": N_VAL},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "results": rows,
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8").splitlines() if cpuinfo.exists() else []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


if __name__ == "__main__":
    main()
