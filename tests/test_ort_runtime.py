"""dfq.export.ort_runtime (sessions, batched logits, optimised op types, latency) and the
ONNX Runtime ``quantize_static`` peer in benchmarks/peer_ort.py, on tiny exported conv nets."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfq.export.ort_runtime import (LatencyResult, compare_latency, make_session, measure_latency,
                                    node_times, optimized_op_types, run_logits, time_breakdown)

REPO = Path(__file__).resolve().parents[1]


def _load_peer():
    spec = importlib.util.spec_from_file_location("dfq_bench_peer_ort", REPO / "benchmarks" / "peer_ort.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class TinyNet(nn.Module):
    """conv-bn-relu, a residual block, pooling and a classifier: enough for QLinearConv/QLinearAdd."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.c2(self.c1(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _export(model: nn.Module, path: Path, shape=(1, 3, 16, 16), dynamic: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(*shape), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    for m in model.modules():  # non-trivial BN statistics so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    d = tmp_path_factory.mktemp("ort")
    return model, _export(model, d / "tiny.onnx"), d


@pytest.fixture(scope="module")
def tiny_peer(tiny):
    _, fp_path, d = tiny
    images = np.random.default_rng(0).standard_normal((8, 3, 16, 16), dtype=np.float32)
    return _load_peer().quantize_static_peer(fp_path, d / "tiny_peer.onnx", images)


def test_make_session_threads_and_options(tiny):
    _, path, _ = tiny
    s = make_session(path, threads=1)
    opts = s.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.inter_op_num_threads == 1
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert make_session(str(path), threads=2).get_session_options().intra_op_num_threads == 2
    assert make_session(path.read_bytes(), optimization="disable").get_session_options().intra_op_num_threads == 0
    with pytest.raises(ValueError):
        make_session(path, optimization="fast")
    with pytest.raises(ValueError):
        make_session(path, threads=0)
    with pytest.raises(FileNotFoundError):
        make_session(path.parent / "missing.onnx")


def test_run_logits_matches_torch_with_partial_batch(tiny):
    model, path, _ = tiny
    x = torch.randn(11, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    s = make_session(path, threads=1)
    for images in (x, x.numpy()):
        y = run_logits(s, images, batch_size=4)  # 4 + 4 + 3
        assert y.dtype == np.float32 and y.shape == (11, 5)
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
    assert run_logits(s, x[:0], batch_size=4).shape == (0, 5)


def test_run_logits_fixed_batch_model(tiny):
    model, _, d = tiny
    path = _export(model, d / "tiny_fixed2.onnx", shape=(2, 3, 16, 16), dynamic=False)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    y = run_logits(make_session(path, threads=1), x, batch_size=4)  # runs 2 + 2 + (1 padded to 2)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)


def test_peer_is_u8s8_per_channel_qdq(tiny_peer):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(tiny_peer))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(inits[n.input[2]].dtype == np.uint8 for n in q)
    w_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]
    assert w_dq and all(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1 for n in w_dq)


def test_optimized_op_types_of_peer(tiny, tiny_peer):
    ops = optimized_op_types(tiny_peer)  # "extended"
    assert ops["QLinearConv"] == 3
    assert ops["com.microsoft.QLinearAdd"] == 1
    assert "Conv" not in ops
    fp_ops = optimized_op_types(tiny[1], optimization="basic")
    assert fp_ops["Conv"] == 3 and "QLinearConv" not in fp_ops
    assert all(isinstance(v, int) and v > 0 for v in ops.values())


def test_peer_output_close_to_fp(tiny, tiny_peer):
    model, _, _ = tiny
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    y = run_logits(make_session(tiny_peer, threads=1), x, batch_size=2)
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max() + 1e-3


def test_measure_latency_sane_and_bounded(tiny):
    _, path, _ = tiny
    r = measure_latency(path, batch=2, threads=1, warmup=2, min_seconds=10.0, max_iterations=7)
    assert isinstance(r, LatencyResult)
    assert r.iterations == 7 and r.batch == 2 and r.threads == 1
    assert 0 < r.min_ms <= r.median_ms <= r.p90_ms
    assert r.min_ms <= r.mean_ms
    assert r.median_ms < 1000
    r = measure_latency(path, batch=1, threads=1, warmup=0, iterations=5, min_seconds=0.0)
    assert r.iterations == 5
    d = r.to_dict()
    assert set(d) == {"median_ms", "p90_ms", "mean_ms", "min_ms", "iterations", "batch", "threads"}
    r = measure_latency(path, batch=1, threads=1, warmup=0, min_seconds=0.0, input_shape=(3, 16, 16))
    assert r.iterations == 1
    with pytest.raises(ValueError):
        measure_latency(path, batch=1, threads=1, iterations=10, max_iterations=5)


def test_compare_latency_structure(tiny, tiny_peer):
    _, fp_path, _ = tiny
    res = compare_latency(fp_path, tiny_peer, batch=2, threads=1, rounds=2, warmup=1, iterations=6,
                          min_seconds=0.0)
    assert {"fp", "int", "speedup"} <= set(res)
    for k in ("fp", "int"):
        assert res[k]["iterations"] == 6 and res[k]["batch"] == 2 and res[k]["threads"] == 1
        assert res[k]["median_ms"] > 0
    assert res["speedup"] == pytest.approx(res["fp"]["median_ms"] / res["int"]["median_ms"])


def test_time_breakdown_names_op_types_and_nodes(tiny, tiny_peer):
    _, fp_path, _ = tiny
    rows = node_times(tiny_peer, batch=2, threads=1, runs=2)
    assert rows and all(r["ms"] >= 0 and r["op"] and r["node"] for r in rows)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert any(r["op"].startswith("QLinear") for r in rows)   # the peer's integer kernels show up
    b = time_breakdown(fp_path, tiny_peer, batch=2, threads=1, top=3)
    assert "Conv" in " ".join(b["op_ms_fp32"]) and len(b["slowest_quantized_nodes"]) == 3


def test_slower_artifact_is_named_on_the_console():
    from dfq.report import _breakdown_table, _slower_warning

    lat = {"backend": "onnxruntime-cpu", "batch": 1, "speedup": 0.5, "slower_than_fp32": True, "deployment_runtime": False,
           "breakdown": {"op_ms_fp32": {"Conv": 1.0}, "op_ms_quantized": {"FusedConv": 2.0},
                         "slowest_quantized_nodes": [{"node": "features_2", "op": "FusedConv", "ms": 2.0}]}}
    line = _slower_warning(lat, "tensorrt")
    assert "SLOWER than FP32 (0.50x)" in line and "features_2 (FusedConv" in line and "laid out for other" in line
    assert "laid out" not in _slower_warning({**lat, "deployment_runtime": True}, "onnxruntime")
    assert "| FusedConv | 0.000 | 2.000 |" in "\n".join(_breakdown_table(lat))
