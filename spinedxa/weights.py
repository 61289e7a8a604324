"""Where pre-trained weights come from: the one owner of ``train.<model>.weights``.

Sources (the value of ``train.<model>.weights``):

- ``none``: random initialisation (the registry's own, :func:`spinedxa.models.get_model`).
- ``imagenet``: torchvision's published ImageNet file of the architecture that runs (``vgg16_bn-6c64b313.pth`` for
  ``vgg16`` with ``batch_norm: true``), at ``weights/<model>/<torchvision's file name>``.
- a path ``weights/<model>/<file>``: any compatible state dict imported with ``spinedxa weights import`` (RadImageNet,
  a lab's own).
- ``pretrained``: the pretrain stage's backbone, ``models/pretrained/<model>/model.pt`` (:mod:`spinedxa.pretrain`,
  supervised on a synthetic DXA pool from seeds disjoint from the cohort's), a DVC output with its record
  ``model.pt.json`` beside it; the train stage depends on ``models/pretrained/<model>``, so a fine-tune re-runs when
  its weights change. With ``pretrain.enabled: false`` (or the model not in ``pretrain.models``) the directory holds
  only :data:`PRETRAINED_MARKER`, and asking for the weights stops training with a message naming what to set.

Nothing here downloads during a pipeline run. A file enters the project once, explicitly:
``spinedxa weights fetch <model>`` (ImageNet) or ``spinedxa weights import <model> <path>`` writes it to
``weights/<model>/``, verifies it, writes its record ``<file>.json`` beside it and ``dvc add``-s it, so git holds the
small ``<file>.dvc`` and the record, and the DVC cache/remote holds the blob. ``dvc repro`` then runs offline; the
train stage depends on ``weights/<model>`` (one directory per model, always present), so it re-runs when the file
it starts from changes. A missing file stops training with a message naming the command to run.

Verification: torchvision publishes the first hex digits of each file's sha256 in its file name (torch.hub's
``check_hash`` convention, ``resnet50-0676ba61.pth``); a fetched file must start with them, its full sha256 goes into
the record, and every later use (each fold's training) checks the file against that full sha256. Loading checks the
file's keys and shapes against the architecture and names every mismatched layer; the layers the registry builds new
for the task (:attr:`spinedxa.models.ModelSpec.head`: the classifier, VGG's first classifier layer) are skipped.

The record (``weights/<model>/<file>.json``, :data:`RECORD_KEYS`): ``kind`` (``imagenet`` | ``imported``),
``model``, ``variant`` (the architecture the file fits), ``file``, ``sha256`` (full), ``size``, ``url`` (where it was
downloaded from; for an import, the ``--origin`` given or null), plus for ImageNet ``published_url``,
``published_sha256_prefix``, ``weights_enum`` and ``torchvision`` (version); for an import ``source_name`` (the file
name it was imported from, never its absolute path).

Adding a source is one resolver in :data:`_KEYWORDS` returning a :class:`WeightsSource` (``pretrained`` is one):
loading, verification, lineage and the head rule (:func:`split_parameters`, used by fine-tuning too) are shared.

Torch-free at import (the audit reads records without loading torch); torch, torchvision and the model registry are
imported by the functions that load or build.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

from spinedxa.config import ConfigError, ModelTrainConfig
from spinedxa.contracts import jsonfile
from spinedxa.files import atomic_path, sha256_file

if TYPE_CHECKING:
    from torch import Tensor, nn

log = logging.getLogger(__name__)

NONE, IMAGENET, IMPORTED, PRETRAINED = "none", "imagenet", "imported", "pretrained"
#: Project directory holding one sub-directory of weights per model (``weights/<model>/``), relative to the repo root.
WEIGHTS_ROOT = Path("weights")
#: The pretrain stage's output: one sub-directory per model (``models/pretrained/<model>/``), relative to the repo root.
PRETRAINED_ROOT = Path("models/pretrained")
#: The pretrained backbone's file in its directory (its record is ``model.pt.json`` beside it) ...
PRETRAINED_FILE = "model.pt"
#: ... or, for a model the stage did not pretrain, this marker alone (``{"enabled": false, "model": <model>}``).
PRETRAINED_MARKER = "not_pretrained.json"
#: Keys every record holds.
RECORD_KEYS = ("kind", "model", "variant", "file", "sha256", "size", "url")
#: Builder arguments torchvision's own builder sets with its ImageNet weights (torchvision.models.inception_v3:
#: ``transform_input=True``, the [-1, 1] input scaling Google's InceptionV3 weights were trained with).
IMAGENET_BUILD: Mapping[str, Mapping[str, bool]] = {"inception_v3": {"transform_input": True}}
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class WeightsError(ValueError):
    """A weights file was refused: wrong hash or size, not a state dict, or layers that do not fit (names the file)."""


class WeightsMismatchError(WeightsError):
    """A state dict does not fit the architecture; the message names every mismatched layer."""


class WeightsNotFoundError(FileNotFoundError):
    """The weights file (or its record) a params value names is not there; the message names the command to run."""


# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class WeightsSource:
    """Where one model's initial weights come from.

    Attributes:
        kind: ``none`` | ``imagenet`` | ``imported`` | ``pretrained``.
        model: registry name.
        variant: the architecture that runs (``vgg16_bn``).
        path: the file, relative to the repo root (None for ``none``).
        sha256: its full sha256 as recorded when it entered the project.
        url: where it was downloaded from (or the origin given on import).
    """

    kind: str
    model: str
    variant: str
    path: str | None = None
    sha256: str | None = None
    url: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.kind != NONE

    def record(self) -> dict[str, Any]:
        """For meta.json (``weights``) and the audit."""
        return {"kind": self.kind, "variant": self.variant, "path": self.path, "sha256": self.sha256, "url": self.url}

    def digest(self) -> dict[str, str]:
        """``{path: sha256}`` for a training's fingerprint (empty when training from scratch)."""
        return {self.path: self.sha256} if self.path and self.sha256 else {}

    def mlflow_params(self) -> dict[str, str]:
        """MLflow params naming the weights a run started from."""
        return {"weights_kind": self.kind, "weights_file": self.path or "", "weights_sha256": self.sha256 or ""}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], model: str = "") -> WeightsSource:
        """The source a meta.json ``weights`` entry describes."""
        return cls(str(record.get("kind", "")), model, str(record.get("variant", "")), record.get("path"),
                   record.get("sha256"), record.get("url"))

    def describe(self) -> str:
        """One line: ``imagenet weights/resnet50/resnet50-0676ba61.pth sha256 <full> (from <url>)``."""
        if not self.pretrained:
            return "none (random initialisation)"
        origin = f" (from {self.url})" if self.url else ""
        return f"{self.kind} {self.path} sha256 {self.sha256}{origin}"


def model_dir(model: str, root: str | Path = ".") -> Path:
    """``<root>/weights/<model>``: where that model's weights files and records live."""
    return Path(root) / WEIGHTS_ROOT / model


def pretrained_dir(model: str, root: str | Path = ".") -> Path:
    """``<root>/models/pretrained/<model>``: where the pretrain stage writes that model's backbone and record."""
    return Path(root) / PRETRAINED_ROOT / model


def record_path(file: str | Path) -> Path:
    """The record of a weights file: ``<file>.json`` beside it."""
    file = Path(file)
    return file.with_name(f"{file.name}.json")


def read_record(file: str | Path) -> dict[str, Any]:
    """The record of ``file``.

    Raises:
        FileNotFoundError: no record.
        WeightsError: the record is malformed or lacks keys.
    """
    try:
        return jsonfile.read(record_path(file), RECORD_KEYS)
    except jsonfile.RecordError as exc:
        raise WeightsError(str(exc)) from None


def _variant(model: str, batch_norm: bool) -> str:
    from spinedxa.models import variant

    return variant(model, batch_norm)


def architecture(model: str, cfg: ModelTrainConfig) -> dict[str, bool]:
    """The builder arguments of the network ``cfg`` trains (``get_model(model, n, **architecture(model, cfg))``):
    ``batch_norm``, and ``transform_input`` as torchvision sets it for the ImageNet weights."""
    transform = cfg.weights == IMAGENET and IMAGENET_BUILD.get(model, {}).get("transform_input", False)
    return {"batch_norm": cfg.batch_norm, "transform_input": bool(transform)}


def _none(model: str, cfg: ModelTrainConfig, directory: Path, pretrained: Path) -> WeightsSource:
    return WeightsSource(NONE, model, _variant(model, cfg.batch_norm))


def _imagenet(model: str, cfg: ModelTrainConfig, directory: Path, pretrained: Path) -> WeightsSource:
    try:
        published = imagenet_file(model, cfg.batch_norm)
    except ValueError as exc:
        raise ConfigError(f"train.{model}.weights: {exc}; allowed: none, or weights/{model}/<file> imported with "
                          f"`spinedxa weights import {model} <path>`") from None
    command = f"spinedxa weights fetch {model}{' --batch-norm' if cfg.batch_norm else ''}"
    return _recorded(model, cfg, directory / published.file_name, command, IMAGENET)


def _imported(model: str, cfg: ModelTrainConfig, value: str, directory: Path) -> WeightsSource:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or Path(path).parent != directory:
        raise ConfigError(f"train.{model}.weights: {value!r} is not a file in {directory.as_posix()}/; allowed: none, "
                          f"imagenet, or {directory.as_posix()}/<file> (bring a file in with `spinedxa weights import "
                          f"{model} <path>`, which prints the value to set)")
    return _recorded(model, cfg, Path(path), f"spinedxa weights import {model} <path of {path.name}>", IMPORTED)


def _recorded(model: str, cfg: ModelTrainConfig, file: Path, command: str, kind: str) -> WeightsSource:
    """The source of a file that entered the project through ``command``, checked against its record."""
    shown = file.as_posix()
    has_record = record_path(file).is_file()
    if not has_record:
        raise WeightsNotFoundError(
            f"{shown}: no such weights in the project (no record {record_path(file).name}); train.{model}.weights "
            f"asks for it. Bring it in once with `{command}`, then commit the record and the .dvc file it writes "
            "(`dvc repro` never downloads)")
    if not file.is_file():
        raise WeightsNotFoundError(
            f"{shown}: missing from the workspace, but its record {record_path(file).as_posix()} is committed: run "
            f"`dvc pull {shown}` (or `{command}` again)")
    return _checked(model, cfg, file, command, kind)


def _checked(model: str, cfg: ModelTrainConfig, file: Path, command: str, kind: str) -> WeightsSource:
    """The source of ``file`` once its record says it holds ``kind`` weights of the variant ``cfg`` trains."""
    shown = file.as_posix()
    record = read_record(file)
    want = _variant(model, cfg.batch_norm)
    if record["model"] != model or record["variant"] != want or record["kind"] != kind:
        raise ConfigError(
            f"train.{model}.weights: {shown} was recorded as {record['kind']} weights of {record['variant']} (model "
            f"{record['model']}), but train.{model} trains {want} from {kind} weights; allowed: a file recorded for "
            f"{want} (`{command}`)")
    return WeightsSource(kind, model, want, shown, str(record["sha256"]), record.get("url"))


def _pretrained(model: str, cfg: ModelTrainConfig, directory: Path, pretrained: Path) -> WeightsSource:
    """The pretrain stage's backbone of ``model`` (``models/pretrained/<model>/model.pt``), checked against its
    record."""
    file = pretrained / PRETRAINED_FILE
    command = "dvc repro pretrain"
    if not record_path(file).is_file() or not file.is_file():
        why = (f"the pretrain stage did not pretrain {model} ({(pretrained / PRETRAINED_MARKER).as_posix()}: "
               f"pretrain.enabled is false, or {model} is not in pretrain.models)"
               if (pretrained / PRETRAINED_MARKER).is_file() else "the pretrain stage has not run")
        raise WeightsNotFoundError(
            f"{file.as_posix()}: no pretrained weights: {why}, but train.{model}.weights asks for them; set "
            f"pretrain.enabled: true with {model} in pretrain.models (profiles/pretrained.yaml does) and run "
            f"`{command}`, or set train.{model}.weights: none")
    return _checked(model, cfg, file, command, PRETRAINED)


#: Keyword values of ``train.<model>.weights`` and their resolvers ``(model, cfg, weights directory, pretrained
#: directory)``; any other value is a path to an imported file.
_KEYWORDS: dict[str, Callable[[str, ModelTrainConfig, Path, Path], WeightsSource]] = {
    NONE: _none, IMAGENET: _imagenet, PRETRAINED: _pretrained}


def resolve(model: str, cfg: ModelTrainConfig, directory: str | Path | None = None,
            pretrained: str | Path | None = None) -> WeightsSource:
    """The source ``train.<model>.weights`` names, checked against its record (its hash is checked by :func:`verify`).

    Args:
        model: registry name.
        cfg: the model's ``train.<model>`` block.
        directory: the model's weights directory as the stage receives it (default ``weights/<model>``).
        pretrained: the model's pretrain output directory as the stage receives it (default
            ``models/pretrained/<model>``).

    Raises:
        ConfigError: a value that names no source for this model (``imagenet`` for cnn21, a path outside the
            model's weights directory, a file recorded for another architecture); the message names the key.
        WeightsNotFoundError: the file or its record is missing (the message names the command that brings it in).
    """
    directory = model_dir(model) if directory is None else Path(directory)
    pretrained = pretrained_dir(model) if pretrained is None else Path(pretrained)
    resolver = _KEYWORDS.get(cfg.weights)
    return resolver(model, cfg, directory, pretrained) if resolver else _imported(model, cfg, cfg.weights, directory)


def verify(source: WeightsSource, root: str | Path = ".") -> Path:
    """Check the source's file against the full sha256 recorded for it; return its path.

    Raises:
        WeightsNotFoundError: the file is missing.
        WeightsError: its sha256 differs from the record.
    """
    if source.path is None:
        raise ValueError(f"{source.model}: weights {source.kind!r} have no file to verify")
    path = Path(root) / source.path
    if not path.is_file():
        raise WeightsNotFoundError(f"{source.path}: not found (run `dvc pull {source.path}`)")
    actual = sha256_file(path)
    if actual != source.sha256:
        raise WeightsError(f"{source.path}: sha256 {actual} differs from {source.sha256} recorded in "
                           f"{record_path(source.path).as_posix()}: the file changed since it was fetched or imported "
                           f"(restore it with `dvc checkout {source.path}`)")
    return path


# --------------------------------------------------------------------------------------------- loading


def _state_dict(obj: Any, origin: str) -> dict[str, Tensor]:
    """The tensors of a loaded file: a plain state dict, or one nested under ``state_dict`` / ``model`` (a training
    checkpoint), with a prefix every key shares removed (``module.`` of DDP, ``backbone.`` of spinedxa's wrapper)."""
    import torch

    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{origin}: not a state dict (a mapping of layer names to tensors, or one under "
                           f"'state_dict' or 'model'); got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state(path: str | Path) -> dict[str, Tensor]:
    """Load a weights file as data (``weights_only``: never code) into a plain state dict.

    Raises:
        WeightsError: the file is not a weights-only state dict.
    """
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: not a weights-only torch file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _state_dict(obj, str(path))


def load_state(source: WeightsSource, root: str | Path = ".") -> dict[str, Tensor]:
    """The verified state dict of ``source`` (its full sha256 checked first).

    Raises:
        WeightsNotFoundError, WeightsError: see :func:`verify` and :func:`read_state`.
    """
    return read_state(verify(source, root))


def _backbone(model: nn.Module) -> nn.Module:
    from spinedxa.models import ImageNetInput

    return model.backbone if isinstance(model, ImageNetInput) else model


def split_parameters(model: nn.Module, name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(pre-trained layers, layers built new for the task)`` of a network from :func:`spinedxa.models.get_model`,
    by the head rule (:attr:`spinedxa.models.ModelSpec.head`), each in ``named_parameters`` order."""
    from spinedxa.models import get_spec

    head = get_spec(name).head
    body, new = [], []
    for key, param in _backbone(model).named_parameters():
        (new if key.startswith(head) else body).append(param)
    return body, new


def backbone_norms(model: nn.Module, name: str) -> list[nn.Module]:
    """The BatchNorm layers of the pre-trained part (outside the head) of a network, in ``named_modules`` order."""
    from torch import nn as torch_nn

    from spinedxa.models import get_spec

    head = tuple(h.rstrip(".") for h in get_spec(name).head)
    return [m for key, m in _backbone(model).named_modules()
            if isinstance(m, torch_nn.modules.batchnorm._BatchNorm) and not key.startswith(head)]


def mismatches(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor],
               head: tuple[str, ...]) -> dict[str, list[str]]:
    """Every layer where ``state`` does not fit ``expected`` (key -> shape), head layers excepted, by kind:
    ``missing from the file``, ``not in the model``, ``shape differs`` (empty lists: it fits).

    A missing ``num_batches_tracked`` is no mismatch: it is a counter, not a weight, and files written before
    PyTorch 0.4.1 (some of torchvision's) lack it; BatchNorm's loader fills it in.
    """
    def body(keys: Any) -> set[str]:
        return {k for k in keys if not k.startswith(head)}

    return {
        "missing from the file": sorted(k for k in body(expected) - set(state)
                                        if not k.endswith("num_batches_tracked")),
        "not in the model": sorted(body(state) - set(expected)),
        "shape differs": [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k])})"
                          for k in sorted(body(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k])],
    }


def _check(name: str, arch: str, expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor],
           origin: str) -> tuple[str, ...]:
    """Raise :class:`WeightsMismatchError` naming every mismatched layer; return the head prefixes."""
    from spinedxa.models import get_spec

    head = get_spec(name).head
    found = {kind: layers for kind, layers in mismatches(expected, state, head).items() if layers}
    if found:
        count = sum(len(layers) for layers in found.values())
        raise WeightsMismatchError(f"{origin}: does not fit {arch} ({count} mismatched layer(s); the layers built "
                                   f"new for the task, {list(head)}, are exempt): "
                                   + "; ".join(f"{kind}: {', '.join(layers)}" for kind, layers in found.items()))
    return head


def load_into(model: nn.Module, name: str, state: Mapping[str, Tensor], origin: str, *,
              arch: str | None = None) -> None:
    """Copy ``state`` into the backbone of ``model`` (from :func:`spinedxa.models.get_model`), head layers skipped.

    Args:
        arch: the architecture named in errors (default ``name``).

    Raises:
        WeightsMismatchError: a layer is missing, unexpected or of another shape (each one named).
    """
    target = _backbone(model)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    head = _check(name, arch or name, expected, state, origin)
    target.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)}, strict=False)


def check_fits(model: str, batch_norm: bool, state: Mapping[str, Tensor], origin: str) -> None:
    """Check that ``state`` loads into ``model`` (its variant), without building it (meta tensors: no memory).

    Raises:
        WeightsMismatchError: each mismatched layer named.
    """
    import torch

    from spinedxa.models import get_model

    with torch.device("meta"):
        net = _backbone(get_model(model, 2, batch_norm=batch_norm))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    _check(model, _variant(model, batch_norm), expected, state, origin)


def build_model(name: str, num_classes: int, cfg: ModelTrainConfig, source: WeightsSource,
                root: str | Path = ".") -> nn.Module:
    """The network ``cfg`` trains, starting from ``source``'s weights (verified; the head is new for
    ``num_classes``), or randomly initialised for ``none``.

    Raises:
        WeightsNotFoundError, WeightsError, WeightsMismatchError: see :func:`load_state` and :func:`load_into`.
    """
    from spinedxa.models import get_model

    model = get_model(name, num_classes, **architecture(name, cfg))
    if source.pretrained:
        load_into(model, name, load_state(source, root), str(source.path), arch=source.variant)
    return model


def backbone_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of a network's backbone (no ``backbone.`` prefix: the layout torchvision's files have), as CPU
    copies."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _backbone(model).state_dict().items()}


# --------------------------------------------------------------------------------------------- the pretrain stage's files


def write_pretrained(directory: str | Path, model: str, variant: str, state: Mapping[str, Tensor],
                     extra: Mapping[str, Any]) -> WeightsSource:
    """Write the pretrain stage's backbone of ``model`` to ``<directory>/model.pt`` and its record beside it
    (:data:`RECORD_KEYS` with ``kind`` pretrained and ``url`` null, plus ``extra``: what the pretraining saw and cost).

    Returns:
        Its source (path as given, under ``directory``).
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / PRETRAINED_FILE
    torch.save(dict(state), file)
    record = {"kind": PRETRAINED, "model": model, "variant": variant, "file": PRETRAINED_FILE,
              "sha256": sha256_file(file), "size": file.stat().st_size, "url": None, **extra}
    jsonfile.write(record_path(file), record)
    return WeightsSource(PRETRAINED, model, variant, file.as_posix(), record["sha256"], None)


def write_pretrained_marker(directory: str | Path, model: str) -> None:
    """``<directory>/not_pretrained.json``: the pretrain stage did not pretrain ``model`` (the directory exists, so
    the train stage's dependency on it holds)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jsonfile.write(directory / PRETRAINED_MARKER, {"enabled": False, "model": model})


def pretrained_records(root: str | Path, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The records of the pretrain stage's backbones under ``root`` (``models/pretrained``), by model; a model with
    only a marker is left out."""
    out = {}
    for name in models:
        file = Path(root) / name / PRETRAINED_FILE
        if record_path(file).is_file():
            out[name] = read_record(file)
    return out


# --------------------------------------------------------------------------------------------- bringing files in


@dataclass(frozen=True)
class PublishedFile:
    """A weights file as its publisher names it.

    Attributes:
        url: where it is published.
        file_name: its name (the project keeps it under this name).
        hash_prefix: the leading hex digits of its sha256, published in the file name (torch.hub convention).
        enum: the torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V1``).
    """

    url: str
    file_name: str
    hash_prefix: str
    enum: str = ""


def imagenet_file(model: str, batch_norm: bool = False) -> PublishedFile:
    """torchvision's published ImageNet file of ``model`` (its ``_bn`` variant when ``batch_norm``).

    Raises:
        ValueError: unknown model, a model without ImageNet weights (cnn21), or ``batch_norm`` for a network without
            a BatchNorm variant.
    """
    import torch
    import torchvision

    from spinedxa.models import get_spec

    enum = get_spec(model).imagenet_weights
    if enum is None:
        raise ValueError(f"{model} has no ImageNet weights (torchvision publishes none for it)")
    if batch_norm:  # VGG16_Weights.IMAGENET1K_V1 -> VGG16_BN_Weights.IMAGENET1K_V1
        enum = enum.replace("_Weights.", "_BN_Weights.")
    try:
        url = torchvision.models.get_weight(enum).url
    except ValueError:
        raise ValueError(f"{model}: batch_norm selects VGG's BatchNorm variant; {model} has none") from None
    name = PurePosixPath(urlparse(url).path).name
    match = torch.hub.HASH_REGEX.search(name)
    if match is None or not match.group(1):  # pragma: no cover - every torchvision classification file has one
        raise ValueError(f"{url}: no sha256 prefix in the file name")
    return PublishedFile(url, name, match.group(1), enum)


def download(url: str, dest: Path, timeout: float = _TIMEOUT_S) -> tuple[str, int]:
    """Stream ``url`` into ``dest``, hashing as it goes; return ``(sha256, bytes)``.

    Raises:
        WeightsError: the server answered with an error, could not be reached, or sent fewer (or more) bytes than its
            ``Content-Length`` (a truncated transfer).
    """
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "spinedxa"}),
                                    timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        raise WeightsError(f"{url}: download failed ({type(exc).__name__}: {exc})") from None
    if length is not None and int(length) != size:
        raise WeightsError(f"{url}: truncated transfer: {size} of {int(length)} bytes (Content-Length)")
    return digest.hexdigest(), size


def _copy(src: Path, dest: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dest``, hashing as it goes; return ``(sha256, bytes)``."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as out:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _require_dvc(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise FileNotFoundError(f"{(root / '.dvc').as_posix()}: not found: {root} is not a DVC repository (run from "
                                "the project root, or pass --root)")


def _dvc_add(root: Path, rel: str) -> None:
    """``dvc add`` the file (its ``.dvc`` file and ``.gitignore`` entry go to git, the blob to the DVC cache)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", rel], cwd=root, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{rel}: `dvc add` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}; "
                           f"the file and its record are in place: run `dvc add {rel}` once DVC works")


def _finish(root: Path, dest: Path, record: dict[str, Any], track: bool) -> WeightsSource:
    """Write the record beside ``dest``, ``dvc add`` it, and return its source (paths relative to ``root``)."""
    jsonfile.write(record_path(dest), record)
    rel = dest.relative_to(root).as_posix()
    if track:
        _dvc_add(root, rel)
    return WeightsSource(record["kind"], record["model"], record["variant"], rel, record["sha256"], record["url"])


def _existing(dest: Path) -> dict[str, Any] | None:
    """The record of ``dest`` when the file is there and matches it (nothing to do), else None."""
    if dest.is_file() and record_path(dest).is_file():
        record = read_record(dest)
        if sha256_file(dest) == record["sha256"]:
            return record
    return None


def fetch(model: str, *, batch_norm: bool = False, root: str | Path = ".", url: str | None = None,
          published: PublishedFile | None = None, track: bool = True, timeout: float = _TIMEOUT_S) -> WeightsSource:
    """Download ``model``'s ImageNet weights into ``weights/<model>/`` once: verified, recorded, tracked by DVC.

    The file must start with the published sha256 prefix (and, when a record exists, equal its full sha256); it is
    checked against the architecture, then moved into place; on any failure nothing is left behind. A file already in
    place that matches its record is kept (nothing is downloaded).

    Args:
        model: registry name; ``batch_norm``: VGG's BatchNorm variant.
        root: the project root (holds ``.dvc/``).
        url: download from here instead (a mirror, a ``file://`` copy of the torch cache); the published name and
            hash prefix still decide.
        published: the file to fetch (default :func:`imagenet_file`).
        track: ``dvc add`` the file (tests of the download itself pass False).

    Raises:
        WeightsError: download failed, truncated, or the hash or layers do not match (nothing kept).
        FileNotFoundError: ``root`` is not a DVC repository (checked before downloading when ``track``).
        ValueError: no ImageNet weights for the model / variant.
    """
    root = Path(root)
    published = published or imagenet_file(model, batch_norm)
    if track:
        _require_dvc(root)
    dest = model_dir(model, root) / published.file_name
    arch = _variant(model, batch_norm)
    kept = _existing(dest)
    if kept is not None:
        log.info("%s: already fetched (sha256 %s matches its record)", dest, kept["sha256"])
        return _finish(root, dest, kept, track)
    previous = read_record(dest) if record_path(dest).is_file() else None
    source_url = url or published.url
    log.info("%s: downloading %s", dest, source_url)
    with atomic_path(dest) as tmp:
        sha, size = download(source_url, tmp, timeout)
        if not sha.startswith(published.hash_prefix):
            raise WeightsError(f"{source_url}: sha256 {sha} does not start with {published.hash_prefix}, the prefix "
                               f"published in its name {published.file_name}: refused, nothing kept")
        if previous is not None and previous["sha256"] != sha:
            raise WeightsError(f"{source_url}: sha256 {sha} differs from {previous['sha256']} recorded in "
                               f"{record_path(dest)}: refused, nothing kept")
        check_fits(model, batch_norm, read_state(tmp), source_url)
    import torchvision

    record = {"kind": IMAGENET, "model": model, "variant": arch, "file": dest.name, "sha256": sha, "size": size,
              "url": source_url, "published_url": published.url, "published_sha256_prefix": published.hash_prefix,
              "weights_enum": published.enum, "torchvision": torchvision.__version__.split("+")[0]}
    return _finish(root, dest, record, track)


def import_file(model: str, src: str | Path, *, batch_norm: bool = False, root: str | Path = ".",
                name: str | None = None, origin: str | None = None, track: bool = True) -> WeightsSource:
    """Bring a local state dict (RadImageNet, a lab's own) into ``weights/<model>/``: checked against the
    architecture, recorded (sha256, size, origin), tracked by DVC.

    Args:
        model: registry name; ``batch_norm``: VGG's BatchNorm variant (the file must fit the variant that trains).
        src: the file.
        root: the project root (holds ``.dvc/``).
        name: the file's name in the project (default: its own).
        origin: where it came from (a URL, a citation), recorded as ``url``.
        track: ``dvc add`` the file.

    Raises:
        FileNotFoundError: ``src`` is missing, or ``root`` is no DVC repository.
        WeightsError: not a state dict, layers that do not fit (each named), or another file already recorded
            under that name (nothing kept).
    """
    root, src = Path(root), Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: not found")
    if track:
        _require_dvc(root)
    from spinedxa.models import get_spec

    get_spec(model)  # an unknown model: ValueError naming the registered ones
    dest = model_dir(model, root) / (name or src.name)
    if dest.name.endswith(".json") or dest.name.endswith(".dvc"):
        raise WeightsError(f"{dest}: a weights file may not end in .json or .dvc (its record and DVC file do)")
    arch = _variant(model, batch_norm)
    if src.resolve() == dest.resolve():  # already in place: hash and check it where it is
        sha, size = sha256_file(dest), dest.stat().st_size
        check_fits(model, batch_norm, read_state(dest), str(dest))
    else:
        if dest.exists() and sha256_file(dest) != sha256_file(src):
            raise WeightsError(f"{dest}: already holds another file; import under another --name, or remove it first "
                               f"(`dvc remove {dest.relative_to(root).as_posix()}.dvc`)")
        with atomic_path(dest) as tmp:
            sha, size = _copy(src, tmp)
            check_fits(model, batch_norm, read_state(tmp), str(src))
    record = {"kind": IMPORTED, "model": model, "variant": arch, "file": dest.name, "sha256": sha, "size": size,
              "url": origin, "source_name": src.name}
    return _finish(root, dest, record, track)
