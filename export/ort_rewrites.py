"""Exact graph rewrites of the ONNX Runtime artifact that make its integer kernels faster.

``space_to_depth_stem``: a strided conv with a large kernel on few input channels (the 7x7/2 stem
of a ResNet reads 3 channels) is the slowest QLinearConv of the graph per multiply-add, because
MLAS's NHWC im2col copies ``C`` bytes per kernel tap (README "ONNX Runtime artifact" has the
profile). The same conv on the space-to-depth image (each ``s x s`` block of pixels as ``C*s*s`` channels) is
a stride-1 conv with a ``ceil((k+d)/s)`` kernel (``d``: the left shift that aligns the padding to
the blocks) and 12 channels: more MACs (8x8 vs 7x7 taps), half the conv time. The
``SpaceToDepth`` runs on the UINT8 codes between the input's QuantizeLinear and DequantizeLinear
(so ONNX Runtime still fuses DQ -> Conv -> Q into QLinearConv), the padding that falls inside a
block becomes zero weights, the rest stays the conv's own padding (zero point). Every product of
the original conv is computed once, every added one is a zero weight or a zero-point input, so
the integer accumulator, and the output, are bit-identical (tested).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

# MLAS's im2col cost is per kernel tap and input channel group: the rewrite pays for itself where
# the kernel is large and the channels are few; 3x3 stems are left alone (README).
MAX_IN_CHANNELS = 4
MIN_KERNEL = 5


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def stem_plan(h: int, k: int, s: int, pad_begin: int, pad_end: int) -> tuple[int, int, int, int] | None:
    """For one spatial axis of a conv (input size ``h``, kernel ``k``, stride ``s``, pads): the
    (left shift ``d``, new kernel, new pad begin, new pad end) of the stride-1 conv on the
    space-to-depth input, or None where the rewrite does not apply (``h`` not a multiple of ``s``).

    Original: ``y[i] = sum_u w[u] x[s*i + u - pad_begin]``. With ``d = (-pad_begin) mod s`` and
    ``u + d = s*a + p``: ``x[s*(i + a - P) + p]``, ``P = (pad_begin + d) / s`` - block ``i + a - P``,
    channel ``p`` of the space-to-depth image, a stride-1 conv with pad ``P`` and kernel
    ``ceil((k + d) / s)``."""
    if h % s:
        return None
    out = (h + pad_begin + pad_end - k) // s + 1
    d = (-pad_begin) % s
    kk = math.ceil((k + d) / s)
    pb = (pad_begin + d) // s
    pe = out - 1 - pb + kk - 1 - (h // s - 1)
    if pe < 0 or h // s + pb + pe - kk + 1 != out:
        return None
    return d, kk, pb, pe


def space_to_depth_weights(w: np.ndarray, s: int, d: tuple[int, int], kk: tuple[int, int]) -> np.ndarray:
    """``w[o, c, u, v]`` -> ``w'[o, (p*s + q)*C + c, a, b] = w[o, c, s*a + p - d0, s*b + q - d1]``
    (zero outside), the channel order of ONNX ``SpaceToDepth``."""
    o, c, kh, kw = w.shape
    padded = np.zeros((o, c, kk[0] * s, kk[1] * s), dtype=w.dtype)
    padded[:, :, d[0]:d[0] + kh, d[1]:d[1] + kw] = w
    return np.ascontiguousarray(
        padded.reshape(o, c, kk[0], s, kk[1], s).transpose(0, 3, 5, 1, 2, 4).reshape(o, c * s * s, kk[0], kk[1]))


class _Graph:
    """Lookups over a graph: producers, reader counts, initializers, graph inputs."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.readers[i] = self.readers.get(i, 0) + 1
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {i.name: i for i in g.input}

    def only_reader(self, tensor: str) -> bool:
        return self.readers.get(tensor, 0) == 1


def _eligible_geometry(conv: onnx.NodeProto) -> bool:
    strides = list(_attr(conv, "strides", [1, 1]))
    kernel = list(_attr(conv, "kernel_shape", []))
    return not (len(strides) != 2 or strides[0] != strides[1] or strides[0] < 2 or len(kernel) != 2
                or min(kernel) < MIN_KERNEL or _attr(conv, "group", 1) != 1
                or any(v != 1 for v in _attr(conv, "dilations", [1, 1]))
                or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"))


def _plan(conv: onnx.NodeProto, g: _Graph):
    """(input DQ, weight DQ, plans per axis) where ``conv`` is eligible (see
    :func:`space_to_depth_stem`), else None."""
    if conv.op_type != "Conv" or len(conv.input) < 2 or not _eligible_geometry(conv):
        return None
    dq, wdq = g.producer.get(conv.input[0]), g.producer.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or wdq is None or wdq.op_type != "DequantizeLinear":
        return None
    if wdq.input[0] not in g.inits or not g.only_reader(wdq.output[0]) or not g.only_reader(wdq.input[0]):
        return None
    if not g.only_reader(dq.input[0]) or not g.only_reader(dq.output[0]):
        return None
    src = g.producer.get(dq.input[0])
    if src is not None and src.op_type == "Clip":
        src = g.producer.get(src.input[0])
    if src is None or src.op_type != "QuantizeLinear" or src.input[0] not in g.inputs:
        return None
    shape = [d.dim_value if d.HasField("dim_value") else None
             for d in g.inputs[src.input[0]].type.tensor_type.shape.dim]
    if len(shape) != 4 or None in shape[1:] or shape[1] > MAX_IN_CHANNELS:
        return None
    s, kernel = list(_attr(conv, "strides"))[0], list(_attr(conv, "kernel_shape"))
    pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
    plans = [stem_plan(shape[2 + ax], kernel[ax], s, pads[ax], pads[2 + ax]) for ax in range(2)]
    w = numpy_helper.to_array(g.inits[wdq.input[0]])
    if None in plans or w.dtype != np.int8 or w.shape[1] != shape[1]:
        return None
    return dq, wdq, plans


def _apply(conv: onnx.NodeProto, dq: onnx.NodeProto, wdq: onnx.NodeProto, plans, g: _Graph) -> onnx.NodeProto:
    """Rewrite the conv and its weight in place; returns the SpaceToDepth to put before ``dq``."""
    s = list(_attr(conv, "strides"))[0]
    (d0, k0, b0, e0), (d1, k1, b1, e1) = plans
    codes = dq.input[0]
    w2 = space_to_depth_weights(numpy_helper.to_array(g.inits[wdq.input[0]]), s, (d0, d1), (k0, k1))
    g.inits[wdq.input[0]].CopyFrom(numpy_helper.from_array(w2, wdq.input[0]))
    s2d_out = f"{codes}_space_to_depth"
    s2d = helper.make_node("SpaceToDepth", [codes], [s2d_out], name=f"{conv.name or conv.output[0]}_SpaceToDepth",
                           blocksize=s)
    dq.input[0] = s2d_out
    keep = [a for a in conv.attribute if a.name not in ("kernel_shape", "strides", "pads")]
    del conv.attribute[:]
    conv.attribute.extend(keep + [helper.make_attribute("kernel_shape", [k0, k1]),
                                  helper.make_attribute("strides", [1, 1]),
                                  helper.make_attribute("pads", [b0, b1, e0, e1])])
    return s2d


def space_to_depth_stem(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite every eligible input conv (see the module docstring) in a copy of ``model``; returns
    it and the names of the rewritten Conv nodes. Eligible: a Conv (group 1, dilation 1, equal
    strides > 1, kernel >= MIN_KERNEL, <= MAX_IN_CHANNELS input channels, static spatial size
    divisible by the stride) whose input is ``DequantizeLinear(codes)`` of a graph input's
    QuantizeLinear (a Clip between them allowed), whose weight is a constant INT8 initializer
    behind a DequantizeLinear, and whose codes/dequantized tensors have no other reader."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    g = model_out.graph
    lookup = _Graph(g)
    rewritten: list[str] = []
    new_nodes: dict[str, onnx.NodeProto] = {}   # DQ name -> SpaceToDepth to put before it
    for conv in g.node:
        plan = _plan(conv, lookup)
        if plan is None:
            continue
        dq, wdq, plans = plan
        new_nodes[dq.name or dq.output[0]] = _apply(conv, dq, wdq, plans, lookup)
        rewritten.append(conv.name or conv.output[0])
        stale = {dq.output[0], wdq.output[0]}
        keep_vi = [v for v in g.value_info if v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(keep_vi)
    if not rewritten:
        return model, []
    nodes = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and (n.name or n.output[0]) in new_nodes:
            nodes.append(new_nodes[n.name or n.output[0]])
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model_out, rewritten
