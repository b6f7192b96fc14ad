"""The fake-quant model evaluated in ONNX Runtime's integer arithmetic (onnxruntime target).

The float fake-quant model and the deployed artifact agree on every scale, weight and bias, but
not on rounding: the model computes ``conv(x_hat, w_hat) + b`` in float32 and divides by the next
quantizer's step, while ONNX Runtime's fused kernels accumulate ``sum(x_q * w_q) + b_q`` exactly in
int32 and multiply by one float32 factor ``s_x * s_w / s_y``. Near a rounding tie the two land on
neighbouring codes; through 20-50 requantizations those one-code differences spread (in
EfficientNet-Lite0 about half of the last blocks' codes differ) and change the top-1 answer of
0.2-1% of the images. No float reference can do better, so this module evaluates the *same
torch model* (its quantizers, folded weights and int32 biases, read from the modules, not from
the artifact) with the arithmetic of the kernels ORT fuses the QDQ graph into:

* ``QLinearConv``: ``y_q = clamp(round_half_even(float32(acc + b_q) * M)) + zp_y`` with
  ``acc`` exact and ``M = (s_x * s_w[c]) / s_y`` in float32 (``qlinearconv.cc``, MLAS
  requantization). A following ReLU (or a ReLU6 whose bound cannot bind on the output grid) is
  the clamp at the zero point.
* ``QLinearAdd``: on the UINT8 codes, ``c = fma(a, s_a/s_c, fma(b, s_b/s_c, zp_c - (s_a/s_c*zp_a +
  s_b/s_c*zp_b)))`` in float32, rounded half to even (MLAS's AVX2 kernel).
* ``QLinearGlobalAveragePool``: ``round(float32(sum(x_u8) - zp_x*N) * (s_x / (s_y * N))) + zp_y``.
* ``QuantizeLinear``: ``round_half_even(x / s)`` (a division, as MLAS does; the fake-quant
  quantizers compute exactly this already).

Each formula is checked against ORT's own kernels in ``tests/test_ort_reference.py``. Nodes the
reference does not recognise run as in the fake-quant model (float), and are listed in
:attr:`OrtIntegerReference.float_nodes`. The final Linear (QGemm with float output) runs in
float64: its output is not requantized, so last-bit differences cannot change an argmax except at
exact ties.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from dfq.export.integer_layers import ExactAccumulator
from dfq.kernels.fake_quant import Grid
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.graph import is_add, is_clip_activation, is_pool, module_of, source_of
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear, weight_codes
from dfq.pipeline.quantize import QuantizedModel

def _zero_point(grid: Grid) -> int:
    """ORT's UINT8 zero point for a grid (see dfq.export.qdq.QDQFormat.container)."""
    return 128 if grid.signed else 0


class _Plan:
    """Which fx nodes run in integer arithmetic, and the quantizer each one requantizes to."""

    def __init__(self, qm: QuantizedModel) -> None:
        self.gm = qm.module
        self.out_quantizer: dict[fx.Node, fx.Node] = {}   # conv / add / pool node -> its output ActQuantizer node
        self.identity: set[fx.Node] = set()               # activations and quantizers made redundant
        self.float_nodes: list[str] = []
        for node in self.gm.graph.nodes:
            m = self.module_of(node)
            if isinstance(m, QuantConv2d):
                ok = m.bias_mode == "int32" and input_quantizer_of(self.gm, node) is not None
                self._fuse(node, ok)
            elif is_add(node):
                ok = all(self._quantizer_behind(a) is not None for a in node.args[:2])
                self._fuse(node, ok)
            elif is_pool(self.gm, node) and self._is_global(node):
                self._fuse(node, self._quantizer_behind(node.args[0]) is not None)
            elif isinstance(m, QuantLinear):
                pass   # float64, see the module docstring

    def module_of(self, node: fx.Node):
        return module_of(self.gm, node)

    quantizer = module_of   # of an ActQuantizer node

    def _quantizer_behind(self, node) -> fx.Node | None:
        if not isinstance(node, fx.Node):
            return None
        src = source_of(self.gm, node)
        return src if isinstance(self.module_of(src), ActQuantizer) else None

    def _is_global(self, node: fx.Node) -> bool:
        inp, out = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if inp is None or out is None or len(out.shape) != 4 or tuple(out.shape[2:]) != (1, 1):
            return False
        m = self.module_of(node)
        if m is not None and isinstance(m, torch.nn.AvgPool2d):
            return m.padding in (0, (0, 0))
        if node.op == "call_function" and node.target is F.avg_pool2d:
            return len(node.args) < 4 and not node.kwargs.get("padding")
        return True   # adaptive average pooling to 1x1

    def _fuse(self, node: fx.Node, ok: bool) -> None:
        """Fuse ``node`` with its output quantizer when ORT does: node -> [ReLU | ReLU6 that cannot
        bind] -> ActQuantizer, every link the only user of the one before."""
        chain: list[fx.Node] = []
        cur = node
        while ok:
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            m = self.module_of(nxt)
            if isinstance(m, ActQuantizer):
                if all(self._bound_is_free(c, m) for c in chain):
                    self.out_quantizer[node] = nxt
                    self.identity.update(chain + [nxt])
                    return
                break
            if is_clip_activation(self.gm, nxt) is None or chain:
                break
            chain.append(nxt)
            cur = nxt
        self.float_nodes.append(node.name)

    def _bound_is_free(self, act: fx.Node, q: ActQuantizer) -> bool:
        hi = is_clip_activation(self.gm, act)
        if q.grid.signed or q.grid.qmin != 0:
            return False
        if hi == float("inf"):
            return True
        s = q.scale.detach().float().clamp(min=1e-12)
        return bool(torch.tensor(hi, dtype=torch.float32) / s >= q.grid.qmax)


class OrtIntegerReference(fx.Interpreter):
    """Callable: ``reference(images) -> logits`` of ``qmodel`` in ORT's integer arithmetic.

    ``qmodel`` must be built for the onnxruntime target (int32 biases, quantized conv and Add
    outputs). The model is not modified; the reference reads its current parameters on every call,
    but which nodes fuse (a ReLU6 bound that cannot bind on its output grid) is decided from the
    scales at construction: build it after calibration and fine-tuning.
    """

    def __init__(self, qmodel: QuantizedModel) -> None:
        scheme = qmodel.config.scheme
        if not (scheme.quantize_outputs and scheme.int32_bias and scheme.unsigned_8bit_max == 255):
            raise ValueError("the ORT integer reference needs a model built for ONNX Runtime's fused integer kernels "
                             "(the onnxruntime target: quantized layer outputs, int32 biases, UINT8 activations)")
        super().__init__(qmodel.module)
        self.plan = _Plan(qmodel)
        self.codes: dict[fx.Node, torch.Tensor] = {}
        self.accumulator = ExactAccumulator()

    @property
    def float_nodes(self) -> list[str]:
        """Conv/Add/pool nodes evaluated in float (not fused by the rules above)."""
        return list(self.plan.float_nodes)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        self.codes: dict[fx.Node, torch.Tensor] = {}
        try:
            # channels-last: about 1.5x faster float32 convs on the CPU
            return self.run(images.float().contiguous(memory_format=torch.channels_last)).float()
        finally:
            self.codes = {}
            self.module.train(was_training)

    # -- interpreter ---------------------------------------------------------------------------
    def run_node(self, n: fx.Node):
        for done in [k for k in self.codes if k not in self.env]:   # freed by the interpreter
            del self.codes[done]
        if n in self.plan.identity:
            if n.args[0] in self.codes:
                self.codes[n] = self.codes.pop(n.args[0])
            return self.env[n.args[0]]
        if n in self.plan.out_quantizer:
            q = self.plan.quantizer(self.plan.out_quantizer[n])
            m = self.plan.module_of(n)
            if isinstance(m, QuantConv2d):
                z = self._conv(n, m, q)
            elif is_add(n):
                z = self._add(n, q)
            else:
                z = self._global_pool(n, q)
            # requantize: clamp to the grid (ORT clamps to the container, a Clip to the 4-bit grid)
            codes = z.round_().clamp_(q.grid.qmin, q.grid.qmax)
            self.codes[n] = codes
            return codes * self._scale(q)
        m = self.plan.module_of(n)
        if isinstance(m, QuantLinear) and input_quantizer_of(self.module, n) is not None:
            return self._linear(n, m)
        return super().run_node(n)

    @staticmethod
    def _scale(q) -> torch.Tensor:
        return q.scale.detach().float().clamp(min=1e-12)

    def _input_codes(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, ActQuantizer]:
        """(integer codes as float32, float32 step, quantizer) of a quantized tensor: the codes a
        fused producer made, else recovered from the values (``x = q * s`` exactly, so
        ``round(x / s) = q``)."""
        q = self.plan.quantizer(source_of(self.module, node))
        s = self._scale(q)
        codes = self.codes.get(node)
        return (codes if codes is not None else torch.round(self.env[node] / s)), s, q

    def _conv(self, n: fx.Node, m: QuantConv2d, q: ActQuantizer) -> torch.Tensor:
        """float32 ``float(acc + b_q) * M``, before rounding."""
        xq, s_x, qx = self._input_codes(n.args[0])
        wq, s_w, b = weight_codes(m)
        step = s_x * s_w
        bq = torch.clamp(torch.round(b / step), -(2 ** 31), 2 ** 31 - 1)
        acc = self.accumulator.conv(n, xq, qx.grid, m, wq, addend=bq)
        return acc.mul_((step / self._scale(q)).reshape(1, -1, 1, 1))

    def _add(self, n: fx.Node, q: ActQuantizer) -> torch.Tensor:
        aq, s_a, qa = self._input_codes(n.args[0])
        bq, s_b, qb = self._input_codes(n.args[1])
        s_c = self._scale(q)
        za, zb, zc = _zero_point(qa.grid), _zero_point(qb.grid), _zero_point(q.grid)
        r_ac, r_bc = s_a / s_c, s_b / s_c                                    # float32
        fixed = torch.tensor(float(zc), dtype=torch.float32) - (r_ac * za + r_bc * zb)
        a_u8, b_u8 = (aq + za).double(), (bq + zb).double()
        # fma(b, r_bc, fixed), then fma(a, r_ac, .): each product and sum is exact in float64,
        # so one rounding to float32 reproduces the fused multiply-add
        inner = (b_u8 * r_bc.double() + fixed.double()).float()
        c_u8 = (a_u8 * r_ac.double() + inner.double()).float()
        return c_u8 - zc

    def _global_pool(self, n: fx.Node, q: ActQuantizer) -> torch.Tensor:
        xq, s_x, qx = self._input_codes(n.args[0])
        zx = _zero_point(qx.grid)
        size = xq.shape[2] * xq.shape[3]
        acc = (xq + zx).double().sum(dim=(2, 3), keepdim=True) - zx * size
        s_y = self._scale(q)
        scale = s_x / (s_y * torch.tensor(float(size), dtype=torch.float32))
        return acc.float() * scale

    def _linear(self, n: fx.Node, m: QuantLinear) -> torch.Tensor:
        xq, s_x, _ = self._input_codes(n.args[0])
        wq, s_w, b = weight_codes(m)
        b = m.quantized_bias(b, s_x)   # on the int32 grid s_x * s_w, as QGemm
        acc = xq.double() @ wq.double().t()
        return acc * (s_x.double() * s_w.double()) + b.double()
