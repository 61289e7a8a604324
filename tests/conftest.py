"""Shared fixtures and helpers: the repository root, stage entry points as dvc.yaml calls them, tiny generated
cohorts, and a temporary git copy of the repo for DAG smoke tests."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    import pandas as pd

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


def write_split_cohort(
    ingested: Path, splits_csv: Path, *, n_patients: int = 12, folds: int = 3, protocol: str = "kfold", seed: int = 0,
    followup_every: int = 4, roi_shape: tuple[int, int] = (40, 20), image_shape: tuple[int, int] = (56, 40),
) -> "pd.DataFrame":
    """Write a tiny cohort in the ingest + split layout: ``ingested/images/<sha16>.png`` (the whole "scan"),
    ``ingested/roi/<sha16>.png`` (its ROI, ``roi_shape``, 2:1 like real ROIs) and the LONG split table
    ``splits_csv`` (one row per scan and fold, docs/CONTRACTS.md).

    Patient ``p`` has label ``p % 2`` and home fold ``(p // 2) % k`` (``k = folds``; 3 under ``holdout``); every
    ``followup_every``-th patient has two scans. In fold ``f`` the home-fold-``f`` patients are ``test``, the first
    pair (one per class) of home fold ``f + 1`` is ``val``, everyone else ``train``. ``protocol="holdout"`` writes
    fold 0 of that assignment only. Roles are assigned here by hand (not by :mod:`spinedxa.split`), so the tests of
    the readers do not depend on the splitter.

    Osteoporosis ROIs have a darker, noisier central band (the "vertebrae"), so a classifier can learn.

    Returns:
        The split table as written (``fold`` as int).
    """
    import hashlib

    import numpy as np
    import pandas as pd

    from spinedxa.contracts import png16, splits as splits_contract

    if protocol not in ("kfold", "holdout"):
        raise ValueError(f"protocol {protocol!r}; expected 'kfold' or 'holdout'")
    k = folds if protocol == "kfold" else 3
    if n_patients < 2 * k:
        raise ValueError(f"{n_patients} patients are too few for {k} folds with both classes in each")
    rng = np.random.default_rng(seed)
    scans = []
    for p in range(n_patients):
        label = p % 2
        band_level = (0.75 if label == 0 else 0.5) + rng.normal(0, 0.05)
        patient = "P" + hashlib.sha256(f"patient-{seed}-{p}".encode()).hexdigest()[:12]
        for visit in range(2 if p % followup_every == 0 else 1):
            source = f"{CLASSES[label]}/scan_{p:03d}_{visit}.dcm"
            sha = hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()
            roi = np.clip(0.15 + rng.normal(0, 0.02, roi_shape), 0, 1)
            band = slice(int(0.3 * roi_shape[1]), int(0.7 * roi_shape[1]))
            noise = rng.normal(0, 0.03 + 0.05 * label, (roi_shape[0], band.stop - band.start))
            roi[:, band] = np.clip(band_level + noise, 0, 1)
            whole = np.clip(0.1 + rng.normal(0, 0.02, image_shape), 0, 1)
            top, left = (image_shape[0] - roi_shape[0]) // 2, (image_shape[1] - roi_shape[1]) // 2
            whole[top: top + roi_shape[0], left: left + roi_shape[1]] = roi
            image, roi_rel = f"images/{sha[:16]}.png", f"roi/{sha[:16]}.png"
            for rel, pixels in ((image, whole), (roi_rel, roi)):
                (ingested / rel).parent.mkdir(parents=True, exist_ok=True)
                png16.write(ingested / rel, pixels)
            scans.append({"source": source, "sha256": sha, "patient_id": patient, "label": CLASSES[label],
                          "image": image, "roi": roi_rel, "p": p})
    rows = []
    for fold in range(folds if protocol == "kfold" else 1):
        for scan in scans:
            p = scan["p"]
            home, pair = (p // 2) % k, p // (2 * k)
            role = "test" if home == fold else "val" if (home == (fold + 1) % k and pair == 0) else "train"
            rows.append({**scan, "fold": fold, "split": role})
    table = pd.DataFrame(rows).drop(columns="p")
    splits_contract.write(splits_csv, table)
    return splits_contract.read(splits_csv)


def write_cohort(
    root: Path, n_patients: int = 24, *, folds: int = 3, protocol: str = "kfold", seed: int = 0,
    followup_every: int = 4,
) -> tuple[Path, Path]:
    """:func:`write_split_cohort` in the dvc.yaml layout: ``root/data/ingested`` and ``root/data/split/splits.csv``.

    Returns:
        ``(splits_csv, ingested_dir)``.
    """
    ingested, splits_csv = root / "data" / "ingested", root / "data" / "split" / "splits.csv"
    write_split_cohort(ingested, splits_csv, n_patients=n_patients, folds=folds, protocol=protocol, seed=seed,
                       followup_every=followup_every)
    return splits_csv, ingested


def write_external_cohort(root: Path, *, n_patients: int = 10, seed: int = 99, disabled: bool = False) -> Path:
    """``root/data/external`` as the external stage writes it: a manifest of accepted scans and their ROI images
    (a fresh :func:`write_split_cohort` cohort), or the disabled marker. Returns the directory."""
    import pandas as pd

    from spinedxa.contracts import external as external_contract
    from spinedxa.contracts import manifest as manifest_contract
    from spinedxa.contracts import jsonfile

    out = root / "data" / "external"
    out.mkdir(parents=True, exist_ok=True)
    if disabled:
        jsonfile.write(out / external_contract.DISABLED, {"enabled": False})
        return out
    table = write_split_cohort(out, root / "external_split.csv", n_patients=n_patients, seed=seed)
    rows = table.drop_duplicates("source").drop(columns=["fold", "split"]).assign(status="accepted", reason="")
    manifest_contract.write(out / manifest_contract.FILE_NAME,
                            rows.reindex(columns=manifest_contract.COLUMNS, fill_value=""))
    (root / "external_split.csv").unlink()
    return out


def tracked_files(root: Path) -> list[str]:
    """Files git would commit from ``root`` (tracked plus untracked-but-not-ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    return [p for p in out.split("\0") if p and (root / p).is_file()]


def run_stage_main_in_fresh_interpreter(stage: str, argv_code: str, cwd: Path) -> tuple[int, bool, float]:
    """Run ``stages/<stage>.py``'s ``main(argv)`` in a fresh interpreter in ``cwd``; ``argv_code`` is Python that binds
    ``argv``. Returns its exit code, whether torch got imported, and the wall seconds (disabled stages must stay cheap)."""
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'stages')!r}); import {stage}; {argv_code}; "
              f"code = {stage}.main(argv); print(code, 'torch' in sys.modules)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - started
    code, torch_imported = proc.stdout.split()
    assert torch_imported in ("True", "False"), proc.stderr
    return int(code), torch_imported == "True", seconds


def discard_after(request: pytest.FixtureRequest, path: Path) -> Path:
    """Delete ``path`` (a whole-DAG repository: up to GBs of models, cache and MLflow artifacts) when the requesting
    fixture's scope ends, unless a test failed meanwhile: then it stays for a look, as pytest's retention policy
    (pyproject: ``failed``) keeps a failed test's directory. Keeps a session's peak disk use to one or two repositories."""
    failed_before = request.session.testsfailed

    def finish() -> None:
        if request.session.testsfailed == failed_before and path.exists():
            shutil.rmtree(path)

    request.addfinalizer(finish)
    return path


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


def write_tiny_split(
    root: Path, *, n_patients: int = 12, folds: int = 3, protocol: str = "kfold", seed: int = 0
) -> tuple[Path, Path]:
    """A tiny cohort under ``root`` (``root/ingested`` with images/ and roi/, ``root/split/splits.csv``): by default
    12 patients (every 4th with a follow-up scan: 15 scans) in 3 folds of 4 test, 2 val and 6 train patients each
    (:func:`write_split_cohort`). Returns ``(splits_csv, ingested_dir)``."""
    splits_csv, ingested = root / "split" / "splits.csv", root / "ingested"
    write_split_cohort(ingested, splits_csv, n_patients=n_patients, folds=folds, protocol=protocol, seed=seed)
    return splits_csv, ingested


@pytest.fixture
def tiny_split(tmp_path: Path) -> tuple[Path, Path]:
    """``(splits_csv, ingested_dir)`` of a tiny generated 3-fold cohort (:func:`write_tiny_split`)."""
    return write_tiny_split(tmp_path)
