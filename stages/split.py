"""split: patient-grouped, stratified train/val/test split of the accepted images (optional k folds).

Reads:   --manifest (data/ingested/manifest.csv), --validation (reports/validation.json: must say success: true
         for this very manifest, else the stage refuses to run)
Writes:  --out (data/split/splits.csv: source, sha256, patient_id, label, image, split [, fold])
         --summary (reports/split.json: DVC metric with images and patients per split and class, actual fractions)
Params:  data.classes, split.* (seed, train, val, test, folds)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.split import split_manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--manifest", type=Path, required=True, help="ingest manifest (CSV)")
    parser.add_argument("--validation", type=Path, required=True, help="validate stage's JSON summary")
    parser.add_argument("--out", type=Path, required=True, help="split table (CSV)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary (DVC metric)")
    args = parser.parse_args(argv)

    summary = split_manifest(args.manifest, args.validation, load_params(args.params), args.out, args.summary)
    print(json.dumps({"images": summary["images"], "patients": summary["patients"]}))


if __name__ == "__main__":
    main()
