"""The space-to-depth stem rewrite of the ONNX Runtime artifact is exact and keeps the fused kernels."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dfq.export.onnx_export import build_onnx
from dfq.export.ort_rewrites import space_to_depth_stem, space_to_depth_weights, stem_plan
from dfq.export.ort_runtime import optimized_op_types
from dfq.pipeline.calibrate import calibrate
from dfq.export.targets import get_target
from dfq.pipeline.quantize import quantize
from tests.tiny import Block, randomize_bn, qconfig


def onnx_space_to_depth(x: np.ndarray, s: int) -> np.ndarray:
    """ONNX SpaceToDepth as its specification writes it."""
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // s, s, w // s, s).transpose(0, 3, 5, 1, 2, 4)
    return t.reshape(n, c * s * s, h // s, w // s)


@settings(max_examples=60, deadline=None)
@given(h=st.sampled_from([8, 12, 14, 16]), w=st.sampled_from([8, 10, 16]), k=st.integers(1, 8),
       s=st.sampled_from([2, 3, 4]), pads=st.tuples(*[st.integers(0, 4)] * 4), seed=st.integers(0, 1000))
def test_plan_is_the_same_convolution(h, w, k, s, pads, seed):
    """Integer inputs and weights (exact in float64): the stride-1 conv on the space-to-depth
    input equals the strided conv wherever the plan applies."""
    t, l, b, r = pads
    if h % s or w % s or h + t + b < k or w + l + r < k:
        return
    plans = [stem_plan(h, k, s, t, b), stem_plan(w, k, s, l, r)]
    if None in plans:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 8, (2, 3, h, w)).astype(np.float64)
    wt = rng.integers(-7, 8, (4, 3, k, k)).astype(np.int8)
    ref = F.conv2d(F.pad(torch.from_numpy(x), (l, r, t, b)), torch.from_numpy(wt.astype(np.float64)), stride=s)
    (d0, k0, b0, e0), (d1, k1, b1, e1) = plans
    w2 = space_to_depth_weights(wt, s, (d0, d1), (k0, k1))
    assert w2.dtype == np.int8 and w2.shape == (4, 3 * s * s, k0, k1)
    x2 = torch.from_numpy(onnx_space_to_depth(x, s))
    out = F.conv2d(F.pad(x2, (b1, e1, b0, e0)), torch.from_numpy(w2.astype(np.float64)))
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


class StemNet(nn.Module):
    """A ResNet-style stem (k x k / 2 conv on 3 channels, BN, ReLU, max-pool), a residual block
    and a classifier."""

    def __init__(self, k: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, k, stride=2, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block = Block(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.pool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _stem_model(target: str, bits: int = 8, k: int = 7):
    torch.manual_seed(0)
    model = randomize_bn(StemNet(k)).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = quantize(model, qconfig(bits=bits, target=target), x[:2])
    calibrate(qm, x, batch_size=8)
    return qm, x


@pytest.mark.parametrize("bits", [8, 4])
def test_stem_rewrite_is_bit_exact_and_keeps_the_fused_kernels(tmp_path, bits):
    qm, x = _stem_model("onnxruntime", bits)
    exported = build_onnx(qm)
    assert exported.rewrites == {"space_to_depth_stem": ["conv1"]}
    ops = [n.op_type for n in exported.qdq.graph.node]
    assert ops.index("SpaceToDepth") < ops.index("Conv")
    # the same artifact without the rewrite (its last step)
    from dfq.export import onnx_export

    plain = onnx_export.simplify(onnx_export.insert_qdq(exported.emitted.model, exported.emitted.table, get_target("onnxruntime").qdq))
    assert space_to_depth_stem(plain)[1] == ["conv1"]
    paths = {}
    for name, model in (("plain", plain), ("rewritten", exported.qdq)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    outs = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
            for k, p in paths.items()}
    assert np.array_equal(outs["plain"], outs["rewritten"])
    plain_ops, new_ops = optimized_op_types(paths["plain"]), optimized_op_types(paths["rewritten"])
    assert new_ops["QLinearConv"] == plain_ops["QLinearConv"] == 3
    assert new_ops["Conv"] == 0 and new_ops["SpaceToDepth"] == 1


def test_not_applied_for_tensorrt_nor_small_kernels():
    qm, _ = _stem_model("tensorrt")
    exported = build_onnx(qm)
    assert exported.rewrites == {} and "SpaceToDepth" not in {n.op_type for n in exported.qdq.graph.node}
    qm, _ = _stem_model("onnxruntime", k=3)    # 3x3/2 stems: measured no gain
    assert build_onnx(qm).rewrites == {}


def test_plan_refuses_sizes_not_divisible_by_the_stride():
    assert stem_plan(225, 7, 2, 3, 3) is None
    assert stem_plan(224, 7, 2, 3, 3) == (1, 4, 2, 1)
