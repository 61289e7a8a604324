"""spinedxa.data: model input shapes, fitting ROI images to them, one fold's parts and training items (with the
augmented copies of that fold's training scans only), and the cached dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinedxa.contracts import augmented as augmented_contract, png16, splits as splits_contract
from spinedxa.data import (
    DXADataset,
    ImageItem,
    fit,
    input_shape,
    load_item_image,
    part_items,
    read_image,
    stack_images,
    training_items,
)

CLASSES = ("normal", "osteoporosis")
ROLES = ("train", "val", "test")


# ------------------------------------------------------------------------------------------ shapes and fit


@pytest.mark.parametrize("size, expected", [(64, (64, 32)), (96, (96, 48)), (150, (150, 75)), (65, (65, 32)),
                                            (1, (1, 1))])
def test_input_shape_is_the_roi_aspect(size: int, expected: tuple[int, int]) -> None:
    assert input_shape(size) == expected


@pytest.mark.parametrize("shape, out", [((40, 20), (64, 32)), ((224, 112), (96, 48)), ((30, 40), (64, 32)),
                                        ((100, 60), (32, 16)), ((64, 32), (64, 32)), ((7, 3), (5, 3))])
def test_fit_shape_and_range(shape: tuple[int, int], out: tuple[int, int]) -> None:
    img = np.random.default_rng(0).uniform(0, 1, size=shape).astype(np.float32)
    fitted = fit(img, out)
    assert fitted.shape == out and fitted.dtype == np.float32
    assert 0.0 <= fitted.min() and fitted.max() <= 1.0


def test_fit_of_the_right_shape_is_the_image_itself() -> None:
    img = np.random.default_rng(1).uniform(0, 1, size=(64, 32)).astype(np.float32)
    np.testing.assert_array_equal(fit(img, (64, 32)), img)


def test_fit_pads_with_black_centred_to_the_aspect() -> None:
    img = np.ones((40, 40), dtype=np.float32)  # square into 2:1: black above and below
    out = fit(img, (80, 40))
    assert out[:20].max() == 0.0 and out[60:].max() == 0.0
    assert out[20:60].min() == 1.0


def test_fit_keeps_the_aspect_ratio_when_resizing() -> None:
    img = np.ones((40, 40), dtype=np.float32)
    out = fit(img, (40, 20))  # padded to 80 x 40, shrunk to 40 x 20: the image fills the middle 20 rows
    assert out[20, :].min() == pytest.approx(1.0, abs=1e-3)
    assert out[:5].max() < 0.05 and out[-5:].max() < 0.05


def test_fit_shrinking_is_anti_aliased() -> None:
    """A one-pixel checkerboard (finer than the output grid) averages to grey instead of aliasing to stripes."""
    img = (np.indices((128, 64)).sum(axis=0) % 2).astype(np.float32)
    out = fit(img, (32, 16))
    assert abs(float(out.mean()) - 0.5) < 0.05 and float(out.std()) < 0.1


@pytest.mark.parametrize("img, shape", [(np.zeros((0, 5)), (8, 4)), (np.zeros((4, 4, 1)), (8, 4)),
                                        (np.zeros((4, 4)), (0, 4)), (np.zeros((4, 4)), (8, -1))])
def test_fit_rejects(img: np.ndarray, shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="fit:"):
        fit(img, shape)


# ------------------------------------------------------------------------------------------ one fold's parts


@pytest.mark.parametrize("fold", [0, 1, 2])
@pytest.mark.parametrize("role", ROLES)
def test_part_items_are_the_fold_roles_roi_images(tiny_split: tuple[Path, Path], fold: int, role: str) -> None:
    splits_csv, ingested = tiny_split
    table = splits_contract.read(splits_csv)
    expected = table[(table["fold"] == fold) & (table["split"] == role)].sort_values("source")
    items = part_items(splits_csv, ingested, fold, role, CLASSES)
    assert [it.source for it in items] == list(expected["source"]) and items
    assert all(isinstance(it, ImageItem) and it.fold == fold for it in items)
    assert [it.path for it in items] == [ingested / r for r in expected["roi"]]  # the ROI, not the whole image
    assert all(it.path.parent.name == "roi" and it.path.is_file() for it in items)
    assert [it.label for it in items] == [CLASSES.index(x) for x in expected["label"]]
    assert [it.patient_id for it in items] == list(expected["patient_id"])
    assert sorted({it.label for it in items}) == [0, 1]
    assert items == part_items(splits_csv, ingested, fold, role, CLASSES, table=table)  # an already-read table


def test_parts_of_a_fold_are_patient_disjoint_and_cover_every_scan(tiny_split: tuple[Path, Path]) -> None:
    splits_csv, ingested = tiny_split
    every = set(splits_contract.read(splits_csv)["source"])
    for fold in (0, 1, 2):
        parts = {r: part_items(splits_csv, ingested, fold, r, CLASSES) for r in ROLES}
        patients = {r: {it.patient_id for it in items} for r, items in parts.items()}
        assert patients["train"].isdisjoint(patients["test"]) and patients["val"].isdisjoint(patients["test"])
        assert patients["train"].isdisjoint(patients["val"])
        assert set().union(*({it.source for it in items} for items in parts.values())) == every


def _edit_splits(splits_csv: Path, edit) -> None:
    edit(pd.read_csv(splits_csv, dtype=str, keep_default_na=False)).to_csv(splits_csv, index=False)


@pytest.mark.parametrize("edit, error, message", [
    ("bad_label", ValueError, r"splits\.csv: label 'osteopenia' is not one of \['normal', 'osteoporosis'\]"),
    ("bad_role", ValueError, r"splits\.csv: unknown split value\(s\) \['holdout'\]"),
    ("no_roi_column", ValueError, r"splits\.csv: missing column\(s\) \['roi'\]"),
    ("missing_roi_file", FileNotFoundError, r"splits\.csv: image 'roi/[0-9a-f]{16}\.png' not found under"),
    ("empty_roi_path", FileNotFoundError, r"splits\.csv: image '' not found"),
])
def test_part_items_errors_name_the_file(tiny_split: tuple[Path, Path], edit: str, error: type[Exception],
                                         message: str) -> None:
    splits_csv, ingested = tiny_split
    table = splits_contract.read(splits_csv)
    first = table.index[(table["fold"] == 0) & (table["split"] == "train")][0]

    def change(frame: pd.DataFrame) -> pd.DataFrame:
        if edit == "bad_label":
            frame.loc[first, "label"] = "osteopenia"
        elif edit == "bad_role":
            frame.loc[first, "split"] = "holdout"
        elif edit == "no_roi_column":
            return frame.drop(columns="roi")
        elif edit == "missing_roi_file":
            (ingested / frame.loc[first, "roi"]).unlink()
        elif edit == "empty_roi_path":
            frame.loc[first, "roi"] = ""
        return frame

    _edit_splits(splits_csv, change)
    with pytest.raises(error, match=message):
        part_items(splits_csv, ingested, 0, "train", CLASSES)


@pytest.mark.parametrize("fold, role, message", [(0, "dev", r"unknown split role 'dev'"),
                                                 (7, "train", r"fold 7 is not in the split table")])
def test_part_items_unknown_fold_or_role(tiny_split: tuple[Path, Path], fold: int, role: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        part_items(*tiny_split, fold, role, CLASSES)


def test_holdout_table_has_one_fold(tmp_path: Path) -> None:
    from conftest import write_tiny_split

    splits_csv, ingested = write_tiny_split(tmp_path, protocol="holdout")
    assert splits_contract.folds(splits_contract.read(splits_csv)) == [0]
    assert part_items(splits_csv, ingested, 0, "test", CLASSES)
    with pytest.raises(ValueError, match=r"fold 1 is not in the split table \(folds \[0\]\)"):
        part_items(splits_csv, ingested, 1, "test", CLASSES)


# ------------------------------------------------------------------------------------------ training items


def _write_augmented(root: Path, splits_csv: Path, ingested: Path) -> Path:
    """A data/augmented as the augment stage lays it out: one copy (the parent's ROI, flipped) of every scan that is
    a training scan in some fold, which under k-fold includes scans that are val or test in other folds."""
    table = splits_contract.read(splits_csv)
    parents = table[table["split"] == "train"].drop_duplicates("source")
    out = root / "augmented"
    (out / augmented_contract.IMAGES_DIR).mkdir(parents=True)
    rows = []
    for row in parents.itertuples(index=False):
        rel = f"{augmented_contract.IMAGES_DIR}/{row.sha256[:16]}_aug1.png"
        png16.write(out / rel, np.fliplr(png16.read(ingested / row.roi)))
        rows.append({"image": rel, "parent_source": row.source, "parent_sha256": row.sha256, "parent_image": row.roi,
                     "patient_id": row.patient_id, "label": row.label, "k": 1})
    augmented_contract.write(out / augmented_contract.FILE_NAME, pd.DataFrame(rows))
    return out


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_training_items_add_copies_of_that_folds_training_scans_only(tiny_split: tuple[Path, Path], tmp_path: Path,
                                                                     fold: int) -> None:
    splits_csv, ingested = tiny_split
    augmented = _write_augmented(tmp_path, splits_csv, ingested)
    table = splits_contract.read(splits_csv)
    train = table[(table["fold"] == fold) & (table["split"] == "train")]
    held_out = table[(table["fold"] == fold) & (table["split"] != "train")]
    assert len(augmented_contract.read(augmented / "index.csv")) > len(train)  # copies of other folds' scans exist

    items = training_items(splits_csv, ingested, augmented, fold, CLASSES)
    originals, copies = items[: len(train)], items[len(train):]
    assert [it.source for it in originals] == sorted(train["source"])
    assert sorted(it.source.removesuffix("#aug1") for it in copies) == sorted(train["source"])
    assert all(it.source.endswith("#aug1") and it.path.parent == augmented / "images" for it in copies)
    assert not {it.source.removesuffix("#aug1") for it in copies} & set(held_out["source"])
    assert not {it.patient_id for it in items} & set(held_out["patient_id"])  # no held-out patient, no copy of one
    by_source = {it.source: it for it in originals}
    for copy in copies:
        parent = by_source[copy.source.removesuffix("#aug1")]
        assert (copy.label, copy.patient_id, copy.fold) == (parent.label, parent.patient_id, fold)


def test_training_items_without_copies(tiny_split: tuple[Path, Path], tmp_path: Path) -> None:
    splits_csv, ingested = tiny_split
    out = tmp_path / "augmented"
    (out / "images").mkdir(parents=True)
    augmented_contract.write(out / "index.csv", pd.DataFrame(columns=list(augmented_contract.COLUMNS)))
    assert training_items(splits_csv, ingested, out, 0, CLASSES) == part_items(splits_csv, ingested, 0, "train",
                                                                               CLASSES)


def test_training_items_need_the_index(tiny_split: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index\.csv: not found"):
        training_items(*tiny_split, tmp_path / "nowhere", 0, CLASSES)


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_decodes_once_and_returns_fitted_unit_tensors(
    tiny_split: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import spinedxa.data as data

    items = part_items(*tiny_split, 0, "train", CLASSES)
    calls: list[Path] = []
    real_read = data.read_image

    def spy(path: Path) -> np.ndarray:
        calls.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(data, "read_image", spy)
    shape = input_shape(64)
    ds = DXADataset(items, shape)
    for _ in range(2):  # two "epochs"
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (1, 64, 32) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert label == items[i].label
    assert len(calls) == len(items)  # decoded at construction only
    expected = stack_images(items, shape)
    assert torch.allclose(torch.stack([ds[i][0] for i in range(len(ds))]), expected, atol=1e-3)  # float16 cache
    assert torch.allclose(expected[0, 0], torch.from_numpy(fit(read_image(items[0].path), shape)))


def test_dataset_applies_transform_per_access(tiny_split: tuple[Path, Path]) -> None:
    items = part_items(*tiny_split, 0, "val", CLASSES)
    counter = {"n": 0}

    def invert(x: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return 1.0 - x

    plain, transformed = DXADataset(items, (32, 16)), DXADataset(items, (32, 16), transform=invert)
    assert torch.allclose(transformed[0][0], 1.0 - plain[0][0])
    transformed[0]
    assert counter["n"] == 2


def test_stack_images(tiny_split: tuple[Path, Path]) -> None:
    items = part_items(*tiny_split, 1, "test", CLASSES)
    batch = stack_images(items, (48, 24))
    assert batch.shape == (len(items), 1, 48, 24) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch[0, 0].numpy(), load_item_image(items[0], (48, 24)))
    assert stack_images([], (48, 24)).shape == (0, 1, 48, 24)
