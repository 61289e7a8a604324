"""One DAG, two engines: spinedxa.dag, workflow/Snakefile, the Snakemake profiles and the DVC remote.

Three kinds of repository are used:
- a *mini* repo (two trivial stages, one with a matrix, written here) to run Snakemake for real in a second: rerun
  triggers, threads, the report;
- a tiny-profile *copy* of the project (conftest.make_repo_copy) to compare the real dvc.yaml with what Snakemake
  plans (dry runs only), to dry-run the cluster profile and to push/pull through the configured DVC remote;
- the same copy, slow test only, to run the five trainings in parallel against a real `mlflow server`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, make_repo_copy, run

from spinedxa import dag
from spinedxa.config import MODEL_NAMES, load_params
from spinedxa.files import sha256_file

SNAKEMAKE = str(VENV_BIN / "snakemake")
DVC = str(VENV_BIN / "dvc")
SNAKEFILE = REPO / "workflow" / "Snakefile"
PROFILES = REPO / "workflow" / "profiles"

# ---------------------------------------------------------------------------------------------------- helpers


def parse_dry_run(text: str) -> dict[str, dict]:
    """Jobs planned by ``snakemake -n --printshellcmds``: rule -> {input, output, threads, shell}."""
    jobs: dict[str, dict] = {}
    current: dict | None = None
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):$", line)
        if head:
            current = jobs.setdefault(head.group(1), {"input": [], "output": [], "threads": 1, "shell": None})
            continue
        if current is None:
            continue
        field = re.match(r"^    (input|output|threads): (.*)$", line)
        if field:
            key, value = field.groups()
            current[key] = int(value) if key == "threads" else value.split(", ")
        elif line.startswith("Shell command: "):
            current["shell"] = line.removeprefix("Shell command: ")
        elif not line.strip():
            current = None
    return jobs


def dot_edges(dot: str, names: dict[str, str] | None = None) -> set[tuple[str, str]]:
    """Edges (upstream, downstream) of a DOT graph by node name; ``names`` maps numeric node ids to labels."""
    names = names or {}
    edges = set()
    for a, b in re.findall(r'^\s*"?([\w@.]+)"?\s*->\s*"?([\w@.]+)"?', dot, flags=re.M):
        edges.add((names.get(a, a), names.get(b, b)))
    return edges


def snakemake(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run([SNAKEMAKE, *args], cwd, **kw)


# A two-verb DAG that runs in a second: a directory output with a nested dep, a metric, a matrix, a figure.
MINI_STEP = '''"""Copy SRC into every DEST: a directory gets manifest.csv, .png a 4x4 image, anything else the text."""
import sys
from pathlib import Path

from PIL import Image

text = Path(sys.argv[1]).read_text()
for dest in map(Path, sys.argv[2:]):
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.suffix:
        dest.mkdir(exist_ok=True)
        (dest / "manifest.csv").write_text(text)
    elif dest.suffix == ".png":
        Image.new("L", (4, 4), 128).save(dest)
    else:
        dest.write_text('{"n": %d}' % len(text) if dest.suffix == ".json" else text)
'''
MINI_DVC = {
    "stages": {
        "ingest": {
            "cmd": "python step.py src.txt data/ingested reports/ingest.json",
            "deps": ["step.py", "src.txt"],
            "params": ["ingest.max_side"],
            "outs": ["data/ingested"],
            "metrics": [{"reports/ingest.json": {"cache": False}}],
        },
        "evaluate": {
            "matrix": {"model": ["cnn21", "vgg16"]},
            "cmd": "python step.py data/ingested/manifest.csv reports/figures/gradcam_${item.model}.png",
            "deps": ["step.py", "data/ingested/manifest.csv"],
            "params": ["train.${item.model}.image_size"],
            "outs": [{"reports/figures/gradcam_${item.model}.png": {"cache": False}}],
        },
    }
}


def make_mini_repo(dest: Path) -> Path:
    """A git + DVC repository with the project's params.yaml and the two-verb MINI_DVC pipeline."""
    dest.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")
    (dest / "step.py").write_text(MINI_STEP)
    (dest / "src.txt").write_text("source,label\na.dcm,normal\n")
    (dest / "dvc.yaml").write_text(yaml.safe_dump(MINI_DVC, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run([DVC, "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    return dest


def mini_snakemake(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the project's Snakefile in ``repo`` with the local profile."""
    return snakemake(["--snakefile", str(SNAKEFILE), "--profile", str(PROFILES / "local"), *args], repo)


@pytest.fixture
def mini_repo(tmp_path: Path) -> Path:
    return make_mini_repo(tmp_path / "mini")


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-profile copy of the project, shared by the read-only (dry-run) tests of this module."""
    return make_repo_copy(tmp_path_factory.mktemp("workflow") / "repo")


# ---------------------------------------------------------------------------------------------------- spinedxa.dag


@pytest.mark.parametrize(
    ("stage", "rule"),
    [("ingest", "ingest"), ("train@cnn21", "train_cnn21"), ("evaluate@inception_v3", "evaluate_inception_v3"),
     ("train@resnet-50", "train_resnet_50"), ("fit@v1.2", "fit_v1_2")],
)
def test_rule_name_maps_dvc_addresses(stage: str, rule: str) -> None:
    assert dag.rule_name(stage) == rule


@pytest.mark.parametrize("stage", ["2fast", "train@a b", "train@x/y"])
def test_rule_name_rejects_what_snakemake_cannot_name(stage: str) -> None:
    with pytest.raises(dag.DagError, match=re.escape(repr(stage))):
        dag.rule_name(stage)


def _stage(name: str, deps=(), outs=(), params=None) -> dag.Stage:
    return dag.Stage(
        name=name, cmd=f"run {name}", deps=tuple(dag.Dep(d) for d in deps),
        outs=tuple(dag.Out(o, is_dir="." not in o) for o in outs), params=params or {},
    )


CHAIN = [
    _stage("ingest", deps=["raw"], outs=["data/ingested", "reports/ingest.json"]),
    _stage("split", deps=["data/ingested/manifest.csv", "src/split.py"], outs=["data/split/splits.csv"]),
    _stage("train@a", deps=["data/split/splits.csv", "data/ingested", "data/ingested/manifest.csv"], outs=["models/a"]),
    _stage("evaluate@a", deps=["models/a", "data/split/splits.csv"], outs=["reports/metrics/a.json"]),
]


@pytest.mark.parametrize(
    ("name", "inputs"),
    [
        ("ingest", ["raw"]),
        ("split", ["data/ingested", "src/split.py"]),  # nested dep -> the directory output that holds it
        ("train@a", ["data/split/splits.csv", "data/ingested"]),  # duplicates collapse, order kept
    ],
)
def test_snakemake_inputs_replace_nested_deps_by_their_directory(name: str, inputs: list[str]) -> None:
    assert dag.snakemake_inputs(dag.get_stage(CHAIN, name), CHAIN) == inputs


@pytest.mark.parametrize(
    ("name", "lineage"),
    [("ingest", ["ingest"]), ("train@a", ["ingest", "split", "train@a"]),
     ("evaluate@a", ["ingest", "split", "train@a", "evaluate@a"])],
)
def test_upstream_follows_deps_transitively(name: str, lineage: list[str]) -> None:
    assert [s.name for s in dag.upstream(CHAIN, name)] == lineage


def test_get_stage_names_the_known_stages() -> None:
    with pytest.raises(dag.DagError, match="no stage 'train@b'.*'train@a'"):
        dag.get_stage(CHAIN, "train@b")


@pytest.mark.parametrize(
    ("name", "runtime", "train_threads", "threads"),
    [
        ("train@cnn21", {"train_processes": 2}, 1, 2),  # two fold processes of one thread each
        ("train@cnn21", {"train_processes": 3}, 2, 6),
        ("train@cnn21", {}, 0, 1),  # never below one
        ("replay", {"train_processes": 3}, 1, 2),  # its two runs side by side: never more than two processes
        ("replay", {"train_processes": 1}, 2, 2),
        ("ingest", {"workers": 4}, 1, 4),
        ("synthesize", {"workers": 3}, 1, 3),
        ("validate", {"workers": 8, "train_processes": 8}, 8, 1),
    ],
)
def test_rule_threads_policy(name: str, runtime: dict, train_threads: int, threads: int) -> None:
    """The cores a job occupies come from the bookkeeping runtime section; they never change the numerics."""
    assert dag.rule_threads(_stage(name), runtime, train_threads) == threads


@pytest.mark.parametrize(
    ("params", "key", "value"),
    [
        ({"train.cnn21": {"lr": 0.1}}, "train.cnn21.lr", 0.1),
        ({"train": {"cnn21": {"lr": 0.1}}}, "train.cnn21.lr", 0.1),
        ({"train.seed": 3}, "train.seed", 3),
        ({"train.cnn21": {"lr": 0.1}}, "train.cnn21.epochs", None),
        ({"train.seed": 3}, "evaluate.seed", None),
    ],
)
def test_param_value_looks_inside_declared_blocks(params: dict, key: str, value) -> None:
    assert dag.param_value(_stage("x", params=params), key) == value


def test_load_stages_lets_dvc_resolve_matrix_templating_and_outputs(mini_repo: Path) -> None:
    stages = dag.load_stages(mini_repo)
    assert [s.name for s in stages] == ["ingest", "evaluate@cnn21", "evaluate@vgg16"]
    ingest, ev = stages[0], stages[2]
    assert ingest.outs == (
        dag.Out("data/ingested", is_dir=True),
        dag.Out("reports/ingest.json", is_dir=False, cache=False, metric=True),
    )
    assert ev.cmd.endswith("reports/figures/gradcam_vgg16.png")
    assert ev.dep_paths == ("step.py", "data/ingested/manifest.csv")
    expected = load_params(mini_repo / "params.yaml").train.vgg16.image_size
    assert ev.params == {"train.vgg16.image_size": expected}  # the value in params.yaml, read by DVC
    assert (ev.verb, ev.item, ev.rule) == ("evaluate", "vgg16", "evaluate_vgg16")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("\nsplit:\n", "\nsplit:\n  seed: 1\n", 1), "split.seed: duplicated key at line"),
        (lambda text: text.replace("    batch_size: 32", "    batch_size: 0", 1),
         "train.cnn21.batch_size: 0 is out of range"),
    ],
    ids=["duplicated_key", "out_of_range"],
)
def test_snakefile_rejects_bad_params_naming_the_key(mini_repo: Path, edit, message: str) -> None:
    """Snakemake reads params.yaml itself (keeping the last of two equal keys): the Snakefile checks it as stages do."""
    params = mini_repo / "params.yaml"
    params.write_text(edit(params.read_text()))
    proc = snakemake(["--snakefile", str(SNAKEFILE), "--list-rules"], mini_repo, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


PLOTS_TEMPLATE = REPO / "workflow" / "plots" / "offline.html"
FETCHING_TAG = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=", flags=re.IGNORECASE)
SCRIPT_BODY = re.compile(r"(<script\b[^>]*>).*?</script>", flags=re.IGNORECASE | re.DOTALL)


def fetching_tags(html: str) -> list[str]:
    """Tags of ``html`` that make a browser fetch something (inline script bodies, which may build such markup in
    strings, are skipped; their <script> tags themselves are checked)."""
    return FETCHING_TAG.findall(SCRIPT_BODY.sub(r"\1</script>", html))


def test_plots_template_loads_nothing_from_elsewhere() -> None:
    """Vega, Vega-Lite and vega-embed are inlined (no src/href at all), and DVC's scripts placeholder, which DVC
    fills with CDN tags, is absent."""
    html = PLOTS_TEMPLATE.read_text(encoding="utf-8")
    assert fetching_tags(html) == []
    assert not re.search(r"url\(\s*[\"']?(?:https?:)?//", html)
    assert "{scripts}" not in html and html.count("{plot_divs}") == 1
    for package in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f'<script data-package="{package}.' in html, package
    for licence in ("vega", "vega-lite", "vega-embed"):
        assert "Redistribution and use" in (PLOTS_TEMPLATE.parent / "LICENSES" / f"{licence}.txt").read_text()


@pytest.mark.parametrize("how", ["--html-template", "dvc config"])
def test_dvc_plots_show_renders_offline_with_the_template(tmp_path: Path, how: str) -> None:
    """`dvc plots show` with the shipped template (given on the command line, or through the project's .dvc/config
    as `make plots` and a bare `dvc plots show` use it) writes a page that needs no network."""
    repo = tmp_path / "repo"
    (repo / "workflow" / "plots").mkdir(parents=True)
    run([DVC, "init", "--no-scm", "-q"], repo)
    if how == "dvc config":
        shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
        shutil.copy(PLOTS_TEMPLATE, repo / "workflow" / "plots" / "offline.html")
        args: list[str] = []
    else:
        args = ["--html-template", str(PLOTS_TEMPLATE)]
    (repo / "roc.csv").write_text("fpr,tpr\n0,0\n0.2,0.7\n1,1\n")
    run([DVC, "plots", "show", "roc.csv", "-x", "fpr", "-y", "tpr", "-o", "out", *args], repo)
    page = (repo / "out" / "index.html").read_text(encoding="utf-8")
    assert fetching_tags(page) == []  # DVC's default page has three CDN <script src> tags
    assert '<script data-package="vega@5.' in page and "vegaEmbed(" in page and "roc.csv" in page


def test_load_stages_names_a_directory_without_dvc_yaml(tmp_path: Path) -> None:
    with pytest.raises(dag.DagError, match="no dvc.yaml"):
        dag.load_stages(tmp_path)


def test_code_fingerprint_hashes_only_tracked_deps(mini_repo: Path) -> None:
    stage = dag.load_stages(mini_repo)[0]
    (mini_repo / "untracked.py").write_text("x = 1\n")
    fp = dag.code_fingerprint(stage, mini_repo, dag.git_tracked(mini_repo))
    assert sorted(fp) == ["src.txt", "step.py"]


@pytest.mark.parametrize(
    ("changed", "params", "affected"),
    [
        ("ingest", {"ingest": {"max_side": 1}}, {"ingest", "split", "train@a", "evaluate@a"}),
        ("train@a", {"train.a": {"lr": 1}}, {"train@a", "evaluate@a"}),
        ("evaluate@a", {"evaluate": {"seed": 1}}, {"evaluate@a"}),
    ],
)
def test_lineage_fingerprints_change_downstream_only(
    tmp_path: Path, changed: str, params: dict, affected: set[str]
) -> None:
    before = dag.lineage_fingerprints(CHAIN, tmp_path)
    edited = [dataclasses.replace(s, params=params) if s.name == changed else s for s in CHAIN]
    after = dag.lineage_fingerprints(edited, tmp_path)
    assert {name for name in before if before[name] != after[name]} == affected


# ---------------------------------------------------------------------------------------------------- Snakemake runs


def _planned(repo: Path, *args: str) -> set[str]:
    dry = mini_snakemake(repo, "-n", "--cores", "2", *args)
    return set(parse_dry_run(dry.stdout + dry.stderr))


EVERYTHING = {"ingest", "evaluate_cnn21", "evaluate_vgg16", "all"}
SOURCES = ("src.txt", "step.py", "params.yaml", "dvc.yaml")


@pytest.fixture(scope="module")
def mini_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mini repo after one real `snakemake` run with the local profile (copy it before changing anything)."""
    repo = make_mini_repo(tmp_path_factory.mktemp("mini") / "mini")
    mini_snakemake(repo, "--cores", "2")
    return repo


@pytest.fixture
def mini_ran(mini_done: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mini_done, tmp_path / "mini", symlinks=True))  # copy2 keeps modification times


def _checkout(repo: Path) -> None:
    """What `git checkout` does to unchanged files: same bytes, a modification time newer than the outputs."""
    for rel in SOURCES:
        path = repo / rel
        path.write_bytes(path.read_bytes())


def test_snakemake_runs_the_dvc_dag(mini_ran: Path) -> None:
    assert (mini_ran / "data/ingested/manifest.csv").read_text() == (mini_ran / "src.txt").read_text()
    assert json.loads((mini_ran / "reports/ingest.json").read_text()) == {"n": len((mini_ran / "src.txt").read_text())}
    assert (mini_ran / "reports/figures/gradcam_vgg16.png").is_file()
    assert _planned(mini_ran) == set()


def test_fresh_checkout_reruns_nothing(mini_ran: Path) -> None:
    """A fresh clone: no .snakemake/ records, sources newer than outputs, outputs restored by DVC in any order."""
    _checkout(mini_ran)
    shutil.rmtree(mini_ran / ".snakemake")
    assert _planned(mini_ran) == set()
    # Snakemake's own mtime trigger would run everything (so the check above can fail).
    assert _planned(mini_ran, "--rerun-triggers", "mtime") == EVERYTHING

    # Outputs restored by `dvc checkout` in the wrong order (DVC ignores Snakemake's directory timestamp file, see
    # .dvcignore): once `dvc status` is clean, `snakemake --touch` tells Snakemake so.
    (mini_ran / "data/ingested/.snakemake_timestamp").unlink()
    for i, out in enumerate(["reports/figures/gradcam_cnn21.png", "reports/figures/gradcam_vgg16.png",
                             "reports/ingest.json", "data/ingested"]):
        os.utime(mini_ran / out, (time.time() - 3600 + 60 * i,) * 2)
    assert _planned(mini_ran) == {"evaluate_cnn21", "evaluate_vgg16", "all"}
    mini_snakemake(mini_ran, "--touch", "--cores", "1")
    assert _planned(mini_ran) == set()


def test_params_and_content_changes_rerun_the_right_stages(mini_ran: Path) -> None:
    """Judged by content: key-level params and tracked sources, propagated downstream, whatever the mtimes."""
    original = yaml.safe_load((mini_ran / "params.yaml").read_text())
    _checkout(mini_ran)
    assert _planned(mini_ran) == set()

    # A key only evaluate@cnn21 reads re-runs only that stage; a key no stage reads, none; an ingest key, all.
    params = {**original, "report": {**original["report"], "paper_f1": 1.0}}
    params["train"] = {**original["train"], "cnn21": {**original["train"]["cnn21"], "image_size": 72}}
    (mini_ran / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _planned(mini_ran) == {"evaluate_cnn21", "all"}
    params["ingest"] = {**original["ingest"], "max_side": 80}
    (mini_ran / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _planned(mini_ran) == EVERYTHING

    # Changed tracked content (ingest's source file), even with an old modification time.
    (mini_ran / "params.yaml").write_text(yaml.safe_dump(original, sort_keys=False))
    (mini_ran / "src.txt").write_text("source,label\nb.dcm,osteoporosis\n")
    os.utime(mini_ran / "src.txt", (1, 1))
    assert _planned(mini_ran) == EVERYTHING


def test_snakemake_threads_do_not_change_the_command(mini_repo: Path) -> None:
    """A job's threads are for the scheduler only: the shell command is DVC's, so both engines compute alike."""
    dry = mini_snakemake(mini_repo, "-n", "--cores", "3", "--set-threads", "evaluate_vgg16=3")
    jobs = parse_dry_run(dry.stdout + dry.stderr)
    assert jobs["evaluate_vgg16"]["threads"] == 3
    assert jobs["evaluate_vgg16"]["shell"].startswith("python step.py")
    assert "SPINEDXA_THREADS" not in jobs["evaluate_cnn21"]["shell"]


def test_snakemake_report_has_captions(mini_ran: Path) -> None:
    snakemake(["--snakefile", str(SNAKEFILE), "--report", "reports/snakemake.html"], mini_ran)
    html = (mini_ran / "reports/snakemake.html").read_text(encoding="utf-8", errors="replace")
    # The captions of workflow/report/<verb>.rst, for the metric and the figures flagged with report().
    assert "Ingest summary" in html
    assert "Grad-CAM" in html


# ---------------------------------------------------------------------------------------------------- the real DAG


def test_both_engines_list_the_same_stages(project_copy: Path) -> None:
    dvc_names = run([DVC, "stage", "list", "--name-only"], project_copy).stdout.split()
    rules = snakemake(["--list-rules"], project_copy).stdout.split()
    assert len(dvc_names) == len(MODEL_NAMES) * 2 + 11  # 11 single stages + train/evaluate per model
    assert sorted(rules) == sorted([dag.rule_name(n) for n in dvc_names] + ["all"])


def test_readers_of_the_big_data_directories_declare_their_checksums() -> None:
    """No stage but the one writing data/ingested or data/external declares the directory as a dep: the readers
    declare its SHA256SUMS (one file for a no-op to check instead of hundreds; README, Benchmarks)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    writers = {"data/ingested": "ingest", "data/external": "external"}
    readers = {name: [d for d in st.get("deps", []) if d in writers] for name, st in stages.items()}
    assert {name: deps for name, deps in readers.items() if deps} == {}
    checksums = {f"{path}/SHA256SUMS" for path in writers}
    assert {name for name, st in stages.items() if checksums & set(st.get("deps", []))} >= {
        "validate", "external", "augment", "train", "evaluate", "baseline", "replay", "transfer", "report"}
    assert all(path in stages[stage]["outs"] for path, stage in writers.items())


def test_both_engines_see_the_same_graph(project_copy: Path) -> None:
    dvc_edges = dot_edges(run([DVC, "dag", "--dot"], project_copy).stdout)
    graph = snakemake(["--rulegraph"], project_copy).stdout
    ids = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', graph, flags=re.M))
    smk_edges = {(a, b) for a, b in dot_edges(graph, ids) if b != "all"}
    assert ("train_cnn21", "evaluate_cnn21") in smk_edges
    assert smk_edges == {(dag.rule_name(a), dag.rule_name(b)) for a, b in dvc_edges}


def test_both_engines_run_the_same_commands_on_the_same_files(project_copy: Path) -> None:
    """DVC's own view of every stage against what a Snakemake dry run would execute, stage by stage."""
    from dvc.repo import Repo

    with Repo(str(project_copy)) as repo:
        dvc_stages = {s.name: s for s in repo.index.stages}  # `addressing` would be relative to the cwd
        dir_outs = [o.def_path for s in dvc_stages.values() for o in s.outs if "." not in Path(o.def_path).name]

        all_outs = [o.def_path for s in dvc_stages.values() for o in s.outs]

        def as_inputs(path: str, stage: str) -> set[str]:
            """Snakemake names a file inside a directory output by that directory, and a directory dep that
            collects other stages' files (the report's reports/metrics) by those files."""
            inside = next((d for d in dir_outs if path.startswith(d + "/")), None)
            if inside is not None or path in all_outs:
                return {inside or path}
            own = {o.def_path for o in dvc_stages[stage].outs}
            collected = {o for o in all_outs if o.startswith(path + "/") and o not in own}
            return collected or {path}

        dry = snakemake(["-n", "--printshellcmds", "--cores", "10", "--profile", "workflow/profiles/local"],
                        project_copy)
        jobs = parse_dry_run(dry.stdout + dry.stderr)
        assert set(jobs) == {dag.rule_name(n) for n in dvc_stages} | {"all"}
        for name, st in dvc_stages.items():
            job = jobs[dag.rule_name(name)]
            assert job["shell"] == st.cmd, name
            assert job["output"] and sorted(job["output"]) == sorted(o.def_path for o in st.outs), name
            file_deps = [d.def_path for d in st.deps if d.def_path != "params.yaml"]
            assert sorted(job["input"]) == sorted({i for d in file_deps for i in as_inputs(d, name)}), name
        # Every training occupies runtime.train_processes x train.threads cores (spinedxa.dag.rule_threads).
        params = yaml.safe_load((project_copy / "params.yaml").read_text())
        expected = params["runtime"]["train_processes"] * max(1, params["train"]["threads"])
        assert {jobs[f"train_{m}"]["threads"] for m in MODEL_NAMES} == {expected}


def test_report_stage_reads_every_model(repo_root: Path) -> None:
    """The report depends on every model's outputs through directory deps, which DVC links to each stage writing a
    file there and Snakemake gets as those files (spinedxa.dag.snakemake_inputs): none may be missing."""
    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    models = yaml.safe_load((repo_root / "params.yaml").read_text())["train"]["models"]
    stages = dag.load_stages(repo_root)
    report = dag.get_stage(stages, "report")
    inputs = set(dag.snakemake_inputs(report, stages))
    for model in [*models, "baseline"]:
        assert {f"reports/metrics/{model}.json", f"reports/predictions/{model}.csv", f"reports/plots/{model}",
                f"reports/provenance/{model}.json", f"reports/predictions/external/{model}.csv"} <= inputs, model
    for model in models:
        assert f"reports/train/{model}.csv" in inputs
    assert {s.name for s in dag.upstream(stages, "report")} >= {f"evaluate@{m}" for m in models} | {"baseline"}
    for plot in spec["plots"]:
        ((name, body),) = plot.items()
        shown = {m for m in models for p in body["y"] if m in Path(p).parts or Path(p).stem == m}
        assert shown == set(models), f"plot {name!r} misses {sorted(set(models) - shown)}"


# ---------------------------------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("profile", ["local", "slurm", "kubernetes"])
def test_profiles_name_real_rules_and_rerun_without_mtime(profile: str, repo_root: Path) -> None:
    cfg = yaml.safe_load((PROFILES / profile / "config.yaml").read_text())
    rules = {s.rule for s in dag.load_stages(repo_root)}
    named = set(cfg.get("set-threads", {})) | set(cfg.get("set-resources", {}))
    assert named <= rules, f"{profile}: unknown rules {sorted(named - rules)}"
    assert "mtime" not in cfg["rerun-triggers"]
    if profile != "local":
        for model in MODEL_NAMES:
            assert cfg["set-resources"][f"train_{model}"]["gpu"] == 1
            assert cfg["set-threads"][f"train_{model}"] >= 1


def test_slurm_profile_dry_run(project_copy: Path) -> None:
    dry = snakemake(["--profile", "workflow/profiles/slurm", "-n", "--cores", "64"], project_copy)
    text = dry.stdout + dry.stderr
    jobs = parse_dry_run(text)
    assert set(jobs) >= {f"train_{m}" for m in MODEL_NAMES}
    assert jobs["train_resnet50"]["shell"].startswith("python stages/train.py")
    block = text[text.index("rule train_resnet50:"):]
    resources = block[block.index("resources:"):].splitlines()[0]
    assert "slurm_partition=gpu" in resources and "gpu=1" in resources


# ---------------------------------------------------------------------------------------------------- DVC remote


def test_dvc_remote_push_then_pull_restores_identical_files(tmp_path: Path) -> None:
    """The committed remote (a directory beside the repository) stores and returns data byte for byte."""
    repo = make_repo_copy(tmp_path / "repo", profile=None)
    remote = run([DVC, "remote", "list"], repo).stdout.split()
    assert remote[:1] == ["local"]
    data = repo / "data" / "sample"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"scan_{i}.bin").write_bytes(os.urandom(64) + bytes([i]))
    before = {p.name: sha256_file(p) for p in data.iterdir()}
    run([DVC, "add", "data/sample"], repo)
    run([DVC, "push", "data/sample.dvc"], repo)
    assert (tmp_path / "dvc-remote" / "files" / "md5").is_dir()  # ../dvc-remote, relative to the repo

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    run([DVC, "pull", "data/sample.dvc"], repo)
    assert {p.name: sha256_file(p) for p in data.iterdir()} == before


# ---------------------------------------------------------------------------------------------------- MLflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_parallel_trainings_log_every_run_to_an_mlflow_server(tmp_path: Path) -> None:
    """Snakemake runs the DAG up to the five trainings, in parallel, against a real `mlflow server`: all five runs
    arrive complete, and `dvc commit` then records Snakemake's outputs as DVC's own."""
    from spinedxa import tracking

    repo = make_repo_copy(tmp_path / "repo")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}, start_new_session=True,
    )
    try:
        deadline = time.time() + 300  # the server imports MLflow in each worker: slow on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=10) as resp:
                    if resp.status == 200:
                        break
            except OSError:  # refused, reset or timed out while the server starts
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(2)
        targets = [f"train_{m}" for m in MODEL_NAMES]
        snakemake(["--profile", "workflow/profiles/local", "--cores", str(len(targets)), *targets], repo,
                  env={"MLFLOW_TRACKING_URI": uri})
        runs = tracking.find_runs("spinedxa", uri=uri)
        # One parent run per model, one nested run per fold under it (folds from the copy's params: tiny profile).
        folds = load_params(repo / "params.yaml").split.folds
        parents = [r for r in runs if r["parent_run_id"] is None]
        nested = [r for r in runs if r["parent_run_id"] is not None]
        assert sorted(r["run_name"] for r in parents) == sorted(MODEL_NAMES)
        assert sorted(r["run_name"] for r in nested) == sorted(f"{m}/fold{k}" for m in MODEL_NAMES
                                                               for k in range(folds))
        by_id = {r["run_id"]: r["run_name"] for r in parents}
        assert all(by_id[r["parent_run_id"]] == r["run_name"].split("/")[0] for r in nested)
        assert {r["status"] for r in runs} == {"FINISHED"}
        assert {json.loads((repo / "models" / m / "meta.json").read_text())["mlflow_run_id"] for m in MODEL_NAMES} \
            == {r["run_id"] for r in parents}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    # `make dvc-commit` (here for the stages that ran): Snakemake's outputs become DVC's, and DVC agrees.
    ran = [s.name for s in dag.upstream(dag.load_stages(repo), f"train@{MODEL_NAMES[0]}") if "@" not in s.name]
    ran += [f"train@{m}" for m in MODEL_NAMES]
    run([DVC, "commit", "--force", *ran], repo)
    assert "changed" not in run([DVC, "status", *ran], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for model in MODEL_NAMES:
        # What the training recorded about its data is what DVC recorded (Snakemake's .snakemake_timestamp marker
        # in directory outputs must not count: .dvcignore).
        # data/ingested: its readers declare its SHA256SUMS, so its hash is that of ingest's output
        recorded = json.loads((repo / "models" / model / "meta.json").read_text())["data_digests"]
        hashes = {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])}
        hashes |= {d["path"]: d["md5"] for d in lock[f"train@{model}"]["deps"]}
        assert recorded == {path: hashes.get(path) for path in recorded}, model
