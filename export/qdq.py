"""Insert QuantizeLinear/DequantizeLinear pairs into the FP graph from the quantizer table.

How a target stores its grids is a :class:`QDQFormat` (each target in :mod:`dfq.export.targets`
owns one):

* INT8 containers, zero point 0 (TensorRT: no UINT8, no asymmetric quantization), or UINT8
  activations with zero point 0 for unsigned tensors and 128 for signed ones, so the signed grid
  [-128, 127] is still symmetric (ONNX Runtime's preferred U8S8 kernels).
* 4-bit grids live in 8-bit containers, clamped to the 4-bit range by a ``Clip``: a float Clip
  before the QuantizeLinear, or an integer Clip on the codes between Q and DQ (which keeps ONNX
  Runtime's QLinearConv/QLinearAdd fusions).
* Optionally a ``Clip(0, hi)`` whose bound cannot bind on the following unsigned grid becomes a
  ``Relu`` (ONNX Runtime folds a Relu into its QLinearConv, not a Clip).

Weights become INT8 initializers followed by a per-channel (axis 0) DequantizeLinear; with
``int32_bias`` (table entries) conv/linear biases become int32 initializers with a DequantizeLinear
of scale ``s_in * s_w``. The arithmetic matches :func:`dfq.kernels.fake_quant.fake_quantize`
exactly (round half to even, clamp to the grid).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfq.export.onnx_graph import ActEntry, QuantTable, WeightEntry
from dfq.kernels.fake_quant import Grid


@dataclass(frozen=True)
class QDQFormat:
    """How a target's Q/DQ pairs hold a grid (see the module docstring)."""

    uint8_activations: bool     # UINT8 containers (zero point 128 for signed grids) instead of INT8
    clip_on_codes: bool         # 4-bit clip between Q and DQ on the codes, instead of a float Clip before Q
    relu6_as_relu: bool         # Clip(0, hi) that cannot bind on the next unsigned grid -> Relu

    def container(self, grid: Grid) -> tuple[int, int]:
        """(ONNX element type, zero point) that holds ``grid``."""
        if not self.uint8_activations:
            return TensorProto.INT8, 0
        return TensorProto.UINT8, (128 if grid.signed else 0)

    def needs_clip(self, grid: Grid) -> bool:
        """A Clip is needed where the container saturates outside the grid: above ``qmax``, or
        below ``qmin`` for signed grids (unsigned grids only quantize tensors proven non-negative)."""
        lo, hi = _container_range(*self.container(grid))
        return grid.qmax < hi or (grid.signed and grid.qmin > lo)

    def describe(self) -> str:
        return ("UINT8 activations (signed ones with zero point 128) / INT8 weights" if self.uint8_activations
                else "INT8")


def _container_range(dtype: int, zp: int) -> tuple[int, int]:
    lo, hi = (-128, 127) if dtype == TensorProto.INT8 else (0, 255)
    return lo - zp, hi - zp


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


class _Inserter:
    """One pass over the FP graph; nodes and initializers are emitted in a fixed order (the
    artifact is byte-for-byte reproducible)."""

    def __init__(self, graph: onnx.GraphProto, table: QuantTable, fmt: QDQFormat) -> None:
        self.table, self.fmt = table, fmt
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.rename: dict[str, str] = {}

    def init(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def activation(self, tensor: str, entry: ActEntry) -> None:
        """Q -> [Clip] -> DQ of one activation tensor; its readers get the dequantized tensor."""
        dtype, zp = self.fmt.container(entry.grid)
        s = self.init(f"{tensor}.q_scale", np.array(entry.scale, dtype=np.float32))
        zp_np = np.array(zp, dtype=np.int8 if dtype == TensorProto.INT8 else np.uint8)
        z = self.init(f"{tensor}.q_zero_point", zp_np)
        src = tensor
        clip = self.fmt.needs_clip(entry.grid)
        if clip and not self.fmt.clip_on_codes:
            # a float Clip before the Q (TensorRT fuses it into the producing kernel)
            lo = self.init(f"{tensor}.clip_min", np.array(entry.grid.qmin * entry.scale, dtype=np.float32))
            hi = self.init(f"{tensor}.clip_max", np.array(entry.grid.qmax * entry.scale, dtype=np.float32))
            self.nodes.append(helper.make_node("Clip", [src, lo, hi], [f"{tensor}_clipped"], name=f"{tensor}_Clip"))
            src = f"{tensor}_clipped"
        q_out = f"{tensor}_quantized"
        self.nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [q_out], name=f"{tensor}_QuantizeLinear"))
        if clip and self.fmt.clip_on_codes:
            # the Clip on the codes between Q and DQ: the same numbers as a float Clip before the Q
            # (clamp(round(x/s)) commutes with the container's saturation), and DQ -> Conv -> Q
            # patterns stay intact, so 4-bit convs still fuse into QLinearConv
            lo = self.init(f"{tensor}.clip_qmin", np.array(zp + entry.grid.qmin, dtype=zp_np.dtype))
            hi = self.init(f"{tensor}.clip_qmax", np.array(zp + entry.grid.qmax, dtype=zp_np.dtype))
            self.nodes.append(helper.make_node("Clip", [q_out, lo, hi], [f"{tensor}_quantized_clipped"],
                                               name=f"{tensor}_Clip"))
            q_out = f"{tensor}_quantized_clipped"
        self.nodes.append(helper.make_node("DequantizeLinear", [q_out, s, z], [f"{tensor}_dequantized"],
                                           name=f"{tensor}_DequantizeLinear"))
        self.rename[tensor] = f"{tensor}_dequantized"

    def weight(self, node: onnx.NodeProto, node_copy: onnx.NodeProto, entry: WeightEntry) -> None:
        """INT8 per-channel weight (and int32 bias) behind DequantizeLinear nodes."""
        w_name = node.input[1]
        w = numpy_helper.to_array(self.inits[w_name]).astype(np.float32)
        scale = entry.scale.astype(np.float32)
        q = np.clip(np.round(w / scale.reshape([-1] + [1] * (w.ndim - 1))), entry.grid.qmin, entry.grid.qmax)
        node_copy.input[1] = self._dequantized(w_name, q.astype(np.int8), scale, np.int8)
        if entry.int32_bias and len(node.input) > 2:
            in_entry = self.table.activations[node.input[0]]
            b_name = node.input[2]
            b = numpy_helper.to_array(self.inits[b_name]).astype(np.float32)
            step = (np.float32(in_entry.scale) * scale).astype(np.float32)
            # clipped in float64: float32 has no 2**31 - 1 (it rounds up to 2**31, which the int32 cast wraps to
            # -2**31, flipping the sign of a saturated bias)
            bq = np.clip(np.round(b / step).astype(np.float64), -(2**31), 2**31 - 1).astype(np.int32)
            node_copy.input[2] = self._dequantized(b_name, bq, step, np.int32)

    def _dequantized(self, name: str, codes: np.ndarray, scale: np.ndarray, zp_type) -> str:
        qn = self.init(f"{name}_quantized", codes)
        sn = self.init(f"{name}.scale", scale)
        zn = self.init(f"{name}.zero_point", np.zeros(len(scale), dtype=zp_type))
        self.nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [f"{name}_dequantized"],
                                           name=f"{name}_DequantizeLinear", axis=0))
        return f"{name}_dequantized"

    def node(self, node: onnx.NodeProto) -> None:
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        node_copy.input[:] = [self.rename.get(i, i) for i in node.input]
        if node.name in self.table.weights:
            self.weight(node, node_copy, self.table.weights[node.name])
        if self.fmt.relu6_as_relu and _redundant_upper_clip(node, self.table, self.inits):
            # Clip(0, hi) -> Q(s, zp=0) with the codes clamped to [0, qmax] and qmax*s <= hi: the
            # upper bound can never bind, so the Clip is a Relu (which ONNX Runtime folds into its
            # QLinearConv). A 4-bit ReLU6 conv otherwise stays a float conv.
            node_copy = helper.make_node("Relu", [node_copy.input[0]], list(node.output), name=node.name)
        self.nodes.append(node_copy)
        for out in node.output:
            if out in self.table.activations:
                self.activation(out, self.table.activations[out])


def insert_qdq(fp: onnx.ModelProto, table: QuantTable, fmt: QDQFormat) -> onnx.ModelProto:
    """A copy of ``fp`` with Q/DQ pairs on every tensor in ``table.activations`` (all consumers
    read the dequantized tensor) and quantized weights on every node in ``table.weights``."""
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    graph = model.graph
    ins = _Inserter(graph, table, fmt)
    for inp in graph.input:       # graph-input quantization goes first
        if inp.name in table.activations:
            ins.activation(inp.name, table.activations[inp.name])
    for node in graph.node:
        ins.node(node)
    for out in graph.output:
        if out.name in ins.rename:
            raise ValueError(f"graph output {out.name} is quantized; dfq keeps logits in float")
    used = {i for n in ins.nodes for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(ins.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [t for t in ins.new_inits if t.name in used])
    return model
