"""spinedxa.pretrain and the pretrain stage: a tiny synthetic pool (the tiny profile's scans), cnn21 pretrained on it
to regress the T-score, its weights and record as the ``pretrained`` source (resolved, verified, named in meta.json
and MLflow), a fine-tune from them that starts below scratch, and the disabled stage's markers.

The pool is learnable on purpose: the T-score is what decides osteoporosis, so features that regress it transfer to
the classification. Pretraining 120 pool scans of 64 x 32 px for 6 epochs takes a few seconds on one thread.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_stage_main_in_fresh_interpreter
from spinedxa import tracking, weights
from spinedxa.config import ConfigError, MODEL_NAMES, Params, deep_merge, params_from_dict
from spinedxa.contracts import png16
from spinedxa.files import sha256_file
from spinedxa.pretrain import pool_config, render_pool, run_pretrain
from train_factory import EXPERIMENT, make_params, paths_for, train_workdir  # noqa: F401 - fixture

POOL, EPOCHS = 120, 6


def tiny_params(**pretrain: object) -> Params:
    """params.yaml with the tiny profile, pretraining cnn21 only on a small pool, one process and thread."""
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(
        (REPO / "profiles/tiny.yaml").read_text()))
    overlay = {"pretrain": {"enabled": True, "n_scans": POOL, "epochs": EPOCHS, "batch_size": 16, "models": ["cnn21"],
                            **pretrain},
               "train": {"threads": 1, "cnn21": {"image_size": 64, "epochs": 1, "batch_size": 8}},
               "augment": {"online": False}, "runtime": {"workers": 1, "train_processes": 1}}
    return params_from_dict(deep_merge(raw, overlay))


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stage's outputs for the tiny params: models/pretrained and reports/pretrain.json."""
    root = tmp_path_factory.mktemp("pretrain")
    params = tiny_params()
    out, summary = root / "models/pretrained", root / "reports/pretrain.json"
    started = time.perf_counter()
    record = run_pretrain(params, out, summary, processes=1)
    return {"params": params, "out": out, "summary": summary, "record": record,
            "seconds": time.perf_counter() - started}


def test_the_stage_writes_each_pretrained_backbone_with_its_record(stage: dict) -> None:
    out, params = stage["out"], stage["params"]
    file = out / "cnn21" / weights.PRETRAINED_FILE
    record = weights.read_record(file)
    assert record["kind"] == "pretrained" and record["variant"] == "cnn21" and record["url"] is None
    assert record["sha256"] == sha256_file(file) and record["size"] == file.stat().st_size
    # What the pretraining saw and cost.
    assert record["pool_seed"] == params.pretrain.seed and record["pool_scans"] + record["pool_left_out_no_roi"] == POOL
    assert record["pool_disjoint_from"] == {"synthesize.seed": params.synthesize.seed,
                                            "synthesize.external.seed": params.synthesize.external.seed}
    assert record["target"] == "t_score" and record["input_shape"] == [64, 32]
    assert [row["epoch"] for row in record["curve"]] == list(range(1, EPOCHS + 1))
    assert record["wall_seconds"] > 0 and record["cpu"] and record["fast_path"]
    assert record["val_r"] > 0.3  # it learned the T-score (measured 0.54 on this pool)
    state = weights.read_state(file)
    assert not any(k.startswith("fc.") for k in state) or state["fc.weight"].shape[0] == 1  # the regression head
    for name in MODEL_NAMES[1:]:  # not in pretrain.models: the marker only
        assert sorted(p.name for p in (out / name).iterdir()) == [weights.PRETRAINED_MARKER]
    summary = json.loads(stage["summary"].read_text())
    assert summary["enabled"] is True and summary["models"] == ["cnn21"] and summary["seconds"]["cnn21"] > 0
    assert summary["cpu"] == record["cpu"]


def test_the_pool_is_rendered_like_ingest_from_a_seed_of_its_own(stage: dict) -> None:
    params = stage["params"]
    pool = render_pool(dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, n_scans=24)))
    assert pool.images.dtype.name == "uint16" and pool.images.shape[1:] == (64, 32)  # ingest.roi_height, half wide
    cohort = pool_config(params)
    assert (cohort.seed, cohort.external, cohort.followup_fraction, cohort.burned_in_fraction) == (
        params.pretrain.seed, None, 0.0, 0.0)
    for key, seed in (("synthesize.seed", params.synthesize.seed),
                      ("synthesize.external.seed", params.synthesize.external.seed)):
        clash = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, seed=seed))
        with pytest.raises(ConfigError, match=rf"pretrain.seed: {seed} is {key}"):
            render_pool(clash)


def test_weights_pretrained_resolves_to_the_stage_output_and_verifies_it(stage: dict, tmp_path: Path) -> None:
    out = stage["out"]
    cfg = dataclasses.replace(stage["params"].train.cnn21, weights="pretrained")
    source = weights.resolve("cnn21", cfg, None, out / "cnn21")
    file = out / "cnn21" / weights.PRETRAINED_FILE
    assert (source.kind, source.variant, source.path, source.sha256) == ("pretrained", "cnn21", file.as_posix(),
                                                                         sha256_file(file))
    assert weights.verify(source) == file
    tampered = tmp_path / "cnn21"
    shutil.copytree(out / "cnn21", tampered)
    data = bytearray((tampered / weights.PRETRAINED_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / weights.PRETRAINED_FILE).write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="differs from"):
        weights.verify(weights.resolve("cnn21", cfg, None, tampered))
    vgg = dataclasses.replace(stage["params"].train.vgg16, weights="pretrained")
    with pytest.raises(weights.WeightsNotFoundError, match=r"pretrain.enabled is false, or vgg16 is not in "
                                                           r"pretrain.models.*`dvc repro pretrain`"):
        weights.resolve("vgg16", vgg, None, out / "vgg16")
    with pytest.raises(weights.WeightsNotFoundError, match="the pretrain stage has not run"):
        weights.resolve("vgg16", vgg, None, tmp_path / "nothing")


def _cohort(params: Params, root: Path, n: int) -> list:
    """A labelled classification cohort from yet another seed: ROI images written as ingest writes them, labelled
    osteoporosis by the T-score (WHO: <= -2.5)."""
    from spinedxa.data import ImageItem

    other = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, seed=params.pretrain.seed + 1,
                                                                     n_scans=n))
    pool = render_pool(other)
    items = []
    for i, (image, t) in enumerate(zip(pool.images, pool.t_scores)):
        png16.write(root / f"{i}.png", image)
        items.append(ImageItem(root / f"{i}.png", int(t <= -2.5), f"scan{i}", f"P{i:012d}"))
    return items


def test_a_fine_tune_starts_from_the_pretrained_weights(stage: dict, tmp_path: Path) -> None:
    """On the same batches (the same seeded sampler), the first epoch's training loss of a fine-tune from the
    pretrained backbone is below that of the same network from scratch (measured 0.61 against 0.75)."""
    from spinedxa.loop import FitPlan, fit
    from spinedxa.models import get_spec
    from spinedxa.runtime import Runtime
    from spinedxa.train import prepare

    params = stage["params"]
    items = _cohort(params, tmp_path, 60)
    train, val = items[:48], items[48:]
    rt = Runtime.setup("cpu", True, 1)
    first = {}
    for source in ("none", "pretrained"):
        cfg = dataclasses.replace(params.train.cnn21, weights=source)
        init = weights.resolve("cnn21", cfg, None, stage["out"] / "cnn21")
        prepared = prepare(params, "cnn21", cfg, (train, val), rt, init)
        with tempfile.TemporaryDirectory() as tmp:
            fit(prepared.model, get_spec("cnn21"), prepared.data, prepared.loss_fn, prepared.session, rt,
                FitPlan(1, "val_auc", Path(tmp) / "last.pt", source))
        first[source] = prepared.session.history[0]["train_loss"]
    assert first["pretrained"] < first["none"], first


@pytest.fixture
def workdir(train_workdir: Path) -> Path:  # noqa: F811 - the fixture imported above
    return train_workdir


def test_training_from_pretrained_weights_names_them_in_meta_json_and_mlflow(stage: dict, workdir: Path) -> None:
    from spinedxa.train import train_model

    shutil.copytree(stage["out"] / "cnn21", workdir / "models/pretrained/cnn21")
    file = "models/pretrained/cnn21/model.pt"
    sha = sha256_file(file)
    params = make_params(cnn21={"weights": "pretrained", "freeze_epochs": 1, "backbone_lr_factor": 0.3,
                                "bn_mode": "frozen"})
    train_model(params, "cnn21", paths_for("cnn21"))
    expected = {"kind": "pretrained", "variant": "cnn21", "path": file, "sha256": sha, "url": None}
    assert json.loads(Path("models/cnn21/meta.json").read_text())["weights"] == expected
    for k in (0, 1):
        meta = json.loads(Path(f"models/cnn21/fold{k}/meta.json").read_text())
        assert meta["weights"] == expected
        assert (meta["params"]["freeze_epochs"], meta["params"]["bn_mode"]) == (1, "frozen")
    for run in tracking.find_runs(EXPERIMENT):
        assert (run["params"]["weights_kind"], run["params"]["weights_file"], run["params"]["weights_sha256"]) == (
            "pretrained", file, sha)


def test_the_disabled_stage_writes_markers_in_a_moment_without_torch(tmp_path: Path) -> None:
    """The default (pretrain.enabled false): every model's marker and {"enabled": false}, torch never imported."""
    code, torch_imported, seconds = run_stage_main_in_fresh_interpreter(
        "pretrain", f"argv = ['--params', {str(REPO / 'params.yaml')!r}, '--out', 'models/pretrained', "
        f"'--summary', 'reports/pretrain.json']", tmp_path)
    assert (code, torch_imported) == (0, False)
    assert seconds < 20  # ~2 s on 2 shared cores: the interpreter and pandas, no torch
    assert json.loads((tmp_path / "reports/pretrain.json").read_text())["enabled"] is False
    for name in MODEL_NAMES:
        marker = tmp_path / "models/pretrained" / name / weights.PRETRAINED_MARKER
        assert json.loads(marker.read_text()) == {"enabled": False, "model": name}


def test_fine_tuning_knobs_need_pretrained_weights_and_an_epoch_to_tune() -> None:
    from spinedxa.train import check_config

    base = make_params()
    with pytest.raises(ConfigError, match=r"train.cnn21: freeze_epochs 1, .* but weights is none"):
        check_config(make_params(cnn21={"freeze_epochs": 1}), "cnn21")
    with pytest.raises(ConfigError, match=r"train.cnn21.freeze_epochs: 3 leaves no epoch"):
        check_config(make_params(cnn21={"weights": "pretrained", "freeze_epochs": 3}), "cnn21")
    check_config(base, "cnn21")  # the defaults: training from scratch
