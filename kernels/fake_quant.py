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

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


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


def activation_grid(bits: int, signed: bool, target: str) -> Grid:
    """Per-tensor activation grid for a target.

    8-bit unsigned (a post-ReLU tensor) is [0, 255] on ONNX Runtime (UINT8, zero point 0) but
    [0, 127] on TensorRT, which has no UINT8. Signed 8-bit is [-128, 127] on both (ONNX Runtime
    stores it as UINT8 with zero point 128). 4-bit grids are [0, 15] / [-8, 7] on both: INT8
    containers with a Clip to the 4-bit range.
    """
    if target not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown target {target!r}")
    if bits == 8:
        if signed:
            return Grid(-128, 127)
        return Grid(0, 255 if target == "onnxruntime" else 127)
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
