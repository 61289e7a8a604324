"""Tests for spinedxa.augment and stages/augment.py: the transform (nearest-neighbour resampling that keeps the
texture), determinism, reading only scans that are training scans in some fold, the index."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2

from conftest import REPO, run, stage_main, write_tiny_split
from spinedxa.augment import augment_image, augment_training_set, build_transform, copy_seed, training_rows
from spinedxa.config import ConfigError, load_params
from spinedxa.contracts import augmented as augmented_contract, png16, splits as splits_contract

DEFAULT = load_params(REPO / "params.yaml").augment
# Every technique at its neutral value: the pipeline must then leave an image unchanged.
NEUTRAL = dataclasses.replace(
    DEFAULT, rotation_deg=0.0, hflip=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
    gamma=(1.0, 1.0), noise_std=0.0, elastic_alpha=0.0,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _params(tmp_path: Path, name: str = "params.yaml", **augment: object) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["augment"].update(augment)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_stage(tmp_path: Path, splits: Path, ingested: Path, out: str = "augmented", **augment: object) -> Path:
    params = _params(tmp_path, f"params_{out}.yaml", **augment)
    stage_main("augment")(
        ["--params", str(params), "--splits", str(splits), "--images", str(ingested), "--out", str(tmp_path / out),
         "--grid", str(tmp_path / f"{out}_grid.png")]
    )
    return tmp_path / out


def _augment(tmp_path: Path, splits: Path, ingested: Path, out: str = "augmented", **augment: object) -> Path:
    """The offline expansion alone (no grid), with ``augment`` params changed."""
    augment_training_set(dataclasses.replace(DEFAULT, **augment), splits, ingested, tmp_path / out)
    return tmp_path / out


def _image() -> torch.Tensor:
    """A 1 x 48 x 36 test image: asymmetric, mid-grey, with texture, so every technique visibly changes it."""
    img = torch.linspace(0.2, 0.8, 48 * 36).reshape(1, 48, 36)
    img[:, 10:30, 5:15] += 0.1
    return img


def _texture(seed: int = 0) -> torch.Tensor:
    """A 1 x 96 x 48 image of pixel-scale "trabecular" noise on a bright band, in 256 grey levels."""
    g = torch.Generator().manual_seed(seed)
    img = 0.3 + 0.4 * torch.rand(1, 96, 48, generator=g)
    img[:, :, 12:36] += 0.2
    return torch.round(img.clamp(0, 1) * 255) / 255


def _roughness(img: torch.Tensor) -> float:
    """Mean absolute difference of horizontal neighbours in the image's centre (the fine texture)."""
    core = img[0, 24:72, 14:34]
    return float((core[:, 1:] - core[:, :-1]).abs().mean())


# ------------------------------------------------------------------------------------------ the transform


def test_default_transform_keeps_shape_dtype_and_range() -> None:
    transform = build_transform(DEFAULT)
    for seed in range(5):
        out = augment_image(_image(), transform, seed)
        assert out.shape == (1, 48, 36) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_neutral_config_is_identity() -> None:
    image = _image()
    assert torch.equal(build_transform(NEUTRAL)(image), image)


@pytest.mark.parametrize(
    "change",
    [
        {"hflip": 1.0}, {"rotation_deg": 20.0}, {"scale": (1.2, 1.3)}, {"translate": 0.2}, {"brightness": 0.5},
        {"contrast": 0.5}, {"gamma": (0.5, 0.6)}, {"noise_std": 0.05}, {"elastic_alpha": 30.0},
    ],
)
def test_each_technique_changes_the_image(change: dict) -> None:
    image = _image()
    out = augment_image(image, build_transform(dataclasses.replace(NEUTRAL, **change)), seed=3)
    assert out.shape == image.shape
    assert float((out - image).abs().mean()) > 1e-3


def test_augment_image_is_seeded_and_restores_global_rng() -> None:
    transform = build_transform(DEFAULT)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = augment_image(_image(), transform, 11), augment_image(_image(), transform, 11)
    c = augment_image(_image(), transform, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_transform_pickles_for_dataloader_workers() -> None:
    import pickle

    transform = build_transform(dataclasses.replace(DEFAULT, elastic_alpha=10.0))
    clone = pickle.loads(pickle.dumps(transform))
    assert torch.equal(augment_image(_image(), clone, 5), augment_image(_image(), transform, 5))


GEOMETRIC = {"rotation": {"rotation_deg": 20.0}, "scale": {"scale": (0.8, 1.2)}, "translate": {"translate": 0.2},
             "all": {"rotation_deg": 10.0, "scale": (0.9, 1.1), "translate": 0.1, "hflip": 0.5}}


@pytest.mark.parametrize("change", GEOMETRIC.values(), ids=GEOMETRIC.keys())
def test_geometric_augmentation_is_nearest_neighbour_and_keeps_texture(change: dict) -> None:
    """Affine resampling is nearest-neighbour: no new grey levels appear (only the black fill), and the pixel-scale
    texture that carries the label is not smoothed away as bilinear resampling would."""
    image = _texture()
    transform = build_transform(dataclasses.replace(NEUTRAL, **change))
    outs = [augment_image(image, transform, seed) for seed in range(4)]
    assert any(not torch.equal(out, image) for out in outs)
    for out in outs:
        assert set(torch.unique(out).tolist()) <= set(torch.unique(image).tolist()) | {0.0}
        # Nearest-neighbour enlargement repeats some pixels (x1.2: one in six), so a little roughness goes.
        assert _roughness(out) > 0.8 * _roughness(image)
    # What NEAREST avoids: a bilinear 10-degree rotation loses ~40 % of the fine texture (measured 0.58x).
    bilinear = v2.functional.affine(image, angle=10.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                                    interpolation=v2.InterpolationMode.BILINEAR)
    assert _roughness(bilinear) < 0.75 * _roughness(image)


def test_copy_seed_depends_on_seed_hash_and_k() -> None:
    sha = "ab" * 32
    seeds = {copy_seed(7, sha, 1), copy_seed(7, sha, 2), copy_seed(8, sha, 1), copy_seed(7, "cd" * 32, 1)}
    assert len(seeds) == 4
    assert copy_seed(7, sha, 1) == copy_seed(7, sha, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"expand": -1}, r"augment.expand"), ({"hflip": 1.5}, r"augment.hflip"),
        ({"translate": -0.1}, r"augment.translate"),
        ({"brightness": 1.5}, r"augment.brightness"), ({"contrast": -0.2}, r"augment.contrast"),
        ({"rotation_deg": -5.0}, r"augment.rotation_deg"), ({"noise_std": -0.1}, r"augment.noise_std"),
        ({"elastic_alpha": -1.0}, r"augment.elastic_alpha"), ({"scale": (1.1, 0.9)}, r"augment.scale"),
        ({"scale": (0.0, 1.0)}, r"augment.scale"), ({"gamma": (1.2, 0.8)}, r"augment.gamma"),
    ],
)
def test_invalid_augment_params_are_rejected(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(DEFAULT, **change)


# ------------------------------------------------------------------------------------------ offline expansion


def _ever_train(splits_csv: Path) -> pd.DataFrame:
    """One row per scan that is a training scan in at least one fold."""
    table = splits_contract.read(splits_csv)
    return table[table["split"] == "train"].drop_duplicates("source").set_index("sha256")


def test_index_contents(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    splits_csv, ingested = tiny_split
    out = _run_stage(tmp_path, splits_csv, ingested, expand=2)
    index = augmented_contract.read(out / "index.csv")
    train = _ever_train(splits_csv)

    assert list(index.columns) == list(augmented_contract.COLUMNS)
    assert len(index) == 2 * len(train)
    assert set(index["parent_sha256"]) == set(train.index)
    assert sorted(index["k"].unique()) == [1, 2]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(p).name for p in index["image"])
    for _, row in index.iterrows():
        parent = train.loc[row["parent_sha256"]]
        assert row["image"] == f"images/{row['parent_sha256'][:16]}_aug{row['k']}.png"
        # The parent image is the scan's ROI (what the models see), not the whole processed scan.
        assert (row["parent_source"], row["parent_image"], row["patient_id"], row["label"]) == (
            parent["source"], parent["roi"], parent["patient_id"], parent["label"])
        with Image.open(out / row["image"]) as png, Image.open(ingested / row["parent_image"]) as src:
            assert png.mode == src.mode and png.mode.startswith("I;16")  # same format as ingested images
            assert png.size == src.size
        assert not np.array_equal(png16.read(out / row["image"]), png16.read(ingested / row["parent_image"]))
    grid = tmp_path / "augmented_grid.png"
    with Image.open(grid) as png:
        assert png.format == "PNG" and png.size[0] > 200


def test_same_params_give_byte_identical_outputs(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    splits_csv, ingested = tiny_split
    first = _augment(tmp_path, splits_csv, ingested, out="first", expand=2)
    second = _augment(tmp_path, splits_csv, ingested, out="second", expand=2)
    other_seed = _augment(tmp_path, splits_csv, ingested, out="other", expand=2, seed=8)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    images = [f for f in files if f.suffix == ".png"]
    assert images and all((first / f).read_bytes() != (other_seed / f).read_bytes() for f in images)


def test_copies_do_not_depend_on_other_images_or_folds(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    """Copy k of an image is the same whether or not other images (or other folds) are processed with it."""
    splits_csv, ingested = tiny_split
    full = _augment(tmp_path, splits_csv, ingested, out="full", expand=2)
    table = splits_contract.read(splits_csv)
    keep = table[(table["fold"] == 1) & (table["split"] == "train")].iloc[[1, 3]]
    subset_csv = tmp_path / "subset.csv"
    splits_contract.write(subset_csv, keep)
    subset = _augment(tmp_path, subset_csv, ingested, out="subset", expand=2)
    written = sorted((subset / "images").iterdir())
    assert len(written) == 2 * 2
    assert all(p.read_bytes() == (full / "images" / p.name).read_bytes() for p in written)


def test_never_reads_scans_that_are_never_training_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holdout protocol: the validation and test scans are never opened (their files are gone)."""
    splits_csv, ingested = write_tiny_split(tmp_path / "cohort", protocol="holdout")
    table = splits_contract.read(splits_csv)
    held_out = table[table["split"] != "train"]
    for rel in [*held_out["roi"], *held_out["image"]]:  # any attempt to open one would now fail
        (ingested / rel).unlink()
    opened: list[str] = []
    real_read = png16.read

    def spy(path: Path) -> np.ndarray:
        opened.append(Path(path).relative_to(ingested).as_posix())
        return real_read(path)

    monkeypatch.setattr(png16, "read", spy)
    out = _run_stage(tmp_path, splits_csv, ingested, expand=1)
    assert opened and set(opened) == set(table.loc[table["split"] == "train", "roi"])
    index = augmented_contract.read(out / "index.csv")
    assert set(index["parent_sha256"]).isdisjoint(held_out["sha256"])


def test_training_rows_are_scans_trained_on_in_some_fold(tmp_path: Path) -> None:
    splits_csv, _ = write_tiny_split(tmp_path / "k", n_patients=12)
    table = splits_contract.read(splits_csv)
    # Fold 0 only, with one of its training scans made val: a scan never trained on is never returned.
    fold0 = table[table["fold"] == 0].copy()
    demoted = fold0.index[fold0["split"] == "train"][0]
    fold0.loc[demoted, "split"] = "val"
    splits_contract.write(tmp_path / "fold0.csv", fold0)
    rows = training_rows(tmp_path / "fold0.csv")
    assert [r.source for r in rows] == sorted(fold0.loc[fold0["split"] == "train", "source"])
    assert fold0.at[demoted, "source"] not in {r.source for r in rows}
    assert all(r.image.startswith("roi/") for r in rows)
    # Under k-fold every scan is a training scan in some fold, each listed once.
    every = training_rows(splits_csv)
    assert [r.source for r in every] == sorted(table["source"].unique())


def test_expand_zero_writes_an_empty_index(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    out = _augment(tmp_path, *tiny_split, expand=0)
    index = augmented_contract.read(out / "index.csv")
    assert list(index.columns) == list(augmented_contract.COLUMNS) and index.empty
    assert list((out / "images").iterdir()) == []


def test_output_dir_is_replaced_whole(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    stale = tmp_path / "augmented" / "images" / "stale_aug9.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    _augment(tmp_path, *tiny_split, expand=1)
    assert not stale.exists()


def test_empty_training_split_is_an_error(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    splits_csv, ingested = tiny_split
    table = splits_contract.read(splits_csv)
    splits_contract.write(splits_csv, table.assign(split=table["split"].replace({"train": "val"})))
    with pytest.raises(ValueError, match=r"splits\.csv: no training rows to augment"):
        augment_training_set(DEFAULT, splits_csv, ingested, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stage_command_line_from_dvc_yaml(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    """The command dvc.yaml runs (relative paths, run from the repo root) works as written."""
    splits_csv, ingested = tiny_split
    n_train = len(_ever_train(splits_csv))
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["augment"]["cmd"]
    (tmp_path / "data" / "split").mkdir(parents=True)
    splits_csv.rename(tmp_path / "data" / "split" / "splits.csv")
    ingested.rename(tmp_path / "data" / "ingested")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "augment.py").write_text((REPO / "stages" / "augment.py").read_text())
    _params(tmp_path, expand=1)
    run(cmd.replace("python ", f"{sys.executable} ", 1), cwd=tmp_path)
    assert len(augmented_contract.read(tmp_path / "data" / "augmented" / "index.csv")) == n_train
    assert (tmp_path / "reports" / "figures" / "augment_grid.png").is_file()
