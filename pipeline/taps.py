"""Forward hooks the fine-tuning stage reads models through.

* :class:`TeacherTaps` - the FP model's BatchNorm inputs (their batch statistics, all-reduced
  across torchrun ranks) and penultimate features, with autograd to the generated images.
* :class:`LayerOutputs` - the outputs of named layers of a model (the student's quantized convs,
  or those of its FP twin).
* :class:`BNBatchStatsNoUpdate` - BN layers normalising with batch statistics for one forward,
  running statistics untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from dfq.common import distributed as D
from dfq.pipeline import losses as L
from dfq.pipeline.bn_stats import batch_mean_var


class TeacherTaps:
    """Forward hooks on the FP model: every BatchNorm2d's input (with autograd) and the input of
    the last Linear (penultimate features)."""

    def __init__(self, model: nn.Module, info: D.DistInfo = D.SINGLE) -> None:
        self.info = info
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not self.bns:
            raise ValueError("the FP model has no BatchNorm2d layers")
        self.features: list[torch.Tensor | None] = [None] * len(self.bns)
        self.penultimate: torch.Tensor | None = None
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self.bns)]
        if linears:
            self.handles.append(linears[-1].register_forward_pre_hook(self._pre_linear))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self.features[i] = inputs[0]
        return hook

    def _pre_linear(self, module, inputs):
        self.penultimate = inputs[0]

    def running(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(bn.running_mean, bn.running_var) for bn in self.bns]

    def stats(self) -> L.Stats:
        out = []
        for f, bn in zip(self.features, self.bns):
            mu, var = D.global_mean_var(*batch_mean_var(f), self.info)
            out.append((mu, var, bn.running_mean, bn.running_var))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LayerOutputs:
    """Forward hooks recording the outputs of the quantized layers of a student-shaped module."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        mods = dict(module.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]
        self.names = names

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def ordered(self) -> list[torch.Tensor]:
        return [self.outputs[n] for n in self.names]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BNBatchStatsNoUpdate:
    """BN layers in train mode (batch statistics) without touching their running statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(bn.training, bn.momentum, bn.num_batches_tracked.clone()
                       if bn.num_batches_tracked is not None else None) for bn in self.bns]
        for bn in self.bns:
            bn.train()
            bn.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for bn, (training, momentum, nbt) in zip(self.bns, self.saved):
            bn.train(training)
            bn.momentum = momentum
            if nbt is not None:
                bn.num_batches_tracked.copy_(nbt)
