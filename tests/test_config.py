"""params.yaml → typed frozen config: valid files load, every kind of mistake is rejected naming the key."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from spinedxa.config import MODEL_NAMES, ConfigError, apply_profile, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_load(raw):
    p = params_from_dict(raw)
    assert p.data.classes == ("normal", "osteoporosis")
    assert p.synthesize.n_scans == 174 and p.synthesize.n_osteoporosis == 114
    assert set(p.train.models) == set(MODEL_NAMES)
    assert p.train.model("resnet50").lr == raw["train"]["resnet50"]["lr"]
    assert isinstance(p.augment.scale, tuple)


def test_config_is_frozen(raw):
    p = params_from_dict(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.split.seed = 1  # type: ignore[misc]


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    d[last] = value


def _del(d: dict, dotted: str) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    del d[last]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("split.sed", 1, "split.sed"),                              # unknown key (typo)
        ("train.resnet50.learning_rate", 0.1, "train.resnet50.learning_rate"),
        ("bogus", {}, "bogus"),                                     # unknown section
        ("split.seed", "42", "split.seed"),                         # wrong type: string for int
        ("split.seed", 4.2, "split.seed"),                          # float for int
        ("train.fast", "yes", "train.fast"),                        # string for bool
        ("train.resnet50.lr", "fast", "train.resnet50.lr"),         # string for float
        ("train.resnet50.optimizer", "rmsprop", "train.resnet50.optimizer"),  # not in Literal
        ("train.models", ["cnn21", "alexnet"], "alexnet"),          # unknown model
        ("augment.scale", [0.9], "augment.scale"),                  # wrong tuple length
        ("split.train", 0.9, "train + val + test"),                 # fractions do not sum to 1
        ("synthesize.n_osteoporosis", 500, "synthesize.n_osteoporosis"),
        ("data.classes", ["a", "b", "c"], "data.classes"),
        ("ingest.multiframe", "all", "ingest.multiframe"),
        ("split.folds", 1, "split.folds"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(raw, key, value, message):
    bad = copy.deepcopy(raw)
    _set(bad, key, value)
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("[", r"\[")):
        params_from_dict(bad)


@pytest.mark.parametrize("key", ["split.seed", "train.vgg16", "data.source"])
def test_missing_keys_are_rejected(raw, key):
    bad = copy.deepcopy(raw)
    _del(bad, key)
    with pytest.raises(ConfigError, match=key):
        params_from_dict(bad)


def test_load_params_names_the_file(tmp_path, raw):
    bad = copy.deepcopy(raw)
    bad["split"]["seeed"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"params\.yaml.*split\.seeed"):
        load_params(path)


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "profiles").glob("*.yaml")))
def test_profiles_apply_and_validate(tmp_path, profile):
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    p = apply_profile(target, REPO / "profiles" / profile)
    assert load_params(target) == p
    overlay = yaml.safe_load((REPO / "profiles" / profile).read_text())
    for model, block in overlay.get("train", {}).items():
        if model in MODEL_NAMES:
            for k, v in block.items():
                assert getattr(p.train.model(model), k) == v


def test_bad_profile_writes_nothing(tmp_path):
    target = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    target.write_text(original)
    prof = tmp_path / "bad.yaml"
    prof.write_text("train:\n  resnet50:\n    lr: high\n")
    with pytest.raises(ConfigError, match="train.resnet50.lr"):
        apply_profile(target, prof)
    assert target.read_text() == original
