"""BN-statistics inversion (``dfq.pipeline.synthesize``) on tiny seeded conv+BN models (CPU, fast)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dfq.pipeline.augment import ImageParam, center_crop, desaturate, gaussian_smooth, initial_noise, random_crop, scale_to_box
from dfq.pipeline.synthesize import (BNStatsHook, SynthConfig, batch_mean_var,
                                     evaluate_synthetic, pixel_bounds, synthesize,
                                     swing_convolutions, synthesize_batches, target_labels,
                                     total_variation)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is faster than two and keeps the file
    quick on a busy 2-core machine. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """conv-BN-ReLU, stride-2 conv-BN-ReLU, global pool, linear: 2 BN layers, 3x8x8 input."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def fake_data(n: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth colour blobs in [0, 1] (upsampled 2x2 noise), normalised like the model input."""
    coarse = torch.rand(n, 3, 2, 2, generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=SIZE[1:], mode="bilinear",
                                          align_corners=False)
    return (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def make_model(seed: int = 0, num_classes: int = 5) -> TinyNet:
    """Seeded weights; BN running statistics measured on :func:`fake_data` (so they are
    reachable by an image batch, like a trained model's) and random BN affine parameters."""
    torch.manual_seed(seed)
    m = TinyNet(num_classes)
    g = torch.Generator().manual_seed(seed + 100)
    for bn in (m.bn1, m.bn2):
        c = bn.num_features
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
        bn.momentum = None  # cumulative average over the batches below
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(fake_data(64, g))
    return m.eval()


def cfg(**kw) -> SynthConfig:
    base = dict(num_images=12, batch_size=8, steps=6, lr=0.1, bn_weight=1.0, ce_weight=0.1,
                tv_weight=0.01, l2_weight=0.001, jitter=1, flip=True, seed=0)
    base.update(kw)
    return SynthConfig(**base)


def run(model, config, **kw):
    return synthesize(model, SIZE, MEAN, STD, 5, config, progress=False, **kw)


# ------------------------------------------------------------------------------- BNStatsHook


def test_hook_loss_zero_when_batch_stats_match_running_stats():
    model = make_model()
    x = torch.randn(16, *SIZE, generator=torch.Generator().manual_seed(1)) * 1.3 + 0.2
    with BNStatsHook(model) as hook:
        assert len(hook) == 2
        with torch.no_grad():
            model(x)
            before = float(hook.loss())
            # Set each layer's running statistics to the batch statistics of its input, in
            # order (a layer's input depends only on the layers before it).
            for i, bn in enumerate(hook.layers):
                model(x)
                bn.running_mean.copy_(hook.means[i])
                bn.running_var.copy_(hook.vars[i])
            model(x)
            after = hook.loss()
            per_layer = hook.layer_losses()
    assert before > 0.1
    assert per_layer.shape == (2,)
    assert float(after) == pytest.approx(0.0, abs=1e-6)
    # the recorded statistics are the biased batch mean/variance of the BN input
    a = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, a.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, a.var(dim=(0, 2, 3), unbiased=False), atol=1e-5)


def test_hook_loss_formula_and_gradient():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    model = nn.Sequential(bn)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with BNStatsHook(model) as hook:
        out = model(x)
        loss = hook.loss()
        loss.backward()
    mu = x.detach().mean(dim=(0, 2, 3))
    sd = torch.sqrt(x.detach().var(dim=(0, 2, 3), unbiased=False) + bn.eps)
    expected = (torch.linalg.vector_norm(mu - bn.running_mean)
                + torch.linalg.vector_norm(sd - torch.sqrt(bn.running_var + bn.eps)))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # recording does not change the eval-mode forward
    assert torch.equal(out, bn(x.detach()))


def test_batch_mean_var_values_and_gradient():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 4, 5, 7, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5]).view(1, 4, 1, 1)
    a = a + torch.tensor([0.0, 2.0, -1.0, 5.0]).view(1, 4, 1, 1)
    mu, var = batch_mean_var(a)
    assert torch.allclose(mu, a.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, a.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-5)
    a64 = a.double().requires_grad_()
    assert torch.autograd.gradcheck(batch_mean_var, (a64,))
    # only one output used: the other gradient arrives as None
    gm, = torch.autograd.grad(batch_mean_var(a64)[0].sum(), a64)
    assert torch.allclose(gm, torch.full_like(gm, 1 / (6 * 5 * 7)))
    gv, = torch.autograd.grad(batch_mean_var(a64)[1].sum(), a64)
    ref, = torch.autograd.grad(a64.var(dim=(0, 2, 3), unbiased=False).sum(), a64)
    assert torch.allclose(gv, ref)


def test_hook_remove_and_errors():
    model = make_model()
    hook = BNStatsHook(model)
    assert all(len(bn._forward_hooks) == 1 for bn in (model.bn1, model.bn2))
    with pytest.raises(RuntimeError, match="forward"):
        hook.loss()
    hook.remove()
    assert all(len(bn._forward_hooks) == 0 for bn in (model.bn1, model.bn2))
    with torch.no_grad():
        model(torch.zeros(2, *SIZE))
    assert hook.means == [None, None]
    with pytest.raises(Exception, match="BatchNorm"):
        BNStatsHook(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_total_variation():
    assert float(total_variation(torch.ones(2, 3, 4, 4))) == 0.0
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # two vertical and two horizontal differences of 1 among 2+2 pairs
    assert float(total_variation(x)) == pytest.approx(0.5 + 0.5)


def test_pixel_bounds_and_labels():
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert lo.shape == hi.shape == (1, 3, 1, 1)
    assert torch.allclose(lo.flatten(), -torch.tensor(MEAN) / torch.tensor(STD))
    lo1, hi1 = pixel_bounds(127 / 255, 128 / 255, 3)
    assert float(lo1[0, 0]) == pytest.approx(-127 / 128) and float(hi1[0, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pixel_bounds((0.5, 0.5), (0.2, 0.2), 3)

    y = target_labels(25, 10, seed=3)
    assert y.dtype == torch.int64
    assert sorted(y[:10].tolist()) == list(range(10))         # each class once per cycle
    assert torch.equal(y[10:20], y[:10])
    assert torch.equal(target_labels(15, 10, seed=3, start=10), y[10:25])
    assert not torch.equal(target_labels(10, 10, seed=4), y[:10])


# ------------------------------------------------------------------------------- synthesize


def test_synthesize_shapes_range_labels():
    model = make_model()
    config = cfg()
    x, y = run(model, config)
    assert x.shape == (12, *SIZE) and x.dtype == torch.float32 and not x.requires_grad
    assert y.shape == (12,) and y.dtype == torch.int64
    assert torch.equal(y, target_labels(12, 5, seed=0))
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    assert torch.isfinite(x).all()
    # clamping actually bites: some pixels sit on the bounds (noise init exceeds them)
    assert bool((x == lo).any() or (x == hi).any())


def test_synthesize_deterministic_and_seeded():
    model = make_model()
    x1, y1 = run(model, cfg(seed=7))
    torch.manual_seed(12345)  # the global RNG plays no part
    x2, y2 = run(model, cfg(seed=7))
    x3, _ = run(model, cfg(seed=8))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_synthesize_batches_resume_matches_full_run():
    model = make_model()
    config = cfg(num_images=20, batch_size=8)   # batches of 8, 8, 4
    batches = list(synthesize_batches(model, SIZE, MEAN, STD, 5, config, progress=False))
    assert [len(b[0]) for b in batches] == [8, 8, 4]
    resumed = list(synthesize_batches(model, SIZE, MEAN, STD, 5, config, progress=False,
                                      start_batch=1))
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(batches[1:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = run(model, config)
    assert torch.equal(x, torch.cat([b[0] for b in batches]))


def test_bns_loss_decreases():
    model = make_model()
    config = cfg(num_images=16, batch_size=16, steps=40, lr=0.1, ce_weight=0.05, jitter=0,
                 flip=False, tv_weight=0.0, l2_weight=0.0)
    log: list[dict] = []
    x, y = run(model, config, log=log)
    assert len(log) == 40 and [r["step"] for r in log] == list(range(40))
    first, last = log[0]["bns"], min(r["bns"] for r in log[-5:])
    assert last < 0.5 * first
    lo, hi = pixel_bounds(MEAN, STD, 3)
    noise = torch.maximum(torch.minimum(torch.randn(16, *SIZE), hi), lo)
    q_syn = evaluate_synthetic(model, x, y, batch_size=16)
    q_noise = evaluate_synthetic(model, noise, y, batch_size=16)
    assert q_syn["bns"] < 0.5 * q_noise["bns"]
    assert q_syn["mean_confidence"] > q_noise["mean_confidence"]


def test_model_untouched():
    model = make_model()
    model.train()
    model.fc.weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run(model, cfg())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.bn1.training
    assert all(len(bn._forward_hooks) == 0 for bn in (model.bn1, model.bn2))


def test_works_under_no_grad_and_with_progress(capsys):
    model = make_model()
    with torch.no_grad():
        x, _ = synthesize(model, SIZE, MEAN, STD, 5, cfg(num_images=4, steps=3), progress=True)
    assert x.shape == (4, *SIZE)


def test_synthesize_rejects_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="input_size"):
        synthesize(model, (3, 8), MEAN, STD, 5, cfg(), progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        synthesize(model, SIZE, MEAN, STD, 0, cfg(), progress=False)
    with pytest.raises(ValueError, match="start_batch"):
        next(synthesize_batches(model, SIZE, MEAN, STD, 5, cfg(), progress=False, start_batch=9))


# ------------------------------------------------------------------------------- all-images statistics, output loss


def test_pooled_statistics_are_those_of_the_concatenated_batches():
    model = make_model().eval()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, *SIZE, generator=g), 0.5 * torch.randn(3, *SIZE, generator=g) + 0.3
    with torch.no_grad(), BNStatsHook(model) as hook:
        model(torch.cat([a, b]))
        whole = hook.layer_losses()
        model(a)
        stats_a = [(m.clone(), v.clone()) for m, v in zip(hook.means, hook.vars)]
        model(b)
        own = hook.layer_losses()
        pooled = hook.pooled_layer_losses(3, [(5, stats_a)])
    assert torch.allclose(pooled, whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(own, whole, rtol=1e-2)   # the batch by itself is not the set


def test_granularity_all_matches_the_set_and_is_deterministic():
    model = make_model()
    config = cfg(num_images=12, batch_size=4, steps=30, granularity="all", tv_weight=0.0, l2_weight=0.0)
    log: list[dict] = []
    x, y = run(model, config, log=log)
    assert x.shape == (12, *SIZE) and torch.equal(y, target_labels(12, 5, seed=0))
    assert len(log) == 3 * 30 and sorted({r["batch"] for r in log}) == [0, 1, 2]
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    noise = torch.maximum(torch.minimum(torch.randn(12, *SIZE, generator=torch.Generator().manual_seed(0)), hi), lo)
    assert evaluate_synthetic(model, x, y, batch_size=12)["bns"] < 0.5 * evaluate_synthetic(model, noise, y, batch_size=12)["bns"]
    x2, _ = run(model, config)
    assert torch.equal(x, x2)
    x3, _ = run(model, dataclasses.replace(config, granularity="batch"))
    assert not torch.equal(x, x3)


def test_granularity_all_refuses_resume_shards_and_swing():
    model = make_model()
    with pytest.raises(ValueError, match="granularity='all'"):
        next(synthesize_batches(model, SIZE, MEAN, STD, 5, cfg(granularity="all"), progress=False, start_batch=1))
    with pytest.raises(ValueError, match="granularity='all'"):
        next(synthesize_batches(model, SIZE, MEAN, STD, 5, cfg(granularity="all"), progress=False, shard=(0, 2)))
    with pytest.raises(ValueError, match="swing"):
        cfg(granularity="all", swing=True)
    with pytest.raises(ValueError, match="granularity"):
        cfg(granularity="image")
    with pytest.raises(ValueError, match="output_loss"):
        cfg(output_loss="margin")


def test_minmax_output_loss_spreads_the_logits_without_labels():
    from dfq.pipeline.synthesize import _output_loss
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]])
    assert float(_output_loss(logits, torch.tensor([0, 0]), "minmax")) == pytest.approx(-(3.0 + 3.0) / 2)
    model = make_model()
    base = dict(num_images=8, batch_size=8, steps=30, bn_weight=0.01, ce_weight=1.0, tv_weight=0.0, l2_weight=0.0)
    x_mm, y = run(model, cfg(output_loss="minmax", **base))
    x_off, _ = run(model, cfg(**{**base, "ce_weight": 0.0}))
    with torch.no_grad():
        spread = lambda x: float((model(x).amax(1) - model(x).amin(1)).mean())
        assert spread(x_mm) > 1.5 * spread(x_off)


# ------------------------------------------------------------------------------- swing convolutions


def _strided_1x1() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, stride=2))


def test_swing_spreads_the_gradient_of_strided_convs_over_every_pixel():
    # A 1x1 conv of stride 2 reads only the even pixels: without swing the odd ones get no gradient.
    model = _strided_1x1()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).square().sum().backward()
    assert bool((x.grad[..., 1::2, :] == 0).all()) and bool((x.grad[..., ::2, ::2] != 0).all())
    x.grad = None
    with swing_convolutions(model, torch.Generator().manual_seed(0)):
        for _ in range(40):
            out = model(x)
            assert out.shape == (2, 4, 4, 4)
            out.square().sum().backward()
    assert bool((x.grad.abs().sum(dim=(0, 1)) > 0).all())


def test_swing_touches_only_strided_convs_and_is_removed():
    model = _strided_1x1()
    x = torch.randn(1, 3, 8, 8)
    plain = model(x)
    with swing_convolutions(model, torch.Generator().manual_seed(1)):
        assert len(model[0]._forward_pre_hooks) == 0 and len(model[1]._forward_pre_hooks) == 1
        outs = [model(x) for _ in range(12)]
    assert any(not torch.equal(o, plain) for o in outs)
    assert len(model[1]._forward_pre_hooks) == 0
    assert torch.equal(model(x), plain)


def test_synthesize_with_swing_is_deterministic():
    model = make_model()
    a, _ = run(model, cfg(swing=True))
    b, _ = run(model, cfg(swing=True))
    c, _ = run(model, cfg(swing=False))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------- image priors


def neighbour_correlation(x: torch.Tensor) -> float:
    a = x - x.mean(dim=(2, 3), keepdim=True)
    return float((a[..., 1:, :] * a[..., :-1, :]).mean() / a.pow(2).mean())


def test_initial_noise_white_and_pink():
    g = torch.Generator().manual_seed(0)
    white = initial_noise(4, (3, 64, 48), "white", g)
    pink = initial_noise(4, (3, 64, 48), "pink", g)
    assert white.shape == pink.shape == (4, 3, 64, 48)
    assert abs(float(white.std()) - 1) < 0.05 and abs(float(pink.std()) - 1) < 1e-4
    # independent pixels vs. correlated neighbours, as in natural images
    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(pink) > 0.5
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(initial_noise(2, (3, 8, 8), "pink", g1), initial_noise(2, (3, 8, 8), "pink", g2))


def test_diverse_init_gives_each_image_its_own_colour_and_contrast_inside_the_box():
    g = torch.Generator().manual_seed(0)
    lo, hi = pixel_bounds(MEAN, STD, 3)
    pink = scale_to_box(initial_noise(64, (3, 32, 32), "pink", g), "pink", lo, hi)
    diverse = scale_to_box(initial_noise(64, (3, 32, 32), "diverse", g), "diverse", lo, hi)
    assert bool((diverse >= lo).all() and (diverse <= hi).all())
    # spread over images of each image's per-channel mean and contrast: pink starts all alike
    means_p, means_d = pink.mean((2, 3)), diverse.mean((2, 3))
    assert float(means_d.std(0).min()) > 3 * float(means_p.std(0).max())
    contrast_d = diverse.std((2, 3))
    assert float(contrast_d.std(0).min()) > 0.1
    # centred on the box: the offsets are drawn around its middle, in units of its half-width
    centre = ((lo + hi) / 2).flatten()
    assert torch.allclose(means_d.mean(0), centre, atol=0.35)
    assert neighbour_correlation(diverse) > 0.5
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(initial_noise(2, (3, 8, 8), "diverse", g1), initial_noise(2, (3, 8, 8), "diverse", g2))


def test_random_crop_covers_every_offset_and_centre_crop_takes_the_middle():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        c = random_crop(x, (8, 8), g)
        assert c.shape == (2, 3, 8, 8)
        dy, dx = divmod(int(c[0, 0, 0, 0]), 12)
        assert torch.equal(c, x[..., dy:dy + 8, dx:dx + 8])
        seen.add((dy, dx))
    assert seen == {(dy, dx) for dy in range(3) for dx in range(5)}
    assert torch.equal(center_crop(x, (8, 8)), x[..., 1:9, 2:10])
    assert torch.equal(center_crop(x, (10, 12)), x)


def test_canvas_shows_the_model_input_sized_views_and_returns_the_centre():
    model = make_model()
    sizes = []
    handle = model.conv1.register_forward_pre_hook(lambda m, inp: sizes.append(tuple(inp[0].shape[2:])))
    log: list[dict] = []
    base = dict(num_images=8, batch_size=8, steps=30, lr=0.1, ce_weight=0.0, tv_weight=0.0, l2_weight=0.0, jitter=0)
    try:
        x, _ = run(model, cfg(**base, canvas=4), log=log)
    finally:
        handle.remove()
    assert set(sizes) == {SIZE[1:]} and x.shape == (8, *SIZE) and x.is_contiguous()
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert bool((x >= lo).all() and (x <= hi).all())
    assert min(r["bns"] for r in log[-5:]) < 0.5 * log[0]["bns"]
    again, _ = run(model, cfg(**base, canvas=4))
    assert torch.equal(x, again)
    plain, _ = run(model, cfg(**base))
    assert not torch.equal(x, plain)


def test_gaussian_smooth_keeps_constants_and_averages_noise():
    const = torch.full((1, 3, 6, 6), 0.7)
    assert torch.allclose(gaussian_smooth(const, 1.25), const)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gaussian_smooth(noise, 0.0) is noise
    smooth = gaussian_smooth(noise, 1.25)
    assert smooth.shape == noise.shape
    # nine near-equal weights: the variance of independent noise falls to about 1/9 (edges reflect)
    assert 0.08 < float(smooth.var()) < 0.2 and neighbour_correlation(smooth) > 0.5
    # a narrow kernel keeps most of the centre
    assert float((gaussian_smooth(noise, 0.3) - noise).abs().mean()) < 0.1


def _channel_correlation(x: torch.Tensor) -> float:
    """Mean correlation between the colour channels of ``x`` over all images and positions."""
    c = torch.corrcoef(x.transpose(0, 1).reshape(x.shape[1], -1))
    return float(c[torch.triu_indices(3, 3, 1).unbind()].mean())


def test_desaturate_pulls_colour_towards_grey_inside_the_box():
    lo, hi = pixel_bounds(MEAN, STD, 3)
    std, mean = 1 / (hi - lo), -lo / (hi - lo)
    p = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x = (p - mean) / std
    assert desaturate(x, 0.0, lo, hi) is x
    q = desaturate(x, 0.75, lo, hi) * std + mean
    grey, grey_q = p.mean(1, keepdim=True), q.mean(1, keepdim=True)
    assert torch.allclose(grey_q, grey, atol=1e-5)
    assert torch.allclose(q - grey_q, 0.25 * (p - grey), atol=1e-5)
    assert float(q.min()) >= -1e-5 and float(q.max()) <= 1 + 1e-5
    flat = (p[:, :1].expand(-1, 3, -1, -1) - mean) / std           # grey pixels stay where they are
    assert torch.allclose(desaturate(flat, 0.75, lo, hi), flat, atol=1e-5)


# a filter between the pixels and the model (the result keeps it): smoothing correlates neighbouring
# pixels; desaturation correlates colour channels (white noise pulled 60% to its grey: about 0.64, 0 without)
@pytest.mark.parametrize("option,value,statistic,gain", [
    ("smooth", 1.25, neighbour_correlation, 0.2), ("desaturate", 0.6, _channel_correlation, 0.3),
])
def test_filtered_synthesis_returns_filtered_images(option, value, statistic, gain):
    model = make_model()
    base = dict(num_images=8, batch_size=8, steps=20, lr=0.1, ce_weight=0.0, tv_weight=0.0, l2_weight=0.0)
    plain, _ = run(model, cfg(**base))
    filtered, _ = run(model, cfg(**base, **{option: value}))
    assert statistic(filtered) > statistic(plain) + gain
    again, _ = run(model, cfg(**base, **{option: value}))
    assert torch.equal(filtered, again)


def test_first_bn_weight_scales_only_the_first_layer_term():
    model = make_model()
    logs = {}
    for w in (1.0, 10.0):
        logs[w] = []
        run(model, cfg(num_images=8, steps=1, first_bn_weight=w, tv_weight=0.0, l2_weight=0.0, ce_weight=0.0),
            log=logs[w])
    one, ten = logs[1.0][0], logs[10.0][0]
    assert one["bns"] == pytest.approx(ten["bns"])          # same images, same statistics at step 0
    assert one["loss"] == pytest.approx(one["bns"])
    # the extra 9 x the first BN layer's term, which is a part of the sum
    assert one["bns"] < ten["loss"] < 10 * one["bns"]


def test_coarse_steps_see_half_resolution():
    model = make_model()
    sizes = []
    handle = model.conv1.register_forward_pre_hook(lambda m, inp: sizes.append(tuple(inp[0].shape[2:])))
    try:
        run(model, cfg(num_images=4, batch_size=4, steps=4, coarse=0.5))
    finally:
        handle.remove()
    assert sizes == [(4, 4), (4, 4), (8, 8), (8, 8)]


def test_image_priors_raise_neighbour_correlation():
    model = make_model()
    base = dict(num_images=8, batch_size=8, steps=20, lr=0.1, ce_weight=0.0, tv_weight=0.0, l2_weight=0.0)
    plain, _ = run(model, cfg(**base))
    smooth, _ = run(model, cfg(**{**base, "init": "pink", "tv_weight": 1.0}))
    assert neighbour_correlation(smooth) > neighbour_correlation(plain) + 0.2


def test_spectrum_parametrisation_holds_the_same_images_and_projects_into_the_box():
    x = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    for kind in ("pixel", "spectrum"):
        p = ImageParam(x, kind)
        assert p.tensor.requires_grad and p.tensor.is_leaf
        assert torch.allclose(p.images(), x, atol=1e-5)
        lo, hi = pixel_bounds(MEAN, STD, 3)
        p.project(lo * 0.5, hi * 0.5)
        assert bool((p.images() >= lo * 0.5 - 1e-5).all() and (p.images() <= hi * 0.5 + 1e-5).all())
        inside = (x >= lo * 0.5) & (x <= hi * 0.5)
        assert torch.allclose(p.images()[inside], x[inside], atol=1e-5)
    with pytest.raises(ValueError, match="parametrisation"):
        ImageParam(x, "wavelet")


def test_spectrum_steps_are_smooth_pixel_steps_are_not():
    """An Adam-like step (every coordinate moved by +-lr) is white noise on the pixels and a
    correlated (pink) field through the spectrum."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(4, 3, 64, 64)
    corr = {}
    for kind in ("pixel", "spectrum"):
        p = ImageParam(x, kind)
        with torch.no_grad():
            p.tensor.add_(0.1 * torch.sign(torch.randn(p.tensor.shape, generator=g)))
        step = p.images().detach()
        assert 0.05 < float(step.std()) < 0.2
        corr[kind] = neighbour_correlation(step)
    assert abs(corr["pixel"]) < 0.05 and corr["spectrum"] > 0.5


def test_synthesize_through_the_spectrum():
    model = make_model()
    base = dict(num_images=8, batch_size=8, steps=30, lr=0.1, ce_weight=0.0, tv_weight=0.0, l2_weight=0.0,
                jitter=0, flip=False)
    log: list[dict] = []
    x, y = run(model, cfg(**base, param="spectrum"), log=log)
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert bool((x >= lo).all() and (x <= hi).all())
    assert min(r["bns"] for r in log[-5:]) < 0.5 * log[0]["bns"]
    again, _ = run(model, cfg(**base, param="spectrum"))
    assert torch.equal(x, again)
    plain, _ = run(model, cfg(**base))
    assert neighbour_correlation(x) > neighbour_correlation(plain)


# ------------------------------------------------------------------------------- SynthConfig


@pytest.mark.parametrize("field,value", [
    ("num_images", 0), ("batch_size", -1), ("steps", 0), ("steps", 2.5), ("lr", 0.0),
    ("lr", float("nan")), ("bn_weight", -1.0), ("tv_weight", float("inf")), ("jitter", -1),
    ("flip", 1), ("swing", 1), ("seed", -3), ("first_bn_weight", -1.0), ("coarse", 1.0),
    ("coarse", -0.1), ("init", "blue"), ("param", "wavelet"), ("canvas", -1), ("canvas", 2.5),
    ("smooth", -0.5), ("smooth", float("nan")), ("desaturate", 1.0), ("desaturate", -0.1), ("desaturate", True),
])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        cfg(**{field: value})


def test_config_needs_a_matching_term():
    with pytest.raises(ValueError, match="bn_weight"):
        cfg(bn_weight=0.0, ce_weight=0.0)


@pytest.mark.parametrize("budget", ["fast", "default", "long"])
def test_for_budget(budget):
    small = SynthConfig.for_budget(budget, (3, 32, 32), seed=3)
    large = SynthConfig.for_budget(budget, (3, 224, 224))
    assert small.seed == 3 and large.seed == 0
    assert small.num_images * small.steps > large.num_images * large.steps
    assert small.to_dict()["method"] == "bns"
    assert SynthConfig(**{k: v for k, v in small.to_dict().items() if k != "method"}) == small
    assert dataclasses.replace(small, num_images=5).num_images == 5
    # reconstruction recipes: longer-optimised images with DeepInversion's priors, large inputs only
    recon_small = SynthConfig.for_budget(budget, (3, 32, 32), seed=3, reconstruction=True)
    recon_large = SynthConfig.for_budget(budget, (3, 224, 224), reconstruction=True)
    assert recon_small == small
    assert recon_large.steps > large.steps
    priors = dict(init="pink", tv_weight=3000.0, coarse=0.5, first_bn_weight=10.0, smooth=1.25)
    assert recon_large == dataclasses.replace(large, steps=recon_large.steps, **priors)
    assert recon_large.num_images == large.num_images


def test_budgets_grow():
    costs = [SynthConfig.for_budget(b, (3, 32, 32)) for b in ("fast", "default", "long")]
    work = [c.num_images * c.steps for c in costs]
    assert work == sorted(work) and work[0] < work[-1]
    with pytest.raises(ValueError, match="budget"):
        SynthConfig.for_budget("huge", (3, 32, 32))


def test_reconstruction_recipes_get_the_converged_image_set():
    from dfq.job import ExportJob
    from dfq.pipeline.recipes import RECIPES
    from dfq.stages import synthesis_config

    job = ExportJob(model="m.pth", out="m.onnx", budget="fast")
    large = (3, 224, 224)
    for name in ("recon", "acq-recon"):
        assert synthesis_config(job, RECIPES[name], large) == SynthConfig.for_budget("fast", large, reconstruction=True)
    for name in ("bns", "acq"):
        assert synthesis_config(job, RECIPES[name], large) == SynthConfig.for_budget("fast", large)


# ------------------------------------------------------------------------------- generator parametrisation


def test_generator_param_images_are_in_the_box_reproducible_and_trainable():
    from dfq.pipeline.image_generator import GeneratorParam

    lo, hi = pixel_bounds(MEAN, STD, 3)

    def make(seed):
        return GeneratorParam(4, (3, 16, 24), lo, hi, torch.Generator().manual_seed(seed), torch.device("cpu"),
                              torch.float32)

    p = make(0)
    x = p.images()
    assert x.shape == (4, 3, 16, 24) and bool((x >= lo).all() and (x <= hi).all())
    # tanh then an affine-free BatchNorm: each channel near mean 0, variance 1 over the batch (before the clamp)
    assert abs(float(x.detach().mean())) < 0.3
    state = torch.get_rng_state()
    assert torch.equal(make(0).images(), x) and not torch.equal(make(1).images(), x)
    assert torch.equal(torch.get_rng_state(), state)   # built from the batch's stream, not the global RNG
    x.pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t, _ in p.variables())
    assert p.variables()[0][0] is p.z


def test_generator_needs_a_side_it_can_upsample_to():
    from dfq.pipeline.image_generator import LatentGenerator

    with pytest.raises(ValueError, match="multiple of 8"):
        LatentGenerator((20, 16))


def test_synthesize_through_a_generator():
    model = make_model()
    base = dict(num_images=8, batch_size=8, steps=40, lr=0.2, ce_weight=0.0, tv_weight=0.0, l2_weight=0.0,
                jitter=0, flip=False, param="generator")
    log: list[dict] = []
    x, _ = run(model, cfg(**base), log=log)
    lo, hi = pixel_bounds(MEAN, STD, 3)
    assert x.shape == (8, *SIZE) and bool((x >= lo).all() and (x <= hi).all())
    assert min(r["bns"] for r in log[-5:]) < 0.5 * log[0]["bns"]
    again, _ = run(model, cfg(**base))
    assert torch.equal(x, again)
