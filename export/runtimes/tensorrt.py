"""TensorRT as a measuring runtime (``tensorrt``): engines built from the quantized ONNX as it is
(strongly typed: INT8 where the Q/DQ say so) and from the FP ONNX converted to FP16, one pair per
batch size (profile ``1..batch``, optimised for ``batch``), timed with
:class:`dfq.export.tensorrt.EngineRunner` (GPU time per ``execute_async_v3``, input already on the
device). Written against the TensorRT documentation, not yet run on a GPU.
"""
from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dfq.common.errors import UnsupportedModelError, UsageError
from dfq.export.ort_runtime import LatencyResult
from dfq.export.rules import tensorrt_violations
from dfq.export.runtimes.base import Budget, Runtime, interleaved, make_record
from dfq.export.tensorrt import EngineRunner, build_engine, inspect_engine, tensorrt_status


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    description = "TensorRT"

    def status(self) -> tuple[bool, str]:
        return tensorrt_status()

    def unavailable_hint(self, model: Path) -> str:
        engine = Path(model).with_suffix(".engine")
        return (f" Run dfq-bench --backend tensorrt on a GPU machine with TensorRT; an engine alone can be "
                f"built there with dfq-build {shlex.quote(str(model))} --out {shlex.quote(str(engine))} "
                f"(or trtexec --onnx={shlex.quote(str(model))} --saveEngine={shlex.quote(str(engine))} "
                "--stronglyTyped).")

    def preflight(self, int_path: Path, threads: int, input_shape) -> None:
        if input_shape is None:
            raise UsageError(f"{int_path} has non-static input dims besides the batch; pass --input-shape C,H,W.")
        problems = tensorrt_violations(onnx.load(str(int_path), load_external_data=False))
        if problems:
            raise UsageError(f"{int_path} is not a TensorRT-flavour QDQ model (export it with dfq-export --target "
                             "tensorrt): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))

    def measure(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, budget: Budget,
                input_shape=None) -> dict:
        with tempfile.TemporaryDirectory(prefix="dfq_bench_trt_") as tmp:
            return self._measure(fp_path, int_path, batch, budget, input_shape, Path(tmp))

    def _measure(self, fp_path: Path, int_path: Path, batch: int, budget: Budget, input_shape, workdir: Path,
                 seed: int = 0) -> dict:
        engines = {"int": workdir / f"int_b{batch}.engine", "fp": workdir / f"fp16_b{batch}.engine"}
        builds = {}
        for key, src in (("int", int_path), ("fp", fp_path)):
            try:
                builds[key] = build_engine(src, engines[key], input_shape=input_shape, min_batch=1, opt_batch=batch,
                                           max_batch=batch, fp16=(key == "fp"))
            except (RuntimeError, ValueError) as exc:
                raise UnsupportedModelError(f"TensorRT could not build an engine from {src}: {exc}") from exc
        runners = {k: EngineRunner(v) for k, v in engines.items()}
        x = np.random.default_rng(seed).standard_normal((batch, *input_shape), dtype=np.float32)
        timers = {k: (lambda n, secs, cap, warm, r=r: r.time(x, n, warmup=warm, min_seconds=secs, max_iterations=cap))
                  for k, r in (("fp", runners["fp"]), ("int", runners["int"]))}
        times = interleaved(timers, budget)
        res = {k: LatencyResult.from_times(v, batch=batch, threads=0).to_dict() for k, v in times.items()}
        rec = make_record(self.name, batch, None, res["fp"], res["int"], fp_precision="fp16",
                          int_precision="int8-qdq")
        layers = inspect_engine(engines["int"])
        rec["tensorrt"] = {"version": builds["int"]["tensorrt"], "int8_layers": layers["int8_layers"],
                           "not_int8_compute_layers": layers["not_int8_compute"],
                           "fp16_conversion": builds["fp"].get("fp16_conversion")}
        return rec


RUNTIME = TensorRTRuntime()
