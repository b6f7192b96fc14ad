"""Activation-range calibration on synthetic images.

An observer on every :class:`ActQuantizer` collects, from the FP forward pass (quantizers off),
the tensor's extremes and a seeded random subsample of its values. Three range rules turn that
into a scale:

* ``minmax``: the largest magnitude seen on the grid's side(s);
* ``percentile``: the ``p``-th percentile of magnitudes;
* ``mse``: the clip threshold that minimises the quantization MSE of the collected values.

``auto`` applies each rule to every quantizer, measures the KL divergence between FP and
fake-quant outputs on held-out synthetic images (no real data), and keeps the best rule. The
measurements are returned for the report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfq.kernels.fake_quant import Grid, mse_optimal_scale
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear
from dfq.pipeline.quantize import QuantizedModel

METHODS = ("minmax", "percentile", "mse")


class RangeObserver:
    """Keeps ``min``, ``max`` and up to ``keep`` randomly sampled values of every tensor seen."""

    def __init__(self, keep: int = 200_000, seed: int = 0) -> None:
        self.keep = keep
        self.min = float("inf")
        self.max = float("-inf")
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        per_call = min(x.numel(), max(1, self.keep // 8))
        idx = torch.randint(0, x.numel(), (per_call,), generator=self.gen)
        self.samples.append(x[idx].cpu())
        self.count += 1
        total = sum(s.numel() for s in self.samples)
        if total > 2 * self.keep:  # thin out uniformly to bound memory
            cat = torch.cat(self.samples)
            keep_idx = torch.randperm(cat.numel(), generator=self.gen)[: self.keep]
            self.samples = [cat[keep_idx]]

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)


def scale_for(obs: RangeObserver, grid: Grid, method: str, percentile: float,
              bound: float | None) -> torch.Tensor:
    """Scale of one activation quantizer under a range rule. ``bound`` caps the range (6 after
    ReLU6). Unsigned grids look at the positive side only."""
    values = obs.values()
    if not grid.signed:
        values = values.clamp(min=0)
    if method == "minmax":
        pos = max(obs.max, 0.0) / grid.qmax
        neg = max(-obs.min, 0.0) / -grid.qmin if grid.signed else 0.0
        s = torch.tensor(max(pos, neg))
    elif method == "percentile":
        mags = values.abs()
        q = torch.quantile(mags[: 16_000_000], percentile / 100.0) if mags.numel() > 1 else mags.max()
        s = q / (grid.qmax if not grid.signed else min(grid.qmax, -grid.qmin))
    elif method == "mse":
        s = mse_optimal_scale(values, grid, candidates=100, lowest=0.05)
    else:
        raise ValueError(method)
    if bound is not None:
        s = torch.clamp(s, max=bound / grid.qmax)
    return torch.clamp(s.float().reshape(()), min=1e-8)


@dataclass
class CalibrationResult:
    method: str                      # the rule that was kept
    scores: dict[str, float]         # rule -> KL(FP || quantized) on held-out synthetic images
    num_images: int
    num_quantizers: int

    def to_dict(self) -> dict:
        return {"method": self.method, "kl_by_method": self.scores,
                "num_images": self.num_images, "num_quantizers": self.num_quantizers}


@torch.no_grad()
def output_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(softmax(fp) || softmax(q)) over a batch, in nats."""
    return float(F.kl_div(F.log_softmax(q_logits, 1), F.log_softmax(fp_logits, 1),
                          log_target=True, reduction="batchmean"))


@torch.no_grad()
def batched_logits(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def heldout_kd(qmodel: QuantizedModel, images: torch.Tensor, fp_logits: torch.Tensor, batch_size: int = 64) -> float:
    """Mean KL(FP || quantized) in nats on ``images`` (``fp_logits``: the FP model's logits on them),
    the quantized model in eval mode."""
    was_training = qmodel.module.training
    qmodel.module.eval()
    try:
        return output_kl(fp_logits, batched_logits(qmodel.module, images, batch_size))
    finally:
        qmodel.module.train(was_training)


@torch.no_grad()
def calibrate(qmodel: QuantizedModel, images: torch.Tensor, *, holdout: torch.Tensor | None = None,
              batch_size: int = 64, seed: int = 0) -> CalibrationResult:
    """Set every activation scale of ``qmodel`` from ``images`` (synthetic, model input space).

    ``holdout`` images (default: the last quarter of ``images``, which then are not used for
    ranges; with fewer than 8 images, all of them) score the rules when
    ``qmodel.config.calibration == "auto"``.
    """
    config = qmodel.config
    if holdout is None and config.calibration == "auto":
        if len(images) >= 8:
            cut = len(images) - max(4, len(images) // 4)
            images, holdout = images[:cut], images[cut:]
        else:
            holdout = images
    quantizers = qmodel.act_quantizers()
    observers = {}
    for i, (name, q) in enumerate(sorted(quantizers.items())):
        q.observer = observers[name] = RangeObserver(seed=seed + i)
    qmodel.set_enabled(weights=False, activations=False)
    try:
        batched_logits(qmodel.module, images, batch_size)
    finally:
        for q in quantizers.values():
            q.observer = None
    candidates = {m: {name: scale_for(observers[name], q.grid, m, config.percentile, q.upper_bound)
                      for name, q in quantizers.items()} for m in METHODS}

    def apply(method: str) -> None:
        for name, q in quantizers.items():
            q.scale.data.copy_(candidates[method][name])

    scores: dict[str, float] = {}
    methods = METHODS if config.calibration == "auto" else (config.calibration,)
    if config.calibration == "auto":
        qmodel.set_enabled(weights=False, activations=False)
        fp = batched_logits(qmodel.module, holdout, batch_size)
        qmodel.set_enabled(True, True)
        for m in methods:
            apply(m)
            scores[m] = output_kl(fp, batched_logits(qmodel.module, holdout, batch_size))
        best = min(scores, key=scores.get)
    else:
        best = config.calibration
    apply(best)
    qmodel.set_enabled(True, True)
    return CalibrationResult(best, scores, len(images), len(quantizers))


@dataclass
class BiasCorrectionResult:
    applied: bool                    # False when it raised the held-out KL and was undone
    layers: int
    num_images: int
    max_abs_shift: float             # largest per-channel bias change, in output units
    kl_before: float | None          # FP -> quantized KL on the held-out images
    kl_after: float | None

    def to_dict(self) -> dict:
        return {"applied": self.applied, "layers": self.layers, "num_images": self.num_images,
                "max_abs_shift": self.max_abs_shift, "kl_before": self.kl_before, "kl_after": self.kl_after}


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.float().mean(dim=[0] + list(range(2, t.dim())))


@torch.no_grad()
def bias_correct(qmodel: QuantizedModel, images: torch.Tensor, *, holdout: torch.Tensor | None = None,
                 fp_logits: torch.Tensor | None = None, max_images: int = 64) -> BiasCorrectionResult:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2, with
    synthetic images in place of data): quantized weights and clipped activations shift the mean of
    every layer's output; the shift is measured per output channel and subtracted from the bias.

    One FP pass (quantizers off) records each conv/linear output's per-channel mean over
    ``images[:max_images]``; one quantized pass then visits the layers in order, and each layer's
    correction is applied before its output reaches the next layer, so later layers are corrected
    for what the corrected earlier ones feed them. The shift goes into the folded bias (the BN
    ``beta`` in Tune mode, else the conv/linear bias).

    The target means are those of the model's own float weights (quantizers off): the bias that
    quantizing *these* weights introduces is removed. After fine-tuning they are not the FP
    model's weights; aiming at the FP model's layer means instead was measured worse (ResNet-20
    W4A4 acq: it raised the held-out KL and was rejected, drop 4.56; aiming at the fine-tuned
    float weights: drop 3.24).

    With ``holdout`` images, the KL to the FP model (``fp_logits`` on ``holdout``; default: the
    quantizers-off model, which is the FP model before fine-tuning) is measured before and after,
    and the correction is undone when it did not lower it (data-free: never real images)."""
    images = images[:max_images]
    layers = {n: m for n, m in qmodel.module.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    was_training = qmodel.module.training
    qmodel.module.eval()
    fp_means: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: fp_means.__setitem__(n, _channel_mean(out)))
               for n, m in layers.items()]
    qmodel.set_enabled(False, False)
    try:
        qmodel.module(images)
    finally:
        for h in handles:
            h.remove()
    fp_holdout = kl_before = kl_after = None
    try:
        if holdout is not None and len(holdout):
            fp_holdout = fp_logits if fp_logits is not None else batched_logits(qmodel.module, holdout, 64)
    finally:
        qmodel.set_enabled(True, True)
    if fp_holdout is not None:
        kl_before = output_kl(fp_holdout, batched_logits(qmodel.module, holdout, 64))
    # folded bias = (b - mean) * g + beta: a shift of beta (or of a BN-less layer's bias) shifts the
    # output one for one
    biases = {n: m.bn_bias if getattr(m, "has_bn", False) else m.bias for n, m in layers.items()}
    saved = {n: b.detach().clone() for n, b in biases.items()}

    shifts: dict[str, float] = {}

    def correct(mod, inp, out, n):
        delta = fp_means[n].to(out.dtype) - _channel_mean(out).to(out.dtype)
        biases[n].add_(delta)
        shifts[n] = float(delta.abs().max())
        return out + delta.reshape([1, -1] + [1] * (out.dim() - 2))

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: correct(mod, inp, out, n)) for n, m in layers.items()]
    try:
        qmodel.module(images)
    finally:
        for h in handles:
            h.remove()
    applied = True
    if fp_holdout is not None:
        kl_after = output_kl(fp_holdout, batched_logits(qmodel.module, holdout, 64))
        if not kl_after < kl_before:
            applied = False
            for n, b in biases.items():
                b.copy_(saved[n])
    qmodel.module.train(was_training)
    return BiasCorrectionResult(applied, len(layers), len(images), max(shifts.values(), default=0.0),
                                kl_before, kl_after)
