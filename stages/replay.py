"""replay: the paper's likely protocol on our cohort against a matched control, as a labelled LEAKY ablation (never
part of the comparison).

Reads:  --images (data/ingested: manifest.csv and the ROI images roi/<sha16>.png of the accepted scans).
Writes: --out (data/replay: images/<sha16>_copy<k>.png, replay.copies augmented copies of every scan, and index.csv
        in the augmented-copies contract), and --reports (reports/replay, spinedxa/contracts/replay.py: for the LEAKY
        run, augment then split, leaky_replay_metrics.json, leaky_replay_predictions.csv, leaky_split.csv,
        leaky_matched_predictions.csv; for the matched CONTROL, split by patient then augment,
        matched_control_metrics.json with the paired inflation, matched_control_predictions.csv,
        matched_control_split.csv), and one MLflow run `replay_leaky_ablation` tagged leaky_ablation=true. With
        replay.enabled false: the same files, empty (metrics {"enabled": false}), and no MLflow run.
Params: replay (enabled, copies, test_fraction, seed, epochs), train.cnn21, train.tta, augment,
        train.{seed, device, fast, threads, class_weighting, monitor, patience}, evaluate, data.classes.
        Bookkeeping (not DVC params): runtime.mlflow_experiment ($MLFLOW_EXPERIMENT_NAME overrides it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa import forkserver
from spinedxa.config import load_params
from spinedxa.errors import stage_main


@stage_main("replay")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if argv is None:  # a stage process: the two runs' server imports beside its imports below
        forkserver.start_early("spinedxa.replay", params.runtime.train_processes if params.replay.enabled else 1)
    from spinedxa.replay import ReplayPaths, run_replay

    # force: importing mlflow has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    records = run_replay(params, ReplayPaths(args.images, args.out, args.reports))
    leaky, control = records.leaky, records.control
    if leaky["enabled"]:
        inflation = control["inflation"]
        logging.getLogger("replay").info(
            "LEAKY replay of %s: ROC-AUC %s on its %d test copies; on the %d matched scans of %d patients: leaky %s, "
            "control %s, inflation %s [%s, %s] (paired patient bootstrap); %.1f s wall, %.1f CPU s",
            leaky["model"], leaky["roc_auc"], leaky["n_test_images"], inflation["n_scans"], inflation["n_patients"],
            leaky["matched"]["roc_auc"], control["roc_auc"], inflation["roc_auc"], inflation["roc_auc_ci_low"],
            inflation["roc_auc_ci_high"], leaky["wall_seconds"], leaky["cpu_seconds"],
        )


if __name__ == "__main__":
    sys.exit(main())
