"""Benchmark of the ingest stage: throughput against a bare pydicom decode loop, and peak memory vs file count.

For each size (default 1,000 and 5,000 files) it writes that many small DICOMs (copies of synthetic 256 x 192 scans
with varied PatientIDs, so each is a distinct file and patient), then, over the same files:

* bare:   ``pydicom.dcmread(f).pixel_array`` in a loop, one process (one core), run just before and just after
  ingest (the mean of the two is reported, so a change in machine load during the run biases neither side);
* ingest: :func:`spinedxa.ingest.run_ingest` with ``--workers`` processes, in a child process whose whole process tree
  has its RSS sampled every 20 ms (psutil) for the peak.

Both read the same files, from a warm page cache (they were just written). On a shared machine wall-clock rates
move with the load, so the comparison is per CPU second: the bare loop's own CPU time against the CPU time of the
whole ingest process tree (``getrusage(RUSAGE_CHILDREN)``: the child and its workers). That ingest figure is given
all-in and "steady", i.e. without the child's interpreter start-up and imports (measured inside the child just
before ``run_ingest``; the bare loop's imports are not timed either, and forked workers inherit them).

Goals: ingest files per CPU second >= 0.5 x bare files per CPU second; peak RSS flat in the file count. Prints a
side-by-side table and writes ``reports/bench/ingest.json``.

Hostile files (``--hostile``): each small file of ``tests/dicom_factory.HOSTILE`` (deflate bombs, codestreams and
headers that lie about their size; a few kB to 1 MB on disk) is ingested on its own, beside two ordinary scans, with
the repo's params (``ingest.roi: whole``: the fixtures are not spines) and ``--workers`` workers, then every file that
lies together (``all_lying``). For each run: the peak RSS of the ingest process tree sampled by psutil, and the exact
peaks the kernel recorded (``VmHWM`` of the ingest process, ``ru_maxrss`` of its largest worker), with the bound
``parent + workers x largest worker``. Goal: the sampled tree well under 1 GiB for every file that lies about its
size. ``deflate_7000x7000_consistent`` is a true 7000 x 7000 image: what it needs is real (the OCR screen at 2048 px
peaks ~1 GB), and ``ingest.worker_memory_mb`` bounds it instead (its row shows by how much).
Usage::

    python bench/ingest.py [--sizes 1000 5000] [--workers 2] [--out reports/bench/ingest.json]
    python bench/ingest.py --hostile [--workers 2] [--out reports/bench/ingest_hostile.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.02
BASE_SCANS = 24  # distinct synthetic scans; the bench files are copies with new PatientIDs


def base_scans(work: Path) -> list[Path]:
    """Render a few 256 x 192 synthetic scans (spinedxa.synthesize if present, else a plain generated image)."""
    from spinedxa.config import load_params

    params = load_params(REPO / "params.yaml")
    try:
        from spinedxa.synthesize import synthesize_cohort
    except ImportError:
        return _fallback_scans(work / "base")
    cfg = dataclasses.replace(params.synthesize, n_scans=BASE_SCANS, n_osteoporosis=BASE_SCANS // 2, height=256,
                              width=192, workers=1)
    synthesize_cohort(cfg, work / "base", work / "truth.csv", params.data.classes)
    return sorted((work / "base").rglob("*.dcm"))


def _fallback_scans(out: Path) -> list[Path]:
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    rng = np.random.default_rng(0)
    paths = []
    for i in range(BASE_SCANS):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality, ds.PatientName, ds.PatientID = "BMD", "BENCH^PATIENT", f"BASE{i}"
        ds.set_pixel_data(rng.integers(0, 4096, (256, 192), dtype=np.uint16), "MONOCHROME2", 12)
        paths.append(out / ("normal", "osteoporosis")[i % 2] / f"scan_{i:04d}.dcm")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def make_source(bases: list[Path], n: int, out: Path) -> list[Path]:
    """Write ``n`` copies of the base scans under ``out/<class>/``, each with its own PatientID."""
    datasets = [(b.parent.name, pydicom.dcmread(b)) for b in bases]
    paths = []
    for i in range(n):
        label, ds = datasets[i % len(datasets)]
        ds.PatientID = f"BENCH{i:06d}"
        path = out / label / f"copy_{i:06d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def bare_rate(paths: list[Path]) -> tuple[float, float]:
    """Files per wall second and per CPU second of ``dcmread(f).pixel_array`` over ``paths`` in this process."""
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return len(paths) / (time.perf_counter() - start), len(paths) / (time.process_time() - cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: the child and its workers
    return usage.ru_utime + usage.ru_stime


def ingest_run(source: Path, out: Path, workers: int) -> dict[str, float]:
    """Run ingest in a child process; return its own timing and the peak RSS of its process tree."""
    import psutil  # the parent's sampler only: kept out of the child's measured start-up

    cmd = [sys.executable, __file__, "--child", str(source), str(out), str(workers)]
    cpu_before = _children_cpu()
    with tempfile.TemporaryFile("w+") as err:  # the child's log: shown if it fails, never mixed into its JSON
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "SPINEDXA_DEID_KEY": "bench-key-not-secret"})
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.NoSuchProcess:
                pass  # a worker exited between listing and reading: the next sample sees the new tree
            time.sleep(SAMPLE_S)
        out_text = proc.stdout.read() if proc.stdout else ""
        err.seek(0)
        log_tail = err.read()[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"ingest child failed with exit status {proc.returncode}: {out_text}\n{log_tail}")
    result = json.loads(out_text.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(peak / 2**20, 1)
    # CPU seconds of the whole tree, including interpreter start-up and imports (~1-2 CPU s, a fixed cost).
    result["cpu_seconds"] = round(_children_cpu() - cpu_before, 3)
    return result


def child(source: Path, out: Path, workers: int) -> None:
    """Inside the child: ingest ``source`` with the repo's params (workers overridden) and print the timing."""
    from spinedxa.config import load_params
    from spinedxa.ingest import run_ingest

    params = load_params(REPO / "params.yaml")
    # roi whole: the fixtures are small synthetic images, not spines; the ROI locator would quarantine every one
    # no_roi and this bench measures decoding, not ROI location (as tests/test_ingest.py's peak-memory test does).
    settings = dataclasses.replace(params.ingest, roi="whole")
    startup = resource.getrusage(resource.RUSAGE_SELF)  # interpreter start-up and imports, before any file
    start = time.perf_counter()
    summary = run_ingest(source, out, out.parent / "ingest.json", task=params.data.task, settings=settings,
                         workers=workers, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 3), "files_per_s": round(summary["n_files"] / seconds, 1),
                      "n_accepted": summary["n_accepted"], "per_reason": summary["per_reason"],
                      "startup_cpu_seconds": round(startup.ru_utime + startup.ru_stime, 3), **peak_rss_mib()}))


def peak_rss_mib() -> dict[str, float]:
    """Exact peaks the kernel recorded: this process's (``VmHWM``: the ru_maxrss of an exec'd process starts at its
    parent's peak, Linux getrusage(2)) and its largest waited-for child's (the ingest workers), in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        hwm_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return {"maxrss_parent_mib": round(hwm_kib / 1024, 1),
            "maxrss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


ALL_LYING = "all_lying"  # every hostile fixture at once, but the one whose size is true (dicom_factory.CONSISTENT)


def hostile(workers: int, out: Path) -> int:
    """Peak memory of ingest on each hostile fixture alone, then on all of them together (see the module docstring)."""
    sys.path.insert(0, str(REPO / "tests"))  # the fixtures are the tests' own (tests/dicom_factory.py)
    from dicom_factory import CONSISTENT, HOSTILE

    from spinedxa.files import write_json_atomic

    rows = []
    with tempfile.TemporaryDirectory(prefix="spinedxa-bench-hostile-") as tmp:
        for name in [*HOSTILE, ALL_LYING]:
            source = Path(tmp) / name / "source"
            # Written by a child process, so that this one stays small (its RSS is in every sample of the tree).
            made = subprocess.run([sys.executable, __file__, "--make-hostile", str(source), name], check=True,
                                  capture_output=True, text=True)
            expected = json.loads(made.stdout)
            size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file() and p.parent.name == "normal")
            run = ingest_run(source, Path(tmp) / name / "ingested", workers)
            bound = run["maxrss_parent_mib"] + workers * run["maxrss_worker_mib"]
            rows.append({"fixture": name, "bytes_on_disk": size, "expected": sorted(set(expected.values())),
                         "per_reason": run["per_reason"], "peak_rss_tree_sampled_mib": run["peak_rss_mib"],
                         "maxrss_parent_mib": run["maxrss_parent_mib"],
                         "maxrss_largest_worker_mib": run["maxrss_worker_mib"], "bound_mib": round(bound, 1),
                         "seconds": run["seconds"]})
            shutil.rmtree(Path(tmp) / name)
    result = {"workers": workers, "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                                          "load_avg_1m": round(os.getloadavg()[0], 2)},
              "rows": rows,
              "goal_under_1_gib": all(r["peak_rss_tree_sampled_mib"] < 1024 for r in rows if r["fixture"] != CONSISTENT)}
    print(f"{'fixture':<30} {'bytes':>9} {'tree MiB':>9} {'parent':>7} {'worker':>7} {'bound':>7}  reasons")
    for r in rows:
        print(f"{r['fixture']:<30} {r['bytes_on_disk']:>9} {r['peak_rss_tree_sampled_mib']:>9} "
              f"{r['maxrss_parent_mib']:>7} {r['maxrss_largest_worker_mib']:>7} {r['bound_mib']:>7}  "
              f"{r['per_reason']}")
    write_json_atomic(out, result)
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: reports/bench/ingest[_hostile].json")
    parser.add_argument("--hostile", action="store_true", help="peak memory on hostile files instead")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--make-hostile", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return 0
    if args.make_hostile:
        sys.path.insert(0, str(REPO / "tests"))
        from dicom_factory import CONSISTENT, HOSTILE, hostile_corpus

        name = args.make_hostile[1]
        names = [n for n in HOSTILE if n != CONSISTENT] if name == ALL_LYING else [name]
        print(json.dumps(hostile_corpus(Path(args.make_hostile[0]), names)))
        return 0
    if args.hostile:
        return hostile(args.workers, args.out or REPO / "reports" / "bench" / "ingest_hostile.json")
    args.out = args.out or REPO / "reports" / "bench" / "ingest.json"

    from spinedxa.files import write_json_atomic

    rows = []
    with tempfile.TemporaryDirectory(prefix="spinedxa-bench-") as tmp:
        work = Path(tmp)
        bases = base_scans(work)
        for n in args.sizes:
            source = work / f"source_{n}"
            paths = make_source(bases, n, source)
            before = bare_rate(paths)
            ing = ingest_run(source, work / f"out_{n}" / "ingested", args.workers)
            after = bare_rate(paths)
            bare, bare_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            steady_cpu = ing["cpu_seconds"] - ing["startup_cpu_seconds"]
            rows.append({
                "n_files": n,
                "bare_files_per_s": round(bare, 1),
                "ingest_files_per_s": ing["files_per_s"],
                "ingest_files_per_s_per_worker": round(ing["files_per_s"] / args.workers, 1),
                "per_core_ratio": round(ing["files_per_s"] / args.workers / bare, 3),
                # Contention-free view on a shared machine: files per CPU second, ingest tree vs bare loop.
                "bare_files_per_cpu_s": round(bare_cpu, 1),
                "bare_files_per_cpu_s_before_after": [round(before[1], 1), round(after[1], 1)],
                "ingest_files_per_cpu_s": round(n / ing["cpu_seconds"], 1),
                "per_cpu_ratio": round(n / ing["cpu_seconds"] / bare_cpu, 3),
                "ingest_startup_cpu_s": ing["startup_cpu_seconds"],
                "ingest_files_per_cpu_s_steady": round(n / steady_cpu, 1),
                "per_cpu_ratio_steady": round(n / steady_cpu / bare_cpu, 3),
                "ingest_seconds": ing["seconds"],
                "ingest_peak_rss_mib": ing["peak_rss_mib"],
                "n_accepted": ing["n_accepted"],
            })
            shutil.rmtree(source)  # keep the temporary disk use to one size at a time
            shutil.rmtree(work / f"out_{n}")
    peaks = [r["ingest_peak_rss_mib"] for r in rows]
    result = {
        "workers": args.workers,
        "cpu": {"logical_cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "image": "256 x 192, 16-bit, Explicit VR Little Endian (synthetic DXA)",
        "rows": rows,
        "goal_per_core_ratio_met": all(r["per_core_ratio"] >= 0.5 for r in rows),  # wall clock: load-dependent
        "goal_per_cpu_ratio_met": all(r["per_cpu_ratio"] >= 0.5 for r in rows),
        "goal_per_cpu_ratio_steady_met": all(r["per_cpu_ratio_steady"] >= 0.5 for r in rows),
        "peak_rss_growth": round(max(peaks) / min(peaks), 3),
    }
    print(f"{'files':>6} {'bare f/s':>9} {'ingest f/s':>11} {'per worker':>11} {'ratio':>6} "
          f"{'bare f/cpu-s':>13} {'ingest f/cpu-s':>15} {'ratio':>6} {'steady f/cpu-s':>15} {'ratio':>6} "
          f"{'peak MiB':>9}")
    for r in rows:
        print(f"{r['n_files']:>6} {r['bare_files_per_s']:>9} {r['ingest_files_per_s']:>11} "
              f"{r['ingest_files_per_s_per_worker']:>11} {r['per_core_ratio']:>6} {r['bare_files_per_cpu_s']:>13} "
              f"{r['ingest_files_per_cpu_s']:>15} {r['per_cpu_ratio']:>6} {r['ingest_files_per_cpu_s_steady']:>15} "
              f"{r['per_cpu_ratio_steady']:>6} {r['ingest_peak_rss_mib']:>9}")
    print(f"workers={args.workers}, load average {result['cpu']['load_avg_1m']}, "
          f"peak RSS growth x{result['peak_rss_growth']}, goal (per CPU second) met: all-in "
          f"{result['goal_per_cpu_ratio_met']}, steady {result['goal_per_cpu_ratio_steady_met']}; "
          f"wall-clock per-core goal met: {result['goal_per_core_ratio_met']}")
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
