"""Synthetic calibration images from a trained model's own BatchNorm statistics (method ``bns``).

BN-statistics inversion (ZeroQ, Cai et al. 2020; DeepInversion, Yin et al. 2020): start from
Gaussian noise ``x`` in the model's normalised input space and optimise the pixels with Adam so
that, layer by layer, the batch statistics of every BatchNorm input match that layer's running
statistics, while the FP model classifies each image as a chosen target label::

    L(x) = bn_weight * (BNS(x) + (first_bn_weight - 1) * BNS_1(x)) + ce_weight * CE(f(x~), y)
           + tv_weight * TV(x~) + l2_weight * mean(x~^2)      (BNS_1: the first BN layer's term)

(``CE`` becomes the negated logit spread with ``output_loss="minmax"``; with ``granularity="all"``
``BNS`` compares the statistics of all images together, see :class:`SynthConfig`.)

``x~`` is ``x`` after a random augmentation drawn anew each step (a circular shift by up to
``jitter`` pixels in each direction and a random horizontal flip of the whole batch, as in
DeepInversion), which keeps the images from over-fitting pixel-exact patterns. After every step
the pixels are clamped to the box that RGB values in ``[0, 1]`` map to under the model's input
normalisation. Pixels start from ``init`` noise (:func:`initial_noise`); for the first ``coarse``
fraction of the steps the model sees them average-pooled 2x2 (DeepInversion's multi-resolution).
Adam moves the pixels themselves (``param="pixel"``) or their 1/f-scaled spectrum
(``param="spectrum"``, :class:`~dfq.pipeline.augment.ImageParam`), which makes every step a
smooth field instead of per-pixel noise, or a small generator and one latent per image, trained
per batch as Genie-D does (``param="generator"``, :mod:`dfq.pipeline.image_generator`; ``init``
does not apply there).

The generative methods reuse :class:`BNStatsHook` (per-forward batch statistics of every
``BatchNorm2d`` input, with gradient, and the per-layer terms) and the plain functions here.

Determinism: every random draw (init noise, label permutation, jitter, flips) comes from a
``torch.Generator`` on the CPU seeded from ``(config.seed, batch index)``; the global RNG is
never touched. The same seed and config therefore give bit-identical images on the same machine
and a run resumed at batch ``k`` (``start_batch=k``) reproduces batches ``k, k+1, ...`` exactly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfq.common import distributed as D
from dfq.common.progress import progress as progress_bar
from dfq.pipeline.augment import (INITS, PARAMS, ImageParam, PixelAdam, augment, center_crop, desaturate, gaussian_smooth, initial_noise,
                                  random_crop, scale_to_box, swing_convolutions)
from dfq.pipeline.bn_stats import BNStatsHook, batch_mean_var
from dfq.pipeline.image_generator import GENERATOR, GeneratorParam
from dfq.pipeline.models import is_small_input

__all__ = [
    "SynthConfig", "BNStatsHook", "synthesize", "synthesize_batches", "target_labels",
    "pixel_bounds", "total_variation", "augment", "evaluate_synthetic", "batch_mean_var", "swing_convolutions",
    "initial_noise",
]

Budget = Literal["fast", "default", "long"]
GRANULARITIES = ("batch", "all")
OUTPUT_LOSSES = ("ce", "minmax")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class SynthConfig:
    """Settings of BN-statistics inversion.

    ``num_images`` images are made in ``ceil(num_images / batch_size)`` independent batches
    (the last one may be smaller); each batch is optimised for ``steps`` Adam steps with
    learning rate ``lr`` decayed on a half-cosine to ``lr * 0.01`` (lr_t = lr_min + (lr - lr_min)
    * (1 + cos(pi t / steps)) / 2). The loss weights are documented in the module docstring; a
    weight of 0 switches its term off (and skips computing it). ``jitter`` is the largest
    circular shift in pixels (0 = none); ``flip`` enables random horizontal flips; ``swing`` shifts
    the input of every strided convolution by a random pixel each step (:func:`swing_convolutions`).
    ``first_bn_weight``, ``coarse``, ``init``: see the module docstring.

    ``granularity="all"`` matches the BN statistics of all ``num_images`` together instead of each
    batch's (Sony MCT's default "all images" granularity): a batch need not carry the population's
    statistics by itself, only the whole set. ``output_loss="minmax"`` replaces the cross-entropy
    to target labels by the negated spread of each image's logits (MCT's default output loss):
    the images are pushed to be confidently something, not a chosen class. ``canvas`` > 0 optimises
    images that many pixels taller and wider and shows the model a random input-sized crop of them each
    step (before the jitter and flip), keeping the centre crop at the end (MCT's random-crop image
    pipeline): every pixel of the result is seen at many positions, without the wrap-around seam of
    the circular jitter. ``smooth`` > 0: the model sees the images through a 3x3 Gaussian of that
    standard deviation in pixels every step, and the result is the smoothed images (MCT's
    smoothing, sigma 1.25 there; on in the reconstruction recipes' large-input presets, see
    :meth:`for_budget`). ``desaturate`` in [0, 1): the model sees every pixel's colour pulled that far
    towards its grey, and the result is the desaturated images (:func:`~dfq.pipeline.augment.desaturate`;
    applied after the smoothing). ``init="diverse"``: :func:`~dfq.pipeline.augment.initial_noise`. The others are off in
    every preset (README "Methods" has the EfficientNet-Lite0 W4A8 measurements)."""

    num_images: int
    batch_size: int
    steps: int
    lr: float
    bn_weight: float = 1.0
    ce_weight: float = 0.1
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    jitter: int = 0
    flip: bool = False
    swing: bool = False
    first_bn_weight: float = 1.0
    coarse: float = 0.0
    init: str = "white"                 # white | pink
    param: str = "pixel"                # pixel | spectrum | generator
    granularity: str = "batch"          # batch | all
    output_loss: str = "ce"             # ce | minmax
    canvas: int = 0
    smooth: float = 0.0
    desaturate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SynthConfig: {msg}")

        for name in ("num_images", "batch_size", "steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a positive finite number, got {self.lr!r}")
        for name in ("bn_weight", "ce_weight", "tv_weight", "l2_weight", "first_bn_weight"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                 f"{name} must be a finite number >= 0, got {v!r}")
        need(self.bn_weight > 0 or self.ce_weight > 0,
             "at least one of bn_weight and ce_weight must be > 0 (otherwise nothing is matched)")
        need(isinstance(self.jitter, int) and not isinstance(self.jitter, bool)
             and self.jitter >= 0, f"jitter must be an integer >= 0, got {self.jitter!r}")
        need(isinstance(self.flip, bool), f"flip must be a bool, got {self.flip!r}")
        need(isinstance(self.swing, bool), f"swing must be a bool, got {self.swing!r}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(self.param in PARAMS + (GENERATOR,), f"param must be one of {PARAMS + (GENERATOR,)}, got {self.param!r}")
        need(self.granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        need(self.output_loss in OUTPUT_LOSSES, f"output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        need(not (self.granularity == "all" and self.swing), "swing is implemented for granularity='batch' only")
        need(isinstance(self.smooth, (int, float)) and not isinstance(self.smooth, bool) and math.isfinite(self.smooth)
             and self.smooth >= 0, f"smooth must be a finite number >= 0, got {self.smooth!r}")
        need(isinstance(self.desaturate, (int, float)) and not isinstance(self.desaturate, bool)
             and 0 <= self.desaturate < 1, f"desaturate must be in [0, 1), got {self.desaturate!r}")
        need(isinstance(self.canvas, int) and not isinstance(self.canvas, bool) and self.canvas >= 0,
             f"canvas must be an integer >= 0, got {self.canvas!r}")
        need(isinstance(self.coarse, (int, float)) and 0 <= self.coarse < 1, f"coarse must be in [0, 1), got {self.coarse!r}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
             f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def to_dict(self) -> dict:
        return {"method": "bns", **asdict(self)}

    @classmethod
    def for_budget(cls, budget: Budget, input_size: tuple[int, int, int],
                   seed: int = 0, reconstruction: bool = False) -> "SynthConfig":
        """Presets sized for a 2-core CPU (README "Options" gives the wall times).

        Small inputs (H*W <= 64*64, CIFAR-style) and large inputs (ImageNet-style) get separate
        tables; large inputs cost ~50x more per image and step, so they get fewer images/steps.
        The jitter is about 1/16 of the image side (2 px at 32x32, 14 px at 224x224).

        ``reconstruction``: the images are all a reconstruction recipe learns its roundings from.
        On large inputs they then get :data:`_RECONSTRUCTION_STEPS_LARGE` steps (50 leave 224x224
        images far from converged) and DeepInversion's priors, :data:`_RECONSTRUCTION_PRIORS_LARGE`:
        pink-noise start, total variation, half the steps at half resolution (so the steps cost
        about 5/8 of full-resolution ones), a 10x weight on the first BN layer, and the model seeing
        the images through a 3x3 Gaussian (``smooth`` 1.25 px, MCT's smoothing). Without them a
        reconstruction on the images generalises badly to real images; ``swing`` did not help
        (README "Methods").
        """
        if budget not in _BUDGETS_SMALL:
            raise ValueError(f"unknown synthesis budget {budget!r}; choose one of "
                             f"{sorted(_BUDGETS_SMALL)}")
        if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
            raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {input_size!r}")
        _, h, w = (int(s) for s in input_size)
        small = is_small_input(input_size)
        table = _BUDGETS_SMALL if small else _BUDGETS_LARGE
        n, bs, steps, lr = table[budget]
        priors = _RECONSTRUCTION_PRIORS_LARGE if reconstruction and not small else {}
        if priors:
            steps = _RECONSTRUCTION_STEPS_LARGE[budget]
        return replace(cls(num_images=n, batch_size=bs, steps=steps, lr=lr, bn_weight=1.0, ce_weight=0.05,
                           tv_weight=0.0, l2_weight=0.0, jitter=max(1, min(h, w) // 16), flip=True,
                           seed=seed), **priors)


# (num_images, batch_size, steps, lr) -- see for_budget.
_BUDGETS_SMALL: dict[str, tuple[int, int, int, float]] = {
    "fast": (256, 128, 100, 0.2),
    "default": (1024, 128, 250, 0.2),
    "long": (2048, 128, 500, 0.2),
}
_BUDGETS_LARGE: dict[str, tuple[int, int, int, float]] = {
    "fast": (64, 32, 50, 0.2),
    "default": (128, 32, 150, 0.2),
    "long": (256, 32, 400, 0.2),
}
# Steps per batch of large inputs for reconstruction recipes (the rest of the row as above).
_RECONSTRUCTION_STEPS_LARGE: dict[str, int] = {"fast": 300, "default": 450, "long": 900}
_RECONSTRUCTION_PRIORS_LARGE: dict = {"init": "pink", "tv_weight": 3000.0, "coarse": 0.5, "first_bn_weight": 10.0,
                                      "smooth": 1.25}


# --------------------------------------------------------------------------------------------
# loss pieces


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Squared-difference (L2) total variation of ``x`` ``[B, C, H, W]``::

        TV(x) = mean((x[..., 1:, :] - x[..., :-1, :])^2) + mean((x[..., :, 1:] - x[..., :, :-1])^2)
    """
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    return dh.pow(2).mean() + dw.pow(2).mean()


def pixel_bounds(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                 channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel box ``[lo, hi]`` that pixels in ``[0, 1]`` map to under ``(p - mean) / std``:
    ``lo = -mean / std``, ``hi = (1 - mean) / std``, each of shape ``[1, C, 1, 1]`` (float32).
    ``mean``/``std`` may be scalars or length-C sequences (in units of the [0, 1] pixel range;
    e.g. EfficientNet-Lite's ``(p255 - 127) / 128`` is mean 127/255, std 128/255)."""
    m = torch.as_tensor(mean, dtype=torch.float32).flatten()
    s = torch.as_tensor(std, dtype=torch.float32).flatten()
    if m.numel() == 1:
        m = m.expand(channels)
    if s.numel() == 1:
        s = s.expand(channels)
    if m.numel() != channels or s.numel() != channels:
        raise ValueError(f"mean/std must have 1 or {channels} entries, got {m.numel()} and "
                         f"{s.numel()}")
    if not bool((s > 0).all()):
        raise ValueError(f"std must be positive, got {s.tolist()}")
    lo = (-m / s).view(1, channels, 1, 1)
    hi = ((1 - m) / s).view(1, channels, 1, 1)
    return lo, hi


def target_labels(num_images: int, num_classes: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Deterministic balanced target labels ``[num_images]`` (int64).

    With ``perm`` a permutation of ``range(num_classes)`` drawn from a generator seeded with
    ``seed``, image ``i`` (global index, counting from ``start``) gets
    ``label_i = perm[(start + i) % num_classes]``: every run of ``num_classes`` consecutive
    images covers each class exactly once, and the class order depends on the seed.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    perm = torch.randperm(num_classes, generator=g)
    idx = (torch.arange(num_images, dtype=torch.int64) + start) % num_classes
    return perm[idx]


# --------------------------------------------------------------------------------------------
# synthesis


def _batch_range(cfg: SynthConfig, batch: int) -> slice:
    """The global image indices of batch ``batch`` (the last batch may be smaller)."""
    return slice(batch * cfg.batch_size, min((batch + 1) * cfg.batch_size, cfg.num_images))


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    # An independent, reproducible stream per (seed, batch): resuming at any batch is exact.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(batch) * 7_919 + 1) % (2**63))


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter for the block; both restored."""
    was_training = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, t in was_training.items():
            m.train(t)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _check_args(input_size, num_classes: int) -> tuple[int, int, int]:
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {input_size!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    c, h, w = (int(s) for s in input_size)
    return c, h, w


def synthesize_batches(model: nn.Module, input_size: tuple[int, int, int],
                       mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                       num_classes: int, config: SynthConfig, *, progress: bool = True,
                       start_batch: int = 0, log: list[dict] | None = None,
                       shard: tuple[int, int] = (0, 1),
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images [b, C, H, W], labels [b] int64)`` one optimised batch at a time.

    Batch ``k`` holds global images ``k*batch_size ... min((k+1)*batch_size, num_images) - 1``,
    labels from :func:`target_labels` (seeded with ``config.seed``), and its random draws from a
    generator seeded by ``(config.seed, k)``; ``start_batch`` skips the first batches (resume
    after a checkpoint) without changing the later ones. Images are detached, in the model's
    normalised input space, on the model's device and dtype, inside :func:`pixel_bounds`.

    During each batch the model is in eval mode and its parameters have ``requires_grad=False``;
    both are restored before each yield and when the generator is closed, so the caller may use
    the model between batches. ``log`` (a list) receives one dict per step:
    ``batch, step, lr, loss, bns, ce, tv, l2, acc`` (acc = FP top-1 on the targets, augmented).

    With ``config.granularity == "all"`` the batches are optimised together (:func:`_invert_all`) and
    yielded, in order, once all are done; such a run cannot resume (``start_batch``) or be sharded.

    ``shard = (rank, world)`` yields only the batches ``k`` with ``k % world == rank`` (data-parallel
    synthesis: each batch is seeded by its index, so the union over ranks is exactly the
    single-process set).
    """
    rank, world = shard
    c, h, w = _check_args(input_size, num_classes)
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}")
    if not 0 <= start_batch <= config.num_batches:
        raise ValueError(f"start_batch must be in [0, {config.num_batches}], got {start_batch}")
    if config.granularity == "all" and (start_batch or world > 1):
        raise ValueError("granularity='all' optimises every batch together: it cannot resume at a batch "
                         "(start_batch) or split the batches over ranks; use granularity='batch' for those")
    device, dtype = _model_device_dtype(model)
    lo, hi = pixel_bounds(mean, std, c)
    lo, hi = lo.to(device=device, dtype=dtype), hi.to(device=device, dtype=dtype)
    labels_all = target_labels(config.num_images, num_classes, config.seed)

    bar = None
    if progress:
        mine = sum(1 for b in range(start_batch, config.num_batches) if b % world == rank)
        bar = progress_bar(mine * config.steps, "synthesize[bns]")
    try:
        if config.granularity == "all":
            with _frozen_eval(model):
                xs = _invert_all(model, labels_all, (c, h, w), lo, hi, config, device, dtype, bar, log)
            for b, x in enumerate(xs):
                yield x, labels_all[_batch_range(config, b)].to(device)
            return
        for b in range(start_batch, config.num_batches):
            if b % world != rank:
                continue
            labels = labels_all[_batch_range(config, b)]
            with _frozen_eval(model):
                x = _invert_batch(model, labels, (c, h, w), lo, hi, config,
                                  _batch_generator(config.seed, b), device, dtype, bar, b, log)
            yield x, labels.to(device)
    finally:
        if bar is not None:
            bar.close()


class _PixelBatch:
    """One batch's optimisation state: its pixels, their Adam moments, targets and random stream."""

    def __init__(self, labels: torch.Tensor, chw: tuple[int, int, int], lo: torch.Tensor, hi: torch.Tensor,
                 cfg: SynthConfig, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        c, h, w = chw
        canvas = (c, h + cfg.canvas, w + cfg.canvas)
        if cfg.param == GENERATOR:
            self.image = GeneratorParam(labels.numel(), canvas, lo, hi, gen, device, dtype)
        else:
            noise = initial_noise(labels.numel(), canvas, cfg.init, gen)
            self.image = ImageParam(scale_to_box(noise.to(device=device, dtype=dtype), cfg.init, lo, hi), cfg.param)
        self.size = (h, w)
        self.smooth = float(cfg.smooth)
        self.desaturate = float(cfg.desaturate)
        self.box = (lo, hi)
        self.adams = [(PixelAdam(t), rate) for t, rate in self.image.variables()]
        self.y = labels.to(device)
        self.gen = gen

    def zero_grad(self) -> None:
        for adam, _ in self.adams:
            adam.x.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for adam, rate in self.adams:
            adam.step(lr * rate)

    def final(self) -> torch.Tensor:
        with torch.no_grad():   # the spectrum's round trip can leave a pixel 1e-6 outside the box
            x = center_crop(self.seen(), self.size)
            return x.clamp(*self.box).contiguous()

    def seen(self) -> torch.Tensor:
        """The whole canvas as the model sees it: smoothed, then desaturated."""
        return desaturate(gaussian_smooth(self.image.images(), self.smooth), self.desaturate, *self.box)

    def view(self) -> torch.Tensor:
        """The input-sized images the model sees this step, before the jitter and flip."""
        x = self.seen()
        return random_crop(x, self.size, self.gen) if x.shape[2:] != self.size else x


def _output_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The class term of the inversion loss: cross-entropy to the target labels (``"ce"``), or
    the negated mean spread ``-(max - min)`` of each image's logits (``"minmax"``, label-free:
    any confident class will do)."""
    if kind == "minmax":
        return -(logits.amax(1) - logits.amin(1)).mean()
    return F.cross_entropy(logits, y)


def _inversion_step(model: nn.Module, hook: BNStatsHook, batch: _PixelBatch, cfg: SynthConfig, lr: float,
                    coarse: bool, lo: torch.Tensor, hi: torch.Tensor, others=None) -> dict:
    """One Adam step on ``batch``'s pixels; returns the step's loss terms and FP top-1 (detached
    tensors: :func:`_record` reads them only when it logs or shows them).
    ``others``: the other batches' statistics for an all-images BN term (see :meth:`BNStatsHook.pooled_layer_losses`)."""
    batch.zero_grad()
    xa = augment(batch.view(), cfg.jitter, cfg.flip, batch.gen)
    xa = F.avg_pool2d(xa, 2) if coarse else xa
    logits = model(xa)
    layer_bns = hook.layer_losses() if others is None else hook.pooled_layer_losses(xa.shape[0], others)
    bns = layer_bns.sum()
    loss = cfg.bn_weight * (bns + (cfg.first_bn_weight - 1) * layer_bns[0])
    ce = _output_loss(logits, batch.y, cfg.output_loss) if cfg.ce_weight > 0 else logits.new_zeros(())
    tv = total_variation(xa) if cfg.tv_weight > 0 else logits.new_zeros(())
    l2 = xa.pow(2).mean() if cfg.l2_weight > 0 else logits.new_zeros(())
    loss = loss + cfg.ce_weight * ce + cfg.tv_weight * tv + cfg.l2_weight * l2
    loss.backward()
    with torch.no_grad():
        batch.step(lr)
        batch.image.project(lo, hi)
    acc = (logits.detach().argmax(1) == batch.y).float().mean()
    return {"lr": lr, "loss": loss.detach(), "bns": bns.detach(), "ce": ce.detach(), "tv": tv.detach(),
            "l2": l2.detach(), "acc": acc}


def _cosine_lr(cfg: SynthConfig, step: int) -> float:
    lr_min = cfg.lr * 0.01
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def _coarse_steps(cfg: SynthConfig, chw: tuple[int, int, int]) -> int:
    return int(cfg.coarse * cfg.steps) if min(chw[1:]) >= 4 else 0   # pooling needs a 2x2 image


def _record(terms: dict, batch: int, step: int, bar, log: list[dict] | None, last: bool) -> None:
    show = bar is not None and (step % 10 == 0 or last)
    if log is not None or show:
        rec = {"batch": batch, "step": step, **{k: float(v) for k, v in terms.items()}}
        if log is not None:
            log.append(rec)
        if show:
            bar.set_postfix(batch=batch, bns=f"{rec['bns']:.3f}", ce=f"{rec['ce']:.3f}", acc=f"{rec['acc']:.2f}",
                            refresh=False)
    if bar is not None:
        bar.update(1)


def _invert_batch(model: nn.Module, labels: torch.Tensor, chw: tuple[int, int, int],
                  lo: torch.Tensor, hi: torch.Tensor, cfg: SynthConfig, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype, bar, batch: int,
                  log: list[dict] | None) -> torch.Tensor:
    """Optimise one batch of pixels for ``cfg.steps`` Adam steps; return them detached."""
    state = _PixelBatch(labels, chw, lo, hi, cfg, gen, device, dtype)
    swing = swing_convolutions(model, gen) if cfg.swing else contextlib.nullcontext()
    coarse_steps = _coarse_steps(cfg, chw)
    with torch.enable_grad(), BNStatsHook(model) as hook, swing:
        for step in range(cfg.steps):
            rec = _inversion_step(model, hook, state, cfg, _cosine_lr(cfg, step), step < coarse_steps, lo, hi)
            _record(rec, batch, step, bar, log, step == cfg.steps - 1)
    return state.final()


def _invert_all(model: nn.Module, labels_all: torch.Tensor, chw: tuple[int, int, int],
                lo: torch.Tensor, hi: torch.Tensor, cfg: SynthConfig, device: torch.device,
                dtype: torch.dtype, bar, log: list[dict] | None) -> list[torch.Tensor]:
    """``granularity="all"``: every batch is stepped once per step, in an order drawn anew each
    step, and the BN term matches the statistics of all images together (each batch's own
    statistics with gradient, the others' from their latest step). Batch ``k`` starts from the
    same noise and draws its augmentations from the same stream as in per-batch mode."""
    states = [_PixelBatch(labels_all[_batch_range(cfg, b)], chw, lo, hi, cfg, _batch_generator(cfg.seed, b), device, dtype)
              for b in range(cfg.num_batches)]
    order_gen = torch.Generator().manual_seed(int(cfg.seed) * 104_729 + 3)
    latest: dict[int, tuple[int, list]] = {}
    coarse_steps = _coarse_steps(cfg, chw)
    with torch.enable_grad(), BNStatsHook(model) as hook:
        for step in range(cfg.steps):
            lr = _cosine_lr(cfg, step)
            for b in torch.randperm(len(states), generator=order_gen).tolist():
                others = [latest[k] for k in latest if k != b]
                rec = _inversion_step(model, hook, states[b], cfg, lr, step < coarse_steps, lo, hi, others)
                latest[b] = (states[b].y.numel(), [(m.detach(), v.detach()) for m, v in zip(hook.means, hook.vars)])
                _record(rec, b, step, bar, log, step == cfg.steps - 1)
    return [s.final() for s in states]


def synthesize(model: nn.Module, input_size: tuple[int, int, int],
               mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
               num_classes: int, config: SynthConfig, *, progress: bool = True,
               log: list[dict] | None = None, dist_info: D.DistInfo = D.SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """All of :func:`synthesize_batches` concatenated: ``(images [N, C, H, W], labels [N] int64)``
    with ``N = config.num_images``, images in the model's normalised input space clamped to the
    range of ``[0, 1]`` pixels, labels the targets used (see :func:`target_labels`).

    In a torchrun run (``dist_info``) each rank makes the batches ``k`` with ``k % world == rank``
    and every rank returns the whole set, in batch order: the same images as a single process."""
    xs, ys = [], []
    for x, y in synthesize_batches(model, input_size, mean, std, num_classes, config,
                                   progress=progress and dist_info.main, log=log,
                                   shard=(dist_info.rank, dist_info.world)):
        xs.append(x)
        ys.append(y)
    if not dist_info.enabled:
        return torch.cat(xs), torch.cat(ys)
    return _gather_batches(xs, ys, config, input_size, dist_info)


def _gather_batches(xs: list[torch.Tensor], ys: list[torch.Tensor], config: SynthConfig,
                    input_size: tuple[int, int, int], info: D.DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's batches, gathered and put back in the order of their global image index."""
    mine = [b for b in range(config.num_batches) if b % info.world == info.rank]
    index = (torch.cat([torch.arange(b * config.batch_size, b * config.batch_size + len(y)) for b, y in zip(mine, ys)])
             if ys else torch.zeros(0, dtype=torch.int64))
    local_x = torch.cat(xs) if xs else torch.zeros(0, *input_size)
    local_y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
    order = D.all_gather_cat(index, info).argsort()
    return D.all_gather_cat(local_x.contiguous(), info)[order], D.all_gather_cat(local_y, info)[order]


@torch.no_grad()
def evaluate_synthetic(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                       batch_size: int = 128) -> dict:
    """Quality of a synthetic set, for reports: ``bns`` = :class:`BNStatsHook` loss averaged over
    batches of ``batch_size`` (lower is better; noise at init is the reference), ``top1`` = FP
    top-1 agreement with ``labels`` (fraction), ``mean_confidence`` = mean softmax probability
    of the target label. The model is evaluated in eval mode and restored."""
    with _frozen_eval(model), BNStatsHook(model) as hook:
        device, _ = _model_device_dtype(model)
        bns, correct, conf, nb = 0.0, 0, 0.0, 0
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            y = labels[i:i + batch_size].to(device)
            logits = model(x)
            bns += float(hook.loss())
            nb += 1
            correct += int((logits.argmax(1) == y).sum())
            conf += float(logits.softmax(1).gather(1, y[:, None]).sum())
    n = max(1, len(images))
    return {"bns": bns / max(1, nb), "top1": correct / n, "mean_confidence": conf / n,
            "num_images": len(images)}
