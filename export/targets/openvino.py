"""The ``openvino`` target: the QDQ graph laid out for OpenVINO's CPU plugin and verified there.

OpenVINO reads the onnxruntime flavour's QDQ ONNX as it is (UINT8 activations, INT8 per-channel
weights, int32 biases, 4-bit clips on the codes) and runs it in its own int8 kernels. One thing
differs, measured on efficientnet_b0 W8A8 (random weights, 2 threads, one interleaved run): the
onnxruntime flavour quantizes sigmoid gates (SiLU, squeeze-excitation) so that ONNX Runtime runs
them as QLinearSigmoid/QLinearMul (0.89x -> 1.57x over FP32 there), and on OpenVINO those extra
Q/DQ pairs cost time (36 ms -> 48 ms against 51 ms FP32). This flavour leaves the gates in float.

Verification runs the artifact on OpenVINO against
:class:`~dfq.export.openvino_reference.OpenVINOReference`: the fake-quant model whose conv
outputs that OpenVINO fuses into residual Adds are clamped to their quantizer's range but not
rounded (OpenVINO's own float arithmetic elsewhere leaves 0.08-0.18% of the answers different on
ResNet-20, 10,000 images).
OpenVINO must be installed (``pip install 'dfq[openvino]'``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dfq.export.openvino_reference import OpenVINOReference
from dfq.export.runtimes import get_runtime
from dfq.export.targets.base import Target, Verification
from dfq.export.targets.onnxruntime import TARGET as ONNXRUNTIME
from dfq.pipeline.quantize import QuantizedModel


class OpenVINOTarget(Target):
    name = "openvino"
    summary = "UINT8/INT8 QDQ with float sigmoid gates, verified on OpenVINO's CPU plugin (Intel CPUs)"
    # the onnxruntime flavour's grids and Q/DQ layout, without its integer sigmoid gates
    scheme = replace(ONNXRUNTIME.scheme, name="openvino", integer_gating=False)
    qdq = ONNXRUNTIME.qdq
    latency_backends = ("openvino", "onnxruntime-cpu")
    cross_check_runtimes = ()
    deploys_on = ("openvino",)

    def unavailable(self) -> str | None:
        ok, why = get_runtime("openvino").status()
        return None if ok else why

    def verification(self, qmodel: QuantizedModel, onnx_path: Path, threads: int) -> Verification:
        reference = OpenVINOReference(qmodel)
        return Verification(
            session=get_runtime("openvino").session(onnx_path, threads),
            runtime="openvino CPU plugin (its int8 kernels), FP32 inference precision",
            reference=reference)


TARGET = OpenVINOTarget()
