"""``quantize``: turn an FP model into a fake-quant model built for one export target.

Steps (on a deep copy traced with ``torch.fx``):

1. BatchNorm folded into the conv before it (``QuantConv2d``, Tune mode); a zero ``Pad``
   directly before a conv becomes the conv's own (possibly asymmetric) padding; conv -> ReLU ->
   conv chains that read low-bit activations equalised per channel (:mod:`dfq.pipeline.equalize`).
2. Conv2d / Linear replaced by ``QuantConv2d`` / ``QuantLinear`` with per-channel weight
   quantizers; the layer policy sets each layer's bits (default: first conv and last linear at
   8 bits, stated in the report).
3. Activation quantizers inserted where the target needs a quantized tensor (for schemes with
   ``integer_gating`` after SiLU is rewritten as ``x * sigmoid(x)``)
   (:mod:`dfq.pipeline.act_quantizers`). A quantizer sits on the *source* tensor: ops that keep values
   on the grid (max-pool, zero pad, slicing, flatten, dropout) pass the quantized tensor on
   unchanged, and the exporter repeats the same Q/DQ after them.

The returned ``torch.fx.GraphModule`` is the model that is calibrated, fine-tuned and exported;
the ONNX artifact reproduces its arithmetic (see :mod:`dfq.export.onnx_graph`).
"""
from __future__ import annotations

import copy
import fnmatch
import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dfq.common.errors import UnsupportedModelError
from dfq.kernels.fake_quant import QuantScheme
from dfq.pipeline.act_quantizers import input_quantizer_of, insert_act_quantizers, link_bias_scales, quant_requirements
from dfq.pipeline.equalize import EqualizedPair, equalize
from dfq.pipeline.graph import is_passthrough, layer_nodes, module_of, set_module
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear

SUPPORTED_BITS = (4, 8)
# activation-range rules (dfq.pipeline.calibrate); "auto" scores the others on held-out images
CalibrationRule = Literal["auto", "minmax", "percentile", "mse"]
CALIBRATION_RULES: tuple[str, ...] = get_args(CalibrationRule)


@dataclass(frozen=True, order=True)
class Precision:
    """Bits of a layer's weights and of the activations it reads."""

    weights: int
    activations: int

    def __post_init__(self) -> None:
        if self.weights not in SUPPORTED_BITS or self.activations not in SUPPORTED_BITS:
            raise ValueError(f"unsupported precision W{self.weights}A{self.activations}: weights and activations "
                             f"take {' or '.join(map(str, SUPPORTED_BITS))} bits")

    def __str__(self) -> str:
        return f"W{self.weights}A{self.activations}"

    @classmethod
    def parse(cls, text: str | int) -> "Precision":
        """``8`` / ``4`` (the same for weights and activations) or ``W4A8`` (any case)."""
        t = str(text).strip().upper()
        m = re.fullmatch(r"W(\d+)A(\d+)", t)
        try:
            w, a = (int(m.group(1)), int(m.group(2))) if m else (int(t), int(t))
            return cls(w, a)
        except ValueError:
            raise ValueError(f"--bits {text} is not supported: use 8 (W8A8), 4 (W4A4), or weight and activation "
                             "bits such as W4A8") from None


@dataclass
class QuantConfig:
    """How to quantize, for the integer arithmetic of one export target (``scheme``: its
    :class:`~dfq.kernels.fake_quant.QuantScheme`; ``dfq.get_target(name).quant_config(...)`` fills
    it in). ``bits`` is the weight bits and ``act_bits`` the bits of the activations that
    conv/linear layers read (None: ``bits``); ``keep_8bit`` lists layers kept at W8A8: module-name
    glob patterns or ``@first`` (first conv) / ``@last`` (last linear); ``layer_precision`` sets
    single layers' precision after that (mixed precision, :mod:`dfq.pipeline.mixed_precision`).
    ``calibration`` picks the activation-range method (``auto`` measures min/max, percentile and
    MSE on held-out synthetic images and keeps the best)."""

    scheme: QuantScheme
    bits: int = 8
    act_bits: int | None = None
    keep_8bit: tuple[str, ...] = ("@first", "@last")
    layer_precision: dict[str, Precision] = field(default_factory=dict)
    weight_clip_search: bool = True
    calibration: CalibrationRule = "auto"
    percentile: float = 99.99
    # 8-bit weights on [-63, 63] instead of [-127, 127]; None: the scheme's default
    # (dfq.kernels.fake_quant.weight_grid says why a target may want it).
    reduce_range: bool | None = None
    # Bits of every tensor a residual Add reads (and, where the scheme quantizes layer outputs, of
    # the conv/Add outputs that only feed Adds). Every conv/linear still computes on ``bits``-bit
    # inputs and weights: where a layer reads the same tensor as an Add (a block's output, read by
    # the next block's first conv and its shortcut), the layer reads a requantization of it
    # (dfq.pipeline.act_quantizers). Runtimes add on 8-bit kernels anyway. None: 8.
    residual_bits: int | None = 8
    # Cross-layer equalisation of the low-bit activations between two convs (dfq.pipeline.equalize);
    # off by default: on ResNet-20 W4A4 recon it did not lower the drop (README "Methods")
    equalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, QuantScheme):
            raise TypeError("QuantConfig.scheme must be a QuantScheme: use dfq.get_target(name).quant_config(...)")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"--bits {self.bits} is not supported; use 8 (W8A8) or 4 (W4A4)")
        if self.act_bits is None:
            self.act_bits = self.bits
        Precision(self.bits, self.act_bits)   # validates
        self.layer_precision = {k: v if isinstance(v, Precision) else Precision.parse(v)
                                for k, v in self.layer_precision.items()}
        if self.residual_bits is None:
            self.residual_bits = 8
        if self.residual_bits not in SUPPORTED_BITS:
            raise ValueError(f"--residual-bits {self.residual_bits} is not supported; use 8 or 4")
        if self.calibration not in CALIBRATION_RULES:
            raise ValueError(f"unknown calibration {self.calibration!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must lie in (50, 100]")
        self.keep_8bit = tuple(self.keep_8bit)
        if self.reduce_range is None:
            self.reduce_range = self.scheme.reduce_range

    @property
    def precision(self) -> Precision:
        return Precision(self.bits, self.act_bits)

    @property
    def name(self) -> str:
        return str(self.precision) + ("-mixed" if self.layer_precision else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = self.scheme.name
        d["keep_8bit"] = list(self.keep_8bit)
        d["layer_precision"] = {k: str(v) for k, v in self.layer_precision.items()}
        return d


def _decompose_silu(gm: fx.GraphModule) -> None:
    """SiLU modules and calls become ``x * sigmoid(x)``, so that the sigmoid's output can be
    quantized (schemes with ``integer_gating``)."""
    for node in list(gm.graph.nodes):
        if not (isinstance(module_of(gm, node), nn.SiLU) or (node.op == "call_function" and node.target is F.silu)):
            continue
        x = node.args[0]
        with gm.graph.inserting_after(node):
            sig = gm.graph.call_function(torch.sigmoid, (x,))
        with gm.graph.inserting_after(sig):
            mul = gm.graph.call_function(operator.mul, (x, sig))
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


# ---------------------------------------------------------------------------------------------
# structural rewrites


def _fold_batchnorms(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        prev = node.args[0]
        conv = module_of(gm, prev)
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1:
            raise UnsupportedModelError(
                f"BatchNorm '{node.target}' does not directly follow a Conv2d (it follows "
                f"'{getattr(prev, 'target', prev)}'), so it cannot be folded for deployment. dfq folds "
                "every BatchNorm into the conv before it; models with free-standing BatchNorm are "
                "not supported yet.")
        if not bn.track_running_stats or bn.running_mean is None:
            raise UnsupportedModelError(f"BatchNorm '{node.target}' keeps no running statistics.")
        set_module(gm, str(prev.target), QuantConv2d(conv, bn, bits=8))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        _delete_module(gm, str(node.target))


def _merge_pads(gm: fx.GraphModule) -> None:
    """A zero ZeroPad2d / F.pad (last two dims only) whose only user is a QuantConv2d becomes
    part of the conv's padding."""
    for node in list(gm.graph.nodes):
        conv = module_of(gm, node)
        if not isinstance(conv, QuantConv2d):
            continue
        pad_node = node.args[0]
        if not isinstance(pad_node, fx.Node) or len(pad_node.users) != 1:
            continue
        m = module_of(gm, pad_node)
        if isinstance(m, nn.ZeroPad2d):
            left, right, top, bottom = m.padding
        elif pad_node.op == "call_function" and pad_node.target is F.pad and is_passthrough(gm, pad_node):
            pads = pad_node.args[1] if len(pad_node.args) > 1 else pad_node.kwargs["pad"]
            if len(pads) != 4:
                continue
            left, right, top, bottom = pads
        else:
            continue
        if min(left, right, top, bottom) < 0:
            continue
        t, l, b, r = conv.pads
        conv.pads = (t + top, l + left, b + bottom, r + right)
        node.replace_input_with(pad_node, pad_node.args[0])
        gm.graph.erase_node(pad_node)
        if m is not None:
            _delete_module(gm, str(pad_node.target))


def _replace_layers(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if isinstance(m, nn.Conv2d):
            set_module(gm, str(node.target), QuantConv2d(m, None, bits=8))
        elif isinstance(m, nn.Linear):
            set_module(gm, str(node.target), QuantLinear(m, bits=8))
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.LayerNorm,
                            nn.GroupNorm, nn.MultiheadAttention)):
            raise UnsupportedModelError(
                f"module '{node.target}' ({type(m).__name__}) cannot be quantized by dfq: supported "
                "layers are Conv2d (with BatchNorm2d), Linear, and the activations, pooling and "
                "elementwise ops of CNN classifiers.")


def _delete_module(gm: fx.GraphModule, name: str) -> None:
    parent, _, leaf = name.rpartition(".")
    delattr(gm.get_submodule(parent) if parent else gm, leaf)


LAYER_ALIASES = ("@first", "@last")


def layer_matches(name: str, pattern: str, aliases: dict[str, str | None]) -> bool:
    """Does a ``keep_8bit`` entry name layer ``name``: ``@first``/``@last`` through ``aliases``
    (alias -> layer name), anything else as a case-sensitive glob on the module name."""
    if pattern in LAYER_ALIASES:
        return aliases.get(pattern) == name
    return fnmatch.fnmatchcase(name, pattern)


def unmatched_patterns(patterns, names) -> list[str]:
    """The glob entries of ``patterns`` that name none of ``names`` (aliases always match)."""
    return [p for p in patterns if p not in LAYER_ALIASES and not any(layer_matches(n, p, {}) for n in names)]


def first_and_last(gm: fx.GraphModule) -> dict[str, str | None]:
    """``@first`` (the first conv) and ``@last`` (the last linear, else the last layer) by module name."""
    layers = layer_nodes(gm)
    convs = [n for n in layers if isinstance(module_of(gm, n), QuantConv2d)]
    linears = [n for n in layers if isinstance(module_of(gm, n), QuantLinear)]
    return {"@first": str(convs[0].target) if convs else None,
            "@last": str(linears[-1].target) if linears else (str(layers[-1].target) if layers else None)}


def kept_8bit(gm: fx.GraphModule, config: QuantConfig) -> set[str]:
    """The layers (module names) a ``keep_8bit`` entry of ``config`` matches."""
    aliases = first_and_last(gm)
    return {str(n.target) for n in layer_nodes(gm)
            if any(layer_matches(str(n.target), p, aliases) for p in config.keep_8bit)}


def policy_precision(gm: fx.GraphModule, config: QuantConfig) -> dict[str, Precision]:
    """Precision per layer (module name): W8A8 where a ``keep_8bit`` entry matches, else the config's;
    then ``layer_precision`` for the layers it names."""
    kept = kept_8bit(gm, config)
    out = {}
    for n in layer_nodes(gm):
        name = str(n.target)
        out[name] = Precision(8, 8) if name in kept else config.precision
    unknown = set(config.layer_precision) - set(out)
    if unknown:
        raise ValueError(f"layer_precision names layers the model does not have: {sorted(unknown)}")
    return {**out, **{k: v for k, v in config.layer_precision.items()}}


@dataclass
class QuantizedModel:
    """The fake-quant model plus what a report needs to say about it."""

    module: fx.GraphModule
    config: QuantConfig
    layer_precision: dict[str, Precision] = field(default_factory=dict)   # what every layer runs at
    equalized: list[EqualizedPair] = field(default_factory=list)

    @property
    def layer_bits(self) -> dict[str, int]:
        """Weight bits per layer."""
        return {n: p.weights for n, p in self.layer_precision.items()}

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        return {n: m for n, m in self.module.named_modules() if isinstance(m, ActQuantizer)}

    def layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.module.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}

    def set_enabled(self, weights: bool = True, activations: bool = True) -> None:
        for m in self.module.modules():
            if isinstance(m, ActQuantizer):
                m.enabled = activations
            elif isinstance(m, (QuantConv2d, QuantLinear)):
                m.weight_quantizer.enabled = weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# Functions that are the identity on an eval-mode model (their ``training`` argument was False
# when the graph was traced): regularisers of training such as dropout and stochastic depth.
EVAL_IDENTITIES = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torchvision.ops.stochastic_depth)


def _remove_eval_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in EVAL_IDENTITIES:
            training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else None)
            if node.target is not torchvision.ops.stochastic_depth:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training is False:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)


def trace(model: nn.Module) -> fx.GraphModule:
    """The FX graph of an eval-mode model, without the ops that are the identity in eval mode."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - FX raises many kinds
        raise UnsupportedModelError(
            f"the model cannot be traced with torch.fx ({type(exc).__name__}: {exc}). dfq needs a "
            "static graph without data-dependent Python control flow.") from exc
    _remove_eval_identities(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def quantize(model: nn.Module, config: QuantConfig, example_input: torch.Tensor) -> QuantizedModel:
    """Build the fake-quant model for ``config.scheme`` from an FP model (left unchanged).

    ``example_input`` is one batch (``[N, C, H, W]``) used to record tensor shapes. Weight
    scales are set here (clip search); activation scales are set by :func:`calibrate`.
    """
    gm = trace(copy.deepcopy(model).eval())
    if config.scheme.integer_gating:
        _decompose_silu(gm)
    ShapeProp(gm).propagate(example_input)
    _fold_batchnorms(gm)
    _replace_layers(gm)
    _merge_pads(gm)
    wanted = policy_precision(gm, config)
    equalized = equalize(gm, {n for n, p in wanted.items() if p.activations < 8}) if config.equalize else []
    for name, p in wanted.items():
        layer = gm.get_submodule(name)
        layer.weight_quantizer = type(layer.weight_quantizer)(layer.weight_quantizer.scale.numel(), p.weights,
                                                              config.reduce_range)
    need = quant_requirements(gm, wanted, config)
    insert_act_quantizers(gm, need, config)
    link_bias_scales(gm, config)
    gm.graph.lint()
    gm.recompile()
    ShapeProp(gm).propagate(example_input)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.weight_quantizer.calibrate(m.folded()[0], search=config.weight_clip_search)
    gm.eval()
    return QuantizedModel(gm, config, _actual_precision(gm), equalized)


def _actual_precision(gm: fx.GraphModule) -> dict[str, Precision]:
    """Each layer's weight bits and the bits of the quantizer its input passes (a tensor several
    layers read is quantized at the largest bits they ask for)."""
    out = {}
    for node in layer_nodes(gm):
        aq = input_quantizer_of(gm, node)
        w = module_of(gm, node).weight_quantizer.bits
        out[str(node.target)] = Precision(w, module_of(gm, aq).bits if aq is not None else 8)
    return out
