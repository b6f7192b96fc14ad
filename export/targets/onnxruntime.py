"""The ``onnxruntime`` target: a QDQ graph that ONNX Runtime's CPU kernels run in integer arithmetic.

ONNX Runtime fuses ``DQ -> Conv -> Q`` into QLinearConv (and Add into QLinearAdd) only where the
op's output has a Q, and on x86 prefers UINT8 activations with INT8 weights. Hence: UINT8
activations ([0, 255] after ReLU, zero point 128 for signed tensors), a Q on every conv/Add output,
int32 biases on the grid ``s_in * s_w``, 8-bit weights on [-63, 63] by default (AVX2 kernels without
VNNI add pairs of u8*s8 products in int16 with saturation; see
:func:`dfq.kernels.fake_quant.weight_grid`), 4-bit clips on the codes (fusions intact), ReLU6 as
Relu where its bound cannot bind, and the exact space-to-depth rewrite of large strided stems
(:mod:`dfq.export.ort_rewrites`).

Verification runs the artifact with all of ORT's graph optimizations (its fused integer kernels)
against :class:`~dfq.export.ort_reference.OrtIntegerReference`, the fake-quant model in those
kernels' arithmetic; the integer-exact float evaluation of the same graph runs beside it.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from dfq.export.exact import exact_integer_graph
from dfq.export.ort_reference import OrtIntegerReference
from dfq.export.ort_rewrites import space_to_depth_stem
from dfq.export.ort_runtime import make_session
from dfq.export.qdq import QDQFormat
from dfq.export.targets.base import Target, Verification
from dfq.kernels.fake_quant import QuantScheme
from dfq.pipeline.quantize import QuantizedModel


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    summary = "UINT8/INT8 QDQ with quantized layer outputs: ONNX Runtime's fused integer kernels (CPU)"
    scheme = QuantScheme("onnxruntime", unsigned_8bit_max=255, reduce_range=True, quantize_outputs=True,
                         int32_bias=True, integer_gating=True)
    qdq = QDQFormat(uint8_activations=True, clip_on_codes=True, relu6_as_relu=True)

    def rewrite(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
        model, stems = space_to_depth_stem(model)
        return model, ({"space_to_depth_stem": stems} if stems else {})

    def verification(self, qmodel: QuantizedModel, onnx_path: Path, threads: int) -> Verification:
        exact = make_session(exact_integer_graph(onnx.load(str(onnx_path))), threads=threads, optimization="disable")
        reference = OrtIntegerReference(qmodel)
        return Verification(
            session=make_session(str(onnx_path), threads=threads, optimization="all"),
            runtime=("onnxruntime, all graph optimizations (its fused integer kernels); agreement_exact: "
                     "integer-exact evaluation of the same graph vs the float fake-quant model"),
            reference=reference, extra_sessions={"exact": exact}, reference_float_nodes=reference.float_nodes)


TARGET = OnnxRuntimeTarget()
