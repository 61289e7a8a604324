"""baseline: a non-CNN reference, logistic regression on ROI intensity and texture features.

Reads:  data/split/splits.csv, data/ingested/images/*.png
Writes: reports/metrics/baseline.json (same keys as every CNN), reports/predictions/baseline.csv,
        reports/plots/baseline/{roc,pr,calibration}.csv
Params: data.classes, evaluate.seed (model seed, bootstrap seed), evaluate.bootstrap, evaluate.threshold
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spinedxa.baseline import run_baseline
from spinedxa.config import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--splits", type=Path, required=True, help="splits CSV of the split stage")
    parser.add_argument("--images", type=Path, required=True, help="ingested dir (base of the image paths)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--predictions", type=Path, required=True, help="per-image predictions CSV to write")
    parser.add_argument("--plots", type=Path, required=True, help="directory for roc.csv, pr.csv, calibration.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = run_baseline(
        load_params(args.params),
        splits_csv=args.splits,
        images_dir=args.images,
        metrics_path=args.metrics,
        predictions_path=args.predictions,
        plots_dir=args.plots,
    )
    logging.getLogger("baseline").info(
        "test ROC-AUC %s, accuracy %s on %d images (C = %s)",
        record["roc_auc"], record["accuracy"], record["n_test"], record["baseline_c"],
    )


if __name__ == "__main__":
    main()
