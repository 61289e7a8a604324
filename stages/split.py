"""split: patient-grouped, stratified assignment of the accepted scans to folds and to train / val / test roles.

Reads:   --manifest (data/ingested/manifest.csv), --validated (data/validated/: verdict.json must say success for
         this very manifest, else the stage refuses to run; near_duplicates.csv, the confirmed near-duplicate pairs
         whose patients are kept in one group)
Writes:  --out (data/split/splits.csv: one row per scan and fold: source, sha256, patient_id, label, image, roi, fold,
         split; docs/CONTRACTS.md)
         --summary (reports/split.json: DVC metric with images and patients per fold, role and class)
Params:  data.classes, split.* (protocol, seed, folds, val, test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.split import split_manifest


@stage_main("split")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--manifest", type=Path, required=True, help="ingest manifest (CSV)")
    parser.add_argument("--validated", type=Path, required=True, help="validate stage's output directory")
    parser.add_argument("--out", type=Path, required=True, help="split table (CSV)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary (DVC metric)")
    args = parser.parse_args(argv)

    summary = split_manifest(args.manifest, args.validated, load_params(args.params), args.out, args.summary)
    print(json.dumps({"protocol": summary["protocol"], "folds": summary["folds"]}))


if __name__ == "__main__":
    sys.exit(main())
