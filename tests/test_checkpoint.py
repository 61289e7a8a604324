"""Tests for spinedxa.checkpoint: the fingerprint, RNG state capture/restore, safe save/load."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from spinedxa.checkpoint import COMMON_TRAIN_KEYS, fingerprint, load, rng_state, save, set_rng_state
from spinedxa.config import deep_merge, params_from_dict
from spinedxa.runtime import FP32, THREADS_ENV, Distributed, Runtime, select_fast_path
from train_factory import CPU, make_params, raw_params

RECORD = Runtime(CPU, FP32, 1, Distributed()).record()
DIGESTS = {"data/split/splits.csv": "0" * 32, "data/ingested": "1" * 32 + ".dir", "data/augmented": "2" * 32 + ".dir"}


def _with(params, section: str, values: dict):
    return params_from_dict(deep_merge(raw_params(params), {section: values}))


def _base() -> str:
    return fingerprint(make_params(), "cnn21", 0, DIGESTS, RECORD)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: dict(params=make_params(cnn21={"lr": 0.5})),
        lambda p: dict(params=make_params(cnn21={"label_smoothing": 0.0})),
        lambda p: dict(params=make_params(seed=1)),
        lambda p: dict(params=make_params(monitor="val_loss")),
        lambda p: dict(params=_with(p, "augment", {"rotation_deg": 1.0})),
        lambda p: dict(params=_with(p, "data", {"classes": ["healthy", "osteoporosis"], "class_map": {"osteopenia": "healthy"}})),
        lambda p: dict(params=_with(p, "ingest", {"roi": "whole"})),
        lambda p: dict(model="resnet50"),
        lambda p: dict(fold=1),
        lambda p: dict(digests={**DIGESTS, "data/ingested": "f" * 32 + ".dir"}),
        # The runtime facts that change the floating-point rounding of the result.
        lambda p: dict(runtime={**RECORD, "threads": 2}),
        lambda p: dict(runtime={**RECORD, "fast_path": "cpu_bf16_channels_last"}),
        lambda p: dict(runtime={**RECORD, "world_size": 2}),
        lambda p: dict(runtime={**RECORD, "device": "cuda"}),
    ],
    ids=["model-param", "smoothing", "common-param", "monitor", "augment-param", "classes", "roi", "model", "fold",
         "data-digest", "threads", "fast-path", "world-size", "device"],
)
def test_fingerprint_changes_with_what_determines_the_result(change) -> None:
    params = make_params()
    base = _base()
    assert fingerprint(make_params(), "cnn21", 0, dict(DIGESTS), dict(RECORD)) == base  # stable
    args = {"params": params, "model": "cnn21", "fold": 0, "digests": DIGESTS, "runtime": RECORD, **change(params)}
    assert fingerprint(args["params"], args["model"], args["fold"], args["digests"], args["runtime"]) != base


@pytest.mark.parametrize(
    "params",
    [
        lambda: make_params(vgg16={"lr": 0.5}),  # another model's block: only that model retrains
        lambda: make_params(runtime={"train_processes": 2}),  # bookkeeping: never a result
        lambda: make_params(runtime={"mlflow_experiment": "elsewhere"}),
        lambda: _with(make_params(), "evaluate", {"bootstrap": 10}),  # a later stage's param
    ],
    ids=["other-model", "train-processes", "mlflow-experiment", "evaluate-param"],
)
def test_fingerprint_ignores_what_does_not_change_the_result(params) -> None:
    assert fingerprint(params(), "cnn21", 0, DIGESTS, RECORD) == _base()


def test_common_train_keys_are_train_params() -> None:
    train = make_params().train
    assert all(hasattr(train, key) for key in COMMON_TRAIN_KEYS)
    assert {"threads", "fast", "seed"} <= set(COMMON_TRAIN_KEYS)


def test_spinedxa_threads_changes_the_fingerprint() -> None:
    """``$SPINEDXA_THREADS`` overrides train.threads and changes the rounding (oneDNN splits reductions by thread):
    a checkpoint written under one thread count is not resumed under another."""
    before = torch.get_num_threads()
    try:
        records = [Runtime.setup("cpu", True, 1, env={THREADS_ENV: n}).record() for n in ("1", "2")]
    finally:
        torch.set_num_threads(before)
    assert [r["threads"] for r in records] == [1, 2]
    assert records[0]["fast_path"] == select_fast_path(CPU, True).name  # the machine's fast path is recorded
    params = make_params()
    assert fingerprint(params, "cnn21", 0, DIGESTS, records[0]) != fingerprint(params, "cnn21", 0, DIGESTS, records[1])


def test_fingerprint_ignores_the_rank() -> None:
    """Every rank of a DDP job computes the same fingerprint (rank 0 writes the checkpoint, all resume from it)."""
    fps = {fingerprint(make_params(), "cnn21", 0, DIGESTS, Runtime(CPU, FP32, 1, Distributed(2, r, r, 2)).record())
           for r in (0, 1)}
    assert len(fps) == 1


def test_unreadable_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="last.pt: not a readable checkpoint"):
        load(path, "abc")
    assert load(tmp_path / "missing.pt", "abc") is None
    save(path, {"fingerprint": "abc", "epoch": 1})
    assert load(path, "abc") == {"fingerprint": "abc", "epoch": 1}


@pytest.mark.parametrize("state", [{"fingerprint": "a" * 64, "epoch": 1}, {"epoch": 1}, [1, 2]],
                         ids=["other-fingerprint", "no-fingerprint", "not-a-dict"])
def test_stale_checkpoint_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, state) -> None:
    path = tmp_path / "last.pt"
    save(path, state) if isinstance(state, dict) else torch.save(state, path)
    with caplog.at_level("WARNING", logger="spinedxa.checkpoint"):
        assert load(path, "b" * 64) is None
    assert f"ignoring checkpoint {path}: its fingerprint" in caplog.text
    assert path.is_file()  # ignored, not deleted: the next epoch's save replaces it


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    """weights_only: a checkpoint holding an arbitrary object is refused, never unpickled."""
    path = tmp_path / "last.pt"
    torch.save({"fingerprint": "abc", "payload": _Unsafe()}, path)
    with pytest.raises(RuntimeError, match="not a readable checkpoint"):
        load(path, "abc")


class _Unsafe:
    """Any class outside torch's weights-only allow-list."""


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """Saving is atomic: a write that fails (here: an unpicklable value; in life: a kill) leaves the last one."""
    path = tmp_path / "last.pt"
    save(path, {"fingerprint": "f", "epoch": 1})
    # pickle.PicklingError, or AttributeError ("Can't pickle local object") on older Pythons.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save(path, {"fingerprint": "f", "epoch": 2, "bad": lambda: None})
    assert load(path, "f") == {"fingerprint": "f", "epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def _draws(generator: torch.Generator) -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            torch.rand(3, generator=generator).tolist())


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    """Restored RNGs draw what they would have drawn: the torch, numpy, python and loader streams."""
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    save(tmp_path / "last.pt", {"fingerprint": "f", "rng": [rng_state(generator)]})
    expected = _draws(generator)
    other = torch.Generator().manual_seed(99)
    _draws(other)
    state = load(tmp_path / "last.pt", "f")
    set_rng_state(state["rng"][0], other)
    assert _draws(other) == expected
