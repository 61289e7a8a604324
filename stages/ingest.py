"""Stage ``ingest``: raw scans -> de-identified, normalised 16-bit PNGs and a manifest.

Reads:   --source (data.source): DICOM / PNG / JPEG / TIFF files labelled by class folders or labels.csv.
Writes:  --out (data/ingested): images/<sha256[:16]>.png and manifest.csv (docs/CONTRACTS.md);
         --summary (reports/ingest.json): counts per status, label, reason and format.
Params:  data.classes, ingest.workers, ingest.max_side, ingest.max_pixels, ingest.multiframe, ingest.worker_memory_mb.
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

from spinedxa.config import load_params
from spinedxa.ingest import IngestError, run_ingest

log = logging.getLogger("spinedxa.ingest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--source", type=Path, required=True, help="directory of raw scans (data.source)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (data/ingested)")
    parser.add_argument("--summary", type=Path, required=True, help="summary JSON (reports/ingest.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    params = load_params(args.params)
    try:
        run_ingest(args.source, args.out, args.summary, classes=params.data.classes, settings=params.ingest,
                   progress=not args.no_progress)
    except IngestError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
