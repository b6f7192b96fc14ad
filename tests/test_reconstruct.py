"""Layer-wise reconstruction with learned rounding: the rounding starts at the float weight, the
learned codes are baked so that the ordinary exporter reproduces them, and the layer outputs get
closer to the FP model's."""
import pytest
import torch

from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.quantize import quantize
from dfq.pipeline.reconstruct import ReconstructConfig, _LearnedRounding, reconstruct
from tests.tiny import qconfig, tiny_images, tiny_resnet


def test_learned_rounding_starts_at_the_float_weight():
    w = torch.randn(4, 3, 3, 3)
    scale = w.abs().flatten(1).amax(1) / 7
    from dfq.kernels.fake_quant import Grid

    r = _LearnedRounding(w, scale, Grid(-8, 7))
    soft = r(w)
    # h(V) = frac(w/s), clamped to [0.01, 0.99]: the soft weight is the float weight up to that clamp
    assert torch.allclose(soft, w, atol=0.011 * float(scale.max()))
    assert r.regulariser(2.0) > 0


def _calibrated(n: int = 64, **fields):
    """The tiny ResNet, ``n`` images, and its W4A4 quantized copy calibrated on them."""
    model = tiny_resnet(4)
    images = tiny_images(n, seed=3)
    qm = quantize(model, qconfig(bits=4, **fields), images[:2])
    calibrate(qm, images)
    return model, images, qm


def _layer_mse(qm, model, images):
    """Per-layer output MSE of the quantized model against the FP model (BN folded, quantizers off)."""
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, []).append(o.detach()))
             for n, m in qm.layers().items()]
    with torch.no_grad():
        qm.set_enabled(False, False)
        qm.module(images)
        qm.set_enabled(True, True)
        qm.module(images)
    for h in hooks:
        h.remove()
    return {n: float((v[1] - v[0]).pow(2).mean()) for n, v in outs.items()}


def _assert_weights_on_grid(qm):
    """The folded float weight of every reconstructed layer sits on its grid: round-to-nearest (what
    the exporter does) gives back the learned codes exactly."""
    for name in ("block.conv1", "block.conv2", "down", "dw"):
        layer = qm.module.get_submodule(name)
        w = layer.folded()[0].detach()
        s = layer.weight_quantizer.scale.detach().reshape(-1, 1, 1, 1)
        assert torch.allclose(w / s, torch.round(w / s), atol=1e-3)


@pytest.mark.parametrize("options", [{}, {"fisher": "element"}, {"flip": True}, {"clip_loss": True}],
                         ids=["plain", "fisher", "flip", "clip"])
def test_reconstruction_bakes_codes_the_exporter_reproduces_and_lowers_the_error(options):
    model, images, qm = _calibrated()
    before = _layer_mse(qm, model, images)
    res = reconstruct(qm, images, ReconstructConfig(iterations=200, batch=16, **options), progress=False)
    assert res.layers == 4 and 0 < res.flipped < 0.5 and res.last_loss < res.first_loss
    assert res.images == len(images) * (2 if options.get("flip") else 1)   # flip: each image and its mirror
    _assert_weights_on_grid(qm)
    after = _layer_mse(qm, model, images)
    assert sum(after.values()) < sum(before.values())


def test_learned_steps_move_and_are_written_back_with_codes_on_their_grid():
    model, images, qm = _calibrated()
    calibrated = {n: m.weight_quantizer.scale.detach().clone() for n, m in qm.layers().items()}
    before = _layer_mse(qm, model, images)
    cfg = ReconstructConfig(iterations=200, batch=16, learn_step=True, step_lr=1e-2)
    res = reconstruct(qm, images, cfg, progress=False)
    assert res.layers == 4 and res.last_loss < res.first_loss
    moved = [n for n, m in qm.layers().items() if m.weight_quantizer.bits < 8
             and not torch.allclose(m.weight_quantizer.scale, calibrated[n])]
    assert len(moved) == 4          # every 4-bit layer's steps were learned and written back
    _assert_weights_on_grid(qm)     # ... and its baked weights sit on the new steps' grid
    assert sum(_layer_mse(qm, model, images).values()) < sum(before.values())


def test_clip_loss_sees_the_clipped_values_and_the_unclipped_gradient():
    from dfq.pipeline.graph import layer_nodes
    from dfq.pipeline.recon_loss import clip_straight_through, output_clip

    x = torch.tensor([-2.0, 0.5, 7.0], requires_grad=True)
    y = clip_straight_through(x, 6.0)
    assert y.tolist() == [0.0, 0.5, 6.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]   # an output below the clip still learns upwards
    _, _, qm = _calibrated(8)
    clips = {str(n.target): output_clip(qm.module, n) for n in layer_nodes(qm.module)}
    # ReLU and ReLU6 after a conv; the conv before the residual Add and the classifier have no clip
    assert clips["block.conv1"] == clips["down"] == float("inf") and clips["dw"] == clips["stem"] == 6.0
    assert clips["block.conv2"] is None and clips["fc"] is None


def test_diagonal_form_is_the_output_error_on_uncorrelated_inputs():
    """sum((dW)^2 * energy) equals the conv's output error (summed over channels, per position) on
    inputs whose channels are independent with those energies, grouped and depthwise convs too."""
    from torch import nn

    from dfq.pipeline.qmodules import QuantConv2d
    from dfq.pipeline.recon_loss import input_energy

    gen = torch.Generator().manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(5, 3, 1)):
        layer = QuantConv2d(conv, None, 4)
        std = torch.rand(conv.in_channels, generator=gen) * 2 + 0.1
        x = torch.randn(2000, conv.in_channels, 12, 12, generator=gen) * std[None, :, None, None]
        dw = torch.randn(layer.weight.shape, generator=gen) * 0.1
        diagonal = float((dw.pow(2) * input_energy(layer, x)).sum())
        sampled = float(torch.nn.functional.conv2d(x, dw, groups=conv.groups).pow(2).sum(1).mean())
        assert abs(diagonal - sampled) < 0.02 * sampled, (diagonal, sampled)


def test_diag_mix_one_rounds_to_nearest_and_zero_is_the_plain_loss():
    """With the whole loss diagonal, the best rounding is the nearest one (almost nothing flips);
    out of range it is refused."""
    model, images, qm = _calibrated()
    res = reconstruct(qm, images, ReconstructConfig(iterations=200, batch=16, diag_mix=1.0), progress=False)
    assert res.flipped < 0.02
    _assert_weights_on_grid(qm)
    with pytest.raises(ValueError, match="diag_mix"):
        ReconstructConfig(diag_mix=1.5)


def test_recon_recipe_end_to_end(tmp_path):
    from dfq.job import ExportJob
    from dfq.pipeline.models import get_spec
    from dfq.run import run_export

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20-recon.pth"
    torch.save(get_spec("resnet20").build().state_dict(), ckpt)
    job = ExportJob(model=str(ckpt), out=str(tmp_path / "r.onnx"), bits=4, method="recon", budget="fast", threads=1,
                    latency_seconds=0.05, progress=False, synth_overrides={"num_images": 32, "steps": 2},
                    reconstruct_overrides={"iterations": 20, "batch": 8})
    report = run_export(job, log=lambda m: None).to_dict()
    rec = report["reconstruction"]
    assert rec["result"]["layers"] == 18 and rec["kept"] == (rec["heldout_kd"]["after"] < rec["heldout_kd"]["before"])
    assert report["fidelity"]["agreement"] >= 0.99 and not report["finetune"]["ran"]


def test_conv_windows_are_slices_of_the_whole_output():
    """A crop's output, computed from the once-padded input, is exactly the same window of the
    layer's own output (strided, asymmetric padding, depthwise)."""
    from torch import nn

    from dfq.pipeline.qmodules import QuantConv2d
    from dfq.pipeline.reconstruct import _Windows

    for conv, pads in ((nn.Conv2d(4, 6, 3, stride=2, padding=1), (0, 0, 1, 1)),
                       (nn.Conv2d(6, 6, 5, padding=2, groups=6, dilation=1), None)):
        layer = QuantConv2d(conv, nn.BatchNorm2d(conv.out_channels).eval(), 4, pads=pads).eval()
        x = torch.randn(3, conv.in_channels, 37, 37)
        with torch.no_grad():
            y = layer(x)
            weight = torch.rand(y.shape)
            data = _Windows(layer, x, x + 1, y, crop=7, weight=weight)
            assert data.conv
            gen = torch.Generator().manual_seed(0)
            for _ in range(5):
                xq, xf, target, w = data.sample(torch.tensor([2, 0]), gen)
                assert target.shape[2:] == (7, 7) and xf.shape == xq.shape
                assert torch.allclose(data.forward(xq, None), target, atol=1e-5)
                # the element weights are the same window of the same images as the target
                hits = [(oy, ox) for oy in range(y.shape[2] - 6) for ox in range(y.shape[3] - 6)
                        if torch.equal(y[[2, 0], :, oy:oy + 7, ox:ox + 7], target)]
                assert any(torch.equal(weight[[2, 0], :, oy:oy + 7, ox:ox + 7], w) for oy, ox in hits)


def _logit_mse(qm, model, images):
    with torch.no_grad():
        return float((qm.module(images) - model(images)).pow(2).mean())


def test_block_reconstruction_bakes_grid_codes_and_lowers_the_output_error():
    # a 4-bit residual stream: with the default 8-bit one the tiny model's logit error before
    # reconstruction (4.3e-6) is at the level 64 images cannot resolve, and at this seed block
    # reconstruction ends above it (9.2e-6) although every layer's output error falls
    model, images, qm = _calibrated(residual_bits=4)
    before = _logit_mse(qm, model, images)
    res = reconstruct(qm, images, ReconstructConfig(iterations=200, batch=16, granularity="block"), progress=False)
    assert res.layers == 4 and 0 < res.flipped < 0.5 and res.last_loss < res.first_loss
    _assert_weights_on_grid(qm)
    # the block's activation quantizers are back in place
    assert all(type(m).__name__ == "ActQuantizer" for m in qm.act_quantizers().values())
    assert _logit_mse(qm, model, images) < before


def test_default_method_follows_the_precision():
    from dfq.job import ExportJob
    from dfq.pipeline.recipes import default_method

    assert default_method(8, 8) == "acq" and default_method(4, 4) == default_method(4, 8) == "recon"
    job = lambda **kw: ExportJob(model="m.pth", out="x.onnx", **kw)  # noqa: E731
    assert job(bits=8).method == "acq" and job(bits=4).method == "recon"
    assert job(bits=4, act_bits=8).method == "recon" and job(bits=4, method="acq").method == "acq"


def test_cli_names_the_default_method_when_an_option_does_not_apply(tmp_path, capsys):
    from dfq.cli import main

    out = tmp_path / "x.onnx"
    assert main(["m.pth", "--bits", "4", "--steps", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "W4A4's default method, recon, does not fine-tune" in err and "--method acq" in err
    assert main(["m.pth", "--bits", "8", "--method", "bns", "--recon-iters", "5", "--out", str(out)]) == 2
    assert "--recon-iters does not apply" in capsys.readouterr().err
    assert main(["m.pth", "--bits", "4", "--recon-iters", "0", "--out", str(out)]) == 2
    assert "--recon-iters 0 is too small" in capsys.readouterr().err
    assert not out.exists()


def test_cli_low_bits_default_to_recon_with_its_iterations(tmp_path):
    import json

    from dfq.cli import main
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20-default.pth"
    torch.save(get_spec("resnet20").build().state_dict(), ckpt)
    assert main([str(ckpt), "--bits", "4", "--budget", "fast", "--synth-images", "24", "--synth-steps", "2",
                 "--recon-iters", "5", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r.onnx")]) == 0
    report = json.loads((tmp_path / "r.report.json").read_text())
    assert report["job"]["method"] == "recon" and not report["finetune"]["ran"]
    cfg = report["reconstruction"]["config"]
    assert cfg["iterations"] == 5 and abs(cfg["lr"] - 3 / 5) < 1e-12      # the step size follows the schedule


def test_learned_activation_steps_move_once_each_and_the_export_arithmetic_holds():
    """With act_step_lr every 4-bit activation quantizer read directly by a reconstructed layer gets
    a learned step (by its first reader), the weights still sit on their grid, and the layers' error
    falls; a negative rate is refused."""
    model, images, qm = _calibrated()
    calibrated = {n: q.scale.detach().clone() for n, q in qm.act_quantizers().items()}
    before = _layer_mse(qm, model, images)
    res = reconstruct(qm, images, ReconstructConfig(iterations=200, batch=16, act_step_lr=1e-2), progress=False)
    assert res.last_loss < res.first_loss
    moved = [n for n, q in qm.act_quantizers().items() if not torch.allclose(q.scale, calibrated[n])]
    assert moved and all(not q.scale.requires_grad for q in qm.act_quantizers().values())
    _assert_weights_on_grid(qm)
    assert sum(_layer_mse(qm, model, images).values()) < sum(before.values())
    with pytest.raises(ValueError, match="act_step_lr"):
        ReconstructConfig(act_step_lr=-1e-3)


def test_fisher_weights_of_the_logits_are_a_drawn_class_gradient_squared():
    """For the classifier's output z, d log p_c / dz = onehot(c) - p: per image, every class but the
    drawn one has weight p_j^2 / m, the drawn one (1 - p_c)^2 / m, one normaliser m per layer; the
    maps of the other layers have their output's shape, are >= 0 and average 1."""
    from dfq.pipeline.graph import layer_nodes
    from dfq.pipeline.recon_loss import fisher_weights

    model, images, qm = _calibrated(40)
    nodes = layer_nodes(qm.module)
    weights = fisher_weights(qm, nodes, images, seed=0, batch=16)
    with torch.no_grad():
        p = torch.softmax(model(images), 1)
    root = weights["fc"].sqrt()
    ratio = p / root                                   # sqrt(m) wherever j is not the drawn class
    sqrt_m = ratio.median()
    others = (ratio - sqrt_m).abs() < 1e-3 * sqrt_m
    assert bool((others.sum(1) == p.shape[1] - 1).all())          # exactly one drawn class per image
    drawn = (~others).float().argmax(1)
    pc = p.gather(1, drawn[:, None])[:, 0]
    assert torch.allclose(root.gather(1, drawn[:, None])[:, 0] * sqrt_m, 1 - pc, rtol=1e-3, atol=1e-6)
    for n in nodes:
        w = weights[str(n.target)]
        assert w.shape[0] == len(images) and bool((w >= 0).all()) and abs(float(w.mean()) - 1) < 1e-4
    assert qm.act_quantizers() and all(a.enabled for a in qm.act_quantizers().values())   # restored
    # per channel: each channel's weight is the mean of the per-element map over images and positions
    pooled = fisher_weights(qm, nodes, images, seed=0, batch=16, per_channel=True)
    for name in ("fc", "dw"):
        w = weights[name]
        dims = [d for d in range(w.dim()) if d != 1]
        channel = w.mean(dim=dims, keepdim=True)
        assert torch.allclose(pooled[name], (channel / channel.mean()).expand_as(w), rtol=1e-4)


def test_fisher_modes_other_than_the_three_and_block_granularity_are_refused():
    with pytest.raises(ValueError, match="fisher"):
        ReconstructConfig(fisher="element", granularity="block")
    with pytest.raises(ValueError, match="fisher"):
        ReconstructConfig(fisher="pixel")
