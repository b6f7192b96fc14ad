"""Static checks of an exported QDQ graph against a target's rules.

TensorRT (explicit quantization: the Q/DQ nodes fix every precision):

1. Q/DQ are INT8 with zero point 0 (TensorRT has no UINT8 and no asymmetric quantization).
2. Per-channel scales only on constant weights, along axis 0; activations are per-tensor.
3. Every Conv/Gemm reads both its activation and its weight through a DequantizeLinear.
4. Both inputs of a residual Add (two non-constant inputs) come from a DequantizeLinear.
5. Opset >= 13 (per-axis Q/DQ).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, numpy_helper

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def tensorrt_violations(model: onnx.ModelProto) -> list[str]:
    """Every way ``model`` breaks TensorRT's Q/DQ rules, as readable lines (empty list = OK)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    problems: list[str] = []
    if _opset(model) < 13:
        problems.append(f"opset {_opset(model)} < 13: per-axis Q/DQ needs opset 13 or newer")

    def from_dq(tensor: str) -> bool:
        p = producer.get(tensor)
        return p is not None and p.op_type == "DequantizeLinear"

    for n in graph.node:
        if n.op_type in QDQ:
            if len(n.input) < 3 or n.input[2] not in inits:
                problems.append(f"{n.name}: {n.op_type} without a constant zero point (type unknown)")
                continue
            zp = inits[n.input[2]]
            if zp.data_type != TensorProto.INT8:
                problems.append(f"{n.name}: zero point type {TensorProto.DataType.Name(zp.data_type)}, "
                                "TensorRT needs INT8")
            if numpy_helper.to_array(zp).any():
                problems.append(f"{n.name}: non-zero zero point")
            scale = inits.get(n.input[1])
            per_channel = scale is not None and len(scale.dims) > 0 and scale.dims[0] > 1
            if per_channel:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                if n.op_type != "DequantizeLinear" or n.input[0] not in consts:
                    problems.append(f"{n.name}: per-channel scale on a non-constant tensor "
                                    "(TensorRT quantizes activations per tensor)")
                elif axis != 0:
                    problems.append(f"{n.name}: per-channel weight axis {axis}, TensorRT needs 0")
        elif n.op_type in ("Conv", "Gemm"):
            if not from_dq(n.input[0]):
                problems.append(f"{n.name}: activation input '{n.input[0]}' is not quantized")
            if not from_dq(n.input[1]):
                problems.append(f"{n.name}: weight '{n.input[1]}' is not quantized")
        elif n.op_type == "Add":
            if all(i not in consts for i in n.input) and not all(from_dq(i) for i in n.input):
                problems.append(f"{n.name}: residual Add with an unquantized input "
                                f"({', '.join(i for i in n.input if not from_dq(i))})")
    return problems
