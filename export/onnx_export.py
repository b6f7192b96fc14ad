"""``export_onnx``: write the QDQ ONNX artifact (and its FP twin for comparisons) atomically."""
from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dfq.export.onnx_graph import EmittedGraph, emit_fp_graph
from dfq.export.ort_rewrites import space_to_depth_stem
from dfq.export.qdq import insert_qdq
from dfq.pipeline.quantize import QuantizedModel


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same directory, fsync it, rename it into place:
    a crash leaves either the old file or the new one, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_orphaned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write_bytes` leaves beside ``path`` when a run is
    killed (SIGKILL, power loss) between creating and renaming them; returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    for tmp in parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with the batch dimension left dynamic; Q/DQ nodes are kept (onnxsim does not fold
    a weight's DequantizeLinear into float). Falls back to the input if onnxsim cannot check it."""
    import onnxsim

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
    emitted = emit_fp_graph(qmodel)
    qdq = insert_qdq(emitted.model, emitted.table, qmodel.config.target)
    fp = emitted.model
    if run_simplifier:
        fp, qdq = simplify(fp), simplify(qdq)
    rewrites = {}
    if qmodel.config.target == "onnxruntime":
        # exact and ORT-only (TensorRT gets the plain graph); on the simplified graph, as the last change
        qdq, stems = space_to_depth_stem(qdq)
        if stems:
            rewrites["space_to_depth_stem"] = stems
    onnx.checker.check_model(fp, full_check=True)
    onnx.checker.check_model(qdq, full_check=True)
    return ExportedOnnx(qdq, fp, emitted, rewrites)


def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, *, fp_path: str | os.PathLike | None = None,
                run_simplifier: bool = True) -> ExportedOnnx:
    """Write the QDQ ONNX of ``qmodel`` to ``path`` (and the FP graph to ``fp_path`` if given)."""
    result = build_onnx(qmodel, run_simplifier=run_simplifier)
    atomic_write_bytes(path, result.qdq.SerializeToString())
    if fp_path is not None:
        atomic_write_bytes(fp_path, result.fp.SerializeToString())
    return result
