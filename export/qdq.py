"""Insert QuantizeLinear/DequantizeLinear pairs into the FP graph from the quantizer table.

Two flavours, fixed by the target (see DESIGN.md):

* ``tensorrt``: every Q/DQ is INT8 with zero point 0. Unsigned 8-bit activations use [0, 127].
* ``onnxruntime``: activations are UINT8 (zero point 0 for unsigned tensors, 128 for signed
  ones, so the signed grid [-128, 127] is still symmetric); conv biases are int32 initializers
  with a DequantizeLinear of scale ``s_in * s_w`` as ONNX Runtime's QLinearConv expects.

Weights become INT8 initializers followed by a per-channel (axis 0) DequantizeLinear. 4-bit grids
live in INT8/UINT8 containers, clamped to the 4-bit range by a ``Clip``: a float Clip before the
QuantizeLinear for TensorRT, an integer Clip on the UINT8 codes between Q and DQ for ONNX Runtime
(which keeps its QLinearConv/QLinearAdd fusions). The
arithmetic matches :func:`dfq.kernels.fake_quant.fake_quantize` exactly (round half to even,
clamp to the grid).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfq.export.onnx_graph import ActEntry, QuantTable
from dfq.kernels.fake_quant import Grid


def container(grid: Grid, target: str) -> tuple[int, int]:
    """(ONNX element type, zero point) that holds ``grid`` for ``target``."""
    if target == "tensorrt":
        return TensorProto.INT8, 0
    return TensorProto.UINT8, (128 if grid.signed else 0)


def _container_range(dtype: int, zp: int) -> tuple[int, int]:
    lo, hi = (-128, 127) if dtype == TensorProto.INT8 else (0, 255)
    return lo - zp, hi - zp


def needs_clip(grid: Grid, target: str) -> bool:
    """A Clip is needed where the container saturates outside the grid: above ``qmax``, or below
    ``qmin`` for signed grids (unsigned grids only quantize tensors proven non-negative)."""
    lo, hi = _container_range(*container(grid, target))
    return grid.qmax < hi or (grid.signed and grid.qmin > lo)


def _redundant_upper_clip(node: onnx.NodeProto, table: QuantTable, inits: dict) -> bool:
    """True for ``Clip(x, 0, hi)`` whose output is quantized on an unsigned grid that tops out at or
    below ``hi`` (in float32, as QuantizeLinear computes): clamp(round(min(x, hi)/s), 0, qmax)
    equals clamp(round(x/s), 0, qmax) for every x, so only the lower bound is live."""
    if node.op_type != "Clip" or len(node.input) != 3 or node.output[0] not in table.activations:
        return False
    entry = table.activations[node.output[0]]
    if entry.grid.signed or entry.grid.qmin != 0 or not all(i in inits for i in node.input[1:]):
        return False
    lo, hi = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[1:])
    if lo.size != 1 or hi.size != 1:
        return False
    return float(lo.ravel()[0]) == 0.0 and bool(hi.ravel()[0] / np.float32(entry.scale) >= entry.grid.qmax)


def insert_qdq(fp: onnx.ModelProto, table: QuantTable, target: str) -> onnx.ModelProto:
    """A copy of ``fp`` with Q/DQ pairs on every tensor in ``table.activations`` (all consumers
    read the dequantized tensor) and quantized weights on every node in ``table.weights``."""
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}

    def act_qdq(tensor: str, entry: ActEntry) -> list[onnx.NodeProto]:
        dtype, zp = container(entry.grid, target)
        s = f"{tensor}.q_scale"
        z = f"{tensor}.q_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(entry.scale, dtype=np.float32), s))
        zp_np = np.array(zp, dtype=np.int8 if dtype == TensorProto.INT8 else np.uint8)
        new_inits.append(numpy_helper.from_array(zp_np, z))
        nodes = []
        src = tensor
        clip = needs_clip(entry.grid, target)
        if clip and target == "tensorrt":
            # TensorRT: a float Clip before the INT8 Q (TensorRT fuses it into the producing kernel)
            lo, hi = f"{tensor}.clip_min", f"{tensor}.clip_max"
            new_inits.append(numpy_helper.from_array(np.array(entry.grid.qmin * entry.scale, dtype=np.float32), lo))
            new_inits.append(numpy_helper.from_array(np.array(entry.grid.qmax * entry.scale, dtype=np.float32), hi))
            nodes.append(helper.make_node("Clip", [src, lo, hi], [f"{tensor}_clipped"], name=f"{tensor}_Clip"))
            src = f"{tensor}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{tensor}_quantized"],
                                      name=f"{tensor}_QuantizeLinear"))
        q_out = f"{tensor}_quantized"
        if clip and target != "tensorrt":
            # ONNX Runtime: the Clip runs on the UINT8 codes between Q and DQ. Same numbers as a float
            # Clip before Q (clamp(round(x/s)) commutes with the container's saturation), but the
            # DQ -> Conv -> Q patterns stay intact, so 4-bit convs still fuse into QLinearConv.
            lo, hi = f"{tensor}.clip_qmin", f"{tensor}.clip_qmax"
            new_inits.append(numpy_helper.from_array(np.array(zp + entry.grid.qmin, dtype=zp_np.dtype), lo))
            new_inits.append(numpy_helper.from_array(np.array(zp + entry.grid.qmax, dtype=zp_np.dtype), hi))
            nodes.append(helper.make_node("Clip", [q_out, lo, hi], [f"{tensor}_quantized_clipped"],
                                          name=f"{tensor}_Clip"))
            q_out = f"{tensor}_quantized_clipped"
        nodes.append(helper.make_node("DequantizeLinear", [q_out, s, z], [f"{tensor}_dequantized"],
                                      name=f"{tensor}_DequantizeLinear"))
        rename[tensor] = f"{tensor}_dequantized"
        return nodes

    # graph-input quantization goes first
    for inp in graph.input:
        if inp.name in table.activations:
            new_nodes.extend(act_qdq(inp.name, table.activations[inp.name]))

    for node in graph.node:
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        original_inputs = list(node.input)
        node_copy.input[:] = [rename.get(i, i) for i in node.input]
        if node.name in table.weights:
            entry = table.weights[node.name]
            w_name = original_inputs[1]
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            scale = entry.scale.astype(np.float32)
            q = np.clip(np.round(w / scale.reshape([-1] + [1] * (w.ndim - 1))), entry.grid.qmin, entry.grid.qmax)
            qn, sn, zn = f"{w_name}_quantized", f"{w_name}.scale", f"{w_name}.zero_point"
            new_inits.append(numpy_helper.from_array(q.astype(np.int8), qn))
            new_inits.append(numpy_helper.from_array(scale, sn))
            new_inits.append(numpy_helper.from_array(np.zeros(len(scale), dtype=np.int8), zn))
            new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [f"{w_name}_dequantized"],
                                              name=f"{w_name}_DequantizeLinear", axis=0))
            node_copy.input[1] = f"{w_name}_dequantized"
            if entry.int32_bias and len(original_inputs) > 2:
                in_entry = table.activations[original_inputs[0]]
                b_name = original_inputs[2]
                b = numpy_helper.to_array(inits[b_name]).astype(np.float32)
                step = (np.float32(in_entry.scale) * scale).astype(np.float32)
                bq = np.clip(np.round(b / step), -(2**31), 2**31 - 1).astype(np.int32)
                bqn, bsn, bzn = f"{b_name}_quantized", f"{b_name}.scale", f"{b_name}.zero_point"
                new_inits.append(numpy_helper.from_array(bq, bqn))
                new_inits.append(numpy_helper.from_array(step, bsn))
                new_inits.append(numpy_helper.from_array(np.zeros(len(step), dtype=np.int32), bzn))
                new_nodes.append(helper.make_node("DequantizeLinear", [bqn, bsn, bzn], [f"{b_name}_dequantized"],
                                                  name=f"{b_name}_DequantizeLinear", axis=0))
                node_copy.input[2] = f"{b_name}_dequantized"
        if target != "tensorrt" and _redundant_upper_clip(node, table, inits):
            # Clip(0, hi) -> Q(s, zp=0) with the codes clamped to [0, qmax] and qmax*s <= hi: the
            # upper bound can never bind, so the Clip is a Relu (which ONNX Runtime folds into its
            # QLinearConv). A 4-bit ReLU6 conv otherwise stays a float conv.
            node_copy = helper.make_node("Relu", [node_copy.input[0]], list(node.output), name=node.name)
        new_nodes.append(node_copy)
        for out in node.output:
            if out in table.activations:
                new_nodes.extend(act_qdq(out, table.activations[out]))

    # quantized tensors that are graph outputs keep their name: point the output at the DQ
    for out in graph.output:
        if out.name in rename:
            raise ValueError(f"graph output {out.name} is quantized; dfq keeps logits in float")

    used = {i for n in new_nodes for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [t for t in new_inits if t.name in used])
    return model
