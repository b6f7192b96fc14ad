"""A new export target is one class and one registration: a test-only toy target (INT8 containers,
zero points 0, quantized layer outputs, no int32 biases, its own rule) goes through the whole
dfq-export path without any other code knowing its name."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from dfq.cli import main
from dfq.export import targets
from dfq.export.exact import exact_integer_graph
from dfq.export.ort_runtime import make_session
from dfq.export.qdq import QDQFormat
from dfq.export.targets.base import Target, Verification
from dfq.kernels.fake_quant import QuantScheme


class ToyTarget(Target):
    name = "toy"
    summary = "INT8 QDQ with quantized layer outputs (test only)"
    scheme = QuantScheme("toy", unsigned_8bit_max=127, quantize_outputs=True)
    qdq = QDQFormat(uint8_activations=False, clip_on_codes=True, relu6_as_relu=False)

    def violations(self, model):
        return [f"{n.name}: no Gemm allowed" for n in model.graph.node if n.op_type == "Gemm" and self.forbid_gemm]

    forbid_gemm = False

    def verification(self, qmodel, onnx_path, threads):
        exact = make_session(exact_integer_graph(onnx.load(str(onnx_path))), threads=threads, optimization="disable")
        return Verification(session=exact, runtime="toy: integer-exact evaluation on ONNX Runtime")


@pytest.fixture
def toy():
    target = targets.register(ToyTarget())
    yield target
    targets.unregister("toy")


def _checkpoint(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    path = tmp_path / "resnet20-toy.pth"
    torch.save(get_spec("resnet20").build().state_dict(), path)
    return path


ARGS = ["--method", "bns", "--synth-images", "24", "--synth-steps", "2", "--threads", "1", "--no-progress"]


def test_toy_target_runs_the_whole_path(toy, tmp_path, capsys):
    code = main([str(_checkpoint(tmp_path)), "--target", "toy", "--bits", "4", "--out", str(tmp_path / "t.onnx"), *ARGS])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "t.report.json").read_text())
    assert report["quant"]["target"] == "toy" and report["fidelity"]["agreement"] >= 0.99
    assert report["fidelity"]["runtime"].startswith("toy:") and "INT8" in report["quant"]["numerics"]
    model = onnx.load(str(tmp_path / "t.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # INT8 containers with zero point 0 everywhere, as the toy scheme says
    assert qdq and all(inits[n.input[2]].data_type == TensorProto.INT8 for n in qdq if n.input[2] in inits)
    assert not any(numpy_helper.to_array(inits[n.input[2]]).any() for n in qdq if n.input[2] in inits)
    # every conv output is quantized (quantize_outputs), unlike the tensorrt flavour
    readers = {i: n for n in model.graph.node for i in n.input}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(readers[c.output[0]].op_type in ("QuantizeLinear", "Relu", "Add", "Clip") for c in convs)
    # no int32 biases: biases stay float
    assert not any(t.data_type == TensorProto.INT32 for t in model.graph.initializer)


def test_toy_target_rules_reject_an_artifact(toy, tmp_path, capsys):
    toy.forbid_gemm = True
    code = main([str(_checkpoint(tmp_path)), "--target", "toy", "--out", str(tmp_path / "t.onnx"), *ARGS])
    assert code == 8 and "no Gemm allowed" in capsys.readouterr().err
    assert not (tmp_path / "t.onnx").exists() and (tmp_path / "t.rejected.onnx").exists()


def test_unknown_target_is_a_usage_error(tmp_path, capsys):
    from dfq.job import ExportJob
    from dfq.common.errors import UsageError

    with pytest.raises(UsageError, match="'toy' is unknown"):
        ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), target="toy")
    with pytest.raises(ValueError, match="already registered"):
        targets.register(type("Other", (ToyTarget,), {"name": "tensorrt"})())
    assert np.array_equal(np.array(targets.target_names()[:2]), ["onnxruntime", "tensorrt"])
