"""Issue 5: property tests (hypothesis) for the checkpoint loader and for Q/DQ insertion."""
import copy
import io
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dfq.common.errors import CheckpointError, DfqError
from dfq.export.exact import exact_integer_graph
from dfq.export.onnx_export import build_onnx
from dfq.export.rules import tensorrt_violations
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.load import load_checkpoint, load_model
from dfq.pipeline.quantize import quantize
from tests.tiny import randomize_bn, qconfig

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=".pth", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_a_checkpoint_error(data):
    path = _write(data)
    try:
        load_checkpoint(path)
        raise AssertionError("random bytes were accepted as a checkpoint")
    except CheckpointError as exc:
        assert str(exc)
    finally:
        path.unlink()


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.builds(lambda n: torch.randn(n), st.integers(0, 4)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@SETTINGS
@given(st.dictionaries(st.text(max_size=12), _values, max_size=5))
def test_random_dicts_load_or_fail_cleanly(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = _write(buf.getvalue())
    try:
        load_model(path, arch="resnet20")       # never matches: must be a DfqError, never a crash
        raise AssertionError("a random dict was accepted as ResNet-20 weights")
    except DfqError as exc:
        assert str(exc)
    finally:
        path.unlink()


class _Net(nn.Module):
    """A random small conv net: stem, a sequence of conv-BN(-ReLU) blocks, optionally residual."""

    def __init__(self, widths, kernels, strides, residual, relu6, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.act = nn.ReLU6() if relu6 else nn.ReLU()
        self.convs, self.bns, self.res = nn.ModuleList(), nn.ModuleList(), []
        c = widths[0]
        for w, k, s in zip(widths[1:], kernels, strides):
            self.convs.append(nn.Conv2d(c, w, k, stride=s, padding=k // 2, bias=False))
            self.bns.append(nn.BatchNorm2d(w))
            self.res.append(residual and w == c and s == 1)
            c = w
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.act(self.stem_bn(self.stem(x)))
        for conv, bn, res in zip(self.convs, self.bns, self.res):
            y = bn(conv(x))
            x = torch.relu(y + x) if res else torch.relu(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(1, 3), width=st.sampled_from([4, 8]), data=st.data(),
       residual=st.booleans(), relu6=st.booleans(), bits=st.sampled_from([8, 4]),
       target=st.sampled_from(["tensorrt", "onnxruntime"]), seed=st.integers(0, 1000))
def test_random_conv_nets_export_faithfully(depth, width, data, residual, relu6, bits, target, seed):
    widths = [width] + [data.draw(st.sampled_from([width, 2 * width])) for _ in range(depth)]
    kernels = [data.draw(st.sampled_from([1, 3])) for _ in range(depth)]
    strides = [data.draw(st.sampled_from([1, 2])) for _ in range(depth)]
    _check_export(widths, kernels, strides, residual, relu6, bits, target, seed)


def test_a_dead_net_keeps_its_saturated_int32_bias_sign():
    """Found by the property above: every ReLU output zero, so the classifier's input step is the
    1e-8 floor and its bias saturates the int32 grid; clipped in float32 (no 2**31 - 1 there) the
    code wrapped to -2**31 and flipped the logit's sign."""
    _check_export([4, 8, 4], [1, 1], [1, 2], False, False, 8, "onnxruntime", 195)


def _check_export(widths, kernels, strides, residual, relu6, bits, target, seed):
    torch.manual_seed(seed)
    net = randomize_bn(_Net(widths, kernels, strides, residual, relu6), seed).eval()
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    qm = quantize(net, qconfig(bits=bits, target=target), x[:2])
    calibrate(qm, x)
    art = build_onnx(qm)
    if target == "tensorrt":
        assert tensorrt_violations(art.qdq) == []
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(exact_integer_graph(art.qdq).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = copy.deepcopy(qm.module).double()(x.double()).numpy()
    # the artifact computes the fake-quant model: logits within a small fraction of their spread
    spread = float(np.abs(ref).max()) + 1e-6
    assert np.abs(out - ref).max() <= 0.05 * spread, (np.abs(out - ref).max(), spread)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
