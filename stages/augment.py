"""augment: offline augmented copies of the training split, and a grid of examples.

Reads:  --splits (data/split/splits.csv; only rows with split == train) and the training images they name under
        --images (data/ingested). Validation and test images are never opened.
Writes: --out (data/augmented: images/<sha256[:16]>_aug<k>.png and index.csv, replaced atomically) and
        --grid (reports/figures/augment_grid.png).
Params: augment (seed, expand, and the technique settings; see spinedxa/augment.py).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from spinedxa.augment import augment_training_set, write_grid
from spinedxa.config import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # One thread: the images are small, and a fixed thread count keeps float reductions (contrast's mean) in the
    # same order on every machine, so the written PNGs are byte-identical for the same params.
    torch.set_num_threads(1)
    cfg = load_params(args.params).augment
    augment_training_set(cfg, args.splits, args.images, args.out)
    write_grid(cfg, args.splits, args.images, args.grid)


if __name__ == "__main__":
    main()
