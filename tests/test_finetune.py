"""Generators, DDAQ discriminators, recipes, and the fine-tuning loop on a tiny model."""
import copy
import dataclasses

import pytest
import torch

from dfq.common.errors import CheckpointError
from dfq.kernels.attention import attention_centre
from dfq.pipeline.calibrate import calibrate
from dfq.pipeline.discriminators import (BNStatsDiscriminator, DiscrepancyDiscriminator, group_stats,
                                         importance_prior)
from dfq.pipeline.finetune import FinetuneConfig, Finetuner, finetune
from dfq.pipeline.generators import (AttentionConditionalGenerator, ConditionalGenerator, make_generator,
                                     sample_centres)
from dfq.pipeline.quantize import quantize
from dfq.pipeline.recipes import RECIPES, Recipe, get_recipe
from tests.tiny import tiny_images, tiny_resnet, qconfig

SIZE = (3, 16, 16)


@pytest.mark.parametrize("size,channels", [(32, 3), (16, 3), (224, 3), (128, 1)])
def test_generator_shapes_and_standardised_output(size, channels):
    torch.manual_seed(0)
    g = make_generator("conditional", 10, (channels, size, size), latent=16, base=32)
    n = 4 if size > 64 else 8
    x = g(torch.randn(n, 16), torch.arange(n) % 10)
    assert x.shape == (n, channels, size, size) and torch.isfinite(x).all()
    # the final affine-free BN standardises each channel over the batch (train mode)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_acq_generator_conditions_on_centre_and_checks_shapes():
    torch.manual_seed(0)
    g = AttentionConditionalGenerator(10, 32, latent=16, base=32).eval()
    z, y = torch.randn(2, 16), torch.tensor([3, 3])
    a = g(z, y, torch.tensor([[-0.5, -0.5], [-0.5, -0.5]]))
    b = g(z, y, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert not torch.allclose(a, b)
    bump = g.bump(torch.tensor([[0.0, 0.0], [-1.0, 1.0]]))
    # the bump peaks at its centre: centre of mass of the bump map equals the condition (centred case)
    assert torch.allclose(attention_centre(bump[:, 0] / bump[:, 0].sum(dim=(1, 2), keepdim=True))[0],
                          torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="centres"):
        g(z, y, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise"):
        ConditionalGenerator(10, 32, latent=16, base=32)(torch.randn(2, 5), y)


def test_sample_centres_in_disc():
    c = sample_centres(1000, 0.5, torch.Generator().manual_seed(0))
    r = c.norm(dim=1)
    assert c.shape == (1000, 2) and r.max() <= 0.5 + 1e-6 and r.mean() > 0.25


def test_group_stats_by_hand():
    f = torch.arange(16.0).reshape(4, 1, 2, 2)   # samples 0..3, values 4n..4n+3
    tok = group_stats(f, 2)
    assert tok.shape == (2, 2)
    assert torch.allclose(tok[:, 0], torch.tensor([3.5, 11.5]))
    assert torch.allclose(tok[:, 1], torch.tensor([5.25 ** 0.5] * 2), atol=1e-4)  # var of 0..7 = 63/12


def test_bn_discriminator_learns_to_tell_shifted_statistics():
    torch.manual_seed(0)
    running = [(torch.zeros(4), torch.ones(4))]
    d = BNStatsDiscriminator(running, spatial=[16], group=4)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        fake = torch.randn(32, 4, 4, 4, generator=gen) + 0.7   # shifted mean
        loss = d.discriminator_loss([fake], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fake = torch.randn(32, 4, 4, 4, generator=gen) + 0.7
    assert d.generator_loss([fake]) > 1.0          # the fakes are recognised
    assert loss < 0.2


def test_discrepancy_discriminator_and_importance_prior():
    qm = quantize(tiny_resnet(0), qconfig(bits=4, target="onnxruntime"), tiny_images(2))
    layers = [m for m in qm.layers().values()]
    prior = importance_prior(layers)
    assert prior.shape == (len(layers),) and torch.isclose(prior.mean(), torch.tensor(1.0))
    assert (prior > 0).all()
    d = DiscrepancyDiscriminator([4, 4])
    a = [torch.randn(8, 4, 2, 2), torch.randn(8, 4)]
    loss_d = d.discriminator_loss(a, a)
    # identical inputs: the probes cannot separate them, loss = 2 * ln 2 at zero logits or more
    assert loss_d >= 2 * torch.log(torch.tensor(2.0)) - 1e-4


def test_recipes_are_declarations():
    assert set(RECIPES) == {"bns", "bns-ft", "gdfq", "dsg", "clusterq", "ddaq", "acq", "recon", "acq-recon"}
    assert not get_recipe("bns").trains and get_recipe("acq").generator == "acq"
    assert get_recipe("recon").reconstruct and not get_recipe("recon").trains
    assert get_recipe("acq-recon").reconstruct and get_recipe("acq-recon").trains
    assert not any(get_recipe(m).reconstruct for m in ("bns", "bns-ft", "gdfq", "dsg", "clusterq", "ddaq", "acq"))
    with pytest.raises(ValueError, match="unknown terms"):
        Recipe("x", "", "conditional", {"magic": 1.0})
    with pytest.raises(ValueError, match="unknown method"):
        get_recipe("zeroq")


def _setup(bits=4, seed=0):
    teacher = tiny_resnet(seed)
    with torch.no_grad():
        teacher.fc.weight.mul_(20)   # confident logits, so distillation has something to learn
    qm = quantize(teacher, qconfig(bits=bits, target="onnxruntime"), tiny_images(2))
    calibrate(qm, tiny_images(64, seed=seed + 3))
    return teacher, qm


def _cfg(steps, **kw):
    return FinetuneConfig(**{"steps": steps, "batch": 8, "warmup_steps": 2, "latent": 16, "log_every": 1, **kw})


@pytest.mark.parametrize("method", ["gdfq", "dsg", "clusterq", "ddaq", "acq"])
def test_every_generative_recipe_runs_and_trains_the_student(method):
    teacher, qm = _setup()
    before = {k: v.clone() for k, v in qm.module.state_dict().items()}
    res = finetune(teacher, qm, get_recipe(method), _cfg(5), input_size=SIZE, num_classes=10, progress=False)
    assert res.steps == 5 and len(res.history) == 5
    terms = set(get_recipe(method).terms)
    assert terms <= set(res.history[-1]) and "kd" in res.history[-1]
    changed = [k for k, v in qm.module.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("scale") for k in changed)
    assert not any("bn_mean" in k or "bn_var" in k for k in changed)   # BN statistics frozen (Tune mode)


def test_distillation_loss_falls_on_a_fixed_set():
    teacher, qm = _setup(bits=4)
    images = tiny_images(32, seed=7)
    labels = torch.arange(32) % 10
    cfg = _cfg(60, warmup_steps=0, lr_weights=1e-3, lr_scales=1e-2)
    res = finetune(teacher, qm, get_recipe("bns-ft"), cfg, input_size=SIZE, num_classes=10,
                   fixed=(images, labels), progress=False)
    kd = [h["kd"] for h in res.history]
    first, last = sum(kd[:10]) / 10, sum(kd[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_layer_output_distillation_falls_and_leaves_the_teacher_alone():
    teacher, qm = _setup(bits=4)
    fp_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = tiny_images(32, seed=7)
    labels = torch.arange(32) % 10
    recipe = dataclasses.replace(get_recipe("bns-ft"), student_features=1.0)
    cfg = _cfg(60, warmup_steps=0, lr_weights=1e-3, lr_scales=1e-2)
    res = finetune(teacher, qm, recipe, cfg, input_size=SIZE, num_classes=10, fixed=(images, labels), progress=False)
    feats = [h["features"] for h in res.history]
    assert 0 < feats[0] and sum(feats[-10:]) / 10 < 0.8 * sum(feats[:10]) / 10, feats
    # the student's loss is KD + features
    assert res.history[-1]["student"] == pytest.approx(res.history[-1]["kd"] + feats[-1], abs=2e-5)  # history rounds
    assert all(torch.equal(v, fp_before[k]) for k, v in teacher.state_dict().items())


def test_twin_forward_leaves_the_students_recorded_layer_outputs_alone():
    # DDAQ's generator term runs the student, then the FP twin, then reads both layer lists
    teacher, qm = _setup(bits=4)
    tuner = Finetuner(teacher, qm, get_recipe("ddaq"), _cfg(4), input_size=SIZE, num_classes=10)
    x = tiny_images(4, seed=5)
    with torch.no_grad():
        qm.module(x)
        student = [t.clone() for t in tuner.student_layers()]
        twin = tuner.twin_layers(x)
    assert all(torch.equal(a, b) for a, b in zip(student, tuner.student_layers()))
    assert any(not torch.equal(a, b) for a, b in zip(student, twin))   # W4A4 differs from FP


def test_student_mixup_mixes_a_fraction_and_asks_the_teacher():
    teacher, qm = _setup(bits=4)
    recipe = dataclasses.replace(get_recipe("bns-ft"), student_mixup=0.5)
    images = torch.stack([torch.full(SIZE, float(i)) for i in range(8)])
    tuner = Finetuner(teacher, qm, recipe, _cfg(4), input_size=SIZE, num_classes=10, fixed=(images, torch.zeros(8).long()))
    t_logits = torch.randn(8, 10)
    mixed, logits = tuner._mix(images, t_logits, torch.Generator().manual_seed(0))
    assert torch.equal(mixed[4:], images[4:]) and torch.equal(logits[4:], t_logits[4:])
    for img in mixed[:4]:                                  # constant images: a mixture is a constant in [0, 7]
        assert torch.allclose(img, img.flatten()[0].expand_as(img)) and 0 <= float(img.flatten()[0]) <= 7
    with torch.no_grad():
        torch.testing.assert_close(logits[:4], teacher(mixed[:4]))
    again = tuner._mix(images, t_logits, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, mixed)                       # drawn from the step's generator: resumable


def test_student_fixed_fraction_comes_from_the_bn_inversion_set():
    teacher, qm = _setup(bits=4)
    recipe = dataclasses.replace(get_recipe("acq"), student_fixed=0.25)
    pool = torch.stack([torch.full(SIZE, 100.0 + i) for i in range(5)])
    tuner = Finetuner(teacher, qm, recipe, _cfg(4), input_size=SIZE, num_classes=10, fixed=(pool, torch.zeros(5).long()))
    images, t_logits = torch.zeros(8, *SIZE), torch.randn(8, 10)
    out, labels, logits = tuner._with_fixed(images, torch.full((8,), 9), t_logits, torch.Generator().manual_seed(0))
    assert torch.equal(out[:6], images[:6]) and torch.equal(logits[:6], t_logits[:6])
    assert all(float(img.min()) >= 100 for img in out[6:])
    assert labels[:6].eq(9).all() and labels[6:].eq(0).all()     # the pool's labels come along
    with torch.no_grad():
        torch.testing.assert_close(logits[6:], teacher(out[6:]))
    res = finetune(teacher, qm, recipe, _cfg(3), input_size=SIZE, num_classes=10, fixed=(pool, torch.zeros(5).long()),
                   progress=False)
    assert res.steps == 3


def test_adversarial_term_moves_the_generator_not_the_student():
    teacher, qm = _setup(bits=4)
    base = get_recipe("acq")
    recipe = dataclasses.replace(base, terms={**base.terms, "adversarial": 1.0})
    tuner = Finetuner(teacher, qm, recipe, _cfg(4), input_size=SIZE, num_classes=10)
    before = {k: v.clone() for k, v in qm.module.state_dict().items()}
    gen_before = [p.clone() for p in tuner.generator.parameters()]
    log = {}
    tuner._generator_step(torch.Generator().manual_seed(0), log)
    assert log["adversarial"] < 0
    assert all(p.grad is None or not p.grad.any() for p in qm.module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in qm.module.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, tuner.generator.parameters()))
    assert all(p.requires_grad for p in qm.module.parameters())   # restored for the student step


def test_resume_equals_uninterrupted_run(tmp_path):
    recipe = get_recipe("acq")
    teacher, qm = _setup(seed=1)
    qm_b = copy.deepcopy(qm)
    finetune(teacher, qm, recipe, _cfg(6), input_size=SIZE, num_classes=10, progress=False)

    ckpt = tmp_path / "run.ckpt"
    teacher_b, _ = _setup(seed=1)
    finetune(teacher_b, qm_b, recipe, _cfg(6), input_size=SIZE, num_classes=10, progress=False,
             checkpoint=ckpt, fingerprint="f", stop_after=3)
    assert ckpt.exists()
    # a fresh process would rebuild the same calibrated model; emulate with a perturbed copy
    qm_c = copy.deepcopy(qm_b)
    with torch.no_grad():
        for p in qm_c.module.parameters():
            p.add_(1.0)
    res = finetune(_setup(seed=1)[0], qm_c, recipe, _cfg(6), input_size=SIZE, num_classes=10, progress=False,
                   checkpoint=ckpt, fingerprint="f", resume=True)
    assert res.resumed_from == 3 and res.steps == 6
    a, c = qm.module.state_dict(), qm_c.module.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_errors(tmp_path):
    teacher, qm = _setup()
    ckpt = tmp_path / "run.ckpt"
    finetune(teacher, qm, get_recipe("gdfq"), _cfg(3), input_size=SIZE, num_classes=10, progress=False,
             checkpoint=ckpt, fingerprint="f")
    with pytest.raises(CheckpointError, match="different run"):
        finetune(teacher, qm, get_recipe("gdfq"), _cfg(3), input_size=SIZE, num_classes=10, progress=False,
                 checkpoint=ckpt, fingerprint="other", resume=True)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        finetune(teacher, qm, get_recipe("gdfq"), _cfg(3), input_size=SIZE, num_classes=10, progress=False,
                 checkpoint=ckpt, fingerprint="f", resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        finetune(teacher, qm, get_recipe("gdfq"), _cfg(3), input_size=SIZE, num_classes=10, progress=False,
                 checkpoint=tmp_path / "none.ckpt", fingerprint="f", resume=True)
