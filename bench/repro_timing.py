"""Time a whole `dvc repro` stage by stage: the pipeline budget, measured, natively and on an emulated AVX2-only CPU.

Runs ``dvc repro`` (arguments passed through), timestamps every "Running stage '<name>'" line DVC prints, and
records the wall time of each stage that ran (from its start to the next stage's start, or to the end), the total,
the CPU and its flags, the fast path the trainings take, and the load average before and after, under a label in
``reports/bench/repro.json`` (``runs.<label>``; other labels' entries are kept, so one file holds both runs).

``--avx2`` runs with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``: oneDNN and ATen then use AVX2 kernels
only, report no bf16, and the trainings take the fp32 path (``cpu_fp32_channels_last``), as on an AVX2-only CPU of
the same clock. ``--clone DIR`` runs in a fresh ``git clone`` of HEAD at DIR (empty DVC cache, its own MLflow store),
so nothing cached is reused and nothing here is touched; without it, the repository itself is reproduced. DVC's own
output is passed through unchanged; the exit status is DVC's.

Usage::

    python bench/repro_timing.py                                  # = dvc repro here, timed, label "native"
    python bench/repro_timing.py --clone /tmp/t1                  # a full run from nothing, label "native"
    python bench/repro_timing.py --clone /tmp/t2 --avx2           # the same on the AVX2 fp32 path, "avx2_emulated"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.runtime import cpu_flags  # noqa: E402

STAGE = re.compile(r"Running stage '([^']+)'")
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
#: What an AVX2-only CPU leaves to oneDNN and ATen (oneDNN then reports no bf16 support: the fp32 fast path).
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def fast_path(env: dict[str, str]) -> str:
    """The training fast path under ``env`` (a fresh interpreter: oneDNN reads its ISA limit at start-up)."""
    code = ("import torch; from spinedxa.runtime import select_fast_path; "
            "print(select_fast_path(torch.device('cpu'), True).name)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def clone(dest: Path) -> Path:
    """A fresh clone of HEAD at ``dest`` (replaced): no DVC cache, no outputs."""
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "repro.json")
    parser.add_argument("--avx2", action="store_true", help="emulate an AVX2-only CPU (oneDNN/ATen AVX2 kernels)")
    parser.add_argument("--clone", type=Path, help="run in a fresh git clone of HEAD at this directory")
    parser.add_argument("--label", help="entry under runs (default: native or avx2_emulated)")
    parser.add_argument("dvc_args", nargs="*", help="arguments for dvc repro (after --)")
    args = parser.parse_args(argv)
    label = args.label or ("avx2_emulated" if args.avx2 else "native")
    where = clone(args.clone) if args.clone else REPO
    env = {**os.environ, **(AVX2_ENV if args.avx2 else {}), "PYTHONPATH": str(where)}
    if args.clone:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{where / 'mlflow.db'}"
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                            text=True).stdout.strip()
    load_before = os.getloadavg()
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(["dvc", "repro", *args.dvc_args], cwd=where, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    for line in proc.stdout or ():
        sys.stdout.write(line)
        match = STAGE.search(line)
        if match:
            marks.append((match.group(1), time.perf_counter() - start))
    code = proc.wait()
    total = time.perf_counter() - start
    stages = {name: round((marks[i + 1][1] if i + 1 < len(marks) else total) - t, 1)
              for i, (name, t) in enumerate(marks)}
    flags = cpu_flags()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs = previous.get("runs", {}) if isinstance(previous.get("runs"), dict) else {}
    runs[label] = {
        "commit": commit, "fresh_clone": bool(args.clone), "env": {k: env[k] for k in AVX2_ENV if k in env},
        "fast_path": fast_path(env),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "exit_status": code, "total_s": round(total, 1), "total_min": round(total / 60, 1), "stages_s": stages,
    }
    write_json_atomic(args.out, {
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]},
        "runs": runs,
    })
    print(f"dvc repro ({label}): {total:.0f} s over {len(stages)} stage(s); per stage in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
