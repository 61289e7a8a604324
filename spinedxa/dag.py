"""The pipeline DAG as DVC resolves it from ``dvc.yaml`` (+ ``dvc.lock``): the one place that imports DVC.

``dvc.yaml`` is the single source of truth for stages. Everything else that needs the DAG (the Snakemake workflow in
``workflow/Snakefile``, the lineage audit) reads it through :func:`load_stages`, which asks DVC itself to resolve
``matrix`` fan-outs and ``${...}`` templating, so there is never a second, hand-written copy of the DAG.

Naming: a DVC stage ``train@cnn21`` becomes the Snakemake rule ``train_cnn21`` (:func:`rule_name`; Snakemake rule
names cannot contain ``@``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from spinedxa.files import md5_file

#: Stage-name prefix of the per-model training stages (``train@<model>`` in dvc.yaml's ``matrix``).
TRAIN_PREFIX = "train@"
#: Stages that run ``runtime.workers`` processes (the bookkeeping ``runtime`` section of params.yaml).
_WORKER_STAGES = ("synthesize", "ingest")
#: Stages that train like a model's training stage (``runtime.train_processes`` processes of ``train.threads``).
_TRAINING_STAGES = ("pretrain", "transfer", "replay")
#: Training stages that never run more processes than this (replay trains two networks).
_MAX_PROCESSES = {"replay": 2}


class DagError(ValueError):
    """dvc.yaml cannot be turned into a Snakemake workflow, or a path is not part of the DAG."""


@dataclass(frozen=True)
class Dep:
    """A file or directory dependency of a stage (params are kept apart in :attr:`Stage.params`)."""

    path: str
    locked_hash: str | None = None  # md5 in dvc.lock ("<md5>.dir" for a directory); None before the first run


@dataclass(frozen=True)
class Out:
    """An output of a stage: plain ``outs`` as well as ``metrics`` and ``plots`` entries."""

    path: str
    is_dir: bool
    cache: bool = True
    metric: bool = False
    plot: bool = False
    locked_hash: str | None = None


@dataclass(frozen=True)
class Stage:
    """One resolved DVC stage: exactly what ``dvc repro`` would run."""

    name: str  # DVC address, e.g. "train@cnn21"
    cmd: str
    deps: tuple[Dep, ...]
    outs: tuple[Out, ...]
    params: Mapping[str, Any] = field(default_factory=dict)  # dotted key -> value, as DVC reads params.yaml
    locked_params: Mapping[str, Any] = field(default_factory=dict)  # the same keys as recorded in dvc.lock

    @property
    def rule(self) -> str:
        """The Snakemake rule name for this stage."""
        return rule_name(self.name)

    @property
    def verb(self) -> str:
        """The stage verb (``train`` for ``train@cnn21``): also the name of ``stages/<verb>.py``."""
        return self.name.split("@", 1)[0]

    @property
    def item(self) -> str | None:
        """The matrix item (``cnn21`` for ``train@cnn21``), or None for a plain stage."""
        return self.name.split("@", 1)[1] if "@" in self.name else None

    @property
    def dep_paths(self) -> tuple[str, ...]:
        return tuple(d.path for d in self.deps)

    @property
    def out_paths(self) -> tuple[str, ...]:
        return tuple(o.path for o in self.outs)


def rule_name(stage_name: str) -> str:
    """Map a DVC stage address to a Snakemake rule name: ``train@cnn21`` -> ``train_cnn21``.

    Raises:
        DagError: the name would not be a valid Snakemake rule name (a Python identifier).
    """
    name = stage_name.replace("@", "_").replace("-", "_").replace(".", "_")
    if not name.isidentifier():
        raise DagError(f"dvc.yaml: stage {stage_name!r} maps to {name!r}, which is not a valid Snakemake rule name")
    return name


def _is_dir(root: Path, path: str, locked_hash: str | None) -> bool:
    """Decide whether an output is a directory before it exists.

    The workspace decides when the path exists; otherwise dvc.lock (DVC marks directory hashes with ``.dir``);
    otherwise the project convention that every file output has a suffix (``.csv``, ``.png``) and a directory has none.
    """
    full = root / path
    if full.exists():
        return full.is_dir()
    if locked_hash:
        return locked_hash.endswith(".dir")
    return PurePosixPath(path).suffix == ""


def _hash_value(entry: Any) -> str | None:
    info = getattr(entry, "hash_info", None)
    return info.value if info and info.value else None


def load_stages(root: str | Path = ".") -> list[Stage]:
    """Resolve every stage of ``<root>/dvc.yaml`` through DVC (matrix and ``${...}`` expanded), in file order.

    Raises:
        DagError: ``root`` is not a DVC repository or has no dvc.yaml.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise DagError(f"{root}: no dvc.yaml here (run from the repository root)")
    try:
        repo = Repo(str(root))
    except NotDvcRepoError as exc:
        raise DagError(f"{root}: not a DVC repository ({exc})") from exc
    stages: list[Stage] = []
    with repo:
        for st in repo.index.stages:
            if not getattr(st, "cmd", None):
                continue  # .dvc files of `dvc add`-ed data are data sources, not pipeline stages
            deps, params, locked_params = [], {}, {}
            for dep in st.deps:
                if isinstance(dep, ParamsDependency):
                    params.update(dep.read_params())
                    if isinstance(dep.hash_info.value, dict):
                        locked_params.update(dep.hash_info.value)
                else:
                    deps.append(Dep(dep.def_path, _hash_value(dep)))
            outs = tuple(
                Out(
                    path=o.def_path,
                    is_dir=_is_dir(root, o.def_path, _hash_value(o)),
                    cache=bool(o.use_cache),
                    metric=bool(o.metric),
                    plot=bool(o.plot),
                    locked_hash=_hash_value(o),
                )
                for o in st.outs
            )
            stages.append(
                Stage(
                    name=st.name,  # the address inside dvc.yaml; `addressing` is relative to the cwd
                    cmd=st.cmd if isinstance(st.cmd, str) else " && ".join(st.cmd),
                    deps=tuple(deps),
                    outs=outs,
                    params=params,
                    locked_params=locked_params,
                )
            )
    return stages


def get_stage(stages: Iterable[Stage], name: str) -> Stage:
    """Return the stage called ``name`` (DVC address, e.g. ``train@resnet50``).

    Raises:
        DagError: no such stage (the message lists the known ones).
    """
    stages = list(stages)
    for st in stages:
        if st.name == name:
            return st
    raise DagError(f"dvc.yaml: no stage {name!r}; stages are {[s.name for s in stages]}")


def _inside(path: str, parent: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(parent) or PurePosixPath(parent) in PurePosixPath(path).parents


def producer(stages: Iterable[Stage], path: str) -> tuple[Stage, Out] | None:
    """The stage and output that produce ``path``: the exact output, or a directory output that contains it."""
    for st in stages:
        for out in st.outs:
            if out.path == path or (out.is_dir and _inside(path, out.path)):
                return st, out
    return None


def contained(stages: Iterable[Stage], path: str, *, exclude: str = "") -> list[tuple[Stage, Out]]:
    """The outputs of other stages that lie inside the directory ``path`` (a dep such as ``reports/metrics``, which
    DVC links to every stage writing a file there), in dvc.yaml order; ``exclude``: a stage to leave out."""
    return [(st, out) for st in stages if st.name != exclude for out in st.outs if _inside(out.path, path)
            and out.path != path]


def dep_producers(stages: Sequence[Stage], stage: Stage, dep: str) -> list[tuple[Stage, Out]]:
    """The stages and outputs ``dep`` of ``stage`` reads: the output that is or contains it, else every output inside
    it (a directory dep collecting several stages' files, as the report's ``reports/metrics``)."""
    found = producer(stages, dep)
    if found and found[0].name != stage.name:
        return [found]
    return contained(stages, dep, exclude=stage.name)


def snakemake_inputs(stage: Stage, stages: Sequence[Stage]) -> list[str]:
    """The Snakemake ``input`` of ``stage``: its deps, with a path inside another stage's directory output replaced by
    that directory (DVC links ``data/ingested/manifest.csv`` to the stage that outputs ``data/ingested``; Snakemake
    only matches whole outputs), and a directory dep that collects other stages' outputs (``reports/metrics``)
    replaced by those outputs. Order is kept, duplicates are dropped."""
    inputs: list[str] = []
    for dep in stage.deps:
        found = dep_producers(stages, stage, dep.path)
        paths = [out.path for _, out in found] if found else [dep.path]
        for path in paths:
            if path not in inputs:
                inputs.append(path)
    return inputs


def upstream(stages: Sequence[Stage], name: str) -> list[Stage]:
    """``name`` and every stage it depends on, transitively, in dvc.yaml order."""
    wanted = {name}
    todo = [get_stage(stages, name)]
    while todo:
        st = todo.pop()
        for dep in st.deps:
            for found, _ in dep_producers(stages, st, dep.path):
                if found.name not in wanted:
                    wanted.add(found.name)
                    todo.append(found)
    return [s for s in stages if s.name in wanted]


def lookup(params: Mapping[str, Any], key: str) -> Any:
    """Value of the dotted ``key`` in params keyed as DVC reports them (per declared key: ``train.cnn21`` -> the
    whole block), looking inside a declared block for a key below it; None when absent."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in params:
            value = params[head]
            for part in parts[i:]:
                if not isinstance(value, Mapping) or part not in value:
                    return None
                value = value[part]
            return value
    return None


def param_value(stage: Stage, key: str) -> Any:
    """Value of the dotted params key ``key`` as the stage reads it from params.yaml (None if it does not)."""
    return lookup(stage.params, key)


def rule_threads(stage: Stage, runtime: Mapping[str, Any], train_threads: int) -> int:
    """The cores a stage's job occupies, for Snakemake's scheduler (``threads:``); it changes no numerics.

    A training job (train, replay, pretrain, transfer) runs ``runtime.train_processes`` processes (replay at most
    two) of ``train.threads`` threads each (the thread count is a DVC param: Snakemake never overrides it, so both
    engines train bit-identical models); synthesize and ingest run ``runtime.workers`` processes; the rest one.
    Profiles may override any rule with ``set-threads``.
    """
    if stage.name.startswith(TRAIN_PREFIX) or stage.name in _TRAINING_STAGES:
        processes = max(1, int(runtime.get("train_processes", 1)))
        if stage.name in _MAX_PROCESSES:
            processes = min(processes, _MAX_PROCESSES[stage.name])
        return processes * max(1, int(train_threads))
    if stage.name in _WORKER_STAGES:
        return max(1, int(runtime.get("workers", 1)))
    return 1


def git_tracked(root: str | Path) -> frozenset[str]:
    """Paths git tracks under ``root`` (empty outside a git work tree)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return frozenset()
    return frozenset(p for p in out.split("\0") if p)


def is_tracked(path: str, tracked: frozenset[str]) -> bool:
    """True when git tracks ``path`` itself or files under it (so :func:`code_fingerprint` covers its content)."""
    prefix = path.rstrip("/") + "/"
    return path in tracked or any(p.startswith(prefix) for p in tracked)


def code_fingerprint(stage: Stage, root: str | Path, tracked: frozenset[str]) -> dict[str, str]:
    """md5 of every git-tracked file among the stage's deps (a dep directory contributes its tracked files).

    Data deps are not git-tracked and are not hashed here: DVC versions them (``dvc status``).
    """
    root = Path(root)
    out: dict[str, str] = {}
    for dep in stage.deps:
        prefix = dep.path.rstrip("/") + "/"
        for rel in sorted(p for p in tracked if p == dep.path or p.startswith(prefix)):
            if (root / rel).is_file():
                out[rel] = md5_file(root / rel)
    return out


def lineage_fingerprints(
    stages: Sequence[Stage], root: str | Path, tracked: frozenset[str] | None = None
) -> dict[str, str]:
    """Per stage, a sha256 over the command, params values and tracked source files of the stage and of every stage
    upstream of it.

    Snakemake records it as a rule param, so its ``params`` rerun trigger fires when anything that determines a
    stage's result changed, here or upstream, judged by content rather than modification time (DVC checkouts do not
    preserve mtimes; see workflow/Snakefile).
    """
    tracked = git_tracked(root) if tracked is None else tracked
    own = {
        st.name: json.dumps(
            {"cmd": st.cmd, "params": st.params, "code": code_fingerprint(st, root, tracked)},
            sort_keys=True, default=str,
        )
        for st in stages
    }
    return {
        st.name: hashlib.sha256("\n".join(own[u.name] for u in upstream(stages, st.name)).encode()).hexdigest()
        for st in stages
    }


def dvc_hash(path: str | Path, root: str | Path = ".") -> str:
    """Hash ``path`` exactly as DVC records it in dvc.lock: md5 of a file, ``<md5>.dir`` of a directory, with the
    repository's ``.dvcignore`` applied (it excludes Snakemake's ``.snakemake_timestamp`` marker files).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from dvc.ignore import DvcIgnoreFilter
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory to hash")
    fs = LocalFileSystem()
    ignore = DvcIgnoreFilter(fs, str(Path(root).resolve()))
    with tempfile.TemporaryDirectory(prefix="spinedxa-dvc-") as odb_dir:  # dry_run: nothing is written there
        _, _, obj = build(HashFileDB(fs, odb_dir), str(path.resolve()), fs, "md5", ignore=ignore, dry_run=True)
    return obj.hash_info.value


def relpath(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` in POSIX form (how dvc.yaml spells paths)."""
    return PurePosixPath(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
