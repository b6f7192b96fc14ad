"""Empirical bias correction of a fake-quant model on synthetic images (the ``bias-correct`` stage).

Quantized weights and clipped activations shift the mean of every layer's output (Nagel et al.
2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", sec. 4.2). Here the
shift is measured on synthetic images instead of data, per output channel, and moved into the
layer's bias:

1. one pass with quantizers off records each conv/linear output's per-channel mean;
2. one quantized pass visits the layers in order; each layer's correction
   ``delta_c = mean_fp_c - mean_q_c`` is added to its bias before its output reaches the next
   layer, so later layers are corrected for what the corrected earlier ones feed them.

The shift goes into the folded bias: the BN ``beta`` in Tune mode (``(b - mean) * g + beta`` moves
one for one with ``beta``), else the conv/linear bias. The target means are those of the model's
own float weights (quantizers off), so the bias that quantizing *these* weights introduces is
removed, also after fine-tuning. With held-out images the KL to the FP model's logits there is
measured before and after (data-free: never real images), and the correction is undone when that KL
did not fall below ``max_kl_ratio`` times its value before: 1 (it must fall) for every recipe but
``recon``, which allows :data:`RECONSTRUCTION_KL_RATIO`. After the learned rounding that KL misjudges
small changes: it rose at 8 of 10 ResNet-20 W4A4 seeds where the correction gained 1.4-1.6 points of
real top-1 at each (up to 1.8x), and with the 8-bit residual stream the correction gains on ResNet-20
(default budget, seed 0: drop 1.77 -> 0.63) and ResNet-56 (fast, seed 0: 0.55 -> 0.15) with the KL
rising up to 1.4x. A large rise is a real loss: on EfficientNet-Lite0 at mixed W5A5 the correction
raised the KL tenfold (0.12 -> 1.31) and cost 3.2 points (drop 5.54 against 2.38 without it). README
"Methods" has the runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dfq.pipeline.calibrate import batched_logits, output_kl
from dfq.pipeline.models import is_small_input
from dfq.pipeline.qmodules import QuantConv2d, QuantLinear
from dfq.pipeline.quantize import QuantizedModel

# The held-out KL may rise this many times across the correction after a reconstruction before the
# correction is undone (module docstring).
RECONSTRUCTION_KL_RATIO = 2.0


@dataclass
class BiasCorrectionResult:
    applied: bool                    # False when it did not lower the held-out KL and was undone
    layers: int
    num_images: int
    max_abs_shift: float             # largest per-channel bias change, in output units
    kl_before: float | None          # FP -> quantized KL on the held-out images
    kl_after: float | None
    max_kl_ratio: float | None = 1.0  # undone unless kl_after < max_kl_ratio * kl_before (None: never undone)

    def to_dict(self) -> dict:
        return asdict(self)


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.float().mean(dim=[0] + list(range(2, t.dim())))


def default_max_images(images: torch.Tensor) -> int:
    """Images measured per pass: 256 for small inputs (CIFAR-sized), 64 for ImageNet-sized ones."""
    return 256 if is_small_input(images.shape[1:]) else 64


@contextlib.contextmanager
def _forward_hooks(layers: dict[str, nn.Module], hook):
    """``hook(name, output)`` after every layer's forward (its return value, if not None, replaces
    the output) while the block runs."""
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(n, out)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _fp_layer_means(qmodel: QuantizedModel, layers: dict[str, nn.Module], images: torch.Tensor) -> dict:
    """Per-channel output mean of every layer with the quantizers off (they are left off)."""
    means: dict[str, torch.Tensor] = {}
    qmodel.set_enabled(False, False)
    with _forward_hooks(layers, lambda n, out: means.__setitem__(n, _channel_mean(out))):
        qmodel.module(images)
    return means


@torch.no_grad()
def _shift_biases(qmodel: QuantizedModel, layers: dict, biases: dict, fp_means: dict, images: torch.Tensor) -> dict:
    """The quantized pass of step 2; returns the largest shift per layer."""
    shifts: dict[str, float] = {}

    def correct(n, out):
        delta = fp_means[n].to(out.dtype) - _channel_mean(out).to(out.dtype)
        biases[n].add_(delta)
        shifts[n] = float(delta.abs().max())
        return out + delta.reshape([1, -1] + [1] * (out.dim() - 2))

    with _forward_hooks(layers, correct):
        qmodel.module(images)
    return shifts


@torch.no_grad()
def bias_correct(qmodel: QuantizedModel, images: torch.Tensor, *, holdout: torch.Tensor | None = None,
                 fp_logits: torch.Tensor | None = None, max_images: int | None = None,
                 max_kl_ratio: float | None = 1.0) -> BiasCorrectionResult:
    """Correct ``qmodel``'s biases in place from ``images[:max_images]`` (see the module docstring;
    ``max_images`` defaults to :func:`default_max_images`).

    With ``holdout`` images, the KL to the FP model (``fp_logits`` on ``holdout``; default: the
    quantizers-off model, which is the FP model before fine-tuning) is measured before and after,
    and the correction is undone unless it ends below ``max_kl_ratio`` times its value before
    (``None``: kept whatever the KL does)."""
    images = images[:default_max_images(images) if max_images is None else max_images]
    layers = {n: m for n, m in qmodel.module.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    was_training = qmodel.module.training
    qmodel.module.eval()
    fp_means = _fp_layer_means(qmodel, layers, images)
    fp_holdout = kl_before = kl_after = None
    try:
        if holdout is not None and len(holdout):
            fp_holdout = fp_logits if fp_logits is not None else batched_logits(qmodel.module, holdout, 64)
    finally:
        qmodel.set_enabled(True, True)
    if fp_holdout is not None:
        kl_before = output_kl(fp_holdout, batched_logits(qmodel.module, holdout, 64))
    biases = {n: m.bn_bias if getattr(m, "has_bn", False) else m.bias for n, m in layers.items()}
    saved = {n: b.detach().clone() for n, b in biases.items()}
    shifts = _shift_biases(qmodel, layers, biases, fp_means, images)
    applied = True
    if fp_holdout is not None:
        kl_after = output_kl(fp_holdout, batched_logits(qmodel.module, holdout, 64))
        if max_kl_ratio is not None and not kl_after < max_kl_ratio * kl_before:
            applied = False
            for n, b in biases.items():
                b.copy_(saved[n])
    qmodel.module.train(was_training)
    return BiasCorrectionResult(applied, len(layers), len(images), max(shifts.values(), default=0.0),
                                kl_before, kl_after, max_kl_ratio)
