"""MLflow tracking behind one small API (the only module in the package that imports mlflow).

MLflow's API moves between major versions (``artifact_path`` became ``name`` in 3.x, logged models became their own
entities), so every other module calls these functions instead of mlflow directly.

Store: ``sqlite:///mlflow.db`` in the working directory (the repo root when a stage runs) unless the environment
variable ``MLFLOW_TRACKING_URI`` points elsewhere (e.g. a team ``mlflow server``). The store is created once, under a
file lock, before trainings run in parallel: two processes creating a fresh sqlite store at the same time crash in
MLflow 3 (both run the schema migrations).

Offline by construction: telemetry is off, model logging gets explicit pip requirements (no requirement inference,
which would inspect the environment and may reach for package indexes), and no environment variables are recorded.
Nothing identifying is logged: only params, metrics, pseudonymous data digests and repo-relative paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

# Set before mlflow is imported: mlflow reads some of these at import time. setdefault keeps a user's explicit choice.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 sends usage telemetry over the network
os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import mlflow.pytorch  # noqa: E402
from filelock import FileLock  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME, MLFLOW_USER  # noqa: E402

DEFAULT_URI = "sqlite:///mlflow.db"
# Seconds to wait for another process that is creating the store (schema migrations take a few seconds).
_LOCK_TIMEOUT_S = 300
# MLflow caps a param value at 6000 characters (mlflow/utils/validation.py MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_LEN = 6000


class RunNotFoundError(LookupError):
    """An MLflow run id does not exist in the tracking store in use."""


def tracking_uri() -> str:
    """Return the tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db`` (cwd-relative)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name(configured: str) -> str:
    """The experiment runs go to: MLflow's own ``$MLFLOW_EXPERIMENT_NAME`` when set, else ``runtime.mlflow_experiment``
    (bookkeeping, not a DVC param: renaming the experiment retrains nothing)."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or configured


def redact_uri(uri: str) -> str:
    """Return ``uri`` without user name and password, and a SQLite store's absolute path as a path relative to the
    working directory (else its file name): safe for meta.json and logs (a home directory can name a person)."""
    sqlite = _sqlite_path(uri)
    if sqlite is not None and sqlite.is_absolute():
        try:
            return f"sqlite:///{sqlite.relative_to(Path.cwd()).as_posix()}"
        except ValueError:
            return f"sqlite:///{sqlite.name}"
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _sqlite_path(uri: str) -> Path | None:
    """Path of the database file for a ``sqlite:///`` URI, else None (in-memory or not sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def _lock_for(uri: str) -> contextlib.AbstractContextManager[Any]:
    """A file lock next to a sqlite store; a no-op for server stores (the server serialises creation itself)."""
    db = _sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=_LOCK_TIMEOUT_S)


def _is_missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def init_store(uri: str | None = None, experiment: str | None = None) -> str | None:
    """Create the tracking store (and ``experiment``) once, safely against concurrent callers.

    Args:
        uri: tracking URI; defaults to :func:`tracking_uri`.
        experiment: experiment name to create if missing.

    Returns:
        The experiment id, or None when no experiment was asked for.
    """
    uri = uri or tracking_uri()
    with _lock_for(uri):
        client = MlflowClient(tracking_uri=uri)  # opening a sqlite store creates it and runs its migrations
        if experiment is None:
            client.search_experiments(max_results=1)
            return None
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(experiment)


def _anonymous_context_tags() -> dict[str, str]:
    """Replacements for MLflow's automatic tags that could name a person.

    MLflow tags every run and logged model with the OS login (``mlflow.user``), the absolute path of the script
    (``mlflow.source.name``, which may hold a home directory) and the git remote URL (which may hold credentials).
    Tags given to ``start_run``/``log_model`` override the automatic ones (mlflow.tracking.context.registry).
    """
    from mlflow.tracking.context.registry import resolve_tags

    auto = resolve_tags()
    source = Path(auto.get(MLFLOW_SOURCE_NAME, "") or "<console>")
    if source.is_absolute():
        try:
            source = source.relative_to(Path.cwd())
        except ValueError:
            source = Path(source.name)
    safe = {MLFLOW_USER: "spinedxa", MLFLOW_SOURCE_NAME: source.as_posix()}
    if MLFLOW_GIT_REPO_URL in auto:
        safe[MLFLOW_GIT_REPO_URL] = redact_uri(auto[MLFLOW_GIT_REPO_URL])
    return safe


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


@contextlib.contextmanager
def training_run(
    experiment: str,
    run_name: str,
    *,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    run_id: str | None = None,
    uri: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[str]:
    """Open (or, given ``run_id``, reopen) the MLflow run of one training; yield its run id.

    Inside the block, :func:`log_epoch`, :func:`log_model` and :func:`log_dataset` log to this run. The run ends
    FINISHED on success and FAILED when the block raises (the exception propagates).

    Args:
        experiment: experiment name (created when missing).
        run_name: the model name (one run per model).
        params: flat parameters to log (values are stringified). Not re-logged when reopening a run: MLflow params
            are immutable and a resumed training has the same ones (the checkpoint fingerprint guarantees it).
        tags: tags such as ``git_commit``, ``dvc_stage``, ``seed``.
        run_id: resume this run (a training resumed from a checkpoint keeps its run and its metric history).
        uri: tracking URI; defaults to :func:`tracking_uri`.
        parent_run_id: open a nested run under this parent (a fold under its model's run).
    """
    uri = uri or tracking_uri()
    experiment_id = init_store(uri, experiment)
    mlflow.set_tracking_uri(uri)
    if run_id is not None and not run_exists(run_id, uri=uri):
        run_id = None  # the checkpoint's run is not in this store (another store, or deleted): start afresh
    resumed = run_id is not None
    with mlflow.start_run(
        run_id=run_id, experiment_id=experiment_id, run_name=None if resumed else run_name,
        tags=_anonymous_context_tags(), nested=parent_run_id is not None,
        parent_run_id=None if resumed else parent_run_id,
    ) as run:
        mlflow.set_tags(dict(tags))
        if not resumed:
            mlflow.log_params({k: _param_str(v) for k, v in params.items()})
        yield run.info.run_id


def run_exists(run_id: str, *, uri: str | None = None) -> bool:
    """True when ``run_id`` exists (and is not deleted) in the store at ``uri``."""
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _is_missing(exc):
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def log_epoch(metrics: Mapping[str, float], epoch: int) -> None:
    """Log one epoch's metrics to the active run with ``step=epoch``."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)


def log_tags(tags: Mapping[str, str]) -> None:
    """Set tags on the active run (e.g. which fast path ran)."""
    mlflow.set_tags(dict(tags))


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model, given explicitly so MLflow never infers them (offline)."""
    import numpy
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}", f"mlflow=={mlflow.__version__}"]


def log_model(model: Any, input_example: Any, *, name: str = "model") -> str:
    """Log a torch model to the active run with its signature, inferred from ``input_example``.

    Args:
        model: a ``torch.nn.Module`` on CPU, in eval mode (the signature comes from running it on the example).
        input_example: a numpy array batch, e.g. ``float32 (1, 1, S, S)``.
        name: the logged model's name (MLflow 3 ``name=``, formerly ``artifact_path``).

    Returns:
        The model URI (``models:/<model_id>``).
    """
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(input_example))
    signature = infer_signature(input_example, output.detach().cpu().numpy())
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements(),
        tags=_anonymous_context_tags(),
        # Pickle (the spinedxa model classes are importable wherever the model is loaded): torch.export ("pt2",
        # MLflow 3's default outside Databricks) traces the graph, takes long on CPU and fixes the batch shape.
        serialization_format="pickle",
    )
    return info.model_uri


def log_dataset(name: str, digest: str, source: str, *, context: str = "training") -> None:
    """Log a dataset input to the active run.

    Args:
        name: dataset name, e.g. ``splits.csv``.
        digest: its DVC hash (md5, or md5 + ``.dir`` for a directory), so the run points at exact data versions.
        source: repo-relative path (never an absolute path, which could name a person).
        context: MLflow's ``mlflow.data.context`` input tag.

    Raises:
        ValueError: ``source`` is an absolute path.
    """
    if Path(source).is_absolute():
        raise ValueError(f"dataset source {source!r} must be a repo-relative path (absolute paths may name a person)")
    dataset = Dataset(name=name, digest=digest, source_type="dvc", source=json.dumps({"uri": source}))
    run_id = mlflow.active_run().info.run_id
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def log_metrics_to_run(
    run_id: str, metrics: Mapping[str, float], *, artifacts: Iterable[str | Path] = (), uri: str | None = None
) -> None:
    """Add metrics (and artifact files) to an existing run, e.g. test metrics to a model's training run.

    Raises:
        RunNotFoundError: ``run_id`` is not in the store (message names the run id and the store URI).
        FileNotFoundError: an artifact path does not exist.
    """
    uri = uri or tracking_uri()
    if not run_exists(run_id, uri=uri):
        raise RunNotFoundError(f"MLflow run {run_id!r} does not exist in tracking store {redact_uri(uri)!r}")
    files = [Path(a) for a in artifacts]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: artifact to log to MLflow run {run_id!r} does not exist")
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path))


def find_runs(experiment: str, *, uri: str | None = None) -> list[dict[str, Any]]:
    """Return every run of ``experiment`` as plain dicts (for tests and audits); [] when it does not exist.

    Each dict has ``run_id``, ``run_name``, ``parent_run_id`` (None for a top-level run), ``status``, ``params``, ``metrics`` (latest values), ``history``
    (``{metric: [(step, value), ...]}``), ``tags`` (without MLflow's internal ``mlflow.*`` tags), ``datasets``
    (``[{name, digest, source, context}]``) and ``models`` (names of the models logged by the run).
    """
    client = MlflowClient(tracking_uri=uri or tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    out = []
    for run in runs:
        history = {}
        for key in run.data.metrics:
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            history[key] = [(m.step, m.value) for m in points]
        datasets = [
            {
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "source": d.dataset.source,
                "context": next((t.value for t in d.tags if t.key == "mlflow.data.context"), None),
            }
            for d in (run.inputs.dataset_inputs if run.inputs else [])
        ]
        out.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
                "status": run.info.status,
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "history": history,
                "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                "datasets": datasets,
                "models": [m.name for m in models if m.source_run_id == run.info.run_id],
            }
        )
    return out


def flatten_metrics(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numeric leaves of a JSON value into ``out`` under dotted keys (``split.folds.0.test.total``; list items by
    index), as MLflow metric names allow (letters, digits, ``._-/``); booleans as 0/1, nulls and NaN left out."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(key))
            flatten_metrics(f"{prefix}.{safe}", item, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten_metrics(f"{prefix}.{i}", item, out)
    elif isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, (int, float)) and math.isfinite(value):
        out[prefix] = float(value)
