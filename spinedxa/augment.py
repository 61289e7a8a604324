"""Data augmentation of the training split: offline expansion and the on-the-fly transform used by training.

Naeem et al. 2025 "expanded" their 174 images "using various data augmentation techniques" without saying which, and
their reported figures fit augmented copies of test images in the test set (the report's section on the paper's
figures). Here augmentation only ever touches training data, which the split stage has already separated by patient:
an offline copy of a scan is used only in the folds where that scan is a training scan.

Techniques (all configurable under ``augment`` in params.yaml; a technique whose parameter is at its neutral value is
left out of the pipeline), applied in this order with torchvision.transforms.v2:

1. horizontal flip (``hflip``, probability): an AP spine projection mirrored left-right is still a plausible scan;
   vertical flips are not used (the spine's cranio-caudal order carries anatomy).
2. affine (``rotation_deg``, ``scale``, ``translate``): small patient-positioning differences; empty corners are
   filled with 0, the same black as the letterbox padding.
3. elastic deformation (``elastic_alpha``, off by default): soft-tissue and posture variation.
4. brightness and contrast (``brightness``, ``contrast``, as in ``ColorJitter``) and gamma (``gamma`` range):
   differences between scanners, exposure and windowing.
5. additive Gaussian noise (``noise_std``, in units of the [0, 1] intensity range): detector noise.

Two ways to use them (params ``augment.expand`` and ``augment.online``):

- offline expansion (what the paper did; off by default, ``expand: 0``, on in the paper profile):
  :func:`augment_training_set` writes ``augment.expand`` augmented copies of every scan that is a training scan in
  some fold to ``data/augmented`` (versioned by DVC, visible, auditable). Copy ``k`` of an image is drawn from a
  random generator seeded by ``(augment.seed, image sha256, k)``, so the same params give byte-identical files
  whatever the order or subset of images processed;
- online augmentation (on by default): training applies :func:`build_transform` to every image at every epoch, so
  each epoch sees fresh variants. On this cohort fixed offline copies only lengthen each epoch (measured: same
  out-of-fold AUC for less CPU with ``expand: 0``), so the default spends the CPU budget on epochs instead.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.transforms import v2

from spinedxa.config import AugmentConfig
from spinedxa.contracts import augmented as augmented_contract, png16, splits as splits_contract
from spinedxa.files import atomic_dir, atomic_path

log = logging.getLogger(__name__)

# torchvision's ElasticTransform default smoothing (pixels); alpha sets the displacement magnitude.
ELASTIC_SIGMA = 5.0


class RandomGamma(v2.Transform):
    """Gamma correction ``x ** g`` with ``g`` drawn uniformly from ``gamma`` (torchvision has only the functional)."""

    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        if not 0.0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma range {gamma!r} must satisfy 0 < low <= high")
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.gamma
        return {"gamma": float(torch.empty(1).uniform_(low, high))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.adjust_gamma, inpt, gamma=params["gamma"])


class Clamp01(v2.Transform):
    """Clamp intensities to [0, 1] (affine interpolation and noise may step slightly outside)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return inpt.clamp(0.0, 1.0)


def build_transform(cfg: AugmentConfig) -> Callable[[Tensor], Tensor]:
    """The augmentation pipeline for ``1 x H x W`` float tensors in [0, 1] (offline copies and online training).

    Random draws come from torch's global generator: seed it (or use :func:`augment_image`) for reproducible output.
    """
    steps: list[v2.Transform] = []
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.rotation_deg > 0 or cfg.translate > 0 or cfg.scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation_deg,
                translate=(cfg.translate, cfg.translate) if cfg.translate > 0 else None,
                scale=cfg.scale,
                # Nearest neighbour, not bilinear: resampling every training image bilinearly blurs the trabecular
                # texture that carries the label, while the scored scans are never resampled (measured on the
                # default cohort: cnn21 out-of-fold ROC-AUC 0.76 with bilinear, see README "Recipes").
                interpolation=v2.InterpolationMode.NEAREST,
                fill=0.0,
            )
        )
    if cfg.elastic_alpha > 0:
        steps.append(v2.ElasticTransform(alpha=cfg.elastic_alpha, sigma=ELASTIC_SIGMA, fill=0.0))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None))
    if cfg.gamma != (1.0, 1.0):
        steps.append(RandomGamma(cfg.gamma))
    if cfg.noise_std > 0:
        steps.append(v2.GaussianNoise(mean=0.0, sigma=cfg.noise_std, clip=True))
    steps.append(Clamp01())
    return v2.Compose(steps)


def flip_only(cfg: AugmentConfig) -> AugmentConfig:
    """``cfg`` with every technique but the horizontal flip at its neutral value (``train.<model>.augment: flip``)."""
    return dataclasses.replace(cfg, rotation_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
                               gamma=(1.0, 1.0), noise_std=0.0, elastic_alpha=0.0)


def copy_seed(seed: int, sha256: str, k: int) -> int:
    """Seed of augmented copy ``k`` of the image with raw-file hash ``sha256`` (independent of processing order)."""
    entropy = [seed, int(sha256[:16], 16), k]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def augment_image(image: Tensor, transform: Callable[[Tensor], Tensor], seed: int) -> Tensor:
    """Apply ``transform`` to ``image`` with torch's generator seeded by ``seed``; the global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


@dataclass(frozen=True)
class TrainImage:
    """A scan that is a training scan in at least one fold: what augmentation needs about one parent image."""

    source: str
    sha256: str
    patient_id: str
    label: str
    image: str  # its ROI image, relative to the ingested directory


def training_rows(splits_csv: str | Path) -> list[TrainImage]:
    """Scans that are ``train`` in at least one fold, sorted by source (a scan only ever val/test is never returned).

    Raises:
        ValueError: a training row without a sha256 or ROI image path.
    """
    splits_csv = Path(splits_csv)
    frame = splits_contract.read(splits_csv)
    train = frame[frame["split"] == "train"].drop_duplicates("source").sort_values("source", kind="stable")
    rows = []
    for row in train.itertuples(index=False):
        if len(row.sha256) < 16 or not row.roi:
            raise ValueError(f"{splits_csv}: {row.source!r}: a training row needs a sha256 and an ROI image path")
        rows.append(TrainImage(row.source, row.sha256, row.patient_id, row.label, row.roi))
    return rows


def augment_training_set(
    cfg: AugmentConfig, splits_csv: str | Path, images_dir: str | Path, out_dir: str | Path
) -> pd.DataFrame:
    """Write ``cfg.expand`` augmented copies of every training scan and their index to ``out_dir`` (atomically).

    Output (docs/CONTRACTS.md): ``out_dir/images/<sha256[:16]>_aug<k>.png`` (16-bit grayscale PNG, the parent's size)
    and ``out_dir/index.csv`` (empty when ``expand`` is 0). Scans that are never a training scan are never opened.

    Returns:
        The index (one row per written copy).

    Raises:
        ValueError: no scan is a training scan, or a row is malformed.
        FileNotFoundError: a training image is missing.
    """
    images_dir = Path(images_dir)
    rows = training_rows(splits_csv)
    if not rows:
        raise ValueError(f"{splits_csv}: no training rows to augment")
    transform = build_transform(cfg)
    records = []
    with atomic_dir(out_dir) as tmp:
        (tmp / augmented_contract.IMAGES_DIR).mkdir()
        for row in rows if cfg.expand else []:
            parent = torch.from_numpy(png16.read(images_dir / row.image)).unsqueeze(0)
            for k in range(1, cfg.expand + 1):
                rel = f"{augmented_contract.IMAGES_DIR}/{row.sha256[:16]}_aug{k}.png"
                copy = augment_image(parent, transform, copy_seed(cfg.seed, row.sha256, k))
                png16.write(tmp / rel, copy.squeeze(0).numpy(), atomic=False)
                records.append({"image": rel, "parent_source": row.source, "parent_sha256": row.sha256,
                                "parent_image": row.image, "patient_id": row.patient_id, "label": row.label, "k": k})
        index = pd.DataFrame(records, columns=list(augmented_contract.COLUMNS))
        augmented_contract.write(tmp / augmented_contract.FILE_NAME, index)
    log.info("augment: %d training scans -> %d augmented copies in %s", len(rows), len(index), out_dir)
    return index


def grid_rows(rows: Sequence[TrainImage], per_class: int = 2) -> list[TrainImage]:
    """Pick up to ``per_class`` training images of each label (first by source) for the augmentation grid."""
    chosen: list[TrainImage] = []
    for label in sorted({r.label for r in rows}):
        chosen += [r for r in rows if r.label == label][:per_class]
    return chosen


def write_grid(
    cfg: AugmentConfig,
    splits_csv: str | Path,
    images_dir: str | Path,
    path: str | Path,
    *,
    per_class: int = 2,
    n_augmented: int = 4,
) -> None:
    """Save a PNG grid: for a few training images, the original and ``n_augmented`` augmentations.

    Augmentation ``k`` uses the seed of offline copy ``k``, so the first ``augment.expand`` columns show exactly the
    copies written to ``data/augmented``. Titles show only the class and copy number (no identifiers).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on pipeline machines
    import matplotlib.pyplot as plt

    rows = grid_rows(training_rows(splits_csv), per_class)
    if not rows:
        raise ValueError(f"{splits_csv}: no training rows to show")
    transform = build_transform(cfg)
    n_cols = n_augmented + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.8 * n_cols, 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        parent = torch.from_numpy(png16.read(Path(images_dir) / row.image)).unsqueeze(0)
        panels = [(parent, f"{row.label}\noriginal")]
        for k in range(1, n_augmented + 1):
            copy = augment_image(parent, transform, copy_seed(cfg.seed, row.sha256, k))
            panels.append((copy, f"aug {k}" + (" (written)" if k <= cfg.expand else " (sample)")))
        for c, (img, title) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img.squeeze(0).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"Training augmentation of the L1-L4 ROI (seed {cfg.seed}, expand {cfg.expand})", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.05, hspace=0.35)  # tight_layout is slow
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
