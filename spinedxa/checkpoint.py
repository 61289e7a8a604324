"""Checkpoints of a training: what determines its result (the fingerprint), its RNG states, and safe save/load.

A checkpoint resumes a killed training only under the same fingerprint: the model's params block, the common train
params, augment params, classes, the fold, the DVC digests of the data, and the runtime facts that change numerics
(fast path, threads, world size). Anything else is ignored with a warning, never resumed. Files are read with
``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from spinedxa.config import Params
from spinedxa.files import atomic_path

log = logging.getLogger(__name__)

#: The train params every model shares that decide a result (dvc.yaml lists them per train stage).
COMMON_TRAIN_KEYS = ("seed", "device", "fast", "threads", "class_weighting", "monitor", "patience", "tta")


def fingerprint(params: Params, model: str, fold: int, digests: Mapping[str, str], runtime: Mapping[str, Any]) -> str:
    """sha256 of everything that determines one fold's training; a checkpoint resumes only under the same one."""
    train = params.train
    blob = {
        "model": model,
        "fold": fold,
        "block": dataclasses.asdict(train.model(model)),
        "train": {key: getattr(train, key) for key in COMMON_TRAIN_KEYS},
        "augment": dataclasses.asdict(params.augment),
        "classes": list(params.data.classes),
        "roi": params.ingest.roi,  # the ROIs' aspect, hence the input shape
        "data": dict(sorted(digests.items())),
        "runtime": dict(sorted(runtime.items())),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the training draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "loader": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached"])
    )
    random.setstate(_as_tuple(state["python"]))
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` needs the tuple it gave)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically: a kill during the write leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when its fingerprint matches; None (with a warning) when absent or stale.

    Raises:
        RuntimeError: the file exists but cannot be read as a checkpoint (the message names it).
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it to train from "
                           "scratch") from exc
    found = state.get("fingerprint") if isinstance(state, dict) else None
    if found != expected_fingerprint:
        log.warning("ignoring checkpoint %s: its fingerprint %s does not match this training's %s "
                    "(params, data or runtime changed); training from scratch",
                    path, str(found)[:12], expected_fingerprint[:12])
        return None
    return state
