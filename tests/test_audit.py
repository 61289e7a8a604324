"""spinedxa.audit: the lineage audit (every hash from a metric back to the raw files, every fold's model) and the
leakage audit (per fold; k-fold coverage; another split file such as the replay ablation's leaky one).

The lineage tests build, in a temporary git + DVC repository, the files the pipeline writes for one model trained on
two folds (raw files, ingest manifest, long-format splits, ``models/cnn21/{meta.json, fold0/, fold1/}``, metrics)
and for the baseline, with the real params.yaml, record them in dvc.lock with `dvc commit`, and then tamper with one
link at a time. The leakage tests use hand-written tables. An end-to-end test on the real pipeline (tiny profile) is
marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, VENV_BIN, make_repo_copy, run
from PIL import Image

from spinedxa import audit, dag, weights
from spinedxa.cli import main
from spinedxa.config import ValidateConfig, load_params
from spinedxa.files import sha256_file
from spinedxa.models.cnn21 import CNN21

DVC = str(VENV_BIN / "dvc")
MODEL = "cnn21"
METRICS = f"reports/metrics/{MODEL}.json"
PROVENANCE = f"reports/provenance/{MODEL}.json"
BASELINE = "reports/metrics/baseline.json"
BASELINE_PROVENANCE = "reports/provenance/baseline.json"
RAW = "data/raw/synthetic"
DIGESTED = ("data/split/splits.csv", "data/ingested")
LINEAGE_DVC = {
    "stages": {
        "ingest": {"cmd": "echo ingest", "deps": [RAW], "params": ["data.source", "ingest"], "outs": ["data/ingested"]},
        "split": {"cmd": "echo split", "deps": ["data/ingested/manifest.csv"], "params": ["split"],
                  "outs": ["data/split/splits.csv"]},
        "train": {"matrix": {"model": [MODEL]}, "cmd": "echo train ${item.model}",
                  "deps": list(DIGESTED), "params": ["train.${item.model}"], "outs": ["models/${item.model}"]},
        "evaluate": {"matrix": {"model": [MODEL]}, "cmd": "echo evaluate ${item.model}",
                     "deps": ["models/${item.model}", "data/split/splits.csv"],
                     "outs": [{"reports/provenance/${item.model}.json": {"cache": False}}],
                     "metrics": [{"reports/metrics/${item.model}.json": {"cache": False}}]},
        "baseline": {"cmd": "echo baseline", "deps": ["data/split/splits.csv", "data/ingested"],
                     "outs": [{BASELINE_PROVENANCE: {"cache": False}}],
                     "metrics": [{BASELINE: {"cache": False}}]},
    }
}
# Roles of the four patients in the two folds: every scan is test in exactly one fold.
ROLES = {0: ("test", "test", "train", "val"), 1: ("train", "val", "test", "test")}


def _write_fold_meta(root: Path, fold: int, **changes: object) -> None:
    path = root / "models" / MODEL / f"fold{fold}" / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _write_lineage_files(root: Path) -> None:
    """Eight raw PNGs (four patients), their manifest, a two-fold split, two fold models with their meta.json and
    the parent meta.json, the metrics file, and the baseline's metrics."""
    trained_with = dataclasses.asdict(load_params(root / "params.yaml").train.model(MODEL))  # as train writes it
    rng = np.random.default_rng(0)
    rows, split_rows = [], []
    for i in range(8):
        label, patient_index = ("normal", "osteoporosis")[i % 2], i // 2
        source = f"{label}/scan_{i:04d}.png"
        (root / RAW / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16)).save(root / RAW / source)
        sha = sha256_file(root / RAW / source)
        image, roi = f"images/{sha[:16]}.png", f"roi/{sha[:16]}.png"
        for folder in ("images", "roi"):
            (root / "data/ingested" / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / RAW / source, root / "data/ingested" / folder / f"{sha[:16]}.png")
        patient = f"P{hashlib.sha256(str(patient_index).encode()).hexdigest()[:12]}"
        rows.append({"source": source, "sha256": sha, "status": "accepted", "reason": "", "label": label,
                     "patient_id": patient, "image": image, "roi": roi, "phash": f"{rng.integers(0, 2**63):016x}"})
        for fold, roles in ROLES.items():
            split_rows.append({"source": source, "sha256": sha, "patient_id": patient, "label": label,
                               "image": image, "roi": roi, "fold": fold, "split": roles[patient_index]})
    pd.DataFrame(rows).to_csv(root / "data/ingested/manifest.csv", index=False)
    (root / "data/split").mkdir(parents=True)
    pd.DataFrame(split_rows).sort_values(["fold", "source"]).to_csv(root / "data/split/splits.csv", index=False)

    model_dir = root / "models" / MODEL
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    digests = {p: dag.dvc_hash(root / p, root) for p in DIGESTED}
    prov = {"git_commit": commit, "git_dirty": False}
    shas = {}
    for fold in ROLES:
        fold_dir = model_dir / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        (fold_dir / "model.pt").write_bytes(f"weights of fold {fold}".encode())
        shas[str(fold)] = sha256_file(fold_dir / "model.pt")
        meta = {"model": MODEL, "fold": fold, "image_size": 64, "classes": ["normal", "osteoporosis"],
                "mlflow_run_id": f"run-fold{fold}", "mlflow_tracking_uri": "sqlite:///mlflow.db",
                "model_sha256": shas[str(fold)], "data_digests": digests, "params": trained_with, **prov}
        (fold_dir / "meta.json").write_text(json.dumps(meta))
    (model_dir / "meta.json").write_text(json.dumps({
        "model": MODEL, "variant": MODEL, "protocol": "kfold", "folds": list(ROLES), "mlflow_run_id": "parent-run",
        "mlflow_tracking_uri": "sqlite:///mlflow.db", "data_digests": digests, **prov}))
    (root / "reports/metrics").mkdir(parents=True)
    (root / "reports/provenance").mkdir(parents=True)
    (root / METRICS).write_text(json.dumps({"accuracy": 0.75, "f1": 0.8, "n_test": 8, "protocol": "kfold",
                                            "folds": 2}))
    (root / PROVENANCE).write_text(json.dumps({"model": MODEL, "mlflow_run_id": "parent-run", "model_sha256": shas}))
    (root / BASELINE).write_text(json.dumps({"accuracy": 0.5, "n_test": 8}))
    (root / BASELINE_PROVENANCE).write_text(json.dumps({"model": "baseline", "mlflow_run_id": None,
                                                        "model_sha256": None}))


@pytest.fixture(scope="module")
def lineage_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lineage") / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump(LINEAGE_DVC, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], root)
    run([DVC, "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "pipeline"], root)
    _write_lineage_files(root)
    run([DVC, "commit", "--force", "-q"], root)
    return root


@pytest.fixture
def lineage_repo(lineage_base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(lineage_base, tmp_path / "repo", symlinks=True))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_csv(path: Path, row: int, column: str, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


def _edit_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["train"][MODEL]["lr"] = 0.5
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_untouched_lineage_verifies_every_fold(lineage_repo: Path) -> None:
    lineage = audit.audit_lineage(METRICS, lineage_repo)
    assert lineage.ok, audit.format_lineage(lineage)
    assert (lineage.stage, lineage.model, lineage.mlflow_run_id) == (f"evaluate@{MODEL}", MODEL, "parent-run")
    assert (lineage.split_file, lineage.manifest) == ("data/split/splits.csv", "data/ingested/manifest.csv")
    assert [(f.fold, f.model_file, f.mlflow_run_id) for f in lineage.folds] == [
        (0, f"models/{MODEL}/fold0/model.pt", "run-fold0"), (1, f"models/{MODEL}/fold1/model.pt", "run-fold1")]
    assert len(lineage.raw_files) == 8 and all(set(f["roles"]) == {"0", "1"} for f in lineage.raw_files)
    assert lineage.split_roles == {"0": {"train": 2, "val": 2, "test": 4}, "1": {"train": 2, "val": 2, "test": 4}}
    assert lineage.metrics == {"accuracy": 0.75, "f1": 0.8, "n_test": 8}
    items = {c.item for c in lineage.checks}
    assert {"model sha256 (fold 0: meta.json vs file)", "model sha256 (fold 1: provenance vs file)",
            "git commit (meta.json vs git)", "output of ingest (dvc.lock)"} <= items
    text = audit.format_lineage(lineage)
    assert "clean tree: the commit reproduces this result" in text
    assert f"  fold 1    models/{MODEL}/fold1/model.pt" in text


# (what is tampered with, how, the check that must fail, the file it must name)
TAMPERING = [
    ("raw file", lambda r: (r / RAW / "normal/scan_0000.png").write_bytes(b"not the scan"),
     "raw file sha256 (manifest vs file)", f"{RAW}/normal/scan_0000.png"),
    ("fold 1 model file", lambda r: (r / "models" / MODEL / "fold1/model.pt").write_bytes(b"other weights"),
     "model sha256 (fold 1: meta.json vs file)", f"models/{MODEL}/fold1/model.pt"),
    ("fold 0 sha in provenance", lambda r: _edit_json(r / PROVENANCE, model_sha256={
        **json.loads((r / PROVENANCE).read_text())["model_sha256"], "0": "0" * 64}),
     "model sha256 (fold 0: provenance vs file)", f"models/{MODEL}/fold0/model.pt"),
    ("metrics file", lambda r: _edit_json(r / METRICS, accuracy=0.99),
     f"output of evaluate@{MODEL} (dvc.lock)", METRICS),
    ("split file", lambda r: _edit_csv(r / "data/split/splits.csv", 5, "split", "train"),
     "output of split (dvc.lock)", "data/split/splits.csv"),
    ("manifest", lambda r: _edit_csv(r / "data/ingested/manifest.csv", 1, "sha256", "0" * 64),
     "raw file sha256 (splits vs manifest)", f"{RAW}/osteoporosis/scan_0001.png"),
    ("run id", lambda r: _edit_json(r / PROVENANCE, mlflow_run_id="ffff"),
     "MLflow run id (provenance vs meta.json)", PROVENANCE),
    ("params", lambda r: _edit_params(r / "params.yaml"),
     f"param train.{MODEL} of train@{MODEL} (dvc.lock)", "params.yaml"),
    ("fold params", lambda r: _write_fold_meta(r, 0, params={"lr": 9.0}),
     f"params train.{MODEL} (fold 0: meta.json vs dvc.lock)", f"models/{MODEL}/fold0/meta.json"),
    ("fold data digest", lambda r: _write_fold_meta(r, 1, data_digests={"data/split/splits.csv": "0" * 32}),
     "training data digest (fold 1: meta.json vs dvc.lock)", "data/split/splits.csv"),
    ("fold commit", lambda r: _write_fold_meta(r, 1, git_commit="f" * 40),
     f"git commit (fold 1 vs models/{MODEL}/meta.json)", f"models/{MODEL}/fold1/meta.json"),
]


@pytest.mark.parametrize(("what", "tamper", "item", "path"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_audit_catches_tampering(lineage_repo: Path, what: str, tamper, item: str, path: str, capsys) -> None:
    tamper(lineage_repo)
    code = main(["audit", METRICS, "--root", str(lineage_repo)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"MISMATCH    {path}: {item}" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED")


def test_audit_json_lists_the_failed_checks(lineage_repo: Path, capsys) -> None:
    (lineage_repo / RAW / "normal/scan_0002.png").write_bytes(b"x")
    assert main(["audit", METRICS, "--root", str(lineage_repo), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["lineage"]["ok"] is False
    failed = {(c["item"], c["path"]) for c in report["lineage"]["checks"] if not c["ok"]}
    assert ("raw file sha256 (manifest vs file)", f"{RAW}/normal/scan_0002.png") in failed
    assert all(c["ok"] for c in report["lineage"]["checks"] if "raw file" not in c["item"] and RAW not in c["path"])
    assert [f["fold"] for f in report["lineage"]["folds"]] == [0, 1]


@pytest.mark.parametrize(("dirty", "says"), [
    (True, "the commit alone does not reproduce this result"),
    (None, "whether the tree was dirty was not recorded"),
])
def test_provenance_of_a_dirty_or_unknown_tree_is_reported(lineage_repo: Path, dirty: bool | None, says: str) -> None:
    """A dirty tree is not a hash mismatch: the audit passes, and says plainly what the commit is worth."""
    for fold in ROLES:
        _write_fold_meta(lineage_repo, fold, git_dirty=dirty)
    _edit_json(lineage_repo / "models" / MODEL / "meta.json", git_dirty=dirty)
    run([DVC, "commit", "--force", "-q"], lineage_repo)
    lineage = audit.audit_lineage(METRICS, lineage_repo)
    assert lineage.ok, audit.format_lineage(lineage)
    assert lineage.git_dirty is dirty
    assert says in lineage.provenance and f"provenance  {lineage.provenance}" in audit.format_lineage(lineage)


def test_baseline_lineage_has_no_model_files(lineage_repo: Path) -> None:
    lineage = audit.audit_lineage(BASELINE, lineage_repo)
    assert lineage.ok, audit.format_lineage(lineage)
    assert (lineage.model, lineage.model_dir, lineage.folds, lineage.stage) == ("baseline", None, [], "baseline")
    assert len(lineage.raw_files) == 8
    text = audit.format_lineage(lineage)
    assert "model       none: baseline has no model files" in text and "not recorded by baseline" in text
    (lineage_repo / RAW / "normal/scan_0000.png").write_bytes(b"x")
    assert not audit.audit_lineage(BASELINE, lineage_repo).ok


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "not an output of any stage"),  # the metrics argument below is not a pipeline output
        (lambda r: (r / "models" / MODEL / "meta.json").unlink(), "meta.json: not found"),
        (lambda r: (r / "models" / MODEL / "meta.json").write_text("{"), "meta.json: not valid JSON"),
        (lambda r: _edit_json(r / "models" / MODEL / "meta.json", data_digests=[]), "data_digests must be an object"),
        (lambda r: _edit_json(r / "models" / MODEL / "meta.json", folds=[0, 1, 2]), r"lists folds \[0, 1, 2\]"),
        (lambda r: _edit_json(r / PROVENANCE, model_sha256="0" * 64),
         "provenance/cnn21.json: model_sha256 must be an object fold -> sha256"),
        (lambda r: (r / "models" / MODEL / "fold0/meta.json").write_text(json.dumps({"model": MODEL, "fold": 0})),
         r"fold0/meta.json: missing key\(s\)"),
        (lambda r: (r / "data/split/splits.csv").write_text("source,split\na,train\n"), "missing column"),
    ],
)
def test_audit_errors_name_the_file(lineage_repo: Path, setup, message: str, capsys) -> None:
    setup(lineage_repo)
    target = "params.yaml" if "any stage" in message else METRICS
    assert main(["audit", target, "--root", str(lineage_repo)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_provenance_file_missing_keys_is_an_error(lineage_repo: Path) -> None:
    (lineage_repo / PROVENANCE).write_text(json.dumps({"model": MODEL}))
    with pytest.raises(audit.AuditError,
                       match=r"provenance/cnn21.json: missing key\(s\) \['mlflow_run_id', 'model_sha256'\]"):
        audit.audit_lineage(METRICS, lineage_repo)


def _start_from_weights(root: Path) -> weights.WeightsSource:
    """An imported cnn21 state dict in ``weights/cnn21/`` (with its record), named in each fold's meta.json as the
    train stage names it, then recorded in dvc.lock again."""
    src = root.parent / "lab.pt"
    torch.save(CNN21().state_dict(), src)
    source = weights.import_file(MODEL, src, root=root, origin="https://example.org/lab", track=False)
    for fold in ROLES:
        _write_fold_meta(root, fold, weights=source.record())
    run([DVC, "commit", "--force", "-q"], root)
    return source


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", [None, "file", "record"])
def test_audit_names_and_verifies_the_weights_each_fold_started_from(lineage_repo: Path, tamper: str | None,
                                                                     capsys) -> None:
    source = _start_from_weights(lineage_repo)
    if tamper == "file":
        _flip_a_byte(lineage_repo / source.path)
    elif tamper == "record":
        _edit_json(weights.record_path(lineage_repo / source.path), sha256="0" * 64)
    code = main(["audit", METRICS, "--root", str(lineage_repo)])
    out = capsys.readouterr().out
    assert (f"weights     imported {source.path} sha256 {source.sha256} (from https://example.org/lab): every fold "
            "started from it") in out
    if tamper is None:
        assert code == 0, out
        return
    assert code == 1, out
    what = "file" if tamper == "file" else "record"
    shown = source.path if tamper == "file" else f"{source.path}.json"
    assert f"MISMATCH    {shown}: pre-trained weights sha256 (fold 0: meta.json vs {what})" in out


def test_audit_of_models_trained_from_scratch_says_so(lineage_repo: Path) -> None:
    for fold in ROLES:
        _write_fold_meta(lineage_repo, fold, weights={"kind": "none", "variant": MODEL, "path": None, "sha256": None,
                                                      "url": None})
    run([DVC, "commit", "--force", "-q"], lineage_repo)
    lineage = audit.audit_lineage(METRICS, lineage_repo)
    assert lineage.ok and "weights     none (random initialisation)\n" in audit.format_lineage(lineage)


# ---------------------------------------------------------------------------------------------------- leakage

PHASH = {  # 64-bit hashes: A and B differ in 40 bits; A3/A4/A5 differ from A in 3/4/5 bits
    "A": 0x0F0F0F0F0F0F0F0F, "B": 0xF0F0F0F0F0F0F0FF, "C": 0x00FF00FF00FF00FF, "D": 0x3333333333333333,
    "E": 0x5555555555555555, "F": 0x6666666666666666, "G": 0x7E7E7E7E00000000,
    "A3": 0x0F0F0F0F0F0F0F0F ^ 0b111, "A4": 0x0F0F0F0F0F0F0F0F ^ 0b1111, "A5": 0x0F0F0F0F0F0F0F0F ^ 0b11111,
}
# Seven scans of six patients (P1 has two) in three folds; every scan is test in exactly one fold, and each fold
# has train, val and test patients.
SCANS = [("a.dcm", "s1", "P1", "A"), ("b.dcm", "s2", "P1", "B"), ("c.dcm", "s3", "P2", "C"),
         ("d.dcm", "s4", "P3", "D"), ("e.dcm", "s5", "P4", "E"), ("f.dcm", "s6", "P5", "F"),
         ("g.dcm", "s7", "P6", "G")]
FOLD_ROLES = {  # patient -> role in folds 0, 1, 2
    "P1": ("test", "train", "val"), "P2": ("val", "test", "train"), "P3": ("train", "test", "train"),
    "P4": ("train", "val", "test"), "P5": ("train", "train", "test"), "P6": ("train", "train", "test"),
}
CLEAN = [(src, sha, patient, fold, FOLD_ROLES[patient][fold], ph) for fold in range(3)
         for src, sha, patient, ph in SCANS]
CLEAN_AUG = [("images/s1_aug1.png", "a.dcm", "s1", "P1"), ("images/s4_aug1.png", "d.dcm", "s4", "P3")]


def _leak_tables(tmp_path: Path, splits: list[tuple], augmented: list[tuple] = (),
                 manifest_rows: list[tuple] | None = None) -> tuple[Path, Path, Path]:
    """Write splits.csv/manifest.csv/index.csv from ``(source, sha, patient, fold, role, phash key)`` split rows,
    ``(image, parent source, parent sha, patient)`` augmented rows, and the manifest from SCANS (or
    ``manifest_rows``)."""
    split_rows = [{"source": src, "sha256": sha, "patient_id": patient, "label": "normal",
                   "image": f"images/{sha}.png", "roi": f"roi/{sha}.png", "fold": fold, "split": role}
                  for src, sha, patient, fold, role, _ in splits]
    man = {}
    for src, sha, patient, _, _, ph in splits:
        if "#" not in src:
            man.setdefault(src, (src, sha, patient, ph))
    man_rows = [{"source": src, "sha256": sha, "status": "accepted", "patient_id": patient,
                 "image": f"images/{sha}.png", "phash": f"{PHASH[ph]:016x}"}
                for src, sha, patient, ph in (manifest_rows or man.values())]
    aug_rows = [{"image": img, "parent_source": src, "parent_sha256": sha, "parent_image": f"roi/{sha}.png",
                 "patient_id": patient, "label": "normal", "k": 1} for img, src, sha, patient in augmented]
    paths = tmp_path / "splits.csv", tmp_path / "manifest.csv", tmp_path / "index.csv"
    pd.DataFrame(split_rows).to_csv(paths[0], index=False)
    pd.DataFrame(man_rows).to_csv(paths[1], index=False)
    pd.DataFrame(aug_rows, columns=["image", "parent_source", "parent_sha256", "parent_image", "patient_id",
                                    "label", "k"]).to_csv(paths[2], index=False)
    return paths


def _replace(rows: list[tuple], where: dict, **fields: object) -> list[tuple]:
    """``rows`` with ``fields`` changed in every row matching ``where`` (keys: source, sha, patient, fold, role)."""
    names = ("source", "sha", "patient", "fold", "role", "ph")
    out = []
    for row in rows:
        values = dict(zip(names, row))
        if all(values[k] == v for k, v in where.items()):
            values.update(fields)
        out.append(tuple(values[n] for n in names))
    return out


LEAKS = [
    # b (P1) becomes train in fold 0, where a (P1) is test; b is then test in no fold
    ("patient", _replace(CLEAN, {"source": "b.dcm", "fold": 0}, role="train"), CLEAN_AUG,
     {"patients": 1, "coverage": 1}),
    # e carries a's raw file: the same sha256 in two roles of every fold, and a's copy is trained on beside a test
    # (fold 0) or val (fold 1) use of that file
    ("file", _replace(CLEAN, {"source": "e.dcm"}, sha="s1"), CLEAN_AUG, {"files": 3, "augmented": 2}),
    ("near-duplicate at threshold", _replace(CLEAN, {"source": "e.dcm"}, ph="A4"), CLEAN_AUG, {"near_duplicates": 3}),
    ("near-duplicate below threshold", _replace(CLEAN, {"source": "e.dcm"}, ph="A3"), CLEAN_AUG,
     {"near_duplicates": 3}),
    ("augmented copy with a test patient", CLEAN, [*CLEAN_AUG, ("images/s1_aug2.png", "a.dcm", "s1", "P2")],
     {"augmented": 1}),
    ("augmented from unknown", CLEAN, [("images/zz_aug1.png", "z.dcm", "zz", "P9")], {"augmented": 1}),
    ("test in two folds", _replace(CLEAN, {"source": "c.dcm", "fold": 0}, role="test"), CLEAN_AUG, {"coverage": 1}),
    ("missing from a fold", [r for r in CLEAN if not (r[0] == "g.dcm" and r[3] == 2)], CLEAN_AUG, {"coverage": 1}),
]


@pytest.fixture(scope="module")
def validate_cfg(repo_root: Path) -> ValidateConfig:
    """params.yaml's validate block with pHash threshold 4 and SSIM confirmation at 0.9."""
    cfg = load_params(repo_root / "params.yaml").validate
    return dataclasses.replace(cfg, phash_max_distance=4, near_duplicate_min_ssim=0.9)


def _counts(report: audit.Leakage) -> dict[str, int]:
    counts = {k: len(getattr(report, k)) for k in ("patients", "files", "near_duplicates", "augmented", "coverage")}
    return {k: v for k, v in counts.items() if v}


def test_clean_kfold_splits_have_no_leakage(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    report = audit.audit_leakage(*_leak_tables(tmp_path, CLEAN, CLEAN_AUG), validate_cfg)
    assert report.ok, audit.format_leakage(report)
    assert (report.n_rows, report.n_scans, report.n_patients, report.n_folds) == (21, 7, 6, 3)
    # a's copy is used in fold 1 (a is train there), d's in folds 0 and 2; none is unused
    assert (report.n_augmented, report.n_augmented_unused, report.copies) == (2, 0, [])
    assert report.roles["0"] == {"train": 4, "val": 1, "test": 2}
    assert audit.format_leakage(report).rstrip().endswith("OK: no leakage between the roles of any fold")


@pytest.mark.parametrize("min_ssim", [0.0, 0.9])  # 0.9: no images to compare, so candidates cannot be cleared
@pytest.mark.parametrize(("case", "rows", "aug", "found"), LEAKS, ids=[c[0] for c in LEAKS])
def test_leakage_is_found(tmp_path: Path, validate_cfg: ValidateConfig, min_ssim: float, case: str, rows: list,
                          aug: list, found: dict[str, int]) -> None:
    cfg = dataclasses.replace(validate_cfg, near_duplicate_min_ssim=min_ssim)
    report = audit.audit_leakage(*_leak_tables(tmp_path, rows, aug), cfg)
    assert not report.ok
    assert _counts(report) == found
    assert "FAILED" in audit.format_leakage(report)


def test_near_duplicate_just_above_threshold_is_not_a_leak(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    rows = _replace(CLEAN, {"source": "e.dcm"}, ph="A5")
    assert audit.audit_leakage(*_leak_tables(tmp_path, rows, CLEAN_AUG), validate_cfg).ok


def test_leakage_report_names_the_offenders_and_their_fold(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    rows = _replace(CLEAN, {"source": "e.dcm"}, ph="A3")
    report = audit.audit_leakage(*_leak_tables(tmp_path, rows, CLEAN_AUG), validate_cfg)
    assert report.near_duplicates[0] == {"fold": 0, "sources": ["a.dcm", "e.dcm"], "roles": ["test", "train"],
                                         "patients": ["P1", "P4"], "distance": 3, "ssim": None}
    assert [d["fold"] for d in report.near_duplicates] == [0, 1, 2]
    assert "LEAK fold 0: near-duplicate (distance 3, images missing): a.dcm (test) ~ e.dcm (train)" in \
        audit.format_leakage(report)


def test_augmented_copies_of_never_trained_scans_are_unused_not_leaks(tmp_path: Path,
                                                                       validate_cfg: ValidateConfig) -> None:
    """Holdout (one fold): a copy of a test scan is used by no fold's training, so it is counted, not flagged."""
    rows = [r for r in CLEAN if r[3] == 0]
    report = audit.audit_leakage(*_leak_tables(tmp_path, rows, CLEAN_AUG), validate_cfg)
    assert report.ok, audit.format_leakage(report)
    assert (report.n_folds, report.n_augmented_unused, report.coverage) == (1, 1, [])


@pytest.mark.parametrize(("copy", "leak"), [(True, True), (False, False)])
def test_ssim_confirms_or_clears_a_phash_candidate(tmp_path: Path, validate_cfg: ValidateConfig, copy: bool,
                                                   leak: bool) -> None:
    """e.dcm has a pHash 3 bits from a.dcm (other roles in every fold): a noisy copy of a.dcm is a leak, another
    image is not."""
    splits, manifest, index = _leak_tables(tmp_path, _replace(CLEAN, {"source": "e.dcm"}, ph="A3"), CLEAN_AUG)
    rng = np.random.default_rng(1)
    scan = rng.uniform(0, 1, (64, 48))
    other = scan + rng.normal(0, 0.01, scan.shape) if copy else rng.uniform(0, 1, (64, 48))
    (tmp_path / "images").mkdir()
    for sha, img in (("s1", scan), ("s5", other)):
        Image.fromarray(np.rint(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(tmp_path / f"images/{sha}.png")
    report = audit.audit_leakage(splits, manifest, index, validate_cfg)
    assert bool(report.near_duplicates) == leak
    if leak:
        assert all(d["ssim"] >= 0.9 for d in report.near_duplicates)


def _replay_split() -> list[tuple]:
    """The replay ablation's leaky split (splits contract): augmented copies ``<parent>#copy<k>`` carrying their
    parent's sha256 and patient, one fold, copies of a, c and e on both sides, copies of d in train only."""
    rows = []
    for src, sha, patient, ph in SCANS:
        if src in ("a.dcm", "c.dcm", "e.dcm"):
            rows += [(f"{src}#copy1", sha, patient, 0, "train", ph), (f"{src}#copy2", sha, patient, 0, "test", ph)]
        elif src == "d.dcm":
            rows += [(f"{src}#copy1", sha, patient, 0, "train", ph), (f"{src}#copy2", sha, patient, 0, "train", ph)]
    return rows


def test_replay_style_leaky_split_is_flagged(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    manifest_rows = [(src, sha, patient, ph) for src, sha, patient, ph in SCANS]
    splits, manifest, _ = _leak_tables(tmp_path, _replay_split(), manifest_rows=manifest_rows)
    report = audit.audit_leakage(splits, manifest, None, validate_cfg)
    assert not report.ok
    assert _counts(report) == {"files": 3, "patients": 3}
    assert [f["sources"] for f in report.files] == [["a.dcm#copy1", "a.dcm#copy2"], ["c.dcm#copy1", "c.dcm#copy2"],
                                                    ["e.dcm#copy1", "e.dcm#copy2"]]
    assert len(report.copies) == 8 and report.copies[0] == {"source": "a.dcm#copy1", "sha256": "s1",
                                                             "raw_source": "a.dcm"}
    text = audit.format_leakage(report)
    assert "LEAK fold 0: raw file sha256 s1 in test+train: a.dcm#copy1, a.dcm#copy2" in text
    assert "NOTE 8 split source(s) are not in the manifest but share a raw file's sha256" in text
    assert "augmented copies: not checked" in text


def test_replay_split_through_the_command_line(tmp_path: Path, repo_root: Path, capsys) -> None:
    """--splits audits another split file (against the default manifest), without the default augmentation index."""
    root = tmp_path / "repo"
    (root / "reports/replay").mkdir(parents=True)
    (root / "data/ingested").mkdir(parents=True)
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    manifest_rows = [(src, sha, patient, ph) for src, sha, patient, ph in SCANS]
    splits, manifest, _ = _leak_tables(tmp_path, _replay_split(), manifest_rows=manifest_rows)
    shutil.copy(splits, root / "reports/replay/leaky_split.csv")
    shutil.copy(manifest, root / "data/ingested/manifest.csv")
    code = main(["audit", "--leakage", "--splits", str(root / "reports/replay/leaky_split.csv"), "--root", str(root),
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert len(report["leakage"]["files"]) == 3 and report["leakage"]["augmented_checked"] is False


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda s, m: pd.read_csv(s).drop(columns="patient_id").to_csv(s, index=False), "missing column"),
        (lambda s, m: m.write_text(m.read_text().replace("0f0f0f0f0f0f0f0f", "not-hex!")), "manifest.csv: phash"),
        (lambda s, m: pd.read_csv(m).iloc[1:].to_csv(m, index=False), "no row for 1 source"),
        (lambda s, m: pd.read_csv(s).assign(split="holdout").to_csv(s, index=False), "unknown split value"),
        (lambda s, m: s.unlink(), "not found"),
    ],
)
def test_leakage_input_errors_name_the_file(tmp_path: Path, validate_cfg: ValidateConfig, break_it,
                                            message: str) -> None:
    splits, manifest, index = _leak_tables(tmp_path, CLEAN, CLEAN_AUG)
    break_it(splits, manifest)
    with pytest.raises(audit.AuditError, match=message):
        audit.audit_leakage(splits, manifest, index, validate_cfg)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_audit_on_the_real_pipeline_catches_tampering(tmp_path: Path) -> None:
    """The tiny pipeline up to one model's metrics; both audits pass, then fail on a tampered raw and model file."""
    repo = make_repo_copy(tmp_path / "repo")
    run([DVC, "repro", f"evaluate@{MODEL}"], repo)
    spinedxa = str(VENV_BIN / "spinedxa")
    ok = run([spinedxa, "audit", METRICS, "--leakage", "--mlflow", "--json"], repo)
    report = json.loads(ok.stdout)
    assert report["ok"], ok.stdout
    splits = pd.read_csv(repo / "data/split/splits.csv")
    assert len(report["lineage"]["raw_files"]) == splits["source"].nunique()
    assert len(report["lineage"]["folds"]) == splits["fold"].nunique()

    raw = repo / "data/raw/synthetic" / report["lineage"]["raw_files"][0]["source"]
    raw.chmod(0o644)
    raw.write_bytes(raw.read_bytes() + b"\0")
    model = repo / "models" / MODEL / "fold0" / "model.pt"
    model.chmod(0o644)
    weights = bytearray(model.read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one flipped byte in the middle of the state dict
    model.write_bytes(bytes(weights))
    bad = run([spinedxa, "audit", METRICS], repo, check=False)
    assert bad.returncode == 1
    assert f"MISMATCH    data/raw/synthetic/{report['lineage']['raw_files'][0]['source']}" in bad.stdout
    assert f"MISMATCH    models/{MODEL}/fold0/model.pt: model sha256 (fold 0: meta.json vs file)" in bad.stdout
