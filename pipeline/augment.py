"""The random views BN inversion optimises its pixels through (``pipeline.synthesize``).

Each step sees the image batch through a fresh random augmentation, which keeps the images from
fitting one pixel-exact view of the model: :func:`augment` moves the whole input (DeepInversion's
jitter and flip), :func:`swing_convolutions` moves the input of each strided convolution on its own
(Genie's swing convolution); :func:`initial_noise` is where the pixels start and
:class:`ImageParam` the variable the optimiser (:class:`PixelAdam`) moves (the pixels, or their
spectrum). Every draw comes from the caller's ``torch.Generator``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["augment", "swing_convolutions", "initial_noise", "scale_to_box", "random_crop", "center_crop", "gaussian_smooth", "desaturate", "INITS", "ImageParam", "PARAMS", "PixelAdam"]


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


def random_crop(x: torch.Tensor, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A ``size`` window of ``x`` ``[B, C, H, W]`` at one offset drawn uniformly from ``gen`` (the same
    for the whole batch): how BN inversion on a larger canvas shows the model an input-sized view."""
    h, w = size
    dy = int(torch.randint(0, x.shape[2] - h + 1, (), generator=gen))
    dx = int(torch.randint(0, x.shape[3] - w + 1, (), generator=gen))
    return x[..., dy:dy + h, dx:dx + w]


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centred ``size`` window of ``x`` ``[B, C, H, W]`` (extra pixels split evenly, the odd one
    after)."""
    h, w = size
    dy, dx = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[..., dy:dy + h, dx:dx + w]


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` filtered per channel by a normalised 3x3 Gaussian of standard deviation
    ``sigma`` pixels (reflect-padded, so the size stays), differentiably: the smoothing of MCT's
    image pipeline, which the model sees every step and the result keeps. ``sigma`` 0: ``x``."""
    if sigma <= 0:
        return x
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    k1 = torch.exp(-t * t / (2 * sigma * sigma))
    k = torch.outer(k1, k1)
    k = (k / k.sum()).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])


def desaturate(x: torch.Tensor, strength: float, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` in the normalised space whose ``[0, 1]`` pixel box is ``[lo, hi]`` (each
    ``[1, C, 1, 1]``), with every pixel's colour pulled towards its grey (the mean of its channels, in
    pixel units) by ``strength``: ``p' = g + (1 - strength) * (p - g)``, differentiably. Grey pixels
    stay, pixels in the box stay in it. Real images' colour channels correlate about 0.9, BN-inversion
    images' about 0.6 (README "Methods"): seen through this filter every step, the optimiser can only
    put colour into what the model sees at ``1 - strength`` of its rate. ``strength`` 0: ``x``."""
    if strength <= 0:
        return x
    std = 1.0 / (hi - lo)
    mean = -lo * std
    p = x * std + mean
    grey = p.mean(1, keepdim=True)
    return (grey + (1.0 - strength) * (p - grey) - mean) / std


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


INITS = ("white", "pink", "diverse")


def initial_noise(n: int, chw: tuple[int, int, int], kind: str, gen: torch.Generator) -> torch.Tensor:
    """The images BN inversion starts from, ``[n, C, H, W]``.

    ``white``: independent N(0, 1) pixels. ``pink``: the sum of N(0, 1) fields drawn at every octave
    of the image side (1/2, 1/4, ... down to 4 pixels, and full size), each bilinearly upsampled, with
    equal variance per octave, so that neighbouring pixels are correlated as in natural images (whose
    power falls as 1/f) instead of starting as independent noise that a few hundred steps cannot
    remove. Both have zero mean and unit variance per pixel. ``diverse``: the pink field of every
    (image, channel) times a gain and plus an offset, each drawn from N(0, 1/4) per (image, channel)
    (Sony MCT's "diverse" start, on pink instead of box-filtered white noise): every image starts
    with its own colour cast and contrast, where the other kinds start all images alike. The caller
    scales it to its pixel box (:func:`scale_to_box`)."""
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
    pink = total / total.std()
    if kind != "diverse":
        return pink
    gain = 0.5 * torch.randn((n, c, 1, 1), generator=gen, dtype=torch.float32)
    offset = 0.5 * torch.randn((n, c, 1, 1), generator=gen, dtype=torch.float32)
    return pink * gain + offset


def scale_to_box(noise: torch.Tensor, kind: str, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``noise`` from :func:`initial_noise` in the box ``[lo, hi]`` (per channel, broadcastable) the
    pixels live in. ``white`` and ``pink`` are used as they are (unit variance in the model's
    normalised input space) and clamped; ``diverse`` is read in units of the box's half-width around its
    centre, so that its spread of colours and contrasts is the same fraction of the valid range
    whatever the model's input normalisation."""
    if kind == "diverse":
        noise = (lo + hi) / 2 + noise * (hi - lo) / 2
    return noise.clamp(lo, hi)


PARAMS = ("pixel", "spectrum")


class ImageParam:
    """The variable BN inversion optimises, and the images ``[n, C, H, W]`` it stands for.

    ``pixel``: the pixels themselves. ``spectrum``: the 2-D real FFT of the images (orthonormal),
    divided by ``1 / f`` (``f`` the spatial frequency in cycles per pixel, at least ``1 / max(H, W)``;
    the scale normalised to a mean square of 1), so that ``images = irfft2(spectrum * scale)``. The
    map is linear and invertible, so both hold the same images; what differs is the optimiser's step:
    Adam moves every coordinate of its variable by about the learning rate, which in pixel space is
    independent noise per pixel and in the scaled spectrum a 1/f ("pink") field, the correlation of
    natural images (neighbouring pixels of a step correlate about 0.8 at 224x224 instead of 0).
    This is the decorrelated parametrisation of feature visualisation (Olah et al., Distill 2017).
    :meth:`project` clamps the images to a box and maps them back."""

    def __init__(self, images: torch.Tensor, kind: str = "pixel") -> None:
        if kind not in PARAMS:
            raise ValueError(f"image parametrisation must be one of {PARAMS}, got {kind!r}")
        self.size = tuple(images.shape[2:])
        if kind == "pixel":
            self.scale = None
            self.tensor = images.detach().clone()
        else:
            h, w = self.size
            f = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2)
            scale = 1.0 / f.clamp_min(1.0 / max(h, w))
            self.scale = (scale / scale.pow(2).mean().sqrt()).to(images.device, images.dtype)
            self.tensor = self._to_spectrum(images.detach())
        self.tensor.requires_grad_(True)

    def variables(self) -> list[tuple[torch.Tensor, float]]:
        """The tensors Adam moves, each with its learning rate relative to the step's."""
        return [(self.tensor, 1.0)]

    def _to_spectrum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.fft.rfft2(x, norm="ortho") / self.scale).contiguous()

    def images(self) -> torch.Tensor:
        """The images (differentiable with respect to :attr:`tensor`)."""
        if self.scale is None:
            return self.tensor
        return torch.fft.irfft2(torch.view_as_complex(self.tensor) * self.scale, s=self.size, norm="ortho")

    @torch.no_grad()
    def project(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Clamp the images to ``[lo, hi]`` (broadcast per channel), in place."""
        x = self.images().clamp(lo, hi)
        self.tensor.copy_(x if self.scale is None else self._to_spectrum(x))


class PixelAdam:
    """Adam (Kingma & Ba) on one tensor, with the learning rate passed per step::

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        x <- x - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    (b1, b2, eps) = (0.9, 0.999, 1e-8), the ``torch.optim.Adam`` defaults. Written out because
    constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (seconds of start-up on
    a small CPU machine), which a synthesis-only run otherwise never needs."""

    def __init__(self, x: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.x = x
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = torch.zeros_like(x)
        self.v = torch.zeros_like(x)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        g = self.x.grad
        if g is None:
            return
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        denom = (self.v / c2).sqrt_().add_(self.eps)
        self.x.addcdiv_(self.m, denom, value=-lr / c1)
