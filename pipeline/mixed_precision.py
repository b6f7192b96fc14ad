"""Mixed precision under a budget: per layer 8 or the low bits, chosen from the sensitivities.

Given the per-layer sensitivities (:mod:`dfq.pipeline.sensitivity`) at a low precision ``WlAm``,
a budget of average weight bits (weighted by parameters: the artifact's weight footprint) and of
average activation bits (weighted by multiply-accumulates: the compute), choose each layer's
weight bits and input-activation bits in {low, 8} to minimise the summed sensitivity of what is
lowered::

    minimise   sum_l [w_l = low] * S_w(l) + [a_l = low] * S_a(l)
    subject to sum_l params_l * w_l <= B_w * sum_l params_l
               sum_l macs_l * a_l   <= B_a * sum_l macs_l

The sensitivities are treated as additive, so the two budgets separate into two 0/1 knapsacks
(which layers keep 8-bit weights; which input tensors stay 8-bit, each tensor one item for all the
layers that read it, since they read it at one precision), each solved exactly by dynamic
programming over the budget discretised into :data:`BUCKETS` steps (item sizes rounded up, so the
budget always holds). Layers the user keeps at 8 bits (``--keep-8bit``, the first/last policy) are
fixed at 8 and paid for first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dfq.pipeline.quantize import Precision
from dfq.pipeline.sensitivity import LayerSensitivity

BUCKETS = 2000


@dataclass
class MixedPrecision:
    """The choice, and what it costs and saves."""

    layers: dict[str, Precision]
    avg_weight_bits: float         # parameter-weighted
    avg_act_bits: float            # MAC-weighted
    weight_bytes: float            # weights at their bits (per-channel scales not counted)
    lowered_sensitivity: float     # summed sensitivity of what runs at the low bits

    def to_dict(self) -> dict:
        return {"layers": {k: str(v) for k, v in self.layers.items()}, "avg_weight_bits": self.avg_weight_bits,
                "avg_act_bits": self.avg_act_bits, "weight_bytes": self.weight_bytes,
                "lowered_sensitivity": self.lowered_sensitivity}


def _keep_at_8(values: list[float], sizes: list[int], capacity: float, extra_bits: int) -> set[int]:
    """The items that keep 8 bits: maximise the summed ``values`` of kept items with
    ``sum(sizes[i] * extra_bits) <= capacity`` (0/1 knapsack, exact on the discretised sizes)."""
    if capacity <= 0 or not values:
        return set()
    unit = max(sum(sizes) * extra_bits / BUCKETS, 1e-12)
    cap = int(math.floor(capacity / unit + 1e-9))
    cost = [math.ceil(s * extra_bits / unit - 1e-9) for s in sizes]
    best = [0.0] * (cap + 1)
    keep = [[False] * (cap + 1) for _ in values]
    for i, (v, c) in enumerate(zip(values, cost)):
        for b in range(cap, c - 1, -1):
            if best[b - c] + v > best[b]:
                best[b] = best[b - c] + v
                keep[i][b] = True
    chosen, b = set(), cap
    for i in range(len(values) - 1, -1, -1):
        if keep[i][b]:
            chosen.add(i)
            b -= cost[i]
    return chosen


def average_bits(layers: dict[str, Precision], costs: dict[str, tuple[int, int]]) -> tuple[float, float, float]:
    """(parameter-weighted weight bits, MAC-weighted activation bits, weight bytes) of ``layers``
    with ``costs[name] = (parameters, MACs)``."""
    params = sum(p for p, _ in costs.values())
    macs = sum(m for _, m in costs.values())
    wbits = sum(p * layers[n].weights for n, (p, _) in costs.items())
    abits = sum(m * layers[n].activations for n, (_, m) in costs.items())
    return wbits / params, abits / macs, wbits / 8


def fixed_layers_bits(costs: dict[str, tuple[int, int]], fixed_8bit: set[str], low: Precision) -> tuple[float, float]:
    """The least (average weight bits, MAC-weighted average activation bits) any choice can reach:
    the ``fixed_8bit`` layers at W8A8, every other layer at ``low``; ``costs[name] = (parameters,
    MACs)``. (A layer that reads the same input tensor as a fixed one also reads it at 8 bits, which
    only :func:`choose_precision` accounts for, so a budget can still fail there.)"""
    layers = {n: Precision(8, 8) if n in fixed_8bit else low for n in costs}
    w, a, _ = average_bits(layers, costs)
    return w, a


def check_budget(costs: dict[str, tuple[int, int]], fixed_8bit: set[str], low: Precision, *,
                 avg_weight_bits: float, avg_act_bits: float) -> None:
    """Raise ValueError, naming the fixed layers and the least budget that holds them, when the
    ``fixed_8bit`` layers alone exceed a budget; costs no sensitivity, so callers check before the
    expensive stages."""
    w, a = fixed_layers_bits(costs, fixed_8bit, low)
    if w <= avg_weight_bits + 1e-9 and a <= avg_act_bits + 1e-9:
        return
    names = sorted(fixed_8bit)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ValueError(f"the layers kept at 8 bits ({shown}), with every other layer at {low}, already average "
                     f"W{math.ceil(w * 100) / 100:g}A{math.ceil(a * 100) / 100:g}, above the budget "
                     f"W{avg_weight_bits:g}A{avg_act_bits:g}")


def choose_precision(rows: list[LayerSensitivity], low: Precision, *, avg_weight_bits: float,
                     avg_act_bits: float, fixed_8bit: set[str] = frozenset()) -> MixedPrecision:
    """Per-layer precision within the budgets (see the module docstring); raises ValueError when
    the fixed 8-bit layers alone exceed a budget."""
    check_budget({r.name: (r.params, r.macs) for r in rows}, fixed_8bit, low,
                 avg_weight_bits=avg_weight_bits, avg_act_bits=avg_act_bits)
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    free = [r for r in rows if r.name not in fixed_8bit]
    fixed = [r for r in rows if r.name in fixed_8bit]
    w_room = avg_weight_bits * params - low.weights * params - (8 - low.weights) * sum(r.params for r in fixed)
    a_room = avg_act_bits * macs - low.activations * macs - (8 - low.activations) * sum(r.macs for r in fixed)
    keep_w = _keep_at_8([r.weights for r in free], [r.params for r in free], w_room, 8 - low.weights)
    inputs = {}                                  # input tensor -> the free layers that read it
    fixed_inputs = {r.input for r in fixed}
    for r in free:
        if r.input not in fixed_inputs:
            inputs.setdefault(r.input, []).append(r)
    groups = list(inputs.values())
    a_room -= (8 - low.activations) * sum(r.macs for r in free if r.input in fixed_inputs)
    if a_room < -1e-9:
        raise ValueError(f"the layers kept at 8 bits and the layers that read their inputs already exceed the "
                         f"activation budget A{avg_act_bits:g}")
    kept = _keep_at_8([sum(r.activations for r in g) for g in groups], [sum(r.macs for r in g) for g in groups],
                      a_room, 8 - low.activations)
    keep_a = {r.name for i in kept for r in groups[i]} | {r.name for r in free if r.input in fixed_inputs}
    layers = {r.name: Precision(8, 8) for r in fixed}
    for i, r in enumerate(free):
        layers[r.name] = Precision(8 if i in keep_w else low.weights, 8 if r.name in keep_a else low.activations)
    layers = {r.name: layers[r.name] for r in rows}
    w, a, nbytes = average_bits(layers, {r.name: (r.params, r.macs) for r in rows})
    lowered = sum((r.weights if layers[r.name].weights < 8 else 0.0) + (r.activations if layers[r.name].activations < 8
                                                                       else 0.0) for r in rows)
    return MixedPrecision(layers, w, a, nbytes, lowered)
