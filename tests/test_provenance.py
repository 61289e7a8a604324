"""Tests for spinedxa.provenance: git commit and dirty flag, DVC hashes of inputs, display paths; no heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinedxa.files import md5_file
from spinedxa.provenance import RESULT_PATHS, UNKNOWN, Provenance, display_path, dvc_digests, git_commit, provenance
from train_factory import make_dataset


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed git repo with one file under each result path, a dvc.lock, a report, a test and a doc."""
    root = tmp_path / "repo"
    for rel in ("spinedxa/train.py", "stages/train.py", "params.yaml", "dvc.yaml", "pyproject.toml", "dvc.lock",
                "reports/ingest.json", "tests/test_x.py", "docs/CONTRACTS.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n", encoding="utf-8")
    (root / ".gitignore").write_text("__pycache__/\n", encoding="utf-8")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "test@example.invalid")
    _git(root, "config", "user.name", "spinedxa tests")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


@pytest.mark.parametrize(
    "edit, changed",
    [
        (None, ()),
        ("params.yaml", ("params.yaml",)),
        ("spinedxa/train.py", ("spinedxa/train.py",)),
        ("stages/train.py", ("stages/train.py",)),
        ("dvc.yaml", ("dvc.yaml",)),
        ("pyproject.toml", ("pyproject.toml",)),
        ("spinedxa/new_module.py", ("spinedxa/new_module.py",)),  # new, not yet committed code
        ("dvc.lock", ()),  # rewritten by every dvc repro while it runs
        ("reports/ingest.json", ()),  # a committed result, rewritten by its stage
        ("reports/train/cnn21.csv", ()),  # a new result
        ("tests/test_x.py", ()),
        ("docs/CONTRACTS.md", ()),
        ("notes.txt", ()),  # untracked, outside the result paths
        ("spinedxa/__pycache__/train.cpython-311.pyc", ()),  # ignored
    ],
)
def test_dirty_means_uncommitted_code_or_params(repo: Path, edit: str | None, changed: tuple[str, ...]) -> None:
    if edit is not None:
        (repo / edit).parent.mkdir(parents=True, exist_ok=True)
        (repo / edit).write_text("changed\n", encoding="utf-8")
    prov = provenance(repo)
    assert prov == Provenance(_git(repo, "rev-parse", "HEAD"), bool(changed), changed)
    # The same answer from a sub-directory of the work tree (the paths are relative to its top).
    assert provenance(repo / "spinedxa") == prov


def test_staged_deleted_and_renamed_files_count(repo: Path) -> None:
    (repo / "params.yaml").write_text("changed\n", encoding="utf-8")
    _git(repo, "add", "params.yaml")
    assert provenance(repo).changed == ("params.yaml",)
    _git(repo, "commit", "-q", "-m", "params")
    assert provenance(repo).dirty is False
    (repo / "stages/train.py").unlink()
    assert provenance(repo).changed == ("stages/train.py",)
    _git(repo, "checkout", "--", "stages/train.py")
    _git(repo, "mv", "spinedxa/train.py", "spinedxa/fit.py")
    assert provenance(repo).changed == ("spinedxa/fit.py",)  # "R old -> new": the new path


def test_dvc_lock_and_reports_together_do_not_make_it_dirty(repo: Path) -> None:
    """What a ``dvc repro`` rewrites while it runs (dvc.lock, reports/) never flags its own results as dirty."""
    for rel in ("dvc.lock", "reports/ingest.json", "reports/metrics/cnn21.json"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("rewritten\n", encoding="utf-8")
    prov = provenance(repo)
    assert prov.dirty is False and prov.changed == ()
    assert "clean tree" in prov.describe()


def test_outside_a_work_tree(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="spinedxa.provenance"):
        prov = provenance(tmp_path)
    assert prov == Provenance(UNKNOWN, None) and git_commit(tmp_path) == UNKNOWN
    assert prov.record() == {"git_commit": "unknown", "git_dirty": None}
    assert "not a git work tree" in prov.describe()
    assert "recording 'unknown'" in caplog.text


def test_record_and_describe(repo: Path) -> None:
    clean = provenance(repo)
    assert clean.record() == {"git_commit": clean.commit, "git_dirty": False}
    assert clean.describe().startswith(f"commit {clean.commit[:12]} (clean tree")
    for i in range(7):
        (repo / f"spinedxa/m{i}.py").write_text("x = 1\n", encoding="utf-8")
    dirty = provenance(repo)
    assert dirty.record() == {"git_commit": clean.commit, "git_dirty": True}
    text = dirty.describe()
    assert "WITH UNCOMMITTED CHANGES to code or params (" in text and text.count("spinedxa/m") == 5
    assert "the commit alone does not reproduce this result" in text
    assert git_commit(repo) == clean.commit


def test_result_paths_exist_in_this_repository(repo_root: Path) -> None:
    """A renamed package or stage folder must not silently leave the dirty check looking at nothing."""
    assert RESULT_PATHS == ("spinedxa", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "weights")
    assert all((repo_root / p).exists() for p in RESULT_PATHS)


def test_dvc_digests_match_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our hashes equal what DVC itself records (``dvc add`` writes the md5 / .dir hash dvc.lock has), keyed by
    repo-relative path."""
    repo = tmp_path / "repo"
    make_dataset(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(dvc + ["init", "-q"], cwd=repo, check=True, env=env)
    targets = ("data/ingested", "data/split/splits.csv", "data/augmented")
    subprocess.run(dvc + ["add", "-q", *targets], cwd=repo, check=True, env=env)
    monkeypatch.chdir(repo)
    digests = dvc_digests([Path(t) for t in targets[:2]] + [repo / targets[2]])  # relative and absolute
    assert list(digests) == list(targets)
    for target in targets:
        recorded = yaml.safe_load((repo / f"{target}.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
        assert digests[target] == recorded
    assert digests["data/split/splits.csv"] == md5_file(repo / "data/split/splits.csv")
    assert digests["data/ingested"].endswith(".dir")
    with pytest.raises(FileNotFoundError, match="nope"):
        dvc_digests([Path("nope")])


@pytest.mark.parametrize(
    "path, expected",
    [(Path("data/ingested"), "data/ingested"), (Path("/somewhere/else/home/jane/scan.png"), "scan.png")],
)
def test_display_path_never_absolute(path: Path, expected: str) -> None:
    assert display_path(path) == expected
    assert display_path(Path.cwd() / "models" / "cnn21") == "models/cnn21"


def test_provenance_imports_neither_torch_nor_mlflow() -> None:
    """report, audit and predict record provenance through this module: it must stay light."""
    code = ("import sys, spinedxa.provenance; heavy = {'torch', 'mlflow', 'sklearn', 'dvc', 'dvc_data'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
