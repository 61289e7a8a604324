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
from spinedxa.contracts import predictions as predictions_contract

CLASSES = ("normal", "osteoporosis")
# How well each fake model separates the classes (logit shift); vgg16 is pure noise, so it loses to the baseline.
SIGNAL = {"cnn21": 2.5, "resnet50": 1.2, "vgg16": 0.0, "vgg19": 0.4, "inception_v3": 1.5, "baseline": 1.0}


def write_fake_outputs(root: Path, n_patients: int = 30, bootstrap: int = 50, folds: int = 3,
                       classes: tuple[str, ...] = CLASSES, external: bool = True,
                       data: dict | None = None) -> Path:
    """Write, under ``root``, every input of the report stage in the dvc.yaml layout; return the params path.

    A k-fold split table (every scan test in exactly one fold), out-of-fold predictions of fake models whose
    separation is :data:`SIGNAL`, their pooled metrics records and provenance files, curves, summaries, a replay
    metrics file, a truth CSV with two banner copies (one quarantined for burned-in text) and, with ``external``, an
    external cohort scored by every model (with a weaker signal: another scanner). ``classes``: the task's classes
    (three gives the WHO task); ``data``: params ``data`` overrides (cohort words, class map).
    """
    params_path = root / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    apply_profile(params_path, REPO / "profiles" / "tiny.yaml")
    raw = yaml.safe_load(params_path.read_text())
    raw["data"].update({"classes": list(classes), **(data or {})})
    if len(classes) == 3:
        raw["data"]["class_map"] = {}
    raw["external"]["enabled"] = external
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    k_classes = len(classes)
    rng = np.random.default_rng(0)
    scans = []
    for p in range(n_patients * 2):
        for visit in range(2 if p % 3 == 0 else 1):
            label = classes[p % k_classes]
            scans.append({"source": f"{label}/scan_{p:04d}_{visit}.dcm",
                          "sha256": f"{p:04d}{visit}".ljust(64, "a"), "patient_id": f"P{p:012x}",
                          "label": label, "image": f"images/{p:04d}{visit}.png",
                          "roi": f"roi/{p:04d}{visit}.png", "test_fold": (p // k_classes) % folds})
    scans = pd.DataFrame(scans)
    rows = []
    for k in range(folds):
        part = scans.copy()
        part["fold"] = k
        part["split"] = np.where(part["test_fold"] == k, "test",
                                 np.where((part["test_fold"] + 1) % folds == k, "val", "train"))
        rows.append(part.drop(columns="test_fold"))
    splits = pd.concat(rows, ignore_index=True)
    (root / "data/split").mkdir(parents=True)
    splits.to_csv(root / "data/split/splits.csv", index=False)
    manifest = scans.assign(status="accepted", reason="", format="dicom", roi_method="pelvis", redacted="False",
                            label_found=scans["label"], patient_from="header", orig_width=384, orig_height=512,
                            pixel_spacing_mm=0.5, modality="BMD", photometric="MONOCHROME2", duplicate_of="")[
        ["source", "sha256", "status", "reason", "label", "label_found", "patient_id", "patient_from", "image", "roi",
         "roi_method", "redacted", "format", "orig_width", "orig_height", "pixel_spacing_mm", "modality",
         "photometric", "duplicate_of"]]
    quarantined = pd.DataFrame([
        {"source": "normal/broken.dcm", "sha256": "f" * 64, "status": "quarantined",
         "reason": "truncated: pixel data ends early | <binary>", "label": "normal", "patient_id": "", "image": "",
         "roi": "", "roi_method": "", "redacted": "", "format": "dicom"},
        {"source": f"{classes[-1]}/scan_0001_0_sc.dcm", "sha256": "e" * 64, "status": "quarantined",
         "reason": "burned_in_text: 3 text region(s) outside the allow-list", "label": classes[-1],
         "patient_id": "", "image": "", "roi": "", "roi_method": "", "redacted": "", "format": "dicom"},
    ])
    (root / "data/ingested").mkdir(parents=True)
    pd.concat([manifest, quarantined]).astype(object).fillna("").to_csv(root / "data/ingested/manifest.csv", index=False)
    truth = pd.concat([scans[["source"]].assign(burned_in=False, level_labels=False),
                       pd.DataFrame({"source": ["normal/broken.dcm", f"{classes[-1]}/scan_0001_0_sc.dcm"],
                                     "burned_in": [False, True], "level_labels": [False, False]})])
    (root / "data/truth").mkdir(parents=True)
    truth.to_csv(root / "data/truth/synthetic_truth.csv", index=False)
    reports = root / "reports"
    reports.mkdir()
    per_label = {c: {"accepted": int((scans["label"] == c).sum())} for c in classes}
    (reports / "ingest.json").write_text(json.dumps({
        "n_files": len(manifest) + 2, "n_accepted": len(manifest), "n_quarantined": 2, "n_dropped": 0,
        "n_duplicates": 0, "quarantine_rate": round(2 / (len(manifest) + 2), 6), "per_label_found": per_label,
        "per_format": {"dicom": len(manifest)}, "patient_from": {"header": len(manifest), "labels_csv": 0, "file": 0},
        "labelling": "folders"}))
    (reports / "validation.json").write_text(json.dumps({"success": True, "blocking_failures": [],
                                                          "warnings": ["near_duplicates_within_patient"]}))
    summary = {"protocol": "kfold", "n_images": len(scans), "n_patients": int(scans["patient_id"].nunique()),
               "folds": {str(k): {role: {**{c: int(((g["split"] == role) & (g["label"] == c)).sum()) for c in classes},
                                         "total": int((g["split"] == role).sum()),
                                         "patients": int(g.loc[g["split"] == role, "patient_id"].nunique())}
                                  for role in ("train", "val", "test")}
                         for k, g in splits.groupby("fold")}}
    (reports / "split.json").write_text(json.dumps(summary))
    test = splits[splits["split"] == "test"].sort_values("source")
    y = np.array([classes.index(c) for c in test["label"]])
    patient_noise = {pid: rng.normal(0, 1.0) for pid in test["patient_id"].unique()}
    ext = None
    if external:
        ext = pd.DataFrame([{"source": f"{classes[p % k_classes]}/ext_{p:04d}.dcm", "patient_id": f"X{p:012x}",
                             "label": classes[p % k_classes], "sha256": f"x{p:04d}".ljust(64, "b"),
                             "image": f"images/x{p:04d}.png", "roi": f"roi/x{p:04d}.png"} for p in range(40)])
        (root / "data/external").mkdir(parents=True)
        ext.assign(status="accepted", reason="", format="dicom", roi_method="pelvis", label_found=ext["label"],
                   patient_from="header", orig_width=384, orig_height=512, pixel_spacing_mm=0.6, modality="BMD",
                   photometric="MONOCHROME1").to_csv(root / "data/external/manifest.csv", index=False)
        (reports / "external").mkdir()
        (reports / "external/ingest.json").write_text(json.dumps({
            "n_files": 40, "n_accepted": 40, "n_quarantined": 0, "quarantine_rate": 0.0, "labelling": "folders",
            "per_format": {"dicom": 40}, "per_label_found": {c: {"accepted": int((ext["label"] == c).sum())}
                                                             for c in classes}}))
        (reports / "external/validation.json").write_text(json.dumps({"success": True, "blocking_failures": [],
                                                                       "warnings": []}))
    else:
        (reports / "external").mkdir()
        for name in ("ingest.json", "validation.json"):
            (reports / "external" / name).write_text(json.dumps({"enabled": False}))
        (root / "data/external").mkdir(parents=True)
        (root / "data/external/DISABLED.json").write_text(json.dumps({"enabled": False}))

    def fake_prob(labels: np.ndarray, signal: float, noise: np.ndarray) -> np.ndarray:
        if k_classes == 2:
            logit = signal * (2 * labels - 1) + noise
            return 1 / (1 + np.exp(-(logit + rng.normal(0, 0.8, len(labels)))))
        score = (signal * labels + noise + rng.normal(0, 0.8, len(labels)))[:, None]
        z = -((score - signal * np.arange(k_classes)[None, :]) ** 2) / 2
        return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)

    for name, signal in SIGNAL.items():
        prob = fake_prob(y, signal, np.array([patient_noise[p] for p in test["patient_id"]]) * 0.8)
        preds = metrics.predictions_frame(test["source"], test["patient_id"], y, prob, classes=classes, threshold=0.5,
                                          folds=test["fold"].to_numpy())
        record = metrics.out_of_fold_record(preds, classes, protocol="kfold", threshold=0.5, n_resamples=bootstrap,
                                            seed=0)
        cnn = name != "baseline"
        provenance = {"model": name, "mlflow_run_id": f"run{name}" if cnn else None,
                      "model_sha256": {str(k): f"sha{name}{k}".ljust(64, "0") for k in range(folds)} if cnn else None}
        if ext is not None:
            y_ext = np.array([classes.index(c) for c in ext["label"]])
            ext_preds = metrics.predictions_frame(ext["source"], ext["patient_id"], y_ext,
                                                  fake_prob(y_ext, 0.6 * signal, np.zeros(len(ext))),
                                                  classes=classes, threshold=0.5)
            record.update(metrics.external_record(ext_preds, classes, threshold=0.5, n_resamples=bootstrap, seed=0))
            (reports / "predictions/external").mkdir(parents=True, exist_ok=True)
            predictions_contract.write(reports / f"predictions/external/{name}.csv", ext_preds)
        if cnn:
            record.update(kept_epoch={str(k): 2 for k in range(folds)}, gradcam_degenerate=0)
            provenance.update(variant=f"{name}_bn" if name.startswith("vgg") else name, fast_path="cpu_fp32_channels_last", threads=1,
                              train_git_commit="c0ffee" * 6, train_git_dirty=False)
            curves = pd.DataFrame([{"fold": k, "epoch": e, "train_loss": 0.7 - 0.1 * e, "val_loss": 0.7 - 0.05 * e,
                                    "val_auc": 0.6 + 0.1 * e, "val_accuracy": 0.6, "lr": 1e-3, "seconds": 1.0}
                                   for k in range(folds) for e in (1, 2)])
            (reports / "train").mkdir(exist_ok=True)
            curves.to_csv(reports / f"train/{name}.csv", index=False)
        metrics.write_evaluation(preds, record, metrics_path=reports / f"metrics/{name}.json",
                                 predictions_path=reports / f"predictions/{name}.csv",
                                 plots_dir=reports / f"plots/{name}")
        (reports / "provenance").mkdir(exist_ok=True)
        (reports / f"provenance/{name}.json").write_text(json.dumps(provenance))
    write_fake_replay(reports / "replay")
    return params_path


def write_fake_replay(directory: Path, *, inflation_ci: tuple[float | None, float | None] = (0.03, 0.15)) -> None:
    """The replay's two records (spinedxa/contracts/replay.py): the leaky run on its test copies and on the matched
    scans, the matched control on the same scans, and the ROC-AUC inflation with the paired interval ``inflation_ci``.
    """
    def metrics_of(values: dict[str, float], **extra: float) -> dict:
        out: dict = dict(extra)
        for key, value in values.items():
            out.update({key: value, f"{key}_ci_low": value - 0.05, f"{key}_ci_high": min(1.0, value + 0.03)})
        return out

    leaky_copies = {"accuracy": 0.97, "f1": 0.975, "precision": 0.99, "recall": 0.96, "roc_auc": 0.995}
    leaky_matched = {"accuracy": 0.94, "f1": 0.95, "precision": 0.96, "recall": 0.94, "roc_auc": 0.97}
    control = {"accuracy": 0.84, "f1": 0.87, "precision": 0.9, "recall": 0.85, "roc_auc": 0.88}
    leaky = {"enabled": True, "leaky_ablation": True, "protocol": "leaky_replay", "model": "cnn21", "n_images": 600,
             "n_test_images": 120, "n_test_scans": 80, "n_test_patients": 70, "test_scans_in_train_share": 1.0,
             "epochs": 15, "tta": "hflip", "val_fraction": 0.15,
             **metrics_of(leaky_copies),
             "matched": metrics_of(leaky_matched, n_test=37, scans_in_train_share=1.0)}
    for key, value in leaky_copies.items():
        leaky.update({f"image_bootstrap_{key}_ci_low": value - 0.01, f"image_bootstrap_{key}_ci_high": value})
    inflation = {"n_scans": 37, "n_patients": 31, "bootstrap_resamples": 1000}
    for key in leaky_matched:
        d = leaky_matched[key] - control[key]
        inflation.update({key: d, f"{key}_ci_low": d - 0.05, f"{key}_ci_high": d + 0.05})
    inflation.update(roc_auc_ci_low=inflation_ci[0], roc_auc_ci_high=inflation_ci[1])
    record = {"enabled": True, "leaky_ablation": True, "protocol": "matched_control", "n_test_patients": 31,
              **metrics_of(control, n_test=37), "inflation": inflation}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "leaky_replay_metrics.json").write_text(json.dumps(leaky))
    (directory / "matched_control_metrics.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path) -> dict:
    """Run the report stage once, with its dvc.yaml command line, on fake outputs; share the result."""
    import shutil

    root = tmp_path_factory.mktemp("report")
    write_fake_outputs(root)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest": {"cmd": "x", "outs": [{"path": "data/ingested", "hash": "md5", "md5": "abc123.dir"}]},
        "train@cnn21": {"cmd": "x", "outs": [{"path": "models/cnn21", "hash": "md5", "md5": "def456.dir"}]},
        "report": {"cmd": "x", "outs": [{"path": "reports/comparison.md", "hash": "md5", "md5": "not-lineage"}]},
    }}))
    shutil.copyfile(_empty_mlflow_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        stage_main("report")(dvc_argv("report"))
    return {"root": root, "md": (root / "reports/comparison.md").read_text(),
            "html": (root / "reports/comparison.html").read_text(), "params": load_params(root / "params.yaml")}


def _record(root: Path, name: str) -> dict:
    return json.loads((root / f"reports/metrics/{name}.json").read_text())


def test_report_shows_every_model_and_the_paper_column(rendered: dict) -> None:
    md, html = rendered["md"], rendered["html"]
    header = next(line for line in md.splitlines() if line.startswith("| Metric |") and "Naeem" in line)
    for name in [*rendered["params"].train.models, "baseline"]:
        assert f" {name} |" in header and name in html
    assert "Naeem et al. 2025, 21-layer CNN (reported)" in header
    table = md.split("## Out-of-fold metrics", 1)[1].split("###", 1)[0]
    assert "| Accuracy |" in table and table.count("not reported") == len(metrics.METRIC_KEYS) - 4
    assert "0.9714 |" in md and "0.9541 |" in md  # params report.paper_accuracy / paper_recall as fractions


def test_numbers_come_from_the_inputs(rendered: dict) -> None:
    root, md = rendered["root"], rendered["md"]
    for name in ("cnn21", "vgg16", "baseline"):
        assert report.fmt_ci(_record(root, name), "roc_auc") in md
    a = metrics.read_predictions(root / "reports/predictions/vgg16.csv")
    b = metrics.read_predictions(root / "reports/predictions/baseline.csv")
    res = metrics.mcnemar_exact(a["y_true"], a["pred"], b["pred"])
    boot = metrics.paired_bootstrap_auc(a["y_true"].to_numpy(), a["prob"].to_numpy(), b["prob"].to_numpy(),
                                        a["patient_id"].to_numpy(), n_resamples=50, seed=0)
    section = md.split("### Against the baseline", 1)[1].split("###", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| vgg16 | "))
    assert f"{boot.difference:+.3f} [{boot.interval.low:+.3f}, {boot.interval.high:+.3f}]" in row
    assert f"| {res.b} / {res.c}, {report.fmt_p(res.p_value)} [" in row
    n = pd.read_csv(root / "data/split/splits.csv").query("split == 'test'")
    assert f"**{len(n)} scans of {n['patient_id'].nunique()} patients**" in md


def _vs_baseline(rendered: dict) -> list[report.Comparison]:
    """Every model of the rendered fixture against the baseline, as the report compares them."""
    root, params = rendered["root"], rendered["params"]
    results = report.load_results([*params.train.models, "baseline"], _inputs(root), params.data.classes)
    return report.comparison_family(results, "baseline", root / "reports/predictions", n_resamples=50, seed=0)


def test_claims_follow_from_the_paired_interval(rendered: dict) -> None:
    """A verdict "beats" appears exactly where the paired patient-bootstrap interval excludes 0 and the family's
    Holm-adjusted p-value is below 0.05."""
    md, family = rendered["md"], _vs_baseline(rendered)
    for c in family:
        low, high = c.bootstrap.interval.low, c.bootstrap.interval.high
        wins = (low > 0 or high < 0) and c.bootstrap_p_holm < report.ALPHA
        expected = "beats" if wins else "not shown to differ"
        assert expected in c.verdict, (c.model, low, high, c.bootstrap_p_holm)
        assert f"{c.model} vs baseline: ΔROC-AUC" in md and c.verdict in md
    pure_noise = next(c for c in family if c.model == "vgg16")
    assert "baseline beats vgg16" == pure_noise.verdict  # SIGNAL: vgg16 is noise, the baseline is not


def test_an_interval_excluding_zero_claims_nothing_when_holm_disagrees(rendered: dict) -> None:
    """Among several comparisons, an unadjusted interval that excludes 0 is not a win unless Holm's p agrees."""
    import dataclasses

    c = next(c for c in _vs_baseline(rendered) if c.excludes_zero)
    assert "beats" in dataclasses.replace(c, bootstrap_p_holm=0.01).verdict
    held = dataclasses.replace(c, bootstrap_p_holm=0.2).verdict
    assert "beats" not in held and "after Holm adjustment" in held and "0.200" in held


def test_html_is_self_contained(rendered: dict) -> None:
    html = rendered["html"]
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html, flags=re.IGNORECASE)
    assert len(refs) >= 5  # ROC, PR, calibration, confusion, training curves
    assert all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs]
    assert not re.search(r"<(?:link|script|iframe)\b", html, flags=re.IGNORECASE)
    assert "<table>" in html and "&lt;binary&gt;" in html  # tables rendered; manifest text escaped


def test_protocol_targets_patient_level_and_curves(rendered: dict) -> None:
    md = rendered["md"]
    assert "Protocol: **kfold**, 3 patient-grouped, stratified folds" in md
    assert "### Patient level (the clinical view)" in md and "| Patients |" in md
    assert "## Targets: does every CNN learn" in md
    target_rows = [line for line in md.splitlines() if line.startswith("| cnn21 (`cnn21`) |")]
    assert target_rows and target_rows[0].rstrip().endswith(("| met |", "| **not met** |"))
    assert any(line.startswith("| vgg16 (`vgg16_bn`) |") for line in md.splitlines())  # the variant that ran
    assert "ROC-AUC per fold, mean ± SD" in md
    assert "Training and validation loss" in md  # the curves of every model and fold


def test_paper_section_sets_the_leaky_replay_against_its_matched_control(rendered: dict) -> None:
    md = rendered["md"]
    assert "TP 104, FN 5, FP 1, TN 100" in md and "210 = 6 × 35" in md
    assert "This is a hypothesis from arithmetic, not a finding" in md
    header = next(line for line in md.splitlines() if line.startswith("| Metric | Naeem et al. 2025 (reported) |"))
    for column in ("Leaky, its 120 test copies", "Leaky, 37 matched scans", "Control, same scans",
                   "Inflation: leaky − control [paired 95 % CI]"):
        assert column in header, column
    for key in ("Accuracy", "F1", "Precision (PPV)", "Recall (sensitivity)", "ROC-AUC"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {key} | ") and "[" in line
                   and line.count("|") == 7)
        assert row.count("[") == 4, row  # the leaky run twice, the control, the paired inflation
    auc_row = next(line for line in md.splitlines() if line.startswith("| ROC-AUC | ") and line.count("|") == 7)
    assert auc_row.rstrip().endswith("| +0.090 [+0.030, +0.150] |")
    # Words follow the numbers: the paired interval excludes 0 here.
    assert "an inflation of +0.090 [+0.030, +0.150] whose paired interval excludes 0" in md
    assert "not shown" not in md.split("The evidence:")[1].split("This pipeline rules")[0]
    assert "For reference only, the pipeline's honest cnn21" in md and "What it does not show" in md


@pytest.mark.parametrize("interval, words", [
    ((-0.02, 0.2), "its paired interval includes 0, so an inflation of ROC-AUC by augmenting before splitting is "
                   "not shown on these 37 scans"),
    ((0.01, 0.2), "whose paired interval excludes 0."),
    ((-0.2, -0.01), "on this cohort the leak does not inflate ROC-AUC"),
], ids=["includes_0", "above_0", "below_0"])
def test_replay_words_follow_the_paired_interval(tmp_path: Path, interval: tuple[float, float], words: str) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    write_fake_replay(tmp_path / "reports/replay", inflation_ci=interval)
    markdown, _ = report.render(report.build_context(params, _inputs(tmp_path)))
    assert words in markdown


@pytest.mark.parametrize("interval, verdict", [
    ((-0.02, 0.2), "not shown"), ((0.0, 0.2), "not shown"), ((0.01, 0.2), "inflates"), ((-0.2, -0.01), "lowers"),
    ((None, None), "not shown"),
], ids=["includes_0", "touches_0", "above_0", "below_0", "undefined"])
def test_load_replay_reads_both_runs_and_judges_the_inflation_by_its_interval(tmp_path: Path, interval,
                                                                              verdict: str) -> None:
    write_fake_replay(tmp_path, inflation_ci=interval)
    loaded = report.load_replay(tmp_path)
    assert loaded.enabled and loaded.verdict == verdict
    assert loaded.leaky["n_test_images"] == 120 and loaded.matched["roc_auc"] == 0.97
    assert loaded.control["roc_auc"] == 0.88 and loaded.inflation["roc_auc"] == pytest.approx(0.09)


def test_load_replay_disabled_missing_and_mismatched(tmp_path: Path) -> None:
    assert report.load_replay(tmp_path) is None  # no replay stage
    (tmp_path / "leaky_replay_metrics.json").write_text(json.dumps({"enabled": False}))
    assert report.load_replay(tmp_path) == report.Replay(False, {"enabled": False})
    write_fake_replay(tmp_path)
    path = tmp_path / "matched_control_metrics.json"
    record = json.loads(path.read_text())
    record["n_test"] = 36  # the control scored other scans than the leaky run
    path.write_text(json.dumps(record))
    with pytest.raises(report.ReportInputError, match="scored on different scans"):
        report.load_replay(tmp_path)
    path.unlink()
    with pytest.raises(report.ReportInputError, match=r"matched_control_metrics\.json: missing.*rerun the replay"):
        report.load_replay(tmp_path)


def test_replay_without_its_matched_control_is_refused(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    (tmp_path / "reports/replay/matched_control_metrics.json").unlink()
    with pytest.raises(report.ReportInputError, match=r"matched_control_metrics\.json: missing.*rerun the replay"):
        report.build_context(params, _inputs(tmp_path))


def test_data_summary_lineage_and_burned_in_text(rendered: dict) -> None:
    md = rendered["md"]
    assert "truncated: pixel data ends early \\| &lt;binary&gt;" in md and "`ffffffffffff`" in md
    assert "normal/broken.dcm" not in md  # quarantined files are named by hash only
    assert "1 of 1 banner files caught, 0 missed, 0 false alarm(s)" in md
    assert "patients found in two parts of one fold here: 0" in md
    assert "| train@cnn21 | `models/cnn21` | `def456.dir` |" in md and "not-lineage" not in md
    assert "| cnn21 | runcnn21 | 0: `shacnn21" in md
    assert "These results come from the embedded synthetic cohort" in md
    # The data card: labels found -> classes, per class, formats and sizes, where patients come from.
    card = md.split("## Data", 1)[1].split("## Lineage", 1)[0]
    assert "| Label found | Files | → class |" in card and "| normal | " in card
    assert "Image size (original pixels): width 384–384" in card and "pixel spacing 0.50–0.50 mm" in card
    assert "name their patient in the DICOM header" in card


def test_report_logs_the_data_stage_metrics_to_mlflow(rendered: dict) -> None:
    from spinedxa import tracking

    root, params = rendered["root"], rendered["params"]
    runs = tracking.find_runs(params.runtime.mlflow_experiment, uri=f"sqlite:///{root / 'mlflow.db'}")
    data = [r for r in runs if r["run_name"] == "data"]
    assert len(data) == 1
    assert data[0]["metrics"]["ingest.n_files"] == json.loads((root / "reports/ingest.json").read_text())["n_files"]
    assert "split.folds.0.test.total" in data[0]["metrics"]


def test_missing_metrics_file_fails_with_its_name(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    (tmp_path / "reports/metrics/vgg19.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics/vgg19\.json: missing.*evaluate@vgg19"):
        report.build_context(params, _inputs(tmp_path))


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
    assert "vgg16: roc_auc 10" in markdown and "n/a [n/a]" in html


def test_predictions_of_different_scans_are_rejected(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    path = tmp_path / "reports/predictions/resnet50.csv"
    pd.read_csv(path).iloc[1:].to_csv(path, index=False)
    with pytest.raises(report.ReportInputError, match="cover different scans"):
        report.build_context(params, _inputs(tmp_path))


def test_disabled_or_missing_replay_is_said_plainly(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    (tmp_path / "reports/replay/leaky_replay_metrics.json").write_text(json.dumps({"enabled": False}))
    markdown, _ = report.render(report.build_context(params, _inputs(tmp_path)))
    assert "The replay ablation is disabled" in markdown
    (tmp_path / "reports/replay/leaky_replay_metrics.json").unlink()
    markdown, _ = report.render(report.build_context(params, _inputs(tmp_path)))
    assert "outputs were not found" in markdown


def _inputs(root: Path) -> report.ReportInputs:
    return report.ReportInputs(
        root / "reports/metrics", root / "reports/predictions", root / "reports/plots", root / "reports/train",
        root / "data/ingested/manifest.csv", root / "data/split/splits.csv", root / "reports/validation.json",
        root / "reports/ingest.json", root / "reports/split.json", root / "reports/replay",
        truth=root / "data/truth/synthetic_truth.csv", repo=root, provenance_dir=root / "reports/provenance",
        external_predictions_dir=root / "reports/predictions/external", external_reports=root / "reports/external",
        external_data=root / "data/external",
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


# ------------------------------------------------------------------------------------------ the external cohort


def test_external_cohort_sits_beside_the_out_of_fold_results(rendered: dict) -> None:
    root, md = rendered["root"], rendered["md"]
    section = md.split("## External cohort: the lockbox", 1)[1].split("\n## ", 1)[0]
    for name in [*rendered["params"].train.models, "baseline"]:
        record = _record(root, name)
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} | "))
        assert report.fmt_ci(record, "roc_auc") in row and report.fmt_ci(record, "external_roc_auc") in row
        assert f"| {record['external_n']} / {record['external_patients']} |" in row
    # Paired comparisons on the external cohort: the same scans, a patient bootstrap.
    a = metrics.read_predictions(root / "reports/predictions/external/cnn21.csv")
    b = metrics.read_predictions(root / "reports/predictions/external/baseline.csv")
    boot = metrics.paired_bootstrap_auc(a["y_true"].to_numpy(), a["prob"].to_numpy(), b["prob"].to_numpy(),
                                        a["patient_id"].to_numpy(), n_resamples=50, seed=0)
    row = next(line for line in section.splitlines() if line.startswith("| cnn21 | ") and "[" in line
               and line.count("|") == 7)
    assert f"{boot.difference:+.3f} [{boot.interval.low:+.3f}, {boot.interval.high:+.3f}]" in row
    assert "No choice of any kind was made on it" in section
    card = md.split("**External cohort (`", 1)[1]
    assert "photometric MONOCHROME1 40" in card


def test_without_an_external_cohort_the_report_says_so(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10, external=False))
    markdown, _ = report.render(report.build_context(params, _inputs(tmp_path)))
    assert "No external cohort was scored" in markdown and "External cohort (`" not in markdown


# ------------------------------------------------------------------------------------------ other cohorts, tasks


def test_words_follow_the_cohort(tmp_path: Path) -> None:
    """A knee radiograph cohort is never called spine DXA; the paper's column belongs to its own (binary) task."""
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10, external=False, data={
        "source": "data/raw/knees", "name": "public knee radiograph set", "anatomy": "knee",
        "modality": "radiograph", "class_map": {"osteopenia": "osteoporosis"}}))
    markdown, html = report.render(report.build_context(params, _inputs(tmp_path)))
    assert markdown.startswith("# Osteoporosis vs normal in the public knee radiograph set: 5 CNNs")
    assert "<title>Osteoporosis vs normal in the public knee radiograph set</title>" in html
    assert "spine" not in markdown.lower().replace("spinedxa", "") and "dxa" not in markdown.lower().replace(
        "spinedxa", "")
    assert "anatomy: knee; modality: radiograph" in markdown
    assert "osteopenia -> osteoporosis" in markdown  # the label map, in words
    assert "These results come from public knee radiograph set" in markdown


def test_three_who_classes_report_per_class_and_macro_results(tmp_path: Path) -> None:
    who = ("normal", "osteopenia", "osteoporosis")
    params = load_params(write_fake_outputs(tmp_path, bootstrap=20, classes=who))
    context = report.build_context(params, _inputs(tmp_path))
    markdown, html = report.render(context)
    assert "ordinal, 3 classes: normal < osteopenia < osteoporosis" in markdown
    table = markdown.split("## Out-of-fold metrics", 1)[1].split("###", 1)[0]
    for label in ("ROC-AUC (macro, one-vs-rest)", "Quadratic-weighted kappa", "Balanced accuracy",
                  "ROC-AUC, osteopenia vs rest", "Recall of osteopenia", "F1 (macro)"):
        assert f"| {label} |" in table, label
    assert "Naeem" not in table  # the paper's column belongs to the binary task
    record = _record(tmp_path, "cnn21")
    assert report.fmt_ci(record, "kappa_quadratic") in table and report.fmt_ci(record, "roc_auc_osteopenia") in table
    confusion = markdown.split("### Confusion matrices", 1)[1].split("## ", 1)[0]
    assert "| actual \\ predicted | normal | osteopenia | osteoporosis |" in confusion
    assert f"| osteopenia | {record['confusion']['osteopenia']['normal']} | " in confusion
    comparisons = markdown.split("### Against the baseline", 1)[1].split("###", 1)[0]
    assert "macro ROC-AUC" in comparisons and "| n/a |" in comparisons  # no DeLong for a macro AUC
    assert context["external_results"] and "External macro ROC-AUC" in markdown
    assert "<table>" in html


# ------------------------------------------------------------------------------------------- transfer


def write_fake_transfer(root: Path, intervals: dict[str, tuple[float, float]]) -> None:
    """reports/transfer.json and reports/transfer/details.json (spinedxa/contracts/transfer.py): cnn21 pre-trained
    against scratch with the given ΔAUC interval per cohort; ImageNet not available."""
    def delta(low: float, high: float) -> dict:
        return {"roc_auc": (low + high) / 2, "ci_low": low, "ci_high": high, "ci_skipped": 0, "se": 0.02,
                "p_value": 0.5, "n_scans": 60, "n_patients": 50}

    record = {"enabled": True, "bootstrap_resamples": 50, "bootstrap_seed": 0, "trainings": 15, "wall_seconds": 600.0,
              "small": {"size": 60, "draws": 3, "n_scans": [60, 61, 59], "n_patients": [52, 50, 51]},
              "pretrain": {"cnn21": {"wall_seconds": 90.0, "cpu_seconds": 60.0, "pool_scans": 600, "epochs": 12,
                                     "val_r": 0.86, "val_auc_osteoporosis": 0.96}},
              "models": {"cnn21": {
                  "scratch": {"available": True, "full_roc_auc": 0.91, "small_roc_auc": 0.8, "small_draw_roc_auc": [],
                              "external_roc_auc": 0.85},
                  "pretrained": {"available": True, "full_roc_auc": 0.93, "small_roc_auc": 0.86,
                                 "small_draw_roc_auc": [], "external_roc_auc": 0.84,
                                 "delta": {c: delta(*i) for c, i in intervals.items()}},
                  "imagenet": {"available": False}}}}
    (root / "reports/transfer").mkdir(parents=True, exist_ok=True)
    (root / "reports/transfer.json").write_text(json.dumps(record))
    details = {"enabled": True, "cpu": "AMD EPYC test", "conditions": {"cnn21": {
        "scratch": {"available": True, "reason": ""}, "pretrained": {"available": True, "reason": ""},
        "imagenet": {"available": False, "reason": "cnn21 has no ImageNet weights (torchvision publishes none)"}}},
        "pretraining_saw": {"cnn21": {"pool_seed": 31, "pool_scanner": "the training cohort's scanner (synthesize)",
                                      "pool_disjoint_from": {"synthesize.seed": 20251712,
                                                             "synthesize.external.seed": 20261206},
                                      "target": "t_score", "cpu": "AMD EPYC test", "fast_path": "fp32"}}}
    (root / "reports/transfer/details.json").write_text(json.dumps(details))


def _transfer_inputs(root: Path) -> report.ReportInputs:
    import dataclasses

    return dataclasses.replace(_inputs(root), transfer=root / "reports/transfer.json",
                               transfer_details=root / "reports/transfer")


def test_transfer_section_words_follow_each_interval(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    write_fake_transfer(tmp_path, {"full": (0.01, 0.05), "small": (-0.02, 0.1), "external": (-0.08, -0.01)})
    markdown, html = report.render(report.build_context(params, _transfer_inputs(tmp_path)))
    section = markdown[markdown.index("## Transfer"):markdown.index("## The paper's figures")]
    row = next(line for line in section.splitlines() if line.startswith("| cnn21 | pretrained |"))
    assert "+0.030 [+0.010, +0.050] **helps** (0.910 → 0.930)" in row
    assert "+0.040 [-0.020, +0.100] *not shown to help* (0.800 → 0.860)" in row
    assert "-0.045 [-0.080, -0.010] **hurts** (0.850 → 0.840)" in row
    assert "| cnn21 | imagenet | not available here |" in section
    assert "cnn21, imagenet: cnn21 has no ImageNet weights" in section
    assert "pretrain.seed` = 31" in section and "never saw a scan of the cohort" in section
    assert "more data from the same generator" in section  # the default cohort is the synthetic one
    assert "**Cost** on AMD EPYC test: pretraining cnn21 1.50 min" in section and "15 fold trainings" in section
    assert "Transfer: does pretraining help?" in html


@pytest.mark.parametrize("delta, verdict", [
    ({"ci_low": 0.001, "ci_high": 0.1}, "helps"), ({"ci_low": 0.0, "ci_high": 0.1}, "not shown to help"),
    ({"ci_low": -0.1, "ci_high": -0.001}, "hurts"), ({"ci_low": None, "ci_high": None}, "n/a"), (None, "n/a"),
])
def test_transfer_verdict(delta: dict | None, verdict: str) -> None:
    assert report.transfer_verdict(delta) == verdict


def test_transfer_disabled_or_absent(tmp_path: Path) -> None:
    params = load_params(write_fake_outputs(tmp_path, bootstrap=10))
    markdown, _ = report.render(report.build_context(params, _inputs(tmp_path)))
    assert "## Transfer" not in markdown  # no transfer stage: no section
    (tmp_path / "reports/transfer.json").write_text(json.dumps({"enabled": False}))
    markdown, _ = report.render(report.build_context(params, _transfer_inputs(tmp_path)))
    assert "Not run here (`transfer.enabled: false`" in markdown
    (tmp_path / "reports/transfer.json").write_text(json.dumps({"enabled": True}))
    with pytest.raises(report.ReportInputError, match=r"transfer.json: missing key"):
        report.build_context(params, _transfer_inputs(tmp_path))
