"""Tests for spinedxa.data: PNG reading/writing, letterboxing, split and training item lists, the cached dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spinedxa.data import (
    DXADataset,
    ImageItem,
    letterbox,
    load_split,
    load_training_items,
    read_image,
    stack_images,
    write_image,
)

CLASSES = ("normal", "osteoporosis")


# ------------------------------------------------------------------------------------------ read / write


@pytest.mark.parametrize(
    ("array", "expected_max"),
    [
        (np.array([[0, 65535], [32768, 1]], dtype=np.uint16), 1.0),
        (np.array([[0, 255], [128, 1]], dtype=np.uint8), 1.0),
        (np.array([[0, 1000], [0, 0]], dtype=np.uint16), 1000 / 65535),
    ],
)
def test_read_image_scales_to_unit_range(tmp_path: Path, array: np.ndarray, expected_max: float) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    img = read_image(path)
    assert img.dtype == np.float32 and img.shape == array.shape
    assert img.min() == 0.0
    assert img.max() == pytest.approx(expected_max)


def test_read_image_rejects_colour(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"rgb.png: expected a grayscale image, got mode 'RGB'"):
        read_image(path)


def test_write_image_round_trip_is_16_bit_and_deterministic(tmp_path: Path) -> None:
    img = np.linspace(0, 1, 12 * 9, dtype=np.float32).reshape(12, 9)
    write_image(tmp_path / "a.png", img)
    write_image(tmp_path / "b.png", img)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as png:
        assert png.mode.startswith("I;16") and png.size == (9, 12)
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), img, atol=1 / 65535)


@pytest.mark.parametrize(
    ("img", "message"),
    [(np.full((3, 3), 1.5), r"values must lie in \[0, 1\]"), (np.full((3, 3), np.nan), r"values must lie"),
     (np.zeros((3, 3, 3)), r"expected a 2-D image")],
)
def test_write_image_rejects_bad_arrays(tmp_path: Path, img: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_image(tmp_path / "x.png", img)
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ letterbox


@pytest.mark.parametrize(
    ("shape", "size"), [((40, 30), 64), ((30, 40), 64), ((100, 60), 32), ((64, 64), 64), ((7, 3), 5)]
)
def test_letterbox_shape_and_range(shape: tuple[int, int], size: int) -> None:
    img = np.random.default_rng(0).uniform(0, 1, size=shape).astype(np.float32)
    out = letterbox(img, size)
    assert out.shape == (size, size) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_letterbox_pads_short_side_with_black_and_centres() -> None:
    img = np.ones((40, 20), dtype=np.float32)  # tall: padding left and right
    out = letterbox(img, 40)
    assert out[:, :10].max() == 0.0 and out[:, 30:].max() == 0.0
    assert out[:, 10:30].min() == 1.0


def test_letterbox_keeps_aspect_ratio_when_resizing() -> None:
    img = np.ones((80, 40), dtype=np.float32)
    out = letterbox(img, 40)  # 80 x 80 square -> 40 x 40: the image occupies the middle 20 columns
    assert out[:, 20].min() == pytest.approx(1.0)
    assert out[:, :8].max() < 0.05 and out[:, 32:].max() < 0.05


@pytest.mark.parametrize(("img", "size"), [(np.zeros((0, 5)), 8), (np.zeros((4, 4, 1)), 8), (np.zeros((4, 4)), 0)])
def test_letterbox_rejects(img: np.ndarray, size: int) -> None:
    with pytest.raises(ValueError, match="letterbox"):
        letterbox(img, size)


# ------------------------------------------------------------------------------------------ item lists


@pytest.mark.parametrize(("split", "n"), [("train", 6), ("val", 2), ("test", 2)])
def test_load_split(tiny_split: tuple[Path, Path], split: str, n: int) -> None:
    splits_csv, ingested = tiny_split
    items = load_split(splits_csv, ingested, split, CLASSES)
    assert len(items) == n
    assert all(isinstance(it, ImageItem) and it.path.is_file() for it in items)
    assert all(it.source.split("/")[1].startswith(split) for it in items)
    assert sorted({it.label for it in items}) == [0, 1]
    assert all(it.label == CLASSES.index(it.source.split("/")[0]) for it in items)
    assert all(it.patient_id.startswith("P") and len(it.patient_id) == 13 for it in items)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ("bad_label", ValueError, r"splits.csv: row \d+: label 'osteopenia' is not one of \['normal', 'osteo"),
        ("bad_split", ValueError, r"splits.csv: unknown split value\(s\) \['holdout'\]"),
        ("no_column", ValueError, r"splits.csv: missing column\(s\) \['patient_id'\]"),
        ("missing_image", FileNotFoundError, r"splits.csv: row \d+: image 'images/.*\.png' not found"),
    ],
)
def test_load_split_errors(tiny_split: tuple[Path, Path], edit: str, error: type[Exception], message: str) -> None:
    splits_csv, ingested = tiny_split
    frame = pd.read_csv(splits_csv, dtype=str)
    first_train = frame.index[frame["split"] == "train"][0]
    if edit == "bad_label":
        frame.loc[first_train, "label"] = "osteopenia"
    elif edit == "bad_split":
        frame.loc[first_train, "split"] = "holdout"
    elif edit == "no_column":
        frame = frame.drop(columns="patient_id")
    elif edit == "missing_image":
        (ingested / frame.loc[first_train, "image"]).unlink()
    frame.to_csv(splits_csv, index=False)
    with pytest.raises(error, match=message):
        load_split(splits_csv, ingested, "train", CLASSES)


def test_load_split_unknown_split_name(tiny_split: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"unknown split 'dev'"):
        load_split(*tiny_split, "dev", CLASSES)


def _write_augmented(root: Path, splits_csv: Path, ingested: Path, parents_split: str) -> Path:
    """A minimal data/augmented: one copy (the parent image itself) per parent of ``parents_split``."""
    frame = pd.read_csv(splits_csv, dtype=str)
    out = root / "augmented"
    (out / "images").mkdir(parents=True)
    rows = []
    for _, row in frame[frame["split"] == parents_split].iterrows():
        rel = f"images/{row['sha256'][:16]}_aug1.png"
        (out / rel).write_bytes((ingested / row["image"]).read_bytes())
        rows.append({"image": rel, "parent_source": row["source"], "parent_sha256": row["sha256"],
                     "parent_image": row["image"], "patient_id": row["patient_id"], "label": row["label"], "k": 1})
    pd.DataFrame(rows).to_csv(out / "index.csv", index=False)
    return out


def test_load_training_items_adds_augmented_copies(tiny_split: tuple[Path, Path], tmp_path: Path) -> None:
    splits_csv, ingested = tiny_split
    augmented = _write_augmented(tmp_path, splits_csv, ingested, "train")
    items = load_training_items(splits_csv, ingested, augmented, CLASSES)
    assert len(items) == 12
    copies = [it for it in items if "#aug" in it.source]
    assert len(copies) == 6
    assert all(it.source.endswith("#aug1") and it.path.parent == augmented / "images" for it in copies)
    originals = {it.source: it for it in items[:6]}
    for copy in copies:
        parent = originals[copy.source.removesuffix("#aug1")]
        assert (copy.label, copy.patient_id) == (parent.label, parent.patient_id)


def test_load_training_items_rejects_copies_of_test_images(tiny_split: tuple[Path, Path], tmp_path: Path) -> None:
    splits_csv, ingested = tiny_split
    augmented = _write_augmented(tmp_path, splits_csv, ingested, "test")
    with pytest.raises(ValueError, match=r"index.csv: row 2: parent 'normal/test_00.dcm' is not in the training split"):
        load_training_items(splits_csv, ingested, augmented, CLASSES)


def test_load_training_items_needs_the_index(tiny_split: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index.csv: not found"):
        load_training_items(*tiny_split, tmp_path / "nowhere", CLASSES)


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_decodes_once_and_returns_unit_tensors(
    tiny_split: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import spinedxa.data as data

    items = load_split(*tiny_split, "train", CLASSES)
    calls: list[Path] = []
    real_read = data.read_image

    def spy(path: Path) -> np.ndarray:
        calls.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(data, "read_image", spy)
    ds = DXADataset(items, 32)
    for _ in range(2):  # two "epochs"
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (1, 32, 32) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert label == items[i].label
    assert len(calls) == len(items)  # decoded at construction only
    expected = stack_images(items, 32)
    assert torch.allclose(torch.stack([ds[i][0] for i in range(len(ds))]), expected, atol=1e-3)  # float16 cache


def test_dataset_applies_transform_per_access(tiny_split: tuple[Path, Path]) -> None:
    items = load_split(*tiny_split, "val", CLASSES)
    counter = {"n": 0}

    def invert(x: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return 1.0 - x

    plain, transformed = DXADataset(items, 32), DXADataset(items, 32, transform=invert)
    assert torch.allclose(transformed[0][0], 1.0 - plain[0][0])
    transformed[0]
    assert counter["n"] == 2


def test_stack_images(tiny_split: tuple[Path, Path]) -> None:
    items = load_split(*tiny_split, "test", CLASSES)
    batch = stack_images(items, 48)
    assert batch.shape == (2, 1, 48, 48) and batch.dtype == torch.float32
    assert stack_images([], 48).shape == (0, 1, 48, 48)
