import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dfq.export.exact import exact_integer_graph
from dfq.export.onnx_export import build_onnx
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.quantize import quantize
from tests.tiny import tiny_images, tiny_resnet, qconfig


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _one_conv(x_zp: int, x_dtype: int) -> onnx.ModelProto:
    """input -> Q/DQ (scale 0.5, zero point x_zp) -> Conv with per-channel DQ weights + DQ'd int32 bias."""
    wq = np.array([[[[1, -2], [3, 4]]], [[[-127, 127], [0, 5]]]], dtype=np.int8)   # [2, 1, 2, 2]
    zdt = np.int8 if x_dtype == TensorProto.INT8 else np.uint8
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "sx"),
        numpy_helper.from_array(np.array(x_zp, zdt), "zx"),
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(np.array([0.25, 0.125], np.float32), "sw"),
        numpy_helper.from_array(np.zeros(2, np.int8), "zw"),
        numpy_helper.from_array(np.array([8, -3], np.int32), "bq"),
        numpy_helper.from_array(np.array([0.125, 0.0625], np.float32), "sb"),
        numpy_helper.from_array(np.zeros(2, np.int32), "zb"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wdq"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bdq"], axis=0),
        helper.make_node("Conv", ["xdq", "wdq", "bdq"], ["logits"], kernel_shape=[2, 2]),
    ]
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 2, 2])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 1, 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8   # make_model writes onnx's newest IR, which an older ONNX Runtime refuses
    return m


@pytest.mark.parametrize("x_zp,x_dtype", [(0, TensorProto.INT8), (128, TensorProto.UINT8)])
def test_exact_conv_by_hand(x_zp, x_dtype):
    model = _one_conv(x_zp, x_dtype)
    x = np.array([[[[1.0, -1.5], [2.2, 0.4]]]], np.float32)
    # x/0.5 rounds (half to even) to [2, -3, 4, 1]; integer sums per channel:
    #   ch0: 2*1 + (-3)(-2) + 4*3 + 1*4 = 24       -> 24 * 0.5*0.25   + 8*0.125    = 4.0
    #   ch1: 2*(-127) + (-3)(127) + 0 + 1*5 = -630 -> -630 * 0.5*0.125 + -3*0.0625 = -39.5625
    expected = np.array([4.0, -39.5625], np.float32).reshape(1, 2, 1, 1)
    exact = exact_integer_graph(model)
    np.testing.assert_array_equal(_run(exact, x), expected)
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6)   # same meaning as the artifact
    ops = [n.op_type for n in exact.graph.node]
    assert "Conv" in ops and ops.count("DequantizeLinear") == 0       # weight/bias/input DQs are gone


def test_exact_graph_refuses_graphs_without_quantized_convs():
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "r",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="no Conv/Gemm"):
        exact_integer_graph(helper.make_model(g))


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_exact_graph_matches_float64_fake_quant_model(target):
    """The integer-exact evaluation is closer to the float64 fake-quant model than ORT's
    unfused float path, and agrees with it on every image of a tiny ResNet."""
    qm = quantize(tiny_resnet(1), qconfig(bits=8, target=target), tiny_images(2))
    calibrate(qm, tiny_images(96, seed=3))
    art = build_onnx(qm)
    x = tiny_images(300, seed=11)
    with torch.no_grad():
        ref = copy.deepcopy(qm.module).double()(x.double()).numpy()
    exact = _run(exact_integer_graph(art.qdq), x.numpy())
    plain = _run(art.qdq, x.numpy())
    assert (exact.argmax(1) == ref.argmax(1)).all()
    assert np.abs(exact - ref).mean() <= np.abs(plain - ref).mean() + 1e-7
    assert np.abs(exact - ref).mean() < 1e-3
