"""The random views BN inversion optimises its pixels through (``pipeline.synthesize``).

Each step sees the image batch through a fresh random augmentation, which keeps the images from
fitting one pixel-exact view of the model: :func:`augment` moves the whole input (DeepInversion's
jitter and flip), :func:`swing_convolutions` moves the input of each strided convolution on its own
(Genie's swing convolution); :func:`initial_noise` is where the pixels start. Every draw comes
from the caller's ``torch.Generator``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["augment", "swing_convolutions", "initial_noise", "INITS"]


def augment(x: torch.Tensor, jitter: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """DeepInversion-style augmentation of a batch ``[B, C, H, W]``: one circular shift
    ``(dy, dx)`` drawn uniformly from ``[-jitter, jitter]^2`` and, if ``flip``, a horizontal flip
    with probability 1/2 (the same for the whole batch). Draws come from ``gen`` (CPU)."""
    if jitter > 0:
        d = torch.randint(-jitter, jitter + 1, (2,), generator=gen)
        dy, dx = int(d[0]), int(d[1])
        if dy or dx:
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


@contextlib.contextmanager
def swing_convolutions(model: nn.Module, gen: torch.Generator):
    """While active, every ``nn.Conv2d`` with a stride above 1 reads its input reflection-padded
    by one pixel and cropped back to its size at a random offset in ``{0, 1, 2}^2`` drawn from
    ``gen`` on each call ("swing convolution", Genie, Jeon et al. 2023). A strided convolution
    otherwise sees only one sampling phase of its input, so the pixels between its taps get
    gradient from nowhere else and BN inversion leaves a checkerboard there; the random phase
    spreads the gradient over every pixel. The input-level jitter of :func:`augment` moves all
    layers together; this moves each strided layer on its own."""

    def shift(module: nn.Module, inputs: tuple) -> tuple:
        x = inputs[0]
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            return inputs
        h, w = x.shape[2:]
        d = torch.randint(0, 3, (2,), generator=gen)
        y = F.pad(x, (1, 1, 1, 1), mode="reflect")[..., int(d[0]):int(d[0]) + h, int(d[1]):int(d[1]) + w]
        return (y, *inputs[1:])

    handles = [m.register_forward_pre_hook(shift) for m in model.modules()
               if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


INITS = ("white", "pink")


def initial_noise(n: int, chw: tuple[int, int, int], kind: str, gen: torch.Generator) -> torch.Tensor:
    """The images BN inversion starts from, ``[n, C, H, W]``, zero mean and unit variance per pixel.

    ``white``: independent N(0, 1) pixels. ``pink``: the sum of N(0, 1) fields drawn at every octave
    of the image side (1/2, 1/4, ... down to 4 pixels, and full size), each bilinearly upsampled, with
    equal variance per octave, so that neighbouring pixels are correlated as in natural images (whose
    power falls as 1/f) instead of starting as independent noise that a few hundred steps cannot
    remove."""
    c, h, w = chw
    if kind == "white":
        return torch.randn((n, c, h, w), generator=gen, dtype=torch.float32)
    fields, side = [torch.randn((n, c, h, w), generator=gen, dtype=torch.float32)], min(h, w)
    while side // 2 >= 4:
        side //= 2
        low = torch.randn((n, c, max(1, h * side // min(h, w)), max(1, w * side // min(h, w))),
                          generator=gen, dtype=torch.float32)
        fields.append(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))
    total = torch.stack([f / f.std() for f in fields]).sum(0)
    return total / total.std()
