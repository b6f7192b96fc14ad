"""Image generators for the generative data-free methods.

:class:`ConditionalGenerator` is GDFQ's class-conditional generator: the noise ``z`` (``[N, Z]``) is
multiplied by a learned label embedding, a linear layer maps it to a ``base x s0 x s0`` feature map
(``s0`` = input size / 2^k), and ``k`` stages of (nearest 2x upsampling, 3x3 conv, BatchNorm,
LeakyReLU 0.2) grow it to the model's input size; a 3x3 conv to the image channels, ``tanh`` and a
BatchNorm without affine parameters finish it, so the images come out per-channel standardised,
like the model's normalised inputs. Small inputs (CIFAR, <= 64 px) use GDFQ's two stages; larger
ones use four (a 224 px image starts from 14 x 14), halving the width at every stage after the
second, which keeps the first linear layer small.

:class:`AttentionConditionalGenerator` is ACQ's generator: the same network, conditioned on a label
*and* an attention-centre position ``c`` in ``[-1, 1]^2`` (x, y; the convention of
:mod:`dfq.kernels.attention`). The position enters twice: a small MLP of ``c`` multiplies the noise
together with the label embedding, and a Gaussian bump centred at ``c`` is appended as an extra
channel to the first feature map, so the convolutions can place content where the condition says.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _stages(size: int) -> int:
    return 2 if size <= 64 else 4


class ConditionalGenerator(nn.Module):
    """``forward(z [N, latent], labels [N]) -> images [N, C, H, W]`` (H = W = ``image_size``)."""

    position_channels = 0

    def __init__(self, num_classes: int, image_size: int, channels: int = 3, latent: int = 100,
                 base: int = 128) -> None:
        super().__init__()
        stages = _stages(image_size)
        if image_size % (2 ** stages):
            raise ValueError(f"image size {image_size} must be divisible by {2 ** stages}")
        self.num_classes, self.image_size, self.latent = num_classes, image_size, latent
        self.init_size = image_size // (2 ** stages)
        self.base = base
        self.embed = nn.Embedding(num_classes, latent)
        self.fc = nn.Linear(latent, base * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(base)
        layers: list[nn.Module] = []
        width = base + self.position_channels
        for i in range(stages):
            out = base if i < 2 else max(32, base // 2 ** (i - 1))
            out = out if i < stages - 1 else max(32, min(out, 64))
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, out, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        self.body = nn.Sequential(*layers)
        self.to_image = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh(),
                                      nn.BatchNorm2d(channels, affine=False))

    def _code(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.embed(labels) * z

    def _check(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent:
            raise ValueError(f"noise must be [N, {self.latent}], got {tuple(z.shape)}")
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must be [N] with N = {z.shape[0]}, got {tuple(labels.shape)}")

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(z, labels)
        return self._decode(self._code(z, labels))

    def sample(self, batch: int, gen: torch.Generator, centre_radius: float):
        """The conditions of one batch, drawn from ``gen``: ``(z [N, latent], labels [N], None)``."""
        labels = torch.randint(0, self.num_classes, (batch,), generator=gen)
        return torch.randn(batch, self.latent, generator=gen), labels, None

    def generate(self, module: nn.Module, z: torch.Tensor, labels: torch.Tensor, centres) -> torch.Tensor:
        """``module`` (this generator, or a DistributedDataParallel around it) on one batch."""
        return module(z, labels)

    def _decode(self, code: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(code).view(-1, self.base, self.init_size, self.init_size)
        h = self.bn0(h)
        if extra is not None:
            h = torch.cat([h, extra], dim=1)
        return self.to_image(self.body(h))


class AttentionConditionalGenerator(ConditionalGenerator):
    """``forward(z [N, latent], labels [N], centres [N, 2]) -> images``: ACQ's generator."""

    position_channels = 1

    def __init__(self, num_classes: int, image_size: int, channels: int = 3, latent: int = 100,
                 base: int = 128, bump_width: float = 0.35) -> None:
        super().__init__(num_classes, image_size, channels, latent, base)
        self.position = nn.Sequential(nn.Linear(2, latent), nn.LeakyReLU(0.2), nn.Linear(latent, latent))
        self.bump_width = bump_width

    def bump(self, centres: torch.Tensor) -> torch.Tensor:
        """A Gaussian of width ``bump_width`` (in [-1, 1] units) at each centre: ``[N, 1, s0, s0]``."""
        s = self.init_size
        coords = (torch.arange(s, device=centres.device, dtype=centres.dtype) + 0.5) / s * 2 - 1
        dx = coords.view(1, 1, s) - centres[:, 0].view(-1, 1, 1)
        dy = coords.view(1, s, 1) - centres[:, 1].view(-1, 1, 1)
        return torch.exp(-(dx ** 2 + dy ** 2) / (2 * self.bump_width ** 2)).unsqueeze(1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self._check(z, labels)
        if centres.shape != (z.shape[0], 2):
            raise ValueError(f"centres must be [N, 2] (x, y in [-1, 1]), got {tuple(centres.shape)}")
        code = self.embed(labels) * z * (1 + self.position(centres))
        return self._decode(code, self.bump(centres))

    def sample(self, batch: int, gen: torch.Generator, centre_radius: float):
        """Pairs that share a condition (label, centre) and differ in noise, for the mode-seeking pair
        term: samples ``i`` and ``i + N/2`` have the same condition. ``(z, labels, centres [N, 2])``."""
        half = batch // 2
        labels = torch.randint(0, self.num_classes, (half,), generator=gen).repeat(2)
        centres = sample_centres(half, centre_radius, gen).repeat(2, 1)
        return torch.randn(2 * half, self.latent, generator=gen), labels, centres

    def generate(self, module: nn.Module, z: torch.Tensor, labels: torch.Tensor, centres) -> torch.Tensor:
        return module(z, labels, centres)


GENERATORS: dict[str, type[ConditionalGenerator]] = {"conditional": ConditionalGenerator,
                                                     "acq": AttentionConditionalGenerator}


def make_generator(kind: str, num_classes: int, input_size: tuple[int, int, int], **kw) -> ConditionalGenerator:
    """``kind`` is ``conditional`` (GDFQ) or ``acq``; ``input_size`` is the model's ``(C, H, W)``."""
    c, h, w = input_size
    if h != w:
        raise ValueError(f"generators make square images; the model takes {h}x{w}")
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator kind {kind!r} ({', '.join(GENERATORS)})")
    return GENERATORS[kind](num_classes, h, c, **kw)


def sample_centres(n: int, radius: float, gen: torch.Generator) -> torch.Tensor:
    """Attention-centre conditions, uniform in the disc of ``radius`` around the image centre."""
    r = radius * torch.rand(n, generator=gen).sqrt()
    phi = 2 * math.pi * torch.rand(n, generator=gen)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=1)
