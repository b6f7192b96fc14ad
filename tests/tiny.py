"""Tiny seeded models shared by the tests (CPU, milliseconds per forward)."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)
    return model


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class TinyResNet(nn.Module):
    """Stem (ReLU6, max-pool), one residual block, an asymmetric-padded stride-2 conv (TF "same"),
    a depthwise conv, global pooling and a classifier: every op kind the real models use."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.block = Block(width)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.down_act = nn.ReLU()
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False)
        self.dw_bn = nn.BatchNorm2d(2 * width)
        self.dw_act = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.pool(self.stem_act(self.stem_bn(self.stem(x))))
        x = self.block(x)
        x = self.down_act(self.down_bn(self.down(self.pad(x))))
        x = self.dw_act(self.dw_bn(self.dw(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def tiny_resnet(seed: int = 0, **kw) -> TinyResNet:
    torch.manual_seed(seed)
    return randomize_bn(TinyResNet(**kw), seed).eval()


def tiny_images(n: int = 64, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def qconfig(target: str = "onnxruntime", **fields):
    """A QuantConfig for a registered export target (default onnxruntime)."""
    from dfq.export.targets import get_target

    return get_target(target).quant_config(**fields)


def with_wrong_block_scale(model, factor: float = 1.05):
    """A copy of an exported ONNX whose first activation scale inside the residual block is
    ``factor`` times too large (the defect a fidelity reference must see)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for t in bad.graph.initializer:
        if t.name.endswith(".q_scale") and "block" in t.name:
            arr = onnx.numpy_helper.to_array(t) * np.float32(factor)
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
            return bad
    raise AssertionError("no activation scale in the block")
