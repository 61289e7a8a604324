"""pretrain: transferable weights with no download, from a synthetic DXA pool (spinedxa/pretrain.py).

Reads:  nothing but params: the pool is rendered in-process by the synthetic cohort's forward model and scanner from
        its own seed (pretrain.seed, disjoint from synthesize.seed and synthesize.external.seed), so it never holds a
        scan of the cohort, the external cohort or any fold's held-out part.
Writes: --out (models/pretrained/<model>/model.pt: the backbone of each network in pretrain.models after regressing
        the pool scans' T-score, and model.pt.json, its record: sha256, what it saw, its loss curve and cost; the
        other models, or all with pretrain.enabled false, get not_pretrained.json only) and --summary
        (reports/pretrain.json: seconds per network, the CPU; {"enabled": false} when disabled).
Params: pretrain, synthesize (the forward model and scanner; its seeds, which the pool's must differ from), ingest
        (max_side, roi, roi_height: ROI images as ingest makes them), augment, train.{device, fast, threads},
        train.<model>.{image_size, batch_norm}. Bookkeeping (not DVC params): runtime.workers
        (rendering), runtime.train_processes (networks side by side).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spinedxa import forkserver
from spinedxa.config import load_params
from spinedxa.errors import stage_main


@stage_main("pretrain")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if argv is None:  # a stage process: the pretraining processes' server imports beside its imports below
        models = len(params.pretrain.models) if params.pretrain.enabled else 1
        forkserver.start_early("spinedxa.pretrain", min(params.runtime.train_processes, models))
    from spinedxa.pretrain import run_pretrain

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    record = run_pretrain(params, args.out, args.summary)
    if record["enabled"]:
        logging.getLogger("pretrain").info("pretrained %s on %d pool scans in %.0f s on %s", ", ".join(record["models"]),
                                           record["pool_scans"], record["wall_seconds"], record["cpu"])


if __name__ == "__main__":
    sys.exit(main())
