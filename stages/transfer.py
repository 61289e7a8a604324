"""transfer: does pretraining help? Each weights source against scratch, same folds, paired bootstrap (spinedxa/transfer.py).

Reads:  --splits (data/split/splits.csv), --images (data/ingested), --augmented (data/augmented), --validated
        (data/validated: near-duplicate groups for the small draws' folds), --external (data/external),
        --predictions (reports/predictions: evaluate's, reused for the condition the train stage ran), --weights
        (weights: e.g. ImageNet files), --pretrained (models/pretrained: the pretrain stage's backbones and records).
Writes: --metrics (reports/transfer.json, a DVC metric: ROC-AUC per model, condition and cohort, and source minus
        scratch with paired patient-bootstrap intervals on the full cohort, small draws and the external cohort; the
        pretraining's cost), --details (reports/transfer: details.json, the predictions of every condition and
        cohort, the small draws' split tables), --checkpoints (while training; removed at the end), and one MLflow run
        "transfer". With transfer.enabled false: {"enabled": false} only.
Params: transfer, train (each condition is train.<model> with its weights replaced), split (the draws' folds),
        augment, ingest.roi, data.classes, evaluate (bootstrap, seed, threshold). Bookkeeping (not DVC params):
        runtime.train_processes, runtime.mlflow_experiment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa.config import load_params
from spinedxa.errors import stage_main
from spinedxa.transfer import TransferPaths, run_transfer


@stage_main("transfer")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("params", "splits", "images", "augmented", "validated", "external", "predictions", "weights",
                 "pretrained", "checkpoints", "metrics", "details"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    paths = TransferPaths(args.splits, args.images, args.augmented, args.validated, args.external, args.predictions,
                          args.weights, args.pretrained, args.checkpoints, args.metrics, args.details)
    record = run_transfer(load_params(args.params), paths)
    if record["enabled"]:
        logging.getLogger("transfer").info("%d trainings in %.0f s; %s", record["trainings"], record["wall_seconds"],
                                           args.metrics)


if __name__ == "__main__":
    sys.exit(main())
