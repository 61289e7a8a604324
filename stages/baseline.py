"""baseline: a non-CNN reference, logistic regression on ROI intensity and texture features.

Reads:  data/split/splits.csv (every fold), the ROI images it names under data/ingested; --external (data/external)
Writes: reports/metrics/baseline.json (pooled out-of-fold and external_* metrics, same keys as every CNN; numbers
        only), reports/predictions/baseline.csv, reports/predictions/external/baseline.csv (the fold ensemble on the
        external cohort), reports/provenance/baseline.json (MLflow run, commit: not a metric),
        reports/plots/baseline/{roc,pr,calibration}.csv; MLflow: a parent run "baseline" with a nested run per fold
Params: data.classes, evaluate.seed (model seed, bootstrap seed), evaluate.bootstrap, evaluate.threshold,
        split.protocol; runtime.mlflow_experiment (bookkeeping)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.baseline import BaselinePaths, log_baseline, run_baseline
from spinedxa.config import load_params
from spinedxa.errors import stage_main


@stage_main("baseline")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--splits", type=Path, required=True, help="splits CSV of the split stage")
    parser.add_argument("--images", type=Path, required=True, help="ingested dir (base of the image paths)")
    parser.add_argument("--external", type=Path, required=True, help="external cohort dir (data/external)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--predictions", type=Path, required=True, help="per-image predictions CSV to write")
    parser.add_argument("--external-predictions", type=Path, required=True, help="external predictions CSV")
    parser.add_argument("--provenance", type=Path, required=True, help="provenance JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="directory for roc.csv, pr.csv, calibration.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = BaselinePaths(args.splits, args.images, args.metrics, args.predictions, args.plots, args.external,
                          args.external_predictions, args.provenance)
    params = load_params(args.params)
    record, fitted = run_baseline(params, paths)
    log_baseline(params, paths, record, fitted)
    logging.getLogger("baseline").info(
        "out-of-fold ROC-AUC %s [%s, %s], accuracy %s on %d scans (C per fold %s); external ROC-AUC %s",
        record["roc_auc"], record["roc_auc_ci_low"], record["roc_auc_ci_high"], record["accuracy"],
        record["n_test"], record["baseline_c"], record.get("external_roc_auc"),
    )


if __name__ == "__main__":
    sys.exit(main())
