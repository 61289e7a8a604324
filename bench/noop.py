"""No-op `dvc repro` of this project against DVC's own floor: a trivial project with as many stages.

In one run, on this machine, with the same ``dvc`` and the same environment:

1. **Floor.** A throw-away DVC project in a temporary directory with as many stages as the project has (counted with
   ``dvc stage list``), each an ``echo`` into a one-line file that the next stage depends on, reproduced once and
   committed: the least a no-op ``dvc repro`` can cost on this machine for that stage count.
2. **Project.** ``--project`` (default: this repository), which must already be fully reproduced: ``dvc status``
   must be clean, else the bench refuses (a run that re-ran stages would time the pipeline, not the no-op).

After one untimed warm-up each (page cache, DVC's state database), no-op ``dvc repro`` runs alternate between the
two, floor first in even rounds and project first in odd ones, so that load from other processes on a shared
machine hits both alike. Every timed run must run no stage ("Running stage" in its output fails the bench). Each
run's wall time and CPU time (user + system, from ``getrusage``) are kept. Prints the medians, min/max and the ratios
(of the wall medians: the goal; of the CPU medians and of the fastest runs: steadier views when other processes
load the machine); writes ``reports/bench/noop.json`` with the per-run seconds, the CPU and its flags, the load
average, DVC's version and whether ruamel.yaml parses with its C extension (``ruamel.yaml.clib``; since ruamel.yaml
0.19 it is no longer installed with it, and without it DVC parses ``dvc.lock`` in pure Python).

Goal (issue 19): project wall median <= 1.5 x floor wall median.

Usage::

    python bench/noop.py                                # this repository (after `dvc repro`)
    python bench/noop.py --project /tmp/tiny/repo --runs 9

A reproduced tiny-profile copy to run it on (as the tests make one; its `dvc repro` takes ~5 min on 2 cores)::

    python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import make_repo_copy; \
               make_repo_copy(Path('/tmp/tiny/repo'))"
    (cd /tmp/tiny/repo && dvc repro)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.runtime import cpu_flags  # noqa: E402

GOAL = 1.5
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# The Makefile's environment: no telemetry (DVC would otherwise start an analytics daemon after each command).
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_PYTHON_REFRESH": "quiet"}


class NotReproduced(RuntimeError):
    """The project directory has stages or data that a `dvc repro` would change."""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def dvc_exe() -> str:
    """The ``dvc`` of this interpreter's environment (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else "dvc"


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``dvc args`` in ``cwd``; raise with its output if it fails."""
    proc = subprocess.run([dvc_exe(), *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd} ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def stage_count(project: Path) -> int:
    """The number of stages DVC resolves in ``project`` (``matrix`` fan-outs counted one by one)."""
    return len(dvc(["stage", "list", "--name-only"], project).stdout.split())


def require_reproduced(project: Path) -> None:
    """Raise :class:`NotReproduced` naming what ``dvc status`` reports changed in ``project``."""
    changed = json.loads(dvc(["status", "--json"], project).stdout or "{}")
    if changed:
        raise NotReproduced(
            f"{project}: `dvc status` is not clean ({', '.join(sorted(changed))} changed); a no-op `dvc repro` "
            f"cannot be timed there. Run `dvc repro` in {project} first (the bench would otherwise time real work)."
        )


def make_floor(root: Path, n_stages: int) -> Path:
    """A git + DVC project of ``n_stages`` chained echo stages under ``root``, reproduced once and committed."""
    import yaml

    root.mkdir(parents=True)
    stages = {}
    for i in range(n_stages):
        stage: dict[str, object] = {"cmd": f"echo {i} > out{i}.txt", "outs": [f"out{i}.txt"]}
        if i:
            stage["deps"] = [f"out{i - 1}.txt"]
        stages[f"s{i}"] = stage
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    dvc(["init", "-q"], root)
    dvc(["repro", "-q"], root)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "floor"], cwd=root, check=True)
    return root


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_noop(project: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one ``dvc repro`` in ``project``; raise if it ran any stage."""
    cpu, start = _children_cpu(), time.perf_counter()
    proc = dvc(["repro"], project)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if "Running stage" in proc.stdout:
        raise NotReproduced(f"{project}: `dvc repro` ran stages during the bench:\n{proc.stdout}")
    return seconds, cpu


def yaml_parser() -> str:
    """``"C"`` if ruamel.yaml's safe loader (the one DVC uses) runs on its C extension here, else ``"pure Python"``."""
    probe = [sys.executable, "-c", "import ruamel.yaml.main as m; print(m.CParser is not None)"]
    out = subprocess.run(probe, env=ENV, capture_output=True, text=True).stdout.strip()
    return "C" if out == "True" else "pure Python"


def summary(times: list[float]) -> dict[str, float]:
    """Median, min and max of ``times``, in seconds."""
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def interleaved(targets: dict[str, Callable[[], tuple[float, float]]], runs: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of ``runs`` timed calls of each target, after one untimed warm-up each.

    Round ``i`` calls the targets in their order rotated by ``i`` (each goes first in turn: with two, the first one
    leads in even rounds, the second in odd ones), so that load from other processes hits all alike.
    """
    names = list(targets)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        targets[name]()  # warm-up: page cache, DVC's state database, rwlock file
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            seconds, cpu_seconds = targets[name]()
            wall[name].append(round(seconds, 3))
            cpu[name].append(round(cpu_seconds, 3))
    return wall, cpu


def ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]], name: str, base: str = "floor"
           ) -> dict[str, float]:
    """``name`` against ``base``: of the wall medians (the goal), of the CPU medians, and of the fastest runs (under
    load the fastest run of each is the least disturbed one: a view less sensitive to other processes)."""
    return {
        "ratio": round(statistics.median(wall[name]) / statistics.median(wall[base]), 2),
        "cpu_ratio": round(statistics.median(cpu[name]) / statistics.median(cpu[base]), 2),
        "min_ratio": round(min(wall[name]) / min(wall[base]), 2),
    }


def machine() -> dict[str, object]:
    """The CPU (model, cores, the flags that choose the fast path), DVC's version and ruamel.yaml's parser."""
    flags = cpu_flags()
    return {
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]},
        "dvc_version": dvc(["--version"], REPO).stdout.strip(),
        "yaml_parser": yaml_parser(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=REPO, help="a fully reproduced DVC project (default: this repo)")
    parser.add_argument("--runs", type=int, default=7, help="timed no-op runs of each (interleaved)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "noop.json")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    try:
        require_reproduced(project)
    except NotReproduced as exc:
        print(exc, file=sys.stderr)
        return 2
    n_stages = stage_count(project)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="noop-floor-") as tmp:
        floor = make_floor(Path(tmp) / "floor", n_stages)
        if stage_count(floor) != n_stages:
            raise RuntimeError(f"{floor}: expected {n_stages} stages")
        wall, cpu = interleaved({"floor": lambda: time_noop(floor), "project": lambda: time_noop(project)},
                                args.runs)
    stats = {name: {"wall": summary(wall[name]), "cpu": summary(cpu[name])} for name in wall}
    compared = ratios(wall, cpu, "project")
    met = statistics.median(wall["project"]) <= GOAL * statistics.median(wall["floor"])  # unrounded
    result = {
        **machine(),
        "project": str(project),
        "stages": {"project": n_stages, "floor": n_stages},
        "runs": args.runs,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": wall,
        "cpu_s": cpu,
        "floor": stats["floor"],
        "project_noop": stats["project"],
        **compared,
        "goal_ratio": GOAL,
        "goal_met": met,
    }
    write_json_atomic(args.out, result)
    print(f"no-op dvc repro, {n_stages} stages, {args.runs} interleaved runs each "
          f"(dvc {result['dvc_version']}, YAML parser: {result['yaml_parser']}, {result['cpu']['model']}):")
    for label, name in (("trivial project (floor)", "floor"), (str(project), "project")):
        w, c = stats[name]["wall"], stats[name]["cpu"]
        print(f"  {label:40s} wall median {w['median_s']:.2f} s (min {w['min_s']:.2f}, max {w['max_s']:.2f}); "
              f"CPU median {c['median_s']:.2f} s")
    print(f"  ratio of medians {compared['ratio']:.2f} wall (goal <= {GOAL}: {'met' if met else 'NOT met'}), "
          f"{compared['cpu_ratio']:.2f} CPU; of the fastest runs {compared['min_ratio']:.2f}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
