"""Stage `synthesize`: write the embedded default cohorts of synthetic AP lumbar spine DXA scans.

Reads:   params.yaml (section `synthesize`).
Writes:  --out     <dir>/<WHO class>/scan_NNNN.dcm (DICOM, Modality BMD, 16-bit, fake PHI in the headers), replaced
                   whole; the folders are the WHO classes (normal/, osteopenia/, osteoporosis/), as real cohorts come;
         --truth   the ground-truth CSV (T-score, BMD, WHO class, confounders; no PHI), keyed by `source`;
         --external-out, --external-truth   the same for the external cohort (`synthesize.external`: its own seed
                   and a simulated second scanner), the default `external.source`;
         --figure  a PNG with example scans of each class.
Params:  synthesize.* (seed, counts, follow-up share, image geometry, MONOCHROME1 share, confounder rates, burned-in
         banner and level-label shares, the external cohort and its scanner),
         runtime.workers (bookkeeping, not a DVC param: the bytes do not depend on it).

Usage (as in dvc.yaml):
    python stages/synthesize.py --params params.yaml --out data/raw/synthetic \
        --truth data/truth/synthetic_truth.csv --external-out data/raw/external \
        --external-truth data/truth/external_truth.csv --figure reports/figures/synthetic_examples.png
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.files import write_text_atomic
from spinedxa.synthesize import AuditError, external_cohort, plot_examples, shortcut_audit, synthesize_cohort

log = logging.getLogger("spinedxa.stages.synthesize")


@stage_main("synthesize")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="cohort directory (replaced)")
    parser.add_argument("--truth", type=Path, required=True, help="ground-truth CSV")
    parser.add_argument("--external-out", type=Path, required=True, help="external cohort directory (replaced)")
    parser.add_argument("--external-truth", type=Path, required=True, help="external ground-truth CSV")
    parser.add_argument("--figure", type=Path, required=True, help="PNG of example scans")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(args.params)
    workers = params.runtime.workers
    start = time.perf_counter()
    truth = synthesize_cohort(params.synthesize, args.out, args.truth, workers=workers)
    log.info("%d files in %.1f s with %d worker(s)", len(truth), time.perf_counter() - start, workers)
    plot_examples(params.synthesize, args.figure)
    # Logged, not written (the stage's outputs are fixed by dvc.yaml); AUCs near 0.5 mean no intensity shortcut.
    # A diagnostic only: a cohort too small to cross-validate is still a valid cohort.
    try:
        log.info("shortcut audit: %s", shortcut_audit(truth).as_dict())
    except AuditError as exc:
        log.warning("shortcut audit skipped: %s", exc)
    external = external_cohort(params.synthesize)
    if external is None:
        # No external cohort is synthesized: its outputs exist (DVC requires them) and say so.
        shutil.rmtree(args.external_out, ignore_errors=True)
        args.external_out.mkdir(parents=True)
        write_text_atomic(args.external_out / "NOT_SYNTHESIZED.txt",
                          "synthesize.external is not set: no external synthetic cohort was written.\n")
        write_text_atomic(args.external_truth, "source\n")
        return
    cohort, scanner = external
    truth = synthesize_cohort(cohort, args.external_out, args.external_truth, scanner=scanner, workers=workers)
    log.info("external cohort: %d files (seed %d, second scanner %s)", len(truth), cohort.seed, scanner)


if __name__ == "__main__":
    raise SystemExit(main())
