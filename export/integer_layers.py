"""Exact integer accumulation of one quantized conv/linear, shared by the integer references.

Both references (:mod:`dfq.export.ort_reference`, :mod:`dfq.export.exact_reference`) need
``sum(x_q * w_q)`` (plus, for ORT, the int32 bias) computed exactly, from the torch model's own
weight codes. Every partial sum of that accumulation is bounded by ``max|x_q| * max_c sum|w_q[c]|``
(plus the addend); below 2**24 every partial sum is an integer float32 holds exactly, so a
float32 GEMM or *direct* convolution is exact whatever its summation order. Above the bound, or
where torch picks a convolution algorithm that is not direct (Winograd/FFT would not return
integers), the sum runs in float64, exact for any realistic layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfq.kernels.fake_quant import Grid

F32_EXACT = 2 ** 24   # integers below this are exact in float32, and so are sums that stay below it


def _grid_max(grid: Grid) -> int:
    return max(abs(grid.qmin), abs(grid.qmax))


class ExactAccumulator:
    """``acc = sum(x_q * w_q) + addend`` exactly, returned as float32 (rounded once if it exceeds 2**24).

    Holds, per layer key, whether torch's float32 convolution of that layer is direct (checked on
    the first batch: it returns integers), so build one per reference and reuse it across batches.
    """

    def __init__(self) -> None:
        self._direct: dict[object, bool] = {}

    def conv(self, key: object, xq: torch.Tensor, x_grid: Grid, m, wq: torch.Tensor,
             addend: torch.Tensor | None = None) -> torch.Tensor:
        top, left, bottom, right = m.pads
        padding = (top, left)
        if (top, left) != (bottom, right):
            xq, padding = F.pad(xq, (left, right, top, bottom)), (0, 0)
        args = (None, m.stride, padding, m.dilation, m.groups)
        if self._bounded(xq_grid=x_grid, wq=wq, addend=addend) and self._is_direct(key, xq, wq, args):
            acc = F.conv2d(xq, wq, *args)
            return acc if addend is None else acc.add_(addend.reshape(1, -1, 1, 1))
        acc = F.conv2d(xq.double(), wq.double(), *args)
        return (acc if addend is None else acc + addend.double().reshape(1, -1, 1, 1)).float()

    def linear(self, xq: torch.Tensor, x_grid: Grid, wq: torch.Tensor,
               addend: torch.Tensor | None = None) -> torch.Tensor:
        if self._bounded(xq_grid=x_grid, wq=wq, addend=addend):
            acc = xq @ wq.t()
            return acc if addend is None else acc.add_(addend)
        acc = xq.double() @ wq.double().t()
        return (acc if addend is None else acc + addend.double()).float()

    @staticmethod
    def _bounded(xq_grid: Grid, wq: torch.Tensor, addend: torch.Tensor | None) -> bool:
        bound = _grid_max(xq_grid) * float(wq.abs().flatten(1).sum(1).max())
        if addend is not None:
            bound += float(addend.abs().max())
        return bound < F32_EXACT

    def _is_direct(self, key: object, xq: torch.Tensor, wq: torch.Tensor, args: tuple) -> bool:
        if key not in self._direct:
            acc = F.conv2d(xq[:4], wq, *args)
            self._direct[key] = bool(torch.equal(acc, torch.round(acc)))
        return self._direct[key]
