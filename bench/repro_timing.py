"""Time a whole `dvc repro` stage by stage: the pipeline budget, measured.

Runs ``dvc repro`` (arguments passed through), timestamps every "Running stage '<name>'" line DVC prints, and
writes the wall time of each stage that ran (from its start to the next stage's start, or to the end), the total,
the CPU and its flags, and the load average before and after to ``reports/bench/repro.json``. DVC's own output is
passed through unchanged; the exit status is DVC's.

Usage::

    python bench/repro_timing.py                 # = dvc repro, timed
    python bench/repro_timing.py --out reports/bench/repro.json -- --force
"""

from __future__ import annotations

import argparse
import os
import re
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


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "repro.json")
    parser.add_argument("dvc_args", nargs="*", help="arguments for dvc repro (after --)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(["dvc", "repro", *args.dvc_args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
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
    write_json_atomic(args.out, {
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "exit_status": code, "total_s": round(total, 1), "stages_s": stages,
    })
    print(f"dvc repro: {total:.0f} s over {len(stages)} stage(s); per stage in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
