"""Images for the models: the ROI images of one fold's training, validation or test part, fitted to a model's input.

Models see the located L1-L4 region of each scan (``data/ingested/roi/``, :mod:`spinedxa.roi`), an image of shape
``ROI_ASPECT : 1``. A model's input is ``image_size x image_size / ROI_ASPECT`` (:func:`input_shape`); :func:`fit`
pads an image with black to that aspect ratio (only needed for images of another shape) and resizes it anti-aliased,
so the anatomy is never distorted. :class:`DXADataset` decodes every image once into an in-memory float16 cache
(174 ROIs at 160 x 80 take about 4 MB) instead of re-decoding PNGs every epoch.

Which scans a fold uses comes from the split table (:mod:`spinedxa.contracts.splits`); offline augmented copies from
``data/augmented/index.csv`` (:mod:`spinedxa.contracts.augmented`) are used only in the folds where their parent is a
training scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from skimage.transform import resize
from torch import Tensor
from torch.utils.data import Dataset

from spinedxa.contracts import augmented as augmented_contract, png16, splits as splits_contract
from spinedxa.contracts.manifest import input_shape, model_input_shape  # geometry: one owner, re-exported here

read_image = png16.read


@dataclass(frozen=True)
class ImageItem:
    """One image the models see.

    Attributes:
        path: the PNG file (an ROI image, or an augmented copy of one).
        label: class index into ``data.classes`` (1 = osteoporosis, the positive class).
        source: the raw input it comes from (path relative to ``data.source``); augmented copies add ``#aug<k>``.
        patient_id: pseudonymous patient id (``P`` + 12 hex chars).
        fold: the fold whose part it belongs to.
    """

    path: Path
    label: int
    source: str
    patient_id: str
    fold: int = 0


__all__ = ["ImageItem", "DXADataset", "fit", "input_shape", "model_input_shape", "part_items", "read_image",
           "stack_images", "training_items"]


def fit(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pad ``img`` (``H x W``) with zeros to the aspect ratio of ``shape``, centred, then resize it to ``shape``.

    Returns:
        float32 array of ``shape``.

    Raises:
        ValueError: ``img`` is not a non-empty 2-D array or ``shape`` has a side < 1.
    """
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"fit: expected a non-empty 2-D image, got shape {img.shape}")
    out_h, out_w = shape
    if out_h < 1 or out_w < 1:
        raise ValueError(f"fit: output shape must be positive, got {shape}")
    h, w = img.shape
    scale = max(h / out_h, w / out_w)
    ph, pw = max(h, int(round(out_h * scale))), max(w, int(round(out_w * scale)))
    canvas = np.zeros((ph, pw), dtype=np.float32)
    top, left = (ph - h) // 2, (pw - w) // 2
    canvas[top: top + h, left: left + w] = img
    if (ph, pw) == (out_h, out_w):
        return canvas
    # Bilinear with a Gaussian pre-filter when shrinking (skimage's anti_aliasing) avoids aliasing of fine trabecular
    # texture; mode="edge" keeps that filter from darkening content at the border; preserve_range keeps [0, 1].
    out = resize(canvas, (out_h, out_w), order=1, mode="edge", anti_aliasing=ph > out_h, preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _label_index(path: Path, label: str, classes: Sequence[str]) -> int:
    try:
        return list(classes).index(label)
    except ValueError:
        raise ValueError(f"{path}: label {label!r} is not one of {list(classes)}") from None


def _existing(csv: Path, base: Path, rel: str) -> Path:
    path = base / rel
    if not rel or not path.is_file():
        raise FileNotFoundError(f"{csv}: image {rel!r} not found under {base}")
    return path


def part_items(
    splits_csv: str | Path, images_dir: str | Path, fold: int, role: str, classes: Sequence[str],
    *, table: pd.DataFrame | None = None,
) -> list[ImageItem]:
    """The ROI images of one part (``train``, ``val`` or ``test``) of one fold, in source order.

    Args:
        splits_csv: the split table (read unless ``table`` is given).
        images_dir: the ingest directory the ``roi`` paths are relative to (``data/ingested``).
        table: the already-read split table.

    Raises:
        ValueError: unknown fold or role, or a label not in ``classes``.
        FileNotFoundError: the CSV or one of the images is missing.
    """
    splits_csv, images_dir = Path(splits_csv), Path(images_dir)
    frame = splits_contract.read(splits_csv) if table is None else table
    rows = splits_contract.part(frame, fold, role)
    return [
        ImageItem(_existing(splits_csv, images_dir, r.roi), _label_index(splits_csv, r.label, classes), r.source,
                  r.patient_id, fold)
        for r in rows.itertuples(index=False)
    ]


def training_items(
    splits_csv: str | Path, images_dir: str | Path, augmented_dir: str | Path, fold: int, classes: Sequence[str]
) -> list[ImageItem]:
    """A fold's training scans followed by the offline augmented copies of exactly those scans.

    Raises:
        FileNotFoundError: a CSV or an image is missing.
    """
    frame = splits_contract.read(splits_csv)
    originals = part_items(splits_csv, images_dir, fold, "train", classes, table=frame)
    parents = set(splits_contract.part(frame, fold, "train")["sha256"])
    index_path = Path(augmented_dir) / augmented_contract.FILE_NAME
    index = augmented_contract.read(index_path)
    copies = [
        ImageItem(_existing(index_path, Path(augmented_dir), r.image), _label_index(index_path, r.label, classes),
                  f"{r.parent_source}#aug{r.k}", r.patient_id, fold)
        for r in index.itertuples(index=False) if r.parent_sha256 in parents
    ]
    return originals + copies


def load_item_image(item: ImageItem, shape: tuple[int, int]) -> np.ndarray:
    """Decode and fit one item: float32 array of ``shape`` in [0, 1]."""
    return fit(read_image(item.path), shape)


def stack_images(items: Sequence[ImageItem], shape: tuple[int, int]) -> Tensor:
    """Decode and fit ``items`` into one ``N x 1 x H x W`` float32 tensor in [0, 1] (for evaluation)."""
    if not items:
        return torch.zeros((0, 1, *shape), dtype=torch.float32)
    return torch.from_numpy(np.stack([load_item_image(it, shape) for it in items])).unsqueeze(1)


class DXADataset(Dataset):
    """Fitted ROI images with their labels, decoded once into memory.

    Args:
        items: the images (from :func:`part_items` or :func:`training_items`).
        shape: the model's input ``(height, width)`` (:func:`input_shape`).
        transform: optional online augmentation applied at every access to the ``1 x H x W`` float32 tensor
            (e.g. :func:`spinedxa.augment.build_transform`).

    ``dataset[i]`` is ``(image 1 x H x W float32 in [0, 1], label int)``.
    """

    def __init__(
        self, items: Sequence[ImageItem], shape: tuple[int, int], transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.items = list(items)
        self.shape = shape
        self.transform = transform
        # float16 keeps 11 significant bits (vs 16 in the PNG), far below the noise of DXA intensities, at half the
        # memory of float32; uint8 would keep only 8.
        self._cache = stack_images(self.items, shape).to(torch.float16)
        self.labels: list[int] = [it.label for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._cache[index].to(torch.float32)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]
