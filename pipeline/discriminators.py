"""DDAQ's two discriminators and its per-layer importance prior.

* :class:`BNStatsDiscriminator` tells the batch statistics of synthetic features from plausible
  statistics of real data at every BN layer. A generated batch is split into groups of ``g``
  samples; each group gives one token per layer, ``[mu_c, s_c]`` over (group, H, W) (``[2C]``).
  "Real" tokens are the running statistics plus the sampling noise a group of ``g`` real images
  would show: ``m + N(0, v / (g H W))`` for the mean and ``sqrt(v) * (1 + N(0, 1 / (2 g H W)))``
  for the standard deviation. One small MLP per layer scores the tokens; the generator is trained
  to make its tokens score as real (an adversarial, learned form of BN-statistics matching).
* :class:`DiscrepancyDiscriminator` tells the features of the FP model from those of the
  quantized model on the same synthetic images, per quantized layer (global-average-pooled conv
  outputs, ``[N, C_l]``, one linear probe per layer). The generator *cooperates* with it (it
  seeks images on which FP and quantized features are easy to tell apart, i.e. where the
  quantized model is still wrong); the student is trained to fool it.
* :func:`importance_prior` weighs both per layer: the relative weight-quantization error of each
  quantized layer, normalised to mean 1 (layers that quantization hurts most count most).

Losses are binary cross-entropies with logits; every layer term is multiplied by its weight and
the sum is divided by the number of layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(dim: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


def group_stats(features: torch.Tensor, group: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N // group, 2C]`` tokens (mean, std over each group's samples and space)."""
    n, c = features.shape[:2]
    g = n // group
    if g == 0:
        raise ValueError(f"batch of {n} is smaller than the group size {group}")
    x = features[: g * group].reshape(g, group, c, -1).transpose(1, 2).reshape(g, c, -1)
    mu = x.mean(dim=2)
    sd = x.var(dim=2, unbiased=False).add(1e-8).sqrt()
    return torch.cat([mu, sd], dim=1)


class BNStatsDiscriminator(nn.Module):
    def __init__(self, running: list[tuple[torch.Tensor, torch.Tensor]], spatial: list[int],
                 weights: torch.Tensor | None = None, group: int = 8) -> None:
        super().__init__()
        self.group = group
        self.heads = nn.ModuleList(_mlp(2 * len(m)) for m, _ in running)
        for i, (m, v) in enumerate(running):
            self.register_buffer(f"mean_{i}", m.detach().clone().float())
            self.register_buffer(f"var_{i}", v.detach().clone().float())
        self.spatial = list(spatial)
        self.register_buffer("weights", torch.ones(len(running)) if weights is None else weights.float().clone())

    def _scale(self, i: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{i}").to(dtype), getattr(self, f"var_{i}").to(dtype).add(1e-8).sqrt()

    def real_tokens(self, i: int, count: int, gen: torch.Generator | None = None) -> torch.Tensor:
        m, s = self._scale(i, torch.float32)
        k = self.group * self.spatial[i]
        mu = m + torch.randn(count, len(m), generator=gen) * s / k ** 0.5
        sd = s * (1 + torch.randn(count, len(m), generator=gen) / (2 * k) ** 0.5)
        return torch.cat([mu, sd], dim=1)

    def _normalise(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        m, s = self._scale(i, tokens.dtype)
        c = len(m)
        return torch.cat([(tokens[:, :c] - m) / s, tokens[:, c:] / s - 1], dim=1)

    def score(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.heads[i](self._normalise(i, tokens)).squeeze(1)

    def discriminator_loss(self, features: list[torch.Tensor], gen: torch.Generator | None = None) -> torch.Tensor:
        """Train the heads: real tokens -> 1, (detached) synthetic tokens -> 0."""
        total = features[0].new_zeros(())
        for i, f in enumerate(features):
            fake = group_stats(f.detach(), self.group)
            real = self.real_tokens(i, len(fake), gen).to(f.device, f.dtype)
            lr, lf = self.score(i, real), self.score(i, fake)
            term = F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) + \
                F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
            total = total + self.weights[i] * term
        return total / len(features)

    def generator_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The generator's term: its tokens should score as real."""
        total = features[0].new_zeros(())
        for i, f in enumerate(features):
            lf = self.score(i, group_stats(f, self.group))
            total = total + self.weights[i] * F.binary_cross_entropy_with_logits(lf, torch.ones_like(lf))
        return total / len(features)


class DiscrepancyDiscriminator(nn.Module):
    def __init__(self, channels: list[int], weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.probes = nn.ModuleList(nn.Linear(c, 1) for c in channels)
        self.register_buffer("weights", torch.ones(len(channels)) if weights is None else weights.float().clone())

    @staticmethod
    def _pool(f: torch.Tensor) -> torch.Tensor:
        p = f.flatten(2).mean(dim=2) if f.dim() > 2 else f
        return p / p.detach().pow(2).mean(dim=1, keepdim=True).add(1e-8).sqrt()

    def _bce(self, fp: list[torch.Tensor], q: list[torch.Tensor], target_fp: float, target_q: float) -> torch.Tensor:
        total = fp[0].new_zeros(())
        for i, (a, b) in enumerate(zip(fp, q)):
            la, lb = self.probes[i](self._pool(a)).squeeze(1), self.probes[i](self._pool(b)).squeeze(1)
            term = F.binary_cross_entropy_with_logits(la, torch.full_like(la, target_fp)) + \
                F.binary_cross_entropy_with_logits(lb, torch.full_like(lb, target_q))
            total = total + self.weights[i] * term
        return total / len(fp)

    def discriminator_loss(self, fp: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
        """Train the probes: FP features -> 0, quantized features -> 1 (inputs detached)."""
        return self._bce([f.detach() for f in fp], [f.detach() for f in q], 0.0, 1.0)

    def generator_loss(self, fp: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
        """The generator seeks images where the two are easy to tell apart (same targets as the probes)."""
        return self._bce(fp, q, 0.0, 1.0)

    def student_loss(self, fp: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
        """The student's quantized features should pass for FP ones."""
        total = q[0].new_zeros(())
        for i, b in enumerate(q):
            lb = self.probes[i](self._pool(b)).squeeze(1)
            total = total + self.weights[i] * F.binary_cross_entropy_with_logits(lb, torch.zeros_like(lb))
        return total / len(q)


@torch.no_grad()
def importance_prior(layers: list[nn.Module]) -> torch.Tensor:
    """Relative weight-quantization error ``||Q(W) - W||^2 / ||W||^2`` of each quantized layer
    (``QuantConv2d``/``QuantLinear``, on the folded weight), normalised to mean 1."""
    errs = []
    for m in layers:
        w = m.folded()[0]
        wq = m.weight_quantizer(w)
        errs.append(float((wq - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-12)))
    t = torch.tensor(errs)
    return t / t.mean().clamp(min=1e-12)
