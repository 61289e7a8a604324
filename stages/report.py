"""report: compare every model out of fold and on the external cohort; write the Markdown and self-contained HTML.

Reads:  --metrics (reports/metrics/<model>.json), --provenance (reports/provenance/<model>.json), --predictions
        (reports/predictions/<model>.csv), --external-predictions (reports/predictions/external/<model>.csv),
        --plots (reports/plots/<model>/{roc,pr,calibration}.csv), --curves (reports/train/<model>.csv) for every
        model in train.models and the baseline; --replay (reports/replay: the leaky ablation and its matched
        control); --transfer (reports/transfer.json) and --transfer-details (reports/transfer: pre-trained vs
        scratch); --manifest (data/ingested/manifest.csv), --splits (data/split/splits.csv), --validation
        (reports/validation.json), --ingest-summary (reports/ingest.json), --split-summary (reports/split.json),
        --external (reports/external: the external cohort's ingest and validation summaries), --external-data
        (data/external: its manifest), --truth (the synthetic cohort's ground truth, read only when data.source is
        the synthetic cohort: burned-in text caught / missed); dvc.lock and git in the working directory for the
        provenance and lineage blocks.
Writes: --out-md (reports/comparison.md) and --out-html (reports/comparison.html: figures embedded as base64 PNG,
        no external references); one MLflow run "data" mirroring the data stages' DVC metrics.
Params: data (classes, map, words), external, ingest.roi, split, train, evaluate, report, replay, pretrain,
        transfer;
        runtime.mlflow_experiment (bookkeeping).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.report import SYNTHETIC_SOURCE, ReportInputs, log_data_metrics, write_report


@stage_main("report")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--provenance", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--external-predictions", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--curves", type=Path, required=True)
    parser.add_argument("--replay", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--transfer", type=Path, required=True)
    parser.add_argument("--transfer-details", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--ingest-summary", type=Path, required=True)
    parser.add_argument("--split-summary", type=Path, required=True)
    parser.add_argument("--external", type=Path, required=True)
    parser.add_argument("--external-data", type=Path, required=True)
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--out-html", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    params = load_params(args.params)
    synthetic = Path(params.data.source).as_posix().rstrip("/") == SYNTHETIC_SOURCE
    inputs = ReportInputs(
        metrics_dir=args.metrics,
        predictions_dir=args.predictions,
        plots_dir=args.plots,
        curves_dir=args.curves,
        manifest=args.manifest,
        splits=args.splits,
        validation=args.validation,
        ingest_summary=args.ingest_summary,
        split_summary=args.split_summary,
        replay_dir=args.replay,
        truth=args.truth if synthetic else None,
        provenance_dir=args.provenance,
        external_predictions_dir=args.external_predictions,
        external_reports=args.external,
        external_data=args.external_data,
        transfer=args.transfer,
        transfer_details=args.transfer_details,
    )
    write_report(params, inputs, args.out_md, args.out_html)
    log_data_metrics(params, inputs)
    logging.getLogger("report").info("wrote %s and %s", args.out_md, args.out_html)


if __name__ == "__main__":
    sys.exit(main())
