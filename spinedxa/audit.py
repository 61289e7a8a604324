"""Audits of a finished pipeline: the lineage of a metric back to raw files, and leakage between splits.

Lineage (``spinedxa audit reports/metrics/<model>.json``): metric file -> MLflow run id -> model file hash ->
split file -> manifest -> sha256 of every raw file used for training and testing, with the params and git commit.
Every hash is verified against the workspace:

- the metrics file and every DVC output on the way against the md5 DVC recorded in ``dvc.lock``;
- ``model.pt`` against ``model_sha256`` in ``meta.json`` and in the metrics file;
- the data digests the training recorded in ``meta.json`` against ``dvc.lock`` and the workspace;
- every raw file's sha256 (manifest, splits) against the file under ``data.source``;
- the params the model was trained with against ``dvc.lock`` and ``params.yaml``; the git commit against git.

Leakage (``spinedxa audit --leakage``): no patient, no raw file (sha256) and no near-duplicate image (as validate
defines it: perceptual hash within ``validate.phash_max_distance`` bits, confirmed by SSIM >=
``validate.near_duplicate_min_ssim``) appears in two splits, and no augmented image derives from an image outside the
training split.

Nothing here prints PHI: patients appear only as pseudonymous ids, files by their path inside the data source
(the manifest's ``source`` column), as in every other pipeline output.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import pandas as pd

from spinedxa import dag
from spinedxa.config import ValidateConfig, load_params
from spinedxa.data import AUGMENTED_COLUMNS, SPLITS, SPLITS_COLUMNS, read_table
from spinedxa.files import sha256_file
from spinedxa.validate import find_near_duplicates

MANIFEST_NAME = "manifest.csv"  # inside the ingest output directory (docs/CONTRACTS.md)
METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
_MANIFEST_COLUMNS = ("source", "sha256", "status", "patient_id", "phash")
_METRICS_COLUMNS = ("model", "mlflow_run_id", "model_sha256")
_META_COLUMNS = ("model", "mlflow_run_id", "model_sha256", "data_digests", "params")


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
class Lineage:
    """The chain from one metrics file back to the raw data, with every check made on the way."""

    metrics_file: str
    metrics: dict[str, Any]
    stage: str
    model: str
    mlflow_run_id: str
    mlflow_tracking_uri: str
    model_file: str
    model_sha256: str
    git_commit: str
    params: dict[str, Any]
    split_file: str
    manifest: str
    data_source: str
    raw_files: list[dict[str, str]] = field(default_factory=list)  # source, split, sha256
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
    """Items found in more than one split (each list empty when the splits are clean)."""

    patients: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    augmented: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0
    n_patients: int = 0
    n_augmented: int = 0
    phash_max_distance: int = 0
    near_duplicate_min_ssim: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.patients or self.files or self.near_duplicates or self.augmented)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ------------------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path, required: Iterable[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise AuditError(f"{path}: missing key(s) {missing}")
    return data


def _table(path: Path, required: Iterable[str]) -> pd.DataFrame:
    try:
        return read_table(path, tuple(required))
    except (FileNotFoundError, ValueError) as exc:
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


# ------------------------------------------------------------------------------------------------------- lineage


def audit_lineage(
    metrics_file: str | Path, root: str | Path = ".", params_file: str = "params.yaml", *, check_mlflow: bool = False
) -> Lineage:
    """Trace ``metrics_file`` back to the raw data and verify every hash on the way (see the module docstring).

    Args:
        metrics_file: ``reports/metrics/<model>.json`` (relative to ``root`` or absolute).
        root: the repository root (holds dvc.yaml, dvc.lock and params.yaml).
        params_file: the params file, relative to ``root``.
        check_mlflow: also check that the run exists in the tracking store (``MLFLOW_TRACKING_URI``, else the URI
            recorded in meta.json); off by default because a team server may be out of reach.

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
    metrics = _read_json(root / rel, _METRICS_COLUMNS)
    model = str(metrics["model"])
    lineage_stages = dag.upstream(stages, stage.name)
    try:
        train = dag.get_stage(lineage_stages, f"{dag.TRAIN_PREFIX}{model}")
    except dag.DagError:
        raise AuditError(f"{rel}: model {model!r} has no stage {dag.TRAIN_PREFIX}{model} upstream of {stage.name}") from None
    model_dir = next((o.path for o in train.outs if o.is_dir), None)
    if model_dir is None:
        raise AuditError(f"dvc.yaml: stage {train.name} has no directory output (expected models/{model})")
    meta_path = PurePosixPath(model_dir) / "meta.json"
    meta = _read_json(root / meta_path, _META_COLUMNS)
    digests = meta["data_digests"]
    if not isinstance(digests, Mapping):
        raise AuditError(f"{meta_path}: data_digests must be an object, got {digests!r}")
    split_file = next((p for p in digests if p.endswith(".csv")), None)
    ingested = next((p for p in digests if root.joinpath(p, MANIFEST_NAME).is_file()), None)
    if split_file is None or ingested is None:
        raise AuditError(f"{meta_path}: data_digests {sorted(digests)} name no split CSV and no ingested directory")
    manifest = (PurePosixPath(ingested) / MANIFEST_NAME).as_posix()
    params = load_params(root / params_file)
    model_file = (PurePosixPath(model_dir) / "model.pt").as_posix()

    lineage = Lineage(
        metrics_file=rel, metrics={k: metrics[k] for k in METRIC_KEYS if k in metrics}, stage=stage.name,
        model=model, mlflow_run_id=str(meta["mlflow_run_id"]),
        mlflow_tracking_uri=str(meta.get("mlflow_tracking_uri", "")), model_file=model_file,
        model_sha256=str(meta["model_sha256"]), git_commit=str(meta.get("git_commit", "unknown")),
        params=dict(meta["params"]), split_file=split_file, manifest=manifest, data_source=params.data.source,
    )
    checks = lineage.checks
    locked = _locked_hashes(stages)

    # 1. the links the files record between themselves: metric -> run -> model -> data -> params -> commit
    checks.append(Check("MLflow run id (metrics vs meta.json)", rel, meta["mlflow_run_id"], metrics["mlflow_run_id"]))
    model_sha = sha256_file(root / model_file) if (root / model_file).is_file() else None
    checks.append(Check("model sha256 (meta.json)", model_file, meta["model_sha256"], model_sha))
    checks.append(Check("model sha256 (metrics file)", model_file, metrics["model_sha256"], model_sha))
    if check_mlflow:
        checks.append(Check("MLflow run exists", lineage.mlflow_tracking_uri or "MLFLOW_TRACKING_URI",
                            lineage.mlflow_run_id, _mlflow_run(root, lineage)))
    for path, digest in sorted(digests.items()):
        checks.append(Check("training data digest (meta.json vs dvc.lock)", path, digest, locked.get(path)))
    block = f"train.{model}"
    checks.append(Check(f"params {block} (meta.json vs dvc.lock)", "dvc.lock", lineage.params,
                        dag.lookup(train.locked_params, block)))
    checks.append(Check("git commit (meta.json vs git)", ".git", lineage.git_commit,
                        lineage.git_commit if _commit_exists(root, lineage.git_commit) else None))
    # 2. every stage on the way, as DVC recorded it in dvc.lock, against the workspace: deps, outputs, params
    checks.extend(_lock_checks(root, lineage_stages, params_file))
    # 3. every raw file used for training and testing
    lineage.raw_files, raw_checks = _raw_file_checks(root, split_file, manifest, params.data.source)
    checks.extend(raw_checks)
    return lineage


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


def _mlflow_run(root: Path, lineage: Lineage) -> str | None:
    """The run id if the run exists in the tracking store, else None."""
    from spinedxa import tracking  # imports mlflow: only when asked

    uri = os.environ.get("MLFLOW_TRACKING_URI") or lineage.mlflow_tracking_uri or tracking.DEFAULT_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db = db if db.is_absolute() else root / db  # the training ran with the repo root as working directory
        if not db.is_file():
            return None  # opening a missing sqlite store would create an empty one
        uri = f"sqlite:///{db}"
    return lineage.mlflow_run_id if tracking.run_exists(lineage.mlflow_run_id, uri=uri) else None


def _raw_file_checks(
    root: Path, split_file: str, manifest: str, source: str
) -> tuple[list[dict[str, str]], list[Check]]:
    """sha256 of every raw file in the splits: splits.csv vs manifest vs the file under ``data.source``."""
    splits = _table(root / split_file, SPLITS_COLUMNS)
    man = _table(root / manifest, _MANIFEST_COLUMNS).set_index("source")
    source_dir = root / source
    raw, checks = [], []
    for row in splits.itertuples(index=False):
        path = source_dir / row.source
        actual = sha256_file(path) if path.is_file() else None
        recorded = man["sha256"].get(row.source)
        shown = f"{PurePosixPath(source) / row.source}"
        raw.append({"source": row.source, "split": row.split, "sha256": row.sha256})
        checks.append(Check(f"raw file sha256 ({row.split}; splits vs manifest)", shown, row.sha256, recorded))
        checks.append(Check(f"raw file sha256 ({row.split}; manifest vs file)", shown, recorded, actual))
    return raw, checks


def format_lineage(lineage: Lineage) -> str:
    """Human-readable chain, one link per line, then every failed check."""
    counts = defaultdict(int)
    for f in lineage.raw_files:
        counts[f["split"]] += 1
    metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in lineage.metrics.items())
    params = ", ".join(f"{k}={v}" for k, v in lineage.params.items())
    raw_failures = [c for c in lineage.failures if c.item.startswith("raw file")]
    lines = [
        f"metric      {lineage.metrics_file}  (stage {lineage.stage}): {metrics}",
        f"MLflow run  {lineage.mlflow_run_id}  ({lineage.mlflow_tracking_uri or 'tracking URI not recorded'})",
        f"model       {lineage.model_file}  sha256 {lineage.model_sha256}",
        f"params      train.{lineage.model}: {params}",
        f"git commit  {lineage.git_commit}",
        f"split       {lineage.split_file}  " + ", ".join(f"{s} {counts[s]}" for s in SPLITS if counts[s]),
        f"manifest    {lineage.manifest}",
        f"raw files   {len(lineage.raw_files)} under {lineage.data_source}: "
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
    """Find patients, raw files and near-duplicate images shared by two splits, and augmented images whose parent is
    not in the training split.

    Near-duplicates are what validate calls near-duplicates (``validate.find_near_duplicates``): pHash within
    ``cfg.phash_max_distance`` bits, confirmed by SSIM >= ``cfg.near_duplicate_min_ssim`` on the ingested images
    (next to the manifest). A candidate whose images are missing cannot be cleared and is reported (ssim None).

    Raises:
        AuditError: a file is missing or lacks a required column, a split source has no manifest row, or a phash is
            malformed.
    """
    splits_file, manifest_file = Path(splits_file), Path(manifest_file)
    splits = _table(splits_file, SPLITS_COLUMNS)
    manifest = _table(manifest_file, _MANIFEST_COLUMNS)
    report = Leakage(n_images=len(splits), n_patients=splits["patient_id"].nunique(),
                     phash_max_distance=cfg.phash_max_distance, near_duplicate_min_ssim=cfg.near_duplicate_min_ssim)

    for patient, group in splits.groupby("patient_id", sort=True):
        if group["split"].nunique() > 1:
            report.patients.append({"patient_id": patient, "splits": sorted(group["split"].unique()),
                                    "sources": sorted(group["source"])})
    for sha, group in splits.groupby("sha256", sort=True):
        if group["split"].nunique() > 1:
            report.files.append({"sha256": sha, "splits": sorted(group["split"].unique()),
                                 "sources": sorted(group["source"])})

    missing = sorted(set(splits["source"]) - set(manifest["source"]))
    if missing:
        raise AuditError(f"{manifest_file}: no row for {len(missing)} source(s) of {splits_file}, e.g. {missing[:3]}")
    table = splits.merge(manifest[["source", "phash"]].drop_duplicates("source"), on="source", how="left")
    try:
        pairs = find_near_duplicates(table, table.index, manifest_file.parent, cfg)
    except ValueError as exc:  # a malformed phash
        raise AuditError(f"{manifest_file}: {exc}") from None
    for pair in pairs.itertuples(index=False):
        a, b = table.loc[pair.a], table.loc[pair.b]
        unconfirmable = cfg.near_duplicate_min_ssim > 0 and pd.isna(pair.ssim)
        if a["split"] != b["split"] and (pair.confirmed or unconfirmable):
            report.near_duplicates.append({
                "sources": [a["source"], b["source"]], "splits": [a["split"], b["split"]],
                "patients": [a["patient_id"], b["patient_id"]], "distance": int(pair.distance),
                "ssim": None if pd.isna(pair.ssim) else round(float(pair.ssim), 4),
            })

    if augmented_index is not None:
        augmented = _table(Path(augmented_index), AUGMENTED_COLUMNS)
        report.n_augmented = len(augmented)
        split_of = splits.groupby("sha256")["split"].agg(lambda s: ",".join(sorted(set(s))))
        train_patients = set(splits.loc[splits["split"] == "train", "patient_id"])
        for row in augmented.itertuples(index=False):
            parent_split = split_of.get(row.parent_sha256, "none")
            if parent_split != "train" or row.patient_id not in train_patients:
                report.augmented.append({"image": row.image, "parent_source": row.parent_source,
                                         "parent_split": parent_split, "patient_id": row.patient_id})
    return report


def format_leakage(report: Leakage) -> str:
    """Human-readable leakage report: counts, then every offending item."""
    lines = [
        f"images {report.n_images}, patients {report.n_patients}, augmented {report.n_augmented}; near-duplicates: "
        f"pHash within {report.phash_max_distance} bits and SSIM >= {report.near_duplicate_min_ssim}",
        f"patients in several splits:        {len(report.patients)}",
        f"raw files in several splits:       {len(report.files)}",
        f"near-duplicates across splits:     {len(report.near_duplicates)}",
        f"augmented from a non-train parent: {len(report.augmented)}",
    ]
    for p in report.patients:
        lines.append(f"LEAK patient {p['patient_id']} in {'+'.join(p['splits'])}: {', '.join(p['sources'])}")
    for f in report.files:
        lines.append(f"LEAK file sha256 {f['sha256']} in {'+'.join(f['splits'])}: {', '.join(f['sources'])}")
    for d in report.near_duplicates:
        ssim = "images missing" if d["ssim"] is None else f"SSIM {d['ssim']}"
        lines.append(f"LEAK near-duplicate (distance {d['distance']}, {ssim}): {d['sources'][0]} ({d['splits'][0]}) ~ "
                     f"{d['sources'][1]} ({d['splits'][1]})")
    for a in report.augmented:
        lines.append(f"LEAK augmented {a['image']} derives from {a['parent_source']} ({a['parent_split']} split)")
    lines.append("OK: no leakage between splits" if report.ok else "FAILED: leakage between splits")
    return "\n".join(lines)


def default_leakage_paths(root: str | Path = ".") -> dict[str, Path]:
    """Where the leakage audit reads by default (docs/CONTRACTS.md)."""
    root = Path(root)
    return {
        "splits": root / "data" / "split" / "splits.csv",
        "manifest": root / "data" / "ingested" / MANIFEST_NAME,
        "augmented": root / "data" / "augmented" / "index.csv",
    }
