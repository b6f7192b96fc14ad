"""Quantized layers and their quantizers.

* :class:`WeightQuantizer` - per-output-channel symmetric scales for a weight tensor.
* :class:`ActQuantizer` - one per-tensor symmetric scale for an activation tensor, signed or
  unsigned (after ReLU/ReLU6), on the grid its export target's kernels run (see
  :class:`dfq.kernels.fake_quant.QuantScheme`).
* :class:`QuantConv2d` - a conv with its BatchNorm folded in "Tune mode": the module keeps the
  conv weight and the BN affine parameters with frozen running statistics, and every forward
  computes the folded weight ``W * gamma / sqrt(var + eps)`` and bias, which is what gets
  quantized, trained and exported. Asymmetric padding (TensorFlow "same") is part of the conv.
* :class:`QuantLinear` - a linear layer with a weight quantizer.

Scales are ``nn.Parameter`` so quantization-aware fine-tuning can learn them (LSQ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.kernels.fake_quant import (
    Grid,
    QuantScheme,
    fake_quantize,
    lsq_grad_scale,
    mse_optimal_scale,
    quantize_to_int,
    weight_grid,
)


MIN_RELATIVE_WEIGHT_SCALE = 1e-4   # smallest channel step, relative to the layer's largest


def fold_bn_into_conv(weight: torch.Tensor, bias: torch.Tensor | None, bn_mean: torch.Tensor,
                      bn_var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm into the conv before it.

    ``y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta`` equals ``conv(x, W') + b'``
    with ``W' = W * gamma / sqrt(var + eps)`` (per output channel, ``W`` is ``[O, I/g, kh, kw]``)
    and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (``[O]``).
    """
    factor = gamma / torch.sqrt(bn_var + eps)
    shape = [-1] + [1] * (weight.dim() - 1)
    if bias is None:
        bias = torch.zeros_like(bn_mean)
    return weight * factor.reshape(shape), (bias - bn_mean) * factor + beta


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer (zero point 0), ``scale`` has shape ``[O]``."""

    def __init__(self, out_channels: int, bits: int, reduce_range: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.reduce_range = reduce_range
        self.grid: Grid = weight_grid(bits, reduce_range)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.enabled = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=[{self.grid.qmin}, {self.grid.qmax}], enabled={self.enabled}"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.scale.clamp(min=1e-12).reshape([-1] + [1] * (w.dim() - 1))
        return fake_quantize(w, s, self.grid, lsq_grad_scale(w[0].numel(), self.grid))

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor, search: bool = True) -> None:
        """Set the scales from the weight: an MSE-minimising clip search per channel when
        ``search`` (the clip ratio ranges over [0.5, 1]), else ``max|w| / qmax``."""
        lowest = 0.5 if search else 1.0
        scale = mse_optimal_scale(w, self.grid, candidates=51 if search else 1, lowest=lowest, channel_dim=0)
        # Near-dead channels (BN gamma ~ 0: max|w| 1e-6..1e-10 of their neighbours', common in
        # EfficientNet) would get steps so small that their bias, on the int32 grid s_in * s_w,
        # overflows int32 and is silently clamped to ~0. Such channels output their bias; a floor
        # relative to the layer's largest step keeps that bias exact and costs nothing (weights
        # this small quantize to 0 under either step).
        self.scale.copy_(torch.maximum(scale, scale.max() * MIN_RELATIVE_WEIGHT_SCALE))


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer; ``scale`` is a 0-d parameter.

    ``observer`` (when set) sees every input before quantization; calibration uses it.
    ``upper_bound`` records a known bound of the tensor (6 after ReLU6) so calibration never
    picks a range wider than the activation can reach.
    """

    def __init__(self, bits: int, signed: bool, scheme: QuantScheme, upper_bound: float | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.grid: Grid = scheme.activation_grid(bits, signed)
        self.upper_bound = upper_bound
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.enabled = True
        self.observer = None

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, signed={self.signed}, grid=[{self.grid.qmin}, {self.grid.qmax}], "
                f"enabled={self.enabled}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        if not self.enabled:
            return x
        return fake_quantize(x, self.scale.clamp(min=1e-12), self.grid,
                             lsq_grad_scale(x[0].numel(), self.grid))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class QuantConv2d(nn.Module):
    """Conv2d (+ folded BatchNorm, Tune mode) with a per-channel weight quantizer.

    ``pads`` is ``(top, left, bottom, right)``; asymmetric pads are applied with ``F.pad`` and
    exported as the Conv's own ``pads`` attribute. ``bias_mode='int32'`` (ONNX Runtime target)
    rounds the folded bias to the int32 grid ``scale_in * scale_w`` that QLinearConv uses;
    the scale of the input quantizer is then passed as the second forward argument.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, bits: int,
                 pads: tuple[int, int, int, int] | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only explicit zero padding is supported")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        ph, pw = conv.padding
        extra = pads or (0, 0, 0, 0)
        self.pads = (ph + extra[0], pw + extra[1], ph + extra[2], pw + extra[3])
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone() if conv.bias is not None
                                 else torch.zeros(conv.out_channels))
        self.has_bn = bn is not None
        if bn is not None:
            self.bn_weight = nn.Parameter(bn.weight.detach().clone() if bn.weight is not None
                                          else torch.ones(conv.out_channels))
            self.bn_bias = nn.Parameter(bn.bias.detach().clone() if bn.bias is not None
                                        else torch.zeros(conv.out_channels))
            self.register_buffer("bn_mean", bn.running_mean.detach().clone())
            self.register_buffer("bn_var", bn.running_var.detach().clone())
            self.bn_eps = float(bn.eps)
        self.weight_quantizer = WeightQuantizer(conv.out_channels, bits)
        self.bias_mode = "float"

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN-folded float weight ``[O, I/g, kh, kw]`` and bias ``[O]`` (what is quantized)."""
        if not self.has_bn:
            return self.weight, self.bias
        return fold_bn_into_conv(self.weight, self.bias, self.bn_mean, self.bn_var,
                                 self.bn_weight, self.bn_bias, self.bn_eps)

    def quantized_bias(self, bias: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if self.bias_mode != "int32" or input_scale is None or not self.weight_quantizer.enabled:
            return bias
        step = input_scale.clamp(min=1e-12) * self.weight_quantizer.scale.clamp(min=1e-12)
        return _round_ste(bias / step).clamp(-(2**31), 2**31 - 1) * step

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        top, left, bottom, right = self.pads
        if top == bottom and left == right:
            return self._conv(x, input_scale, (top, left))
        return self.forward_padded(F.pad(x, (left, right, top, bottom)), input_scale)

    def forward_padded(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on an input that already carries its ``pads`` (or is a window of such an input)."""
        return self._conv(x, input_scale, 0)

    def _conv(self, x: torch.Tensor, input_scale: torch.Tensor | None, padding) -> torch.Tensor:
        w, b = self.folded()
        return F.conv2d(x, self.weight_quantizer(w), self.quantized_bias(b, input_scale), self.stride, padding,
                        self.dilation, self.groups)


class QuantLinear(nn.Module):
    """Linear layer with a per-output-channel weight quantizer (``bias_mode`` as in QuantConv2d)."""

    def __init__(self, linear: nn.Linear, bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone() if linear.bias is not None
                                 else torch.zeros(linear.out_features))
        self.weight_quantizer = WeightQuantizer(linear.out_features, bits)
        self.bias_mode = "float"

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias

    quantized_bias = QuantConv2d.quantized_bias

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight_quantizer(self.weight)
        return F.linear(x, w, self.quantized_bias(self.bias, input_scale))


def weight_codes(m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_q, s_w, b)`` of a QuantConv2d/QuantLinear: the integer weight codes (float32 tensor),
    the float32 per-channel weight step, and the BN-folded float bias."""
    w, b = (t.detach().float() for t in m.folded())
    s_w = m.weight_quantizer.scale.detach().float().clamp(min=1e-12)
    shape = [-1] + [1] * (w.dim() - 1)
    return quantize_to_int(w, s_w.reshape(shape), m.weight_quantizer.grid), s_w, b
