"""Integer-exact evaluation of a QDQ graph on ONNX Runtime's float kernels.

An INT8 engine (TensorRT) computes ``Conv(DQ(x_q), DQ(w_q)) + b`` as an integer convolution
``sum(x_q * w_q)`` accumulated exactly in int32, scaled once by ``s_x * s_w`` and offset by the
bias. ONNX Runtime without QDQ fusion instead multiplies dequantized float32 values and sums them
in float32; the last-bit differences flip a downstream rounding step now and then, and through
20 layers those flips grow until about 1% of the top-1 answers change. With QDQ fusion ORT uses
its own integer kernels, but for INT8 (signed) activations and full-range weights those saturate
on AVX2 machines (u8*s8 pair sums in int16), so neither is what the graph means.

:func:`exact_integer_graph` rewrites every Conv/Gemm whose activation and weight come from
DequantizeLinear into ``Conv(x_q - zp, w_q) * (s_x * s_w) + b``: the convolution runs on
integer-valued float32 tensors, whose products and sums are exact while partial sums stay below
2**24 (every 3x3x576 conv of 8-bit values does), so ORT's float kernels compute the integer
accumulation exactly. The rewrite is derived mechanically from the artifact (its quantized
weights, scales and zero points), so a wrong scale or wiring in the artifact shows in the check.
Run the result with graph optimizations disabled: ORT's Conv+Mul fusion would fold the scale
back into the weights.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


class _Constants:
    """Constant tensors of a graph (initializers and Constant nodes) and who produces what."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.prod = _producers(graph)

    def __call__(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.prod.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        raise ValueError(f"tensor {name} is not a constant")

    def dq_parts(self, tensor: str):
        """(DequantizeLinear node, its quantized input, float32 scale, zero point) or None."""
        node = self.prod.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        zp = self(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0)
        return node, node.input[0], self(node.input[1]).astype(np.float32), zp


def _integer_weight(node: onnx.NodeProto, w_parts, consts: _Constants) -> np.ndarray:
    """The weight's integer codes minus their zero point, as float32 (exact)."""
    w_dq, wq_name, sw, zw = w_parts
    if wq_name not in consts.inits:
        raise ValueError(f"{node.name}: the quantized weight {wq_name} is not an initializer")
    wq = numpy_helper.to_array(consts.inits[wq_name]).astype(np.int64)
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    if sw.size > 1 and (axis % wq.ndim) != 0:
        raise ValueError(f"{node.name}: per-channel weight scales must be on axis 0, got {axis}")
    shape = [-1] + [1] * (wq.ndim - 1)
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        trans_a = attrs["transA"].i if "transA" in attrs else 0
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        if not trans_b or trans_a or alpha != 1.0 or beta != 1.0:
            raise ValueError(f"{node.name}: only Gemm(x, W^T) + b (transB=1) is supported")
    return (wq - np.asarray(zw, dtype=np.int64).reshape(shape if np.size(zw) > 1 else [])).astype(np.float32)


def _rewrite(node: onnx.NodeProto, x_parts, w_parts, consts: _Constants):
    """``Conv(x_q - zp, w_q) * (s_x * s_w) + b`` for one Conv/Gemm: (new nodes, new initializers)."""
    _, xq, sx, zx = x_parts
    sw = w_parts[2]
    if sx.size != 1:
        raise ValueError(f"{node.name}: per-channel activation scales are not supported")
    w_int = _integer_weight(node, w_parts, consts)
    out_channels = w_int.shape[0]
    base = node.name or node.output[0]
    cast = f"{base}.exact_x"
    nodes = [helper.make_node("Cast", [xq], [cast], name=cast, to=TensorProto.FLOAT)]
    inits = []
    x_int = cast
    if np.any(np.asarray(zx) != 0):
        zname = f"{base}.exact_x_zero_point"
        inits.append(numpy_helper.from_array(np.asarray(zx, dtype=np.float32), zname))
        x_int = f"{base}.exact_x_centered"
        nodes.append(helper.make_node("Sub", [cast, zname], [x_int], name=x_int))
    w_name = f"{base}.exact_w"
    inits.append(numpy_helper.from_array(w_int, w_name))
    acc = f"{base}.exact_acc"
    body = onnx.NodeProto()
    body.CopyFrom(node)
    del body.input[:]
    body.input.extend([x_int, w_name])
    body.output[:] = [acc]
    body.name = acc
    nodes.append(body)
    step = (np.float32(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), (out_channels,))).astype(np.float32)
    step_shape = [1, out_channels] + ([1] * (w_int.ndim - 2) if node.op_type == "Conv" else [])
    s_name = f"{base}.exact_step"
    inits.append(numpy_helper.from_array(step.reshape(step_shape), s_name))
    has_bias = len(node.input) > 2 and node.input[2]
    scaled = f"{base}.exact_scaled" if has_bias else node.output[0]
    nodes.append(helper.make_node("Mul", [acc, s_name], [scaled], name=f"{base}.exact_mul"))
    if has_bias:
        b_name = f"{base}.exact_bias"
        inits.append(numpy_helper.from_array(_bias_value(node.input[2], consts.prod, consts).reshape(step_shape), b_name))
        nodes.append(helper.make_node("Add", [scaled, b_name], [node.output[0]], name=f"{base}.exact_add"))
    return nodes, inits


def _keep_used(graph: onnx.GraphProto) -> None:
    """Drop initializers no node reads."""
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def exact_integer_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which quantized Conv/Gemm nodes accumulate integers exactly (see
    the module docstring). Other nodes, and Conv/Gemm nodes whose inputs are not both
    dequantized, are left as they are. Raises ``ValueError`` on a Q/DQ layout it cannot rewrite
    (per-channel activations, non-constant weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = _Constants(graph)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rewritten = 0
    for node in graph.node:
        parts = (consts.dq_parts(node.input[0]), consts.dq_parts(node.input[1])) \
            if node.op_type in ("Conv", "Gemm") and len(node.input) >= 2 else (None, None)
        if parts[0] is None or parts[1] is None:
            new_nodes.append(node)
            continue
        nodes, inits = _rewrite(node, *parts, consts)
        new_nodes += nodes
        new_inits += inits
        rewritten += 1
    if rewritten == 0:
        raise ValueError("the graph has no Conv/Gemm with dequantized inputs; nothing to evaluate exactly")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _keep_used(graph)
    live = _live_outputs(graph)        # drop the now-unused weight DequantizeLinear nodes
    kept_nodes = [n for n in graph.node if any(o in live for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    _keep_used(graph)
    return out


def _bias_value(name: str, prod, const) -> np.ndarray:
    node = prod.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        q = const(node.input[0]).astype(np.float64)
        s = const(node.input[1]).astype(np.float32)
        zp = const(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        return ((q - zp).astype(np.float32) * s).astype(np.float32)
    return const(name).astype(np.float32)


def _live_outputs(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors the graph outputs depend on."""
    prod = _producers(graph)
    live: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        t = stack.pop()
        if t in live:
            continue
        live.add(t)
        n = prod.get(t)
        if n is not None:
            stack.extend(i for i in n.input if i)
    return live
