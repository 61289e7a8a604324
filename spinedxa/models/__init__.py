"""Model registry: the reconstructed 21-layer CNN and four torchvision baselines behind one API.

``get_model(name, num_classes, *, weights=None)`` returns a module that takes ``N x 1 x H x W`` float input in [0, 1]
(grayscale DXA) and returns what its backbone returns (logits; InceptionV3 in training mode returns
``InceptionOutputs(logits, aux_logits)``). :class:`ModelSpec` knows each model's native input size, its minimum input
size, its Grad-CAM target layer and how to unwrap its output.

Grayscale input for the ImageNet backbones: :class:`ImageNetInput` replicates the single channel to three and applies
the ImageNet mean/std normalisation, rather than replacing the first convolution by a 1-channel one. This keeps
ImageNet weights usable unchanged (a replicated gray image is what an RGB network sees for a gray photo) at the cost
of three times the first layer's compute, which is negligible beside the rest of the network. cnn21 takes one channel
natively.

Pre-trained weights: ``get_model`` builds randomly initialised networks; :mod:`spinedxa.weights` (the one owner of
where pre-trained weights come from) loads a verified state dict into one, skipping the layers this registry builds
new for the task (:attr:`ModelSpec.head`). Nothing here reads a weights file or downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.inception import InceptionAux, InceptionOutputs

from spinedxa.calibration import Calibration
from spinedxa.config import MODEL_NAMES
from spinedxa.models.cnn21 import CNN21
from spinedxa.models.cnn21 import MIN_SIZE as CNN21_MIN_SIZE

__all__ = [
    "ImageNetInput",
    "ModelSpec",
    "WEIGHTS_OPTIONS",
    "from_state",
    "get_model",
    "get_spec",
    "TTA_OPTIONS",
    "list_models",
    "load_trained",
    "variant",
    "predict_proba",
    "score",
]

#: Accepted values of ``get_model(weights=...)``: random initialisation. Pre-trained weights (``train.<model>.weights``)
#: are loaded by :func:`spinedxa.weights.build_model`.
WEIGHTS_OPTIONS: tuple[str | None, ...] = (None, "none")

# ImageNet channel statistics used by every torchvision classification weight (torchvision ImageClassification preset).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(nn.Module):
    """Wrap a 3-channel ImageNet backbone so that it takes ``N x 1 x H x W`` grayscale input in [0, 1].

    The gray channel is replicated to RGB and normalised with the ImageNet mean/std; the backbone's output is
    returned unchanged. The statistics are non-persistent buffers, so the state dict holds only ``backbone.*``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_statistics()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Write the ImageNet mean/std into their buffers (again after :func:`from_state` built the network empty)."""
        self.mean.copy_(torch.tensor(IMAGENET_MEAN, device=self.mean.device).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(IMAGENET_STD, device=self.std.device).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Any:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grayscale input N x 1 x H x W, got shape {tuple(x.shape)}")
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x)


class _SizeRobustInceptionAux(InceptionAux):
    """torchvision's InceptionV3 auxiliary head, made to work below the native 299 px.

    The original head pools its 17 x 17 input (at 299 px) with a fixed 5 x 5 / stride 3 window to 5 x 5 and then
    applies a 5 x 5 convolution, so it fails for inputs below about 299 px (Mixed_6e is 3 x 3 at 80 px, 7 x 7 at
    128 px). Smaller maps are resized to 5 x 5 by adaptive average pooling instead; at 17 x 17 and above the original
    pooling is kept, so ImageNet weights behave exactly as published at the native size.
    """

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 17:
            x = F.adaptive_avg_pool2d(x, (5, 5))
        else:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        x = self.conv1(self.conv0(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.fc(x)


def _plain_unwrap(output: Tensor) -> tuple[Tensor, Tensor | None]:
    return output, None


def _inception_unwrap(output: Tensor | InceptionOutputs) -> tuple[Tensor, Tensor | None]:
    if isinstance(output, InceptionOutputs):
        return output.logits, output.aux_logits
    return output, None


# ----------------------------------------------------------------------------------------------- builders


def _build_cnn21(num_classes: int, batch_norm: bool, transform_input: bool) -> nn.Module:
    _no_variant("cnn21", batch_norm, transform_input)
    return CNN21(num_classes=num_classes)


def _no_variant(name: str, batch_norm: bool, transform_input: bool) -> None:
    if batch_norm:
        raise ValueError(f"{name}: batch_norm selects the BatchNorm variant of VGG only; set it false for {name}")
    if transform_input and name != "inception_v3":
        raise ValueError(f"{name}: transform_input is InceptionV3's input scaling only; set it false for {name}")


def _torchvision_backbone(name: str, batch_norm: bool = False, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised torchvision classifier (its ``_bn`` variant when ``batch_norm``)."""
    return torchvision.models.get_model(variant(name, batch_norm), weights=None, **kwargs)


def _build_resnet50(num_classes: int, batch_norm: bool, transform_input: bool) -> nn.Module:
    _no_variant("resnet50", batch_norm, transform_input)
    # From scratch, the last BatchNorm of every residual branch starts at zero, so each block starts as the identity
    # (Goyal et al. 2017, "Accurate, large minibatch SGD", section 5.1; torchvision's zero_init_residual): measured
    # here, ResNet-50 from scratch on ~100 ROI images trains without the early loss blow-ups it had without it.
    # Pre-trained weights overwrite these scales (spinedxa.weights loads every BatchNorm of the file).
    net = _torchvision_backbone("resnet50", zero_init_residual=True)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return ImageNetInput(net)


def _build_vgg(name: str) -> Callable[[int, bool, bool], nn.Module]:
    def build(num_classes: int, batch_norm: bool, transform_input: bool) -> nn.Module:
        _no_variant(name, False, transform_input)
        net = _torchvision_backbone(name, batch_norm)
        # The classifier reads the 512 globally average-pooled channels, not torchvision's 7 x 7 grid (25088 inputs):
        # at this pipeline's inputs (80 x 40 px) the last feature map is 2 x 1, which the 7 x 7 adaptive pool only
        # interpolates, so 103 M first-layer weights would carry 1024 distinct values. Measured (one core, bf16,
        # batch 16, VGG-16-BN at 80 x 40): 134 M -> 34 M parameters, 3.0 s -> 0.9 s per AdamW step, checkpoint
        # 1.6 GB -> 0.4 GB. The 13/16 conv layers and the 4096-4096 classifier stay; with ImageNet weights the
        # convolutions and the second classifier layer are pretrained, the first classifier layer is new.
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        channels = [m for m in net.features if isinstance(m, nn.Conv2d)][-1].out_channels  # 512
        net.classifier[0] = nn.Linear(channels, net.classifier[0].out_features)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
        return ImageNetInput(net)

    return build


def _build_inception_v3(num_classes: int, batch_norm: bool, transform_input: bool) -> nn.Module:
    _no_variant("inception_v3", batch_norm, False)
    # init_weights=True: torchvision's own truncated-normal init (and silences its FutureWarning about the default).
    # transform_input: torchvision sets it with its ImageNet weights, re-mapping ImageNet-normalised input to the
    # [-1, 1] scaling those weights were trained with (ImageNetInput feeds exactly that ImageNet normalisation). It is
    # no tensor of the state dict, so a trained model records it (meta.json) and load_trained rebuilds it.
    net = _torchvision_backbone("inception_v3", aux_logits=True, init_weights=True, transform_input=transform_input)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    aux = _SizeRobustInceptionAux(net.AuxLogits.fc.in_features, num_classes)
    aux.conv0, aux.conv1 = net.AuxLogits.conv0, net.AuxLogits.conv1
    net.AuxLogits = aux
    return ImageNetInput(net)


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about one registered model.

    Attributes:
        name: registry name (``spinedxa.config.MODEL_NAMES``).
        input_size: native input size in pixels (224; InceptionV3 299).
        min_size: smallest input the network accepts, in pixels (in both training and eval mode).
        build: ``build(num_classes, batch_norm, transform_input)``; use :func:`get_model`.
        gradcam_layer: ``gradcam_layer(model)`` the module whose activations Grad-CAM explains (last conv block).
        unwrap: ``unwrap(output)`` returns ``(logits, aux_logits or None)``.
        imagenet_weights: torchvision weights enum member for ``weights: imagenet`` (None: no ImageNet weights).
        head: state-dict key prefixes (of the backbone: no ``backbone.``) of the layers built new for the task, which
            pre-trained weights never fill (:mod:`spinedxa.weights` skips them in a file, whatever their shape).
    """

    name: str
    input_size: int
    min_size: int
    build: Callable[[int, str | None, bool], nn.Module]
    gradcam_layer: Callable[[nn.Module], nn.Module]
    unwrap: Callable[[Any], tuple[Tensor, Tensor | None]]
    imagenet_weights: str | None = None
    head: tuple[str, ...] = ()


def _last_relu(features: nn.Module) -> nn.Module:
    """The last ReLU of a VGG ``features`` stack: the output of the last conv block before its max pooling."""
    return [m for m in features if isinstance(m, nn.ReLU)][-1]


# VGG's first classifier layer reads the 512 pooled channels (not the 7 x 7 grid) and its last one the task's classes:
# both are new (_build_vgg).
_VGG_HEAD = ("classifier.0.", "classifier.6.")

_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("cnn21", 224, CNN21_MIN_SIZE, _build_cnn21, lambda m: m.last_conv_block, _plain_unwrap,
                  head=("fc.",)),
        # min_size 32: torchvision's documented minimum for ResNet/VGG weights (weights.meta["min_size"]).
        ModelSpec(
            "resnet50", 224, 32, _build_resnet50, lambda m: m.backbone.layer4[-1], _plain_unwrap,
            "ResNet50_Weights.IMAGENET1K_V1", head=("fc.",),
        ),
        ModelSpec(
            "vgg16", 224, 32, _build_vgg("vgg16"), lambda m: _last_relu(m.backbone.features), _plain_unwrap,
            "VGG16_Weights.IMAGENET1K_V1", head=_VGG_HEAD,
        ),
        ModelSpec(
            "vgg19", 224, 32, _build_vgg("vgg19"), lambda m: _last_relu(m.backbone.features), _plain_unwrap,
            "VGG19_Weights.IMAGENET1K_V1", head=_VGG_HEAD,
        ),
        # min_size 75: torchvision's Inception_V3_Weights.meta["min_size"]; the aux head is made size-robust above.
        ModelSpec(
            "inception_v3", 299, 75, _build_inception_v3, lambda m: m.backbone.Mixed_7c, _inception_unwrap,
            "Inception_V3_Weights.IMAGENET1K_V1", head=("fc.", "AuxLogits.fc."),
        ),
    )
}
if tuple(_REGISTRY) != MODEL_NAMES:  # pragma: no cover - guards an edit that forgets one side
    raise ImportError(f"model registry {list(_REGISTRY)} != spinedxa.config.MODEL_NAMES {list(MODEL_NAMES)}")


def list_models() -> list[str]:
    """Registered model names, in ``spinedxa.config.MODEL_NAMES`` order."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}") from None


def _check_weights(name: str, weights: str | None) -> None:
    if weights not in WEIGHTS_OPTIONS:
        raise ValueError(f"{name}: unknown weights {weights!r}; expected one of {list(WEIGHTS_OPTIONS)} (get_model "
                         "initialises at random; spinedxa.weights.build_model starts from train.<model>.weights)")


def variant(name: str, batch_norm: bool = False) -> str:
    """The architecture that runs: ``vgg16_bn`` for ``vgg16`` with ``batch_norm``, else ``name``."""
    return f"{name}_bn" if batch_norm else name


def get_model(name: str, num_classes: int, *, weights: str | None = None, batch_norm: bool = False,
              transform_input: bool = False) -> nn.Module:
    """Build a registered model, randomly initialised, with a ``num_classes``-way head for ``N x 1 x H x W`` input in
    [0, 1]. Pre-trained weights: :func:`spinedxa.weights.build_model`.

    Args:
        name: one of :func:`list_models`.
        num_classes: number of output classes (``len(data.classes)``).
        weights: None or "none" (random initialisation; the only values: see above).
        batch_norm: VGG only: torchvision's BatchNorm variant (``vgg16_bn``, ``vgg19_bn``; Simonyan & Zisserman's
            plain VGG does not train from scratch on this cohort, measured: README "Recipes").
        transform_input: InceptionV3 only: torchvision's ``transform_input`` (what its ImageNet weights expect).

    Raises:
        ValueError: unknown model or weights value, ``num_classes < 1``, ``batch_norm`` for a network other than VGG,
            or ``transform_input`` for one other than InceptionV3.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    _check_weights(name, weights)
    return spec.build(num_classes, batch_norm, transform_input)


def from_state(name: str, num_classes: int, state: Mapping[str, Tensor], *, batch_norm: bool = False,
               transform_input: bool = False, source: str | Path | None = None) -> nn.Module:
    """Build ``name`` (as :func:`get_model` does) holding the complete state dict ``state``, on the CPU, without its
    random initialisation.

    The network is built on PyTorch's meta device (no memory, no initialisation), given uninitialised CPU storage and
    filled by a strict ``load_state_dict``: every parameter and persistent buffer comes from ``state``, so the result
    is the network :func:`get_model` plus ``load_state_dict`` gives, bit for bit (tests/test_models.py). Buffers
    start at zero (a state dict without BatchNorm's ``num_batches_tracked`` is accepted by PyTorch and leaves it
    as it was), and the one state outside a state dict, :class:`ImageNetInput`'s statistics, is written again. It saves the initialisation,
    which is most of building a large network: VGG-19-BN 1.7 s, VGG-16-BN 1.1 s, InceptionV3 0.4 s each time a fold
    model is loaded (AMD EPYC Zen 4).

    Raises:
        ValueError: as :func:`get_model`.
        RuntimeError: ``state`` does not fit the network (the message names ``source`` when given).
    """
    with torch.device("meta"):
        model = get_model(name, num_classes, batch_norm=batch_norm, transform_input=transform_input)
    model = model.to_empty(device="cpu")
    for buffer in model.buffers():  # no uninitialised memory survives, e.g. a BatchNorm counter a state may omit
        buffer.zero_()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        where = f"{source}: " if source is not None else ""
        raise RuntimeError(f"{where}state dict does not match model {name!r}: {exc}") from exc
    for module in model.modules():
        if isinstance(module, ImageNetInput):
            module.reset_statistics()
    return model


def load_trained(model_dir: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model written by the train stage (``model_dir/meta.json`` + ``model_dir/model.pt``), in eval mode.

    Returns:
        ``(model, meta)``; ``meta`` is the parsed meta.json (keys in docs/CONTRACTS.md).

    Raises:
        FileNotFoundError: meta.json or model.pt is missing.
        ValueError: meta.json lacks ``model`` or ``classes``, or names an unknown model.
        RuntimeError: the state dict does not fit the architecture meta.json names (message names the file).
    """
    model_dir = Path(model_dir)
    meta_path, weights_path = model_dir / "meta.json", model_dir / "model.pt"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the train stage for this model first)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    missing = [key for key in ("model", "classes") if key not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing key(s) {missing}")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = from_state(meta["model"], len(meta["classes"]), state, batch_norm=bool(meta.get("batch_norm", False)),
                       transform_input=bool(meta.get("transform_input", False)), source=weights_path)
    return model.to(map_location).eval(), meta


#: Test-time augmentation choices (``train.tta``): none, or the mean with the left-right mirrored image.
TTA_OPTIONS = ("none", "hflip")


@torch.no_grad()
def predict_proba(
    model: nn.Module, name: str, images: Tensor, *, batch_size: int = 32, device: str | torch.device = "cpu",
    tta: str = "none",
) -> np.ndarray:
    """Class probabilities of each image, by softmax over the logits (``N x K``; column ``k`` is class ``k``).

    The model is run in eval mode (its previous mode is restored afterwards) without gradients, in fp32 and
    channels_last, whatever ``train.fast`` (which chooses how training runs): the model is moved to ``device`` in
    that memory format, in place (as training's fast paths keep it; its mode is restored, its format is not), and so
    is each batch. Calibration, evaluate, transfer, predict and Grad-CAM after them all see this one numerics. oneDNN's fp32 convolutions prefer it on every x86 CPU: 1.24x (ResNet-50), 1.28x (VGG-16),
    1.62x (InceptionV3) and 2.3x (cnn21) the images/s of contiguous tensors (AVX2, 2 threads, measured here); the
    probabilities moved by at most 1.2e-7. ``tta="hflip"``
    averages the probabilities of each image and its left-right mirror: a mirrored AP spine scan is a plausible scan
    (training flips half the images), and the mean of the two halves the variance of the prediction.

    Args:
        model: a module from :func:`get_model` or :func:`load_trained`.
        name: its registry name (selects how to unwrap its output).
        images: ``N x 1 x H x W`` float tensor in [0, 1].
        batch_size: images per forward pass.
        device: where to run.
        tta: one of :data:`TTA_OPTIONS`.

    Returns:
        float64 array of shape ``(N, K)`` (rows sum to 1).

    Raises:
        ValueError: bad shape, batch size or ``tta``.
    """
    spec = get_spec(name)
    if tta not in TTA_OPTIONS:
        raise ValueError(f"tta {tta!r} is not one of {list(TTA_OPTIONS)}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{name}: expected images N x 1 x H x W, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        model.to(device, memory_format=torch.channels_last)
        probs = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, dtype=torch.float32)
            batch = batch.contiguous(memory_format=torch.channels_last)
            views = [batch, torch.flip(batch, dims=[3])] if tta == "hflip" else [batch]
            p = sum(torch.softmax(spec.unwrap(model(v))[0].float(), dim=1) for v in views) / len(views)
            probs.append(p.cpu())
    finally:
        model.train(was_training)
    if not probs:
        return np.zeros((0, _num_classes(model)), dtype=np.float64)
    return torch.cat(probs).double().numpy()


def score(model: nn.Module, name: str, images: Tensor, calibration: "Calibration", *, tta: str = "none",
          device: str | torch.device = "cpu", batch_size: int = 32) -> np.ndarray:
    """A fold model's calibrated class probabilities (``N x K``) with its test-time augmentation: the one scoring
    path of evaluate (held-out part and external cohort) and ``spinedxa predict``."""
    return calibration.apply(predict_proba(model, name, images, batch_size=batch_size, device=device, tta=tta))


def _num_classes(model: nn.Module) -> int:
    """The number of outputs of a model's last linear layer (its classes)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linear[-1].out_features) if linear else 2
