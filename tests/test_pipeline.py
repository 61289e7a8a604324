"""End-to-end: the whole DAG under `dvc repro` on the tiny profile, in a temporary git copy of the repository.

Part of `make test` (not marked slow): this is the whole-DAG smoke test of the fold protocol. The steps share one
repository (building it costs a few minutes on 2 cores) through module-scoped fixtures, each of which brings the
repository to the state its tests need, so every test also passes alone (`pytest -k <name>`):
`pipeline` (first repro) -> `rerun` (a second repro does nothing) -> `changed` (one model's learning rate re-runs
only that model, committed) -> `dvc metrics/plots diff`, `dvc exp run -S`, the audit, MLflow.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import discard_after, make_repo_copy, run
from spinedxa.config import load_params

STAGE_RAN = re.compile(r"Running stage '([^']+)'")


def repro(repo: Path, *args: str) -> set[str]:
    """Run `dvc repro` and return the names of the stages that actually ran."""
    proc = run(["dvc", "repro", *args], repo, env={"MLFLOW_TRACKING_URI": ""})
    return set(STAGE_RAN.findall(proc.stdout + proc.stderr))


def set_param(repo: Path, dotted: str, value) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    node = raw
    *head, last = dotted.split(".")
    for key in head:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, request) -> dict:
    repo = make_repo_copy(discard_after(request, tmp_path_factory.mktemp("pipeline")) / "repo")
    ran = repro(repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    return {"repo": repo, "first": ran, "params": load_params(repo / "params.yaml"), "commit": commit}


@pytest.fixture(scope="module")
def second_clone(pipeline, tmp_path_factory, request) -> Path:
    """A fresh clone of the first run's commit, reproduced from nothing with another de-identification key (its
    pseudonyms all differ), on this machine."""
    clone = discard_after(request, tmp_path_factory.mktemp("clone")) / "repo"
    run(["git", "clone", "-q", str(pipeline["repo"]), str(clone)], clone.parent)
    run(["git", "checkout", "-q", pipeline["commit"]], clone)
    run(["dvc", "repro"], clone, env={"MLFLOW_TRACKING_URI": "", "SPINEDXA_DEID_KEY": "another-clone-another-key"})
    return clone


@pytest.fixture(scope="module")
def rerun(pipeline) -> set[str]:
    """Stages a second `dvc repro` runs (none)."""
    return repro(pipeline["repo"])


@pytest.fixture(scope="module")
def changed(pipeline, rerun) -> set[str]:
    """Change vgg16's learning rate, repro, commit; the stages that ran."""
    repo = pipeline["repo"]
    set_param(repo, "train.vgg16.lr", 0.0003)
    ran = repro(repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "vgg16 lr 3e-4"], repo)
    return ran


def test_first_repro_runs_every_stage(pipeline):
    repo, params = pipeline["repo"], pipeline["params"]
    expected = {"synthesize", "ingest", "validate", "external", "split", "augment", "baseline", "replay", "pretrain",
                "transfer", "report"}
    expected |= {f"train@{m}" for m in params.train.models} | {f"evaluate@{m}" for m in params.train.models}
    assert pipeline["first"] == expected
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == expected
    html = (repo / "reports/comparison.html").read_text()
    assert all(m in html for m in params.train.models)


def test_every_file_gets_a_row_and_banner_copies_are_quarantined(pipeline):
    repo, params = pipeline["repo"], pipeline["params"]
    truth = pd.read_csv(repo / "data/truth/synthetic_truth.csv")
    manifest = pd.read_csv(repo / "data/ingested/manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == len(truth)  # the scans plus the burned-in banner copies, each exactly once
    assert manifest["source"].is_unique
    joined = manifest.merge(truth[["source", "burned_in"]], on="source")
    banner = joined["burned_in"].astype(bool)
    assert banner.sum() >= 1
    assert (joined.loc[banner, "reason"].str.startswith("burned_in_text")).all()
    assert (joined.loc[~banner, "status"] == "accepted").all()
    assert int((manifest["status"] == "accepted").sum()) == params.synthesize.n_scans


def test_every_scan_is_scored_once_out_of_fold(pipeline):
    repo, params = pipeline["repo"], pipeline["params"]
    splits = pd.read_csv(repo / "data/split/splits.csv", dtype=str, keep_default_na=False)
    assert splits.groupby(["fold", "patient_id"])["split"].nunique().max() == 1  # one role per patient and fold
    tests = splits[splits["split"] == "test"]
    assert tests["source"].is_unique and set(tests["source"]) == set(splits["source"])
    for model in [*params.train.models, "baseline"]:
        metrics = json.loads((repo / f"reports/metrics/{model}.json").read_text())
        assert metrics["n_test"] == params.synthesize.n_scans, model
        assert metrics["protocol"] == "kfold" and metrics["folds"] == params.split.folds
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
            assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], (model, key)
        predictions = pd.read_csv(repo / f"reports/predictions/{model}.csv")
        assert set(predictions["source"]) == set(tests["source"]), model
        fold_of = tests.set_index("source")["fold"].astype(int)
        assert (predictions.set_index("source")["fold"] == fold_of.loc[predictions["source"]].to_numpy()).all()
    for model in params.train.models:
        for fold in range(params.split.folds):
            assert (repo / f"models/{model}/fold{fold}/model.pt").stat().st_size > 0


def test_second_repro_runs_nothing(pipeline, rerun):
    assert rerun == set()
    status = run(["dvc", "status", "--json"], pipeline["repo"]).stdout
    assert json.loads(status) == {}


def test_mlflow_has_a_parent_run_per_model_with_a_nested_run_per_fold(pipeline):
    from spinedxa import tracking

    repo, params = pipeline["repo"], pipeline["params"]
    runs = tracking.find_runs(params.runtime.mlflow_experiment, uri=f"sqlite:///{repo / 'mlflow.db'}")
    names = [r["run_name"] for r in runs]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    split_md5 = next(o["md5"] for o in lock["stages"]["split"]["outs"] if o["path"] == "data/split/splits.csv")
    for model in [*params.train.models, "baseline"]:
        parents = [r for r in runs if r["run_name"] == model]
        assert len(parents) == 1, (model, names)
        parent = parents[0]
        assert parent["status"] == "FINISHED" and "test_roc_auc" in parent["metrics"], model
        folds = [r for r in runs if r["run_name"].startswith(f"{model}/fold")]
        assert len(folds) == params.split.folds, (model, names)
        assert all(r["parent_run_id"] == parent["run_id"] for r in folds)
        if model != "baseline":
            assert parent["tags"]["dvc_stage"] == f"train@{model}"
            assert split_md5 in {d["digest"] for d in parent["datasets"]}, f"{model}: split not logged with its hash"
            assert all(r["models"] for r in folds), f"{model}: a fold logged no model"
            assert all("val_loss" in r["metrics"] for r in folds)
    data = [r for r in runs if r["run_name"] == "data"]
    assert data and "ingest.n_files" in data[-1]["metrics"]  # every DVC metric is also in MLflow


def test_changing_one_learning_rate_reruns_only_that_model(changed):
    assert changed == {"train@vgg16", "evaluate@vgg16", "transfer", "report"}  # transfer: off, a second


def test_metrics_and_plots_diff_across_commits(pipeline, changed):
    repo = pipeline["repo"]
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], repo).stdout)
    assert diff.get("reports/metrics/vgg16.json"), diff
    assert all(not k.startswith("reports/metrics/cnn21") for k in diff)
    assert all("replay" not in k for k in diff)  # the leaky ablation is never a DVC metric
    params_diff = json.loads(run(["dvc", "params", "diff", "HEAD~1", "--json"], repo).stdout)
    assert params_diff["params.yaml"]["train.vgg16.lr"]["new"] == 0.0003
    out = repo / "plots_diff"
    run(["dvc", "plots", "diff", "HEAD~1", "-o", str(out)], repo)
    assert (out / "index.html").stat().st_size > 0


def test_audit_verifies_every_fold_and_finds_no_leak(pipeline, changed):
    repo = pipeline["repo"]
    lineage = run(["spinedxa", "audit", "reports/metrics/cnn21.json", "--json"], repo)
    assert json.loads(lineage.stdout)["ok"] is True
    leakage = run(["spinedxa", "audit", "--leakage", "--json"], repo)
    assert json.loads(leakage.stdout)["ok"] is True


@pytest.mark.slow  # one more training of the tiny DAG (~1 min); the profile overlay it runs is tested in test_cli.py
def test_exp_run_with_set_param_is_listed(pipeline, changed):
    repo = pipeline["repo"]
    run(["dvc", "exp", "run", "-n", "cnn21-lr2e-3", "-S", "train.cnn21.lr=0.002"], repo)
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = json.dumps(show)
    assert "cnn21-lr2e-3" in names
    assert "0.002" in names


@pytest.mark.slow  # a second whole DAG run (~5 min on 2 cores)
def test_a_second_clone_with_another_key_gives_byte_identical_metrics(pipeline, second_clone):
    """Issue 17: an identical re-run (same CPU kind, another clone, another de-identification key) leaves every DVC
    metrics file byte-identical and `dvc metrics diff` empty; only the keyed pseudonyms differ."""
    repo = pipeline["repo"]
    lock = yaml.safe_load((second_clone / "dvc.lock").read_text())
    metric_files = sorted({o for st in yaml.safe_load((second_clone / "dvc.yaml").read_text())["stages"].values()
                           for o in [next(iter(m)) if isinstance(m, dict) else m for m in st.get("metrics", [])]})
    metric_files = [p if m is None else p.replace("${item.model}", m) for p in metric_files
                    for m in (pipeline["params"].train.models if "${item.model}" in p else [None])]
    assert len(metric_files) >= 12 and lock
    committed = {p: run(["git", "show", f"{pipeline['commit']}:{p}"], repo).stdout for p in metric_files}
    for path in metric_files:
        assert (second_clone / path).read_text() == committed[path], path
    assert run(["dvc", "metrics", "diff", "--json"], second_clone).stdout.strip() in ("{}", "")
    # The pseudonyms are keyed by design (README): they differ, and so does nothing else in the predictions.
    # The first run's committed predictions, not its workspace: `dvc exp run` (a test above) applies its experiment
    # there.
    ours = pd.read_csv(io.StringIO(run(["git", "show", f"{pipeline['commit']}:reports/predictions/cnn21.csv"],
                                       repo).stdout))
    theirs = pd.read_csv(second_clone / "reports/predictions/cnn21.csv")
    assert set(ours["patient_id"]).isdisjoint(theirs["patient_id"])
    pd.testing.assert_frame_equal(ours.drop(columns="patient_id"), theirs.drop(columns="patient_id"))
