"""End-to-end: the whole DAG under `dvc repro` on the tiny profile, in a temporary git copy of the repository.

Part of `make test` (not marked slow): this is the issue's whole-DAG smoke test, about 5 minutes on 2 cores.
The steps share one repository (building it costs a few minutes on 2 cores), so they run in file order:
first repro → nothing to do on the second → one model's learning rate re-runs only that model →
metrics/plots diff across commits → `dvc exp run -S`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_repo_copy, run
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
def pipeline(tmp_path_factory) -> dict:
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo")
    ran = repro(repo)
    return {"repo": repo, "first": ran}


def test_first_repro_runs_every_stage(pipeline):
    repo = pipeline["repo"]
    params = load_params(repo / "params.yaml")
    expected = {"synthesize", "ingest", "validate", "split", "augment", "baseline", "report"}
    expected |= {f"train@{m}" for m in params.train.models} | {f"evaluate@{m}" for m in params.train.models}
    assert pipeline["first"] == expected
    manifest = pd.read_csv(repo / "data/ingested/manifest.csv")
    assert len(manifest) == params.synthesize.n_scans
    splits = pd.read_csv(repo / "data/split/splits.csv")
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    for model in [*params.train.models, "baseline"]:
        metrics = json.loads((repo / f"reports/metrics/{model}.json").read_text())
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
            assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], (model, key)
    for model in params.train.models:
        assert (repo / f"models/{model}/model.pt").stat().st_size > 0
    html = (repo / "reports/comparison.html").read_text()
    assert all(m in html for m in params.train.models)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == expected


def test_second_repro_runs_nothing(pipeline):
    assert repro(pipeline["repo"]) == set()
    status = run(["dvc", "status", "--json"], pipeline["repo"]).stdout
    assert json.loads(status) == {}


def test_mlflow_store_has_one_finished_run_per_model(pipeline):
    from spinedxa import tracking

    repo = pipeline["repo"]
    params = load_params(repo / "params.yaml")
    runs = tracking.find_runs(params.mlflow.experiment, uri=f"sqlite:///{repo / 'mlflow.db'}")
    by_model = {}
    for r in runs:
        by_model.setdefault(r["run_name"], []).append(r)
    assert set(by_model) >= set(params.train.models)
    for model in params.train.models:
        assert len(by_model[model]) == 1, model
        r = by_model[model][0]
        assert r["status"] == "FINISHED"
        assert r["params"]["lr"] == str(params.train.model(model).lr)
        assert "val_loss" in r["metrics"] and "test_roc_auc" in r["metrics"]
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        split_md5 = next(o["md5"] for o in lock["stages"]["split"]["outs"] if o["path"] == "data/split/splits.csv")
        assert split_md5 in {d["digest"] for d in r["datasets"]}, f"{model}: split not logged with its DVC hash"
        assert r["models"], f"{model}: no model logged"
        assert r["tags"]["dvc_stage"] == f"train@{model}"


def test_changing_one_learning_rate_reruns_only_that_model(pipeline):
    repo = pipeline["repo"]
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline run"], repo)
    set_param(repo, "train.vgg16.lr", 0.0003)
    assert repro(repo) == {"train@vgg16", "evaluate@vgg16", "report"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "vgg16 lr 3e-4"], repo)


def test_metrics_and_plots_diff_across_commits(pipeline):
    repo = pipeline["repo"]
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], repo).stdout)
    changed = diff.get("reports/metrics/vgg16.json", {})
    assert changed, diff
    assert all(not k.startswith("reports/metrics/cnn21") for k in diff)
    params_diff = json.loads(run(["dvc", "params", "diff", "HEAD~1", "--json"], repo).stdout)
    assert params_diff["params.yaml"]["train.vgg16.lr"]["new"] == 0.0003
    out = repo / "plots_diff"
    run(["dvc", "plots", "diff", "HEAD~1", "-o", str(out)], repo)
    assert (out / "index.html").stat().st_size > 0


def test_exp_run_with_set_param_is_listed(pipeline):
    repo = pipeline["repo"]
    run(["dvc", "exp", "run", "-n", "cnn21-lr2e-3", "-S", "train.cnn21.lr=0.002"], repo)
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = json.dumps(show)
    assert "cnn21-lr2e-3" in names
    assert "0.002" in names
