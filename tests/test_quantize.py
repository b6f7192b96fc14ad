import pytest
import torch
from torch import nn

from dfq.common.errors import UnsupportedModelError
from dfq.pipeline.bias_correction import bias_correct
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.qmodules import QuantConv2d, QuantLinear, fold_bn_into_conv
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.graph import is_add, module_of, source_of
from dfq.pipeline.quantize import quantize
from tests.tiny import randomize_bn, tiny_images, tiny_resnet, qconfig


def test_bn_folding_exact_in_float64():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6))).double()[0].eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w, b = fold_bn_into_conv(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    folded = nn.functional.conv2d(x, w, b, padding=1)
    ref = bn(conv(x))
    torch.testing.assert_close(folded, ref, rtol=0, atol=1e-12)


def test_quant_conv_tune_mode_equals_conv_bn_when_quantizers_off():
    model = tiny_resnet()
    x = tiny_images(8)
    qm = quantize(model, qconfig(bits=8), x[:2])
    qm.set_enabled(weights=False, activations=False)
    with torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=1e-5, atol=1e-5)
    # BN folded away, pads merged, every layer quantized
    mods = dict(qm.module.named_modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ZeroPad2d, nn.Conv2d, nn.Linear)) for m in mods.values())
    assert mods["down"].pads == (0, 0, 1, 1)


def test_layer_policy_first_and_last_at_8_bits():
    qm = quantize(tiny_resnet(), qconfig(bits=4), tiny_images(2))
    assert qm.layer_bits["stem"] == 8 and qm.layer_bits["fc"] == 8
    assert qm.layer_bits["block.conv1"] == 4
    assert qm.module.get_submodule("stem").weight_quantizer.bits == 8
    qm2 = quantize(tiny_resnet(), qconfig(bits=4, keep_8bit=("block.*",)), tiny_images(2))
    assert qm2.layer_bits == {"stem": 4, "block.conv1": 8, "block.conv2": 8, "down": 4, "dw": 4, "fc": 4}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_activation_quantizer_placement_and_sign(target):
    qm = quantize(tiny_resnet(), qconfig(bits=8, target=target), tiny_images(2))
    aq = qm.act_quantizers()
    # network input is signed; post-ReLU/ReLU6 tensors unsigned; the residual branch before the
    # add is signed (conv output, no activation)
    assert aq["aq_x"].signed
    assert not aq["aq_stem_act"].signed and aq["aq_stem_act"].upper_bound == 6.0
    assert aq["aq_block_conv2"].signed
    assert not aq["aq_block_relu2"].signed
    expected = {"aq_x", "aq_stem_act", "aq_block_relu1", "aq_block_conv2", "aq_block_relu2",
                "aq_down_act", "aq_gap"}
    # ONNX Runtime also needs a Q after the last conv (feeding only the pooling) so it fuses
    assert set(aq) == (expected | {"aq_dw_act"} if target == "onnxruntime" else expected)
    if target == "tensorrt":
        assert aq["aq_stem_act"].grid.qmax == 127
    else:
        assert aq["aq_stem_act"].grid.qmax == 255
        assert qm.module.get_submodule("down").bias_mode == "int32"


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_residual_adds_read_residual_bits_and_layers_a_requantization(target):
    qm = quantize(tiny_resnet(), qconfig(bits=4, target=target, residual_bits=8), tiny_images(2))
    aq = qm.act_quantizers()
    gm = qm.module
    assert aq["aq_block_conv2"].bits == 8          # the conv output that only the Add reads
    # the block input (stem -> max-pool) is read by block.conv1 and by the shortcut Add: 8 bits on
    # the tensor, and a 4-bit requantization of it that only the conv reads
    assert aq["aq_stem_act"].bits == 8 and aq["aq_stem_act_a4"].bits == 4
    conv1 = next(n for n in gm.graph.nodes if n.target == "block.conv1")
    assert input_quantizer_of(gm, conv1).target == "aq_stem_act_a4"
    assert input_quantizer_of(gm, conv1).args[0].target == "pool"    # after the max-pool, which passes codes on
    add = next(n for n in gm.graph.nodes if is_add(n))
    assert {module_of(gm, source_of(gm, a)).bits for a in add.args[:2]} == {8}
    assert qm.layer_precision["block.conv1"].activations == 4
    # tensors that only layers read stay at the layers' bits
    assert aq["aq_block_relu1"].bits == 4 and aq["aq_block_relu2"].bits == 4
    for name, layer in qm.layers().items():
        assert layer.weight_quantizer.bits == qm.layer_bits[name]
    default = quantize(tiny_resnet(), qconfig(bits=4, target=target), tiny_images(2)).act_quantizers()
    assert {n: q.bits for n, q in default.items()} == {n: q.bits for n, q in aq.items()}   # 8 is the default
    narrow = quantize(tiny_resnet(), qconfig(bits=4, target=target, residual_bits=4), tiny_images(2)).act_quantizers()
    assert "aq_stem_act_a4" not in narrow and narrow["aq_stem_act"].bits == 4 and narrow["aq_block_conv2"].bits == 4
    # W4A8: the layers read 8 bits already, nothing to requantize
    w4a8 = quantize(tiny_resnet(), qconfig(bits=4, act_bits=8, target=target), tiny_images(2)).act_quantizers()
    assert "aq_stem_act_a4" not in w4a8 and all(q.bits == 8 for q in w4a8.values())


def test_calibration_picks_measured_best_and_sets_positive_scales():
    qm = quantize(tiny_resnet(), qconfig(bits=4), tiny_images(2))
    res = calibrate(qm, tiny_images(64))
    assert set(res.scores) == {"minmax", "percentile", "mse"}
    assert res.method == min(res.scores, key=res.scores.get)
    assert all(float(q.scale.detach()) > 0 for q in qm.act_quantizers().values())
    # ReLU6 outputs never get a range wider than 6
    q = qm.act_quantizers()["aq_stem_act"]
    assert float(q.scale.detach()) * q.grid.qmax <= 6.0 + 1e-6


def test_calibration_scores_the_rules_with_the_weights_in_float():
    """The rules set activation ranges, so they are compared with only the activations quantized:
    the kept rule's score is the held-out KL of the model with its weight quantizers off."""
    from dfq.pipeline.calibrate import batched_logits, output_kl

    images = tiny_images(64)
    qm = quantize(tiny_resnet(), qconfig(bits=4), images[:2])
    res = calibrate(qm, images)
    holdout = images[-16:]
    qm.set_enabled(weights=False, activations=False)
    fp = batched_logits(qm.module, holdout, 64)
    qm.set_enabled(weights=False, activations=True)
    acts_only = output_kl(fp, batched_logits(qm.module, holdout, 64))
    qm.set_enabled(True, True)
    both = output_kl(fp, batched_logits(qm.module, holdout, 64))
    assert abs(res.scores[res.method] - acts_only) <= 1e-4 * acts_only
    assert abs(both - acts_only) > 0.01 * acts_only   # the 4-bit weights do move the KL


def test_calibration_with_fewer_than_eight_images_scores_on_them():
    # the held-out quarter needs 8 images; with fewer the rules are scored on the same images
    qm = quantize(tiny_resnet(), qconfig(bits=8), tiny_images(2))
    res = calibrate(qm, tiny_images(4))
    assert set(res.scores) == {"minmax", "percentile", "mse"} and res.num_images == 4


def test_keep_8bit_patterns_one_matcher():
    from dfq.pipeline.quantize import layer_matches, unmatched_patterns

    names = ["stem", "block.conv1", "block.conv2", "fc"]
    assert unmatched_patterns(["@first", "@last", "block.*", "blok.*", "*dw*"], names) == ["blok.*", "*dw*"]
    assert layer_matches("stem", "@first", {"@first": "stem"}) and not layer_matches("fc", "@first", {"@first": "stem"})
    assert not layer_matches("Block.conv1", "block.*", {})      # case-sensitive, as module names are
    qm = quantize(tiny_resnet(), qconfig(bits=4, keep_8bit=("@first", "block.*")), tiny_images(2))
    assert {n for n, b in qm.layer_bits.items() if b == 8} == {"stem", "block.conv1", "block.conv2"}


def test_bits_validation():
    with pytest.raises(ValueError, match="--bits 3"):
        qconfig(bits=3)
    with pytest.raises(ValueError):
        qconfig(target="tflite")


def test_free_standing_batchnorm_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.bn(x))

    with pytest.raises(UnsupportedModelError, match="does not directly follow a Conv2d"):
        quantize(Bad().eval(), qconfig(), tiny_images(2))


def test_unsupported_layer_is_named():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.raises(UnsupportedModelError, match="'norm' \\(GroupNorm\\)"):
        quantize(Bad().eval(), qconfig(), tiny_images(2))


def test_near_dead_channel_keeps_its_int32_bias():
    # a channel whose BN gamma is ~0 has weights ~1e-9 and a bias of order 1; its output is the
    # bias. Without a floor on its step, bias / (s_in * s_w) overflows int32 and the bias is lost.
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight[2] = 1e-9
        bn.bias[2] = 1.5
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4).eval(), nn.ReLU()).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qm = quantize(model, qconfig(bits=8, target="onnxruntime", keep_8bit=()), x[:2])
    calibrate(qm, x, holdout=x, batch_size=4)
    layer = qm.module.get_submodule("0")
    assert layer.bias_mode == "int32"
    s = layer.weight_quantizer.scale.detach()
    assert s[2] >= s.max() * 1e-4 * 0.999
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        qm(x)
    handle.remove()
    torch.testing.assert_close(seen[0][:, 2], torch.full_like(seen[0][:, 2], 1.5), atol=1e-3, rtol=0)


def _layer_means(qm, images):
    means = {}
    layers = {n: m for n, m in qm.module.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    hs = [m.register_forward_hook(lambda mod, i, o, n=n: means.__setitem__(n, o.mean(dim=[0] + list(range(2, o.dim())))))
          for n, m in layers.items()]
    with torch.no_grad():
        qm.module(images)
    for h in hs:
        h.remove()
    return means


def test_bias_correction_restores_every_layers_mean():
    """After the correction, the quantized model's per-channel layer outputs have the FP model's
    means on the correction images (float biases: exactly up to float error)."""
    qm = quantize(tiny_resnet(2), qconfig(bits=4, target="tensorrt"), tiny_images(2))
    calibrate(qm, tiny_images(64))
    images = tiny_images(48, seed=7)
    qm.set_enabled(False, False)
    fp = _layer_means(qm, images)
    qm.set_enabled(True, True)
    before = _layer_means(qm, images)
    res = bias_correct(qm, images)
    after = _layer_means(qm, images)
    assert res.applied and res.layers == len(fp) and res.num_images == 48 and res.kl_before is None
    gap_before = max(float((before[n] - fp[n]).abs().max()) for n in fp)
    gap_after = max(float((after[n] - fp[n]).abs().max()) for n in fp)
    assert gap_before > 0.01 and gap_after < 1e-4
    assert res.max_abs_shift > 0.01


@pytest.mark.parametrize("ratio, kept", [(1.0, False), (1.5, False), (2.5, True), (None, True)])
def test_bias_correction_is_undone_when_the_heldout_kl_rises_past_the_allowed_ratio(monkeypatch, ratio, kept):
    import dfq.pipeline.bias_correction as cal

    qm = quantize(tiny_resnet(2), qconfig(bits=4), tiny_images(2))
    calibrate(qm, tiny_images(64))
    state = {k: v.clone() for k, v in qm.module.state_dict().items()}
    kls = iter([1.0, 2.0])
    monkeypatch.setattr(cal, "output_kl", lambda fp, q: next(kls))
    res = cal.bias_correct(qm, tiny_images(32, seed=3), holdout=tiny_images(8, seed=4), max_kl_ratio=ratio)
    assert res.applied is kept and res.max_kl_ratio == ratio and (res.kl_before, res.kl_after) == (1.0, 2.0)
    changed = [k for k, v in qm.module.state_dict().items() if not torch.equal(v, state[k])]
    assert bool(changed) is kept
    assert all(k.endswith("bn_bias") or k.endswith(".bias") for k in changed), changed


def test_bias_correction_is_judged_against_the_given_fp_logits(monkeypatch):
    """After fine-tuning the quantizers-off model is not the FP model: the KL that decides uses
    the FP logits passed in."""
    import dfq.pipeline.bias_correction as cal

    qm = quantize(tiny_resnet(2), qconfig(bits=4), tiny_images(2))
    calibrate(qm, tiny_images(64))
    holdout = tiny_images(8, seed=4)
    marker = torch.full((8, 10), 7.0)
    seen = []
    monkeypatch.setattr(cal, "output_kl", lambda fp, q: seen.append(fp) or float(len(seen)))
    res = cal.bias_correct(qm, tiny_images(32, seed=3), holdout=holdout, fp_logits=marker)
    assert len(seen) == 2 and all(t is marker for t in seen) and not res.applied


def test_eval_identities_are_removed_at_trace_time():
    """torchvision's StochasticDepth (EfficientNet-B0/B1) and functional dropout are the identity in
    eval mode; FX traces into their functions, which the exporter must never see."""
    import torchvision
    from torch import nn

    from dfq.export.onnx_export import build_onnx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.sd = torchvision.ops.StochasticDepth(0.2, "row")
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = y + self.sd(y)
            y = torch.nn.functional.dropout(y, 0.3, training=self.training)
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))

    model = randomize_bn(Net()).eval()
    qm = quantize(model, qconfig(bits=8), tiny_images(2))
    targets = {n.target for n in qm.module.graph.nodes if n.op == "call_function"}
    assert torchvision.ops.stochastic_depth not in targets and torch.nn.functional.dropout not in targets
    assert not {n.op_type for n in build_onnx(qm).fp.graph.node} & {"Dropout"}
    calibrate(qm, tiny_images(16))
    with torch.no_grad():
        qm.set_enabled(False, False)
        assert torch.allclose(qm.module(tiny_images(4)), model(tiny_images(4)), atol=1e-5)
