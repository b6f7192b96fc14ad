"""Layer-wise reconstruction with learned rounding on synthetic images (the ``reconstruct`` stage).

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

Activation scales and biases stay as calibrated; the stage's caller keeps the result only if the
FP->quantized KL on held-out synthetic images falls.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.common.progress import progress as progress_bar
from dfq.kernels.fake_quant import Grid
from dfq.pipeline.models import is_small_input
from dfq.pipeline.qmodules import QuantConv2d
from dfq.pipeline.quantize import QuantizedModel, input_quantizer_of, layer_nodes

ZETA, GAMMA = 1.1, -0.1


@dataclass
class ReconstructConfig:
    iterations: int = 500        # per layer
    batch: int = 32
    lr: float | None = None      # Adam on the rounding variables; None: 3 / iterations
    reg: float = 0.01            # weight of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2          # fraction of the iterations without the regulariser
    drop: float = 0.5            # probability of the float input, per element (QDrop)
    crop: int | None = 16        # conv layers train on crop x crop output windows (None: whole maps)
    seed: int = 0

    def __post_init__(self) -> None:
        # Adam moves a variable by about lr per step: 3 / iterations lets any weight cross its
        # rounding point (|V| <= 4.6 at the start) within the schedule, whatever its length
        if self.lr is None:
            self.lr = 3.0 / self.iterations

    @classmethod
    def for_budget(cls, budget: str, input_size, seed: int = 0) -> "ReconstructConfig":
        small = is_small_input(input_size)
        table = {"fast": (300, 64) if small else (500, 32), "default": (1000, 64) if small else (1500, 32),
                 "long": (2000, 64) if small else (3000, 64)}
        iterations, batch = table[budget]
        return cls(iterations=iterations, batch=batch, crop=None if small else 16, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


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
    """Stands in for a layer's WeightQuantizer during reconstruction (same ``scale``/``enabled``)."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, grid: Grid) -> None:
        super().__init__()
        self.scale, self.grid, self.enabled = scale.detach(), grid, True
        s = self._s(w)
        self.floor = torch.floor(w.detach() / s)
        frac = (w.detach() / s - self.floor).clamp(0.01, 0.99)
        self.v = nn.Parameter(torch.log((frac - GAMMA) / (ZETA - frac)))   # h(v) == frac

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

    def __init__(self, layer: nn.Module, x_q: torch.Tensor, x_fp: torch.Tensor, y: torch.Tensor, crop: int | None):
        self.layer, self.y = layer, y
        self.conv = isinstance(layer, QuantConv2d) and crop is not None and max(y.shape[2:]) > crop
        self.crop = crop
        if self.conv:
            top, left, bottom, right = layer.pads
            x_q, x_fp = (F.pad(x, (left, right, top, bottom)) for x in (x_q, x_fp))
        self.x_q, self.x_fp = x_q, x_fp

    def sample(self, idx: torch.Tensor, gen: torch.Generator):
        xq, xf, y = self.x_q[idx], self.x_fp[idx], self.y[idx]
        if not self.conv:
            return xq, xf, y
        (sh, sw), (dh, dw), (kh, kw) = self.layer.stride, self.layer.dilation, self.layer.kernel_size
        ph, pw = min(self.crop, y.shape[2]), min(self.crop, y.shape[3])
        oy = int(torch.randint(0, y.shape[2] - ph + 1, (1,), generator=gen))
        ox = int(torch.randint(0, y.shape[3] - pw + 1, (1,), generator=gen))
        iy, ix = oy * sh, ox * sw
        hin, win = (ph - 1) * sh + dh * (kh - 1) + 1, (pw - 1) * sw + dw * (kw - 1) + 1
        window = (slice(None), slice(None), slice(iy, iy + hin), slice(ix, ix + win))
        return xq[window], xf[window], y[:, :, oy:oy + ph, ox:ox + pw]

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None) -> torch.Tensor:
        return self.layer.forward_padded(x, in_scale) if self.conv else self.layer(x, in_scale)


def _reconstruct_layer(qmodel: QuantizedModel, fp_model: QuantizedModel, node: fx.Node, images: torch.Tensor,
                       cfg: ReconstructConfig, gen: torch.Generator) -> tuple[float, float, float]:
    """Learn and fix one layer's rounding; returns (first loss, last loss, fraction flipped).
    ``fp_model`` is a copy of ``qmodel`` from before any layer was reconstructed: its float weights
    are the FP model's (``qmodel``'s earlier layers hold their baked codes by now)."""
    gm = qmodel.module
    layer = gm.get_submodule(str(node.target))
    x_q, _ = _capture(qmodel, layer, images, quantized=True)
    x_fp, y = _capture(fp_model, fp_model.module.get_submodule(str(node.target)), images, quantized=False)
    data = _Windows(layer, x_q, x_fp, y, cfg.crop)
    aq = input_quantizer_of(gm, node)
    in_scale = gm.get_submodule(str(aq.target)).scale.detach() if aq is not None else None
    original = layer.weight_quantizer
    with torch.no_grad():
        w = layer.folded()[0].detach()
    rounding = _LearnedRounding(w, original.scale, original.grid)
    nearest = torch.clamp(torch.round(w / rounding._s(w)), original.grid.qmin, original.grid.qmax)
    layer.weight_quantizer = rounding
    opt = torch.optim.Adam([rounding.v], lr=cfg.lr)
    losses = []
    try:
        for it in range(cfg.iterations):
            idx = torch.randint(0, len(images), (min(cfg.batch, len(images)),), generator=gen)
            xq, xf, target = data.sample(idx, gen)
            keep_fp = torch.rand(xq.shape, generator=gen) < cfg.drop
            out = data.forward(torch.where(keep_fp, xf, xq), in_scale)
            rec = (out - target).pow(2).sum(1).mean()
            t = (it - cfg.warmup * cfg.iterations) / max(1.0, (1 - cfg.warmup) * cfg.iterations)
            loss = rec
            if t >= 0:
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - t)
                loss = rec + cfg.reg * rounding.regulariser(beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(rec.detach()))
        with torch.no_grad():
            codes = rounding.codes()
            _bake(layer, codes, original.scale.detach())
            flipped = float((codes != nearest).float().mean())
    finally:
        layer.weight_quantizer = original
    return losses[0], losses[-1], flipped


def reconstruct(qmodel: QuantizedModel, images: torch.Tensor, cfg: ReconstructConfig, *,
                progress: bool = True) -> ReconstructResult:
    """Learned rounding for every conv/linear layer whose weights are below 8 bits (see the module
    docstring); ``qmodel`` is changed in place."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + 3)
    nodes = [n for n in layer_nodes(qmodel.module) if qmodel.layer_precision[str(n.target)].weights < 8]
    was_training = qmodel.module.training
    qmodel.module.eval()
    for p in qmodel.module.parameters():
        p.requires_grad_(False)
    fp_model = copy.deepcopy(qmodel)
    bar = progress_bar(len(nodes), "reconstruct", unit="layer") if progress else None
    firsts, lasts, flips, sizes = [], [], [], []
    try:
        for node in nodes:
            first, last, flipped = _reconstruct_layer(qmodel, fp_model, node, images, cfg, gen)
            firsts.append(first)
            lasts.append(last)
            flips.append(flipped)
            sizes.append(qmodel.module.get_submodule(str(node.target)).weight.numel())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        qmodel.module.train(was_training)
    total = sum(sizes)
    return ReconstructResult(
        layers=len(nodes), images=len(images), seconds=time.perf_counter() - t0,
        flipped=sum(f * s for f, s in zip(flips, sizes)) / total if total else 0.0,
        first_loss=sum(firsts) / len(firsts) if firsts else None,
        last_loss=sum(lasts) / len(lasts) if lasts else None)
