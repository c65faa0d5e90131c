"""Small CPU-sized models: a VGG-style net and a CIFAR-style ResNet."""

from __future__ import annotations

from torch import Tensor, nn

from icnn_compress.models._registry import register_model
from icnn_compress.models._weights import load_weights

__all__ = ["CifarResNet", "VGGSmall"]

VGG_SMALL_CFG = (48, 48, "M", 96, 96, "M", 160, 160, 160, 160)


class VGGSmall(nn.Module):
    """VGG-style: 3x3 conv-BN-ReLU stages, two max-pools, global average pool, linear.

    With the default widths it has about 1.0M parameters; a 28x28 input gives 7x7 maps at the
    top (160 filters), where the interpretable filter loss usually goes (``features``' last convs).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg: tuple = VGG_SMALL_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(c, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)  # separate modules: each can carry its own hook
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of basic blocks, 3x3 stem."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, depth: int = 20, widths=(16, 32, 64)
    ) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _finish(model: nn.Module, weights: str | None, strict: bool) -> nn.Module:
    return load_weights(model, weights, strict=strict) if weights else model


@register_model("vgg_small")
def vgg_small(*, num_classes=10, in_channels=3, small_input=True, weights=None, strict=True) -> nn.Module:
    return _finish(VGGSmall(num_classes, in_channels), weights, strict)


@register_model("resnet_cifar20")
def resnet_cifar20(
    *, num_classes=10, in_channels=3, small_input=True, weights=None, strict=True
) -> nn.Module:
    return _finish(CifarResNet(num_classes, in_channels, depth=20), weights, strict)


@register_model("resnet_cifar8")
def resnet_cifar8(*, num_classes=10, in_channels=3, small_input=True, weights=None, strict=True) -> nn.Module:
    """The smallest CIFAR ResNet (one block per stage), for tests and quick runs."""
    return _finish(CifarResNet(num_classes, in_channels, depth=8), weights, strict)
