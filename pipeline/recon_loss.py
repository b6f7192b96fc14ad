"""What the layer-wise reconstruction (:mod:`dfq.pipeline.reconstruct`) weighs its output error by:
the FP model's diagonal Fisher per output element, the input channels' energies (the error's
diagonal form) and the clip of the activation that reads the layer's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.pipeline.graph import clip_reader, is_clip_activation
from dfq.pipeline.qmodules import QuantConv2d
from dfq.pipeline.quantize import QuantizedModel


def output_clip(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """Upper bound of the ReLU-like activation that alone reads the layer's output, None if none does."""
    clip = clip_reader(gm, node)
    return None if clip is None else is_clip_activation(gm, clip)


def clip_straight_through(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``x`` clipped to [0, bound] with the gradient of ``x`` itself: an output on the wrong side of
    the clip still learns towards its target, one on the same side as the target adds no error."""
    return x + (x.clamp(0.0, bound) - x).detach()


def fisher_weights(fp_model: QuantizedModel, nodes: list[fx.Node], images: torch.Tensor, seed: int,
                    batch: int = 16, per_channel: bool = False) -> dict[str, torch.Tensor]:
    """Per layer of ``nodes``: the squared gradient of ``log p(c | image)`` with respect to every
    element of the layer's output in the FP model (quantizers off), ``c`` drawn per image from the
    model's softmax (one draw: the diagonal Fisher's unbiased estimate), over ``images``; each
    layer's map divided by its mean (all ones where the gradient vanishes everywhere). With
    ``per_channel`` every element holds its channel's mean over the images and positions."""
    names = [str(n.target) for n in nodes]
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    gen = torch.Generator().manual_seed(seed * 7_919 + 5)

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            output.register_hook(lambda g: grads[name].append(g.detach().pow(2)))
        return hook

    gm = fp_model.module
    handles = [gm.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    fp_model.set_enabled(False, False)
    try:
        for i in range(0, len(images), batch):
            x = images[i:i + batch].clone().requires_grad_(True)
            logp = F.log_softmax(gm(x), dim=1)
            drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            logp.gather(1, drawn).sum().backward()
    finally:
        for h in handles:
            h.remove()
        fp_model.set_enabled(True, True)
    weights = {}
    for name in names:
        g2 = torch.cat(grads[name])
        if per_channel:
            g2 = g2.mean(dim=[d for d in range(g2.dim()) if d != 1], keepdim=True).expand_as(g2)
        mean = g2.mean()
        weights[name] = g2 / mean if mean > 0 else torch.ones_like(g2)
    return weights


def input_energy(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean square of the layer's input channel that each weight entry reads, shaped to
    broadcast against the weight: ``sum((W_q - W)^2 * energy)`` is the output error per position
    (summed over output channels) for inputs with these channel energies and no correlations."""
    e = x.pow(2).mean(dim=[0] + list(range(2, x.dim())))
    if not isinstance(layer, QuantConv2d):
        return e[None, :]
    per_group = layer.in_channels // layer.groups
    group = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
    return e[group[:, None] * per_group + torch.arange(per_group)[None, :]][:, :, None, None]
