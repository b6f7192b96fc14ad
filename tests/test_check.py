"""The fidelity check: numerical ties are agreement, a wrong artifact still fails."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import dfq
from dfq.export.check import TIE_RTOL, CrossCheck, agrees, compare_on_batches, tensor_batches, verify_artifact
from dfq.export.onnx_export import export_onnx
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.quantize import quantize
from dfq.stages import MAX_RELATIVE_LOGIT_ERROR, fidelity_problem
from tests.tiny import qconfig, tiny_images, tiny_resnet


def test_agrees_counts_numerical_ties_only():
    ref = np.array([[1.0, 1.0 - 0.1 * TIE_RTOL, -3.0],     # classes 0 and 1 tied: either is right
                    [1.0, 1.0 - 10 * TIE_RTOL, -3.0],      # a real (if small) margin
                    [0.0, 0.0, 0.0],                       # all equal (an untrained model's logits)
                    [50.0, 49.0, 0.0]])
    q = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert agrees(q, ref).tolist() == [True, False, True, False]
    assert agrees(ref, ref).all()


def _wrong_scale(path, factor: float) -> None:
    """Reverse the per-channel weight scales of the artifact's classifier and multiply them by
    ``factor`` (scales applied to the wrong channels, and off by a factor)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and numpy_helper.to_array(inits[n.input[0]]).ndim == 2]
    scale = inits[weight_dq[-1].input[1]]
    wrong = numpy_helper.to_array(scale)[::-1] * np.float32(factor)
    scale.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(wrong), scale.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_a_wrong_scale_still_fails_the_check(tmp_path, target):
    teacher = tiny_resnet(2)
    with torch.no_grad():
        teacher.fc.weight.mul_(20)   # confident logits: agreement measures the artifact, not ties
    qm = quantize(teacher, qconfig(bits=8, target=target), tiny_images(2))
    calibrate(qm, tiny_images(64, seed=4))
    path = tmp_path / "m.onnx"
    export_onnx(qm, path)
    images = tiny_images(200, seed=9)

    def check():
        return verify_artifact(teacher, qm, path, dfq.get_target(target), tensor_batches(images, 50), threads=1)

    good = check()
    assert good["agreement"] == 1.0 and good["relative_logit_error"] < MAX_RELATIVE_LOGIT_ERROR / 10
    assert fidelity_problem(good) is None
    _wrong_scale(path, 3.0)
    bad = check()
    # the argmax of this confident model may survive the defect; the logits do not
    assert bad["relative_logit_error"] > MAX_RELATIVE_LOGIT_ERROR
    assert fidelity_problem(bad) is not None


class _FixedSession:
    """A session stand-in that returns fixed logits."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def get_inputs(self):
        return [type("I", (), {"name": "input"})()]

    def run(self, outputs, feed):
        return [self.logits]


def test_a_cross_check_is_compared_with_its_own_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()
    x = torch.randn(6, 3, 2, 2)
    fq = model(x).detach().numpy()
    other = fq.copy()
    other[:, 0] = fq.max(1) + 1.0          # the other runtime answers class 0 everywhere
    ref = lambda images: torch.from_numpy(other)   # noqa: E731 - its reference knows why
    checks = {"plain": CrossCheck(_FixedSession(other)),
              "explained": CrossCheck(_FixedSession(other), ref, "a reference that models it")}
    out = compare_on_batches(model, model, _FixedSession(fq), [(x, None)], cross_checks=checks)
    plain, explained = out["cross_checks"]["plain"], out["cross_checks"]["explained"]
    wrong = float(np.mean(fq.argmax(1) != 0))
    assert plain["agreement"] == pytest.approx(1 - wrong) and plain["reference"] == "fake-quant model (float)"
    assert explained["agreement"] == 1.0 and explained["reference"] == "a reference that models it"
    assert explained["agreement_float_fakequant"] == pytest.approx(1 - wrong)
    assert out["agreement_explained"] == 1.0 and out["agreement"] == 1.0


def test_cross_check_warning_names_fragile_answers():
    from dfq.report import _cross_check_warning

    c = {"agreement": 0.5, "reference": "r"}
    fragile = _cross_check_warning("openvino", c, {"agreement_with_fp": 0.5})
    assert "differ from its reference on 50.00%" in fragile and "fragile" in fragile and "only 50.00%" in fragile
    trained = _cross_check_warning("openvino", c, {"agreement_with_fp": 0.98})
    assert "differ from its reference on 50.00%" in trained and "fragile" not in trained
