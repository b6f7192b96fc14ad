"""The ``tensorrt`` target: an explicitly quantized graph for TensorRT (strongly typed builds).

TensorRT has no UINT8 and no asymmetric quantization: every Q/DQ is INT8 with zero point 0, so
8-bit post-ReLU activations use [0, 127]. Q/DQ sit on every Conv/Gemm input (activation and
weight) and on both inputs of residual Adds, not on op outputs, and 4-bit clips are float Clips
before the Q (TensorRT fuses them into the producing kernel). The static rules are checked by
:func:`dfq.export.rules.tensorrt_violations`.

Verification runs what an INT8 engine computes: integer convolutions accumulated exactly and scaled
once (:func:`dfq.export.exact.exact_integer_graph` rewrites the artifact read back from disk so
that ONNX Runtime's float kernels do exactly that), against the fake-quant model in that same
arithmetic (:class:`~dfq.export.exact_reference.ExactIntegerReference`). ORT's fused x86 kernels would add their own int16
saturation for full-range weights, and its unfused float path rounds every product.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from dfq.export.exact import exact_integer_graph
from dfq.export.exact_reference import ExactIntegerReference
from dfq.export.ort_runtime import make_session
from dfq.export.qdq import QDQFormat
from dfq.export.rules import tensorrt_violations
from dfq.export.targets.base import Target, Verification
from dfq.kernels.fake_quant import QuantScheme
from dfq.pipeline.quantize import QuantizedModel


class TensorRTTarget(Target):
    name = "tensorrt"
    summary = "INT8 QDQ, zero points 0, Q/DQ on every Conv/Gemm input and residual Add: TensorRT (GPU)"
    scheme = QuantScheme("tensorrt", unsigned_8bit_max=127)
    qdq = QDQFormat(uint8_activations=False, clip_on_codes=False, relu6_as_relu=False)
    builds_engines = True
    deploys_on = ("tensorrt",)

    def violations(self, model: onnx.ModelProto) -> list[str]:
        return tensorrt_violations(model)

    def verification(self, qmodel: QuantizedModel, onnx_path: Path, threads: int) -> Verification:
        exact = make_session(exact_integer_graph(onnx.load(str(onnx_path))), threads=threads, optimization="disable")
        return Verification(session=exact, runtime=("onnxruntime, integer-exact evaluation of the QDQ graph (int32 "
                                                     "accumulation as in TensorRT)"),
                            reference=ExactIntegerReference(qmodel))


TARGET = TensorRTTarget()
