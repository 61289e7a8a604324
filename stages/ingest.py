"""Stage ``ingest``: raw scans -> de-identified, normalised 16-bit PNGs and a manifest.

Reads:   --source (data.source): DICOM / PNG / JPEG / TIFF files labelled by class folders or labels.csv.
Writes:  --out (data/ingested): images/<sha256[:16]>.png (the processed scan), roi/<sha256[:16]>.png (its located
         L1-L4 region, what the models and the baseline see) and manifest.csv (docs/CONTRACTS.md);
         --summary (reports/ingest.json): counts per status, label, reason and format;
         --roi-figure (reports/figures/roi_examples.png): located ROIs on sample scans of both classes.
Params:  data.classes, data.class_map (the label policy, spinedxa.task), ingest.* (max_side, max_pixels, multiframe, roi, roi_height, worker_memory_mb);
         runtime.workers (bookkeeping, not a DVC param: the output does not depend on it).
Secret:  $SPINEDXA_DEID_KEY, else .spinedxa/deid.key (created on first use): keys the patient pseudonyms.

Exit status 1 on a systemic problem (source missing or empty, labels.csv malformed or not UTF-8 / UTF-16 with BOM, a
worker process killed, no file accepted), after the summary has been written; per-file problems only quarantine the
file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa import roi
from spinedxa.config import load_params
from spinedxa.contracts import manifest as manifest_contract
from spinedxa.errors import stage_main
from spinedxa.ingest import run_ingest

log = logging.getLogger("spinedxa.ingest")


@stage_main("ingest")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--source", type=Path, required=True, help="directory of raw scans (data.source)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (data/ingested)")
    parser.add_argument("--summary", type=Path, required=True, help="summary JSON (reports/ingest.json)")
    parser.add_argument("--roi-figure", type=Path, required=True, help="PNG of located ROIs (reports/figures)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    params = load_params(args.params)
    run_ingest(args.source, args.out, args.summary, task=params.data.task, settings=params.ingest,
               workers=params.runtime.workers, progress=not args.no_progress)
    manifest = manifest_contract.read(args.out / manifest_contract.FILE_NAME)
    roi.write_examples_figure(manifest, args.out, args.roi_figure, params.data.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
