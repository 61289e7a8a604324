"""external: ingest and validate the external cohort (another site or scanner) by the training cohort's rules.

Reads:   --source (external.source: a labelled folder like data.source; default the second synthetic cohort),
         --internal-manifest (data/ingested/manifest.csv: scans of the training cohort are not external)
Writes:  --out (data/external: images/, roi/, manifest.csv, validated/), --summary (reports/external/ingest.json),
         --validation (reports/external/validation.json), --docs (data/external/docs: its Data Docs, DVC-cached);
         with external.enabled false, a DISABLED marker and summaries that say so.
Params:  external.*, data.classes, data.class_map, ingest.*, validate.*; runtime.workers (bookkeeping)

Never trains, calibrates or chooses anything: evaluate and baseline score the cohort with each model's fold ensemble.
Exit status 1 (after the summaries are written) when ingest or validation fails on the external cohort.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.external import run_external


@stage_main("external")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--source", type=Path, required=True, help="external cohort directory (external.source)")
    parser.add_argument("--internal-manifest", type=Path, required=True, help="the training cohort's manifest")
    parser.add_argument("--out", type=Path, required=True, help="output directory (data/external)")
    parser.add_argument("--summary", type=Path, required=True, help="ingest summary JSON")
    parser.add_argument("--validation", type=Path, required=True, help="validation summary JSON")
    parser.add_argument("--docs", type=Path, required=True, help="Data Docs directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    result = run_external(load_params(args.params), args.source, args.internal_manifest, args.out, args.summary,
                          args.validation, args.docs)
    if result["enabled"]:
        logging.getLogger("spinedxa.external").info(
            "external cohort: %d files, %d accepted; validation %s", result["ingest"]["n_files"],
            result["ingest"]["n_accepted"], "passed" if result["validation"]["success"] else "failed")


if __name__ == "__main__":
    sys.exit(main())
