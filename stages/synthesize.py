"""Stage `synthesize`: write the embedded default cohort of synthetic AP lumbar spine DXA scans.

Reads:   params.yaml (sections `synthesize` and `data.classes`).
Writes:  --out     <dir>/<class>/scan_NNNN.dcm (DICOM, Modality BMD, 16-bit, fake PHI in the headers), replaced whole;
         --truth   the ground-truth CSV (T-score, BMD, WHO class, confounders; no PHI), keyed by `source`;
         --figure  a PNG with example scans of each class.
Params:  synthesize.* (seed, counts, follow-up share, image geometry, MONOCHROME1 share, confounder rates, burned-in banner and level-label shares),
         runtime.workers (bookkeeping, not a DVC param: the bytes do not depend on it),
         data.classes (the two class folder names: negative, positive).

Usage (as in dvc.yaml):
    python stages/synthesize.py --params params.yaml --out data/raw/synthetic \
        --truth data/truth/synthetic_truth.csv --figure reports/figures/synthetic_examples.png
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.synthesize import AuditError, plot_examples, shortcut_audit, synthesize_cohort

log = logging.getLogger("spinedxa.stages.synthesize")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="cohort directory (replaced)")
    parser.add_argument("--truth", type=Path, required=True, help="ground-truth CSV")
    parser.add_argument("--figure", type=Path, required=True, help="PNG of example scans")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    params = load_params(args.params)
    start = time.perf_counter()
    truth = synthesize_cohort(params.synthesize, args.out, args.truth, params.data.classes,
                              workers=params.runtime.workers)
    log.info("%d scans in %.1f s with %d worker(s)", len(truth), time.perf_counter() - start,
             params.runtime.workers)
    plot_examples(params.synthesize, params.data.classes, args.figure)
    # Logged, not written (the stage's outputs are fixed by dvc.yaml); AUCs near 0.5 mean no intensity shortcut.
    # A diagnostic only: a cohort too small to cross-validate is still a valid cohort.
    try:
        log.info("shortcut audit: %s", shortcut_audit(truth).as_dict())
    except AuditError as exc:
        log.warning("shortcut audit skipped: %s", exc)


if __name__ == "__main__":
    main()
