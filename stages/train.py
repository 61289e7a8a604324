"""train: train one model on every fold (train@<model>, a DVC matrix stage) and record it in MLflow.

Reads:  --splits (data/split/splits.csv: each fold's train and val rows; test rows are never read), the ROI images
        they name under --images (data/ingested), --augmented (data/augmented: offline copies, index.csv), and
        --weights (weights/<model>: the pre-trained file train.<model>.weights names, with its record; never
        downloaded: a missing file stops the stage with exit 1 and the command that brings it in), and
        --pretrained (models/pretrained/<model>: the pretrain stage's backbone and record, for weights: pretrained).
Writes: --out (models/<model>/fold<k>/model.pt: fold k's best epoch's state dict, fold<k>/meta.json;
        models/<model>/meta.json: the parent run and runtime; keys in docs/CONTRACTS.md),
        --curves (reports/train/<model>.csv: fold, epoch, train_loss, val_loss, val_auc, val_accuracy, lr, seconds),
        --checkpoints (checkpoints/<model>/fold<k>/ while training; removed once every fold has finished),
        and MLflow: a parent run per model with a nested run per fold (store: $MLFLOW_TRACKING_URI, else
        sqlite:///mlflow.db in the working directory).
Params: data.classes, augment, train.{seed, device, fast, threads, class_weighting, monitor, patience},
        train.<model> (its weights: none | imagenet | pretrained | weights/<model>/<file>, and how pre-trained
        layers are tuned: freeze_epochs, backbone_lr_factor, bn_mode). Bookkeeping (not DVC params):
        runtime.train_processes (folds side by side), runtime.mlflow_experiment ($MLFLOW_EXPERIMENT_NAME overrides
        it). $SPINEDXA_THREADS overrides train.threads.

Several processes: ``torchrun --nproc_per_node N --standalone stages/train.py ...`` trains with DDP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa import forkserver
from spinedxa.config import MODEL_NAMES, load_params
from spinedxa.errors import stage_main

log = logging.getLogger("spinedxa.train")


@stage_main("train")  # a ConfigError (e.g. fine-tuning knobs with weights: none): a message, no traceback
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--augmented", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--curves", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--weights", type=Path, help="the model's pre-trained weights directory (dvc.yaml passes it; "
                        "default: weights/<model>)")
    parser.add_argument("--pretrained", type=Path, help="the pretrain stage's directory of the model (dvc.yaml passes "
                        "it; default: models/pretrained/<model>)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if argv is None:  # a stage process: its training processes' server imports beside its imports below
        forkserver.start_early("spinedxa.train", params.runtime.train_processes)
    from spinedxa.train import TrainPaths, train_model
    from spinedxa.weights import WeightsError, WeightsNotFoundError

    # force: importing mlflow has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )

    paths = TrainPaths(args.splits, args.images, args.augmented, args.out, args.curves, args.checkpoints,
                       args.weights, args.pretrained)
    try:
        train_model(params, args.model, paths)
    except (WeightsNotFoundError, WeightsError) as exc:  # the user's to fix: the message says how, no traceback
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
