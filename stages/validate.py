"""validate: check the ingest manifest with a great-expectations suite before anything is split or trained.

Reads:   --manifest (data/ingested/manifest.csv)
Writes:  --docs (reports/validation/: great-expectations Data Docs, open index.html in a browser)
         --summary (reports/validation.json: DVC metric with success, counts, blocking failures, warnings and one
         entry per expectation)
Params:  data.classes, validate.* (min_per_class, max_quarantine_rate, min_side, max_side, min_std,
         phash_max_distance)

Exits non-zero (spinedxa.validate.ValidationFailed) after writing both reports when a blocking (severity error)
expectation fails; warnings are reported and do not block.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.validate import validate_manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--manifest", type=Path, required=True, help="ingest manifest (CSV)")
    parser.add_argument("--docs", type=Path, required=True, help="directory for the Data Docs site (replaced)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary (DVC metric)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    summary = validate_manifest(args.manifest, load_params(args.params), args.docs, args.summary)
    print(json.dumps({k: summary[k] for k in ("success", "n_rows", "n_accepted", "warnings")}))


if __name__ == "__main__":
    main()
