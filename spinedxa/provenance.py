"""Where a result came from: the git commit and whether the tree was dirty, and DVC hashes of inputs.

Torch-free and MLflow-free, so the report, the audit and predict can record provenance without importing the
training code.

What counts as *dirty* (:data:`RESULT_PATHS`): an uncommitted change to what determines a stage's results: the package
(``spinedxa/``), the stage shells (``stages/``), ``params.yaml``, ``dvc.yaml`` (the commands), ``pyproject.toml``
(the dependency pins) and ``weights/`` (the records and ``.dvc`` files of the pre-trained weights a training starts
from; a weights file not yet ``dvc add``-ed shows as new): modified, staged, deleted or new-but-not-ignored files
there. Other paths do not count:
``dvc.lock`` and the committed reports are rewritten by every ``dvc repro`` while it runs (a training in the middle of a
repro would always look dirty), and tests, docs and benchmarks do not change a result. Every output that records the
commit records the flag, and says plainly when the commit alone does not reproduce it.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
#: Repo paths whose uncommitted changes make a result not reproducible from its commit (see the module docstring).
RESULT_PATHS = ("spinedxa", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "weights")


@dataclass(frozen=True)
class Provenance:
    """The code a result came from.

    Attributes:
        commit: HEAD's hash, or ``unknown`` outside a git work tree.
        dirty: tracked files differ from HEAD (None when unknown).
        changed: the changed paths among :data:`RESULT_PATHS` (repo-relative; code and params only, never data).
    """

    commit: str
    dirty: bool | None
    changed: tuple[str, ...] = ()

    def record(self) -> dict[str, object]:
        """For meta.json and the metrics: ``git_commit``, ``git_dirty``."""
        return {"git_commit": self.commit, "git_dirty": self.dirty}

    def describe(self) -> str:
        """One line for reports and audits."""
        if self.commit == UNKNOWN:
            return "code commit unknown (not a git work tree)"
        if self.dirty is None:
            return f"commit {self.commit[:12]} (whether the tree was clean was not recorded)"
        if self.dirty:
            shown = (" (" + ", ".join(self.changed[:5]) + (", ..." if len(self.changed) > 5 else "") + ")"
                     if self.changed else "")
            return (f"commit {self.commit[:12]} WITH UNCOMMITTED CHANGES to code or params{shown}: the commit alone "
                    "does not reproduce this result")
        return f"commit {self.commit[:12]} (clean tree: the commit reproduces this result)"


def _git(args: Sequence[str], cwd: str | Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def provenance(cwd: str | Path = ".") -> Provenance:
    """The commit of ``cwd``'s work tree and whether :data:`RESULT_PATHS` differ from it (``unknown`` with a warning
    outside git)."""
    try:
        commit = _git(["rev-parse", "HEAD"], cwd).strip()
        # :(top): the paths are relative to the repository root, wherever in it ``cwd`` is.
        status = _git(["status", "--porcelain", "--untracked-files=normal", "--",
                       *(f":(top){p}" for p in RESULT_PATHS)], cwd)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        log.warning("git commit unknown (%s); recording %r", type(exc).__name__, UNKNOWN)
        return Provenance(UNKNOWN, None)
    changed = tuple(sorted(line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()))
    return Provenance(commit, bool(changed), changed)


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit hash, or ``unknown``."""
    return provenance(cwd).commit


def display_path(path: Path) -> str:
    """``path`` relative to the working directory (the repo root), else its name: never an absolute path, which
    could name a person (a home directory), in meta.json or MLflow."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


def dvc_digests(paths: Sequence[Path]) -> dict[str, str]:
    """DVC hashes of ``paths`` (md5, or ``<md5>.dir`` for a directory) keyed by repo-relative path, as dvc.lock has
    them (:func:`spinedxa.dag.dvc_hash`, DVC's own hashing with ``.dvcignore`` applied).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    from spinedxa.dag import dvc_hash  # DVC is heavy: imported only when a digest is needed

    return {display_path(p): dvc_hash(p) for p in paths}

