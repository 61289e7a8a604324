"""Audits of a finished pipeline: the lineage of a metric back to raw files, and leakage inside every fold.

Lineage (``spinedxa audit reports/metrics/<model>.json``): metric file -> MLflow parent run -> every fold's model
file hash -> split file -> manifest -> sha256 of every raw file used for training and testing in any fold, with the
params and the git commit (and whether the tree was dirty). Every hash is verified against the workspace:

- the metrics file and every DVC output on the way against the md5 DVC recorded in ``dvc.lock``;
- each fold's ``models/<m>/fold<k>/model.pt`` against ``model_sha256`` in that fold's ``meta.json`` and against
  ``model_sha256[k]`` in the metrics file; the folds of the metrics, of ``models/<m>/meta.json`` and of the split;
- the pre-trained weights each fold started from (``weights`` in its ``meta.json``: kind, file, sha256): the file's
  sha256 and its committed record (``weights/<m>/<file>.json``, :mod:`spinedxa.weights`) against meta.json;
- the data digests each fold's training recorded in its ``meta.json`` against ``dvc.lock``;
- every raw file's sha256 (splits -> manifest -> the file under ``data.source``);
- the params each fold was trained with against ``dvc.lock`` (and ``dvc.lock`` against ``params.yaml``); the git
  commit against git. A dirty tree (``git_dirty`` in meta.json) is reported, not failed: the commit alone then does
  not reproduce the result, and the audit says so.

The baseline (``reports/metrics/baseline.json``) has no model files: its chain is metric -> its stage's inputs in
``dvc.lock`` -> split -> manifest -> raw files.

Leakage (``spinedxa audit --leakage [--splits PATH]``), per fold of the split table: no patient, no raw file
(sha256) and no near-duplicate image (as validate defines it: perceptual hash within ``validate.phash_max_distance``
bits, confirmed by SSIM >= ``validate.near_duplicate_min_ssim``) in two roles (train / val / test); no augmented copy
used by a fold (its parent is ``train`` there, :func:`spinedxa.data.training_items`) whose parent or patient has
another role in that fold; and, when the table has several folds (k-fold), every scan is ``test`` in exactly one fold
and has a role in every fold. A split row whose ``source`` is not in the manifest but whose ``sha256`` is (a copy of
a raw file, as the replay ablation's deliberately leaky split has) counts as that raw file.

Nothing here prints PHI: patients appear only as pseudonymous ids, files by their path inside the data source
(the manifest's ``source`` column), as in every other pipeline output.
"""

from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import pandas as pd

from spinedxa import dag, weights as pretrained
from spinedxa.config import ModelTrainConfig, ValidateConfig, load_params
from spinedxa.contracts import (
    augmented as augmented_contract,
    jsonfile,
    manifest as manifest_contract,
    splits as splits_contract,
    table,
)
from spinedxa.files import sha256_file
from spinedxa.provenance import UNKNOWN, Provenance
from spinedxa.validate import find_near_duplicates

MANIFEST_NAME = manifest_contract.FILE_NAME
META = "meta.json"
WEIGHTS = "model.pt"
METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "n_test")
_MANIFEST_COLUMNS = ("source", "sha256", "patient_id", "image", "phash")
_METRICS_COLUMNS = ("model", "mlflow_run_id", "model_sha256")  # of the provenance file beside the metrics
#: Where evaluate and baseline write which runs and models produced their metrics (not a DVC metric).
PROVENANCE_DIR = "reports/provenance"
_PARENT_META = ("model", "mlflow_run_id", "data_digests")
_FOLD_META = ("model", "fold", "mlflow_run_id", "model_sha256", "data_digests", "params")


class AuditError(ValueError):
    """The audit cannot start: a file it needs is missing or malformed (the message names it)."""


@dataclass(frozen=True)
class Check:
    """One verified link of the chain: ``expected`` (the record) against ``actual`` (the workspace)."""

    item: str
    path: str
    expected: Any
    actual: Any

    @property
    def ok(self) -> bool:
        return self.expected is not None and self.expected == self.actual


@dataclass
class FoldLineage:
    """One fold's model: where it is, what its meta.json records, and how many scans each role of the fold holds."""

    fold: int
    model_file: str
    model_sha256: str | None
    mlflow_run_id: str | None
    git_commit: str
    git_dirty: bool | None
    weights: dict[str, Any] | None = None  # meta.json's ``weights``: what the fold started from (None: not recorded)


@dataclass
class Lineage:
    """The chain from one metrics file back to the raw data, with every check made on the way.

    ``model_dir`` is None (and ``folds`` empty) for a result without model files (the baseline).
    """

    metrics_file: str
    metrics: dict[str, Any]
    stage: str
    model: str
    mlflow_run_id: str | None
    mlflow_tracking_uri: str
    model_dir: str | None
    git_commit: str
    git_dirty: bool | None
    provenance: str
    params: dict[str, Any]
    split_file: str
    manifest: str
    data_source: str
    folds: list[FoldLineage] = field(default_factory=list)
    split_roles: dict[str, dict[str, int]] = field(default_factory=dict)  # fold -> role -> scans
    raw_files: list[dict[str, Any]] = field(default_factory=list)  # source, sha256, roles {fold: role}
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [{**asdict(c), "ok": c.ok} for c in self.checks]
        out["ok"] = self.ok
        return out


@dataclass
class Leakage:
    """What the leakage audit found in one split table (each finding list empty when it is clean).

    Every finding names its fold. ``copies`` lists split rows that are copies of a raw file (counted as that file);
    they are not a finding by themselves.
    """

    splits_file: str = ""
    patients: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    augmented: list[dict[str, Any]] = field(default_factory=list)
    coverage: list[dict[str, Any]] = field(default_factory=list)
    copies: list[dict[str, Any]] = field(default_factory=list)
    roles: dict[str, dict[str, int]] = field(default_factory=dict)  # fold -> role -> rows
    n_rows: int = 0
    n_scans: int = 0  # distinct raw files (sha256)
    n_patients: int = 0
    n_folds: int = 0
    augmented_checked: bool = False
    n_augmented: int = 0
    n_augmented_unused: int = 0  # copies whose parent is train in no fold (no training reads them)
    phash_max_distance: int = 0
    near_duplicate_min_ssim: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.patients or self.files or self.near_duplicates or self.augmented or self.coverage)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ------------------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path, required: Iterable[str]) -> dict[str, Any]:
    try:
        return jsonfile.read(path, tuple(required))
    except (FileNotFoundError, jsonfile.RecordError) as exc:
        raise AuditError(str(exc)) from None


def _read(reader: Any, path: Path, *args: Any) -> pd.DataFrame:
    """A contract reader's table, its errors (missing file, missing columns, bad values) as :class:`AuditError`."""
    try:
        return reader(path, *args)
    except (FileNotFoundError, table.TableError) as exc:
        raise AuditError(str(exc)) from None


def _hash_or_none(path: Path, root: Path) -> str | None:
    try:
        return dag.dvc_hash(path, root)
    except FileNotFoundError:
        return None


def _commit_exists(root: Path, commit: str) -> bool:
    proc = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True, text=True, check=False
    )
    return proc.returncode == 0


def _locked_hashes(stages: Iterable[dag.Stage]) -> dict[str, str]:
    """Every path's md5 as recorded in dvc.lock (outputs first: they are what a stage wrote)."""
    locked: dict[str, str] = {}
    for st in stages:
        for dep in st.deps:
            if dep.locked_hash:
                locked.setdefault(dep.path, dep.locked_hash)
    for st in stages:
        for out in st.outs:
            if out.locked_hash:
                locked[out.path] = out.locked_hash
    return locked


def fold_model_dirs(model_dir: str | Path) -> dict[int, Path]:
    """The fold models of a trained model directory (``models/<m>/``), keyed by fold, in fold order.

    A fold model is a sub-directory whose ``meta.json`` has an integer ``fold`` (the train stage writes
    ``fold<k>/``); when ``models/<m>/meta.json`` lists ``folds``, the sub-directories must hold exactly those.

    Raises:
        AuditError: two sub-directories claim one fold, a meta.json is malformed, or the folds found differ from
            the ones ``models/<m>/meta.json`` lists (the message names the file and both lists).
    """
    model_dir = Path(model_dir)
    found: dict[int, Path] = {}
    for sub in sorted(p for p in model_dir.iterdir() if p.is_dir() and (p / META).is_file()):
        fold = _read_json(sub / META, ()).get("fold")
        if not isinstance(fold, int) or isinstance(fold, bool):
            continue
        if fold in found:
            raise AuditError(f"{sub / META}: fold {fold} is also the fold of {found[fold] / META}")
        found[fold] = sub
    parent = model_dir / META
    if parent.is_file():
        listed = _read_json(parent, ()).get("folds")
        if listed is not None and sorted(listed) != sorted(found):
            raise AuditError(f"{parent}: lists folds {sorted(listed)}, but the sub-directories of {model_dir} with a "
                             f"{META} naming a fold hold folds {sorted(found)}")
    return dict(sorted(found.items()))


def describe_provenance(commit: str, dirty: bool | None, changed: Iterable[str] = ()) -> str:
    """One line on the code a result came from (:meth:`spinedxa.provenance.Provenance.describe`).

    Two cases ``describe`` does not word: a record without ``git_dirty`` cannot say whether the commit reproduces
    the result, and meta.json records that the tree was dirty but not which files changed.
    """
    changed = tuple(changed)
    if commit != UNKNOWN and dirty is None:
        return (f"commit {commit[:12]}; whether the tree was dirty was not recorded (no git_dirty): the commit alone "
                "may not reproduce this result")
    if commit != UNKNOWN and dirty and not changed:
        return (f"commit {commit[:12]} WITH UNCOMMITTED CHANGES (git_dirty; the changed files are not recorded): "
                "the commit alone does not reproduce this result")
    return Provenance(commit, dirty, changed).describe()


def _data_files(root: Path, paths: Iterable[str], where: str) -> tuple[str, str]:
    """The split CSV and the ingest manifest among a model's data digests (or a stage's deps)."""
    paths = list(paths)
    split_file = next((p for p in paths if p.endswith(".csv")), None)
    # the ingested directory (a model's data digests) or its checksum file (a stage's dep: data/ingested/SHA256SUMS)
    dirs = (p if root.joinpath(p).is_dir() else PurePosixPath(p).parent.as_posix() for p in paths)
    ingested = next((d for d in dirs if root.joinpath(d, MANIFEST_NAME).is_file()), None)
    if split_file is None or ingested is None:
        raise AuditError(f"{where}: {sorted(paths)} name no split CSV and no ingested directory with {MANIFEST_NAME}")
    return split_file, (PurePosixPath(ingested) / MANIFEST_NAME).as_posix()


def _resolve_sources(frame: pd.DataFrame, manifest: pd.DataFrame, splits_file: Path,
                     manifest_file: Path) -> tuple[pd.Series, list[dict[str, Any]]]:
    """The manifest source of each split row: its own ``source``, or, for a copy of a raw file (source not in the
    manifest, sha256 in it), the manifest row with that sha256. Returns the sources and the copies.

    Raises:
        AuditError: a row matches the manifest neither by source nor by sha256.
    """
    sources = set(manifest["source"])
    by_sha = manifest.sort_values("source", kind="stable").drop_duplicates("sha256").set_index("sha256")["source"]
    resolved = frame["source"].where(frame["source"].isin(sources), frame["sha256"].map(by_sha))
    unknown = sorted(frame.loc[resolved.isna(), "source"].unique())
    if unknown:
        raise AuditError(f"{manifest_file}: no row for {len(unknown)} source(s) of {splits_file}, neither by source "
                         f"nor by sha256, e.g. {unknown[:3]}")
    copied = frame.assign(raw_source=resolved)[frame["source"] != resolved]
    copies = [{"source": r.source, "sha256": r.sha256, "raw_source": r.raw_source}
              for r in copied.drop_duplicates("source").sort_values("source").itertuples(index=False)]
    return resolved, copies


# ------------------------------------------------------------------------------------------------------- lineage


def audit_lineage(
    metrics_file: str | Path, root: str | Path = ".", params_file: str = "params.yaml", *, check_mlflow: bool = False
) -> Lineage:
    """Trace ``metrics_file`` back to the raw data and verify every hash on the way (see the module docstring).

    Args:
        metrics_file: ``reports/metrics/<model>.json`` (relative to ``root`` or absolute).
        root: the repository root (holds dvc.yaml, dvc.lock and params.yaml).
        params_file: the params file, relative to ``root``.
        check_mlflow: also check that the parent run and every fold's run exist in the tracking store
            (``MLFLOW_TRACKING_URI``, else the URI recorded in meta.json); off by default because a team server may
            be out of reach.

    Returns:
        The lineage; ``lineage.ok`` is False when any check failed (``lineage.failures`` names the files).

    Raises:
        AuditError: a file the chain needs is missing or malformed, or the metrics file is no pipeline output.
    """
    root = Path(root).resolve()
    rel = dag.relpath(root / metrics_file, root)
    stages = dag.load_stages(root)
    found = dag.producer(stages, rel)
    if found is None:
        raise AuditError(f"{rel}: not an output of any stage in {root / 'dvc.yaml'}")
    stage = found[0]
    # The metrics file holds numbers; who produced them is in the provenance file the same stage writes beside it.
    provenance_file = next((o.path for o in stage.outs if o.path.startswith(PROVENANCE_DIR + "/")), None)
    if provenance_file is None:
        raise AuditError(f"{rel}: stage {stage.name} writes no provenance file under {PROVENANCE_DIR}/ "
                         "(dvc.yaml); the chain cannot be followed")
    metrics = {**_read_json(root / rel, ()), **_read_json(root / provenance_file, _METRICS_COLUMNS)}
    model = str(metrics["model"])
    lineage_stages = dag.upstream(stages, stage.name)
    params = load_params(root / params_file)
    train = next((s for s in lineage_stages if s.name == f"{dag.TRAIN_PREFIX}{model}"), None)
    if train is None and metrics["model_sha256"] is not None:
        raise AuditError(f"{rel}: model {model!r} has no stage {dag.TRAIN_PREFIX}{model} upstream of {stage.name}")
    locked = _locked_hashes(stages)
    if train is None:  # the baseline: refit per fold by its own stage, no model files
        split_file, manifest = _data_files(root, (d.path for d in stage.deps), f"dvc.yaml: deps of {stage.name}")
        lineage = Lineage(
            metrics_file=rel, metrics={k: metrics[k] for k in METRIC_KEYS if k in metrics}, stage=stage.name,
            model=model, mlflow_run_id=metrics["mlflow_run_id"], mlflow_tracking_uri="", model_dir=None,
            git_commit=UNKNOWN, git_dirty=None,
            provenance=f"not recorded by {stage.name} (no meta.json); its code and inputs are pinned by dvc.lock",
            params={}, split_file=split_file, manifest=manifest, data_source=params.data.source,
        )
    else:
        lineage = _model_lineage(root, rel, stage, train, metrics, params, locked, check_mlflow, provenance_file)
    checks = lineage.checks
    # every stage on the way, as DVC recorded it in dvc.lock, against the workspace: deps, outputs, params
    checks.extend(_lock_checks(root, lineage_stages, params_file))
    # every raw file used for training and testing in any fold
    splits = _read(splits_contract.read, root / lineage.split_file)
    lineage.split_roles = _roles_per_fold(splits)
    lineage.raw_files, raw_checks = _raw_file_checks(root, splits, lineage.split_file, lineage.manifest,
                                                     params.data.source)
    checks.extend(raw_checks)
    if lineage.folds:
        checks.append(Check(f"folds ({lineage.split_file} vs {lineage.model_dir}/{META})", lineage.split_file,
                            [f.fold for f in lineage.folds], sorted(int(k) for k in lineage.split_roles)))
    return lineage


def _model_lineage(root: Path, rel: str, stage: dag.Stage, train: dag.Stage, metrics: dict[str, Any], params: Any,
                   locked: Mapping[str, str], check_mlflow: bool, provenance_file: str) -> Lineage:
    """The chain metric -> provenance -> parent run -> each fold's model, data digests, params and commit (checks
    added; the run id and fold hashes are read from ``provenance_file``, the metrics file's provenance)."""
    model = str(metrics["model"])
    model_dir = next((o.path for o in train.outs if o.is_dir), None)
    if model_dir is None:
        raise AuditError(f"dvc.yaml: stage {train.name} has no directory output (expected models/{model})")
    parent_path = PurePosixPath(model_dir) / META
    parent = _read_json(root / parent_path, _PARENT_META)
    shas = metrics["model_sha256"]
    if not isinstance(shas, Mapping):
        raise AuditError(f"{provenance_file}: model_sha256 must be an object fold -> sha256 (one model per fold), got "
                         f"{type(shas).__name__}; rerun evaluate@{model}")
    dirs = fold_model_dirs(root / model_dir)
    if not dirs:
        raise AuditError(f"{model_dir}: no fold model directories (fold<k>/{META} naming its fold)")
    digests = parent["data_digests"]
    if not isinstance(digests, Mapping):
        raise AuditError(f"{parent_path}: data_digests must be an object, got {digests!r}")
    split_file, manifest = _data_files(root, digests, f"{parent_path}: data_digests")
    commit = str(parent.get("git_commit") or UNKNOWN)
    checks: list[Check] = []
    folds: list[FoldLineage] = []
    fold_params: dict[str, Any] = {}
    hashed: dict[str, str | None] = {}  # weights file -> sha256 (every fold usually starts from the same file)
    block = f"train.{model}"
    for fold, directory in dirs.items():
        fold_rel = directory.relative_to(root).as_posix()
        meta_path = f"{fold_rel}/{META}"
        meta = _read_json(directory / META, _FOLD_META)
        if not isinstance(meta["data_digests"], Mapping):
            raise AuditError(f"{meta_path}: data_digests must be an object, got {meta['data_digests']!r}")
        model_file = f"{fold_rel}/{WEIGHTS}"
        actual = sha256_file(directory / WEIGHTS) if (directory / WEIGHTS).is_file() else None
        init = meta.get("weights")
        if init is not None and not isinstance(init, Mapping):
            raise AuditError(f"{meta_path}: weights must be an object (kind, path, sha256), got {init!r}")
        folds.append(FoldLineage(fold, model_file, meta["model_sha256"], meta["mlflow_run_id"],
                                 str(meta.get("git_commit") or UNKNOWN), meta.get("git_dirty"),
                                 None if init is None else dict(init)))
        if init is not None and init.get("path"):
            checks += _weights_checks(root, fold, init, hashed)
        fold_params = dict(meta["params"])
        checks += [
            Check(f"model sha256 (fold {fold}: meta.json vs file)", model_file, meta["model_sha256"], actual),
            Check(f"model sha256 (fold {fold}: provenance vs file)", model_file, shas.get(str(fold)), actual),
            Check(f"params {block} (fold {fold}: meta.json vs dvc.lock)", meta_path, meta["params"],
                  _with_defaults(dag.lookup(train.locked_params, block))),
            Check(f"git commit (fold {fold} vs {parent_path})", meta_path, commit, folds[-1].git_commit),
            *(Check(f"training data digest (fold {fold}: meta.json vs dvc.lock)", path, digest, locked.get(path))
              for path, digest in sorted(meta["data_digests"].items())),
        ]
    dirty_flags = [parent.get("git_dirty"), *(f.git_dirty for f in folds)]
    dirty = True if any(d is True for d in dirty_flags) else None if any(d is None for d in dirty_flags) else False
    lineage = Lineage(
        metrics_file=rel, metrics={k: metrics[k] for k in METRIC_KEYS if k in metrics}, stage=stage.name,
        model=model, mlflow_run_id=parent["mlflow_run_id"], mlflow_tracking_uri=str(parent.get("mlflow_tracking_uri")
                                                                                   or ""),
        model_dir=model_dir, git_commit=commit, git_dirty=dirty,
        provenance=describe_provenance(commit, dirty, parent.get("git_changed") or ()), params=fold_params,
        split_file=split_file, manifest=manifest, data_source=params.data.source, folds=folds,
    )
    lineage.checks = [
        Check("MLflow run id (provenance vs meta.json)", provenance_file, parent["mlflow_run_id"],
              metrics["mlflow_run_id"]),
        Check(f"folds (provenance model_sha256 vs {parent_path})", provenance_file, list(dirs),
              sorted(int(k) for k in shas)),
        *(Check("training data digest (meta.json vs dvc.lock)", path, digest, locked.get(path))
          for path, digest in sorted(digests.items())),
        Check("git commit (meta.json vs git)", ".git", commit, commit if _commit_exists(root, commit) else None),
        *checks,
    ]
    if check_mlflow:
        uri = lineage.mlflow_tracking_uri
        runs = [("parent", lineage.mlflow_run_id), *((f"fold {f.fold}", f.mlflow_run_id) for f in folds)]
        lineage.checks += [Check(f"MLflow run exists ({what})", uri or "MLFLOW_TRACKING_URI", run_id,
                                 _mlflow_run(root, uri, run_id)) for what, run_id in runs]
    return lineage


def _weights_checks(root: Path, fold: int, init: Mapping[str, Any], hashed: dict[str, str | None]) -> list[Check]:
    """The pre-trained weights file a fold started from against its meta.json: the file's sha256, and the sha256 of
    the committed record the weights module wrote when the file entered the project."""
    path = str(init["path"])
    if path not in hashed:
        hashed[path] = sha256_file(root / path) if (root / path).is_file() else None
    record_file = pretrained.record_path(path).as_posix()
    try:
        recorded = pretrained.read_record(root / path).get("sha256")
    except (FileNotFoundError, pretrained.WeightsError):
        recorded = None
    return [Check(f"pre-trained weights sha256 (fold {fold}: meta.json vs file)", path, init.get("sha256"),
                  hashed[path]),
            Check(f"pre-trained weights sha256 (fold {fold}: meta.json vs record)", record_file, init.get("sha256"),
                  recorded)]


def _describe_weights(folds: list[FoldLineage]) -> list[str]:
    """The ``weights`` lines of the chain: one when every fold started from the same weights, else one per fold."""
    def text(init: dict[str, Any] | None) -> str:
        if init is None:
            return "not recorded (a model trained before meta.json named its initial weights)"
        return pretrained.WeightsSource.from_record(init).describe()

    described = [text(f.weights) for f in folds]
    if len(set(described)) == 1:
        return [f"weights     {described[0]}" + (": every fold started from it" if folds[0].weights and
                                                  folds[0].weights.get("path") else "")]
    return [f"weights     fold {f.fold}: {d}" for f, d in zip(folds, described)]


def _with_defaults(block: Any) -> dict[str, Any] | None:
    """A ``train.<model>`` block as dvc.lock records it (the keys params.yaml sets) completed with the defaults of
    :class:`~spinedxa.config.ModelTrainConfig`, as the training saw it and wrote it to meta.json."""
    if not isinstance(block, Mapping):
        return None
    defaults = {f.name: f.default for f in fields(ModelTrainConfig) if f.default is not MISSING}
    return {**defaults, **block}


def _lock_checks(root: Path, stages: Iterable[dag.Stage], params_file: str) -> list[Check]:
    """What ``dvc status`` checks, for the given stages: each dep and output against the hash that stage recorded
    in dvc.lock (a path shared by two stages is checked again only if they recorded different hashes, i.e. the
    downstream stage is stale), and each params value."""
    checks: list[Check] = []
    seen: set[tuple[str, str | None]] = set()
    actual: dict[str, str | None] = {}
    for st in stages:
        entries = [*(("output", o.path, o.locked_hash) for o in st.outs),
                   *(("dep", d.path, d.locked_hash) for d in st.deps)]
        for kind, path, recorded in entries:
            if (path, recorded) in seen:
                continue
            seen.add((path, recorded))
            if path not in actual:
                actual[path] = _hash_or_none(root / path, root)
            checks.append(Check(f"{kind} of {st.name} (dvc.lock)", path, recorded, actual[path]))
        for key, value in sorted(st.params.items()):
            checks.append(Check(f"param {key} of {st.name} (dvc.lock)", params_file, st.locked_params.get(key),
                                value))
    return checks


def _mlflow_run(root: Path, recorded_uri: str, run_id: str | None) -> str | None:
    """The run id if the run exists in the tracking store, else None."""
    from spinedxa import tracking  # imports mlflow: only when asked

    if not run_id:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or recorded_uri or tracking.DEFAULT_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db = db if db.is_absolute() else root / db  # the training ran with the repo root as working directory
        if not db.is_file():
            return None  # opening a missing sqlite store would create an empty one
        uri = f"sqlite:///{db}"
    return run_id if tracking.run_exists(run_id, uri=uri) else None


def _roles_per_fold(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per role in each fold: ``{"0": {"train": n, "val": n, "test": n}, ...}`` (roles in contract order)."""
    counts = frame.groupby(["fold", "split"]).size()
    return {str(fold): {role: int(counts.get((fold, role), 0)) for role in splits_contract.ROLES
                        if counts.get((fold, role), 0)}
            for fold in splits_contract.folds(frame)}


def _roles_text(roles: Mapping[str, Mapping[str, int]]) -> str:
    """``fold 0: train 100, val 18, test 56; fold 1: ...``"""
    return "; ".join(f"fold {k}: " + ", ".join(f"{r} {n}" for r, n in counts.items()) for k, counts in roles.items())


def _raw_file_checks(
    root: Path, splits: pd.DataFrame, split_file: str, manifest: str, source: str
) -> tuple[list[dict[str, Any]], list[Check]]:
    """sha256 of every raw file in the split table, once per scan whatever its number of folds: splits vs manifest,
    and manifest vs the file under ``data.source`` (a copy of a raw file is checked as that file)."""
    man = _read(manifest_contract.read, root / manifest, ("source", "sha256"))
    resolved, _ = _resolve_sources(splits, man, root / split_file, root / manifest)
    recorded = man.drop_duplicates("source").set_index("source")["sha256"]
    frame = splits.assign(raw_source=resolved)
    raw, checks, hashed = [], [], set()
    for (src, sha, raw_src), group in frame.groupby(["source", "sha256", "raw_source"], sort=True):
        shown = (PurePosixPath(source) / raw_src).as_posix()
        raw.append({"source": src, "sha256": sha,
                    "roles": {str(f): r for f, r in sorted(zip(group["fold"], group["split"]))}})
        checks.append(Check("raw file sha256 (splits vs manifest)", shown, sha, recorded.get(raw_src)))
        if raw_src not in hashed:
            hashed.add(raw_src)
            path = root / source / raw_src
            checks.append(Check("raw file sha256 (manifest vs file)", shown, recorded.get(raw_src),
                                sha256_file(path) if path.is_file() else None))
    return raw, checks


def format_lineage(lineage: Lineage) -> str:
    """Human-readable chain, one link per line, then every failed check."""
    def number(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else f"{v}"

    metrics = ", ".join(f"{k}={number(v)}" for k, v in lineage.metrics.items())
    params = ", ".join(f"{k}={v}" for k, v in lineage.params.items())
    raw_failures = [c for c in lineage.failures if c.item.startswith("raw file")]
    lines = [f"metric      {lineage.metrics_file}  (stage {lineage.stage}): {metrics}"]
    if lineage.model_dir is None:
        lines += [f"MLflow run  {lineage.mlflow_run_id or 'not recorded in the metrics file'}",
                  f"model       none: {lineage.model} has no model files (refit on each fold by {lineage.stage})"]
    else:
        lines += [f"MLflow run  {lineage.mlflow_run_id}  (parent run; "
                  f"{lineage.mlflow_tracking_uri or 'tracking URI not recorded'})",
                  f"model       {lineage.model_dir}: {len(lineage.folds)} fold model(s)"]
        for f in lineage.folds:
            lines.append(f"  fold {f.fold}    {f.model_file}  sha256 {f.model_sha256}  run {f.mlflow_run_id}")
        lines += _describe_weights(lineage.folds)
        lines.append(f"params      train.{lineage.model}: {params}")
    lines += [
        f"provenance  {lineage.provenance}",
        f"split       {lineage.split_file}  {_roles_text(lineage.split_roles)}",
        f"manifest    {lineage.manifest}",
        f"raw files   {len(lineage.raw_files)} scan(s) under {lineage.data_source}: "
        + ("every sha256 matches" if not raw_failures else f"{len(raw_failures)} mismatch(es)"),
        f"checks      {len(lineage.checks) - len(lineage.failures)}/{len(lineage.checks)} passed",
    ]
    for c in lineage.failures:
        lines.append(f"MISMATCH    {c.path}: {c.item}: expected {c.expected}, found {c.actual}")
    lines.append("OK: every hash matches" if lineage.ok else f"FAILED: {len(lineage.failures)} check(s) failed")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- leakage


def audit_leakage(
    splits_file: str | Path,
    manifest_file: str | Path,
    augmented_index: str | Path | None,
    cfg: ValidateConfig,
) -> Leakage:
    """Find, in each fold, patients, raw files and near-duplicate images in two roles, and augmented copies used by a
    fold whose parent or patient is not only ``train`` there; under k-fold, scans not ``test`` exactly once.

    Near-duplicates are what validate calls near-duplicates (``validate.find_near_duplicates``): pHash within
    ``cfg.phash_max_distance`` bits, confirmed by SSIM >= ``cfg.near_duplicate_min_ssim`` on the ingested images
    (next to the manifest); pairs are formed between distinct raw files. A candidate whose images are missing cannot
    be cleared and is reported (ssim None).

    Args:
        splits_file: a table in the splits contract (``data/split/splits.csv``, or another, e.g. the replay
            ablation's leaky split).
        manifest_file: the ingest manifest the split was made from.
        augmented_index: ``data/augmented/index.csv``, or None to skip the augmentation check.

    Raises:
        AuditError: a file is missing or lacks a required column, a split row matches no manifest row (neither by
            source nor by sha256), or a phash is malformed.
    """
    splits_file, manifest_file = Path(splits_file), Path(manifest_file)
    splits = _read(splits_contract.read, splits_file)
    manifest = _read(manifest_contract.read, manifest_file, _MANIFEST_COLUMNS)
    resolved, copies = _resolve_sources(splits, manifest, splits_file, manifest_file)
    folds = splits_contract.folds(splits)
    report = Leakage(splits_file=str(splits_file), copies=copies, roles=_roles_per_fold(splits), n_rows=len(splits),
                     n_scans=splits["sha256"].nunique(), n_patients=splits["patient_id"].nunique(),
                     n_folds=len(folds), phash_max_distance=cfg.phash_max_distance,
                     near_duplicate_min_ssim=cfg.near_duplicate_min_ssim)

    for (fold, patient), group in splits.groupby(["fold", "patient_id"], sort=True):
        if group["split"].nunique() > 1:
            report.patients.append({"fold": int(fold), "patient_id": patient, "roles": sorted(group["split"].unique()),
                                    "sources": sorted(group["source"].unique())})
    for (fold, sha), group in splits.groupby(["fold", "sha256"], sort=True):
        if group["split"].nunique() > 1:
            report.files.append({"fold": int(fold), "sha256": sha, "roles": sorted(group["split"].unique()),
                                 "sources": sorted(group["source"].unique())})

    roles_of: dict[tuple[int, str], set[str]] = defaultdict(set)  # (fold, sha256) -> roles
    patient_roles: dict[tuple[int, str], set[str]] = defaultdict(set)  # (fold, patient) -> roles
    for fold, sha, patient, role in zip(splits["fold"], splits["sha256"], splits["patient_id"], splits["split"]):
        roles_of[(int(fold), sha)].add(role)
        patient_roles[(int(fold), patient)].add(role)

    report.near_duplicates = _near_duplicates(splits.assign(raw_source=resolved), manifest, manifest_file, cfg,
                                              folds, roles_of)
    if augmented_index is not None:
        report.augmented_checked = True
        _augmented_leaks(report, _read(augmented_contract.read, Path(augmented_index)), folds, roles_of,
                         patient_roles)
    if len(folds) > 1:  # k-fold: every scan test in exactly one fold, present in every fold
        for source, group in splits.groupby("source", sort=True):
            tests = sorted(int(f) for f in group.loc[group["split"] == "test", "fold"])
            missing = sorted(set(folds) - {int(f) for f in group["fold"]})
            if len(tests) != 1 or missing:
                report.coverage.append({"source": source, "test_folds": tests, "missing_folds": missing})
    return report


def _near_duplicates(frame: pd.DataFrame, manifest: pd.DataFrame, manifest_file: Path, cfg: ValidateConfig,
                     folds: list[int], roles_of: Mapping[tuple[int, str], set[str]]) -> list[dict[str, Any]]:
    """Confirmed near-duplicate pairs of distinct raw files that have different roles in some fold."""
    raw = frame.drop_duplicates("sha256").sort_values("raw_source", kind="stable")[["sha256", "raw_source"]]
    rows = manifest.drop_duplicates("source").set_index("source")
    scans = raw.assign(patient_id=rows.loc[raw["raw_source"], "patient_id"].to_numpy(),
                       image=rows.loc[raw["raw_source"], "image"].to_numpy(),
                       phash=rows.loc[raw["raw_source"], "phash"].to_numpy()).reset_index(drop=True)
    try:
        pairs = find_near_duplicates(scans, scans.index, manifest_file.parent, cfg)
    except ValueError as exc:  # a malformed phash
        raise AuditError(f"{manifest_file}: {exc}") from None
    found = []
    for pair in pairs.itertuples(index=False):
        unconfirmable = cfg.near_duplicate_min_ssim > 0 and pd.isna(pair.ssim)
        if not (pair.confirmed or unconfirmable):
            continue
        a, b = scans.loc[pair.a], scans.loc[pair.b]
        for fold in folds:
            ra, rb = roles_of.get((fold, a["sha256"]), set()), roles_of.get((fold, b["sha256"]), set())
            if any(x != y for x in ra for y in rb):
                found.append({
                    "fold": fold, "sources": [a["raw_source"], b["raw_source"]],
                    "roles": ["+".join(sorted(ra)), "+".join(sorted(rb))],
                    "patients": [a["patient_id"], b["patient_id"]], "distance": int(pair.distance),
                    "ssim": None if pd.isna(pair.ssim) else round(float(pair.ssim), 4),
                })
    return found


def _augmented_leaks(report: Leakage, index: pd.DataFrame, folds: list[int],
                     roles_of: Mapping[tuple[int, str], set[str]],
                     patient_roles: Mapping[tuple[int, str], set[str]]) -> None:
    """Copies whose parent is not in the split at all, and, in each fold that trains on a copy (its parent is
    ``train`` there, the rule of ``data.training_items``), copies whose parent or patient has another role."""
    report.n_augmented = len(index)
    known = {sha for _, sha in roles_of}
    for row in index.itertuples(index=False):
        if row.parent_sha256 not in known:
            report.augmented.append({"fold": None, "image": row.image, "parent_source": row.parent_source,
                                     "parent_roles": [], "patient_id": row.patient_id})
            continue
        used = [f for f in folds if "train" in roles_of.get((f, row.parent_sha256), set())]
        report.n_augmented_unused += not used
        for fold in used:
            parent = roles_of[(fold, row.parent_sha256)]
            patient = patient_roles.get((fold, row.patient_id), set())
            if (parent | patient) - {"train"}:
                report.augmented.append({"fold": fold, "image": row.image, "parent_source": row.parent_source,
                                         "parent_roles": sorted(parent), "patient_roles": sorted(patient),
                                         "patient_id": row.patient_id})


def format_leakage(report: Leakage) -> str:
    """Human-readable leakage report: what was audited, counts, then every offending item."""
    kind = f"{report.n_folds} folds (k-fold)" if report.n_folds > 1 else "1 fold (holdout)"
    augmented = (f"augmented copies {report.n_augmented} ({report.n_augmented_unused} used by no fold)"
                 if report.augmented_checked else "augmented copies: not checked")
    lines = [
        f"splits {report.splits_file}: {kind}, {report.n_scans} raw file(s) of {report.n_patients} patient(s) in "
        f"{report.n_rows} row(s); {_roles_text(report.roles)}",
        f"near-duplicates: pHash within {report.phash_max_distance} bits and SSIM >= "
        f"{report.near_duplicate_min_ssim}; {augmented}",
        f"patients in two roles of a fold:         {len(report.patients)}",
        f"raw files in two roles of a fold:        {len(report.files)}",
        f"near-duplicates across roles of a fold:  {len(report.near_duplicates)}",
        f"augmented copies from a non-train scan:  {len(report.augmented)}",
    ]
    if report.n_folds > 1:
        lines.append(f"scans not test in exactly one fold:      {len(report.coverage)}")
    for p in report.patients:
        lines.append(f"LEAK fold {p['fold']}: patient {p['patient_id']} in {'+'.join(p['roles'])}: "
                     f"{', '.join(p['sources'])}")
    for f in report.files:
        lines.append(f"LEAK fold {f['fold']}: raw file sha256 {f['sha256']} in {'+'.join(f['roles'])}: "
                     f"{', '.join(f['sources'])}")
    for d in report.near_duplicates:
        ssim = "images missing" if d["ssim"] is None else f"SSIM {d['ssim']}"
        lines.append(f"LEAK fold {d['fold']}: near-duplicate (distance {d['distance']}, {ssim}): {d['sources'][0]} "
                     f"({d['roles'][0]}) ~ {d['sources'][1]} ({d['roles'][1]})")
    for a in report.augmented:
        if a["fold"] is None:
            lines.append(f"LEAK augmented {a['image']} derives from {a['parent_source']}, which is not in the split")
        else:
            lines.append(f"LEAK fold {a['fold']}: augmented {a['image']} is trained on, but its parent "
                         f"{a['parent_source']} is {'+'.join(a['parent_roles'])} and its patient "
                         f"{a['patient_id']} {'+'.join(a['patient_roles']) or 'absent'} in that fold")
    for c in report.coverage:
        lines.append(f"LEAK k-fold: {c['source']} is test in fold(s) {c['test_folds'] or 'none'}"
                     + (f" and missing from fold(s) {c['missing_folds']}" if c["missing_folds"] else ""))
    if report.copies:
        shown = ", ".join(f"{c['source']} = {c['raw_source']}" for c in report.copies[:5])
        more = f" and {len(report.copies) - 5} more" if len(report.copies) > 5 else ""
        lines.append(f"NOTE {len(report.copies)} split source(s) are not in the manifest but share a raw file's "
                     f"sha256 (copies), audited as that raw file: {shown}{more}")
    lines.append("OK: no leakage between the roles of any fold" if report.ok
                 else "FAILED: leakage between the roles of a fold")
    return "\n".join(lines)


def default_leakage_paths(root: str | Path = ".") -> dict[str, Path]:
    """Where the leakage audit reads by default (docs/CONTRACTS.md)."""
    root = Path(root)
    return {
        "splits": root / "data" / "split" / "splits.csv",
        "manifest": root / "data" / "ingested" / MANIFEST_NAME,
        "augmented": root / "data" / "augmented" / augmented_contract.FILE_NAME,
    }
