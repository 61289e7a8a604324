"""Tests of spinedxa.report and stages/report.py on small fake pipeline outputs (no models, no torch training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, dvc_argv, stage_main

from spinedxa import metrics, report
from spinedxa.config import apply_profile, load_params

CLASSES = ("normal", "osteoporosis")
# How well each fake model separates the classes (logit shift); vgg16 is pure noise, so it loses to the baseline.
SIGNAL = {"cnn21": 2.5, "resnet50": 1.2, "vgg16": 0.0, "vgg19": 0.4, "inception_v3": 1.5, "baseline": 1.0}


def write_fake_outputs(root: Path, n_patients: int = 30, bootstrap: int = 50) -> Path:
    """Write, under ``root``, every input of the report stage in the dvc.yaml layout; return the params path."""
    params_path = root / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    apply_profile(params_path, REPO / "profiles" / "tiny.yaml")
    rng = np.random.default_rng(0)
    # Splits: patients alternate classes; every third patient has a follow-up scan.
    rows = []
    for p in range(n_patients * 2):
        split = ("train", "val", "test", "test")[(p // 2) % 4]
        for visit in range(2 if p % 3 == 0 else 1):
            src = f"{CLASSES[p % 2]}/scan_{p:04d}_{visit}.dcm"
            rows.append({"source": src, "sha256": f"{p:04d}{visit}".ljust(64, "a"), "patient_id": f"P{p:012x}",
                         "label": CLASSES[p % 2], "image": f"images/{p:04d}{visit}.png", "split": split})
    splits = pd.DataFrame(rows)
    (root / "data/split").mkdir(parents=True)
    splits.to_csv(root / "data/split/splits.csv", index=False)
    manifest = splits.assign(status="accepted", reason="", format="dicom")[
        ["source", "sha256", "status", "reason", "label", "patient_id", "image", "format"]]
    quarantined = pd.DataFrame([
        {"source": "normal/broken.dcm", "sha256": "f" * 64, "status": "quarantined",
         "reason": "truncated: pixel data ends early | <binary>", "label": "normal", "patient_id": "", "image": "",
         "format": "dicom"},
        {"source": "osteoporosis/x.txt", "sha256": "e" * 64, "status": "quarantined",
         "reason": "not_an_image: no image signature", "label": "osteoporosis", "patient_id": "", "image": "",
         "format": ""},
    ])
    (root / "data/ingested").mkdir(parents=True)
    pd.concat([manifest, quarantined]).to_csv(root / "data/ingested/manifest.csv", index=False)
    reports = root / "reports"
    reports.mkdir()
    (reports / "ingest.json").write_text(json.dumps({"n_files": len(manifest) + 2, "n_accepted": len(manifest),
                                                      "n_quarantined": 2, "quarantine_rate": 2 / (len(manifest) + 2)}))
    (reports / "validation.json").write_text(json.dumps({"success": True, "blocking_failures": [],
                                                          "warnings": ["near_duplicates_within_patient"]}))
    (reports / "split.json").write_text(json.dumps({"n_images": len(splits),
                                                     "n_patients": int(splits["patient_id"].nunique())}))
    test = splits[splits["split"] == "test"]
    y = (test["label"] == CLASSES[1]).to_numpy().astype(int)
    patient_noise = {pid: rng.normal(0, 1.0) for pid in test["patient_id"].unique()}
    for name, signal in SIGNAL.items():
        logit = signal * (2 * y - 1) + np.array([patient_noise[p] for p in test["patient_id"]]) * 0.8
        prob = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.8, len(y)))))
        record = metrics.summarize(y, prob, test["patient_id"].to_numpy(), threshold=0.5, n_resamples=bootstrap,
                                   seed=0)
        record.update(model=name, mlflow_run_id=None if name == "baseline" else f"run{name}",
                      model_sha256=None if name == "baseline" else f"sha{name}")
        preds = metrics.predictions_frame(test["source"], test["patient_id"], y, prob, classes=CLASSES, threshold=0.5)
        metrics.write_evaluation(preds, record, metrics_path=reports / f"metrics/{name}.json",
                                 predictions_path=reports / f"predictions/{name}.csv",
                                 plots_dir=reports / f"plots/{name}")
    return params_path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the report stage once, with its dvc.yaml command line, on fake outputs; share the result."""
    root = tmp_path_factory.mktemp("report")
    write_fake_outputs(root)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest": {"cmd": "x", "outs": [{"path": "data/ingested", "hash": "md5", "md5": "abc123.dir"}]},
        "train@cnn21": {"cmd": "x", "outs": [{"path": "models/cnn21", "hash": "md5", "md5": "def456.dir"}]},
        "report": {"cmd": "x", "outs": [{"path": "reports/comparison.md", "hash": "md5", "md5": "not-lineage"}]},
    }}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        stage_main("report")(dvc_argv("report"))
    return {"root": root, "md": (root / "reports/comparison.md").read_text(),
            "html": (root / "reports/comparison.html").read_text(), "params": load_params(root / "params.yaml")}


def _record(root: Path, name: str) -> dict:
    return json.loads((root / f"reports/metrics/{name}.json").read_text())


def test_report_shows_every_model_and_the_paper_column(rendered: dict) -> None:
    md, html = rendered["md"], rendered["html"]
    header = next(line for line in md.splitlines() if line.startswith("| Metric |"))
    for name in [*rendered["params"].train.models, "baseline"]:
        assert f" {name} |" in header and name in html
    assert "Naeem et al. 2025, 21-layer CNN (reported)" in header
    assert "| Accuracy |" in md and md.count("not reported") == len(metrics.METRIC_KEYS) - 4
    assert "0.9714 |" in md and "0.9541 |" in md  # params report.paper_accuracy / paper_recall as fractions


def test_numbers_come_from_the_inputs(rendered: dict) -> None:
    root, md = rendered["root"], rendered["md"]
    for name in ("cnn21", "vgg16", "baseline"):
        assert report.fmt_ci(_record(root, name), "roc_auc") in md
    a = metrics.read_predictions(root / "reports/predictions/cnn21.csv")
    b = metrics.read_predictions(root / "reports/predictions/vgg16.csv")
    res = metrics.mcnemar_exact(a["y_true"], a["pred"], b["pred"])
    row = next(line for line in md.splitlines() if line.startswith("| vgg16 | ") and " / " in line)
    assert f"| {res.b} / {res.c} | {report.fmt_p(res.p_value)} [" in row
    dl = metrics.delong_test(a["y_true"].to_numpy(), a["prob"].to_numpy(), b["prob"].to_numpy())
    assert f"{dl.difference:+.3f}" in row and report.fmt_num(dl.se) in row
    test = pd.read_csv(root / "data/split/splits.csv").query("split == 'test'")
    assert f"**{len(test)} images of {test['patient_id'].nunique()} patients**" in md


def test_html_is_self_contained(rendered: dict) -> None:
    html = rendered["html"]
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, flags=re.IGNORECASE)
    assert len(refs) >= 4  # ROC, PR, calibration, confusion
    assert all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs]
    assert not re.search(r"<(?:link|script|iframe)\b", html, flags=re.IGNORECASE)
    assert "<table>" in html and "&lt;binary&gt;" in html  # tables rendered; manifest text escaped


def test_data_summary_paper_audit_lineage_and_baseline_check(rendered: dict) -> None:
    md = rendered["md"]
    assert "TP 104, FN 5, FP 1, TN 100" in md and "210 = 6 × 35" in md
    assert "F1 97.20 %" in md and "harmonic mean of the reported precision and recall is 97.19 %" in md
    assert "truncated: pixel data ends early \\| &lt;binary&gt;" in md and "`ffffffffffff`" in md
    assert "normal/broken.dcm" not in md  # quarantined files are named by hash only
    assert "patients found in more than one split here: 0" in md
    assert "| train@cnn21 | `models/cnn21` | `def456.dir` |" in md and "not-lineage" not in md
    assert "| cnn21 | runcnn21 | `shacnn21` |" in md
    assert re.search(r"\*\*vgg16\*\*: no\. .*\n  Why not: trained from scratch", md)
    assert re.search(r"\*\*cnn21\*\*: yes\.", md)
    assert "These results come from the embedded synthetic cohort" in md


def test_missing_metrics_file_fails_with_its_name(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    (tmp_path / "reports/metrics/vgg19.json").unlink()
    inputs = _inputs(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"metrics/vgg19\.json: missing.*evaluate@vgg19"):
        report.build_context(params, inputs)


def test_degenerate_intervals_render_as_na(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    path = tmp_path / "reports/metrics/vgg16.json"
    record = json.loads(path.read_text())
    record.update(precision=None, precision_ci_low=None, precision_ci_high=None, roc_auc_ci_low=None,
                  roc_auc_ci_high=None, roc_auc_ci_skipped=10)
    path.write_text(json.dumps(record))
    markdown, html = report.render(report.build_context(params, _inputs(tmp_path)))
    row = next(line for line in markdown.splitlines() if line.startswith("| Precision (PPV) |"))
    assert "n/a [n/a]" in row
    assert "- vgg16: roc_auc 10" in markdown and "n/a [n/a]" in html


def test_predictions_of_different_test_sets_are_rejected(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    path = tmp_path / "reports/predictions/resnet50.csv"
    pd.read_csv(path).iloc[1:].to_csv(path, index=False)
    with pytest.raises(report.ReportInputError, match="cover different test images"):
        report.build_context(params, _inputs(tmp_path))


def _inputs(root: Path) -> report.ReportInputs:
    return report.ReportInputs(
        root / "reports/metrics", root / "reports/predictions", root / "reports/plots",
        root / "data/ingested/manifest.csv", root / "data/split/splits.csv", root / "reports/validation.json",
        root / "reports/ingest.json", root / "reports/split.json", repo=root,
    )


@pytest.mark.parametrize(
    "reported, expected",
    [
        ((97.14, 99.04, 95.41), (210, 104, 5, 1, 100)),  # Naeem et al. 2025 (precision truncated, not rounded)
        ((50.0, 50.0, 50.0), (4, 1, 1, 1, 1)),
        ((100.0, 100.0, 100.0), (1, 1, 0, 0, 0)),
        ((90.0, 80.0, 100.0), (10, 4, 0, 1, 5)),
    ],
)
def test_reconstruct_paper_confusion(reported: tuple[float, float, float], expected: tuple[int, ...]) -> None:
    audit = report.reconstruct_paper_confusion(*reported, n_images=174)
    assert (audit.n, audit.tp, audit.fn, audit.fp, audit.tn) == expected
    for key, value in zip(("accuracy", "precision", "recall"), reported):
        assert report._matches(audit.implied[key], value)


def test_reconstruct_paper_confusion_reads_copies_and_gives_up() -> None:
    audit = report.reconstruct_paper_confusion(97.14, 99.04, 95.41, n_images=174)
    assert (audit.copies, audit.per_copy) == (6, 35)
    assert report.reconstruct_paper_confusion(97.14, 99.04, 95.41, n_images=174, max_n=200) is None


@pytest.mark.parametrize(
    "pvalues, expected",
    [
        ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),
        ([0.01, None, float("nan"), 0.02], [0.02, None, None, 0.02]),
        ([None], [None]),
    ],
)
def test_holm(pvalues: list, expected: list) -> None:
    got = report.holm(pvalues)
    assert [g is None for g in got] == [e is None for e in expected]
    assert [g for g in got if g is not None] == pytest.approx([e for e in expected if e is not None])


@pytest.mark.parametrize(
    "fn, value, expected",
    [
        (report.fmt_num, None, "n/a"),
        (report.fmt_num, float("nan"), "n/a"),
        (report.fmt_num, 0.12345, "0.123"),
        (report.fmt_p, 0.0004, "<0.001"),
        (report.fmt_p, 0.0456, "0.046"),
        (report.fmt_p, None, "n/a"),
        (report.md_cell, "a|b<c>", "a\\|b&lt;c&gt;"),
    ],
)
def test_formatters(fn, value, expected: str) -> None:
    assert fn(value) == expected


def test_fmt_ci_handles_degenerate_records() -> None:
    assert report.fmt_ci({"f1": 0.5, "f1_ci_low": 0.4, "f1_ci_high": 0.6}, "f1") == "0.500 [0.400, 0.600]"
    assert report.fmt_ci({"f1": 0.5, "f1_ci_low": None, "f1_ci_high": None}, "f1") == "0.500 [n/a]"
    assert report.fmt_ci({"f1": None, "f1_ci_low": None, "f1_ci_high": None}, "f1") == "n/a [n/a]"
