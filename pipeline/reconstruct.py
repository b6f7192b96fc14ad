"""Layer- or block-wise reconstruction with learned rounding on synthetic images (the ``reconstruct`` stage).

Rounding every weight to the nearest grid point is not what minimises a layer's output error; at
4 bits the difference decides whether a model works (AdaRound, Nagel et al. 2020). Here, as Genie-M
and the data-free AdaRound variants do, the images are the BN-inversion set. Layer by layer, in
graph order, with the layers before already fixed:

* inputs: the layer's input in the quantized model (``x_q``, earlier layers reconstructed) and in
  the FP model (``x_fp``: a copy taken before the first layer's codes were baked, every quantizer
  off), and the FP layer's output on ``x_fp`` (``y``), the target: so each layer also makes up
  for the error the layers before it left, instead of matching a model that already has it;
* each weight becomes ``s * clamp(floor(w / s) + h(V), qmin, qmax)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (``zeta = 1.1``, ``gamma = -0.1``),
  ``V`` initialised so that ``h(V) = frac(w / s)`` (the float weight), ``s`` the calibrated
  per-channel step;
* ``V`` is trained with Adam on ``||layer(x) - y||^2`` (summed over channels, mean over the rest)
  plus ``reg * sum(1 - |2 h(V) - 1|^beta)``, which pushes every ``h`` to 0 or 1 (beta anneals from
  20 to 2 after a warm-up without it). The input ``x`` mixes ``x_q`` and ``x_fp`` element-wise
  (``x_fp`` with probability ``drop``: QDrop, Wei et al. 2022), so the rounding learns to tolerate
  the activation quantization without over-fitting it;
* the rounding is then fixed: ``codes = clamp(floor(w / s) + [h(V) >= 0.5])`` and the layer's float
  weight is set so that its folded weight is ``codes * s`` (Tune mode: divided by the BN factor),
  which round-to-nearest maps back to exactly those codes. The exported artifact is the usual one.
* with ``diag_mix = a > 0`` (layer-wise only) the loss is ``(1 - a)`` times that output error plus
  ``a`` times its diagonal form ``sum((W_q - W)^2 * E[x_in^2])``: the error the same rounding
  would make on inputs with the same channel energies but no correlations between channels or
  pixels. The synthetic images fix each layer's input covariance, which is what the rounding
  adapts to; this shrinks that covariance towards its diagonal, so the rounding relies less on
  the correlations that the images may not share with real ones;
* with ``learn_step`` each output channel's weight step is trained with the rounding (Adam on the
  log of its ratio to the calibrated step; the integer base ``floor(w / s)`` stays the calibrated
  step's, as Genie-M does) and is written back to the layer's WeightQuantizer at the bake;
* with ``act_step_lr`` (the default; layer-wise only) the step of an activation quantizer below
  8 bits is learned with the rounding of the first layer that reads it (BRECQ and QDrop learn
  activation steps with LSQ in their reconstruction too): that layer's ``x_q`` is recomputed from
  the quantizer's float input with the step being learned (Adam, learning rate ``act_step_lr``
  times the calibrated step), and the layers after it see the learned step. On ResNet-20 W4A4,
  fast budget, seeds 0 / 1 / 2: drop 0.40 / 0.76 / 2.34 points against 1.43 / 2.31 / 1.88 with
  the steps as calibrated; at the default budget (2.05 mean) and on ResNet-56 fast (1.80 against
  1.83) no gain and no loss (README).
* with ``fisher="element"`` (layer-wise only) each element of the output error is weighted by the FP model's
  squared gradient of ``log p(c | image)`` with respect to that output element, ``c`` drawn from the
  FP model's own softmax on the image (no labels: an unbiased one-sample estimate of the diagonal
  Fisher information, as BRECQ weights its block outputs), normalised to mean 1 per layer, so the
  rounding spends its accuracy where the FP model's prediction depends on the output;
  ``fisher="channel"`` weights each output channel by that map's mean over the images and
  positions (a one-draw estimate per element is noisy; the channel mean is not). Off: on
  EfficientNet-Lite0 W4A8 "element" scored 4 points below the plain loss in the image proxy (README).
* with ``clip_loss`` (layer-wise) output and target pass through the ReLU-like clip that alone
  reads the layer (:func:`~dfq.pipeline.recon_loss.output_clip`), the gradient straight through
  it (AdaRound's ``f_a`` form). Off: a point below the plain loss in the Lite0 W4A8 proxy (README).

``granularity="block"`` (BRECQ, Li et al. 2021) learns the rounding of a block's layers together
(:mod:`dfq.pipeline.blocks`: a residual block, or up to ``block_layers`` layers of a plain chain)
against the FP block's output, with the block's own activation quantizers on, each dropping to
its float input per element with probability ``drop`` (QDrop); the block's input mixes ``x_q``
and ``x_fp`` as above. Conv inputs are random ``2 * crop`` windows of the block's input maps and the
target is the FP block on the same window.

Biases, and activation steps other than those above, stay as calibrated; the stage's caller keeps
the result only if the FP->quantized KL on held-out synthetic images falls (activation steps
included: they are part of the state it restores).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.common.progress import progress as progress_bar
from dfq.kernels.fake_quant import Grid
from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.blocks import Block, BlockRunner, partition
from dfq.pipeline.graph import layer_nodes, module_of, set_module
from dfq.pipeline.models import is_small_input
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d
from dfq.pipeline.recon_loss import clip_straight_through, fisher_weights, input_energy, output_clip
from dfq.pipeline.quantize import QuantizedModel

ZETA, GAMMA = 1.1, -0.1
FISHER_MODES = ("none", "element", "channel")


@dataclass
class ReconstructConfig:
    iterations: int = 300        # per layer
    batch: int = 32
    lr: float | None = None      # Adam on the rounding variables; None: 3 / iterations
    reg: float = 0.01            # weight of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2          # fraction of the iterations without the regulariser
    drop: float = 0.5            # probability of the float input, per element (QDrop)
    crop: int | None = 16        # conv layers train on crop x crop output windows (None: whole maps)
    learn_step: bool = False     # learn each channel's weight step with the rounding (Genie-M)
    # layer-wise: weight of the output error's diagonal form in the loss (module docstring), 0..1
    diag_mix: float = 0.0
    step_lr: float = 1e-3        # Adam's learning rate on the log of the step's gain
    # layer-wise only: learn the step of each activation quantizer below 8 bits in front of a layer (LSQ
    # gradient), by the first layer that reads it; Adam's learning rate relative to the calibrated
    # step (0: off)
    act_step_lr: float = 1e-3
    # layer-wise: weight the output error by the FP model's diagonal Fisher (module docstring):
    # "none", "element" (per output element of each image) or "channel" (its mean per output channel)
    fisher: str = "none"
    granularity: str = "layer"   # "layer" (AdaRound) or "block" (BRECQ: a few layers together, pipeline.blocks)
    block_layers: int = 3        # the most conv/linear layers a block merges from a plain chain
    # also fit every image mirrored left-right (the BN inversion optimised both views: SynthConfig.flip)
    flip: bool = False
    # layer-wise: compare output and target after the ReLU-like activation that follows the layer
    # (AdaRound's loss on f(W x)), the gradient passed straight through the clip
    clip_loss: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in ("layer", "block"):
            raise ValueError(f"reconstruction granularity must be 'layer' or 'block', not {self.granularity!r}")
        if not 0.0 <= self.diag_mix <= 1.0:
            raise ValueError(f"diag_mix must lie in [0, 1], not {self.diag_mix!r}")
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"fisher must be one of {FISHER_MODES}, not {self.fisher!r}")
        if self.fisher != "none" and self.granularity != "layer":
            raise ValueError("fisher weighting is implemented for granularity='layer' only")
        if self.act_step_lr < 0:
            raise ValueError(f"act_step_lr must be >= 0 (0: activation steps as calibrated), not {self.act_step_lr!r}")

    @classmethod
    def for_budget(cls, budget: str, input_size, seed: int = 0) -> "ReconstructConfig":
        small = is_small_input(input_size)
        # (iterations per layer, batch). ImageNet-size fast runs 300, not more: on EfficientNet-Lite0 W4A8
        # 200-300 exported about a point above 500 (README "Methods").
        table = {"fast": (300, 64) if small else (300, 32), "default": (1000, 64) if small else (1500, 32),
                 "long": (2000, 64) if small else (3000, 64)}
        iterations, batch = table[budget]
        return cls(iterations=iterations, batch=batch, crop=None if small else 16, seed=seed)

    @property
    def step_size(self) -> float:
        """Adam's learning rate: ``lr``, or when it is None 3 / iterations. Adam moves a variable by about
        lr per step, so 3 / iterations lets any weight cross its rounding point (|V| <= 4.6 at the
        start) within the schedule, whatever its length (also after ``dataclasses.replace``)."""
        return 3.0 / self.iterations if self.lr is None else self.lr

    def to_dict(self) -> dict:
        return {**asdict(self), "lr": self.step_size}


@dataclass
class ReconstructResult:
    layers: int
    images: int
    seconds: float
    flipped: float               # fraction of weights whose code differs from round-to-nearest
    first_loss: float | None     # mean reconstruction loss at the first / last iteration, over layers
    last_loss: float | None

    def to_dict(self) -> dict:
        return asdict(self)


class _LearnedRounding(nn.Module):
    """Stands in for a layer's WeightQuantizer during reconstruction (same ``scale``/``enabled``).
    With ``learn_step`` the per-channel step is learned too (as the log of its ratio to the
    calibrated one); the integer base ``floor(w / s0)`` stays the calibrated step's, as Genie-M does,
    so the step only rescales the channel's codes."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, grid: Grid, learn_step: bool = False) -> None:
        super().__init__()
        self.scale0, self.grid, self.enabled = scale.detach(), grid, True
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale0), requires_grad=learn_step)
        with torch.no_grad():   # the base stays out of the step's graph
            s = self._s(w)
        self.floor = torch.floor(w.detach() / s)
        frac = (w.detach() / s - self.floor).clamp(0.01, 0.99)
        self.v = nn.Parameter(torch.log((frac - GAMMA) / (ZETA - frac)))   # h(v) == frac

    @property
    def scale(self) -> torch.Tensor:
        """The per-channel step (``[O]``): the calibrated one times the learned gain."""
        return self.scale0 * torch.exp(self.log_gain)

    def _s(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale.clamp(min=1e-12).reshape([-1] + [1] * (w.dim() - 1))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.h() >= 0.5).float(), self.grid.qmin, self.grid.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.floor + self.h(), self.grid.qmin, self.grid.qmax) * self._s(w)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _Captured(Exception):
    """Raised by the capture hook: nothing after the layer needs to run."""


@torch.no_grad()
def _capture(model: QuantizedModel, layer: nn.Module, images: torch.Tensor, quantized: bool, batch: int = 64):
    """(inputs, outputs) of ``layer`` over ``images``, with the model's quantizers on or off; the
    forward pass stops at the layer."""
    xs, ys = [], []

    def record(module, inputs, output) -> None:
        xs.append(inputs[0].detach())
        ys.append(output.detach())
        raise _Captured

    hook = layer.register_forward_hook(record)
    model.set_enabled(quantized, quantized)
    try:
        for i in range(0, len(images), batch):
            try:
                model.module(images[i:i + batch])
            except _Captured:
                pass
    finally:
        hook.remove()
        model.set_enabled(True, True)
    return torch.cat(xs), torch.cat(ys)


def _bake(layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Set the layer's float weight so that its folded weight is ``codes * scale``."""
    target = codes * scale.reshape([-1] + [1] * (codes.dim() - 1))
    if isinstance(layer, QuantConv2d) and layer.has_bn:
        factor = layer.bn_weight / torch.sqrt(layer.bn_var + layer.bn_eps)
        shape = [-1] + [1] * (codes.dim() - 1)
        alive = (factor != 0).reshape(shape)
        layer.weight.copy_(torch.where(alive, target / torch.where(alive, factor.reshape(shape), 1.0), layer.weight))
    else:
        layer.weight.copy_(target)


class _Windows:
    """The training data of one layer: its captured inputs (quantized and FP) and FP outputs, served
    as batches of random ``crop`` x ``crop`` output windows for a conv whose output map is larger
    (the same window for every image of a batch; the inputs are padded once, so a window is a plain
    slice). A window sees every weight of the layer; it costs (crop / map side)^2 of the whole map,
    which is what lets the early high-resolution layers of an ImageNet model train many steps."""

    def __init__(self, layer: nn.Module, x_q: torch.Tensor, x_fp: torch.Tensor, y: torch.Tensor, crop: int | None,
                 weight: torch.Tensor | None = None):
        self.layer, self.y, self.weight = layer, y, weight
        self.conv = isinstance(layer, QuantConv2d) and crop is not None and max(y.shape[2:]) > crop
        self.crop = crop
        if self.conv:
            top, left, bottom, right = layer.pads
            x_q, x_fp = (F.pad(x, (left, right, top, bottom)) for x in (x_q, x_fp))
        self.x_q, self.x_fp = x_q, x_fp

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        """(x_q, x_fp, y, weight of y's elements or None) of the images ``idx``, in one random window."""
        xq, xf, y = self.x_q[idx], self.x_fp[idx], self.y[idx]
        w = None if self.weight is None else self.weight[idx]
        if not self.conv:
            return xq, xf, y, w
        (sh, sw), (dh, dw), (kh, kw) = self.layer.stride, self.layer.dilation, self.layer.kernel_size
        ph, pw = min(self.crop, y.shape[2]), min(self.crop, y.shape[3])
        oy = int(torch.randint(0, y.shape[2] - ph + 1, (1,), generator=gen))
        ox = int(torch.randint(0, y.shape[3] - pw + 1, (1,), generator=gen))
        iy, ix = oy * sh, ox * sw
        hin, win = (ph - 1) * sh + dh * (kh - 1) + 1, (pw - 1) * sw + dw * (kw - 1) + 1
        window = (slice(None), slice(None), slice(iy, iy + hin), slice(ix, ix + win))
        out = (slice(None), slice(None), slice(oy, oy + ph), slice(ox, ox + pw))
        return xq[window], xf[window], y[out], None if w is None else w[out]

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None) -> torch.Tensor:
        return self.layer.forward_padded(x, in_scale) if self.conv else self.layer(x, in_scale)


class _Rounded:
    """The layers whose rounding is being learned: their WeightQuantizers swapped for
    :class:`_LearnedRounding` (restored on exit) and, on :meth:`bake`, their codes fixed."""

    def __init__(self, layers: list[nn.Module], learn_step: bool = False) -> None:
        self.layers, self.originals, self.roundings, self.nearest = layers, [], [], []
        for layer in layers:
            q = layer.weight_quantizer
            with torch.no_grad():
                w = layer.folded()[0].detach()
            r = _LearnedRounding(w, q.scale, q.grid, learn_step)
            self.originals.append(q)
            self.roundings.append(r)
            self.nearest.append(torch.clamp(torch.round(w / r._s(w)), q.grid.qmin, q.grid.qmax))

    def __enter__(self) -> "_Rounded":
        for layer, r in zip(self.layers, self.roundings):
            layer.weight_quantizer = r
        return self

    def __exit__(self, *exc) -> None:
        for layer, q in zip(self.layers, self.originals):
            layer.weight_quantizer = q

    def regulariser(self, beta: float) -> torch.Tensor:
        return sum(r.regulariser(beta) for r in self.roundings)

    @torch.no_grad()
    def bake(self) -> tuple[int, int]:
        """Fix every layer's learned codes; returns (weights flipped from nearest, weights)."""
        flipped = total = 0
        for layer, r, q, nearest in zip(self.layers, self.roundings, self.originals, self.nearest):
            codes = r.codes()
            q.scale.copy_(r.scale)
            _bake(layer, codes, q.scale.detach())
            flipped += int((codes != nearest).sum())
            total += codes.numel()
        return flipped, total


def _optimise(rounded: _Rounded, batch_loss, cfg: ReconstructConfig, extra: tuple = ()) -> tuple[float, float]:
    """Adam on the rounding variables (and the ``extra`` parameter groups): ``batch_loss(it)`` (the
    reconstruction error of one batch) plus the annealed rounding regulariser after the warm-up;
    returns (first, last) batch loss."""
    groups = [{"params": [r.v for r in rounded.roundings], "lr": cfg.step_size}, *extra]
    if cfg.learn_step:
        groups.append({"params": [r.log_gain for r in rounded.roundings], "lr": cfg.step_lr})
    opt = torch.optim.Adam(groups)
    first = last = None
    for it in range(cfg.iterations):
        rec = batch_loss(it)
        t = (it - cfg.warmup * cfg.iterations) / max(1.0, (1 - cfg.warmup) * cfg.iterations)
        loss = rec
        if t >= 0:
            beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - t)
            loss = rec + cfg.reg * rounded.regulariser(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(rec.detach())
        first = last if first is None else first
    return first, last


def _reconstruct_layer(qmodel: QuantizedModel, fp_model: QuantizedModel, node: fx.Node, images: torch.Tensor,
                       cfg: ReconstructConfig, gen: torch.Generator,
                       fisher: torch.Tensor | None = None) -> tuple[float, float, int, int]:
    """Learn and fix one layer's rounding (and, with ``act_step_lr``, its input quantizer's step);
    returns (first loss, last loss, weights flipped, weights). ``fp_model`` is a copy of ``qmodel``
    from before any layer was reconstructed: its float weights are the FP model's (``qmodel``'s
    earlier layers hold their baked codes by now). ``fisher``: the weight of each element of the
    layer's output on ``images`` (:func:`fisher_weights`), None for the plain squared error."""
    gm = qmodel.module
    layer = gm.get_submodule(str(node.target))
    act_q = _learned_input_quantizer(gm, node, cfg)
    if act_q is None:
        x_q, _ = _capture(qmodel, layer, images, quantized=True)
    else:   # the quantizer's float input: the quantization is redone with the step being learned
        x_q = _capture_quantizer_input(qmodel, act_q, layer, images)
    x_fp, y = _capture(fp_model, fp_model.module.get_submodule(str(node.target)), images, quantized=False)
    data = _Windows(layer, x_q, x_fp, y, cfg.crop, fisher)
    aq = input_quantizer_of(gm, node)
    fixed_scale = gm.get_submodule(str(aq.target)).scale.detach() if aq is not None else None

    bound = output_clip(gm, node) if cfg.clip_loss else None
    energy = input_energy(layer, x_fp) if cfg.diag_mix > 0 else None
    if energy is not None:
        with torch.no_grad():
            w = layer.folded()[0].detach()

    def batch_loss(it: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (min(cfg.batch, len(images)),), generator=gen)
        xq, xf, target, weight = data.sample(idx, gen)
        in_scale = fixed_scale
        if act_q is not None:
            xq, in_scale = act_q(xq), act_q.scale
        keep_fp = torch.rand(xq.shape, generator=gen) < cfg.drop
        out = data.forward(torch.where(keep_fp, xf, xq), in_scale)
        if bound is not None:
            out, target = clip_straight_through(out, bound), target.clamp(0.0, bound)
        err = (out - target).pow(2)
        loss = (err if weight is None else err * weight).sum(1).mean()
        if energy is None:
            return loss
        diagonal = ((rounded.roundings[0](w) - w).pow(2) * energy).sum()
        return (1 - cfg.diag_mix) * loss + cfg.diag_mix * diagonal

    extra = () if act_q is None else ({"params": [act_q.scale], "lr": cfg.act_step_lr * float(act_q.scale)},)
    with _Rounded([layer], cfg.learn_step) as rounded, _trainable(extra):
        first, last = _optimise(rounded, batch_loss, cfg, extra)
        flipped, total = rounded.bake()
    return first, last, flipped, total


def _learned_input_quantizer(gm: fx.GraphModule, node: fx.Node, cfg: ReconstructConfig) -> ActQuantizer | None:
    """With ``act_step_lr``: the activation quantizer below 8 bits that feeds this layer directly,
    when this is the first layer (in graph order) that reads it; its other readers keep the step
    learned here. 8-bit steps stay as calibrated (their rounding error is small, and a step fitted
    to a few hundred synthetic images can over-fit them)."""
    src = node.args[0]
    quantizer = module_of(gm, src)
    if cfg.act_step_lr <= 0 or not isinstance(quantizer, ActQuantizer) or quantizer.bits >= 8:
        return None
    first = next(n for n in layer_nodes(gm) if n.args and n.args[0] is src)
    return quantizer if first is node else None


def _capture_quantizer_input(model: QuantizedModel, quantizer: nn.Module, layer: nn.Module,
                             images: torch.Tensor) -> torch.Tensor:
    """What ``quantizer`` receives over ``images`` in the quantized model (the pass stops at ``layer``)."""
    xs = []
    hook = quantizer.register_forward_pre_hook(lambda module, inputs: xs.append(inputs[0].detach()))
    try:
        _capture(model, layer, images, quantized=True)
    finally:
        hook.remove()
    return torch.cat(xs)


@contextlib.contextmanager
def _trainable(groups):
    """The parameters of ``groups`` require gradients inside the block only."""
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


class _DroppedQuantizer(nn.Module):
    """An ActQuantizer inside a block under reconstruction: per element, its float input with
    probability ``p`` (QDrop), else its quantized output."""

    def __init__(self, inner: nn.Module, p: float, gen: torch.Generator) -> None:
        super().__init__()
        self.inner, self.p, self.gen = inner, p, gen
        self.scale = inner.scale   # the graph reads the step as "<quantizer>.scale"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, generator=self.gen) < self.p
        return torch.where(keep, x, self.inner(x))


@contextlib.contextmanager
def _swapped(gm: fx.GraphModule, modules: dict[str, nn.Module]):
    """Replace the named submodules of ``gm`` for the duration of the block."""
    old = {name: gm.get_submodule(name) for name in modules}
    for name, new in modules.items():
        set_module(gm, name, new)
    try:
        yield
    finally:
        for name, module in old.items():
            set_module(gm, name, module)


@torch.no_grad()
def _block_input(runner: BlockRunner, block: Block, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([runner.prefix(block, images[i:i + batch]) for i in range(0, len(images), batch)])


def _crop(x_q: torch.Tensor, x_fp: torch.Tensor, side: int | None, gen: torch.Generator):
    """The same random ``side`` x ``side`` window of both inputs (whole maps when they are smaller)."""
    if side is None or x_q.dim() != 4 or max(x_q.shape[2:]) <= side:
        return x_q, x_fp
    oy = int(torch.randint(0, x_q.shape[2] - min(side, x_q.shape[2]) + 1, (1,), generator=gen))
    ox = int(torch.randint(0, x_q.shape[3] - min(side, x_q.shape[3]) + 1, (1,), generator=gen))
    window = (slice(None), slice(None), slice(oy, oy + side), slice(ox, ox + side))
    return x_q[window], x_fp[window]


def _reconstruct_block(qmodel: QuantizedModel, fp_model: QuantizedModel, block: Block, images: torch.Tensor,
                       cfg: ReconstructConfig, gen: torch.Generator) -> tuple[float, float, int, int]:
    """Learn and fix the rounding of a block's layers below 8 bits together, against the FP block's
    output, with the block's own activation quantizers on (QDrop). Inputs are random windows of
    the block's input maps (``2 * crop`` on a side): the FP block's output on the same window is
    the target, so windows need no receptive-field bookkeeping. ``fp_model`` runs with every
    quantizer off."""
    gm, fgm = qmodel.module, fp_model.module
    qrun, frun = BlockRunner(gm), BlockRunner(fgm)
    x_q, x_fp = _block_input(qrun, block, images), _block_input(frun, block, images)
    low = [gm.get_submodule(str(n.target)) for n in block.layers
           if qmodel.layer_precision[str(n.target)].weights < 8]
    inner = {str(n.target): _DroppedQuantizer(gm.get_submodule(str(n.target)), cfg.drop, gen)
             for n in block.nodes if isinstance(module_of(gm, n), ActQuantizer)}
    side = None if cfg.crop is None else 2 * cfg.crop

    def batch_loss(it: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (min(cfg.batch, len(images)),), generator=gen)
        xq, xf = _crop(x_q[idx], x_fp[idx], side, gen)
        with torch.no_grad():
            target = frun(block, xf)
        keep_fp = torch.rand(xq.shape, generator=gen) < cfg.drop
        out = qrun(block, torch.where(keep_fp, xf, xq))
        return (out - target).pow(2).sum(1).mean()

    with _swapped(gm, inner), _Rounded(low, cfg.learn_step) as rounded:
        first, last = _optimise(rounded, batch_loss, cfg)
        flipped, total = rounded.bake()
    return first, last, flipped, total


def reconstruct(qmodel: QuantizedModel, images: torch.Tensor, cfg: ReconstructConfig, *,
                progress: bool = True) -> ReconstructResult:
    """Learned rounding for every conv/linear layer whose weights are below 8 bits (see the module
    docstring), layer by layer or block by block; ``qmodel`` is changed in place."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + 3)
    if cfg.flip:
        images = torch.cat([images, images.flip(-1)])
    nodes = [n for n in layer_nodes(qmodel.module) if qmodel.layer_precision[str(n.target)].weights < 8]
    if cfg.granularity == "block":
        low = set(nodes)
        units = [b for b in partition(qmodel.module, cfg.block_layers) if low & set(b.layers)]
        step = _reconstruct_block
    else:
        units, step = nodes, _reconstruct_layer
    was_training = qmodel.module.training
    qmodel.module.eval()
    for p in qmodel.module.parameters():
        p.requires_grad_(False)
    fp_model = copy.deepcopy(qmodel)
    if cfg.granularity == "block":
        fp_model.set_enabled(False, False)
    weighted = cfg.fisher != "none"
    fisher = fisher_weights(fp_model, nodes, images, cfg.seed, per_channel=cfg.fisher == "channel") if weighted else {}
    bar = progress_bar(len(units), "reconstruct", unit=cfg.granularity) if progress else None
    firsts, lasts, flipped, total = [], [], 0, 0
    try:
        for unit in units:
            weight = {"fisher": fisher[str(unit.target)]} if weighted else {}
            first, last, f, n = step(qmodel, fp_model, unit, images, cfg, gen, **weight)
            firsts.append(first)
            lasts.append(last)
            flipped, total = flipped + f, total + n
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        qmodel.module.train(was_training)
    return ReconstructResult(
        layers=len(nodes), images=len(images), seconds=time.perf_counter() - t0,
        flipped=flipped / total if total else 0.0,
        first_loss=sum(firsts) / len(firsts) if firsts else None,
        last_loss=sum(lasts) / len(lasts) if lasts else None)
