"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, section 4.2) with "option A" shortcuts.

The module names match the widely used checkpoints of akamaster/pytorch_resnet_cifar10 (after
stripping their DataParallel ``module.`` prefix): ``conv1 bn1``, ``layer1..3`` of ``n``
BasicBlocks (``conv1 bn1 conv2 bn2``) with 16/32/64 channels, global average pooling, ``linear``.

Written for ``torch.fx.symbolic_trace`` and graph rewriting: every conv is immediately followed by
its BatchNorm, activations are separate ``nn.ReLU()`` modules (one per use, not in place), and
residual sums are ``out + shortcut``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# depth -> blocks per stage (depth = 6n + 2)
CIFAR_RESNET_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}


class PadChannelsShortcut(nn.Module):
    """Option-A shortcut without parameters: keep every second pixel (stride 2) and zero-pad the
    channels by ``planes // 4`` on each side, so ``planes // 2`` channels become ``planes``."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual sum; ReLU after the first BN and after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcut needs stride 2 and doubled channels")
            self.shortcut: nn.Module | None = PadChannelsShortcut(planes)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = out + shortcut
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: (N, 3, 32, 32) normalised images -> (N, num_classes) logits."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet of the given depth (20, 32, 44 or 56), randomly initialised, train mode."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {sorted(CIFAR_RESNET_DEPTHS)}, got {depth}")
    return CifarResNet(CIFAR_RESNET_DEPTHS[depth], num_classes)
