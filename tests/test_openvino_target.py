"""The ``openvino`` target: the artifact is verified on OpenVINO against its reference, its sigmoid
gates stay in float (unlike the onnxruntime flavour's), and without a usable OpenVINO the target
is refused before any work starts."""
import json

import pytest
import torch

from dfq.cli import main
from dfq.common.errors import UsageError
from dfq.export.runtimes import get_runtime
from dfq.pipeline.graph import is_sigmoid, module_of
from dfq.pipeline.qmodules import ActQuantizer
from dfq.pipeline.quantize import quantize
from tests.test_ort_reference import _TinySiLUNet
from tests.test_targets import ARGS, _checkpoint
from tests.tiny import qconfig, randomize_bn, tiny_images

usable, why = get_runtime("openvino").status()
needs_openvino = pytest.mark.skipif(not usable, reason=f"OpenVINO cannot load here: {why}")


def _quantized_sigmoid_outputs(target: str) -> int:
    torch.manual_seed(0)
    qm = quantize(randomize_bn(_TinySiLUNet()), qconfig(bits=8, target=target), tiny_images(2))
    gm = qm.module
    return sum(isinstance(module_of(gm, n), ActQuantizer) and is_sigmoid(gm, n.args[0]) for n in gm.graph.nodes)


def test_sigmoid_gates_are_quantized_for_onnxruntime_only():
    assert _quantized_sigmoid_outputs("onnxruntime") == 4    # three SiLUs and the squeeze-excitation gate
    assert _quantized_sigmoid_outputs("openvino") == 0


@needs_openvino
def test_openvino_target_verifies_on_openvino(tmp_path, capsys):
    code = main([str(_checkpoint(tmp_path)), "--target", "openvino", "--bits", "8", "--out", str(tmp_path / "o.onnx"),
                 *ARGS])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o.report.json").read_text())
    f = report["fidelity"]
    assert report["quant"]["target"] == "openvino" and f["runtime"].startswith("openvino")
    assert "in front of residual Adds only clamp" in f["reference"] and f["agreement"] >= 0.99
    assert [r["backend"] for r in report["latency"]][:1] == ["openvino"]


def test_openvino_target_without_openvino_is_a_usage_error(monkeypatch):
    from dfq.job import ExportJob

    monkeypatch.setattr(type(get_runtime("openvino")), "status", lambda self: (False, "no wheel for this CPU"))
    with pytest.raises(UsageError, match="not usable here: no wheel for this CPU"):
        ExportJob(model="m.pth", out="x.onnx", target="openvino")
