"""The request's own command line, as a user types it: ``dfq-export resnet18.pth --bits 4 --out
r18.engine`` (with a tiny budget appended) on a torchvision resnet18 state_dict."""
import json

import onnx
import pytest
import torch
import torchvision

from dfq.cli import main
from dfq.export.rules import tensorrt_violations
from dfq.export.tensorrt import tensorrt_status

TINY_BUDGET = ["--synth-images", "16", "--synth-steps", "1", "--recon-iters", "2", "--threads", "2",
               "--no-progress"]


def test_mission_command_writes_a_tensorrt_valid_onnx(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    monkeypatch.chdir(tmp_path)
    code = main(["resnet18.pth", "--bits", "4", "--out", "r18.engine", *TINY_BUDGET])
    captured = capsys.readouterr()
    trt_here = tensorrt_status()[0]
    assert code == (0 if trt_here else 9), captured.err
    model = onnx.load("r18.onnx")
    assert tensorrt_violations(model) == []
    # TensorRT's flavour: INT8 Q/DQ with zero points 0, no space-to-depth rewrite
    assert all(n.op_type != "SpaceToDepth" for n in model.graph.node)
    report = json.loads((tmp_path / "r18.report.json").read_text())
    assert report["quant"]["target"] == "tensorrt" and report["rule_violations"] == []
    assert report["job"]["method"] == "recon" and report["reconstruction"]["config"]["iterations"] == 2
    assert not (tmp_path / "r18.finetune.ckpt").exists()
    if not trt_here:
        # the printed command builds that very file, with the input shapes TensorRT needs
        assert "trtexec --onnx=r18.onnx --saveEngine=r18.engine --stronglyTyped" in captured.err
        assert "--minShapes=input:1x3x224x224" in captured.err and "--maxShapes=input:32x3x224x224" in captured.err
        assert report["status"] == "engine not built"
    else:
        pytest.importorskip("tensorrt")
        assert (tmp_path / "r18.engine").stat().st_size > 0
