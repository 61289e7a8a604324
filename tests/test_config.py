"""params.yaml → typed frozen config: valid files load, every kind of mistake is rejected naming the key."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from spinedxa.config import (
    MODEL_NAMES,
    ConfigError,
    EvaluateConfig,
    Range,
    SplitConfig,
    apply_profile,
    load_params,
    params_from_dict,
    read_yaml,
)

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
        ("split.train", 0.6, "split.train"),                        # the holdout train share is what is left
        ("split.protocol", "loo", "split.protocol"),
        ("synthesize.n_osteoporosis", 500, "synthesize.n_osteoporosis"),
        ("data.classes", ["osteoporosis"], "data.classes"),                # one class is no task
        ("data.classes", ["normal", "normal"], "data.classes"),            # repeated
        ("data.classes", ["normal", "a/b"], "data.classes"),               # not a folder name
        ("data.class_map", {"osteopenia": "fracture"}, "data.class_map.osteopenia"),  # not a class
        ("data.class_map", {"normal": "osteoporosis"}, "data.class_map.normal"),      # maps a class
        ("data.class_map", ["osteopenia"], "data.class_map"),              # not a mapping
        ("external.enabled", "yes", "external.enabled"),
        ("synthesize.external.n_osteoporosis", 500, "synthesize.external.n_osteoporosis"),
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


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("train:\n  resnet50:\n    lr: high\n", r"bad\.yaml: train\.resnet50\.lr"),
        ("evaluate:\n  bootstrap: 10\n  bootstrap: 20\n", r"bad\.yaml: evaluate\.bootstrap: duplicated key at line 3"),
        ("evaluate:\n  bootstrap: 0\n", r"bad\.yaml: evaluate\.bootstrap: 0 is out of range"),
    ],
    ids=["mistyped", "duplicated_key", "out_of_range"],
)
def test_bad_profile_writes_nothing(tmp_path, profile, message):
    target = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    target.write_text(original)
    prof = tmp_path / "bad.yaml"
    prof.write_text(profile)
    with pytest.raises(ConfigError, match=message):
        apply_profile(target, prof)
    assert target.read_text() == original


NAN, INF = math.nan, math.inf

# One row per bad value: (dotted key, value, the key the message must name). Each is rejected when params.yaml is
# loaded, naming the key and what is allowed, before any stage does work (issue 9, part 3).
OUT_OF_RANGE = [
    ("train.cnn21.batch_size", 0, None),                 # was a ZeroDivisionError in training
    ("train.resnet50.batch_size", -4, None),
    ("train.vgg16.lr", NAN, None),                       # was torch's message, no key
    ("train.vgg16.lr", INF, None),
    ("train.vgg16.lr", -0.001, None),
    ("train.vgg16.lr", 0.0, None),
    ("train.vgg19.epochs", 0, None),                     # was a FAILED MLflow run
    ("train.inception_v3.epochs", -1, None),
    ("train.cnn21.weight_decay", -1e-4, None),
    ("train.cnn21.weight_decay", NAN, None),
    ("train.cnn21.image_size", 0, None),
    ("train.models", [], None),
    ("train.models", ["cnn21", "vgg16", "cnn21"], None),
    ("train.seed", -1, None),
    ("train.threads", -1, None),
    ("train.patience", -1, None),
    ("split.test", 0.0, None),                           # was an empty test split
    ("split.val", 0.0, None),                            # was an empty validation split
    ("split.val", 1.0, None),
    ("split.test", 1.0, None),
    ("split.val", -0.2, None),
    ("split.test", NAN, None),
    ("split.seed", -1, None),
    ("split.folds", -2, None),
    ("split.folds", 2, None),                            # k-fold needs at least 3 folds
    ("train.cnn21.grad_clip", -1.0, None),
    ("train.cnn21.label_smoothing", 1.0, None),
    ("train.tta", "vflip", None),
    ("runtime.train_processes", 0, None),
    ("runtime.workers", 0, None),
    ("runtime.checkpoint_every_s", -1, None),
    ("replay.copies", 0, None),
    ("replay.test_fraction", 1.0, None),
    ("ingest.roi_height", 16, None),
    ("validate.min_side", 9000, "validate.min_side"),    # above validate.max_side (8192)
    ("validate.max_side", 32, "validate.max_side"),      # below validate.min_side (64)
    ("validate.max_quarantine_rate", 1.5, None),
    ("validate.max_quarantine_rate", -0.1, None),
    ("validate.near_duplicate_min_ssim", 1.1, None),
    ("validate.phash_max_distance", 65, None),
    ("validate.min_std", -1.0, None),
    ("validate.min_std", NAN, None),
    ("validate.min_per_class", 0, None),
    ("synthesize.seed", -5, None),
    ("synthesize.n_scans", 0, None),
    ("synthesize.n_osteoporosis", -1, None),
    ("synthesize.followup_fraction", 1.2, None),
    ("synthesize.monochrome1_fraction", -0.1, None),
    ("synthesize.osteophyte_rate", 2.0, None),
    ("synthesize.fracture_rate", NAN, None),
    ("synthesize.scoliosis_rate", 1.01, None),
    ("synthesize.height", 0, None),
    ("synthesize.width", -1, None),
    ("synthesize.pixel_spacing_mm", 0.0, None),
    ("synthesize.pixel_spacing_mm", INF, None),
    ("ingest.max_side", 0, None),
    ("ingest.max_pixels", -1, None),
    ("augment.seed", -1, None),
    ("augment.expand", -1, None),
    ("augment.hflip", 1.5, None),
    ("augment.translate", -0.1, None),
    ("augment.brightness", 1.5, None),
    ("augment.contrast", NAN, None),
    ("augment.rotation_deg", -1.0, None),
    ("augment.rotation_deg", 270.0, None),
    ("augment.noise_std", -0.01, None),
    ("augment.elastic_alpha", INF, None),
    ("augment.scale", [0.0, 1.1], "augment.scale[0]"),
    ("augment.scale", [NAN, 1.1], "augment.scale[0]"),
    ("augment.gamma", [1.2, 0.8], None),                 # low > high
    ("evaluate.seed", -1, None),
    ("evaluate.bootstrap", 0, None),
    ("evaluate.bootstrap", -10, None),
    ("evaluate.gradcam_images", 0, None),
    ("evaluate.threshold", 1.0, None),
    ("evaluate.threshold", NAN, None),
    ("report.paper_accuracy", 101.0, None),
    ("report.paper_f1", NAN, None),
    ("report.paper_n_images", 0, None),
    ("runtime.mlflow_experiment", "", None),
    ("runtime.mlflow_experiment", "   ", None),
    ("runtime.mlflow_experiment", "x" * 501, None),
    ("data.source", "", None),
    ("data.classes", ["normal", "normal"], None),
]


def _load(via: str, raw: dict, tmp_path: Path):
    if via == "params_from_dict":  # the Snakefile's path: Snakemake parses the file, spinedxa checks the dict
        return params_from_dict(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # NaN and inf are written as .nan / .inf
    return load_params(path)


@pytest.mark.parametrize("via", ["load_params", "params_from_dict"])
@pytest.mark.parametrize(("key", "value", "named"), OUT_OF_RANGE, ids=[f"{k}={v!r}"[:60] for k, v, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_rejected_at_load_naming_key_and_range(raw, tmp_path, via, key, value, named):
    bad = copy.deepcopy(raw)
    _set(bad, key, value)
    with pytest.raises(ConfigError) as err:
        _load(via, bad, tmp_path)
    message = str(err.value)
    assert (named or key) in message
    assert "allowed:" in message, message


# Values at the edge of each range are accepted: (dotted key, value).
EDGES = [
    ("train.patience", 0),                               # 0 = no early stopping
    ("train.threads", 0),                                # 0 = all cores given
    ("train.cnn21.grad_clip", 0.0),
    ("train.models", ["vgg16"]),
    ("train.cnn21.weight_decay", 0.0),
    ("train.cnn21.lr", 1e-8),
    ("train.cnn21.batch_size", 1),
    ("train.cnn21.epochs", 1),
    ("split.folds", 3),
    ("runtime.train_processes", 1),
    ("augment.expand", 0),
    ("augment.elastic_alpha", 0.0),
    ("augment.hflip", 1.0),
    ("augment.rotation_deg", 180.0),
    ("validate.near_duplicate_min_ssim", 0.0),
    ("validate.phash_max_distance", 64),
    ("validate.min_side", 8192),                         # = validate.max_side
    ("synthesize.n_osteoporosis", 0),
    ("synthesize.followup_fraction", 1.0),
    ("report.paper_accuracy", 100.0),
    ("runtime.mlflow_experiment", "x" * 500),
]


@pytest.mark.parametrize(("key", "value"), EDGES, ids=[f"{k}={v!r}"[:60] for k, v in EDGES])
def test_values_at_the_edge_of_a_range_load(raw, tmp_path, key, value):
    good = copy.deepcopy(raw)
    _set(good, key, value)
    params = _load("load_params", good, tmp_path)
    section, *rest = key.split(".")
    obj = getattr(params, section)
    for part in rest:
        obj = getattr(obj, part)
    assert obj == (tuple(value) if isinstance(value, list) else value)


def test_direct_construction_and_replace_check_ranges_too():
    """The sections check their declared ranges on every construction, not only in the loader."""
    with pytest.raises(ConfigError, match=r"evaluate\.bootstrap: 0 is out of range; allowed: >= 1"):
        EvaluateConfig(seed=0, bootstrap=0, threshold=0.5, gradcam_images=1)
    split = SplitConfig(protocol="holdout", seed=1, folds=3, val=0.2, test=0.2)
    with pytest.raises(ConfigError, match=r"split\.val: 0\.0 is out of range; allowed: \(0, 1\)"):
        dataclasses.replace(split, val=0.0)


@pytest.mark.parametrize(
    ("constraint", "text"),
    [(Range(0), ">= 0"), (Range(0, low_open=True), "> 0"), (Range(0, 1), "[0, 1]"), (Range(None, 5), "<= 5"),
     (Range(0, 1, low_open=True, high_open=True), "(0, 1)"), (Range(1, 100, high_open=True), "[1, 100)")],
)
def test_ranges_describe_themselves(constraint, text):
    assert str(constraint) == text


def _with_line_after(text: str, anchor: str, line: str) -> tuple[str, int]:
    """``text`` with ``line`` inserted after the first line equal to ``anchor``; returns (text, inserted line no.)."""
    lines = text.splitlines()
    at = lines.index(anchor) + 1
    return "\n".join(lines[:at] + [line] + lines[at:]) + "\n", at + 1


@pytest.mark.parametrize(
    ("anchor", "line", "key"),
    [
        ("  cnn21:", "    epochs: 3", "train.cnn21.epochs"),   # a nested key given twice
        ("split:", "  seed: 7", "split.seed"),
        ("data:", "  source: elsewhere", "data.source"),
    ],
)
def test_duplicated_yaml_key_is_named_with_its_line(raw, tmp_path, anchor, line, key):
    text, first = _with_line_after(yaml.safe_dump(raw, sort_keys=False), anchor, line)
    assert yaml.safe_load(text) is not None  # PyYAML's own loader accepts it (the last value wins silently)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"params\.yaml: {re.escape(key)}: duplicated key at line \d+ "
                                          rf"\(first at line {first}\)"):
        load_params(path)


def test_duplicated_section_is_reported_as_duplicated_not_missing(tmp_path, raw):
    text = yaml.safe_dump(raw, sort_keys=False) + yaml.safe_dump({"split": raw["split"]}, sort_keys=False)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"split: duplicated key at line \d+ \(first at line \d+\)"):
        load_params(path)


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 2}\nmodel:\n  <<: *b\n  lr: 0.01\nagain: *b\n")
    assert read_yaml(path) == {"base": {"lr": 0.1, "epochs": 2}, "model": {"lr": 0.01, "epochs": 2},
                               "again": {"lr": 0.1, "epochs": 2}}


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML"):
        load_params(path)
