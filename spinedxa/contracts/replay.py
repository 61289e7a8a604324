"""``reports/replay/``: the files of the replay ablation (stage ``replay``, :mod:`spinedxa.replay`).

Two trainings of cnn21 with everything equal except the order of "augment" and "split"; every file name says which
run it belongs to, so that nobody mistakes either for an honest result (docs/CONTRACTS.md has the record layouts):

- the **leaky** run (augment every scan, then split the copies at random): :data:`LEAKY_METRICS`, its predictions on
  its own random test set of copies (:data:`LEAKY_PREDICTIONS`), its image-level split (:data:`LEAKY_SPLIT`), and its
  predictions on the matched scans (:data:`LEAKY_MATCHED_PREDICTIONS`);
- the **matched control** (split the scans by patient, then copy the training and validation part only):
  :data:`CONTROL_METRICS` (its metrics on the matched scans and the paired inflation, leaky minus control),
  :data:`CONTROL_PREDICTIONS` (on the matched scans), :data:`CONTROL_SPLIT` (one row per image it used).

Predictions follow :mod:`spinedxa.contracts.predictions`, splits :mod:`spinedxa.contracts.splits`, the metrics files
are JSON records (:mod:`spinedxa.contracts.jsonfile`).
"""

from __future__ import annotations

LEAKY_METRICS = "leaky_replay_metrics.json"
LEAKY_PREDICTIONS = "leaky_replay_predictions.csv"
LEAKY_SPLIT = "leaky_split.csv"
LEAKY_MATCHED_PREDICTIONS = "leaky_matched_predictions.csv"
CONTROL_METRICS = "matched_control_metrics.json"
CONTROL_PREDICTIONS = "matched_control_predictions.csv"
CONTROL_SPLIT = "matched_control_split.csv"
#: Every file the stage writes (enabled or not), in this order.
FILES: tuple[str, ...] = (LEAKY_METRICS, LEAKY_PREDICTIONS, LEAKY_SPLIT, LEAKY_MATCHED_PREDICTIONS, CONTROL_METRICS,
                          CONTROL_PREDICTIONS, CONTROL_SPLIT)
#: Key of the leaky record holding the leaky model's metrics on the matched scans.
MATCHED = "matched"
#: Key of the control record holding leaky minus control on the matched scans (paired patient bootstrap).
INFLATION = "inflation"
