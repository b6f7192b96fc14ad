import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dfq.export.onnx_export import build_onnx, export_onnx
from dfq.export.rules import tensorrt_violations
from dfq.kernels.fake_quant import Grid
from dfq.pipeline.calibrate import calibrate
from dfq.export.targets import get_target
from dfq.pipeline.quantize import quantize
from tests.tiny import tiny_images, tiny_resnet, qconfig


def _quantized(bits, target, seed=0):
    qm = quantize(tiny_resnet(seed), qconfig(bits=bits, target=target), tiny_images(2))
    calibrate(qm, tiny_images(96, seed=seed + 5))
    return qm


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


CASES = [(8, "onnxruntime"), (4, "onnxruntime"), (8, "tensorrt"), (4, "tensorrt")]


@pytest.mark.parametrize("bits,target", CASES)
def test_ort_matches_fake_quant_model(bits, target):
    qm = _quantized(bits, target)
    ex = build_onnx(qm)
    x = tiny_images(200, seed=9)
    with torch.no_grad():
        ref = qm(x).numpy()
    out = _run(ex.qdq, x)
    agreement = (out.argmax(1) == ref.argmax(1)).mean()
    assert agreement >= 0.99
    # within about one output step of the last activation quantizer times the fc weights
    assert np.abs(out - ref).mean() < 0.02
    # the FP twin is the float model exactly (BN folded)
    qm.set_enabled(False, False)
    with torch.no_grad():
        np.testing.assert_allclose(_run(ex.fp, x), qm(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_tensorrt_flavour_obeys_tensorrt_rules(bits):
    ex = build_onnx(_quantized(bits, "tensorrt"))
    assert tensorrt_violations(ex.qdq) == []
    ops = collections.Counter(n.op_type for n in ex.qdq.graph.node)
    assert ops["Conv"] == 5 and ops["DequantizeLinear"] >= 2 * 5
    zps = [t for t in ex.qdq.graph.initializer if t.name.endswith("zero_point")]
    assert zps and all(t.data_type == onnx.TensorProto.INT8 for t in zps)
    if bits == 4:
        assert ops["Clip"] >= 5  # 4-bit activations clipped before their INT8 Q


def test_rules_checker_catches_violations():
    # the onnxruntime flavour (UINT8, zero point 128, unquantized conv outputs ok) breaks TensorRT rules
    problems = tensorrt_violations(build_onnx(_quantized(8, "onnxruntime")).qdq)
    assert any("UINT8" in p for p in problems) and any("non-zero zero point" in p for p in problems)
    # a conv whose weight is not quantized is reported
    ex = build_onnx(_quantized(8, "tensorrt"))
    g = ex.qdq.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    dq = next(n for n in g.node if n.output[0] == conv.input[1])
    conv.input[1] = dq.input[0]  # point at the raw int8 initializer's name instead
    assert any("weight" in p and "not quantized" in p for p in tensorrt_violations(ex.qdq))


@pytest.mark.parametrize("bits", [8, 4])
def test_onnxruntime_flavour_fuses_into_integer_kernels(tmp_path, bits):
    # 4-bit too: its Clips run on the UINT8 codes between Q and DQ and must not break the fusion
    qm = _quantized(bits, "onnxruntime")
    path = tmp_path / "q.onnx"
    export_onnx(qm, path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 5, ops
    assert ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0, ops  # int32 bias: the classifier runs integer too
    # the graph input's Q, and at 4 bits the requantization of the block input (8-bit for the residual
    # Add, 4-bit for block.conv1): a DQ -> Q pair ORT runs as it is
    assert ops["QuantizeLinear"] == (2 if bits == 4 else 1), ops
    if bits == 4:
        nodes = onnx.load(str(path)).graph.node
        clips = [n for n in nodes if n.op_type == "Clip"]
        # stem output, block.relu1, block.relu2 and down_act are 8-bit only where an Add reads them
        assert len(clips) == 4 and all(n.input[0].endswith("_quantized") for n in clips)
        requant = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.output[0].startswith("aq_stem_act_a4"))
        assert next(n for n in nodes if n.output[0] == requant.input[0]).op_type == "DequantizeLinear"


def test_reexport_is_byte_identical(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(_quantized(4, "tensorrt"), a)
    export_onnx(_quantized(4, "tensorrt"), b)
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_clip_only_where_container_is_wider_than_grid():
    ort, trt = get_target("onnxruntime").qdq, get_target("tensorrt").qdq
    assert not ort.needs_clip(Grid(0, 255))
    assert not ort.needs_clip(Grid(-128, 127))
    assert not trt.needs_clip(Grid(0, 127))
    assert trt.needs_clip(Grid(0, 15)) and ort.needs_clip(Grid(-8, 7))


def test_weights_are_int8_per_channel_and_int32_bias_for_onnxruntime():
    ex = build_onnx(_quantized(8, "onnxruntime"))
    inits = {t.name: t for t in ex.qdq.graph.initializer}
    w = inits["stem.weight_quantized"]
    assert w.data_type == onnx.TensorProto.INT8 and list(inits["stem.weight.scale"].dims) == [8]
    assert inits["down.bias_quantized"].data_type == onnx.TensorProto.INT32


def test_onnxruntime_weights_cannot_saturate_avx2_kernels():
    """x86 U8S8 kernels without VNNI add pairs of u8*s8 products in int16 with saturation; the
    onnxruntime target keeps 8-bit weights on [-63, 63] so the fused integer conv equals the
    QDQ graph's meaning on every x86 CPU. A conv fed 255s with near-maximal weights shows it."""
    from torch import nn

    from dfq.pipeline.qmodules import QuantConv2d

    qm = _quantized(8, "onnxruntime")
    layers = [m for m in qm.module.modules() if isinstance(m, QuantConv2d)]
    assert all(m.weight_quantizer.grid == Grid(-63, 63) for m in layers)
    assert _quantized(8, "tensorrt").module.get_submodule("down").weight_quantizer.grid == Grid(-127, 127)
    # worst case: saturating inputs and weights of one sign
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    model[3].weight.data = model[3].weight.data.abs()
    x = torch.rand(64, 3, 8, 8) * 4
    q = quantize(model, qconfig(bits=8, target="onnxruntime", keep_8bit=()), x[:2])
    calibrate(q, x)
    with torch.no_grad():
        ref = q(x).numpy()
    out = _run(build_onnx(q).qdq, x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
