"""Where a no-op `dvc repro` of this project spends its time beyond DVC's floor: the same DAG with parts taken out.

``bench/noop.py`` times a no-op ``dvc repro`` of the project against a trivial project of as many echo stages (the
floor). This bench asks what the ratio would be without the declarations that make the project's stages re-run when
they should, to show how much of it each kind costs. In one run, interleaved with the floor:

- ``as committed``: a copy of the project, its ``dvc.yaml`` and ``dvc.lock`` as they are;
- ``no code deps``: the same copy, every dependency under ``spinedxa/`` and ``stages/`` removed from each stage of
  ``dvc.yaml`` and from its entry in ``dvc.lock`` (the import closure that ``tests/test_imports.py`` checks);
- ``no code deps, no params``: also every ``params:`` declaration removed (DVC reads ``params.yaml`` once per stage
  that declares any).

What stays in the last one is only the stages' data: their data dependencies and their outputs. All three run in
one copy of the project, whose ``dvc.yaml`` and ``dvc.lock`` are swapped before each run. Each variant is checked
with ``dvc status`` before anything is timed (DVC takes the edited lock as up to date: no stage would run), and a
timed run that runs a stage fails the bench, as in ``bench/noop.py``.

The copy is made under a temporary directory: the workspace without ``mlruns/``, ``.venv/``, ``checkpoints/`` and
DVC's cache and temporary files. The copy reads the project's DVC cache (``cache.dir`` in the copy's
``.dvc/config.local``; a no-op writes nothing there). The project itself is only read. It must be fully reproduced
(``dvc status`` clean).

Writes ``reports/bench/noop_decompose.json`` (per-run seconds, medians, ratios, the CPU and its flags).

Usage::

    python bench/noop_decompose.py               # this repository (after `dvc repro`); ~2 GB copied once, ~3 min
    python bench/noop_decompose.py --runs 15
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noop  # noqa: E402  (bench/noop.py: the floor, the timing, the checks)

CODE_PREFIXES = ("spinedxa/", "stages/")
VARIANTS = ("as committed", "no code deps", "no code deps, no params")
#: Top-level workspace entries not copied: MLflow's store, the virtual environment, training checkpoints, DVC's
#: cache (read in place) and DVC's temporary files (locks, the rwlock file: each project keeps its own).
SKIP = {"mlruns", ".venv", "checkpoints", ".bench"}
SKIP_DVC = {"cache", "tmp"}


def _is_code(dep: object) -> bool:
    path = dep if isinstance(dep, str) else (dep.get("path") if isinstance(dep, dict) else None)
    return isinstance(path, str) and path.startswith(CODE_PREFIXES)


def strip_stages(dvc_yaml: dict, dvc_lock: dict, *, params: bool) -> tuple[dict, dict]:
    """``dvc.yaml`` and ``dvc.lock`` contents without code deps, and also without params declarations if ``params``.

    Works on the parsed files: stages of ``dvc.yaml`` (plain, ``matrix`` or ``foreach``/``do``) and the resolved
    stages of ``dvc.lock``. Everything else is kept as it is.
    """
    out_yaml, out_lock = copy.deepcopy(dvc_yaml), copy.deepcopy(dvc_lock)
    for stage in out_yaml.get("stages", {}).values():
        body = stage.get("do", stage)
        _strip(body, params=params)
    for stage in out_lock.get("stages", {}).values():
        _strip(stage, params=params)
    return out_yaml, out_lock


def _strip(stage: dict, *, params: bool) -> None:
    if "deps" in stage:
        stage["deps"] = [dep for dep in stage["deps"] if not _is_code(dep)]
        if not stage["deps"]:
            del stage["deps"]
    if params:
        stage.pop("params", None)


def copy_workspace(project: Path, dest: Path) -> Path:
    """Copy ``project``'s workspace to ``dest`` (see the module doc for what is left out); reads its DVC cache."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory).resolve()
        if here == project:
            return SKIP & set(names)
        if here == project / ".dvc":
            return SKIP_DVC & set(names)
        return set()

    cache = noop.dvc(["cache", "dir"], project).stdout.strip()
    shutil.copytree(project, dest, symlinks=True, ignore=ignore)
    (dest / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
    return dest


def use(work: Path, files: tuple[str, str]) -> None:
    """Make ``work``'s ``dvc.yaml`` and ``dvc.lock`` the given texts."""
    for name, text in zip(("dvc.yaml", "dvc.lock"), files):
        (work / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=noop.REPO, help="a fully reproduced DVC project")
    parser.add_argument("--runs", type=int, default=9, help="timed no-op runs of each (interleaved)")
    parser.add_argument("--out", type=Path, default=noop.REPO / "reports" / "bench" / "noop_decompose.json")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    try:
        noop.require_reproduced(project)
    except noop.NotReproduced as exc:
        print(exc, file=sys.stderr)
        return 2
    n_stages = noop.stage_count(project)
    original_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    original_lock = yaml.safe_load((project / "dvc.lock").read_text())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="noop-decompose-") as tmp:
        floor = noop.make_floor(Path(tmp) / "floor", n_stages)
        work = copy_workspace(project, Path(tmp) / "project")
        files = {}  # variant -> (dvc.yaml text, dvc.lock text), written into the one copy before each of its runs
        for name in VARIANTS:
            if name == "as committed":
                files[name] = ((project / "dvc.yaml").read_text(), (project / "dvc.lock").read_text())
            else:
                new_yaml, new_lock = strip_stages(original_yaml, original_lock, params=name.endswith("no params"))
                files[name] = (yaml.safe_dump(new_yaml, sort_keys=False), yaml.safe_dump(new_lock, sort_keys=False))
            use(work, files[name])
            noop.require_reproduced(work)  # before any `dvc repro` there: DVC takes the edited lock as up to date

        def run(name: str) -> tuple[float, float]:
            use(work, files[name])
            return noop.time_noop(work)

        wall, cpu = noop.interleaved({"floor": lambda: noop.time_noop(floor),
                                      **{name: (lambda name=name: run(name)) for name in VARIANTS}}, args.runs)
    entries = {name: _entries(yaml.safe_load(files[name][1])) for name in VARIANTS}
    lock_bytes = {name: len(files[name][1].encode()) for name in VARIANTS}
    floor_median = statistics.median(wall["floor"])
    result = {
        **noop.machine(),
        "project": str(project),
        "stages": n_stages,
        "runs": args.runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": wall,
        "cpu_s": cpu,
        "variants": {
            name: {"wall": noop.summary(wall[name]), "cpu": noop.summary(cpu[name]), **noop.ratios(wall, cpu, name),
                   "lock_entries": entries[name], "lock_bytes": lock_bytes[name]}
            for name in VARIANTS
        },
        "floor": {"wall": noop.summary(wall["floor"]), "cpu": noop.summary(cpu["floor"])},
        "goal_ratio": noop.GOAL,
    }
    noop.write_json_atomic(args.out, result)
    print(f"no-op dvc repro, {n_stages} stages, {args.runs} interleaved runs each (dvc {result['dvc_version']}, "
          f"{result['cpu']['model']}); floor wall median {floor_median:.2f} s:")
    for name in VARIANTS:
        v = result["variants"][name]
        print(f"  {name:26s} wall median {v['wall']['median_s']:.2f} s = {v['ratio']:.2f} x floor "
              f"(CPU {v['cpu_ratio']:.2f} x, fastest {v['min_ratio']:.2f} x); dvc.lock {v['lock_bytes'] // 1024} KiB, {v['lock_entries']['deps']} "
              f"deps, {v['lock_entries']['outs']} outs, {v['lock_entries']['params']} params")
    print(f"  goal <= {noop.GOAL} x; written to {args.out}")
    return 0


def _entries(lock: dict) -> dict[str, int]:
    """How many deps, outs and param values ``dvc.lock`` records over all its stages."""
    stages = lock.get("stages", {}).values()
    return {
        "deps": sum(len(s.get("deps", [])) for s in stages),
        "outs": sum(len(s.get("outs", [])) for s in stages),
        "params": sum(len(values) for s in stages for values in s.get("params", {}).values()),
    }


if __name__ == "__main__":
    sys.exit(main())
