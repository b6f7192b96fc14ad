"""The OpenVINO reference (export.openvino_reference): which quantizers OpenVINO fuses away, and
that the reference, not the plain fake-quant model, is what OpenVINO computes on the artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq.export.onnx_export import export_onnx
from dfq.export.openvino_reference import OpenVINOReference, fused_add_quantizers
from dfq.export.runtimes import get_runtime
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.qmodules import QuantConv2d
from dfq.pipeline.quantize import quantize
from tests.tiny import qconfig, tiny_images, tiny_resnet

torch.set_num_threads(1)


def _quantized(bits: int, target: str = "onnxruntime"):
    qm = quantize(tiny_resnet(3, width=16), qconfig(bits=bits, target=target), tiny_images(2))
    calibrate(qm, tiny_images(64, seed=5))
    return qm


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_only_the_conv_output_in_front_of_the_residual_add_is_skipped(target):
    qm = _quantized(8, target)
    names = fused_add_quantizers(qm)
    assert len(names) == 1
    node = next(n for n in qm.module.graph.nodes if n.op == "call_module" and str(n.target) == names[0])
    src = qm.module.get_submodule(str(node.args[0].target))
    assert isinstance(src, QuantConv2d) and src is qm.module.get_submodule("block.conv2")


def test_the_reference_leaves_the_model_alone():
    qm = _quantized(8)
    ref = OpenVINOReference(qm)
    x = tiny_images(8, seed=2)
    assert all(q.enabled for q in qm.act_quantizers().values())
    assert not torch.equal(ref(x), qm(x))          # one requantization fewer
    assert type(ref.module.get_submodule(ref.skipped[0])).__name__ == "ClampOnly"
    assert "1 quantizers" in ref.description


def test_openvino_computes_the_reference_not_the_fake_quant_model(tmp_path):
    ov = get_runtime("openvino")
    if not ov.status()[0]:
        pytest.skip(f"OpenVINO cannot load here: {ov.status()[1]}")
    qm = _quantized(4)
    path = tmp_path / "q.onnx"
    export_onnx(qm, path, fp_path=tmp_path / "fp.onnx")
    x = tiny_images(256, seed=11)
    out = ov.session(path, 1).run(None, {"input": x.numpy()})[0]
    ref = ov.reference(qm)[0](x).numpy()
    fq = qm(x).detach().numpy()
    err_ref, err_fq = np.abs(out - ref).mean(), np.abs(out - fq).mean()
    assert err_ref < 0.2 * err_fq, (err_ref, err_fq)


def test_openvino_clamps_the_fused_conv_output_to_its_quantizer_range(tmp_path):
    """With the range of the conv output in front of the Add made tight (a third of its calibrated
    step, so a good share of the outputs clip), OpenVINO matches the reference that clamps, not the
    one that leaves the conv output unbounded."""
    ov = get_runtime("openvino")
    if not ov.status()[0]:
        pytest.skip(f"OpenVINO cannot load here: {ov.status()[1]}")
    qm = _quantized(4)
    name = fused_add_quantizers(qm)[0]
    with torch.no_grad():
        qm.module.get_submodule(name).scale.mul_(1 / 3)
    path = tmp_path / "q.onnx"
    export_onnx(qm, path, fp_path=tmp_path / "fp.onnx")
    x = tiny_images(256, seed=11)
    out = ov.session(path, 1).run(None, {"input": x.numpy()})[0]
    ref = OpenVINOReference(qm)
    clamped = ref(x).numpy()
    ref.module.get_submodule(name).forward = lambda t: t          # the same reference without the clamp
    unbounded = ref(x).numpy()
    err_clamped, err_unbounded = np.abs(out - clamped).mean(), np.abs(out - unbounded).mean()
    assert err_clamped < 0.2 * err_unbounded, (err_clamped, err_unbounded)
