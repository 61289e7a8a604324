"""report: compare every model on the test split and write the Markdown and self-contained HTML reports.

Reads:  --metrics (reports/metrics/<model>.json), --predictions (reports/predictions/<model>.csv),
        --plots (reports/plots/<model>/{roc,pr,calibration}.csv) for every model in train.models and the baseline;
        --manifest (data/ingested/manifest.csv), --splits (data/split/splits.csv), --validation
        (reports/validation.json), --ingest-summary (reports/ingest.json), --split-summary (reports/split.json);
        dvc.lock and `git rev-parse HEAD` in the working directory for the lineage block, when present.
Writes: --out-md (reports/comparison.md) and --out-html (reports/comparison.html: figures embedded as base64 PNG,
        no external references).
Params: data.classes, data.source, train.models (+ train.<model>.{weights, epochs, image_size} to explain a CNN that
        does not beat the baseline), evaluate.bootstrap, evaluate.seed, evaluate.threshold, report.paper_*.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.report import ReportInputs, write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--ingest-summary", type=Path, required=True)
    parser.add_argument("--split-summary", type=Path, required=True)
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--out-html", type=Path, required=True)
    args = parser.parse_args(argv)
    # force: importing mlflow (through spinedxa.train) has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    inputs = ReportInputs(
        metrics_dir=args.metrics,
        predictions_dir=args.predictions,
        plots_dir=args.plots,
        manifest=args.manifest,
        splits=args.splits,
        validation=args.validation,
        ingest_summary=args.ingest_summary,
        split_summary=args.split_summary,
    )
    write_report(load_params(args.params), inputs, args.out_md, args.out_html)
    logging.getLogger("report").info("wrote %s and %s", args.out_md, args.out_html)


if __name__ == "__main__":
    main()
