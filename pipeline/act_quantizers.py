"""Where activation quantizers go, and how conv/linear biases link to them.

:func:`quant_requirements` decides which source tensors need a quantizer and at how many bits;
:func:`insert_act_quantizers` puts them into the graph; :func:`link_bias_scales` gives layers with
int32 biases the scale of their input quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

from dfq.pipeline.graph import (
    clip_reader,
    is_add,
    is_nonnegative,
    is_sigmoid_gate,
    layer_nodes,
    module_of,
    source_of,
    upper_bound,
)
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear

if TYPE_CHECKING:
    from dfq.pipeline.quantize import Precision, QuantConfig


@dataclass(frozen=True)
class ActNeed:
    """The quantizer a source tensor gets, and the narrower requantization its conv/linear readers
    read where a residual Add reading the same tensor asks for more bits (``layer_bits``)."""

    bits: int
    layer_bits: int | None = None


def quant_requirements(gm: fx.GraphModule, layers: dict[str, Precision], config: QuantConfig) -> dict[fx.Node, ActNeed]:
    """Source tensors that need an activation quantizer, with their bits.

    Both targets: the activation input of every conv/linear and both inputs of every residual
    Add (so TensorRT fuses it and ONNX Runtime runs QLinearAdd). ONNX Runtime additionally needs
    a Q on every conv and Add output (after a following ReLU/ReLU6, which the Q then makes
    redundant) so DQ-Conv-Q fuses into QLinearConv. Bits: a tensor a conv/linear reads gets the
    largest activation bits its reading layers ask for; every residual Add read, and any other
    quantized tensor, gets ``residual_bits`` (default 8). A tensor both kinds read (a residual
    block's output, which the next block's first conv and its shortcut Add read) is quantized at
    the Add's bits and requantized to the layers' bits for the layers only (``ActNeed.layer_bits``).
    """
    layer_need: dict[fx.Node, int] = {}   # tensors a conv/linear reads: that layer's bits
    add_need: dict[fx.Node, int] = {}     # tensors a residual Add reads
    other_need: dict[fx.Node, int] = {}   # ORT's output Qs, sigmoid gates
    residual = config.residual_bits

    order: dict[fx.Node, None] = {}       # first-seen order, so quantizer order is stable

    def require(table: dict, node, bits: int) -> None:
        if not isinstance(node, fx.Node):
            return
        src = source_of(gm, node)
        order.setdefault(src)
        table[src] = max(table.get(src, 0), bits)

    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            require(layer_need, node.args[0], layers[str(node.target)].activations)
        if is_add(node):
            for a in node.args[:2]:
                require(add_need, a, residual)
        if config.scheme.quantize_outputs and (isinstance(m, QuantConv2d) or is_add(node)):
            require(other_need, clip_reader(gm, node) or node, residual)
        if config.scheme.integer_gating and is_sigmoid_gate(gm, node):
            for t in (*node.args[:2], node):
                require(other_need, t, 8)
    return {src: _need(layer_need.get(src), add_need.get(src), other_need.get(src)) for src in order}


def _need(layer: int | None, add: int | None, other: int | None) -> ActNeed:
    if layer is None:
        return ActNeed(max(b for b in (add, other) if b is not None))
    if add is not None and add > layer:
        return ActNeed(add, layer)
    return ActNeed(layer)   # a tensor only layers (and output Qs) read is quantized for the layers


def _add_quantizer(gm: fx.GraphModule, used: set[str], name: str, quantizer: ActQuantizer, reads: fx.Node) -> fx.Node:
    while name in used:
        name += "_"
    used.add(name)
    gm.add_submodule(name, quantizer)
    with gm.graph.inserting_after(reads):
        return gm.graph.call_module(name, (reads,))


def insert_act_quantizers(gm: fx.GraphModule, need: dict[fx.Node, ActNeed], config: QuantConfig) -> None:
    """One quantizer per source tensor, read by everything that read the tensor; where
    ``layer_bits`` is set, each conv/linear input on that tensor then passes a second quantizer
    at those bits (the requantization)."""
    used = set(dict(gm.named_modules()))
    for src, n in need.items():
        signed, bound = not is_nonnegative(gm, src), upper_bound(gm, src)
        q = _add_quantizer(gm, used, "aq_" + src.name, ActQuantizer(n.bits, signed, config.scheme, bound), src)
        src.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        if n.layer_bits is None:
            continue
        inputs = {layer.args[0] for layer in layer_nodes(gm) if source_of(gm, layer.args[0]) is q}
        for x in sorted(inputs, key=lambda node: node.name):
            narrow = ActQuantizer(n.layer_bits, signed, config.scheme, bound)
            r = _add_quantizer(gm, used, f"aq_{src.name}_a{n.layer_bits}", narrow, x)
            for layer in [u for u in x.users if isinstance(module_of(gm, u), (QuantConv2d, QuantLinear))]:
                layer.replace_input_with(x, r)


def input_quantizer_of(gm: fx.GraphModule, layer: fx.Node) -> fx.Node | None:
    """The ActQuantizer node that quantizes a layer's activation input (through pass-through ops)."""
    src = source_of(gm, layer.args[0])
    return src if isinstance(module_of(gm, src), ActQuantizer) else None


def link_bias_scales(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Schemes with int32 biases: conv and linear biases live on the int32 grid ``s_in * s_w``
    (what ONNX Runtime's QLinearConv and QGemm take; a float bias keeps ORT from fusing a Gemm into
    QGemm); pass each layer the scale of its input quantizer as a second argument."""
    if not config.scheme.int32_bias:
        return
    for node in layer_nodes(gm):
        m = module_of(gm, node)
        if not isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        aq = input_quantizer_of(gm, node)
        if aq is None:
            continue
        m.bias_mode = "int32"
        with gm.graph.inserting_before(node):
            s = gm.graph.get_attr(f"{aq.target}.scale")
        node.args = (node.args[0], s)
