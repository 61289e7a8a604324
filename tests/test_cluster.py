"""Scale-out for real (docs/SCALE_OUT.md, workflow/cluster/): the tiny DAG through a one-node Slurm cluster, every job
logging to one MLflow server; the same DAG run locally as the reference; its results shared through an S3-compatible
DVC remote and pulled into a fresh clone.

Real components only: Debian's Slurm 22.05 (slurmctld, slurmd, munge), `mlflow server`, moto's S3 server, all on
loopback, started by the scripts in workflow/cluster/ and stopped by their pid files (down.sh), also when a test fails.
The heavy tests are `slow` (.ci/run's slow phase: `make cluster-test`, which also tears the daemons down in a trap).
Where Slurm cannot run (not root; packages missing and no apt-get) its tests skip, saying why; the DVC remote tests
still run. The stage and model lists come from dvc.yaml and params.yaml of the copy, never from this file.

Measured figures (wall times, job ids and states, push/pull times, the CPU) go to <state>/log/summary.json, printed at
the end of `make cluster-test`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from conftest import REPO, VENV_BIN, discard_after, make_repo_copy, run

from spinedxa import dag
from spinedxa.config import load_params

CLUSTER = REPO / "workflow" / "cluster"
PROFILE = REPO / "workflow" / "profiles" / "slurm-local" / "config.yaml"
#: Set by `make cluster-test` (workflow/cluster/cluster-test.sh): the state directory its trap tears down.
STATE_ENV = "SPINEDXA_CLUSTER_STATE"
STAGE_RAN = re.compile(r"Running stage '([^']+)'")
STAGE_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
SUMMARY: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def read_env_file(path: Path) -> dict[str, str]:
    """``export K=V`` lines of an env file an up script wrote (values without shell expansions)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^export (\w+)=(\S+)$", line.strip())
        if m and "$" not in m.group(2):
            out[m.group(1)] = m.group(2)
    return out


def up(script: str, state: Path) -> None:
    """Run ``workflow/cluster/<script> STATE``: exit 2 (cannot run on this machine) skips, any other failure fails
    with the script's output and the tail of every log it wrote."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(CLUSTER / script), str(state)], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode == 2:
        pytest.skip(f"{script}: {proc.stderr.strip()}")
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
                         for p in sorted((state / "log").glob("*")) if p.is_file())
        pytest.fail(f"{script} {state} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}")


def numbers(node: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON document (booleans excluded), keyed by its path."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in numbers(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in numbers(value, f"{prefix}{i}.").items()}
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {prefix.rstrip("."): node}
    return {}


def metric_files(repo: Path) -> list[str]:
    """The DVC metrics files of the DAG (from dvc.yaml through DVC: whatever stages it has)."""
    return sorted(o.path for s in dag.load_stages(repo) for o in s.outs if o.metric)


def timed(cmd: list[str], cwd: Path, **kw) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = run(cmd, cwd, **kw)
    return proc, round(time.perf_counter() - start, 1)


# ---------------------------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def services() -> Iterator[Path]:
    """The state directory of this module's daemons; everything started in it is stopped at the end (down.sh), and
    the stop itself is checked: no recorded process may survive it."""
    given = os.environ.get(STATE_ENV)
    # munged needs every directory above its socket to be traversable by all: not pytest's 0700 temporary tree.
    state = Path(given) if given else Path(tempfile.mkdtemp(prefix="spinedxa-cluster-", dir="/tmp"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)
    try:
        yield state
    finally:
        down = subprocess.run([str(CLUSTER / "down.sh"), str(state)], capture_output=True, text=True, timeout=300)
        if SUMMARY:
            SUMMARY["cpu"] = cpu_model()
            (state / "log").mkdir(parents=True, exist_ok=True)
            (state / "log" / "summary.json").write_text(json.dumps(SUMMARY, indent=2) + "\n")
        assert down.returncode == 0, f"down.sh {state}: {down.stdout}\n{down.stderr}"
        survivors = [p.stem for p in (state / "pids").glob("*.pid")] if (state / "pids").is_dir() else []
        assert survivors == [], f"still recorded as running after down.sh: {survivors}"


@pytest.fixture(scope="module")
def cluster(services: Path) -> dict[str, str]:
    """A one-node Slurm cluster and one MLflow server, up; the environment that talks to both."""
    up("slurm-up.sh", services)
    up("mlflow-up.sh", services)
    env = {
        "SLURM_CONF": str(services / "slurm.conf"),
        "PATH": os.pathsep.join([str(services / "bin"), str(VENV_BIN), os.environ.get("PATH", ""), "/usr/sbin"]),
        **read_env_file(services / "mlflow.env"),
    }
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    return env


@pytest.fixture(scope="module")
def s3(services: Path) -> dict[str, str]:
    """An S3-compatible server (moto) on loopback, and credentials for it in the environment only."""
    up("s3-up.sh", services)
    endpoint = read_env_file(services / "s3.env")["S3_ENDPOINT_URL"]
    return {"endpoint": endpoint, "AWS_ACCESS_KEY_ID": "spinedxa-lab",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20), "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------------------------------------------- the two runs


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The tiny DAG under `dvc repro` on this machine (the reference), committed."""
    repo = make_repo_copy(discard_after(request, tmp_path_factory.mktemp("local")) / "repo")
    proc, seconds = timed(["dvc", "repro"], repo, env={"MLFLOW_TRACKING_URI": ""}, timeout=2400)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results of the tiny DAG"], repo)
    SUMMARY["local_dvc_repro_s"] = seconds
    return {"repo": repo, "seconds": seconds, "ran": set(STAGE_RAN.findall(proc.stdout + proc.stderr))}


@pytest.fixture(scope="module")
def slurm_run(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> dict[str, Any]:
    """The tiny DAG through `snakemake --executor slurm` (profile slurm-local), then `dvc commit`."""
    repo = make_repo_copy(discard_after(request, tmp_path_factory.mktemp("slurm")) / "repo")
    cpus = run(["sinfo", "-h", "-o", "%c"], repo, env=cluster).stdout.split()
    assert cpus and cpus[0].isdigit(), cpus
    proc, seconds = timed(["snakemake", "--profile", "workflow/profiles/slurm-local", "--max-threads", cpus[0]],
                          repo, env=cluster, timeout=2700)
    _, commit_s = timed(["dvc", "commit", "--force"], repo)
    SUMMARY["slurm_snakemake_s"] = seconds
    SUMMARY["dvc_commit_after_slurm_s"] = commit_s
    return {"repo": repo, "seconds": seconds, "log": proc.stdout + proc.stderr}


def slurm_records(env: dict[str, str]) -> list[dict[str, str]]:
    """Every job the controller knows (MinJobAge keeps finished ones): id, state, name, comment (rule_<rule>)."""
    out = run(["squeue", "--states=all", "-h", "-o", "%i|%T|%j|%k"], REPO, env=env).stdout
    return [dict(zip(("id", "state", "name", "comment"), line.split("|"))) for line in out.splitlines() if line]


def jobcomp(state: Path) -> dict[str, dict[str, str]]:
    """The cluster's completion log (jobcomp/filetxt): JobId -> its fields."""
    path = state / "log" / "jobcomp.txt"
    rows = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines() if line.strip()]
    return {r["JobId"]: r for r in rows}


# ---------------------------------------------------------------------------------------------------- Slurm


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_stage_ran_as_a_slurm_job(slurm_run: dict, cluster: dict[str, str], services: Path) -> None:
    """One sbatch job per DVC stage, each COMPLETED in Slurm's own records (squeue and the jobcomp log), each with
    its job log, and every output of every stage on disk."""
    repo = slurm_run["repo"]
    stages = dag.load_stages(repo)
    rules = {s.rule for s in stages}
    jobs = [j for j in slurm_records(cluster) if j["comment"].startswith("rule_")]
    by_rule = {j["comment"].removeprefix("rule_"): j for j in jobs}
    assert len(by_rule) == len(jobs), f"a rule ran more than once: {sorted(j['comment'] for j in jobs)}"
    assert set(by_rule) == rules, f"not submitted: {sorted(rules - set(by_rule))}; unknown: {sorted(set(by_rule) - rules)}"
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    assert len({j["name"] for j in jobs}) == 1  # the plugin names every job of one run by its run id
    completed = jobcomp(services)
    for rule, job in by_rule.items():
        assert completed[job["id"]]["JobState"] == "COMPLETED", (rule, completed.get(job["id"]))
        shown = run(["scontrol", "show", "job", job["id"]], repo, env=cluster).stdout
        assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, shown
        log = repo / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job['id']}.log"
        assert "Finished jobid" in log.read_text(), log
    missing = [o.path for s in stages for o in s.outs if not (repo / o.path).exists()]
    assert missing == []
    SUMMARY["slurm_jobs"] = {rule: {"job_id": int(j["id"]), "state": j["state"],
                                    "run_s": _seconds(completed[j["id"]])} for rule, j in sorted(by_rule.items())}


def _seconds(record: dict[str, str]) -> int | None:
    from datetime import datetime

    try:
        return int((datetime.fromisoformat(record["EndTime"]) - datetime.fromisoformat(record["StartTime"]))
                   .total_seconds())
    except (KeyError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_dvc_commit_after_slurm_leaves_status_clean(slurm_run: dict) -> None:
    repo = slurm_run["repo"]
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {s.name for s in dag.load_stages(repo)}


#: Absolute tolerance for floats in the metrics (all on a 0-1 scale: rates, AUCs, Brier scores, their intervals and
#: fold SDs). The models are byte-identical, but Snakemake runs every job with OMP_NUM_THREADS=<rule threads> (1 for
#: evaluate) where `dvc repro` leaves torch all cores, and another thread count sums the fp32 inference in another
#: order: probability-based scores differ in the ninth decimal (measured: ResNet-50's Brier score and its interval
#: and fold SD, at most 3.8e-9 apart). Counts, ranks (ROC-AUC) and hashes are compared exactly.
FLOAT_ATOL = 1e-6


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_slurm_metrics_equal_the_local_run(slurm_run: dict, local_run: dict) -> None:
    """Same params, same CPU, same commands (Snakemake runs DVC's): every DVC metrics file has the same keys, the
    same integers and the same fold-model sha256 (byte-identical weights), and floats within FLOAT_ATOL."""
    slurm, local = slurm_run["repo"], local_run["repo"]
    files = metric_files(local)
    assert files and files == metric_files(slurm)
    worst = 0.0
    for path in files:
        a, b = json.loads((slurm / path).read_text()), json.loads((local / path).read_text())
        na, nb = numbers(a), numbers(b)
        assert na.keys() == nb.keys(), (path, sorted(na.keys() ^ nb.keys()))
        for key, x in na.items():
            y = nb[key]
            if isinstance(x, int) and isinstance(y, int):
                assert x == y, (path, key, x, y)
            else:
                assert math.isclose(x, y, rel_tol=0, abs_tol=FLOAT_ATOL), (path, key, x, y)
                worst = max(worst, abs(x - y))
        assert a.get("model_sha256") == b.get("model_sha256"), path
    SUMMARY["metrics_compared"] = {"files": files, "float_atol": FLOAT_ATOL, "max_abs_difference": worst}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_one_mlflow_server_holds_every_run_and_model(slurm_run: dict, cluster: dict[str, str]) -> None:
    """Every Slurm job logged to the one server: a parent run per model with a nested run per fold under it, all
    FINISHED, the parents the ones models/<model>/meta.json names; each fold's model is on the server, and a model
    loaded from it with mlflow.pyfunc predicts and holds exactly the weights DVC versions in models/."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from spinedxa import tracking

    repo = slurm_run["repo"]
    uri = cluster["MLFLOW_TRACKING_URI"]
    params = load_params(repo / "params.yaml")
    runs = tracking.find_runs(params.runtime.mlflow_experiment, uri=uri)
    assert {r["status"] for r in runs} == {"FINISHED"}
    parents = {r["run_name"]: r for r in runs if r["parent_run_id"] is None}
    client = MlflowClient(tracking_uri=uri)
    logged = client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name(params.runtime.mlflow_experiment).experiment_id])
    mlflow.set_tracking_uri(uri)
    for model in [*params.train.models, "baseline"]:
        parent = parents[model]
        folds = {r["run_name"]: r for r in runs if r["parent_run_id"] == parent["run_id"]}
        assert set(folds) == {f"{model}/fold{k}" for k in range(params.split.folds)}, (model, sorted(folds))
        assert "test_roc_auc" in parent["metrics"], model
        if model == "baseline":
            continue
        meta = json.loads((repo / "models" / model / "meta.json").read_text())
        assert meta["mlflow_run_id"] == parent["run_id"], model
        for k in range(params.split.folds):
            fold_run = folds[f"{model}/fold{k}"]
            found = [m for m in logged if m.source_run_id == fold_run["run_id"]]
            assert len(found) == 1, (model, k, found)
        # One fold per model is downloaded and loaded (the VGGs are ~130 MB each): the last fold.
        k = params.split.folds - 1
        model_id = next(m.model_id for m in logged if m.source_run_id == folds[f"{model}/fold{k}"]["run_id"])
        pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
        fold_meta = json.loads((repo / "models" / model / f"fold{k}" / "meta.json").read_text())
        batch = np.random.default_rng(0).random((2, 1, *fold_meta["input_shape"]), dtype=np.float32)
        out = np.asarray(pyfunc.predict(batch))
        assert out.shape == (2, len(params.data.classes)) and np.isfinite(out).all(), (model, out)
        served = pyfunc.get_raw_model().state_dict()
        versioned = torch.load(repo / "models" / model / f"fold{k}" / "model.pt", weights_only=True)
        assert served.keys() == versioned.keys(), model
        assert all(torch.equal(served[n].cpu(), versioned[n]) for n in versioned), model
    SUMMARY["mlflow_runs"] = len(runs)


# ---------------------------------------------------------------------------------------------------- DVC remote


@pytest.fixture(scope="module")
def shared(local_run: dict, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> dict[str, Any]:
    """The lab workflow of docs/SCALE_OUT.md: the results pushed to an S3 remote (credentials in the environment
    only), then a fresh `git clone` that `dvc pull`s them."""
    import boto3

    repo = local_run["repo"]
    creds = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                 region_name=creds["AWS_DEFAULT_REGION"]).create_bucket(Bucket="spinedxa-lab")
    run(["dvc", "remote", "add", "-d", "lab", "s3://spinedxa-lab/dvc"], repo)
    run(["dvc", "remote", "modify", "lab", "endpointurl", s3["endpoint"]], repo)
    run(["git", "commit", "-qam", "DVC remote: the lab's S3 bucket"], repo)
    push, push_s = timed(["dvc", "push", "-r", "lab"], repo, env=creds)
    clone = discard_after(request, tmp_path_factory.mktemp("lab")) / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], clone.parent)
    pull, pull_s = timed(["dvc", "pull"], clone, env=creds)
    SUMMARY["dvc_remote"] = {"push_s": push_s, "pull_s": pull_s, "push": push.stdout.strip().splitlines()[-1:],
                             "pull": pull.stdout.strip().splitlines()[-1:]}
    return {"repo": repo, "clone": clone, "creds": creds, "endpoint": s3["endpoint"], "push": push.stdout}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_push_stores_every_cached_object_in_the_bucket(shared: dict) -> None:
    import boto3

    creds = shared["creds"]
    client = boto3.client("s3", endpoint_url=shared["endpoint"], aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                          region_name=creds["AWS_DEFAULT_REGION"])
    keys = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="spinedxa-lab", Prefix="dvc/"):
        keys |= {o["Key"].removeprefix("dvc/") for o in page.get("Contents", [])}
    cache = shared["repo"] / ".dvc" / "cache"  # files/md5/<2>/<30>, the same layout as the remote
    cached = {p.relative_to(cache).as_posix() for p in (cache / "files").rglob("*") if p.is_file()}
    # The local cache holds more (the run cache keeps copies of the `cache: false` reports, which live in git):
    # the bucket holds exactly what `dvc push` said it pushed, all from the cache, and DVC finds nothing missing.
    pushed = re.search(r"(\d+) files? pushed", shared["push"])
    assert pushed and len(keys) == int(pushed.group(1)) > 0, shared["push"]
    assert keys <= cached
    cloud = run(["dvc", "status", "--cloud", "-r", "lab", "--json"], shared["repo"], env=creds)
    assert json.loads(cloud.stdout) == {}, cloud.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pulled_clone_is_clean_and_repro_trains_nothing(shared: dict) -> None:
    clone = shared["clone"]
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}
    proc = run(["dvc", "repro"], clone, env={"MLFLOW_TRACKING_URI": ""})
    text = proc.stdout + proc.stderr
    assert STAGE_RAN.findall(text) == []
    assert set(STAGE_SKIPPED.findall(text)) == {s.name for s in dag.load_stages(clone)}
    assert not (clone / "checkpoints").exists()  # nothing started training
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pulled_clone_diffs_metrics_and_audits_every_model(shared: dict) -> None:
    """On the pulled copy: the metrics are the ones committed (`dvc metrics diff` against HEAD is empty; against
    the commit before the results every metric is new), and every model's lineage audit passes on the pulled
    files (model hashes against meta.json and dvc.lock, split, manifest), as does the leakage audit."""
    clone, repo = shared["clone"], shared["repo"]
    assert json.loads(run(["dvc", "metrics", "diff", "--json"], clone).stdout) == {}
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone).stdout)
    assert shown == json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    before = run(["git", "rev-list", "--max-count=1", "HEAD", "--", "dvc.lock"], clone).stdout.strip() + "~1"
    diff = json.loads(run(["dvc", "metrics", "diff", before, "--json"], clone).stdout)
    files = metric_files(clone)
    assert set(diff) == set(files)
    assert all(v.get("old") is None and v.get("new") is not None for f in files for v in diff[f].values())
    params = load_params(clone / "params.yaml")
    for model in [*params.train.models, "baseline"]:
        audit = run(["spinedxa", "audit", f"reports/metrics/{model}.json", "--json"], clone, check=False)
        assert audit.returncode == 0 and json.loads(audit.stdout)["ok"] is True, (model, audit.stdout, audit.stderr)
    leakage = run(["spinedxa", "audit", "--leakage", "--json"], clone)
    assert json.loads(leakage.stdout)["ok"] is True


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_credentials_never_reach_a_committed_file(shared: dict) -> None:
    clone = shared["clone"]
    secret = shared["creds"]["AWS_SECRET_ACCESS_KEY"]
    grep = run(["git", "grep", "-I", "-l", secret, "HEAD"], clone, check=False)
    assert grep.returncode == 1 and grep.stdout == "", grep.stdout  # 1: no match
    config = (clone / ".dvc" / "config").read_text()
    assert "s3://spinedxa-lab/dvc" in config
    assert not re.search(r"access_key|secret", config, flags=re.I)


# ---------------------------------------------------------------------------------------------------- harness


def test_slurm_conf_template_fields_are_all_filled_by_slurm_up() -> None:
    fields = set(re.findall(r"@([A-Z_]+)@", (CLUSTER / "slurm.conf.in").read_text()))
    filled = set(re.findall(r'-e "s\|@([A-Z_]+)@\|', (CLUSTER / "slurm-up.sh").read_text()))
    assert fields and fields == filled


def test_slurm_local_profile_names_no_rule_and_asks_squeue() -> None:
    """The local cluster's profile must work for any DAG (no rule named) and without an accounting database."""
    cfg = yaml.safe_load(PROFILE.read_text())
    assert cfg["executor"] == "slurm" and cfg["slurm-status-command"] == "squeue"
    assert "set-threads" not in cfg and "set-resources" not in cfg
    assert "slurm_account" not in cfg["default-resources"]
    assert "mtime" not in cfg["rerun-triggers"]


def test_slurm_local_profile_dry_run_plans_every_stage(tmp_path: Path) -> None:
    repo = make_repo_copy(tmp_path / "repo")
    dry = run(["snakemake", "--profile", "workflow/profiles/slurm-local", "-n", "--max-threads", "2"], repo)
    planned = set(re.findall(r"^rule (\w+):$", dry.stdout + dry.stderr, flags=re.M))
    assert planned == {s.rule for s in dag.load_stages(repo)} | {"all"}  # all: the target, a local rule


def _bash(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'. "{CLUSTER}/lib.sh"; {script}', "lib", *args],
                          capture_output=True, text=True, timeout=60)


def test_down_stops_recorded_processes_and_nothing_else(tmp_path: Path) -> None:
    """down.sh stops what an up script recorded (with its process group), leaves a process whose pid file does not
    match its start time alone (a reused pid), and is a no-op the second time."""
    state = tmp_path / "state"
    started = _bash('start_bg "$(state_dir "$1")" sleeper bash -c "sleep 300 & wait"', str(state))
    assert started.returncode == 0, started.stderr
    pid = int((state / "pids" / "sleeper.pid").read_text())
    decoy = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # A stale record: the decoy's pid with another start time, as after a reboot or pid reuse.
        (state / "pids" / "stale.pid").write_text(f"{decoy.pid}\n")
        (state / "pids" / "stale.start").write_text("1\n")
        with (state / "pids" / "order").open("a") as f:
            f.write("stale\n")
        children = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2  # bash and its sleep, one process group
        down = subprocess.run([str(CLUSTER / "down.sh"), str(state)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert all(not Path(f"/proc/{c}").exists() or _zombie(int(c)) for c in children)
        assert decoy.poll() is None  # untouched
        again = subprocess.run([str(CLUSTER / "down.sh"), str(state)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and decoy.poll() is None
    finally:
        decoy.send_signal(signal.SIGTERM)
        decoy.wait(timeout=10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("script", ["slurm-up.sh", "mlflow-up.sh", "s3-up.sh", "down.sh"])
def test_scripts_refuse_a_missing_or_system_state_directory(script: str) -> None:
    for args in ([], ["/"], ["/etc"]):
        proc = subprocess.run([str(CLUSTER / script), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, (script, args, proc.stdout)
        assert proc.stderr.strip(), (script, args)
    assert not Path("/pids").exists() and not Path("/etc/pids").exists()


def test_gpu_check_fails_clearly_without_cuda(tmp_path: Path) -> None:
    """No GPU here: bench/gpu_check.sh must stop at once with a message saying so and write nothing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run bench/gpu_check.sh itself")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GPU_CHECK_OUT": str(out),
                               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "no CUDA device" in proc.stderr
    assert not out.exists()
