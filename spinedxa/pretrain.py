"""Supervised pretraining on a synthetic DXA pool: transferable weights with no download.

**What the pretraining sees.** A pool of ``pretrain.n_scans`` AP lumbar spine scans rendered in-process by the
synthetic cohort's forward model (:func:`spinedxa.synthesize.simulate_scan`) through the training cohort's scanner
(:data:`spinedxa.synthesize.DEFAULT_SCANNER`, never the external cohort's second scanner), from its own seed
``pretrain.seed``, which must differ from ``synthesize.seed`` and ``synthesize.external.seed``: the pool shares no scan,
subject or acquisition with the cohort, the external cohort or any fold's held-out part. Each scan becomes an ROI
image the way ingest makes one (:func:`spinedxa.ingest.process_pixels` without its OCR, there being no text):
:func:`spinedxa.imaging.normalise` to ``ingest.max_side``, :func:`spinedxa.roi.locate` (or ``whole``), extracted at
``ingest.roi_height``; a scan whose region is not found is left out and counted, as ingest quarantines it. Every
subject has one scan (no follow-ups), drawn with the cohort's class-conditional T-scores (``plan_cohort``; the
cohort's share of osteoporosis), confounders and storage choices; no burned-in banners or level labels.

**The task.** Each network (``pretrain.models``, in turn) regresses the pool scan's T-score, standardised over the
pool (the forward model knows it; BMD is a linear function of it, so one target carries both), with a one-output
head in place of its classifier (``get_model(name, 1)``), at its own input size (``train.<model>.image_size``, the
variant ``train.<model>.batch_norm`` selects), mean squared error (InceptionV3's auxiliary head adds 0.4 x its own),
AdamW + one-cycle at ``pretrain.lr`` for ``pretrain.epochs`` epochs, gradient clipping ``pretrain.grad_clip``, online
augmentation ``pretrain.augment`` (the augment section's techniques, or its flip only).
A seeded ``pretrain.val`` share of the pool keeps the epoch of lowest validation error (after the one-cycle warm-up,
as the classifiers' kept epoch). The loop is the training stage's (:func:`spinedxa.loop.fit`) with a regression
evaluation.

**What it writes.** ``models/pretrained/<model>/model.pt``: the backbone's state dict (the layers the head rule of
:mod:`spinedxa.weights` calls new are dropped when a fine-tune loads it), and ``model.pt.json``, its record:
``kind: pretrained``, ``variant``, ``sha256``, ``size`` and what the pretraining saw and cost (pool seed and size,
scans left out, target mean and SD, epochs, the loss curve, the kept epoch, validation error, correlation and the
ROC-AUC of the prediction for the task's osteoporosis threshold on the pool's validation part, CPU and wall seconds,
the CPU model). A model not in ``pretrain.models``, or every model when ``pretrain.enabled`` is false, gets a marker
instead (:func:`spinedxa.weights.write_pretrained_marker`) in well under a second, without importing torch.

**Cost.** One training per network on the pool; networks train side by side in ``runtime.train_processes``
processes of ``train.threads`` threads (a result does not depend on how many). The stage's summary
(``reports/pretrain.json``) gives each network's seconds and the CPU.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from spinedxa.config import ConfigError, IngestConfig, ModelTrainConfig, Params, SynthesizeConfig
from spinedxa.contracts import jsonfile
from spinedxa.contracts.manifest import model_input_shape, roi_aspect
from spinedxa.files import atomic_dir
from spinedxa.imaging import normalise
from spinedxa import roi as roi_locator
from spinedxa import weights as weights_policy
from spinedxa.synthesize import DEFAULT_SCANNER, ScanPlan, T_OSTEOPOROSIS, plan_cohort, simulate_scan

if TYPE_CHECKING:
    from torch import Tensor, nn

log = logging.getLogger(__name__)

#: The stage's summary keys (``reports/pretrain.json``).
SUMMARY_KEYS = ("enabled", "models", "seconds", "cpu")


@dataclass(frozen=True)
class Pool:
    """The rendered pretraining pool.

    Attributes:
        images: ``N x H x W`` uint16 ROI images, as ingest writes them (``ingest.roi_height`` rows).
        t_scores: each image's T-score (the regression target before standardisation).
        n_planned: scans rendered; ``n_planned - N`` had no region of interest and were left out.
        seconds: wall seconds to render it.
    """

    images: np.ndarray
    t_scores: np.ndarray
    n_planned: int
    seconds: float

    def record(self, params: Params) -> dict[str, Any]:
        """What the pool is, for each network's weights record."""
        cfg = params.pretrain
        return {"pool_seed": cfg.seed, "pool_scans": int(len(self.images)), "pool_planned": self.n_planned,
                "pool_left_out_no_roi": self.n_planned - int(len(self.images)),
                "pool_scanner": "the training cohort's scanner (synthesize), not the external cohort's",
                "pool_disjoint_from": {"synthesize.seed": params.synthesize.seed,
                                       "synthesize.external.seed": (params.synthesize.external.seed
                                                                    if params.synthesize.external else None)},
                "target": "t_score", "target_mean": float(np.mean(self.t_scores)),
                "target_sd": float(np.std(self.t_scores)), "render_seconds": round(self.seconds, 1)}


# ------------------------------------------------------------------------------------------- the pool


def check_seeds(params: Params) -> None:
    """The pool's seed must differ from the cohort's and the external cohort's.

    Raises:
        ConfigError: naming the key.
    """
    taken = {"synthesize.seed": params.synthesize.seed}
    if params.synthesize.external is not None:
        taken["synthesize.external.seed"] = params.synthesize.external.seed
    for key, seed in taken.items():
        if params.pretrain.seed == seed:
            raise ConfigError(f"pretrain.seed: {seed} is {key}: the pool would repeat that cohort's scans; allowed: "
                              f"any other seed (not {sorted(set(taken.values()))})")


def pool_config(params: Params) -> SynthesizeConfig:
    """The synthetic cohort's settings for the pool: its own seed and size, the cohort's share of osteoporosis, one
    scan per subject, no text in the pixels and no external cohort."""
    cohort, cfg = params.synthesize, params.pretrain
    share = cohort.n_osteoporosis / cohort.n_scans
    return dataclasses.replace(cohort, seed=cfg.seed, n_scans=cfg.n_scans,
                               n_osteoporosis=int(round(share * cfg.n_scans)), followup_fraction=0.0,
                               burned_in_fraction=0.0, level_label_fraction=0.0, external=None)


def render_roi(plan: ScanPlan, cohort: SynthesizeConfig, ingest: IngestConfig) -> np.ndarray | None:
    """One pool scan as ingest would write its ROI image (uint16), or None when no region is found.

    The forward model's image is what ingest decodes (MONOCHROME2 orientation, the rescale undone), so the steps
    after decoding are :func:`spinedxa.ingest.process_pixels`'s, less the OCR (no text is drawn).
    """
    scan = simulate_scan(np.random.default_rng(plan.seed), plan.t_score, height=cohort.height, width=cohort.width,
                         pixel_spacing_mm=cohort.pixel_spacing_mm, bits_stored=plan.bits_stored,
                         osteophyte=plan.osteophyte, fracture=plan.fracture, scoliosis_deg=plan.scoliosis_deg,
                         anatomy_rng=np.random.default_rng(plan.anatomy_seed), scanner=DEFAULT_SCANNER)
    image = normalise(scan.image, ingest.max_side)
    aspect = roi_aspect(ingest.roi)
    try:
        box = roi_locator.locate(image) if ingest.roi == "locate" else roi_locator.whole(image, aspect)
    except roi_locator.RoiNotFound:
        return None
    return roi_locator.extract(image, box, ingest.roi_height, aspect)


def render_pool(params: Params, workers: int = 1) -> Pool:
    """Render the pool (:func:`pool_config`) in ``workers`` processes (the images do not depend on how many).

    Raises:
        ConfigError: ``pretrain.seed`` repeats a cohort's seed.
        ValueError: fewer than two pool scans have a region of interest.
    """
    check_seeds(params)
    started = time.perf_counter()
    cohort = pool_config(params)
    plans = plan_cohort(cohort)
    n = len(plans)
    if workers <= 1:
        rois = [render_roi(p, cohort, params.ingest) for p in plans]
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            rois = list(pool.map(render_roi, plans, [cohort] * n, [params.ingest] * n,
                                 chunksize=max(1, n // (4 * workers))))
    kept = [(roi, p.t_score) for roi, p in zip(rois, plans) if roi is not None]
    if len(kept) < 2:
        raise ValueError(f"pretrain: {len(kept)} of {n} pool scans have a region of interest; need at least 2 "
                         "(pretrain.n_scans, ingest.roi)")
    log.info("pretrain: rendered %d pool scans (%d without a region of interest, left out) in %.1f s", n,
             n - len(kept), time.perf_counter() - started)
    return Pool(np.stack([k[0] for k in kept]), np.array([k[1] for k in kept], dtype=np.float64), n,
                time.perf_counter() - started)


# ------------------------------------------------------------------------------------------- one network


def recipe(params: Params, name: str) -> ModelTrainConfig:
    """The pretraining recipe of ``name``: its ``train.<name>`` block's input size and variant with the pretrain
    section's epochs, batch, rate, decay, gradient clipping and augmentation, AdamW + one-cycle, from random
    weights."""
    cfg = params.pretrain
    return dataclasses.replace(params.train.model(name), epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, optimizer="adamw", scheduler="onecycle",
                               label_smoothing=0.0, weights=weights_policy.NONE, augment=cfg.augment,
                               grad_clip=cfg.grad_clip, freeze_epochs=0, backbone_lr_factor=1.0, bn_mode="train")


def _regression_loss() -> nn.Module:
    import torch
    from torch import nn

    class RegressionLoss(nn.Module):
        """Mean squared error of the one-output head against the standardised target."""

        def forward(self, output: Tensor, target: Tensor) -> Tensor:
            return torch.nn.functional.mse_loss(output[:, 0], target.to(output.dtype))

    return RegressionLoss()


def regression_epoch(model: nn.Module, spec: Any, batches: Any, loss_fn: nn.Module, rt: Any) -> dict[str, float]:
    """The pool's validation part: ``val_loss`` (mean squared error, the kept epoch's measure), ``val_r`` (Pearson
    correlation of prediction and target) and ``val_auc`` (ROC-AUC of minus the prediction for the pool's own
    osteoporosis labels, T <= -2.5: what the pretext task knows of the classification task)."""
    import torch
    from sklearn.metrics import roc_auc_score

    model.eval()
    preds, targets = [], []
    with torch.no_grad():
        for x, y in batches:
            x = rt.fast.to_input(x, rt.device)
            with rt.fast.autocast(rt.device):
                out, _ = spec.unwrap(model(x))
            preds.append(out.float()[:, 0].cpu())
            targets.append(y.float())
    p, t = torch.cat(preds).numpy().astype(np.float64), torch.cat(targets).numpy().astype(np.float64)
    labels = t <= batches.dataset.osteoporosis_z
    auc = float(roc_auc_score(labels, -p)) if 0 < labels.sum() < len(labels) else float("nan")
    r = float(np.corrcoef(p, t)[0, 1]) if np.std(p) > 0 and np.std(t) > 0 else float("nan")
    return {"val_loss": float(np.mean((p - t) ** 2)), "val_r": r, "val_auc": auc}


def _dataset(images: np.ndarray, targets: np.ndarray, transform: Any, osteoporosis_z: float) -> Any:
    """A torch dataset of fitted images (``N x 1 x H x W`` float16 in memory) and float targets."""
    import torch
    from torch.utils.data import Dataset

    class PoolDataset(Dataset):
        def __init__(self) -> None:
            self.images = torch.from_numpy(images).unsqueeze(1).to(torch.float16)
            self.targets = torch.from_numpy(targets.astype(np.float32))
            self.transform, self.osteoporosis_z = transform, osteoporosis_z

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
            image = self.images[index].to(torch.float32)
            return (self.transform(image) if self.transform is not None else image), self.targets[index]

    return PoolDataset()


def pretrain_model(params: Params, name: str, pool: Pool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Pretrain ``name`` on the pool; return its backbone's state dict and what the pretraining did (for the
    record).

    Raises:
        RuntimeError: started under torchrun (the stage runs its networks as separate processes), or no epoch ran.
    """
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from spinedxa.augment import build_transform, flip_only
    from spinedxa.data import fit as fit_image
    from spinedxa.loop import Batches, FitPlan, Session, fit
    from spinedxa.models import get_model, get_spec
    from spinedxa.recipe import EarlyStopping, build_optimizer, build_scheduler, first_candidate_epoch
    from spinedxa.runtime import Runtime, seed_everything

    cfg, section, spec = recipe(params, name), params.pretrain, get_spec(name)
    rt = Runtime.setup(params.train.device, params.train.fast, params.train.threads)
    if rt.dist.enabled:
        raise RuntimeError("pretrain runs in one process per network; start stages/pretrain.py without torchrun")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    seed_everything(section.seed)
    shape = model_input_shape(cfg.image_size, params.ingest.roi)
    images = np.stack([fit_image(img.astype(np.float32) / 65535.0, shape) for img in pool.images])
    mean, sd = float(np.mean(pool.t_scores)), float(np.std(pool.t_scores)) or 1.0
    z = (pool.t_scores - mean) / sd
    order = np.random.default_rng(section.seed).permutation(len(z))
    n_val = max(1, int(round(section.val * len(z))))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    augment = params.augment if cfg.augment == "full" else flip_only(params.augment)
    transform = build_transform(augment) if params.augment.online else None
    threshold = (T_OSTEOPOROSIS - mean) / sd
    train_ds = _dataset(images[train], z[train], transform, threshold)
    val_ds = _dataset(images[val], z[val], None, threshold)
    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=section.seed)
    generator = torch.Generator()
    generator.manual_seed(section.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, generator=generator,
                        drop_last=len(train_ds) % cfg.batch_size == 1)  # no one-image batch for BatchNorm
    data = Batches(loader, DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False), sampler, generator)
    model = get_model(name, 1, batch_norm=cfg.batch_norm).to(rt.device)
    if rt.fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg, fused=rt.fast.fused_optimizer)
    schedule = build_scheduler(optimizer, cfg, monitor="val_loss", patience=0, steps_per_epoch=len(loader))
    scaler = torch.amp.GradScaler(rt.device.type) if rt.fast.grad_scaler else None
    session = Session(model, optimizer, schedule, scaler, EarlyStopping("val_loss", 0, first_candidate_epoch(cfg)),
                      grad_clip=cfg.grad_clip)

    def report(s: Session, row: dict[str, float]) -> None:
        log.info("pretrain %s epoch %d/%d: train_loss %.4f val_loss %.4f val_r %.3f val_auc %.3f (%.1f s)", name,
                 row["epoch"], cfg.epochs, row["train_loss"], row["val_loss"], row["val_r"], row["val_auc"],
                 row["seconds"])

    fit(model, spec, data, _regression_loss(), session, rt, FitPlan(cfg.epochs, "val_loss", None, f"pretrain-{name}"),
        on_epoch=report, evaluate=regression_epoch)
    if session.best_state is None:
        raise RuntimeError(f"pretrain: no epoch of {name} was trained (pretrain.epochs)")
    model.load_state_dict(session.best_state)
    best = next(row for row in session.history if row["epoch"] == session.stopper.best_epoch)
    done = {
        "input_shape": list(shape), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "optimizer": cfg.optimizer, "scheduler": cfg.scheduler,
        "augment": cfg.augment if params.augment.online else "off", "grad_clip": cfg.grad_clip,
        "n_train": int(len(train)), "n_val": int(len(val)), "best_epoch": session.stopper.best_epoch,
        "val_mse": best["val_loss"], "val_r": jsonfile.finite_or_none(best["val_r"]),
        "val_auc_osteoporosis": jsonfile.finite_or_none(best["val_auc"]),
        "curve": [{k: jsonfile.finite_or_none(row[k]) if isinstance(row[k], float) else row[k]
                   for k in ("epoch", "train_loss", "val_loss", "val_r", "val_auc", "seconds")}
                  for row in session.history],
        "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.perf_counter() - wall0, 1),
        **rt.record(),
    }
    return weights_policy.backbone_state(model), done


def _pretrain_job(params: Params, name: str, pool: Pool) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """One network's pretraining in a worker process."""
    state, done = pretrain_model(params, name, pool)
    return name, state, done


# ------------------------------------------------------------------------------------------- the stage


def check_input(params: Params, name: str) -> None:
    """The network's input (``train.<name>.image_size``) is at least its minimum size, and its variant exists.

    Raises:
        ConfigError: naming the key.
    """
    from spinedxa.models import get_spec, variant

    cfg, spec = params.train.model(name), get_spec(name)
    height, width = model_input_shape(cfg.image_size, params.ingest.roi)
    if min(height, width) < spec.min_size:
        raise ConfigError(f"train.{name}.image_size: {cfg.image_size} gives inputs of {height} x {width} px, below "
                          f"{name}'s minimum of {spec.min_size} px per side (pretrain.models lists {name})")
    if cfg.batch_norm and name not in ("vgg16", "vgg19"):
        raise ConfigError(f"train.{name}.batch_norm: true selects VGG's BatchNorm variant; {name} has none "
                          f"({variant(name, False)})")


def write_disabled(params: Params, out: Path, summary: Path) -> dict[str, Any]:
    """Every model's marker and the summary ``{"enabled": false}``: no torch, well under a second."""
    from spinedxa.config import MODEL_NAMES

    with atomic_dir(out) as tmp:
        for name in MODEL_NAMES:
            weights_policy.write_pretrained_marker(tmp / name, name)
    record = {"enabled": False, "models": [], "seconds": {}, "cpu": ""}
    jsonfile.write(summary, record)
    log.info("pretrain: disabled (pretrain.enabled false); wrote markers to %s", out)
    return record


def run_pretrain(params: Params, out: Path, summary: Path, *, processes: int | None = None) -> dict[str, Any]:
    """The stage: render the pool, pretrain ``pretrain.models`` (side by side in ``processes`` processes, default
    ``runtime.train_processes``), write ``out/<model>/`` for every model and the summary.

    Returns:
        The summary written to ``summary`` (:data:`SUMMARY_KEYS`: per model its wall seconds, the CPU).

    Raises:
        ConfigError: the pool's seed repeats a cohort's, or a model's input is below its minimum.
    """
    if not params.pretrain.enabled:
        return write_disabled(params, Path(out), Path(summary))
    from spinedxa.config import MODEL_NAMES
    from spinedxa.models import variant
    from spinedxa.runtime import cpu_model, training_pool

    names = [m for m in MODEL_NAMES if m in params.pretrain.models]
    for name in names:
        check_input(params, name)
    wall0 = time.perf_counter()
    pool = render_pool(params, params.runtime.workers)
    n = min(processes or params.runtime.train_processes, len(names))
    results: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}
    if n <= 1:
        for name in names:
            results[name] = pretrain_model(params, name, pool)
    else:
        with training_pool(n, __name__) as ex:
            futures = [ex.submit(_pretrain_job, params, name, pool) for name in names]
            for future in concurrent.futures.as_completed(futures):
                name, state, done = future.result()
                results[name] = (state, done)
    cpu = cpu_model()
    with atomic_dir(out) as tmp:
        for name in MODEL_NAMES:
            if name not in results:
                weights_policy.write_pretrained_marker(tmp / name, name)
                continue
            state, done = results[name]
            batch_norm = params.train.model(name).batch_norm
            weights_policy.write_pretrained(tmp / name, name, variant(name, batch_norm), state,
                                            {**pool.record(params), **done, "cpu": cpu})
    record = {"enabled": True, "models": names,
              "seconds": {name: results[name][1]["wall_seconds"] for name in names},
              "cpu_seconds": {name: results[name][1]["cpu_seconds"] for name in names},
              "render_seconds": round(pool.seconds, 1), "wall_seconds": round(time.perf_counter() - wall0, 1),
              "pool_scans": int(len(pool.images)), "cpu": cpu,
              "val_auc_osteoporosis": {name: results[name][1]["val_auc_osteoporosis"] for name in names},
              "val_r": {name: results[name][1]["val_r"] for name in names}}
    jsonfile.write(summary, record)
    return record
