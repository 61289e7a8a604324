"""spinedxa.audit: the lineage audit (every hash from a metric back to the raw files) and the leakage audit.

The lineage tests build, in a temporary git + DVC repository, the files the pipeline writes for one model (raw
files, ingest manifest, splits, model + meta.json, metrics) with the real params.yaml, record them in dvc.lock with
`dvc commit`, and then tamper with one link at a time. The leakage tests use hand-written tables. An end-to-end
test on the real pipeline (tiny profile) is marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, VENV_BIN, make_repo_copy, run
from PIL import Image

from spinedxa import audit, dag
from spinedxa.cli import main
from spinedxa.config import ValidateConfig, load_params
from spinedxa.files import sha256_file

DVC = str(VENV_BIN / "dvc")
MODEL = "cnn21"
METRICS = f"reports/metrics/{MODEL}.json"
RAW = "data/raw/synthetic"
LINEAGE_DVC = {
    "stages": {
        "ingest": {"cmd": "echo ingest", "deps": [RAW], "params": ["data.source", "ingest"], "outs": ["data/ingested"]},
        "split": {"cmd": "echo split", "deps": ["data/ingested/manifest.csv"], "params": ["split"],
                  "outs": ["data/split/splits.csv"]},
        "train": {"matrix": {"model": [MODEL]}, "cmd": "echo train ${item.model}",
                  "deps": ["data/split/splits.csv", "data/ingested"], "params": ["train.${item.model}"],
                  "outs": ["models/${item.model}"]},
        "evaluate": {"matrix": {"model": [MODEL]}, "cmd": "echo evaluate ${item.model}",
                     "deps": ["models/${item.model}", "data/split/splits.csv"],
                     "metrics": [{"reports/metrics/${item.model}.json": {"cache": False}}]},
    }
}


def _write_lineage_files(root: Path) -> None:
    """Six raw PNGs (three patients), their manifest, a split, a model with meta.json and its metrics file."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    rng = np.random.default_rng(0)
    rows, split_rows = [], []
    for i, split in enumerate(["train", "train", "train", "train", "val", "test"]):
        label = ("normal", "osteoporosis")[i % 2]
        source = f"{label}/scan_{i:04d}.png"
        (root / RAW / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16)).save(root / RAW / source)
        sha = sha256_file(root / RAW / source)
        image = f"images/{sha[:16]}.png"
        (root / "data/ingested/images").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / RAW / source, root / "data/ingested" / image)
        patient = f"P{hashlib.sha256(str(i // 2).encode()).hexdigest()[:12]}"
        rows.append({"source": source, "sha256": sha, "status": "accepted", "reason": "", "label": label,
                     "patient_id": patient, "image": image, "phash": f"{rng.integers(0, 2**63):016x}"})
        split_rows.append({"source": source, "sha256": sha, "patient_id": patient, "label": label, "image": image,
                           "split": split})
    pd.DataFrame(rows).to_csv(root / "data/ingested/manifest.csv", index=False)
    (root / "data/split").mkdir(parents=True)
    pd.DataFrame(split_rows).to_csv(root / "data/split/splits.csv", index=False)

    model_dir = root / "models" / MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "model.pt").write_bytes(b"weights of a tiny model")
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    meta = {
        "model": MODEL, "image_size": 64, "classes": ["normal", "osteoporosis"], "mlflow_run_id": "a1b2c3",
        "mlflow_tracking_uri": "sqlite:///mlflow.db", "model_sha256": sha256_file(model_dir / "model.pt"),
        "data_digests": {p: dag.dvc_hash(root / p, root) for p in ("data/split/splits.csv", "data/ingested")},
        "params": params["train"][MODEL], "git_commit": commit,
    }
    (model_dir / "meta.json").write_text(json.dumps(meta))
    (root / "reports/metrics").mkdir(parents=True)
    metrics = {"model": MODEL, "mlflow_run_id": "a1b2c3", "model_sha256": meta["model_sha256"], "accuracy": 0.75,
               "f1": 0.8}
    (root / METRICS).write_text(json.dumps(metrics))


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


def test_untouched_lineage_verifies(lineage_repo: Path) -> None:
    lineage = audit.audit_lineage(METRICS, lineage_repo)
    assert lineage.ok, audit.format_lineage(lineage)
    assert (lineage.stage, lineage.model, lineage.mlflow_run_id) == (f"evaluate@{MODEL}", MODEL, "a1b2c3")
    assert (lineage.split_file, lineage.manifest) == ("data/split/splits.csv", "data/ingested/manifest.csv")
    assert sorted(f["split"] for f in lineage.raw_files) == ["test", "train", "train", "train", "train", "val"]
    assert lineage.metrics == {"accuracy": 0.75, "f1": 0.8}
    items = {c.item for c in lineage.checks}
    assert {"model sha256 (meta.json)", "git commit (meta.json vs git)", "output of ingest (dvc.lock)"} <= items


# (what is tampered with, how, the check that must fail, the file it must name)
TAMPERING = [
    ("raw file", lambda r: (r / RAW / "normal/scan_0000.png").write_bytes(b"not the scan"),
     "raw file sha256 (train; manifest vs file)", f"{RAW}/normal/scan_0000.png"),
    ("model file", lambda r: (r / "models" / MODEL / "model.pt").write_bytes(b"other weights"),
     "model sha256 (meta.json)", f"models/{MODEL}/model.pt"),
    ("metrics file", lambda r: _edit_json(r / METRICS, accuracy=0.99),
     f"output of evaluate@{MODEL} (dvc.lock)", METRICS),
    ("split file", lambda r: _edit_csv(r / "data/split/splits.csv", 5, "split", "train"),
     "output of split (dvc.lock)", "data/split/splits.csv"),
    ("manifest", lambda r: _edit_csv(r / "data/ingested/manifest.csv", 1, "sha256", "0" * 64),
     "raw file sha256 (train; splits vs manifest)", f"{RAW}/osteoporosis/scan_0001.png"),
    ("run id", lambda r: _edit_json(r / METRICS, mlflow_run_id="ffff"),
     "MLflow run id (metrics vs meta.json)", METRICS),
    ("params", lambda r: _edit_params(r / "params.yaml"),
     f"param train.{MODEL} of train@{MODEL} (dvc.lock)", "params.yaml"),
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
    assert ("raw file sha256 (train; manifest vs file)", f"{RAW}/normal/scan_0002.png") in failed
    assert all(c["ok"] for c in report["lineage"]["checks"] if "raw file" not in c["item"] and RAW not in c["path"])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "not an output of any stage"),  # the metrics argument below is not a pipeline output
        (lambda r: (r / "models" / MODEL / "meta.json").unlink(), "meta.json: not found"),
        (lambda r: (r / "models" / MODEL / "meta.json").write_text("{"), "meta.json: not valid JSON"),
        (lambda r: _edit_json(r / "models" / MODEL / "meta.json", data_digests=[]), "data_digests must be an object"),
        (lambda r: (r / "data/split/splits.csv").write_text("source,split\na,train\n"), "missing column"),
    ],
)
def test_audit_errors_name_the_file(lineage_repo: Path, setup, message: str, capsys) -> None:
    setup(lineage_repo)
    target = "params.yaml" if "any stage" in message else METRICS
    assert main(["audit", target, "--root", str(lineage_repo)]) == 2
    assert message in capsys.readouterr().err


def test_metrics_file_missing_keys_is_an_error(lineage_repo: Path) -> None:
    (lineage_repo / METRICS).write_text(json.dumps({"model": MODEL}))
    with pytest.raises(audit.AuditError, match=r"cnn21.json: missing key\(s\) \['mlflow_run_id', 'model_sha256'\]"):
        audit.audit_lineage(METRICS, lineage_repo)


# ---------------------------------------------------------------------------------------------------- leakage

PHASH = {  # 64-bit hashes: A and B differ in 40 bits; A3/A4/A5 differ from A in 3/4/5 bits
    "A": 0x0F0F0F0F0F0F0F0F, "B": 0xF0F0F0F0F0F0F0FF, "C": 0x00FF00FF00FF00FF, "D": 0x3333333333333333,
    "E": 0x5555555555555555, "F": 0x6666666666666666,
    "A3": 0x0F0F0F0F0F0F0F0F ^ 0b111, "A4": 0x0F0F0F0F0F0F0F0F ^ 0b1111, "A5": 0x0F0F0F0F0F0F0F0F ^ 0b11111,
}


def _leak_tables(tmp_path: Path, splits: list[tuple], augmented: list[tuple] = ()) -> tuple[Path, Path, Path]:
    """Write splits.csv/manifest.csv/index.csv from ``(source, sha, patient, split, phash key)`` rows and
    ``(image, parent source, parent sha, patient)`` augmented rows."""
    split_rows, man_rows = [], []
    for source, sha, patient, split, ph in splits:
        split_rows.append({"source": source, "sha256": sha, "patient_id": patient, "label": "normal",
                           "image": f"images/{sha}.png", "split": split})
        man_rows.append({"source": source, "sha256": sha, "status": "accepted", "patient_id": patient,
                         "phash": f"{PHASH[ph]:016x}"})
    aug_rows = [{"image": img, "parent_source": src, "parent_sha256": sha, "parent_image": f"images/{sha}.png",
                 "patient_id": patient, "label": "normal", "k": 1} for img, src, sha, patient in augmented]
    paths = tmp_path / "splits.csv", tmp_path / "manifest.csv", tmp_path / "index.csv"
    for path, rows, cols in zip(paths, (split_rows, man_rows, aug_rows),
                                (None, None, ["image", "parent_source", "parent_sha256", "parent_image",
                                              "patient_id", "label", "k"])):
        pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return paths


CLEAN = [
    ("a.dcm", "s1", "P1", "train", "A"), ("b.dcm", "s2", "P1", "train", "B"), ("c.dcm", "s3", "P2", "train", "C"),
    ("d.dcm", "s4", "P3", "val", "D"), ("e.dcm", "s5", "P4", "test", "E"), ("f.dcm", "s6", "P4", "test", "F"),
]
CLEAN_AUG = [("images/s1_aug1.png", "a.dcm", "s1", "P1"), ("images/s3_aug1.png", "c.dcm", "s3", "P2")]


def _replace(rows: list[tuple], index: int, **fields: str) -> list[tuple]:
    names = ("source", "sha", "patient", "split", "ph")
    out = list(rows)
    out[index] = tuple(fields.get(n, v) for n, v in zip(names, rows[index]))
    return out


LEAKS = [
    ("patient", _replace(CLEAN, 3, patient="P2"), CLEAN_AUG, {"patients": 1}),
    # the same file in train and test: and the augmented copy of it now derives from a test image too
    ("file", _replace(CLEAN, 4, sha="s1"), CLEAN_AUG, {"files": 1, "augmented": 1}),
    ("near-duplicate at threshold", _replace(CLEAN, 4, ph="A4"), CLEAN_AUG, {"near_duplicates": 1}),
    ("near-duplicate below threshold", _replace(CLEAN, 5, ph="A3"), CLEAN_AUG, {"near_duplicates": 1}),
    ("augmented from test", CLEAN, [*CLEAN_AUG, ("images/s5_aug1.png", "e.dcm", "s5", "P4")], {"augmented": 1}),
    ("augmented from unknown", CLEAN, [("images/zz_aug1.png", "z.dcm", "zz", "P9")], {"augmented": 1}),
]


@pytest.fixture(scope="module")
def validate_cfg(repo_root: Path) -> ValidateConfig:
    """params.yaml's validate block with pHash threshold 4 and SSIM confirmation at 0.9."""
    cfg = load_params(repo_root / "params.yaml").validate
    return dataclasses.replace(cfg, phash_max_distance=4, near_duplicate_min_ssim=0.9)


def test_clean_splits_have_no_leakage(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    splits, manifest, index = _leak_tables(tmp_path, CLEAN, CLEAN_AUG)
    report = audit.audit_leakage(splits, manifest, index, validate_cfg)
    assert report.ok, audit.format_leakage(report)
    assert (report.n_images, report.n_patients, report.n_augmented) == (6, 4, 2)


@pytest.mark.parametrize("min_ssim", [0.0, 0.9])  # 0.9: no images to compare, so candidates cannot be cleared
@pytest.mark.parametrize(("case", "rows", "aug", "found"), LEAKS, ids=[c[0] for c in LEAKS])
def test_leakage_is_found(tmp_path: Path, validate_cfg: ValidateConfig, min_ssim: float, case: str, rows: list,
                          aug: list, found: dict[str, int]) -> None:
    cfg = dataclasses.replace(validate_cfg, near_duplicate_min_ssim=min_ssim)
    report = audit.audit_leakage(*_leak_tables(tmp_path, rows, aug), cfg)
    counts = {k: len(getattr(report, k)) for k in ("patients", "files", "near_duplicates", "augmented")}
    assert not report.ok
    assert {k: v for k, v in counts.items() if v} == found
    assert "FAILED" in audit.format_leakage(report)


def test_near_duplicate_just_above_threshold_is_not_a_leak(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    report = audit.audit_leakage(*_leak_tables(tmp_path, _replace(CLEAN, 4, ph="A5"), CLEAN_AUG), validate_cfg)
    assert report.ok


def test_leakage_report_names_the_offenders(tmp_path: Path, validate_cfg: ValidateConfig) -> None:
    report = audit.audit_leakage(*_leak_tables(tmp_path, _replace(CLEAN, 4, ph="A3"), CLEAN_AUG), validate_cfg)
    assert report.near_duplicates == [{"sources": ["a.dcm", "e.dcm"], "splits": ["train", "test"],
                                       "patients": ["P1", "P4"], "distance": 3, "ssim": None}]
    assert "LEAK near-duplicate (distance 3, images missing): a.dcm (train) ~ e.dcm (test)" in \
        audit.format_leakage(report)


@pytest.mark.parametrize(("copy", "leak"), [(True, True), (False, False)])
def test_ssim_confirms_or_clears_a_phash_candidate(tmp_path: Path, validate_cfg: ValidateConfig, copy: bool,
                                                   leak: bool) -> None:
    """e.dcm (test) has a pHash 3 bits from a.dcm (train): a noisy copy of a.dcm is a leak, another image is not."""
    splits, manifest, index = _leak_tables(tmp_path, _replace(CLEAN, 4, ph="A3"), CLEAN_AUG)
    rng = np.random.default_rng(1)
    scan = rng.uniform(0, 1, (64, 48))
    other = scan + rng.normal(0, 0.01, scan.shape) if copy else rng.uniform(0, 1, (64, 48))
    (tmp_path / "images").mkdir()
    for sha, img in (("s1", scan), ("s5", other)):
        Image.fromarray(np.rint(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(tmp_path / f"images/{sha}.png")
    report = audit.audit_leakage(splits, manifest, index, validate_cfg)
    assert bool(report.near_duplicates) == leak
    if leak:
        assert report.near_duplicates[0]["ssim"] >= 0.9


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda s, m: pd.read_csv(s).drop(columns="patient_id").to_csv(s, index=False), "missing column"),
        (lambda s, m: m.write_text(m.read_text().replace("0f0f0f0f0f0f0f0f", "not-hex!")), "manifest.csv: phash"),
        (lambda s, m: pd.read_csv(m).iloc[1:].to_csv(m, index=False), "no row for 1 source"),
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
    assert len(report["lineage"]["raw_files"]) == len(pd.read_csv(repo / "data/split/splits.csv"))

    raw = repo / "data/raw/synthetic" / report["lineage"]["raw_files"][0]["source"]
    raw.chmod(0o644)
    raw.write_bytes(raw.read_bytes() + b"\0")
    model = repo / "models" / MODEL / "model.pt"
    model.chmod(0o644)
    weights = bytearray(model.read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # one flipped byte in the middle of the state dict
    model.write_bytes(bytes(weights))
    bad = run([spinedxa, "audit", METRICS], repo, check=False)
    assert bad.returncode == 1
    assert f"MISMATCH    data/raw/synthetic/{report['lineage']['raw_files'][0]['source']}" in bad.stdout
    assert f"MISMATCH    models/{MODEL}/model.pt: model sha256 (meta.json)" in bad.stdout
