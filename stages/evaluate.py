"""evaluate: score every fold model on its held-out part, out of fold (evaluate@<model>, a DVC matrix stage), and the
external cohort with the model's fold ensemble.

Reads:  --model-dir (models/<model>/fold<k>/model.pt + meta.json, models/<model>/meta.json), --splits
        (data/split/splits.csv: each fold's test rows only) and the ROI images they name under --images;
        --external (data/external: the external cohort's manifest and ROIs, or its disabled marker).
Writes: --metrics (reports/metrics/<model>.json: pooled out-of-fold metrics with 95 % patient-bootstrap CIs,
        per-fold mean and SD, patient-level metrics, external_* metrics of the external cohort; numbers only, at a
        fixed precision; docs/CONTRACTS.md),
        --predictions (reports/predictions/<model>.csv: one row per scored scan, with its fold),
        --external-predictions (reports/predictions/external/<model>.csv: the fold ensemble on the external cohort),
        --provenance (reports/provenance/<model>.json: MLflow run, model hashes, commit, fast path: not a metric),
        --plots (reports/plots/<model>/roc.csv, pr.csv, calibration.csv),
        --gradcam (reports/figures/gradcam_<model>.png; degenerate maps flagged),
        and the pooled metrics (prefixed test_) plus these files into the model's MLflow parent run, each fold's
        metrics into its nested run.
Params: data.classes, evaluate (seed, bootstrap, threshold, gradcam_images), split.protocol, train.device,
        train.<model>.image_size, ingest.roi (the input's aspect).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import MODEL_NAMES, load_params
from spinedxa.errors import stage_main
from spinedxa.evaluate import EvaluatePaths, evaluate_model


@stage_main("evaluate")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--external", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--external-predictions", type=Path, required=True)
    parser.add_argument("--provenance", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--gradcam", type=Path, required=True)
    args = parser.parse_args(argv)
    # force: importing mlflow has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    paths = EvaluatePaths(args.model_dir, args.splits, args.images, args.metrics, args.predictions, args.plots,
                          args.gradcam, args.external, args.external_predictions, args.provenance)
    record = evaluate_model(load_params(args.params), args.model, paths)
    logging.getLogger("evaluate").info(
        "%s: out-of-fold ROC-AUC %s [%s, %s], accuracy %s on %d scans of %d patients; external ROC-AUC %s (n %s)",
        args.model, record["roc_auc"], record["roc_auc_ci_low"], record["roc_auc_ci_high"],
        record["accuracy"], record["n_test"], record["n_test_patients"], record.get("external_roc_auc"),
        record.get("external_n"),
    )


if __name__ == "__main__":
    sys.exit(main())
