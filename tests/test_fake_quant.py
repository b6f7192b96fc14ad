import pytest
import torch

from dfq.export.targets import get_target
from dfq.kernels.fake_quant import (Grid, fake_quantize, mse_optimal_scale,
                                    quantize_to_int, weight_grid)


def test_grids_per_target():
    assert get_target("onnxruntime").scheme.activation_grid(8, False) == Grid(0, 255)
    assert get_target("tensorrt").scheme.activation_grid(8, False) == Grid(0, 127)
    assert get_target("onnxruntime").scheme.activation_grid(8, True) == Grid(-128, 127)
    assert get_target("tensorrt").scheme.activation_grid(4, False) == Grid(0, 15)
    assert get_target("onnxruntime").scheme.activation_grid(4, True) == Grid(-8, 7)
    assert weight_grid(8) == Grid(-127, 127)
    assert weight_grid(4) == Grid(-8, 7)
    with pytest.raises(ValueError):
        weight_grid(3)
    with pytest.raises(ValueError):
        get_target("tflite")


def test_rounding_is_half_to_even_and_clamped_exactly():
    s = torch.tensor(0.5)
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25, 100.0, -100.0, 3.49, 3.5])
    # x/s = 0.5 1.5 -0.5 -1.5 2.5 200 -200 6.98 7.0 ; half to even: 0 2 -0 -2 2 ; clamped to [-8,7]
    q = quantize_to_int(x, s, Grid(-8, 7))
    assert q.tolist() == [0.0, 2.0, 0.0, -2.0, 2.0, 7.0, -8.0, 7.0, 7.0]
    assert torch.equal(fake_quantize(x, s, Grid(-8, 7)), q * s)


def test_fake_quant_matches_onnx_quantize_linear():
    pytest.importorskip("onnx")
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = torch.randn(1000) * 3
    scale = 0.0371
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    g = helper.make_graph([q, dq], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])],
                          [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                           numpy_helper.from_array(np.array(0, np.int8), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    ours = fake_quantize(x, torch.tensor(scale), Grid(-128, 127)).numpy()
    assert np.array_equal(y, ours)


def test_lsq_gradients():
    x = torch.tensor([0.1, 0.26, 5.0, -5.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quantize(x, s, Grid(-8, 7))
    y.sum().backward()
    # STE inside the grid, zero outside
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # d/ds: (q - x/s) inside, qmax / qmin outside
    expected = (1 - 1.0) + (3 - 2.6) + 7 + (-8)
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)


def test_per_channel_scale_gradient_shape():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    s = torch.full((4, 1, 1, 1), 0.1, requires_grad=True)
    fake_quantize(w, s, Grid(-127, 127)).sum().backward()
    assert s.grad.shape == s.shape


def test_mse_scale_no_worse_than_max_scale():
    x = torch.cat([torch.randn(10000), torch.tensor([40.0])])
    g = Grid(-8, 7)
    s_mse = mse_optimal_scale(x, g)
    s_max = torch.tensor(40.0 / 7)
    err = lambda s: ((fake_quantize(x, s, g) - x) ** 2).mean()
    assert err(s_mse) <= err(s_max)
    per_ch = mse_optimal_scale(torch.randn(5, 20), g, channel_dim=0)
    assert per_ch.shape == (5,)
    assert mse_optimal_scale(torch.zeros(3, 4), g, channel_dim=0).tolist() == [1.0, 1.0, 1.0]
