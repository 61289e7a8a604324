"""Smoke test of the data half of the DAG (synthesize → ingest → validate → split) under real `dvc repro`."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml

from conftest import run

STAGE_RAN = re.compile(r"Running stage '([^']+)'")


def repro(repo: Path, *targets: str) -> set[str]:
    proc = run(["dvc", "repro", *targets], repo)
    return set(STAGE_RAN.findall(proc.stdout + proc.stderr))


def test_data_half_repro_is_idempotent_and_split_seed_reruns_only_split(tiny_repo):
    assert repro(tiny_repo, "split") == {"synthesize", "ingest", "validate", "split"}
    splits = pd.read_csv(tiny_repo / "data/split/splits.csv")
    assert splits.groupby(["fold", "patient_id"])["split"].nunique().max() == 1  # one role per patient and fold
    assert set(splits["split"]) == {"train", "val", "test"}
    assert splits.loc[splits["split"] == "test", "source"].is_unique  # every scan scored by one fold
    # Outputs are DVC-tracked, not git-tracked.
    ignored = run(["git", "check-ignore", "data/ingested", "data/split/splits.csv"], tiny_repo).stdout.split()
    assert ignored == ["data/ingested", "data/split/splits.csv"]

    assert repro(tiny_repo, "split") == set()

    # A file edited inside data/ingested: DVC sees a changed output of ingest and runs it again (or restores it from
    # its run cache), which puts the file back. The stages downstream declare data/ingested/SHA256SUMS, not the
    # directory: it is unchanged, so none of them runs.
    stages = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["stages"]
    assert "data/ingested/SHA256SUMS" in stages["validate"]["deps"]
    roi = sorted((tiny_repo / "data/ingested/roi").glob("*.png"))[0]
    original = roi.read_bytes()
    roi.write_bytes(original + b"\0")
    assert "changed outs" in run(["dvc", "status", "ingest"], tiny_repo).stdout
    assert repro(tiny_repo, "split") <= {"ingest"}
    assert roi.read_bytes() == original
    assert repro(tiny_repo, "split") == set()

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["split"]["seed"] += 1
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert repro(tiny_repo, "split") == {"split"}
