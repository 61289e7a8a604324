"""Images for the models: reading ingested PNGs, letterboxing, split and training item lists, and the dataset.

Ingested and augmented images are 16-bit grayscale PNGs (docs/CONTRACTS.md). :func:`read_image` turns one into a
float32 array in [0, 1]; :func:`letterbox` pads it to a square with black (0) and resizes it anti-aliased, so the
aspect ratio of the scan is never distorted. :class:`DXADataset` decodes every image once into an in-memory float16
cache (174 scans at 128 px take about 6 MB) instead of re-decoding PNGs every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from skimage.transform import resize
from torch import Tensor
from torch.utils.data import Dataset

from spinedxa.files import atomic_path

SPLITS = ("train", "val", "test")
SPLITS_COLUMNS = ("source", "sha256", "patient_id", "label", "image", "split")
AUGMENTED_COLUMNS = ("image", "parent_source", "parent_sha256", "parent_image", "patient_id", "label", "k")



@dataclass(frozen=True)
class ImageItem:
    """One image the models see.

    Attributes:
        path: the PNG file.
        label: class index into ``data.classes`` (1 = osteoporosis, the positive class).
        source: the raw input it comes from (path relative to ``data.source``); augmented copies add ``#aug<k>``.
        patient_id: pseudonymous patient id (``P`` + 12 hex chars).
    """

    path: Path
    label: int
    source: str
    patient_id: str


def read_image(path: str | Path) -> np.ndarray:
    """Read a grayscale PNG (16-bit, or 8-bit) as a float32 ``H x W`` array in [0, 1].

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the image is not single-channel grayscale, or its values exceed 16 bits.
    """
    path = Path(path)
    with Image.open(path) as img:
        mode = img.mode
        arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a grayscale image, got mode {mode!r} with shape {arr.shape}")
    # 16-bit is the contract; 8-bit is accepted for real cohorts whose images were prepared elsewhere. Any byte order
    # (Pillow's "I;16B" decodes big-endian).
    if arr.dtype.kind == "u" and arr.dtype.itemsize in (1, 2):
        return (arr / float(np.iinfo(arr.dtype).max)).astype(np.float32)
    # Pillow decodes some 16-bit PNGs as mode "I" (int32); accept them when the values fit 16 bits.
    if arr.dtype == np.int32 and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)):
        return (arr / 65535.0).astype(np.float32)
    raise ValueError(f"{path}: unsupported PNG mode {mode!r} (dtype {arr.dtype}); expected 16-bit or 8-bit grayscale")


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write a float ``H x W`` array in [0, 1] atomically as a 16-bit grayscale PNG (the ingested-image format).

    Pillow writes no timestamp, so equal arrays give byte-identical files.

    Raises:
        ValueError: ``img`` is not 2-D or holds values outside [0, 1] (or NaN).
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{path}: values must lie in [0, 1], got NaN or infinite values")
    if img.size and (img.min() < 0.0 or img.max() > 1.0):
        raise ValueError(f"{path}: values must lie in [0, 1], got range [{img.min()}, {img.max()}]")
    pixels = np.rint(img.astype(np.float64) * 65535.0).astype(np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Pad ``img`` (``H x W``) to a centred square with zeros, then resize it to ``size x size`` (anti-aliased).

    Returns:
        float32 ``size x size`` array.

    Raises:
        ValueError: ``img`` is not a non-empty 2-D array or ``size < 1``.
    """
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"letterbox: expected a non-empty 2-D image, got shape {img.shape}")
    if size < 1:
        raise ValueError(f"letterbox: size must be >= 1, got {size}")
    h, w = img.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + h, left : left + w] = img
    if side == size:
        return square
    # Bilinear with a Gaussian pre-filter when shrinking (skimage's anti_aliasing) avoids aliasing of fine trabecular
    # texture; mode="edge" keeps that filter from darkening image content that touches the border; preserve_range
    # keeps [0, 1] intensities as they are.
    out = resize(square, (size, size), order=1, mode="edge", anti_aliasing=side > size, preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_table(path: str | Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with every column as a string; raise naming the file when ``required`` columns are missing.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a ``required`` column is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


def _label_index(path: Path, row: int, label: str, classes: Sequence[str]) -> int:
    try:
        return list(classes).index(label)
    except ValueError:
        raise ValueError(f"{path}: row {row + 2}: label {label!r} is not one of {list(classes)}") from None


def _existing(csv: Path, base: Path, rel: str, row: int) -> Path:
    path = base / rel
    if not rel or not path.is_file():
        raise FileNotFoundError(f"{csv}: row {row + 2}: image {rel!r} not found under {base}")
    return path


def load_split(
    splits_csv: str | Path, images_dir: str | Path, split: str, classes: Sequence[str]
) -> list[ImageItem]:
    """Items of one split of ``data/split/splits.csv``, in file order.

    Args:
        splits_csv: the split stage's CSV (columns in docs/CONTRACTS.md).
        images_dir: the ingested directory its ``image`` paths are relative to (``data/ingested``).
        split: "train", "val" or "test".
        classes: ``data.classes``; a label's index in it is the item's ``label``.

    Raises:
        ValueError: unknown ``split``, missing columns, or a label not in ``classes`` (message names file and row).
        FileNotFoundError: the CSV or an image of the requested split is missing.
    """
    splits_csv, images_dir = Path(splits_csv), Path(images_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    frame = read_table(splits_csv, SPLITS_COLUMNS)
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{splits_csv}: unknown split value(s) {bad}; expected {list(SPLITS)}")
    items = []
    for i, row in frame.iterrows():
        if row["split"] != split:
            continue
        items.append(
            ImageItem(
                path=_existing(splits_csv, images_dir, row["image"], i),
                label=_label_index(splits_csv, i, row["label"], classes),
                source=row["source"],
                patient_id=row["patient_id"],
            )
        )
    return items


def load_augmented(
    augmented_dir: str | Path, classes: Sequence[str], allowed_parents: set[str] | None = None
) -> list[ImageItem]:
    """Items of ``augmented_dir/index.csv`` (the augment stage's offline copies), in file order.

    Args:
        augmented_dir: ``data/augmented``.
        classes: ``data.classes``.
        allowed_parents: when given, the sha256 of every allowed parent; any other parent is an error (leakage guard).

    Raises:
        ValueError: missing columns, unknown label, or a parent outside ``allowed_parents``.
        FileNotFoundError: index.csv or one of its images is missing.
    """
    augmented_dir = Path(augmented_dir)
    index = augmented_dir / "index.csv"
    frame = read_table(index, AUGMENTED_COLUMNS)
    items = []
    for i, row in frame.iterrows():
        if allowed_parents is not None and row["parent_sha256"] not in allowed_parents:
            raise ValueError(
                f"{index}: row {i + 2}: parent {row['parent_source']!r} is not in the training split "
                "(augmented copies of validation or test images would leak into training)"
            )
        items.append(
            ImageItem(
                path=_existing(index, augmented_dir, row["image"], i),
                label=_label_index(index, i, row["label"], classes),
                source=f"{row['parent_source']}#aug{row['k']}",
                patient_id=row["patient_id"],
            )
        )
    return items


def load_training_items(
    splits_csv: str | Path, images_dir: str | Path, augmented_dir: str | Path, classes: Sequence[str]
) -> list[ImageItem]:
    """Training originals followed by their offline augmented copies (``augmented_dir/index.csv``).

    Raises:
        ValueError: an augmented copy whose parent is not a training image (see :func:`load_augmented`).
        FileNotFoundError: a CSV or an image is missing.
    """
    originals = load_split(splits_csv, images_dir, "train", classes)
    splits = read_table(splits_csv, SPLITS_COLUMNS)
    train_sha = set(splits.loc[splits["split"] == "train", "sha256"])
    return originals + load_augmented(augmented_dir, classes, allowed_parents=train_sha)


def load_item_image(item: ImageItem, image_size: int) -> np.ndarray:
    """Decode and letterbox one item: float32 ``image_size x image_size`` in [0, 1]."""
    return letterbox(read_image(item.path), image_size)


def stack_images(items: Sequence[ImageItem], image_size: int) -> Tensor:
    """Decode and letterbox ``items`` into one ``N x 1 x S x S`` float32 tensor in [0, 1] (for evaluation)."""
    if not items:
        return torch.zeros((0, 1, image_size, image_size), dtype=torch.float32)
    return torch.from_numpy(np.stack([load_item_image(it, image_size) for it in items])).unsqueeze(1)


class DXADataset(Dataset):
    """Letterboxed DXA images with their labels, decoded once into memory.

    Args:
        items: the images (from :func:`load_split` or :func:`load_training_items`).
        image_size: side of the square the images are letterboxed to.
        transform: optional online augmentation applied at every access to the ``1 x S x S`` float32 tensor
            (e.g. :func:`spinedxa.augment.build_transform`).

    ``dataset[i]`` is ``(image 1 x S x S float32 in [0, 1], label int)``.
    """

    def __init__(
        self, items: Sequence[ImageItem], image_size: int, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.items = list(items)
        self.image_size = image_size
        self.transform = transform
        # float16 keeps 11 significant bits (vs 16 in the PNG), far below the noise of DXA intensities, at half the
        # memory of float32; uint8 would keep only 8.
        self._cache = stack_images(self.items, image_size).to(torch.float16)
        self.labels: list[int] = [it.label for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._cache[index].to(torch.float32)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]
