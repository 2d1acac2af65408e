"""ImageNet-size architectures with random weights, defined here because torchvision does not
import beside the pinned torch CPU build. Structures follow torchvision's (ResNet-18/50, VGG-16,
DenseNet-121, MobileNet-V2); weights are random and BatchNorm statistics are randomised so that
gates are mixed on and off, as in a trained network.

    python benchmarks/archs.py resnet18 out.onnx --classes 1000
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

import onnx
import torch
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = _bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = _bn(c)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != c:
            self.down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), _bn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        out = c * 4
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = _bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = _bn(c)
        self.conv3 = nn.Conv2d(c, out, 1, bias=False)
        self.bn3 = _bn(out)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != out:
            self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), _bn(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


def resnet(block: type, layers: list[int], classes: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), _bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, n in enumerate(layers):
        c = 64 * 2**i
        for j in range(n):
            mods.append(block(cin, c, 2 if (j == 0 and i > 0) else 1))
            cin = c * block.expansion
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*mods)


def resnet18(classes: int = 1000) -> nn.Module:
    return resnet(Basic, [2, 2, 2, 2], classes)


def resnet50(classes: int = 1000) -> nn.Module:
    return resnet(Bottleneck, [3, 4, 6, 3], classes)


def vgg16(classes: int = 1000) -> nn.Module:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    mods: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            mods.append(nn.MaxPool2d(2))
        else:
            mods += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    mods += [nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
             nn.Linear(4096, classes)]
    return nn.Sequential(*mods)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32) -> None:
        super().__init__()
        self.f = nn.Sequential(_bn(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                               _bn(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], 1)


def densenet121(classes: int = 1000) -> nn.Module:
    mods: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), _bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for i, n in enumerate([6, 12, 24, 16]):
        for _ in range(n):
            mods.append(DenseLayer(c))
            c += 32
        if i < 3:
            mods += [_bn(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    mods += [_bn(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*mods)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), _bn(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), _bn(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), _bn(cout)]
        self.f = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x) if self.residual else self.f(x)


def mobilenet_v2(classes: int = 1000) -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    mods: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), _bn(32), nn.ReLU6()]
    c = 32
    for t, out, n, s in cfg:
        for i in range(n):
            mods.append(InvertedResidual(c, out, s if i == 0 else 1, t))
            c = out
    mods += [nn.Conv2d(c, 1280, 1, bias=False), _bn(1280), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(1280, classes)]
    return nn.Sequential(*mods)


ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16, "densenet121": densenet121,
    "mobilenet_v2": mobilenet_v2,
}


def build(name: str, classes: int, seed: int = 0) -> nn.Module:
    """The architecture with random weights and randomised BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name](classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def export(model: nn.Module, size: int = 224) -> onnx.ModelProto:
    """TorchScript exporter, opset 17, symbolic batch."""
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


if __name__ == "__main__":
    name, path = sys.argv[1], sys.argv[2]
    classes = int(sys.argv[sys.argv.index("--classes") + 1]) if "--classes" in sys.argv else 1000
    onnx.save(export(build(name, classes)), path)
