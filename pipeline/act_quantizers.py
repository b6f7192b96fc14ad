"""Where activation quantizers go, and how conv/linear biases link to them.

:func:`quant_requirements` decides which source tensors need a quantizer and at how many bits;
:func:`insert_act_quantizers` puts them into the graph; :func:`link_bias_scales` gives layers with
int32 biases the scale of their input quantizer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from dfq.pipeline.graph import (
    is_add,
    is_clip_activation,
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


def quant_requirements(gm: fx.GraphModule, layers: dict[str, Precision], config: QuantConfig) -> dict[fx.Node, int]:
    """Source tensors that need an activation quantizer, with their bits.

    Both targets: the activation input of every conv/linear and both inputs of every residual
    Add (so TensorRT fuses it and ONNX Runtime runs QLinearAdd). ONNX Runtime additionally needs
    a Q on every conv and Add output (after a following ReLU/ReLU6, which the Q then makes
    redundant) so DQ-Conv-Q fuses into QLinearConv. Bits: a tensor a conv/linear reads gets the
    largest activation bits its reading layers ask for; any other quantized tensor gets
    ``residual_bits`` (default 8).
    """
    layer_need: dict[fx.Node, int] = {}   # tensors a conv/linear reads: that layer's bits
    other_need: dict[fx.Node, int] = {}   # tensors only Adds read (or ORT's output Qs)
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
                require(other_need, a, residual)
        if config.scheme.quantize_outputs and (isinstance(m, QuantConv2d) or is_add(node)):
            out = node
            users = list(node.users)
            if len(users) == 1 and is_clip_activation(gm, users[0]) is not None:
                out = users[0]
            require(other_need, out, residual)
        if config.scheme.integer_gating and is_sigmoid_gate(gm, node):
            for t in (*node.args[:2], node):
                require(other_need, t, 8)
    # a tensor a layer reads is quantized for that layer, whatever else reads it
    return {src: layer_need.get(src, other_need.get(src)) for src in order}


def insert_act_quantizers(gm: fx.GraphModule, need: dict[fx.Node, int], config: QuantConfig) -> None:
    used = set(dict(gm.named_modules()))
    for src, bits in need.items():
        signed = not is_nonnegative(gm, src)
        name = "aq_" + src.name
        while name in used:
            name += "_"
        used.add(name)
        gm.add_submodule(name, ActQuantizer(bits, signed, config.scheme, upper_bound(gm, src)))
        with gm.graph.inserting_after(src):
            q = gm.graph.call_module(name, (src,))
        src.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)


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
