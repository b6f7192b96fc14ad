"""``export_onnx``: write the QDQ ONNX artifact (and its FP twin for comparisons) atomically."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import onnx
import onnxsim

from dfq.common.files import atomic_write_bytes
from dfq.export.onnx_graph import EmittedGraph, emit_fp_graph
from dfq.export.qdq import insert_qdq
from dfq.export.targets import get_target
from dfq.pipeline.quantize import QuantizedModel


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with the batch dimension left dynamic; Q/DQ nodes are kept (onnxsim does not fold
    a weight's DequantizeLinear into float). Falls back to the input if onnxsim cannot check it."""
    simplified, ok = onnxsim.simplify(model)
    return simplified if ok else model


@dataclass
class ExportedOnnx:
    qdq: onnx.ModelProto     # the deployable artifact
    fp: onnx.ModelProto      # the same graph without Q/DQ (FP32 baseline for latency/accuracy)
    emitted: EmittedGraph
    rewrites: dict[str, list[str]] = field(default_factory=dict)   # exact rewrites applied: name -> nodes


def build_onnx(qmodel: QuantizedModel, *, run_simplifier: bool = True) -> ExportedOnnx:
    """Emit the FP graph once, insert Q/DQ from the quantizers, simplify and check both."""
    target = get_target(qmodel.config.scheme.name)
    emitted = emit_fp_graph(qmodel)
    qdq = insert_qdq(emitted.model, emitted.table, target.qdq)
    fp = emitted.model
    if run_simplifier:
        fp, qdq = simplify(fp), simplify(qdq)
    qdq, rewrites = target.rewrite(qdq)   # on the simplified graph, as the last change
    onnx.helper.set_model_props(qdq, {"dfq.target": target.name,
                                      "dfq.precision": json.dumps({n: str(p) for n, p in qmodel.layer_precision.items()})})
    onnx.checker.check_model(fp, full_check=True)
    onnx.checker.check_model(qdq, full_check=True)
    return ExportedOnnx(qdq, fp, emitted, rewrites)


def float_graph(qmodel: QuantizedModel, *, run_simplifier: bool = True) -> onnx.ModelProto:
    """The FP32 graph of ``qmodel``'s current float weights: BN folded, no Q/DQ, checked. Emitted
    before fine-tuning and bias correction this is the original FP model (dfq-export's FP32 twin)."""
    fp = emit_fp_graph(qmodel).model
    if run_simplifier:
        fp = simplify(fp)
    onnx.checker.check_model(fp, full_check=True)
    return fp


def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, *, fp_path: str | os.PathLike | None = None,
                run_simplifier: bool = True) -> ExportedOnnx:
    """Write the QDQ ONNX of ``qmodel`` to ``path`` (and the FP graph to ``fp_path`` if given)."""
    result = build_onnx(qmodel, run_simplifier=run_simplifier)
    atomic_write_bytes(path, result.qdq.SerializeToString())
    if fp_path is not None:
        atomic_write_bytes(fp_path, result.fp.SerializeToString())
    return result
