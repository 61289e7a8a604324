"""``data/external``: the external cohort the ``external`` stage writes (:mod:`spinedxa.external`), as the stages that
score it (``evaluate``, ``baseline``) read it.

An ingested cohort is ``data/external/manifest.csv`` (:mod:`~spinedxa.contracts.manifest`) beside its images; a
disabled one (``external.enabled: false``) is the :data:`DISABLED` marker alone. Reading it here, in a leaf module,
keeps the ingest, OCR and validation code out of the scoring stages' import closure (and their ``dvc.yaml`` deps).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinedxa.contracts import manifest as manifest_contract

#: Marker file of a disabled external cohort, inside data/external.
DISABLED = "DISABLED.json"


def is_enabled(external_dir: str | Path) -> bool:
    """Whether ``data/external`` holds an ingested external cohort (not the disabled marker)."""
    external_dir = Path(external_dir)
    return not (external_dir / DISABLED).is_file() and (external_dir / manifest_contract.FILE_NAME).is_file()


def accepted_scans(external_dir: str | Path) -> pd.DataFrame:
    """The accepted rows of the external manifest (source, sha256, patient_id, label, roi), sorted by source.

    Raises:
        FileNotFoundError: the external stage has not run.
    """
    frame = manifest_contract.read(Path(external_dir) / manifest_contract.FILE_NAME)
    return frame[frame["status"] == "accepted"].sort_values("source", kind="stable").reset_index(drop=True)
