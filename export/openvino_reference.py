"""The fake-quant model as OpenVINO's CPU plugin computes dfq's QDQ artifacts (``openvino`` cross-check).

OpenVINO does not run a QDQ graph node by node: it turns each Q/DQ pair into a FakeQuantize and
fuses those into the kernels around them. One of its fusions changes what the artifact computes:
a residual ``Add`` fed by a convolution becomes a post-op of that convolution, and the
requantization of the convolution's output in front of the Add (the artifact's Q/DQ pair) loses
its rounding: the Add sums the convolution's float output, *clamped to that quantizer's range*
(``[qmin * s, qmax * s]``). The other requantizations are kept.

Measured on the ResNet-20 artifacts (2,000 CIFAR-10 test images, 1 thread, OpenVINO 2026.x):

* artifact as exported: OpenVINO and ONNX Runtime agree on 98.6% of top-1 answers at W8A8 and
  92.6% at W4A4;
* the same graph with every conv output a graph output (which stops the fusion): OpenVINO equals
  ONNX Runtime to 1e-6 at every tensor;
* the graph with the conv -> Add Q/DQ pairs removed, on ONNX Runtime: 99.95% agreement with
  OpenVINO on the artifact, at both precisions.

The clamp shows where the range is tight: on a ResNet-56 W4A4 artifact (1,000 CIFAR-10 images)
the reference *without* the clamp agrees with OpenVINO on 94.2% (median largest logit
difference 1.35), with it on 99.9% (median 1e-6): OpenVINO's fused outputs sit exactly at the
range's end where the clamp-free sum runs past it.

So the reference is the float fake-quant model with exactly those quantizers reduced to their
clamp (a copy; the model itself is untouched). What remains is OpenVINO's own float32
arithmetic, which moves a code near a rounding tie now and then (evaluating this reference in
float64 does not reduce it); it grows with depth (ResNet-56 W8A8: 99.8%).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from dfq.pipeline.graph import set_module
from dfq.pipeline.qmodules import ActQuantizer
from dfq.pipeline.quantize import QuantizedModel
from dfq.pipeline.ties import feeds_only_adds

DESCRIPTION = ("fake-quant model whose conv-output quantizers in front of residual Adds only clamp, as "
               "OpenVINO's fusion leaves them ({n} quantizers)")


class ClampOnly(nn.Module):
    """An activation quantizer reduced to its range: ``clamp(x, qmin * s, qmax * s)``, no rounding."""

    def __init__(self, inner: ActQuantizer) -> None:
        super().__init__()
        self.inner = inner
        self.scale = inner.scale   # the graph may read the step as "<quantizer>.scale"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inner.scale.clamp(min=1e-12)
        return torch.clamp(x, self.inner.grid.qmin * s, self.inner.grid.qmax * s)


def fused_add_quantizers(qmodel: QuantizedModel) -> list[str]:
    """Names of the activation quantizers on a conv/linear output whose only readers are Adds."""
    gm: fx.GraphModule = qmodel.module
    return [str(node.target) for node in gm.graph.nodes if feeds_only_adds(gm, node)]


class OpenVINOReference:
    """``images -> logits`` of the fake-quant model as OpenVINO runs its artifact."""

    def __init__(self, qmodel: QuantizedModel) -> None:
        self.skipped = fused_add_quantizers(qmodel)
        self.module = copy.deepcopy(qmodel.module).eval()
        for name in self.skipped:
            set_module(self.module, name, ClampOnly(self.module.get_submodule(name)))
        self.description = DESCRIPTION.format(n=len(self.skipped))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)
