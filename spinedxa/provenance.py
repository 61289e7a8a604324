"""Where a result came from: the git commit and whether the tree was dirty, and DVC hashes of inputs.

Torch-free and MLflow-free, so the report, the audit and predict can record provenance without importing the
training code. A run is *dirty* when a tracked file differs from the commit (``git status --porcelain
--untracked-files=no``): uncommitted params or code mean the commit alone does not reproduce the result, and every
output that records the commit says so.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Provenance:
    """The code a result came from.

    Attributes:
        commit: HEAD's hash, or ``unknown`` outside a git work tree.
        dirty: tracked files differ from HEAD (None when unknown).
        changed: the changed tracked paths (repo-relative; code and params only, never data).
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
        if self.dirty:
            shown = ", ".join(self.changed[:5]) + (", ..." if len(self.changed) > 5 else "")
            return (f"commit {self.commit[:12]} WITH UNCOMMITTED CHANGES to {len(self.changed)} tracked file(s) "
                    f"({shown}): the commit alone does not reproduce this result")
        return f"commit {self.commit[:12]} (clean tree: the commit reproduces this result)"


def _git(args: Sequence[str], cwd: str | Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def provenance(cwd: str | Path = ".") -> Provenance:
    """The commit of ``cwd``'s work tree and whether tracked files are modified (``unknown`` with a warning outside
    git)."""
    try:
        commit = _git(["rev-parse", "HEAD"], cwd).strip()
        status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
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

