"""Emit the FP ONNX graph (BN folded) of a fake-quant model, plus the table of its quantizers.

dfq writes ONNX from the ``torch.fx`` graph itself instead of going through ``torch.onnx``: every
tensor keeps the name of the FX node that made it, so the quantizers' positions map onto the ONNX
graph without guessing, the output is byte-for-byte reproducible, and the graph holds exactly the
ops the fake-quant model runs. :func:`emit_fp_graph` writes the float graph once;
:func:`dfq.export.qdq.insert_qdq` then inserts the Q/DQ pairs from :class:`QuantTable`.

Supported ops are those of CNN classifiers (conv, linear, ReLU/ReLU6/Hardtanh, sigmoid,
hard-swish/-sigmoid, SiLU, max/avg/global pooling, add, mul, concat, flatten, zero pad,
slicing, dropout). Anything else raises :class:`UnsupportedModelError` naming the node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from dfq.common.errors import UnsupportedModelError
from dfq.kernels.fake_quant import Grid
from dfq.pipeline.graph import is_passthrough
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d, QuantLinear
from dfq.pipeline.quantize import QuantizedModel

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class ActEntry:
    """Quantization of one activation tensor: ``q = clamp(round(x/scale), qmin, qmax)``."""

    scale: float
    grid: Grid


@dataclass
class WeightEntry:
    """Per-output-channel weight quantization of one Conv/Gemm node (axis 0)."""

    scale: np.ndarray          # float32 [O]
    grid: Grid
    int32_bias: bool           # ONNX Runtime target: bias on the int32 grid s_in * s_w


@dataclass
class QuantTable:
    activations: dict[str, ActEntry] = field(default_factory=dict)   # tensor name -> entry
    weights: dict[str, WeightEntry] = field(default_factory=dict)    # Conv/Gemm node name -> entry


@dataclass
class EmittedGraph:
    model: onnx.ModelProto     # FP32 graph, BN folded, dynamic batch
    table: QuantTable


class _Emitter:
    def __init__(self, qm: QuantizedModel) -> None:
        self.gm = qm.module
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: dict[fx.Node, str] = {}
        self.quant: dict[fx.Node, ActEntry] = {}
        self.table = QuantTable()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.const_count = 0

    # -- helpers -----------------------------------------------------------------------------
    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def scalar(self, value: float) -> str:
        self.const_count += 1
        return self.const(f"const_{self.const_count}", np.array(value, dtype=np.float32))

    def add(self, op: str, inputs: list[str], node: fx.Node, suffix: str = "", **attrs) -> str:
        out = node.name + suffix
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def arg(self, node: fx.Node, i: int = 0) -> str:
        return self.names[node.args[i]]

    def unsupported(self, node: fx.Node, what: str) -> None:
        raise UnsupportedModelError(
            f"the ONNX exporter does not support {what} (graph node '{node.name}', target "
            f"{node.target!r}). Supported: Conv2d+BatchNorm2d, Linear, ReLU/ReLU6/Hardtanh, "
            "Sigmoid, Hardswish, Hardsigmoid, SiLU, MaxPool2d, AvgPool2d, global average pooling, "
            "add, mul, cat, flatten, zero padding, slicing, dropout.")

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> EmittedGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                meta = node.meta["tensor_meta"]
                shape = ["batch"] + list(meta.shape[1:])
                self.inputs.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape))
                self.names[node] = INPUT_NAME
            elif node.op == "get_attr":
                continue  # only the input-scale links of int32 biases, read from the modules
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    self.unsupported(node, "models with several outputs")
                self._rename(self.names[out], OUTPUT_NAME)
                meta = out.meta["tensor_meta"]
                self.outputs.append(helper.make_tensor_value_info(
                    OUTPUT_NAME, TensorProto.FLOAT, ["batch"] + list(meta.shape[1:])))
            elif node.op == "call_module":
                self._module(node, self.gm.get_submodule(str(node.target)))
            elif node.op == "call_function":
                self._function(node)
            elif node.op == "call_method":
                self._method(node)
            else:
                self.unsupported(node, f"node kind {node.op}")
            self._propagate_quant(node)
        graph = helper.make_graph(self.nodes, "dfq", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="dfq")
        model.ir_version = 8
        return EmittedGraph(model, self.table)

    def _rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            n.output[:] = [new if o == old else o for o in n.output]
            n.input[:] = [new if i == old else i for i in n.input]
        for table in (self.table.activations,):
            if old in table:
                table[new] = table.pop(old)
        for k, v in list(self.names.items()):
            if v == old:
                self.names[k] = new

    def _propagate_quant(self, node: fx.Node) -> None:
        """Pass-through ops keep their input's grid: record the same Q/DQ on their output."""
        if node in self.quant or node.op in ("placeholder", "output", "get_attr"):
            return
        if is_passthrough(self.gm, node) and isinstance(node.args[0], fx.Node) and node.args[0] in self.quant:
            entry = self.quant[node.args[0]]
            self.quant[node] = entry
            if self.names[node] != self.names[node.args[0]]:
                self.table.activations[self.names[node]] = entry

    # -- modules -----------------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module) -> None:
        x = self.arg(node) if node.args else None
        if isinstance(m, ActQuantizer):
            entry = ActEntry(float(m.scale.detach().clamp(min=1e-12)), m.grid)
            if node.args[0] in self.quant:
                # a requantization of a tensor already on a grid (a residual block's output that the
                # next conv reads at fewer bits): a tensor of its own, so it gets its own Q/DQ pair
                x = self.add("Identity", [x], node)
            self.names[node] = x
            self.quant[node] = entry
            self.table.activations[x] = entry
        elif isinstance(m, QuantConv2d):
            w, b = (t.detach().float() for t in m.folded())
            name = node.name
            wn = self.const(f"{name}.weight", w.numpy())
            bn = self.const(f"{name}.bias", b.numpy())
            t, l, btm, r = m.pads
            self.names[node] = self.add("Conv", [x, wn, bn], node, kernel_shape=list(m.kernel_size),
                                        strides=list(m.stride), pads=[t, l, btm, r],
                                        dilations=list(m.dilation), group=m.groups)
            self._weight_entry(name, m)
        elif isinstance(m, QuantLinear):
            if len(node.meta["tensor_meta"].shape) != 2:
                self.unsupported(node, "Linear on inputs that are not 2-D")
            wn = self.const(f"{node.name}.weight", m.weight.detach().float().numpy())
            bn = self.const(f"{node.name}.bias", m.bias.detach().float().numpy())
            self.names[node] = self.add("Gemm", [x, wn, bn], node, transB=1)
            self._weight_entry(node.name, m)
        elif isinstance(m, nn.ReLU):
            self.names[node] = self.add("Relu", [x], node)
        elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
            self.names[node] = self.add("Clip", [x, self.scalar(lo), self.scalar(hi)], node)
        elif isinstance(m, nn.Sigmoid):
            self.names[node] = self.add("Sigmoid", [x], node)
        elif isinstance(m, nn.Hardswish):
            self.names[node] = self.add("HardSwish", [x], node)
        elif isinstance(m, nn.Hardsigmoid):
            self.names[node] = self.add("HardSigmoid", [x], node, alpha=1.0 / 6.0, beta=0.5)
        elif isinstance(m, nn.SiLU):
            s = self.add("Sigmoid", [x], node, "_sigmoid")
            self.names[node] = self.add("Mul", [x, s], node)
        elif isinstance(m, nn.MaxPool2d):
            self._maxpool(node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        elif isinstance(m, nn.AvgPool2d):
            self._avgpool(node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self._global_pool(node, x, m.output_size)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, x, m.start_dim, m.end_dim)
        elif isinstance(m, nn.ZeroPad2d):
            self._pad(node, x, list(m.padding))
        elif isinstance(m, (nn.Dropout, nn.Identity)) or (type(m).__name__ == "StochasticDepth" and not m.training):
            self.names[node] = x
        else:
            self.unsupported(node, f"module type {type(m).__name__}")

    def _weight_entry(self, name: str, m: nn.Module) -> None:
        wq = m.weight_quantizer
        scale = wq.scale.detach().clamp(min=1e-12).float().numpy().copy()
        self.table.weights[name] = WeightEntry(scale, wq.grid, m.bias_mode == "int32")

    # -- functions and methods ---------------------------------------------------------------
    def _function(self, node: fx.Node) -> None:
        f = node.target
        if f in (operator.add, torch.add, operator.mul, torch.mul):
            op = "Add" if f in (operator.add, torch.add) else "Mul"
            ins = []
            for a in node.args[:2]:
                ins.append(self.names[a] if isinstance(a, fx.Node) else self.scalar(float(a)))
            if len(node.args) > 2 or node.kwargs:
                self.unsupported(node, f"{op} with alpha/out arguments")
            self.names[node] = self.add(op, ins, node)
        elif f in (F.relu, torch.relu):
            self.names[node] = self.add("Relu", [self.arg(node)], node)
        elif f is F.relu6:
            self.names[node] = self.add("Clip", [self.arg(node), self.scalar(0.0), self.scalar(6.0)], node)
        elif f in (torch.sigmoid, F.sigmoid):
            self.names[node] = self.add("Sigmoid", [self.arg(node)], node)
        elif f is F.hardswish:
            self.names[node] = self.add("HardSwish", [self.arg(node)], node)
        elif f is F.hardsigmoid:
            self.names[node] = self.add("HardSigmoid", [self.arg(node)], node, alpha=1.0 / 6.0, beta=0.5)
        elif f is F.silu:
            x = self.arg(node)
            self.names[node] = self.add("Mul", [x, self.add("Sigmoid", [x], node, "_sigmoid")], node)
        elif f is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, self.arg(node), start, end)
        elif f is F.adaptive_avg_pool2d:
            self._global_pool(node, self.arg(node), node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
        elif f is F.dropout:
            self.names[node] = self.arg(node)
        elif f is operator.getitem:
            self._slice(node)
        elif f is F.pad:
            if not is_passthrough(self.gm, node):
                self.unsupported(node, "non-zero or non-constant padding")
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            self._pad(node, self.arg(node), list(pad))
        elif f is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            rank = len(node.meta["tensor_meta"].shape)
            self.names[node] = self.add("Concat", [self.names[t] for t in tensors], node, axis=dim % rank)
        else:
            self.unsupported(node, f"function {getattr(f, '__name__', f)}")

    def _method(self, node: fx.Node) -> None:
        name = node.target
        if name == "contiguous":
            self.names[node] = self.arg(node)
        elif name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, self.arg(node), start, end)
        elif name == "relu":
            self.names[node] = self.add("Relu", [self.arg(node)], node)
        elif name == "sigmoid":
            self.names[node] = self.add("Sigmoid", [self.arg(node)], node)
        elif name == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            rank = len(node.args[0].meta["tensor_meta"].shape)
            dims = [dims] if isinstance(dims, int) else list(dims)
            self.names[node] = self.add("ReduceMean", [self.arg(node)], node,
                                        axes=[d % rank for d in dims], keepdims=int(bool(keep)))
        else:
            self.unsupported(node, f"tensor method .{name}()")

    def _flatten(self, node: fx.Node, x: str, start: int, end: int) -> None:
        rank = len(node.args[0].meta["tensor_meta"].shape)
        if end % rank != rank - 1:
            self.unsupported(node, "flatten that does not run to the last dimension")
        self.names[node] = self.add("Flatten", [x], node, axis=start % rank)

    def _global_pool(self, node: fx.Node, x: str, size) -> None:
        if size not in (1, (1, 1), [1, 1]):
            self.unsupported(node, f"adaptive average pooling to {size}")
        self.names[node] = self.add("GlobalAveragePool", [x], node)

    def _maxpool(self, node, x, k, s, p, d, ceil) -> None:
        k, s, p, d = (v if isinstance(v, (tuple, list)) else (v, v) for v in (k, s if s else k, p, d))
        self.names[node] = self.add("MaxPool", [x], node, kernel_shape=list(k), strides=list(s),
                                    pads=[p[0], p[1], p[0], p[1]], dilations=list(d), ceil_mode=int(ceil))

    def _avgpool(self, node, x, k, s, p, ceil, count_pad) -> None:
        k, s, p = (v if isinstance(v, (tuple, list)) else (v, v) for v in (k, s if s else k, p))
        self.names[node] = self.add("AveragePool", [x], node, kernel_shape=list(k), strides=list(s),
                                    pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(ceil),
                                    count_include_pad=int(count_pad))

    def _pad(self, node: fx.Node, x: str, pad: list[int]) -> None:
        rank = len(node.args[0].meta["tensor_meta"].shape)
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):  # torch pads from the last dim backwards
            begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
        pads = self.const(f"{node.name}.pads", np.array(begins + ends, dtype=np.int64))
        self.names[node] = self.add("Pad", [x, pads], node, mode="constant")

    def _slice(self, node: fx.Node) -> None:
        src, index = node.args
        if not isinstance(index, tuple):
            index = (index,)
        starts, ends, axes, steps = [], [], [], []
        for axis, item in enumerate(index):
            if item is Ellipsis:
                self.unsupported(node, "indexing with ...")
            if not isinstance(item, slice):
                self.unsupported(node, "indexing other than slices")
            if item == slice(None):
                continue
            step = 1 if item.step is None else item.step
            if step <= 0:
                self.unsupported(node, "slices with a non-positive step")
            starts.append(0 if item.start is None else item.start)
            ends.append(np.iinfo(np.int64).max if item.stop is None else item.stop)
            axes.append(axis)
            steps.append(step)
        if not axes:
            self.names[node] = self.names[src]
            return
        arrays = [np.array(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
        ins = [self.names[src]] + [self.const(f"{node.name}.{k}", a)
                                   for k, a in zip(("starts", "ends", "axes", "steps"), arrays)]
        self.names[node] = self.add("Slice", ins, node)


def emit_fp_graph(qmodel: QuantizedModel) -> EmittedGraph:
    """The FP32 ONNX graph of ``qmodel`` (BN folded, quantizers as identities) and the quantizer
    table that :func:`dfq.export.qdq.insert_qdq` turns into Q/DQ nodes."""
    return _Emitter(qmodel).run()
