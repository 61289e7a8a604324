"""replay: the paper's likely protocol on our cohort, as a labelled LEAKY ablation (never part of the comparison).

Reads:  --images (data/ingested: manifest.csv and the ROI images roi/<sha16>.png of the accepted scans).
Writes: --out (data/replay: images/<sha16>_copy<k>.png, replay.copies augmented copies of every scan made BEFORE the
        split, and index.csv in the augmented-copies contract), and --reports (reports/replay:
        leaky_replay_metrics.json, leaky_replay_predictions.csv, leaky_split.csv in the splits contract), and one
        MLflow run `replay_leaky_ablation` tagged leaky_ablation=true. With replay.enabled false: the same files,
        empty (metrics {"enabled": false}), and no MLflow run.
Params: replay (enabled, copies, test_fraction, seed, epochs), train.cnn21, augment,
        train.{seed, device, fast, threads, class_weighting, monitor, patience}, evaluate, data.classes.
        Bookkeeping (not DVC params): runtime.mlflow_experiment ($MLFLOW_EXPERIMENT_NAME overrides it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.replay import ReplayPaths, run_replay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args(argv)
    # force: importing mlflow has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    record = run_replay(load_params(args.params), ReplayPaths(args.images, args.out, args.reports))
    if record["enabled"]:
        logging.getLogger("replay").info(
            "LEAKY replay of %s: accuracy %.4f, ROC-AUC %s on %d test images of %d scans (%d patients); %.1f CPU s",
            record["model"], record["accuracy"], record["roc_auc"], record["n_test_images"], record["n_test_scans"],
            record["n_test_patients"], record["cpu_seconds"],
        )


if __name__ == "__main__":
    main()
