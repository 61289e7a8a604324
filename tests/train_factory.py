"""Tiny training cohorts and params in the contract formats, shared by the tests of the training modules.

A cohort is what the train stage reads: ``data/split/splits.csv`` in the long format (one row per scan and fold,
:mod:`spinedxa.contracts.splits`), the ROI images it names under ``data/ingested/roi/`` (2:1, 64 x 32 px), the whole
images under ``data/ingested/images/``, and the offline copies with their index under ``data/augmented/``
(:mod:`spinedxa.contracts.augmented`). cnn21 at image_size 64 (inputs 64 x 32, its minimum of 32 px per side), batch
4, 3 epochs, one thread: a fold trains in about a second.

The ``train_workdir`` fixture sets up the working directory these helpers assume (import it into a test module:
``from train_factory import train_workdir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from spinedxa.config import Params, deep_merge, params_from_dict
from spinedxa.contracts import augmented as augmented_contract, png16, splits as splits_contract
from spinedxa.runtime import FastPath

if TYPE_CHECKING:
    from spinedxa.train import TrainPaths

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
EXPERIMENT = "spinedxa-test"
CLASSES = ("normal", "osteoporosis")
#: ROI images: 2:1 (spinedxa.contracts.manifest.ROI_ASPECT), the size the models see at image_size 64.
ROI_SHAPE = (64, 32)
IMAGE_SIZE = ROI_SHAPE[0]
#: Unit roundoff of the autocast dtypes: significand bits 8 (bf16) and 11 (fp16), so one rounding moves a value by
#: at most 2^-8 resp. 2^-11 relative.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
BF16_EPS = UNIT_ROUNDOFF[torch.bfloat16]


def path_tolerance(fast: FastPath) -> float:
    """Relative tolerance between two short trainings (a few epochs) that differ only in how ``fast`` rounds.

    Mixed precision: 8 roundings of its dtype (bf16: 3.1e-2). Autocast rounds the operands of every convolution and
    linear layer, and a few epochs of steps compound them: bf16 against fp32 after 3 epochs of the default cnn21
    recipe on the train_factory cohort differed by up to 1.6e-2 relative on val_loss (AMD EPYC Zen 4, AVX512-BF16).
    fp32 paths (plain, channels_last, DDP): 1e-4, the order of fp32 reductions only (measured <= 3.1e-7).
    """
    if fast.autocast_dtype is None:
        return 1e-4
    return 8 * UNIT_ROUNDOFF[fast.autocast_dtype]


def scans_that_may_flip(fast: FastPath, n_val: int) -> float:
    """Accuracy difference allowed between two such trainings on ``n_val`` validation scans: none in fp32; one scan
    under mixed precision, whose probability may lie within the rounding of the 0.5 threshold."""
    return 0.0 if fast.autocast_dtype is None else 1.0 / n_val + 1e-12


@dataclass(frozen=True)
class Cohort:
    """What :func:`make_dataset` wrote: the split table and, per fold and role, the ROI paths (repo-relative)."""

    splits: pd.DataFrame
    folds: tuple[int, ...]

    def part(self, fold: int, role: str) -> set[str]:
        """ROI paths (relative to ``data/ingested``) of ``fold``'s ``role`` part."""
        return set(splits_contract.part(self.splits, fold, role)["roi"])

    def shas(self, fold: int, role: str) -> set[str]:
        return set(splits_contract.part(self.splits, fold, role)["sha256"])


def _image(rng: np.random.Generator, label: str) -> np.ndarray:
    """A ROI-shaped image; "normal" has horizontal stripes: a texture, not a brightness difference, which BatchNorm
    over a small batch of one class would normalise away."""
    h, w = ROI_SHAPE
    stripes = 0.25 * np.sin(np.arange(h) * 2 * np.pi / 6)[:, None]
    return np.clip(0.35 + rng.uniform(0.0, 0.3, (h, w)) + (stripes if label == "normal" else 0.0), 0.0, 1.0)


def _roles(folds: int, n_train: int, n_val: int, n_test: int) -> tuple[int, list[dict[int, str]], list[str]]:
    """Number of scans, each scan's role per fold and each scan's label.

    k-fold (``folds >= 2``): scan ``i`` is ``test`` in fold ``i % folds``; labels alternate within each fold's test
    part. Holdout (``folds == 1``): the last ``n_test`` scans are ``test``. In every fold the first ``n_val / 2``
    non-test scans of each class are ``val``, the rest ``train`` (both classes in every part).
    """
    if folds >= 2:
        if (n_train + n_val) % (folds - 1):
            raise ValueError(f"n_train + n_val = {n_train + n_val} must be divisible by folds - 1 = {folds - 1}")
        per_fold = (n_train + n_val) // (folds - 1)
        n = per_fold * folds
        test_fold = [i % folds for i in range(n)]
        labels = [CLASSES[(i // folds) % 2] for i in range(n)]
    else:
        n = n_train + n_val + n_test
        test_fold = [0 if i >= n_train + n_val else -1 for i in range(n)]
        labels = [CLASSES[i % 2] for i in range(n)]
    roles: list[dict[int, str]] = [{} for _ in range(n)]
    for k in range(folds):
        per_class = {c: 0 for c in CLASSES}
        for i in range(n):
            if test_fold[i] == k:
                roles[i][k] = "test"
            elif per_class[labels[i]] < n_val // 2:
                roles[i][k] = "val"
                per_class[labels[i]] += 1
            else:
                roles[i][k] = "train"
    return n, roles, labels


def make_dataset(root: Path, *, folds: int = 2, n_train: int = 8, n_val: int = 4, n_test: int = 2, expand: int = 1,
                 seed: int = 0) -> Cohort:
    """Write a tiny cohort under ``root`` (the dvc.yaml layout: ``data/ingested``, ``data/split``, ``data/augmented``).

    Args:
        folds: ``>= 2``: k-fold, every scan ``test`` in exactly one fold (``(n_train + n_val) / (folds - 1)`` scans
            per fold); 1: holdout (one fold 0 with ``n_test`` test scans).
        n_train, n_val: scans in each fold's ``train`` and ``val`` parts (``n_val`` even: half of each class).
        expand: offline copies of every scan that is ``train`` in some fold (as the augment stage makes them).
    """
    rng = np.random.default_rng(seed)
    n, roles, labels = _roles(folds, n_train, n_val, n_test)
    rows, aug = [], []
    for i in range(n):
        label, img = labels[i], _image(rng, labels[i])
        source = f"{label}/scan_{i:04d}.dcm"
        sha = hashlib.sha256(source.encode()).hexdigest()
        image, roi = f"images/{sha[:16]}.png", f"roi/{sha[:16]}.png"
        whole = np.zeros((2 * ROI_SHAPE[0], 2 * ROI_SHAPE[1]))  # the whole scan: the models never see it
        whole[: ROI_SHAPE[0], : ROI_SHAPE[1]] = img
        png16.write(root / "data/ingested" / image, whole)
        png16.write(root / "data/ingested" / roi, img)
        patient = f"P{i:012x}"
        for k, role in roles[i].items():
            rows.append(dict(source=source, sha256=sha, patient_id=patient, label=label, image=image, roi=roi,
                             fold=k, split=role))
        if "train" in roles[i].values():
            for c in range(1, expand + 1):
                rel = f"{augmented_contract.IMAGES_DIR}/{sha[:16]}_aug{c}.png"
                png16.write(root / "data/augmented" / rel, np.flipud(img))
                aug.append(dict(image=rel, parent_source=source, parent_sha256=sha, parent_image=roi,
                                patient_id=patient, label=label, k=c))
    frame = pd.DataFrame(rows, columns=list(splits_contract.COLUMNS))
    (root / "data/split").mkdir(parents=True, exist_ok=True)
    (root / "data/augmented").mkdir(parents=True, exist_ok=True)
    splits_contract.write(root / "data/split/splits.csv", frame)
    augmented_contract.write(root / "data/augmented" / augmented_contract.FILE_NAME,
                             pd.DataFrame(aug, columns=list(augmented_contract.COLUMNS)))
    table = splits_contract.read(root / "data/split/splits.csv")
    return Cohort(table, tuple(splits_contract.folds(table)))


def paths_for(model: str) -> TrainPaths:
    """The stage's paths as dvc.yaml passes them (relative to the repo root = cwd)."""
    from spinedxa.train import TrainPaths  # the training stack (MLflow) only where a test trains

    return TrainPaths(Path("data/split/splits.csv"), Path("data/ingested"), Path("data/augmented"),
                      Path(f"models/{model}"), Path(f"reports/train/{model}.csv"), Path(f"checkpoints/{model}"))


def make_params(*, runtime: dict | None = None, augment: dict | None = None, **train_overrides: object) -> Params:
    """Repo params with a tiny cnn21 (image_size 64, batch 4, 3 epochs, the repo's recipe otherwise), one training
    process, a checkpoint after every epoch (the resume tests kill a fit after a given epoch) and the test
    experiment; ``train_overrides`` go under ``train``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    overlay = {
        "augment": {"online": False, **(augment or {})},
        "train": {"patience": 0, "cnn21": {"image_size": IMAGE_SIZE, "epochs": 3, "batch_size": 4}},
        "runtime": {"train_processes": 1, "checkpoint_every_s": 0, "mlflow_experiment": EXPERIMENT,
                    **(runtime or {})},
    }
    return params_from_dict(deep_merge(deep_merge(raw, overlay), {"train": train_overrides}))


def raw_params(params: Params) -> dict:
    """``params`` back to a plain mapping (as params.yaml would hold it)."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


def fold_dir(model_dir: Path, fold: int) -> Path:
    return Path(model_dir) / f"fold{fold}"


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A fold model's state dict (``models/<m>/fold<k>``)."""
    return torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def model_bytes(model_dir: Path) -> dict[str, bytes]:
    """Every fold's ``model.pt`` file content, by fold directory name."""
    return {d.name: (d / "model.pt").read_bytes() for d in sorted(Path(model_dir).glob("fold*"))}


class Killed(Exception):
    """Stands in for a kill after an epoch's checkpoint is on disk."""


def kill_at_call(n: int) -> Callable[[int], None]:
    """An ``on_epoch_end`` hook that raises :class:`Killed` at its ``n``-th call (the folds of one process run one
    after the other, so call ``epochs + 1`` is fold 1's first epoch)."""
    calls = []

    def hook(epoch: int) -> None:
        calls.append(epoch)
        if len(calls) == n:
            raise Killed(f"killed after epoch {epoch} (call {n})")

    return hook


@pytest.fixture
def train_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """cwd = a tmp "repo root" (no git work tree) with a tiny 2-fold cohort (:func:`make_dataset`), its own MLflow
    store (conftest ``mlflow_store``), one thread, no torchrun environment, no experiment override."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPINEDXA_THREADS", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    make_dataset(tmp_path)
    return tmp_path
