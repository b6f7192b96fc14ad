"""Requantization ties: output channels whose integer accumulator can land exactly between two codes.

With int32 biases (schemes with ``int32_bias``: the onnxruntime artifact, which OpenVINO also
runs) a conv's output code is ``round(acc * r)``: ``acc`` the integer accumulator (bias included)
and ``r = s_in * s_w[c] / s_out`` per output channel. When ``acc * r`` for some reachable
accumulator lies within float32 error of a half-integer, the code depends on how a runtime
evaluates the product (ONNX Runtime's requantization multiplier, OpenVINO's FakeQuantize input
scale and shift, the float reference), and runtimes round it differently. Such a ratio is rare
(about one channel in 20 has one in range), but the tie then repeats on every position where that
accumulator occurs: on a ResNet-56 W4A4 artifact one channel with ``r`` = 5/148 (accumulator 74
-> 2.5 steps) alone moved OpenVINO's top-1 agreement with ONNX Runtime's arithmetic to 99.22% on the
10,000 CIFAR-10 test images; with the near-tie channels' weight steps moved as below, 100.00%.

A conv output that only feeds residual Adds has a second tie: OpenVINO fuses the Add into the
conv, keeps only the clamp of the conv's output quantizer and requantizes the sum
(``export/openvino_reference.py``), so the Add's output code is ``round(acc * a + j * b)`` with
``a = s_in * s_w[c] / s_add_out``, ``b = s_skip / s_add_out`` and ``j`` a code of the skip tensor.
A reachable ``acc`` (inside the clamp) and ``j`` that put the sum within float32 error of a
half-integer count as a near-tie too. On a ResNet-56 W4A4 ``recon`` artifact whose conv ties were
already moved, OpenVINO agreed 99.43% with its reference (10,000 CIFAR-10 images, the first
differing codes at 8.5 steps of a 4-bit residual output); moving the weight steps of the 229 channels
with such a near-tie gave 100.00%.

Only output grids below 8 bits are checked, for both ties. With 255 half-integers and accumulators in
the thousands, most channels of an 8-bit output have some float32-level near-tie whatever their step
(ResNet-20 W8A8: 191 of 700 conv channels stayed tied after 16 nudges, and all 336 channels that feed
a residual Add had an Add near-tie), and moving the others did not raise OpenVINO's agreement
(99.74% with 417 channels moved, 99.86% with none); at 8 bits the floor is OpenVINO's float32
arithmetic, not exact ties. The same holds for the 8-bit residual stream of W4A4 (``--residual-bits
8``: the residual Adds and the conv outputs that feed them are 8-bit): with the check extended to 8-bit
grids (scratch run, ResNet-20 W4A4 ``recon`` fast seed 0, d286cc7) 68 channels moved, 277 stayed tied,
and OpenVINO agreed 99.94% with its reference, against 99.92% without the extension (same seed and code).

:func:`break_ties` scales the weight step of each such channel by ``1 +- 2**-16`` (again while a
near-tie remains, at most :data:`ATTEMPTS` times) before export, so the fake-quant model, the integer
references and the artifact all carry the same moved step. A channel keeps a moved step only when
the move clears every near-tie; otherwise its calibrated step comes back and it is reported as
unresolved. The nudge is 256 float32 ulps of the step, 64 times the tie tolerance, so a cleared
tie stays cleared in any runtime's float32 arithmetic, and small enough that the channel's outputs
move by at most 16 * 2**-16 = 0.02%.

The direction is chosen per channel (:func:`nudge_directions`): the one that keeps most of its
requantization near-ties at the code ONNX Runtime gives them at the calibrated step (a larger step
sends a tie with a positive accumulator up and one with a negative accumulator down); if that
direction cannot clear the channel, the other one is tried. Measured on ResNet-20 W4A4 (calibrated
on 256 CIFAR-10 test images, 300 others through the ORT reference; scratch script): the chosen
directions change 7 / 30 / 942 codes of the first three requantized tensors where always nudging up
changes 11 / 52 / 1,481, but 4-bit layers carry any changed code on (0.77% against 0.85% of all
codes, 4 of 300 top-1 answers either way), and the ResNet-56 W4A4 ``recon`` fast seed-0 artifact
drops 1.95 points either way (1.60 before residual-Add ties were moved): a 4-bit ResNet's top-1
moves by tenths of a point under any change of a few codes.

A near-tie: ``|acc * r - (k + 1/2)| < 2**-22 * max(1, |k + 1/2|)`` (a few float32 ulps) for a
half-integer ``k + 1/2`` inside the output grid and an accumulator within the channel's reachable
bound ``|b| + sum|w codes| * max|x code|``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import fx

from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.graph import clip_reader, is_add, layer_nodes, module_of, source_of
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear, weight_codes
from dfq.pipeline.quantize import QuantizedModel

NUDGE = 2.0 ** -16        # relative change of a tied channel's weight step per attempt
TOLERANCE = 2.0 ** -22    # relative distance from a half-integer that counts as a tie
ATTEMPTS = 16
BELOW_BITS = 8            # only output grids below this many bits are checked (module docstring)


@dataclass
class TieReport:
    channels: dict[str, list[int]] = field(default_factory=dict)     # layer -> output channels moved
    unresolved: dict[str, int] = field(default_factory=dict)         # layer -> channels left tied, unmoved

    @property
    def moved(self) -> int:
        return sum(len(c) for c in self.channels.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "moved": self.moved, "unresolved_total": sum(self.unresolved.values()),
                "nudge": NUDGE, "tolerance": TOLERANCE, "attempts": ATTEMPTS}


def output_quantizer_of(gm: fx.GraphModule, node: fx.Node) -> ActQuantizer | None:
    """The activation quantizer that requantizes a layer's output: its only reader, or the only
    reader of a ReLU-like activation that is the layer's only reader."""
    users = list((clip_reader(gm, node) or node).users)
    if len(users) == 1 and isinstance(module_of(gm, users[0]), ActQuantizer):
        return module_of(gm, users[0])
    return None


def _near_ties(r: np.ndarray, reach: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask [channel, half-integer] of near-ties, their accumulators, the code below each
    half-integer) for per-channel ratios ``r`` and reachable |accumulator| ``reach``."""
    below = np.arange(qmin, qmax, dtype=np.float64)
    half = below + 0.5                                                      # ties between two codes
    acc = np.round(half[None, :] / r[:, None])                              # the nearest accumulators
    near = np.abs(acc * r[:, None] - half[None, :]) < TOLERANCE * np.maximum(1.0, np.abs(half))[None, :]
    return near & (np.abs(acc) <= reach[:, None]) & (acc != 0), acc, below


def tied_channels(r: np.ndarray, reach: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Mask of the channels with a near-tie: ``r`` the per-channel ratio, ``reach`` the largest
    reachable |accumulator|, codes in [qmin, qmax]."""
    return _near_ties(r, reach, qmin, qmax)[0].any(axis=1)


def nudge_directions(step: np.ndarray, s_out: np.float64, reach: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per channel, the direction (+1: a larger weight step, -1: a smaller one) that keeps the most
    of its requantization near-ties at the code ONNX Runtime gives them at the current step:
    ``round_half_even(float32(acc) * M)`` with ``M = float32(step / s_out)`` (``ort_reference``).
    A larger step moves a tie at ``k + 1/2`` to ``k + 1`` for a positive accumulator and to ``k``
    for a negative one, a smaller step the other way. Channels without such a tie, and even votes,
    get +1."""
    multiplier = (step.astype(np.float32) / np.float32(s_out)).astype(np.float32)
    near, acc, below = _near_ties(step / s_out, reach, qmin, qmax)
    code = np.rint(acc.astype(np.float32) * multiplier[:, None]).astype(np.float64)    # float32 product
    up = np.where(acc > 0, below[None, :] + 1, below[None, :])
    vote = np.where(code == up, 1, -1) * near
    return np.where(vote.sum(axis=1) >= 0, 1.0, -1.0)


def feeds_only_adds(gm: fx.GraphModule, q_node: fx.Node) -> bool:
    """An activation quantizer on a conv/linear output whose readers are all Adds: the pair OpenVINO
    fuses, keeping only the quantizer's clamp (``export/openvino_reference.py``)."""
    return isinstance(module_of(gm, q_node), ActQuantizer) \
        and isinstance(module_of(gm, q_node.args[0]), (QuantConv2d, QuantLinear)) \
        and bool(q_node.users) and all(is_add(u) for u in q_node.users)


def residual_adds(gm: fx.GraphModule, node: fx.Node) -> list[tuple[ActQuantizer, ActQuantizer]]:
    """For a layer whose only reader is a quantizer that :func:`feeds_only_adds`: ``(skip
    quantizer, Add output quantizer)`` per Add; [] otherwise, or when either is missing."""
    users = list(node.users)
    if len(users) != 1 or not feeds_only_adds(gm, users[0]):
        return []
    q_node = users[0]
    found = []
    for add in q_node.users:
        other = add.args[1] if add.args[0] is q_node else add.args[0]
        skip = module_of(gm, source_of(gm, other)) if isinstance(other, fx.Node) else None
        out = output_quantizer_of(gm, add)
        if not isinstance(skip, ActQuantizer) or out is None or not (skip.enabled and out.enabled):
            return []
        found.append((skip, out))
    return found


def add_tied_channels(a: np.ndarray, reach: np.ndarray, acc_range: tuple[np.ndarray, np.ndarray], b: float,
                      skip_codes: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Mask of the channels with a residual-Add near-tie: ``acc * a + j * b`` near a half-integer of
    [qmin, qmax] for a skip code ``j`` and a nonzero reachable accumulator with ``acc * a`` inside
    ``acc_range`` (the clamp, per channel, in output steps)."""
    half = np.arange(qmin, qmax, dtype=np.float64) + 0.5
    tol = TOLERANCE * np.maximum(1.0, np.abs(half))[None, :]
    tied = np.zeros(len(a), dtype=bool)
    for j in skip_codes.astype(np.float64):
        acc = np.round((half[None, :] - j * b) / a[:, None])
        v = acc * a[:, None]
        near = (np.abs(v + j * b - half[None, :]) < tol) & (np.abs(acc) <= reach[:, None]) & (acc != 0)
        near &= (v >= acc_range[0][:, None]) & (v <= acc_range[1][:, None])
        tied |= near.any(axis=1)
    return tied


def _step(q: ActQuantizer) -> np.float64:
    """An activation quantizer's step as exported (float32), in float64."""
    return np.float64(np.float32(q.scale.detach()))


def _accumulator_step(layer, in_q: ActQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """(float32 step ``s_in * s_w`` of the integer accumulator per channel, as float64; reachable
    |accumulator| per channel)."""
    codes, s_w, b = weight_codes(layer)
    step = (np.float32(in_q.scale.detach()) * s_w.numpy()).astype(np.float32)   # the int32 bias's step
    x_max = max(abs(in_q.grid.qmin), abs(in_q.grid.qmax))
    reach = codes.abs().flatten(1).sum(1).numpy() * x_max + np.abs(np.round(b.numpy() / step))
    return step.astype(np.float64), reach


def _tied(layer, in_q: ActQuantizer, out_q: ActQuantizer, adds: list[tuple[ActQuantizer, ActQuantizer]]) -> np.ndarray:
    """Channels with a near-tie in the layer's requantization or in a residual Add it feeds."""
    step, reach = _accumulator_step(layer, in_q)
    tied = np.zeros(len(step), dtype=bool)
    if out_q.bits < BELOW_BITS:
        tied |= tied_channels(step / _step(out_q), reach, out_q.grid.qmin, out_q.grid.qmax)
    for skip, add_q in adds:
        if add_q.bits >= BELOW_BITS:
            continue
        s_out = _step(add_q)
        a = step / s_out                                                     # s_in * s_w / s_add_out
        lo, hi = (g * _step(out_q) / s_out for g in (out_q.grid.qmin, out_q.grid.qmax))   # the clamp, in output steps
        clamp = (np.full_like(a, lo), np.full_like(a, hi))
        b = float(_step(skip) / s_out)
        codes = np.arange(skip.grid.qmin, skip.grid.qmax + 1)
        tied |= add_tied_channels(a, reach, clamp, b, codes, add_q.grid.qmin, add_q.grid.qmax)
    return tied


def _directions(layer, in_q: ActQuantizer, out_q: ActQuantizer) -> torch.Tensor:
    """:func:`nudge_directions` of the layer's requantization (+1 everywhere where its output grid
    is not checked: residual-Add ties alone do not change ONNX Runtime's codes)."""
    step, reach = _accumulator_step(layer, in_q)
    if out_q.bits >= BELOW_BITS:
        return torch.ones(len(step), dtype=torch.float64)
    return torch.from_numpy(nudge_directions(step, _step(out_q), reach, out_q.grid.qmin, out_q.grid.qmax))


@torch.no_grad()
def _clear_ties(layer, in_q: ActQuantizer, out_q: ActQuantizer,
                adds: list[tuple[ActQuantizer, ActQuantizer]]) -> tuple[np.ndarray, int]:
    """Nudge the tied channels' weight steps, each in its :func:`_directions` direction, until they
    are tie-free; channels still tied after :data:`ATTEMPTS` nudges start again in the other
    direction, and get their step back if that fails too. Returns (mask of moved channels,
    unresolved count)."""
    scale = layer.weight_quantizer.scale
    start = scale.detach().clone()
    first = _tied(layer, in_q, out_q, adds)
    direction = _directions(layer, in_q, out_q).to(scale.dtype)
    tied = first.copy()
    for _ in range(2):
        for _ in range(ATTEMPTS):
            if not tied.any():
                break
            mask = torch.from_numpy(tied)
            scale[mask] *= 1 + NUDGE * direction[mask]
            tied = _tied(layer, in_q, out_q, adds)
        mask = torch.from_numpy(tied)
        scale[mask] = start[mask]
        direction[mask] = -direction[mask]                                  # restored: still tied
    return first & ~tied, int(tied.sum())


@torch.no_grad()
def break_ties(qmodel: QuantizedModel) -> TieReport:
    """Move the weight step of every channel with a reachable requantization tie (module docstring);
    ``qmodel`` is changed in place. Layers without an int32 bias scheme, an input quantizer or a
    requantized output are left alone."""
    report = TieReport()
    if not qmodel.config.scheme.int32_bias:
        return report
    gm = qmodel.module
    for node in layer_nodes(gm):
        layer = module_of(gm, node)
        in_node, out_q = input_quantizer_of(gm, node), output_quantizer_of(gm, node)
        if not isinstance(layer, (QuantConv2d, QuantLinear)) or in_node is None or out_q is None \
                or not out_q.enabled or not layer.weight_quantizer.enabled:
            continue
        moved, left = _clear_ties(layer, module_of(gm, in_node), out_q, residual_adds(gm, node))
        if moved.any():
            report.channels[str(node.target)] = [int(c) for c in np.flatnonzero(moved)]
        if left:
            report.unresolved[str(node.target)] = left
    return report
