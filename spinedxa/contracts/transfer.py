"""The transfer stage's files (docs/CONTRACTS.md): ``reports/transfer.json`` and ``reports/transfer/``.

- ``reports/transfer.json`` (a DVC metric; numbers and booleans only, written at the metrics' precision): ``enabled``;
  with it on, ``models.<model>.<condition>`` for ``scratch`` and each source of ``transfer.sources``: ``available``,
  the ROC-AUC (macro for the ordinal task) per cohort (``full_roc_auc``, ``small_roc_auc`` pooled over the draws,
  ``small_draw_roc_auc`` per draw, ``external_roc_auc``), and for a source ``delta.<cohort>`` (source minus scratch on
  the same scans, paired patient bootstrap: ``roc_auc``, ``ci_low``, ``ci_high``, ``se``, ``p_value``,
  ``ci_skipped``, ``n_scans``, ``n_patients``) with ``delta.small_draws`` per draw; ``small`` (``size``, ``draws``,
  ``n_scans``, ``n_patients`` per draw), ``pretrain.<model>`` (what the pretraining cost: ``wall_seconds``,
  ``cpu_seconds``, ``pool_scans``, ``epochs``, ``val_r``, ``val_auc_osteoporosis``), ``bootstrap_resamples``,
  ``bootstrap_seed``, ``trainings``, ``wall_seconds`` (the stage's).
- ``reports/transfer/details.json``: the words the numbers need (:data:`DETAIL_KEYS`): the CPU, each condition's
  recipe, weights file and sha256, why a source is not available, which predictions were reused.
- ``reports/transfer/<model>/<condition>_<cohort>.csv`` (predictions contract) for ``full``, ``small<d>``, ``external``,
  and ``reports/transfer/small<d>_splits.csv`` (splits contract): each small draw's folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinedxa.contracts import jsonfile

#: The metrics file's name in ``reports/`` (dvc.yaml passes the path).
FILE_NAME = "transfer.json"
#: Its keys with the stage enabled (disabled: ``enabled`` only).
KEYS = ("enabled", "models", "small", "pretrain", "bootstrap_resamples", "bootstrap_seed", "trainings",
        "wall_seconds")
#: The details file in ``reports/transfer/`` and its keys.
DETAILS = "details.json"
DETAIL_KEYS = ("enabled", "cpu", "conditions", "pretraining_saw")
#: The cohorts of the comparison: each fold's held-out part of the whole cohort, of each small draw, the external one.
COHORTS = ("full", "small", "external")
#: The condition every source is compared with.
SCRATCH = "scratch"


def predictions_name(model: str, condition: str, cohort: str) -> str:
    """``<model>/<condition>_<cohort>.csv`` inside ``reports/transfer/`` (``cohort``: full, small<d>, external)."""
    return f"{model}/{condition}_{cohort}.csv"


def splits_name(draw: int) -> str:
    """``small<d>_splits.csv`` inside ``reports/transfer/``: the folds of small draw ``d``."""
    return f"small{draw}_splits.csv"


def read(path: str | Path) -> dict[str, Any]:
    """``reports/transfer.json``.

    Raises:
        FileNotFoundError: no such file.
        jsonfile.RecordError: not a JSON object, or (enabled) lacking a key of :data:`KEYS`.
    """
    record = jsonfile.read(path, ("enabled",))
    return jsonfile.read(path, KEYS) if record["enabled"] else record


def read_details(directory: str | Path) -> dict[str, Any]:
    """``reports/transfer/details.json``.

    Raises:
        FileNotFoundError, jsonfile.RecordError: see :func:`read`.
    """
    record = jsonfile.read(Path(directory) / DETAILS, ("enabled",))
    return jsonfile.read(Path(directory) / DETAILS, DETAIL_KEYS) if record["enabled"] else record
