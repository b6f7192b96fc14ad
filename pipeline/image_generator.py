"""A small convolutional generator as the variable of BN inversion (``SynthConfig.param="generator"``).

Genie-D (Jeon et al., CVPR 2023) does not move the pixels of its images: each batch gets a fresh
generator and one latent vector per image, and both are trained on the BN-statistics loss, so
every image is the output of up-sampling convolutions, which gives it the local structure of the
generator's architecture instead of per-pixel noise. Genie's generator costs about 1.1 GMAC per
224x224 image (a 128-channel conv at 112x112); this one up-samples from 1/8 of the input side
with 64 -> 32 -> 16 -> 3 channels, about 0.15 GMAC per 224x224 image (EfficientNet-Lite0's
forward pass is about 0.4): on Lite0 a step of a batch of 32 on 1 thread took 5.7 s against a
pixel step's 6.1 s (one measurement beside two jobs).
Its last layers are Genie's: ``tanh`` then a BatchNorm without affine parameters (batch
statistics), so every image channel has mean 0 and variance 1 over the batch, the scale of the
model's normalised inputs; the images are clamped to the pixel box.

:class:`GeneratorParam` has :class:`~dfq.pipeline.augment.ImageParam`'s interface: ``images()``,
``project()`` (a no-op: the clamp is part of ``images()``) and ``variables()``, the tensors Adam
moves with each one's learning rate relative to the pixel rate (Genie's 0.1 for the latents and
0.01 for the generator against the pixel default 0.2).
"""
from __future__ import annotations

import torch
from torch import nn

GENERATOR = "generator"   # the SynthConfig.param value
LATENT_DIM = 128
WIDTHS = (64, 32, 16)
# Adam's learning rates relative to SynthConfig.lr (0.2 at the budgets' presets)
LATENT_LR, NET_LR = 0.5, 0.05


class LatentGenerator(nn.Module):
    """``z [n, latent] -> images [n, channels, H, W]``: a linear map to a ``WIDTHS[0]``-channel map
    of side ``H / 8``, then per width a nearest 2x up-sampling and a 3x3 conv (BatchNorm and
    LeakyReLU between), ``tanh`` and a BatchNorm without affine parameters."""

    def __init__(self, size: tuple[int, int], channels: int = 3, latent: int = LATENT_DIM,
                 widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        factor = 2 ** len(widths)
        h, w = size
        if h % factor or w % factor:
            raise ValueError(f"the generator up-samples {factor}x: image side {h}x{w} must be a multiple of "
                             f"{factor} (use param 'pixel' or 'spectrum' for this input size)")
        self.start = (widths[0], h // factor, w // factor)
        self.linear = nn.Linear(latent, widths[0] * (h // factor) * (w // factor))
        chans = list(widths) + [channels]
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        for i in range(len(widths)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)]
            if i + 1 < len(widths):
                layers += [nn.BatchNorm2d(chans[i + 1]), nn.LeakyReLU(0.2)]
        layers += [nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.linear(z).reshape(z.shape[0], *self.start))


class GeneratorParam:
    """One batch's generator and latents; its images are ``clamp(G(z), lo, hi)``. The generator's
    initial weights and the latents are drawn from ``gen`` (the batch's stream), so a batch is
    reproducible from its seed."""

    def __init__(self, n: int, chw: tuple[int, int, int], lo: torch.Tensor, hi: torch.Tensor,
                 gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        c, h, w = chw
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = LatentGenerator((h, w), c).to(device=device, dtype=dtype).train()
        self.z = torch.randn(n, LATENT_DIM, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        self.lo, self.hi = lo, hi

    def variables(self) -> list[tuple[torch.Tensor, float]]:
        return [(self.z, LATENT_LR)] + [(p, NET_LR) for p in self.net.parameters()]

    def images(self) -> torch.Tensor:
        """The images (differentiable with respect to the latents and the generator)."""
        return self.net(self.z).clamp(self.lo, self.hi)

    def project(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Nothing to do: :meth:`images` clamps to the box."""
