import pytest
import torch

from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.equalize import channel_ranges
from dfq.pipeline.quantize import Precision, quantize
from tests.tiny import tiny_images, tiny_resnet, qconfig


def _spread_model():
    """The tiny ResNet with the block's mid activation channels 30x apart in range, and the
    statistics of that BatchNorm those of the tiny images (as a trained model's are of its data)."""
    model = tiny_resnet()
    seen = []
    hook = model.block.conv1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(tiny_images(64))
        hook.remove()
        bn = model.block.bn1
        bn.running_mean.copy_(seen[0].mean((0, 2, 3)))
        bn.running_var.copy_(seen[0].var((0, 2, 3)))
        bn.weight[::2] *= 30
        bn.bias[::2] *= 30
    return model


def test_only_conv_relu_conv_chains_with_one_reader_are_paired():
    qm = quantize(tiny_resnet(), qconfig(bits=4, equalize=True), tiny_images(2))
    # stem -> ReLU6 (not scale-equivariant), down -> ReLU -> depthwise (grouped), block.conv2 -> Add
    assert [(e.producer, e.consumer) for e in qm.equalized] == [("block.conv1", "block.conv2")]
    assert quantize(tiny_resnet(), qconfig(bits=4), tiny_images(2)).equalized == []     # off by default


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_equalised_float_model_computes_the_same_function(target):
    model, x = _spread_model(), tiny_images(16)
    qm = quantize(model, qconfig(target, bits=4, equalize=True), x[:2])
    assert [(e.producer, e.consumer) for e in qm.equalized] == [("block.conv1", "block.conv2")]
    qm.set_enabled(weights=False, activations=False)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=1e-4, atol=1e-4)


def test_channel_ranges_are_equal_after_equalisation():
    model = _spread_model()
    plain = quantize(model, qconfig(bits=4, equalize=False), tiny_images(2))
    eq = quantize(model, qconfig(bits=4, equalize=True), tiny_images(2))
    before = channel_ranges(plain.module.get_submodule("block.conv1"))
    after = channel_ranges(eq.module.get_submodule("block.conv1"))
    assert float(before.max() / before.min()) > 20
    torch.testing.assert_close(after, torch.full_like(after, float(after.mean())), rtol=1e-4, atol=0)
    assert eq.equalized[0].spread == pytest.approx(float(before.max() / before.min()), rel=1e-4)


def test_eight_bit_activations_are_left_alone():
    model = _spread_model()
    for bits in ("8", "W4A8"):
        p = Precision.parse(bits)
        qm = quantize(model, qconfig(bits=p.weights, act_bits=p.activations, equalize=True), tiny_images(2))
        assert qm.equalized == []
    qm = quantize(model, qconfig(bits=4, keep_8bit=("block.conv2",), equalize=True), tiny_images(2))
    assert qm.equalized == []


def _only_mid_activation_quantized(qm):
    """Every quantizer off but the 4-bit one in front of block.conv2."""
    qm.set_enabled(weights=False, activations=False)
    node = next(n for n in qm.module.graph.nodes if n.target == "block.conv2")
    qm.module.get_submodule(str(input_quantizer_of(qm.module, node).target)).enabled = True


def test_equalisation_lowers_the_four_bit_activation_error():
    """The block's mid activation on one per-tensor 4-bit grid loses its small channels unless equalised."""
    model, x = _spread_model(), tiny_images(64)
    errors = {}
    for eq in (False, True):
        # one range rule for both (``auto`` may keep a different rule for each, which is not under test)
        qm = quantize(model, qconfig(bits=4, equalize=eq, calibration="mse"), x[:2])
        calibrate(qm, x[:32], holdout=x[32:48], seed=0)
        _only_mid_activation_quantized(qm)
        with torch.no_grad():
            errors[eq] = float((qm(x[48:]) - model(x[48:])).pow(2).mean())
    assert errors[True] < 0.7 * errors[False]


def test_dead_channels_get_a_bounded_scale():
    model = tiny_resnet()
    with torch.no_grad():
        model.block.bn1.bias[0] = -10.0          # beta + 3|gamma| < 0: the statistics call it dead
    qm = quantize(model, qconfig(bits=4, equalize=True), tiny_images(2))
    assert qm.equalized[0].spread <= 1e3 * (1 + 1e-4)
