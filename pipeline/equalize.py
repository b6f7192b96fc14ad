"""Cross-layer equalisation of low-bit activations (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", sec. 4.1, applied to the activation grid).

A per-tensor activation grid spends its codes on the widest channel: at 4 bits a channel whose
values span a tenth of the tensor's range gets one or two codes. Where a conv's output passes a
ReLU into exactly one other conv, the two can be rescaled per channel without changing the float
model, because ``relu(t * y) = t * relu(y)`` for ``t > 0``: the producer's output channel ``c``
is multiplied by ``t_c`` (its BatchNorm's ``gamma`` and ``beta``, so Tune mode still folds the
same statistics) and the consumer's input column ``c`` divided by it. The producer's weights are
quantized per output channel, so its grid follows the scale exactly; the consumer's per-channel
grid sees its columns reweighted. ``t_c`` is proportional to ``1 / r_c``, ``r_c`` the channel's
range estimated from the BatchNorm that produces it (``beta + 3 |gamma|``: the upper tail of the
post-BN Gaussian), so every channel reaches about the same range and the per-tensor grid serves
all of them; the scales' geometric mean is 1. No image is read.

Only chains the float graph computes identically after the rescale are touched: producer a
``QuantConv2d`` with folded BatchNorm and no other reader, a plain ReLU (a ReLU6 or other clip is
not scale-equivariant), and a consumer ``QuantConv2d`` that is not grouped. A channel whose
estimated range is below ``floor`` of the tensor's largest (one the statistics call dead) is
scaled as if it had that range, which bounds every scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dfq.pipeline.graph import is_clip_activation, module_of
from dfq.pipeline.qmodules import QuantConv2d


@dataclass(frozen=True)
class EqualizedPair:
    producer: str          # module name of the conv whose output channels were scaled
    consumer: str          # module name of the conv whose input columns were scaled back
    # largest / smallest estimated channel range (after the floor) before; the scales applied are
    # its inverses, so this is also the largest / smallest scale
    spread: float

    def to_dict(self) -> dict:
        return {"producer": self.producer, "consumer": self.consumer, "spread": self.spread}


def equalizable_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(producer, consumer) module names of every conv -> ReLU -> conv chain with no other reader."""
    pairs = []
    for node in gm.graph.nodes:
        producer = module_of(gm, node)
        if not isinstance(producer, QuantConv2d) or not producer.has_bn or len(node.users) != 1:
            continue
        act = next(iter(node.users))
        if is_clip_activation(gm, act) != float("inf") or len(act.users) != 1:
            continue
        user = next(iter(act.users))
        consumer = module_of(gm, user)
        if isinstance(consumer, QuantConv2d) and consumer.groups == 1 and user.args[0] is act:
            pairs.append((str(node.target), str(user.target)))
    return pairs


def channel_ranges(producer: QuantConv2d) -> torch.Tensor:
    """Estimated upper end of each output channel after the ReLU, from the folded BatchNorm."""
    return (producer.bn_bias + 3 * producer.bn_weight.abs()).detach()


@torch.no_grad()
def equalize(gm: fx.GraphModule, names: set[str], floor: float = 1e-3) -> list[EqualizedPair]:
    """Rescale every equalizable pair whose consumer is in ``names``."""
    done = []
    for p_name, c_name in equalizable_pairs(gm):
        if c_name not in names:
            continue
        producer, consumer = gm.get_submodule(p_name), gm.get_submodule(c_name)
        r = channel_ranges(producer)
        top = float(r.max())
        if top <= 0:
            continue
        r = r.clamp(min=floor * top)
        t = 1 / r
        t = t / t.log().mean().exp()
        producer.bn_weight.mul_(t)
        producer.bn_bias.mul_(t)
        consumer.weight.div_(t.view(1, -1, 1, 1))
        done.append(EqualizedPair(p_name, c_name, top / float(r.min())))
    return done
