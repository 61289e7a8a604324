"""Shared fixtures and helpers: the repository root, stage entry points as dvc.yaml calls them, tiny generated
cohorts, and a temporary git copy of the repo for DAG smoke tests."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "osteoporosis")
VENV_BIN = Path(sys.executable).parent

# Tests never reach the network and never share the developer's MLflow store or de-identification key.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("SPINEDXA_DEID_KEY", "test-key-not-secret")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def run(cmd: list[str] | str, cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: int = 1800):
    """Run a command with the test venv first on PATH; on failure, raise with its output."""
    full_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {cmd}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def load_stage(verb: str) -> ModuleType:
    """``stages/<verb>.py`` imported from its file (stages/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{verb}", REPO / "stages" / f"{verb}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_main(verb: str) -> Callable[[list[str] | None], object]:
    """``main`` of ``stages/<verb>.py``."""
    return load_stage(verb).main


def dvc_argv(stage: str, **matrix: str) -> list[str]:
    """The arguments of ``stage``'s command in dvc.yaml (after ``python stages/<verb>.py``), matrix items filled in."""
    import yaml

    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    for key, value in matrix.items():
        cmd = cmd.replace("${item." + key + "}", value)
    return shlex.split(cmd)[2:]


def write_cohort(
    root: Path, n_patients: int = 24, *, size: tuple[int, int] = (48, 32), seed: int = 0, followup_every: int = 4
) -> tuple[Path, Path]:
    """Write ``root/data/ingested/images/*.png`` and ``root/data/split/splits.csv`` (the dvc.yaml layout).

    Osteoporosis images have a darker, noisier central band (the "vertebrae"), so a classifier can learn. Every
    ``followup_every``-th patient has two scans. Patients alternate classes and splits are assigned per patient
    (train 50 %, val 25 %, test 25 %).

    Returns:
        ``(splits_csv, ingested_dir)``.
    """
    import hashlib

    import numpy as np
    import pandas as pd

    from spinedxa.data import write_image

    rng = np.random.default_rng(seed)
    ingested = root / "data" / "ingested"
    rows = []
    h, w = size
    for p in range(n_patients):
        label = p % 2
        split = ("train", "train", "val", "test")[(p // 2) % 4]
        band_level = (0.75 if label == 0 else 0.5) + rng.normal(0, 0.05)
        for visit in range(2 if p % followup_every == 0 else 1):
            img = np.clip(0.15 + rng.normal(0, 0.02, (h, w)), 0, 1)
            band = slice(int(0.3 * w), int(0.7 * w))
            img[:, band] = np.clip(band_level + rng.normal(0, 0.03 + 0.05 * label, (h, band.stop - band.start)), 0, 1)
            source = f"{CLASSES[label]}/scan_{p:04d}_{visit}.dcm"
            sha = hashlib.sha256(source.encode()).hexdigest()
            rel = f"images/{sha[:16]}.png"
            write_image(ingested / rel, img)
            rows.append({"source": source, "sha256": sha, "patient_id": f"P{p:012x}", "label": CLASSES[label],
                         "image": rel, "split": split})
    splits = root / "data" / "split" / "splits.csv"
    splits.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(splits, index=False)
    return splits, ingested


def tracked_files(root: Path) -> list[str]:
    """Files git would commit from ``root`` (tracked plus untracked-but-not-ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    return [p for p in out.split("\0") if p and (root / p).is_file()]


def make_repo_copy(dest: Path, profile: str | None = "profiles/tiny.yaml") -> Path:
    """Copy the project's source (no data, models, venv) to ``dest``, apply ``profile``, and commit it to a new repo."""
    from spinedxa.config import apply_profile

    dest.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files(REPO):
        if rel.startswith(("reports/", "dvc.lock")):
            continue  # start from a clean slate: no committed results
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    (dest / "reports").mkdir(exist_ok=True)
    if profile:
        apply_profile(dest / "params.yaml", dest / profile)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "test@example.invalid"], dest)
    run(["git", "config", "user.name", "spinedxa tests"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy for tests"], dest)
    return dest


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, created once per session (its schema migrations take seconds)."""
    from spinedxa import tracking

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    tracking.init_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_mlflow_db: Path) -> str:
    """A fresh MLflow store for one test (a copy of the empty one) at ``tmp_path/mlflow.db``, set as
    ``MLFLOW_TRACKING_URI``. Experiments created in it keep their artifacts under the test's working directory."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A fresh temporary git+DVC copy of the project with the tiny profile applied."""
    return make_repo_copy(tmp_path / "repo")


def write_tiny_split(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny ingested directory (16-bit PNGs, 36-56 px, mixed aspect ratios) and its splits.csv under ``root``.

    ``counts`` gives images per split (half of each split per class). Returns ``(splits_csv, ingested_dir)``.
    """
    import hashlib

    import numpy as np
    import pandas as pd
    from PIL import Image

    counts = counts or {"train": 6, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    ingested = root / "ingested"
    (ingested / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in counts.items():
        for i in range(n):
            label = ("normal", "osteoporosis")[i % 2]
            source = f"{label}/{split}_{i:02d}.dcm"
            sha = hashlib.sha256(source.encode()).hexdigest()
            h, w = (48, 36) if i % 2 else (40, 56)
            # A bright vertical band (the "spine") on a darker, noisy background.
            img = rng.uniform(0.05, 0.2, size=(h, w))
            img[:, w // 3 : 2 * w // 3] += 0.6
            image = f"images/{sha[:16]}.png"
            Image.fromarray(np.rint(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(ingested / image)
            patient = "P" + hashlib.sha256(f"patient-{split}-{i}".encode()).hexdigest()[:12]
            rows.append({"source": source, "sha256": sha, "patient_id": patient, "label": label, "image": image,
                         "split": split})
    splits_csv = root / "split" / "splits.csv"
    splits_csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).sort_values("source").to_csv(splits_csv, index=False)
    return splits_csv, ingested


@pytest.fixture
def tiny_split(tmp_path: Path) -> tuple[Path, Path]:
    """``(splits_csv, ingested_dir)`` of a tiny generated cohort: 6 train, 2 val, 2 test 16-bit PNGs."""
    return write_tiny_split(tmp_path)
