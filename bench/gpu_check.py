"""The GPU path of the paper profile, checked and timed in a few minutes: run by ``bench/gpu_check.sh``.

Two parts, both through the project's own training code (``spinedxa.train.prepare``, ``spinedxa.loop``,
``spinedxa.runtime``), never a copy of it:

1. ``--single`` (one process, one GPU): for each model asked (default: ResNet-50 at 224 px and InceptionV3 at 299 px,
   the paper profile's two input heights), one fold's worth of training images at the paper profile's sizes, batch and
   recipe, through the CUDA AMP fast path (``cuda_amp_bf16`` where the GPU has bf16, else ``cuda_amp_fp16`` with a
   GradScaler; channels_last; fused AdamW): a warm-up epoch, then timed epochs: training images/s, validation
   images/s, peak GPU memory. The images are synthetic ROI-shaped PNGs written once to a work directory (the numbers
   measure the GPU step, not the data: the dataset is decoded into memory before training, as in the train stage).
   Weights start from scratch (``weights: none``): throughput does not depend on them, and ImageNet weights may not
   be in this machine's torch cache.
2. ``--ddp`` (under ``torchrun``, one process per GPU): the DDP path of ``spinedxa.train`` with the NCCL backend: the
   model wrapped in DistributedDataParallel with SyncBatchNorm, ``spinedxa.loop.fit`` for two epochs (all-reduced
   losses, rank 0's validation broadcast, every rank's RNG state gathered, rank 0's checkpoint), then a check that
   every rank holds identical weights. With one GPU, ``spinedxa`` runs no DDP (world size 1), so the check initialises
   an NCCL group of one itself and wraps the model in DDP: NCCL and the DDP wrapper are exercised, the all-reduce
   across GPUs is not (the JSON says so).

Both parts write into one JSON file (default ``reports/bench/gpu.json``). Without a CUDA device the script stops at
once with exit status 3 and a message saying why (no driver, a CPU-only torch build, or no visible device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa.config import Params, deep_merge, params_from_dict, read_yaml  # noqa: E402
from spinedxa.contracts import png16  # noqa: E402
from spinedxa.data import ImageItem, input_shape  # noqa: E402
from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.loop import FitPlan, evaluate_epoch, fit, train_one_epoch  # noqa: E402
from spinedxa.models import get_spec  # noqa: E402
from spinedxa.runtime import Runtime, process_group  # noqa: E402
from spinedxa.train import check_config, prepare  # noqa: E402

NO_CUDA_EXIT = 3
#: The paper profile's two input heights: 224 px (cnn21, ResNet-50, VGG) and 299 px (InceptionV3).
DEFAULT_MODELS = ("resnet50", "inception_v3")


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install a CUDA build"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device{hint}: no NVIDIA driver, "
                "no GPU, or none visible to this process")
    return None


def paper_params(profile: Path, models: list[str]) -> Params:
    """params.yaml with the paper profile applied in memory, on CUDA, ``weights: none`` for ``models``."""
    raw = deep_merge(read_yaml(REPO / "params.yaml"), read_yaml(profile) or {})
    raw["train"]["device"] = "cuda"
    raw["train"]["fast"] = True
    for name in models:
        raw["train"][name]["weights"] = "none"
    return params_from_dict(raw)


def fold_sizes(params: Params) -> tuple[int, int]:
    """(training images incl. offline copies, validation images) of one fold under the profile's k-fold split."""
    scans_outside_test = params.synthesize.n_scans * (params.split.folds - 1) / params.split.folds
    n_val = max(2, round(scans_outside_test * params.split.val))
    n_train = round(scans_outside_test - n_val) * (1 + params.augment.expand)
    return n_train, n_val


def synthetic_items(workdir: Path, params: Params, n: int, tag: str) -> list[ImageItem]:
    """``n`` ROI-shaped 16-bit PNGs (the profile's ``ingest.roi_height`` x half), both classes, written once."""
    height = params.ingest.roi_height
    folder = workdir / f"{tag}_{height}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        label = i % 2
        if not path.is_file():
            img = np.clip(rng.normal(0.45 + 0.1 * label, 0.15, (height, height // 2)), 0, 1)
            png16.write(path, img)
        items.append(ImageItem(path=path, label=label, source=f"synthetic/{tag}/{i}", patient_id=f"P{i:012x}"))
    return items


def fold_items(workdir: Path, params: Params) -> tuple[list[ImageItem], list[ImageItem]]:
    n_train, n_val = fold_sizes(params)
    return synthetic_items(workdir, params, n_train, "train"), synthetic_items(workdir, params, n_val, "val")


def expect_cuda_amp(rt: Runtime, name: str) -> None:
    """The run must be on the GPU, on the AMP fast path (what profiles/paper.yaml's ``train.fast: true`` means there).

    Raises:
        RuntimeError: another device or fast path was chosen (the message says which).
    """
    if rt.device.type != "cuda" or not rt.fast.name.startswith("cuda_amp"):
        raise RuntimeError(f"{name}: expected the CUDA AMP fast path, got device {rt.device} and {rt.fast.name}")


def _sync() -> None:
    torch.cuda.synchronize()


def _timed_epochs(params: Params, name: str, items: tuple[list[ImageItem], list[ImageItem]],
                  epochs: int) -> dict[str, Any]:
    """Train ``name`` for a warm-up epoch and ``epochs`` timed ones, then time one validation pass."""
    cfg = params.train.model(name)
    rt = Runtime.setup(params.train.device, params.train.fast, params.train.threads)
    expect_cuda_amp(rt, name)
    torch.cuda.reset_peak_memory_stats(rt.device)
    prepared = prepare(params, name, cfg, items, rt)
    spec, session, data = get_spec(name), prepared.session, prepared.data
    losses, rates = [], []
    for epoch in range(epochs + 1):  # epoch 0 warms up (cuDNN algorithm choice, allocator, fused optimiser)
        data.sampler.set_epoch(epoch)
        _sync()
        start = time.perf_counter()
        loss_sum, count = train_one_epoch(prepared.model, spec, data.train, prepared.loss_fn, session, rt)
        _sync()
        seconds = time.perf_counter() - start
        losses.append(loss_sum / count)
        if epoch:
            rates.append(count / seconds)
    _sync()
    start = time.perf_counter()
    metrics = evaluate_epoch(session.model, spec, data.val, prepared.loss_fn, rt)
    _sync()
    eval_rate = len(data.val.dataset) / (time.perf_counter() - start)
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(metrics["val_loss"]):
        raise RuntimeError(f"{name}: non-finite loss on the AMP path (train {losses}, val {metrics['val_loss']})")
    return {"fast_path": rt.fast.name, "train_images_per_epoch": len(data.train.dataset),
            "val_images": len(data.val.dataset), "train_images_per_s": round(float(np.median(rates)), 1),
            "train_images_per_s_each_epoch": [round(r, 1) for r in rates], "eval_images_per_s": round(eval_rate, 1),
            "train_loss_each_epoch": [round(x, 4) for x in losses],
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(rt.device) / 2**20)}


def single(params: Params, name: str, items: tuple[list[ImageItem], list[ImageItem]], epochs: int) -> dict[str, Any]:
    """One fold's epochs of ``name`` on one GPU through the project's fast path: as the train stage runs them (online
    augmentation on the CPU, in the training process), and once more without online augmentation (the GPU step
    alone: where the two differ, the CPU feeding the GPU is the bottleneck)."""
    cfg = params.train.model(name)
    check_config(params, name, 1)
    as_staged = _timed_epochs(params, name, items, epochs)
    gpu_only = _timed_epochs(dataclasses.replace(params, augment=dataclasses.replace(params.augment, online=False)),
                             name, items, epochs)
    return {"input": list(input_shape(cfg.image_size)), "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
            "timed_epochs": epochs, **as_staged,
            "without_online_augmentation": {k: gpu_only[k] for k in ("train_images_per_s", "eval_images_per_s",
                                                                      "peak_gpu_memory_mib")}}


def _weights_digest(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A per-rank fingerprint of the weights: the sum and the sum of squares of every parameter, in float64."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return torch.stack([flat.sum(), (flat * flat).sum()]).to(device)


def ddp(params: Params, name: str, items: tuple[list[ImageItem], list[ImageItem]], workdir: Path) -> dict[str, Any]:
    """Two epochs of ``name`` through spinedxa's DDP path with NCCL, on every GPU torchrun started a process for."""
    cfg = params.train.model(name)
    rt = Runtime.setup(params.train.device, params.train.fast, params.train.threads)
    check_config(params, name, rt.dist.world_size)
    spec = get_spec(name)
    own_group = not rt.dist.enabled  # spinedxa runs no DDP for one process: the check makes an NCCL group of one
    if own_group:
        torch.cuda.set_device(rt.device)
        dist.init_process_group(backend="nccl", timeout=timedelta(seconds=120))
    try:
        with process_group(rt.dist, rt.device):
            backend = dist.get_backend()
            prepared = prepare(params, name, cfg, items, rt)
            model = prepared.model
            if own_group:
                model = DistributedDataParallel(model, device_ids=[rt.device.index])
            checkpoint = workdir / f"ddp_{name}_last.pt"
            _sync()
            start = time.perf_counter()
            session = fit(model, spec, prepared.data, prepared.loss_fn, prepared.session, rt,
                          FitPlan(epochs=2, monitor=params.train.monitor, checkpoint=checkpoint, fingerprint="gpu-check"))
            _sync()
            seconds = time.perf_counter() - start
            digests = [torch.zeros(2, dtype=torch.float64, device=rt.device) for _ in range(dist.get_world_size())]
            dist.all_gather(digests, _weights_digest(session.model, rt.device))
            identical = all(torch.equal(d, digests[0]) for d in digests)
            world = dist.get_world_size()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    if not identical:
        raise RuntimeError(f"{name}: the ranks' weights differ after DDP training: {[d.tolist() for d in digests]}")
    return {
        "model": name, "world_size": world, "backend": backend,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
        "sync_batch_norm": rt.dist.enabled, "epochs": len(session.history),
        "train_loss_each_epoch": [round(r["train_loss"], 4) for r in session.history],
        "weights_identical_on_every_rank": identical, "checkpoint_written": checkpoint.is_file(),
        "seconds": round(seconds, 2),
        "all_reduce_across_gpus": world > 1,
        **({} if world > 1 else {"note": "one GPU: NCCL and the DDP wrapper exercised, no all-reduce across GPUs"}),
    }


def _update(out: Path, key: str, value: Any) -> None:
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[key] = value
    write_json_atomic(out, data)


def device_record() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name, "count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())), "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--single", action="store_true", help="one process: AMP throughput per model")
    mode.add_argument("--ddp", action="store_true", help="under torchrun: DDP with NCCL, weights checked across ranks")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up (--single)")
    parser.add_argument("--profile", type=Path, default=REPO / "profiles" / "paper.yaml")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spinedxa-gpu-check")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "gpu.json")
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu_check: no CUDA device: {problem}", file=sys.stderr)
        return NO_CUDA_EXIT
    params = paper_params(args.profile, args.models)
    items = fold_items(args.workdir, params)
    if args.single:
        results: dict[str, Any] = {}
        for name in args.models:
            results[name] = single(params, name, items, args.epochs)
            r = results[name]
            print(f"{name} {'x'.join(map(str, r['input']))} batch {r['batch_size']} {r['fast_path']}: "
                  f"train {r['train_images_per_s']} img/s, eval {r['eval_images_per_s']} img/s, "
                  f"peak {r['peak_gpu_memory_mib']} MiB")
        _update(args.out, "device", device_record())
        _update(args.out, "profile", str(args.profile.relative_to(REPO)) if args.profile.is_relative_to(REPO)
                else str(args.profile))
        _update(args.out, "single_gpu", results)
        return 0
    result = ddp(params, args.models[0], items, args.workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        _update(args.out, "ddp", result)
        print(f"DDP {result['model']}: world size {result['world_size']}, backend {result['backend']} "
              f"(NCCL {result['nccl_version']}), weights identical on every rank: "
              f"{result['weights_identical_on_every_rank']}, {result['seconds']} s for 2 epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
