"""The tensorrt target's reference computes what the integer-exact graph computes, code for code."""
import numpy as np
import onnx
import torch

from dfq.export.exact import exact_integer_graph
from dfq.export.exact_reference import ExactIntegerReference
from dfq.export.onnx_export import build_onnx
from dfq.export.ort_runtime import make_session
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.quantize import quantize
from tests.tiny import qconfig, tiny_images, tiny_resnet, with_wrong_block_scale


def _exact_logits(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    s = make_session(exact_integer_graph(model), threads=1, optimization="disable")
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _model(bits: int, seed: int):
    qm = quantize(tiny_resnet(seed, width=16), qconfig(bits=bits, target="tensorrt"), tiny_images(2))
    calibrate(qm, tiny_images(96, seed=4))
    return qm, build_onnx(qm).qdq


def test_reference_equals_the_integer_exact_graph():
    for bits in (8, 4):
        qm, model = _model(bits, 3)
        x = tiny_images(400, seed=11)
        out = _exact_logits(model, x)
        ref = ExactIntegerReference(qm)(x).numpy()
        np.testing.assert_allclose(ref, out, rtol=0, atol=1e-5)
        with torch.no_grad():
            fq = qm(x).numpy()
        # the float fake-quant model rounds differently near ties: further from the graph
        assert np.abs(fq - out).max() > 10 * np.abs(ref - out).max()


def test_reference_sees_a_wrong_artifact():
    qm, model = _model(8, 5)
    x = tiny_images(100, seed=12)
    bad = _exact_logits(with_wrong_block_scale(model), x)
    assert np.abs(ExactIntegerReference(qm)(x).numpy() - bad).max() > 1e-3
