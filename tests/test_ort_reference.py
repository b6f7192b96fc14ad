"""The integer reference reproduces ONNX Runtime's fused kernels code for code."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dfq.common.provenance import cpu_flags
from dfq.export.onnx_export import build_onnx
from dfq.export.ort_reference import OrtIntegerReference
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.quantize import quantize
from tests.tiny import qconfig, tiny_images, tiny_resnet, with_wrong_block_scale


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def _ort(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


_FLAGS = cpu_flags()
_VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(_FLAGS))
# Full-range 8-bit weights are exact on ONNX Runtime only where its u8s8 kernels use VNNI (or AMX): without it
# they add pairs of u8*s8 products in int16 with saturation, which is why the target's default is reduce_range.
_FULL_RANGE = pytest.param(8, False, marks=pytest.mark.skipif(
    not _VNNI, reason=f"this CPU has no VNNI/AMX (flags {_FLAGS}): ONNX Runtime's u8s8 kernels saturate "
                      "full-range 8-bit weights here, as --full-range-weights documents"))


@pytest.mark.parametrize("bits,reduce_range", [(8, True), _FULL_RANGE, (4, True)])
def test_reference_equals_ort_fused_kernels(bits, reduce_range, tmp_path):
    qm = quantize(tiny_resnet(3, width=16), qconfig(bits=bits, target="onnxruntime", reduce_range=reduce_range),
                  tiny_images(2))
    calibrate(qm, tiny_images(96, seed=4))
    ex = build_onnx(qm)
    ops = _optimized_ops(ex.qdq, tmp_path)
    # the graph runs on the kernels the reference emulates
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    ref = OrtIntegerReference(qm)
    assert ref.float_nodes == []
    x = tiny_images(400, seed=11)
    out = _ort(ex.qdq, x)
    expected = ref(x).numpy()
    # same integer codes everywhere -> the logits differ only by the float64 vs ORT final Gemm
    np.testing.assert_allclose(expected, out, rtol=0, atol=1e-4)
    # the float fake-quant model does not achieve this: it rounds differently near ties
    with torch.no_grad():
        fq = qm(x).numpy()
    assert np.abs(fq - out).max() > np.abs(expected - out).max()


def test_reference_sees_a_wrong_artifact():
    """A scale the artifact got wrong shows as a large difference (the reference reads the torch
    model, not the ONNX)."""
    qm = quantize(tiny_resnet(5, width=16), qconfig(bits=8, target="onnxruntime"), tiny_images(2))
    calibrate(qm, tiny_images(96, seed=6))
    ex = build_onnx(qm)
    ref = OrtIntegerReference(qm)
    x = tiny_images(100, seed=12)
    good = np.abs(ref(x).numpy() - _ort(ex.qdq, x)).max()
    bad = np.abs(ref(x).numpy() - _ort(with_wrong_block_scale(ex.qdq), x)).max()
    assert good < 1e-5 and bad > 1e-3


def test_reference_needs_the_onnxruntime_target():
    qm = quantize(tiny_resnet(0), qconfig(bits=8, target="tensorrt"), tiny_images(2))
    with pytest.raises(ValueError, match="onnxruntime target"):
        OrtIntegerReference(qm)


def test_reference_on_resnet20(shared_dir):
    """Real model: ResNet-20 W8A8, calibrated on noise (only the arithmetic is under test)."""
    from dfq.pipeline.load import load_model

    loaded = load_model(shared_dir / "models" / "cifar10" / "resnet20-12fca82f.th")
    gen = torch.Generator().manual_seed(0)
    qm = quantize(loaded.model, qconfig(bits=8, target="onnxruntime"), torch.randn(2, 3, 32, 32, generator=gen))
    calibrate(qm, torch.randn(64, 3, 32, 32, generator=gen))
    ex = build_onnx(qm)
    x = torch.randn(200, 3, 32, 32, generator=gen)
    ref = OrtIntegerReference(qm)
    assert ref.float_nodes == []
    np.testing.assert_allclose(ref(x).numpy(), _ort(ex.qdq, x), rtol=0, atol=1e-4)


class _TinySiLUNet(torch.nn.Module):
    """The gating of EfficientNet-B0's blocks: SiLU activations and a squeeze-excitation."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.SiLU(), nn.Conv2d(4, 16, 1),
                                nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = self.project(x * self.se(x))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_sigmoid_gates_run_on_ort_integer_kernels_and_the_reference_matches_them(tmp_path):
    from tests.tiny import randomize_bn

    torch.manual_seed(0)
    qm = quantize(randomize_bn(_TinySiLUNet()), qconfig(bits=8, target="onnxruntime"), tiny_images(2))
    calibrate(qm, tiny_images(96, seed=4))
    ex = build_onnx(qm)
    ops = _optimized_ops(ex.qdq, tmp_path)
    # three SiLUs and the squeeze-excitation's gate: integer sigmoid (table) and integer products
    assert ops["QLinearSigmoid"] == 4 and ops["QLinearMul"] == 4, ops
    assert ops["Sigmoid"] == 0 and ops["Mul"] == 0 and ops["DequantizeLinear"] == 0, ops
    ref = OrtIntegerReference(qm)
    assert ref.float_nodes == []
    x = tiny_images(400, seed=11)
    np.testing.assert_allclose(ref(x).numpy(), _ort(ex.qdq, x), rtol=0, atol=1e-4)
