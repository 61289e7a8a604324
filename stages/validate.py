"""validate: check the ingest manifest with a great-expectations suite before anything is split or trained.

Reads:   --manifest (data/ingested/manifest.csv) and the images it names
Writes:  --docs (reports/validation/: great-expectations Data Docs, open index.html in a browser)
         --summary (reports/validation.json: DVC metric with success, counts, blocking failures, warnings and one
         entry per expectation)
         --out (data/validated/: near_duplicates.csv, the confirmed near-duplicate pairs the split groups, and
         verdict.json, the verdict with the sha256 of the manifest it was made on)
Params:  data.classes, validate.* (min_per_class, max_quarantine_rate, min_side, max_side, min_std,
         phash_max_distance, near_duplicate_min_ssim)

Exits with status 1 after writing every output when a blocking (severity error) expectation fails, with one message
naming each failed expectation, its offending rows and what to change (no traceback); warnings do not block.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.validate import validate_manifest


@stage_main("validate")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--manifest", type=Path, required=True, help="ingest manifest (CSV)")
    parser.add_argument("--docs", type=Path, required=True, help="directory for the Data Docs site (replaced)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary (DVC metric)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the near-duplicate pairs and verdict")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    summary = validate_manifest(args.manifest, load_params(args.params), args.docs, args.summary, args.out)
    print(json.dumps({k: summary[k] for k in ("success", "n_rows", "n_accepted", "warnings")}))


if __name__ == "__main__":
    sys.exit(main())
