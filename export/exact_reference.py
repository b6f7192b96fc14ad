"""The fake-quant model in the arithmetic of :func:`dfq.export.exact.exact_integer_graph`.

The integer-exact evaluation of an artifact computes every quantized Conv/Gemm as
``float32(sum(x_q * w_q)) * float32(s_x * s_w) + b``: the accumulation exact, then one float32
multiply and one float32 add. The float fake-quant model instead convolves dequantized float32
values, whose sums round differently in the last bits; near a requantization tie that moves a
code, and through a deep network (EfficientNet-Lite0, tensorrt flavour) about 1% of the top-1
answers. :class:`ExactIntegerReference` evaluates the same torch model (its folded weights,
scales and biases, read from the modules, not from the artifact, so a wrong artifact still
disagrees) with exactly that arithmetic for every conv/linear whose input is quantized; every
other node runs as in the fake-quant model, which the exact graph also runs in float.
"""
from __future__ import annotations

import torch
from torch import fx

from dfq.export.integer_layers import ExactAccumulator
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.graph import module_of
from dfq.pipeline.qmodules import QuantConv2d, QuantLinear, weight_codes
from dfq.pipeline.quantize import QuantizedModel

DESCRIPTION = "fake-quant model with exact integer accumulation in every quantized conv/linear"


class ExactIntegerReference(fx.Interpreter):
    """Callable: ``reference(images) -> logits`` of ``qmodel`` as the integer-exact graph computes it."""

    description = DESCRIPTION

    def __init__(self, qmodel: QuantizedModel) -> None:
        super().__init__(qmodel.module)
        self.accumulator = ExactAccumulator()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            # channels-last: faster float32 convs on the CPU
            return self.run(images.float().contiguous(memory_format=torch.channels_last)).float()
        finally:
            self.module.train(was_training)

    def run_node(self, n: fx.Node):
        m = module_of(self.module, n)
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quantizer.enabled:
            aq = input_quantizer_of(self.module, n)
            if aq is not None and module_of(self.module, aq).enabled:
                return self._layer(n, m, module_of(self.module, aq))
        return super().run_node(n)

    def _layer(self, n: fx.Node, m, quantizer) -> torch.Tensor:
        s_x = quantizer.scale.detach().float().clamp(min=1e-12)
        xq = torch.round(self.env[n.args[0]] / s_x)          # x = q * s_x exactly
        wq, s_w, b = weight_codes(m)
        b = m.quantized_bias(b, s_x)                         # int32-grid biases where the scheme has them
        step = s_x * s_w                                     # float32, as the graph's constant
        if isinstance(m, QuantLinear):
            return self.accumulator.linear(xq, quantizer.grid, wq) * step + b
        acc = self.accumulator.conv(n, xq, quantizer.grid, m, wq)
        return acc * step.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
