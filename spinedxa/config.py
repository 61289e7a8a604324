"""Typed, frozen configuration loaded once from ``params.yaml``.

Every section of ``params.yaml`` maps to a frozen dataclass. The loader rejects unknown keys, missing keys, values of
the wrong type, NaN and infinite numbers, values outside a field's allowed range and duplicated YAML keys with a
:class:`ConfigError` that names the dotted key (``train.resnet50.lr``) and what is allowed, so a typo in
``params.yaml`` or in ``dvc exp run -S`` fails when the parameters are loaded, before any stage does work.

Ranges are declared next to each field (``lr: float = bounded(0, low_open=True)``: dataclass field metadata) and
checked by the loader and by every section's ``__post_init__`` (so ``dataclasses.replace`` is checked too);
constraints that tie several fields together (``validate.min_side <= validate.max_side``) are written out in the
section's ``_check``.

Usage::

    cfg = load_params("params.yaml")
    cfg.train.model("resnet50").lr
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml

from spinedxa import task as task_policy
from spinedxa.errors import UserError

MODEL_NAMES: tuple[str, ...] = ("cnn21", "resnet50", "vgg16", "vgg19", "inception_v3")


class ConfigError(UserError, ValueError):
    """A key in params.yaml is unknown, missing, duplicated, or has a value of the wrong type or out of range."""


# --- declarative constraints ------------------------------------------------------------------------------------


def _fmt(number: float) -> str:
    return f"{number:g}"


@dataclass(frozen=True)
class Range:
    """The interval a number (or each number of a list) must lie in; ``None`` leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.high is None and self.low is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.low is None and self.high is not None:
            return f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        low = "-inf" if self.low is None else _fmt(self.low)
        high = "inf" if self.high is None else _fmt(self.high)
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, key: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``key`` unless ``value`` (each item of a tuple) lies in the range."""
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            inside = (
                (self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high))
            )
            if not inside:  # NaN compares false both ways: never inside
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{where}: {v!r} is out of range; allowed: {self}")


@dataclass(frozen=True)
class Items:
    """How many items a list (or non-blank characters a string) may hold, and whether its items must be distinct."""

    min_len: int = 1
    max_len: int | None = None
    unique: bool = False
    noun: str = "item(s)"

    def __str__(self) -> str:
        if self.max_len is None:
            size = f"at least {self.min_len}"
        elif self.min_len == self.max_len:
            size = f"exactly {self.min_len}"
        else:
            size = f"{self.min_len} to {self.max_len}"
        return f"{size} {self.noun}" + (", each listed once" if self.unique else "")

    def check(self, key: str, value: Any) -> None:
        """Raise :class:`ConfigError` naming ``key`` when ``value`` is too short, too long or repeats an item."""
        size = len(value.strip()) if isinstance(value, str) else len(value)
        if size < self.min_len or (self.max_len is not None and size > self.max_len):
            raise ConfigError(f"{key}: {value!r} has {size} {self.noun}; allowed: {self}")
        if self.unique:
            repeated = sorted({v for v in value if list(value).count(v) > 1})
            if repeated:
                raise ConfigError(f"{key}: {repeated} listed more than once; allowed: {self}")


def bounded(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, **kwargs: Any) -> Any:
    """A dataclass field whose value must lie in ``low..high`` (``*_open``: that end excluded)."""
    return field(metadata={"check": Range(low, high, low_open, high_open)}, **kwargs)


def count(**kwargs: Any) -> Any:
    """An integer count that must be >= 1."""
    return bounded(1, **kwargs)


def non_negative(**kwargs: Any) -> Any:
    """A number that must be >= 0 (seeds, magnitudes, counts where 0 means off)."""
    return bounded(0, **kwargs)


def positive(**kwargs: Any) -> Any:
    """A number that must be > 0."""
    return bounded(0, low_open=True, **kwargs)


def unit(**kwargs: Any) -> Any:
    """A rate, probability or fraction in [0, 1]."""
    return bounded(0, 1, **kwargs)


def sized(min_len: int = 1, max_len: int | None = None, *, unique: bool = False, noun: str = "item(s)",
          **kwargs: Any) -> Any:
    """A list (or string) field with a length limit, optionally of distinct items."""
    return field(metadata={"check": Items(min_len, max_len, unique, noun)}, **kwargs)


def check_fields(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """Check each value in ``values`` against the constraint its field of ``cls`` declares.

    Raises:
        ConfigError: naming ``prefix.<field>`` and the allowed values.
    """
    for f in dataclasses.fields(cls):
        constraint = f.metadata.get("check")
        if constraint is not None and f.name in values:
            constraint.check(f"{prefix}.{f.name}", values[f.name])


class _Section:
    """Base of the section dataclasses: every construction (the loader's, a test's, ``dataclasses.replace``) checks
    the ranges the fields declare, naming ``KEY.<field>``, then the section's cross-field :meth:`_check`."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        check_fields(type(self), values, self.KEY)
        self._check()

    def _check(self) -> None:
        """Constraints between fields (none unless a section defines them)."""


# --- sections ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(_Section):
    """``data``: the cohort, the task's classes and the map from the labels found onto them (:mod:`spinedxa.task`)."""

    KEY: ClassVar[str] = "data"

    source: str = sized(noun="characters")
    # Ordered classes: two are the paper's binary task (negative, positive); three or more an ordinal task, least to
    # most severe (the WHO's normal, osteopenia, osteoporosis).
    classes: tuple[str, ...] = sized(2, 8, unique=True, noun="classes (least to most severe)",
                                     default=("normal", "osteoporosis"))
    # Labels found in the data (folder names, labels.csv) -> a class or "drop"; unknown labels are quarantined.
    class_map: dict[str, str] = field(default_factory=dict)
    # Words for the report and figures (spinedxa.report): what the cohort is. "" = say nothing about it.
    name: str = ""
    anatomy: str = ""
    modality: str = ""

    def _check(self) -> None:
        try:
            task_policy.check(self.classes, self.class_map)
        except task_policy.TaskError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def task(self) -> task_policy.Task:
        """The task these classes and this label map define (:mod:`spinedxa.task`)."""
        return task_policy.Task(self.classes, dict(self.class_map))


@dataclass(frozen=True)
class ExternalConfig(_Section):
    """``external``: a second labelled cohort (another site or scanner), scored by every model, never trained on."""

    KEY: ClassVar[str] = "external"

    enabled: bool = True
    source: str = sized(noun="characters", default="data/raw/external")


@dataclass(frozen=True)
class ExternalCohortConfig(_Section):
    """``synthesize.external``: the default external cohort, a second synthetic cohort from its own seed, seen through
    a simulated second scanner (spinedxa.synthesize.Scanner). Everything not listed here is the first cohort's."""

    KEY: ClassVar[str] = "synthesize.external"

    seed: int = non_negative()
    n_scans: int = count()
    n_osteoporosis: int = non_negative()
    pixel_spacing_mm: float = positive()
    monochrome1_fraction: float = unit()
    noise_scale: float = positive(default=1.0)  # quantum noise relative to the first scanner
    psf_sigma_mm: float = positive(default=0.6)  # the scanner's blur (Gaussian SD)
    display_gamma: tuple[float, float] = positive(default=(0.6, 1.7))  # range of the per-scan display gamma
    display_span: tuple[float, float] = bounded(0, 0.9, low_open=True, default=(0.08, 0.8))  # gain, share of range

    def _check(self) -> None:
        if not 0 <= self.n_osteoporosis <= self.n_scans:
            raise ConfigError(f"synthesize.external.n_osteoporosis: {self.n_osteoporosis} is out of range; "
                              f"allowed: [0, n_scans={self.n_scans}]")
        for name in ("display_gamma", "display_span"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ConfigError(f"synthesize.external.{name}: {[low, high]}; allowed: low <= high")


@dataclass(frozen=True)
class SynthesizeConfig(_Section):
    KEY: ClassVar[str] = "synthesize"

    seed: int = non_negative()
    n_scans: int = count()
    n_osteoporosis: int = non_negative()
    followup_fraction: float = unit()
    height: int = count()
    width: int = count()
    pixel_spacing_mm: float = positive()
    monochrome1_fraction: float = unit()
    osteophyte_rate: float = unit()
    fracture_rate: float = unit()
    scoliosis_rate: float = unit()
    # Share of scans that also get a secondary-capture copy with a burned-in PHI banner (<class>/scan_NNNN_sc.dcm),
    # and share of scans drawn with benign L1-L4 level labels; both exercise ingest's burned-in text check.
    burned_in_fraction: float = unit(default=0.07)
    level_label_fraction: float = unit(default=0.15)
    # The external cohort (external.source points at it by default); None: none is synthesized.
    external: ExternalCohortConfig | None = None

    def _check(self) -> None:
        if not 0 <= self.n_osteoporosis <= self.n_scans:
            raise ConfigError(
                f"synthesize.n_osteoporosis: {self.n_osteoporosis} is out of range; "
                f"allowed: [0, n_scans={self.n_scans}]"
            )


@dataclass(frozen=True)
class IngestConfig(_Section):
    KEY: ClassVar[str] = "ingest"

    max_side: int = count()
    max_pixels: int = count()
    multiframe: Literal["first", "middle", "reject"] = "first"
    # Text burned into the pixels (spinedxa.burnedin): quarantine the file (reason burned_in_text), or black out the
    # counted text regions, grown by burned_in_margin_px on each side (original pixels), and keep the file.
    burned_in_text: Literal["quarantine", "redact"] = "quarantine"
    burned_in_margin_px: int = non_negative(default=4)
    # locate: find the L1-L4 region in each scan (spinedxa.roi; a scan without one is quarantined no_roi);
    # whole: the whole image is the region (cohorts already cropped to L1-L4 elsewhere).
    roi: Literal["locate", "whole"] = "locate"
    # Rows of the ROI image (the located L1-L4 region, spinedxa.roi) written per accepted scan; width = rows / 2.
    # 224 keeps the ~0.7 mm pixels of a 384-px processed AP lumbar scan (the L1-L4 column is ~185-265 px tall there).
    roi_height: int = bounded(32, default=224)
    # Address space each ingest worker may add to its size at start-up (RLIMIT_AS; spinedxa/ingest.py _init_worker).
    # Decoding and normalising a grayscale image needs ~8 bytes a pixel (measured: +380 MB for 49 M pixels), and OCR
    # of burned-in text at its 2048-px cap peaks at ~1 GB (measured), so 2048 fits both; a file needing more is
    # quarantined too_large instead of the worker being OOM-killed.
    worker_memory_mb: int = count(default=2048)


@dataclass(frozen=True)
class ValidateConfig(_Section):
    KEY: ClassVar[str] = "validate"

    min_per_class: int = count()
    max_quarantine_rate: float = unit()
    min_side: int = count()
    max_side: int = count()
    min_std: float = non_negative()
    phash_max_distance: int = bounded(0, 64)  # bits of a 64-bit pHash
    near_duplicate_min_ssim: float = unit(default=0.9)  # 0 = pHash alone

    def _check(self) -> None:
        if self.min_side > self.max_side:
            raise ConfigError(
                f"validate.min_side: {self.min_side} is above validate.max_side {self.max_side}; allowed: "
                "min_side <= max_side"
            )


@dataclass(frozen=True)
class SplitConfig(_Section):
    """``split``: the evaluation protocol (see :mod:`spinedxa.split`)."""

    KEY: ClassVar[str] = "split"

    protocol: Literal["kfold", "holdout"]
    seed: int = non_negative()
    folds: int = count()  # kfold: patient-grouped folds (every scan is scored once, out of fold); >= 3
    # Each fraction strictly inside (0, 1): no early stopping without val, no estimate without test.
    val: float = bounded(0, 1, low_open=True, high_open=True)  # share of each fold's training patients
    test: float = bounded(0, 1, low_open=True, high_open=True)  # holdout only: share of patients for testing

    def _check(self) -> None:
        if self.protocol == "kfold" and self.folds < 3:
            raise ConfigError(f"split.folds: {self.folds} is out of range under protocol kfold; allowed: >= 3")


@dataclass(frozen=True)
class AugmentConfig(_Section):
    KEY: ClassVar[str] = "augment"

    seed: int = non_negative()
    expand: int = non_negative()  # 0 = no offline copies
    online: bool
    rotation_deg: float = bounded(0, 180)
    hflip: float = unit()
    scale: tuple[float, float] = positive()
    translate: float = unit()  # fraction of the image size
    # brightness/contrast are ColorJitter half-widths: factors are drawn from [1 - x, 1 + x], so x <= 1.
    brightness: float = unit()
    contrast: float = unit()
    gamma: tuple[float, float] = positive()
    noise_std: float = non_negative()
    elastic_alpha: float = non_negative()  # 0 disables elastic deformation

    def _check(self) -> None:
        for name in ("scale", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"augment.{name}: {[low, high]} is out of range; allowed: 0 < low <= high")


@dataclass(frozen=True)
class ModelTrainConfig(_Section):
    """``train.<model>``: one network's recipe."""

    KEY: ClassVar[str] = "train.<model>"

    # Input height in pixels; the width is image_size / ROI_ASPECT (the ROI's shape). Each model's own minimum is
    # checked by the model registry.
    image_size: int = count()
    epochs: int = count()
    batch_size: int = count()
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = positive()
    weight_decay: float = non_negative()
    scheduler: Literal["onecycle", "cosine", "step", "plateau", "none"]
    # Where the network's initial weights come from (spinedxa.weights): none (random) | imagenet (torchvision's file
    # of the variant that runs, brought in once by `spinedxa weights fetch <model>`) | weights/<model>/<file> (a state
    # dict brought in by `spinedxa weights import <model> <path>`). Training never downloads.
    weights: str = sized(noun="characters", default="none")
    label_smoothing: float = bounded(0, 1, high_open=True, default=0.0)
    batch_norm: bool = False  # VGG only: the BatchNorm variant (torchvision vgg16_bn / vgg19_bn)
    # Online augmentation for this network: full (every technique of the augment section) or flip (its horizontal
    # flip only); off altogether when augment.online is false.
    augment: Literal["full", "flip"] = "full"
    # Clip the gradients' global L2 norm to this before each step; 0 = no clipping (Pascanu et al. 2013).
    grad_clip: float = non_negative(default=0.0)
    # Fine-tuning pre-trained weights (spinedxa.recipe.FineTune; only with weights other than none): the first
    # freeze_epochs epochs train the layers built new for the task only (a frozen warm-up); the pre-trained layers
    # then train at lr x backbone_lr_factor; bn_mode frozen keeps their BatchNorm running statistics as pre-trained
    # (the layers stay in eval mode while training). The defaults are training from scratch: one rate, nothing frozen.
    freeze_epochs: int = non_negative(default=0)
    backbone_lr_factor: float = bounded(0, 1, low_open=True, default=1.0)
    bn_mode: Literal["train", "frozen"] = "train"

    @property
    def fine_tunes(self) -> bool:
        """True when a fine-tuning knob differs from training from scratch."""
        return self.freeze_epochs > 0 or self.backbone_lr_factor != 1.0 or self.bn_mode != "train"


@dataclass(frozen=True)
class TrainConfig(_Section):
    KEY: ClassVar[str] = "train"

    models: tuple[str, ...] = sized(1, unique=True, noun=f"of {list(MODEL_NAMES)}")
    seed: int = non_negative()
    device: Literal["auto", "cpu", "cuda"]
    fast: bool
    threads: int = non_negative()  # 0 = all cores given
    class_weighting: bool
    monitor: Literal["val_loss", "val_auc"]
    patience: int = non_negative()  # 0 = no early stopping
    # Test-time augmentation of every prediction a fold model makes (its calibration, evaluate, predict): none |
    # hflip (the mean with the mirrored image).
    tta: Literal["none", "hflip"]
    cnn21: ModelTrainConfig
    resnet50: ModelTrainConfig
    vgg16: ModelTrainConfig
    vgg19: ModelTrainConfig
    inception_v3: ModelTrainConfig
    # Trainings per fold with different seeds (seed, seed + 1000, ...): the first is the result; the others measure
    # how much the seed alone moves each model's figures (the report's *Training variance*). 1 = one training.
    repeats: int = count(default=1)

    def _check(self) -> None:
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"train.models: unknown model(s) {unknown}; allowed: a subset of {list(MODEL_NAMES)}")

    def model(self, name: str) -> ModelTrainConfig:
        """Return the per-model block ``train.<name>``."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
        return getattr(self, name)


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    KEY: ClassVar[str] = "evaluate"

    seed: int = non_negative()
    bootstrap: int = count()  # resamples for the intervals
    threshold: float = bounded(0, 1, low_open=True, high_open=True)
    gradcam_images: int = count()  # the Grad-CAM figure is an output


@dataclass(frozen=True)
class ReportConfig(_Section):
    KEY: ClassVar[str] = "report"

    # Naeem et al. 2025, as reported (percent).
    paper_accuracy: float = bounded(0, 100)
    paper_f1: float = bounded(0, 100)
    paper_precision: float = bounded(0, 100)
    paper_recall: float = bounded(0, 100)
    paper_n_images: int = count(default=174)  # Naeem et al. 2025: 174 spine DXA images


@dataclass(frozen=True)
class ReplayConfig(_Section):
    """``replay``: the labelled leaky ablation of the paper's likely protocol (see :mod:`spinedxa.replay`)."""

    KEY: ClassVar[str] = "replay"

    enabled: bool
    copies: int = count()  # augmented copies per scan made BEFORE the split (210 = 6 x 35 suggests 6)
    # Held out for testing: images by the leaky run, patients by its matched control.
    test_fraction: float = bounded(0, 1, low_open=True, high_open=True)
    seed: int = non_negative()
    epochs: int = count()  # both runs (leaky and control); cnn21's recipe otherwise, capped for the CPU budget


@dataclass(frozen=True)
class PretrainConfig(_Section):
    """``pretrain``: supervised pretraining on a synthetic DXA pool, no download (see :mod:`spinedxa.pretrain`).

    The pool is rendered in-process by the cohort's forward model and scanner (``synthesize``) from its own seed, so
    it shares no scan with the cohort, the external cohort or any fold's held-out part; each network regresses the
    pool scans' standardised T-score at its own input size, and its backbone is what ``weights: pretrained`` loads.
    """

    KEY: ClassVar[str] = "pretrain"

    enabled: bool = False
    # Networks pretrained, one after another (or side by side: runtime.train_processes); the others get a marker.
    models: tuple[str, ...] = sized(1, unique=True, noun=f"of {list(MODEL_NAMES)}", default=MODEL_NAMES)
    seed: int = non_negative(default=31)  # the pool's seed: not synthesize.seed nor synthesize.external.seed
    n_scans: int = bounded(20, default=600)  # scans rendered for the pool
    val: float = bounded(0, 0.5, low_open=True, default=0.1)  # share of the pool that keeps the best epoch
    epochs: int = count(default=12)
    batch_size: int = count(default=32)
    lr: float = positive(default=0.001)  # AdamW with one-cycle, peak rate
    weight_decay: float = non_negative(default=0.05)
    grad_clip: float = non_negative(default=1.0)  # every network (0 = none)
    # Online augmentation of the pool: full (every technique of the augment section) or flip (its flip only).
    augment: Literal["full", "flip"] = "full"

    def _check(self) -> None:
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"pretrain.models: unknown model(s) {unknown}; allowed: a subset of {list(MODEL_NAMES)}")


@dataclass(frozen=True)
class TransferConfig(_Section):
    """``transfer``: does pretraining help? Each source against training from scratch on the same folds, paired
    patient bootstrap (see :mod:`spinedxa.transfer`)."""

    KEY: ClassVar[str] = "transfer"

    enabled: bool = False
    models: tuple[str, ...] = sized(1, unique=True, noun=f"of {list(MODEL_NAMES)}", default=MODEL_NAMES)
    # Weights sources compared with scratch: pretrained (the pretrain stage's), imagenet (when brought in).
    sources: tuple[str, ...] = sized(1, unique=True, noun="of ['pretrained', 'imagenet']", default=("pretrained",))
    # Small cohorts: small_draws patient-grouped, stratified subsamples of about small_size scans, each split into
    # split.folds folds (0 draws: none).
    small_size: int = bounded(12, default=60)
    small_draws: int = non_negative(default=3)
    seed: int = non_negative(default=13)  # the draws

    def _check(self) -> None:
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"transfer.models: unknown model(s) {unknown}; allowed: a subset of {list(MODEL_NAMES)}")
        bad = [s for s in self.sources if s not in TRANSFER_SOURCES]
        if bad:
            raise ConfigError(f"transfer.sources: {bad}; allowed: a subset of {list(TRANSFER_SOURCES)}")


#: Weights sources the transfer stage can compare with training from scratch (spinedxa.weights keywords).
TRANSFER_SOURCES = ("pretrained", "imagenet")


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """``runtime``: bookkeeping that never changes a result, so no stage declares it as a DVC param.

    Changing these reruns nothing: worker and process counts (every result is independent of them, see the tests),
    and where MLflow logs (``$MLFLOW_EXPERIMENT_NAME`` overrides the experiment).
    """

    KEY: ClassVar[str] = "runtime"

    workers: int = count(default=2)  # processes of synthesize and ingest
    train_processes: int = count(default=2)  # folds of one model trained side by side (train.threads each)
    checkpoint_every_s: float = non_negative(default=120.0)  # a training fold's checkpoint interval (0: every epoch)
    mlflow_experiment: str = sized(1, 500, noun="characters", default="spinedxa")


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
    replay: ReplayConfig
    external: ExternalConfig = field(default_factory=ExternalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --- loading ----------------------------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a mapping key given twice (PyYAML keeps the last one silently, so a duplicated
    block would otherwise surface as some *other* key missing)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _reject_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _reject_duplicate_keys(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (anchors may even refer to themselves)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: overriding merged keys is allowed
                _reject_duplicate_keys(value_node, prefix, seen)
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            dotted = f"{prefix}.{name}" if prefix else str(name)
            line = key_node.start_mark.line + 1
            ident = (key_node.tag, str(name))
            if ident in first_line:
                raise ConfigError(
                    f"{dotted}: duplicated key at line {line} (first at line {first_line[ident]}); "
                    "each key may appear once per mapping"
                )
            first_line[ident] = line
            _reject_duplicate_keys(value_node, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{prefix}[{i}]", seen)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with :class:`StrictLoader`.

    Raises:
        ConfigError: the file is not valid YAML, or repeats a key (the message names the file, key and line).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}; allowed: one of {list(allowed)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(f"{key} (a key)", key_type, k): _coerce(f"{key}.{k}", value_type, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(members) < len(typing.get_args(tp)):
            return None
        if len(members) == 1 and dataclasses.is_dataclass(members[0]):  # an optional section: its own messages
            return _build(members[0], value, key)
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
        if not math.isfinite(value):  # YAML's .nan / .inf pass every comparison-free check downstream
            raise ConfigError(f"{key}: {value!r} is not a finite number")
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
        try:
            kwargs[name] = _coerce(key, hints[name], raw[name])
        except ConfigError as exc:
            constraint = f.metadata.get("check")
            if constraint is None or "allowed:" in str(exc):
                raise
            raise ConfigError(f"{exc}; allowed: {constraint}") from None
    if prefix:  # the section's own __post_init__ checks again, but cannot know the block (train.<model>.lr)
        check_fields(cls, kwargs, prefix)
    return cls(**kwargs)


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Build :class:`Params` from an already-parsed mapping (e.g. Snakemake's ``config``)."""
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``.

    Raises:
        ConfigError: unknown, missing, duplicated, mistyped or out-of-range key (the message names the file and the
            dotted key), or a file that is not YAML.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    raw = read_yaml(path)
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
    base = read_yaml(params_path)
    overlay = read_yaml(profile_path) or {}
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


def profile_overrides(params_path: str | Path, profile_path: str | Path) -> list[str]:
    """The profile as DVC ``--set-param`` values (``key=value``, one per leaf), after validating the merged params.

    ``dvc exp run -S k=v ...`` applies them to an experiment and keeps ``params.yaml`` in git as the default, so a
    profile never replaces the committed defaults (``spinedxa profile run``).

    Raises:
        ConfigError: the merged parameters are invalid.
    """
    params_path, profile_path = Path(params_path), Path(profile_path)
    overlay = read_yaml(profile_path) or {}
    try:
        params_from_dict(deep_merge(read_yaml(params_path), overlay))
    except ConfigError as exc:
        raise ConfigError(f"{profile_path}: {exc}") from None
    flat: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat.append(f"{prefix}={yaml.safe_dump(node, default_flow_style=True).strip().removesuffix('...').strip()}")

    walk("", overlay)
    return flat
