"""Typed, frozen configuration loaded once from ``params.yaml``.

Every section of ``params.yaml`` maps to a frozen dataclass. The loader rejects unknown keys, missing keys and
values of the wrong type with a :class:`ConfigError` that names the dotted key (``train.resnet50.lr``), so a typo in
``params.yaml`` or in ``dvc exp run -S`` fails loudly instead of being ignored.

Usage::

    cfg = load_params("params.yaml")
    cfg.train.model("resnet50").lr
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

MODEL_NAMES: tuple[str, ...] = ("cnn21", "resnet50", "vgg16", "vgg19", "inception_v3")


class ConfigError(ValueError):
    """A key in params.yaml is unknown, missing, or has a value of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    source: str
    classes: tuple[str, ...] = ("normal", "osteoporosis")

    def __post_init__(self) -> None:
        if len(self.classes) != 2:
            raise ConfigError(f"data.classes: expected exactly two classes (negative, positive), got {self.classes!r}")


@dataclass(frozen=True)
class SynthesizeConfig:
    seed: int
    n_scans: int
    n_osteoporosis: int
    followup_fraction: float
    height: int
    width: int
    pixel_spacing_mm: float
    monochrome1_fraction: float
    osteophyte_rate: float
    fracture_rate: float
    scoliosis_rate: float
    workers: int = 1
    # Share of scans that also get a secondary-capture copy with a burned-in PHI banner (<class>/scan_NNNN_sc.dcm),
    # and share of scans drawn with benign L1-L4 level labels; both exercise ingest's burned-in text check.
    burned_in_fraction: float = 0.07
    level_label_fraction: float = 0.15

    def __post_init__(self) -> None:
        if not 0 <= self.n_osteoporosis <= self.n_scans:
            raise ConfigError(
                f"synthesize.n_osteoporosis: {self.n_osteoporosis} must lie in [0, n_scans={self.n_scans}]"
            )
        for name in ("followup_fraction", "monochrome1_fraction", "osteophyte_rate", "fracture_rate", "scoliosis_rate",
                     "burned_in_fraction", "level_label_fraction"):
            _check_unit(f"synthesize.{name}", getattr(self, name))


@dataclass(frozen=True)
class IngestConfig:
    workers: int
    max_side: int
    max_pixels: int
    multiframe: Literal["first", "middle", "reject"] = "first"
    # Text burned into the pixels (spinedxa.burnedin): quarantine the file (reason burned_in_text), or black out the
    # counted text regions, grown by burned_in_margin_px on each side (original pixels), and keep the file.
    burned_in_text: Literal["quarantine", "redact"] = "quarantine"
    burned_in_margin_px: int = 4

    def __post_init__(self) -> None:
        for name in ("workers", "max_side", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ingest.{name}: {getattr(self, name)} must be >= 1")
        if self.burned_in_margin_px < 0:
            raise ConfigError(f"ingest.burned_in_margin_px: {self.burned_in_margin_px} must be >= 0")


@dataclass(frozen=True)
class ValidateConfig:
    min_per_class: int
    max_quarantine_rate: float
    min_side: int
    max_side: int
    min_std: float
    phash_max_distance: int
    near_duplicate_min_ssim: float = 0.9

    def __post_init__(self) -> None:
        _check_unit("validate.near_duplicate_min_ssim", self.near_duplicate_min_ssim)
        if not 0 <= self.phash_max_distance <= 64:
            raise ConfigError(f"validate.phash_max_distance: {self.phash_max_distance} must lie in [0, 64] (bits)")


@dataclass(frozen=True)
class SplitConfig:
    seed: int
    train: float
    val: float
    test: float
    folds: int = 0

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"split: train + val + test must be 1.0, got {total:.4f}")
        for name in ("train", "val", "test"):
            _check_unit(f"split.{name}", getattr(self, name))
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"split.folds: {self.folds} is not valid; use 0 (no folds) or >= 2")


@dataclass(frozen=True)
class AugmentConfig:
    seed: int
    expand: int
    online: bool
    rotation_deg: float
    hflip: float
    scale: tuple[float, float]
    translate: float
    brightness: float
    contrast: float
    gamma: tuple[float, float]
    noise_std: float
    elastic_alpha: float

    def __post_init__(self) -> None:
        if self.expand < 0:
            raise ConfigError(f"augment.expand: {self.expand} must be >= 0")
        _check_unit("augment.hflip", self.hflip)
        # brightness/contrast are ColorJitter half-widths: factors are drawn from [1 - x, 1 + x], so x <= 1.
        for name in ("translate", "brightness", "contrast"):
            _check_unit(f"augment.{name}", getattr(self, name))
        for name in ("rotation_deg", "noise_std", "elastic_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}: {getattr(self, name)} must be >= 0")
        for name in ("scale", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"augment.{name}: {[low, high]} must satisfy 0 < low <= high")


@dataclass(frozen=True)
class ModelTrainConfig:
    image_size: int
    epochs: int
    batch_size: int
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    weight_decay: float
    scheduler: Literal["cosine", "step", "plateau", "none"]
    weights: Literal["none", "imagenet"] = "none"


@dataclass(frozen=True)
class TrainConfig:
    models: tuple[str, ...]
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    fast: bool
    threads: int
    class_weighting: bool
    monitor: Literal["val_loss", "val_auc"]
    patience: int
    num_workers: int
    cnn21: ModelTrainConfig
    resnet50: ModelTrainConfig
    vgg16: ModelTrainConfig
    vgg19: ModelTrainConfig
    inception_v3: ModelTrainConfig

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"train.models: unknown model(s) {unknown}; expected a subset of {list(MODEL_NAMES)}")

    def model(self, name: str) -> ModelTrainConfig:
        """Return the per-model block ``train.<name>``."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
        return getattr(self, name)


@dataclass(frozen=True)
class EvaluateConfig:
    seed: int
    bootstrap: int
    threshold: float
    gradcam_images: int

    def __post_init__(self) -> None:
        if self.bootstrap < 1:
            raise ConfigError(f"evaluate.bootstrap: {self.bootstrap} must be >= 1 (resamples for the intervals)")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"evaluate.threshold: {self.threshold} must lie strictly between 0 and 1")
        if self.gradcam_images < 1:
            raise ConfigError(f"evaluate.gradcam_images: {self.gradcam_images} must be >= 1 (the figure is an output)")


@dataclass(frozen=True)
class ReportConfig:
    paper_accuracy: float
    paper_f1: float
    paper_precision: float
    paper_recall: float
    paper_n_images: int = 174  # Naeem et al. 2025: 174 spine DXA images


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "spinedxa"


@dataclass(frozen=True)
class Params:
    data: DataConfig
    synthesize: SynthesizeConfig
    ingest: IngestConfig
    validate: ValidateConfig
    split: SplitConfig
    augment: AugmentConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def _check_unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: {value} must lie in [0, 1]")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(key, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of the allowed types ({'; '.join(errors)})")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not in params.yaml


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {[where + k for k in unknown]}; valid keys under {prefix or '<root>'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing required key")
            continue
        kwargs[name] = _coerce(key, hints[name], raw[name])
    return cls(**kwargs)


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Build :class:`Params` from an already-parsed mapping (e.g. Snakemake's ``config``)."""
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``.

    Raises:
        ConfigError: unknown, missing or mistyped key (the message names the dotted key).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``overlay`` (used to apply profiles such as ``profiles/tiny.yaml``)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_profile(params_path: str | Path, profile_path: str | Path) -> Params:
    """Merge a profile overlay into ``params_path`` in place, validate the result and return it.

    Raises:
        ConfigError: the merged parameters are invalid (nothing is written).
    """
    params_path, profile_path = Path(params_path), Path(profile_path)
    base = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    overlay = yaml.safe_load(profile_path.read_text(encoding="utf-8")) or {}
    merged = deep_merge(base, overlay)
    try:
        params = params_from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"{profile_path}: {exc}") from None
    params_path.write_text(
        f"# {params_path.name} with profile {profile_path.name} applied\n" + yaml.safe_dump(merged, sort_keys=False),
        encoding="utf-8",
    )
    return params
