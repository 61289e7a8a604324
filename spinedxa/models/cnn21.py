"""The 21-layer CNN of Naeem et al. 2025, as a documented reconstruction.

Naeem et al. 2025 (Front. Comput. Neurosci., doi 10.3389/fncom.2025.1712896) propose a "21-layer CNN" but publish
no layer list, input size or filter counts. This module reconstructs it the way such networks are usually built and
counted in MATLAB's Deep Learning Toolbox, where every layer object in the ``layers`` array counts as one layer:
the image input layer, each convolution, batch-normalisation, ReLU and pooling layer, the fully connected layer,
the dropout layer, and the softmax and classification output layers. The design (3 x 3 convolutions with "same"
padding, batch norm, ReLU, 2 x 2 max pooling with stride 2, channels doubling per block) follows MATLAB's
"Create Simple Deep Learning Network for Classification" example, deepened to four blocks.

Layer table (MATLAB-style counting; output shapes for a 128 x 128 input):

====  ==========================  ==================================  =================
 #    MATLAB layer                PyTorch module                      output
====  ==========================  ==================================  =================
 1    imageInputLayer             ``input`` (:class:`ImageInput`)     1 x 128 x 128
 2    convolution2dLayer(3, 32)   ``features.conv1``                  32 x 128 x 128
 3    batchNormalizationLayer     ``features.bn1``                    32 x 128 x 128
 4    reluLayer                   ``features.relu1``                  32 x 128 x 128
 5    maxPooling2dLayer(2, 2)     ``features.pool1``                  32 x 64 x 64
 6    convolution2dLayer(3, 64)   ``features.conv2``                  64 x 64 x 64
 7    batchNormalizationLayer     ``features.bn2``                    64 x 64 x 64
 8    reluLayer                   ``features.relu2``                  64 x 64 x 64
 9    maxPooling2dLayer(2, 2)     ``features.pool2``                  64 x 32 x 32
 10   convolution2dLayer(3, 128)  ``features.conv3``                  128 x 32 x 32
 11   batchNormalizationLayer     ``features.bn3``                    128 x 32 x 32
 12   reluLayer                   ``features.relu3``                  128 x 32 x 32
 13   maxPooling2dLayer(2, 2)     ``features.pool3``                  128 x 16 x 16
 14   convolution2dLayer(3, 256)  ``features.conv4``                  256 x 16 x 16
 15   batchNormalizationLayer     ``features.bn4``                    256 x 16 x 16
 16   reluLayer                   ``features.relu4``                  256 x 16 x 16
 17   globalAveragePooling2dLayer ``pool`` (AdaptiveAvgPool2d(1))     256 x 1 x 1
 18   dropoutLayer(0.5)           ``dropout``                         256
 19   fullyConnectedLayer(2)      ``fc``                              2
 20   softmaxLayer                in the loss / ``predict_proba``     2
 21   classificationLayer         ``nn.CrossEntropyLoss`` in training --
====  ==========================  ==================================  =================

Layers 1-19 are the 19 leaf modules of :class:`CNN21`; layers 20 and 21 live outside the module in PyTorch
(``nn.CrossEntropyLoss`` fuses softmax and the classification loss; inference applies softmax in
:func:`spinedxa.models.predict_proba`), so the network returns logits. :func:`count_layers` applies this convention
and returns 21. Dropout sits before the fully connected layer (dropping logits after it would be pointless).

Global average pooling (layer 17) makes the network work at any input size from :data:`MIN_SIZE` (64 px is used in
tests, 128 px by default) up to 299 px and beyond. About 0.39 M parameters: fast on CPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

#: Channels of the four convolution blocks (doubling per block, as in MATLAB's simple-CNN example).
CHANNELS: tuple[int, int, int, int] = (32, 64, 128, 256)
#: Three 2 x 2 poolings shrink the input 8-fold; 32 px leaves a 4 x 4 map for the last block.
MIN_SIZE = 32
#: Dropout probability: MATLAB ``dropoutLayer`` default.
DROPOUT = 0.5
#: MATLAB layers that PyTorch keeps outside the module (in the loss and in ``predict_proba``).
OUTPUT_LAYERS_OUTSIDE_MODULE: tuple[str, ...] = ("softmaxLayer", "classificationLayer")

#: The MATLAB layer each leaf-module type stands for (used by :func:`count_layers` and the docs).
MATLAB_EQUIVALENT: dict[type[nn.Module], str] = {}


class ImageInput(nn.Module):
    """MATLAB ``imageInputLayer``: checks the input shape and zero-centres the intensities.

    MATLAB's default "zerocenter" normalisation subtracts the training-set mean image; a fixed 0.5 (the middle of the
    [0, 1] input range) is used instead so that the network has no data-dependent state outside its weights.
    """

    def __init__(self, channels: int = 1, min_size: int = MIN_SIZE) -> None:
        super().__init__()
        self.channels = channels
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"cnn21: expected input N x {self.channels} x H x W, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"cnn21: input {tuple(x.shape[-2:])} is smaller than the minimum {self.min_size} px")
        return x - 0.5


MATLAB_EQUIVALENT.update(
    {
        ImageInput: "imageInputLayer",
        nn.Conv2d: "convolution2dLayer",
        nn.BatchNorm2d: "batchNormalizationLayer",
        nn.ReLU: "reluLayer",
        nn.MaxPool2d: "maxPooling2dLayer",
        nn.AdaptiveAvgPool2d: "globalAveragePooling2dLayer",
        nn.Dropout: "dropoutLayer",
        nn.Linear: "fullyConnectedLayer",
    }
)


class CNN21(nn.Module):
    """The reconstructed 21-layer CNN (see the module docstring for the layer table).

    Args:
        num_classes: size of the output (2 for normal / osteoporosis).
        in_channels: input channels (1: grayscale DXA).

    Input ``N x 1 x H x W`` float in [0, 1]; output logits ``N x num_classes``.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.input = ImageInput(in_channels)
        layers: list[tuple[str, nn.Module]] = []
        prev = in_channels
        for i, ch in enumerate(CHANNELS, start=1):
            layers += [
                (f"conv{i}", nn.Conv2d(prev, ch, kernel_size=3, padding=1, bias=False)),  # bias is redundant before BN
                (f"bn{i}", nn.BatchNorm2d(ch)),
                (f"relu{i}", nn.ReLU(inplace=True)),
            ]
            if i < len(CHANNELS):
                layers.append((f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2)))
            prev = ch
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(DROPOUT)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.input(x))
        x = torch.flatten(self.pool(x), 1)  # a reshape, not a layer in MATLAB's count (the FC layer flattens)
        return self.fc(self.dropout(x))

    @property
    def last_conv_block(self) -> nn.Module:
        """The ReLU after the last convolution (layer 16): the Grad-CAM target."""
        return self.features[-1]


def matlab_layers(model: nn.Module) -> list[str]:
    """Return the MATLAB layer names of ``model`` in order: one per leaf module, plus softmax and classification.

    Raises:
        TypeError: a leaf module has no MATLAB equivalent (so the count would be meaningless).
    """
    names = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        try:
            names.append(MATLAB_EQUIVALENT[type(module)])
        except KeyError:
            raise TypeError(f"module {name!r} ({type(module).__name__}) has no MATLAB layer equivalent") from None
    return names + list(OUTPUT_LAYERS_OUTSIDE_MODULE)


def count_layers(model: nn.Module) -> int:
    """Count layers the MATLAB way (see the module docstring); 21 for :class:`CNN21`."""
    return len(matlab_layers(model))
