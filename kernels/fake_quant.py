"""Fake-quantization primitives: the arithmetic that the exported Q/DQ graph reproduces exactly.

A value ``x`` on a symmetric integer grid ``[qmin, qmax]`` with step ``scale`` becomes

    q = clamp(round_half_even(x / scale), qmin, qmax)        (the integer, what QuantizeLinear stores)
    x_hat = q * scale                                          (what DequantizeLinear returns)

``torch.round`` and ONNX ``QuantizeLinear`` both round half to even, so the fake-quant model
and the ONNX artifact compute the same numbers. Gradients follow LSQ (Esser et al. 2020): a
straight-through estimator for ``x`` inside the grid and the LSQ step-size gradient for
``scale``, multiplied by ``grad_scale`` (usually ``1/sqrt(numel * qmax)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """An integer grid ``[qmin, qmax]`` (inclusive) with zero point 0."""

    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        if not self.qmin < self.qmax:
            raise ValueError(f"empty grid [{self.qmin}, {self.qmax}]")
        if self.qmin > 0:
            raise ValueError("zero must lie on the grid (qmin <= 0)")

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def weight_grid(bits: int, reduce_range: bool = False) -> Grid:
    """Per-channel symmetric weight grid: 8 bits -> [-127, 127] (narrow range, what TensorRT and
    ONNX Runtime's symmetric quantizer use), or [-63, 63] with ``reduce_range``; 4 bits -> [-8, 7]
    (4-bit numerics stored in INT8).

    ``reduce_range`` exists for ONNX Runtime on x86 CPUs without VNNI: their U8S8 kernels
    (AVX2 ``vpmaddubsw``) add pairs of uint8 x int8 products in int16 with saturation, so
    255 * 127 * 2 overflows and the integer result silently differs from the QDQ graph's meaning.
    With |w| <= 63 a pair sum is at most 255 * 63 * 2 = 32130 and cannot saturate."""
    if bits == 8:
        return Grid(-63, 63) if reduce_range else Grid(-127, 127)
    if bits == 4:
        return Grid(-8, 7)
    raise ValueError(f"unsupported weight bit width {bits} (supported: 4, 8)")


@dataclass(frozen=True)
class QuantScheme:
    """The integer arithmetic of one runtime's kernels, as far as the fake-quant model mirrors it.

    Each export target (:mod:`dfq.export.targets`) defines its scheme; the pipeline reads these
    fields and never the target's name.

    * ``unsigned_8bit_max``: top of the 8-bit grid of a tensor proven non-negative (after
      ReLU/ReLU6): 255 where activations can be UINT8, 127 where only INT8 exists. Signed 8-bit
      tensors use [-128, 127]; 4-bit ones [0, 15] / [-8, 7] (INT8 containers, clipped).
    * ``reduce_range``: the default for 8-bit weights, [-63, 63] instead of [-127, 127] (see
      :func:`weight_grid`).
    * ``quantize_outputs``: every conv and residual-Add output is quantized (runtimes that fuse
      DQ -> op -> Q into one integer kernel need the Q).
    * ``int32_bias``: conv/linear biases are rounded to the int32 grid ``s_in * s_w``.
    * ``integer_gating``: sigmoid gates (SiLU's ``x * sigmoid(x)``, squeeze-excitation's
      ``x * sigmoid(s)``) read and write quantized tensors: the sigmoid output (8 bits on [0, 1])
      and the product are quantized, so that DQ -> Sigmoid -> Q and DQ -> Mul -> Q fuse into
      integer kernels (ONNX Runtime's QLinearSigmoid, a table lookup, and QLinearMul).
    """

    name: str
    unsigned_8bit_max: int = 127
    reduce_range: bool = False
    quantize_outputs: bool = False
    int32_bias: bool = False
    integer_gating: bool = False

    def activation_grid(self, bits: int, signed: bool) -> Grid:
        """Per-tensor activation grid of ``bits`` (8 or 4), signed or not."""
        if bits == 8:
            return Grid(-128, 127) if signed else Grid(0, self.unsigned_8bit_max)
        if bits == 4:
            return Grid(-8, 7) if signed else Grid(0, 15)
        raise ValueError(f"unsupported activation bit width {bits} (supported: 4, 8)")


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The integers QuantizeLinear produces: ``clamp(round(x / scale), qmin, qmax)`` (float dtype)."""
    return torch.clamp(torch.round(x / scale), grid.qmin, grid.qmax)


class _FakeQuantLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin: int, qmax: int, grad_scale: float):  # type: ignore[override]
        xs = x / scale
        q = torch.clamp(torch.round(xs), qmin, qmax)
        ctx.save_for_backward(xs, q)
        ctx.scale_shape = scale.shape
        ctx.grad_scale = grad_scale
        ctx.qmin, ctx.qmax = qmin, qmax
        return q * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, q = ctx.saved_tensors
        inside = (xs >= ctx.qmin) & (xs <= ctx.qmax)
        grad_x = grad_out * inside.to(grad_out.dtype)
        # d(q*s)/ds = q - x/s inside the grid, qmin or qmax where clamped (LSQ).
        dscale = torch.where(inside, q - xs, q) * grad_out * ctx.grad_scale
        shape = ctx.scale_shape
        if len(shape) == 0:
            grad_s = dscale.sum().reshape(shape)
        else:
            dims = [d for d in range(dscale.dim()) if d >= len(shape) or shape[d] == 1]
            # scale is broadcast against x from the left (e.g. [C,1,1,1] vs [C,I,kh,kw])
            grad_s = dscale.sum(dim=dims, keepdim=True).reshape(shape)
        return grad_x, grad_s, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, grid: Grid, grad_scale: float = 1.0) -> torch.Tensor:
    """``clamp(round(x/scale), qmin, qmax) * scale`` with LSQ gradients for ``x`` and ``scale``.

    ``scale`` is a 0-d tensor (per-tensor) or broadcastable to ``x`` along dim 0 (per channel,
    shape ``[C, 1, ...]``). The forward value is computed exactly as written, no STE tricks that
    would change the rounding of the result.
    """
    return _FakeQuantLSQ.apply(x, scale, grid.qmin, grid.qmax, grad_scale)


def lsq_grad_scale(numel_per_scale: int, grid: Grid) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, grid.qmax))


def mse_optimal_scale(x: torch.Tensor, grid: Grid, *, candidates: int = 100, lowest: float = 0.2,
                      channel_dim: int | None = None) -> torch.Tensor:
    """Scale that minimises ``mean((fake_quantize(x) - x)^2)`` over clipping thresholds
    ``alpha * max|x|`` for ``alpha`` in ``[lowest, 1]`` (``candidates`` values).

    With ``channel_dim`` set the search is per channel and the result has one entry per channel
    (shape ``[C]``); otherwise a 0-d tensor. A zero channel gets scale 1 (any scale is exact).
    """
    x = x.detach().float()
    if channel_dim is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, channel_dim).reshape(x.shape[channel_dim], -1)
    # the side of the grid that bounds the data: positive side qmax, negative side -qmin
    limit = torch.maximum(flat.clamp(min=0).amax(dim=1) / grid.qmax,
                          (-flat).clamp(min=0).amax(dim=1) / max(1, -grid.qmin)
                          if grid.qmin < 0 else torch.zeros(flat.shape[0]))
    best_err = torch.full((flat.shape[0],), float("inf"))
    best = limit.clone()
    for alpha in torch.linspace(lowest, 1.0, candidates):
        s = (limit * alpha).clamp(min=1e-12)
        q = torch.clamp(torch.round(flat / s[:, None]), grid.qmin, grid.qmax) * s[:, None]
        err = ((q - flat) ** 2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    best = torch.where(limit > 0, best, torch.ones_like(best))
    return best.reshape(()) if channel_dim is None else best
