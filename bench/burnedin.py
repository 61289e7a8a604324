"""Benchmark of the burned-in text check (spinedxa.burnedin): detection on the synthetic cohort, and its cost.

Synthesizes the cohort of ``--params`` (default: the repo's params.yaml, i.e. the default 174 scans plus their
burned-in banner copies; ``--profile profiles/tiny.yaml`` for the tiny one) into a temporary directory, then, in this
process, with the OCR on one thread (as each ingest worker runs it):

* every file is decoded (:func:`spinedxa.imaging.decode_file`) and checked (:func:`spinedxa.burnedin.screen`, policy
  ``quarantine``, with the file's own header PHI values): the detection table against the truth CSV (banner copies
  caught / missed, clean scans flagged, level labels allowed) and the cost per image (mean, p95), clean and banner;
* every banner copy is checked again with policy ``redact``, and the redacted image is OCR'd once more: no fake PHI
  value of its header may be readable in it;
* files per second with and without the check: decoding alone vs decoding + header PHI + check (wall and CPU time);
* the cost per image at typical export sizes (512 x 384 and 1024 x 768, uint16 and uint8), clean and with a banner.

Wall-clock figures move with the load of a shared machine; the CPU-second figures much less. The CPU model is
recorded with the numbers. Prints a summary and writes ``reports/bench/burnedin.json``. Usage::

    python bench/burnedin.py [--params params.yaml] [--profile profiles/tiny.yaml] [--size-reps 5]
        [--out reports/bench/burnedin.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spinedxa import burnedin  # noqa: E402 - after the repo is on the path
from spinedxa.config import apply_profile, load_params  # noqa: E402
from spinedxa.files import write_json_atomic  # noqa: E402
from spinedxa.imaging import decode_file  # noqa: E402
from spinedxa.synthesize import banner_lines, draw_banner, plan_cohort, render_scan, synthesize_cohort  # noqa: E402

SIZES = ((512, 384), (1024, 768))
MAX_PIXELS = 50_000_000


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stats(seconds: list[float]) -> dict[str, float]:
    arr = np.asarray(seconds, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "mean_ms": round(1000 * float(arr.mean()), 1),
            "p95_ms": round(1000 * float(np.percentile(arr, 95)), 1), "max_ms": round(1000 * float(arr.max()), 1)}


def cohort_run(cohort: Path, truth: pd.DataFrame) -> dict:
    """Decode and check every file of the cohort; the detection table, the redaction check and the rates."""
    rows, wall, cpu = [], {"decode": 0.0, "check": 0.0}, {"decode": 0.0, "check": 0.0}
    ocr_clean, ocr_banner, redaction = [], [], []
    for record in truth.itertuples(index=False):
        path = cohort / record.source
        w0, c0 = time.perf_counter(), time.process_time()
        data = path.read_bytes()
        decoded = decode_file(path, max_pixels=MAX_PIXELS, multiframe="first", data=data)
        w1, c1 = time.perf_counter(), time.process_time()
        phi = burnedin.header_phi_values(pydicom.dcmread(path, stop_before_pixels=True))
        t_ocr = time.perf_counter()
        screening = burnedin.screen(decoded.pixels, phi, policy="quarantine")
        w2, c2 = time.perf_counter(), time.process_time()
        wall["decode"] += w1 - w0
        cpu["decode"] += c1 - c0
        wall["check"] += w2 - w1
        cpu["check"] += c2 - c1
        (ocr_banner if record.burned_in else ocr_clean).append(w2 - t_ocr)
        finding = screening.finding
        rows.append({"burned_in": bool(record.burned_in), "level_labels": bool(record.level_labels),
                     "flagged": finding.flagged, "allowed": finding.allowed, "phi": finding.phi})
        if record.burned_in:
            redacted = burnedin.screen(decoded.pixels, phi, policy="redact")
            tokens = burnedin.phi_tokens(phi)
            readable = [tb for tb in burnedin.detect_text(redacted.image) if burnedin.matches_phi(tb.text, tokens)]
            redaction.append({"accepted": redacted.accepted, "residual": redacted.residual,
                              "phi_readable": len(readable)})
    table = pd.DataFrame(rows)
    banner, clean = table[table["burned_in"]], table[~table["burned_in"]]
    labelled = clean[clean["level_labels"]]
    n = len(table)
    return {
        "files": n,
        "detection": {
            "banner_copies": len(banner),
            "caught": int(banner["flagged"].sum()),
            "missed": int((~banner["flagged"]).sum()),
            "banner_copies_with_header_phi_matched": int((banner["phi"] > 0).sum()),
            "clean_scans": len(clean),
            "false_alarms": int(clean["flagged"].sum()),
            "false_alarm_rate": round(float(clean["flagged"].mean()), 4) if len(clean) else None,
            "scans_with_level_labels": len(labelled),
            "false_alarms_with_level_labels": int(labelled["flagged"].sum()),
            "level_labels_drawn": 4 * len(labelled),
            "level_labels_read_and_allowed": int(labelled["allowed"].sum()),
        },
        "redact": {
            "banner_copies": len(redaction),
            "accepted_after_redaction": sum(r["accepted"] for r in redaction),
            "residual_regions": sum(r["residual"] for r in redaction),
            "phi_readable_after_redaction": sum(r["phi_readable"] for r in redaction),
        },
        "ocr_cost_per_image": {"clean": _stats(ocr_clean), "banner": _stats(ocr_banner),
                               "all": _stats(ocr_clean + ocr_banner)},
        "files_per_s": {
            "without_check": round(n / wall["decode"], 1),
            "with_check": round(n / (wall["decode"] + wall["check"]), 1),
            "without_check_per_cpu_s": round(n / max(cpu["decode"], 1e-9), 1),
            "with_check_per_cpu_s": round(n / max(cpu["decode"] + cpu["check"], 1e-9), 1),
        },
    }


def size_run(params, reps: int) -> list[dict]:
    """Cost per image of :func:`burnedin.screen` at typical export sizes, uint16 and uint8, clean and with a banner."""
    plan = plan_cohort(dataclasses.replace(params.synthesize, n_scans=4, n_osteoporosis=2), params.data.classes)[0]
    out = []
    for height, width in SIZES:
        spacing = params.synthesize.pixel_spacing_mm * params.synthesize.height / height  # same field of view
        image = render_scan(np.random.default_rng(0), -2.0, height=height, width=width, pixel_spacing_mm=spacing)
        rng = np.random.default_rng(1)
        with_banner = draw_banner(image, banner_lines(plan.identity, rng), rng, 16)
        for dtype in ("uint16", "uint8"):
            for kind, img in (("clean", image), ("banner", with_banner)):
                pixels = img if dtype == "uint16" else (img // 256).astype(np.uint8)
                times, flagged = [], []
                for _ in range(reps):
                    start = time.perf_counter()
                    flagged.append(burnedin.screen(pixels).finding.flagged)
                    times.append(time.perf_counter() - start)
                out.append({"size": f"{height}x{width}", "dtype": dtype, "image": kind, **_stats(times),
                            "flagged": all(flagged) if kind == "banner" else any(flagged)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", type=Path, default=None, help="a profile to merge into the params first")
    parser.add_argument("--size-reps", type=int, default=5, help="repetitions per size for the per-size cost")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "burnedin.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="spinedxa-bench-ocr-") as tmp:
        work = Path(tmp)
        shutil.copy(args.params, work / "params.yaml")
        params = (apply_profile(work / "params.yaml", args.profile) if args.profile
                  else load_params(work / "params.yaml"))
        truth = synthesize_cohort(params.synthesize, work / "cohort", work / "truth.csv", params.data.classes)
        start = time.perf_counter()
        burnedin._engine()  # model loading, once per process (each ingest worker pays it once)
        init_s = time.perf_counter() - start
        cohort = cohort_run(work / "cohort", truth)
    sizes = size_run(params, args.size_reps)
    result = {
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                "ocr_threads": burnedin.OCR_THREADS},
        "library": {name: importlib.metadata.version(name) for name in ("rapidocr", "onnxruntime")},
        "cohort": {"params": str(args.params.name), "profile": args.profile.name if args.profile else None,
                   "height": params.synthesize.height, "width": params.synthesize.width,
                   "burned_in_fraction": params.synthesize.burned_in_fraction,
                   "level_label_fraction": params.synthesize.level_label_fraction},
        "engine_init_s": round(init_s, 2),
        **cohort,
        "cost_by_size": sizes,
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: result[k] for k in ("cpu", "detection", "redact", "ocr_cost_per_image", "files_per_s")},
                     indent=1))
    for row in sizes:
        print(f"{row['size']:>9} {row['dtype']:>6} {row['image']:>6}: mean {row['mean_ms']:7.1f} ms, "
              f"p95 {row['p95_ms']:7.1f} ms, flagged {row['flagged']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
