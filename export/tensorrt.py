"""TensorRT engines from dfq's QDQ ONNX: build, run, time, inspect (optional: TensorRT and a CUDA GPU).

``tensorrt`` is imported lazily, inside the functions that need it, so dfq installs and runs
without it. CUDA device detection and buffers use torch's CUDA runtime, not pycuda: torch is
already a dependency, ships the CUDA runtime in its wheels and needs no compiler, whereas pycuda
is a source-only package that needs a compiler, the CUDA toolkit headers and the driver at install
time. :class:`EngineRunner` therefore holds its inputs and outputs in torch CUDA
tensors and passes their ``data_ptr()`` to TensorRT; the CUDA stream is a ``torch.cuda.Stream``
(``.cuda_stream`` is the raw ``cudaStream_t`` handle TensorRT wants). Install the TensorRT wheel
built for torch's CUDA major version (``torch.version.cuda``), e.g. ``tensorrt-cu13`` for a cu130
torch, so both load the same CUDA runtime generation.

Written against the TensorRT 10 and 11 Python API documentation:
* TensorRT 10: ``builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))``
  makes a strongly typed network, whose Q/DQ nodes fix every precision. Precision builder flags
  (``BuilderFlag.FP16``/``INT8``) must not be combined with strong typing.
* TensorRT 11: strongly typed is the only mode; the flag is deprecated and ignored, so
  ``create_network(0)`` is used when the flag is missing. ``BuilderFlag.FP16``/``INT8`` and the
  implicit-quantization calibrators are removed: an FP16 engine needs an FP16 graph.
  ``build_engine(fp16=True)`` therefore converts the ONNX to FP16 (:func:`convert_to_fp16`) for
  both versions, instead of a builder flag that only TensorRT 10 has.
* Both: the name-based I/O API (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) used by :class:`EngineRunner`;
  the binding-index API was removed in TensorRT 10.
* Engine-inspector JSON differs (see :func:`summarize_engine_layers`): TensorRT 10 gives each
  layer tensor a combined ``"Format/Datatype"`` string and the engine a ``"Bindings"`` list;
  TensorRT 11 splits it into ``"Format"`` and ``"DataType"`` and replaces ``"Bindings"`` by
  ``"I/O Tensors"``.
Not yet run on a GPU: see the README's "Verified on" table and docs/benchmarking.md.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from dfq.common.errors import EngineNotBuiltError
from dfq.common.files import atomic_write_bytes

__all__ = ["tensorrt_status", "require_tensorrt", "trtexec_command", "onnx_input_shape", "convert_to_fp16",
           "build_engine", "EngineRunner", "inspect_engine", "summarize_engine_layers"]


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) when TensorRT imports and a CUDA device is visible, else (False, why)."""
    missing = []
    version = None
    try:
        import tensorrt as trt  # noqa: F401

        version = trt.__version__
    except Exception as exc:  # ImportError, or a broken install raising OSError
        missing.append(f"TensorRT is not importable ({type(exc).__name__}: {exc}); install it on a "
                       "machine with an NVIDIA GPU with `pip install 'dfq[tensorrt]'` (NVIDIA's "
                       "tensorrt wheels)")
    try:
        has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        missing.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    if missing:
        return False, "; and ".join(missing)
    return True, f"TensorRT {version}"


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, *, input_name: str | None = None,
                    input_shape: tuple[int, ...] | None = None, min_batch: int = 1, opt_batch: int = 1,
                    max_batch: int | None = None, timing_cache: str | Path | None = None) -> str:
    """The trtexec command line that builds the same strongly typed engine (shapes only when the
    input name and its C,H,W are known)."""
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    if input_name and input_shape and max_batch:
        dims = "x".join(str(int(d)) for d in input_shape)
        parts += [f"--minShapes={input_name}:{min_batch}x{dims}", f"--optShapes={input_name}:{opt_batch}x{dims}",
                  f"--maxShapes={input_name}:{max_batch}x{dims}"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    parts.append("--profilingVerbosity=detailed")
    return " ".join(shlex.quote(p) for p in parts)


def require_tensorrt(onnx_path: str | Path, engine_path: str | Path, *, trtexec: str | None = None,
                     verified: bool = True, rerun: str = "the same dfq-export command") -> None:
    """Raise :class:`EngineNotBuiltError` when the engine cannot be built here (TensorRT or a
    CUDA device missing). ``verified``: the ONNX was just written and verified (dfq-export);
    ``trtexec``: the equivalent trtexec command (default: a plain strongly typed build);
    ``rerun``: what else to run on the GPU machine."""
    ok, why = tensorrt_status()
    if not ok:
        what = (f"The ONNX artifact {onnx_path} was written and verified on ONNX Runtime; build the engine "
                f"from it" if verified else "Build it")
        cmd = trtexec or (f"trtexec --onnx={shlex.quote(str(onnx_path))} "
                          f"--saveEngine={shlex.quote(str(engine_path))} --stronglyTyped")
        raise EngineNotBuiltError(
            f"The TensorRT engine {engine_path} was NOT built: {why}. {what} on a GPU machine with: "
            f"{cmd}, or run {rerun} there.")


# --- ONNX helpers (pure onnx: tested on CPU) -----------------------------------------------------

def onnx_input_shape(model_or_path) -> tuple[str, tuple[int, ...] | None]:
    """(name, shape without the batch dim) of the model's single input; the shape is None when
    one of those dims is not static."""
    model = model_or_path if hasattr(model_or_path, "graph") else onnx.load(str(model_or_path),
                                                                              load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected a model with one input, got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    rest = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]]
    return inputs[0].name, (None if any(d is None for d in rest) else tuple(int(d) for d in rest))


_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal FP16, 6.1e-5
# inputs that ONNX requires to stay FLOAT whatever the data type (Resize scales, Upsample scales)
_KEEP_FLOAT_INPUTS = {("Resize", 2), ("Upsample", 1)}


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def convert_to_fp16(model):
    """A copy of ``model`` whose float computation is FP16, for strongly typed TensorRT builds
    (TensorRT 11 takes every precision from the graph). FLOAT initializers and Constant values
    become FLOAT16 (clipped to the FP16 range), ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``,
    and the graph keeps FLOAT inputs and outputs: a ``Cast`` to FP16 follows each input and a
    ``Cast`` to FP32 precedes each output. Q/DQ scales become FP16 too, so a QDQ graph computes
    between its Q/DQ pairs in FP16; ONNX allows FP16 Q/DQ from opset 19, so such a graph is
    converted to opset 19 first (``onnx.version_converter``).

    Returns ``(model, info)``; ``info`` counts converted initializers, values clipped to the FP16
    range and Q/DQ scales below the smallest normal FP16 (6.1e-5; they lose precision)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if has_qdq and _opset(model) < 19:
        model = version_converter.convert_version(model, 19)
    graph = model.graph
    keep_float = {n.input[i] for n in graph.node for (op, i) in _KEEP_FLOAT_INPUTS
                  if n.op_type == op and len(n.input) > i}
    scale_names = {n.input[1] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    info = {"initializers": 0, "clipped_values": 0, "subnormal_scales": 0, "opset": _opset(model)}

    def to_half(t):
        arr = numpy_helper.to_array(t).astype(np.float32)
        info["clipped_values"] += int(np.count_nonzero(np.abs(arr) > _FP16_MAX))
        if t.name in scale_names:
            info["subnormal_scales"] += int(np.count_nonzero((arr != 0) & (np.abs(arr) < _FP16_TINY)))
        return numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), t.name)

    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep_float:
            graph.initializer[i].CopyFrom(to_half(t))
            info["initializers"] += 1
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT and n.output[0] not in keep_float:
                    a.t.CopyFrom(to_half(a.t))
        elif n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        elif any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute):
            raise ValueError(f"convert_to_fp16 does not handle control flow ({n.op_type} {n.name!r})")
    # graph inputs/outputs stay FLOAT, with casts at the boundary
    new_nodes = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name not in {t.name for t in graph.initializer}:
            half = inp.name + "_fp16"
            for n in graph.node:
                n.input[:] = [half if x == inp.name else x for x in n.input]
            new_nodes.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16,
                                              name=inp.name + "_to_fp16"))
    tail = []
    for out in graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = out.name + "_fp16"
            for n in graph.node:
                n.output[:] = [half if x == out.name else x for x in n.output]
                n.input[:] = [half if x == out.name else x for x in n.input]
            tail.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                         name=out.name + "_to_fp32"))
    nodes = new_nodes + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float value_info would now be wrong; shape inference can redo it
    onnx.checker.check_model(model)
    return model, info


# --- building -------------------------------------------------------------------------------------

def build_engine(onnx_path: str | Path, engine_path: str | Path, *, input_shape: tuple[int, ...] | None = None,
                 max_batch: int = 32, opt_batch: int = 1, min_batch: int = 1, workspace_bytes: int = 1 << 30,
                 fp16: bool = False, timing_cache: str | Path | None = None) -> dict:
    """Parse the ONNX, build a strongly typed engine with a batch profile
    ``min_batch..opt_batch..max_batch``, write it atomically; return a small build report.
    Requires TensorRT and a CUDA device.

    ``input_shape``: the input's shape without the batch dim (default: read from the ONNX, which
    must then be static). ``fp16``: build from the FP16 conversion of the graph
    (:func:`convert_to_fp16`), the strongly typed way to get FP16 kernels in TensorRT 10 and 11.
    ``timing_cache``: a TensorRT timing cache file, read if it exists and written back after the
    build (it only speeds up later builds with the same TensorRT version and GPU).
    The builder records ``ProfilingVerbosity.DETAILED`` so :func:`inspect_engine` can report each
    layer's precision."""
    import tensorrt as trt

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if input_shape is None:
        _, input_shape = onnx_input_shape(onnx_path)
        if input_shape is None:
            raise ValueError(f"{onnx_path}: the input has non-static dims besides the batch; pass input_shape")
    input_shape = tuple(int(d) for d in input_shape)
    fp16_info = None
    if fp16:
        model, fp16_info = convert_to_fp16(onnx.load(str(onnx_path)))
        data = model.SerializeToString()
    else:
        data = Path(onnx_path).read_bytes()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # gone/ignored in TensorRT 11
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    # path: lets the parser find external data beside the file
    if not parser.parse(data, str(Path(onnx_path).resolve())):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT could not parse the ONNX:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # layer names, precisions and formats in the engine inspector (default is LAYER_NAMES_ONLY)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.exists() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)  # ignore_mismatch=False
    inp = network.get_input(0)
    if int(inp.shape[0]) == -1:  # dynamic batch: one optimization profile
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (min_batch, *input_shape), (opt_batch, *input_shape),
                          (max_batch, *input_shape))
        config.add_optimization_profile(profile)
    else:
        min_batch = opt_batch = max_batch = int(inp.shape[0])
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    report = {"tensorrt": trt.__version__, "engine": str(engine_path), "bytes": len(bytes(serialized)),
              "input": inp.name, "input_shape": list(input_shape), "min_batch": min_batch,
              "opt_batch": opt_batch, "max_batch": max_batch, "precision": "fp16" if fp16 else "as in the graph",
              "profiling_verbosity": "detailed"}
    if fp16_info is not None:
        report["fp16_conversion"] = fp16_info
    if cache_path is not None:
        report["timing_cache"] = str(cache_path)
    return report


# --- running --------------------------------------------------------------------------------------

def _torch_dtype(trt, dtype):
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, tdtype in table.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and dtype == member:
            return tdtype
    raise TypeError(f"TensorRT I/O tensor type {dtype} has no torch equivalent here")


def _deserialize(trt, engine_or_path, logger):
    """(runtime, engine); the runtime is kept alive alongside the engine."""
    if not isinstance(engine_or_path, (str, Path, bytes, bytearray, memoryview)):
        return None, engine_or_path  # an ICudaEngine already
    data = engine_or_path if not isinstance(engine_or_path, (str, Path)) else Path(engine_or_path).read_bytes()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(data))
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine (built by another TensorRT version or for "
                           "another GPU?)")
    return runtime, engine


class EngineRunner:
    """Runs a serialized engine (one input, any outputs) on the current CUDA device with torch
    CUDA tensors as buffers and one ``torch.cuda.Stream``.

    ``run(batch)``: numpy in, the first output as numpy out (host copies included).
    ``time(batch, iterations)``: device-resident input, per-run GPU time of
    ``execute_async_v3`` measured with CUDA events (no host transfers), in seconds."""

    def __init__(self, engine_or_path, *, device: int = 0) -> None:
        import tensorrt as trt
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)  # TensorRT uses the current device's primary context, as torch does
        torch.cuda.init()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime, self.engine = _deserialize(trt, engine_or_path, self._logger)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise ValueError(f"expected one input and at least one output, got inputs {self.inputs}, "
                             f"outputs {self.outputs}")
        self.input_name = self.inputs[0]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._bound_shape = None
        self._buffers: dict = {}

    def _bind(self, x) -> None:
        """Copy ``x`` to the device, set the input shape, (re)allocate outputs, set addresses."""
        torch = self._torch
        shape = tuple(int(d) for d in x.shape)
        with torch.cuda.stream(self.stream):
            dev = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype=self._dtypes[self.input_name])
        if shape != self._bound_shape:
            if not self.context.set_input_shape(self.input_name, shape):
                # profile 0 is the one the context uses by default
                lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
                raise ValueError(f"input shape {shape} is outside the engine's profile "
                                 f"min {tuple(lo)} / opt {tuple(opt)} / max {tuple(hi)}")
            self._buffers = {}
            for name in self.outputs:
                oshape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in oshape):
                    raise RuntimeError(f"output {name!r} has unresolved shape {oshape}")
                with torch.cuda.stream(self.stream):
                    self._buffers[name] = torch.empty(oshape, dtype=self._dtypes[name], device=self.device)
            self._bound_shape = shape
        self._buffers[self.input_name] = dev
        for name, buf in self._buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())

    def _execute(self) -> None:
        # execute_async_v3(stream_handle) in TensorRT 10 and 11 (execute_v2 is deprecated in 10)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log above)")

    def run(self, batch) -> np.ndarray:
        """``batch``: array-like [N, ...] (cast to the engine's input type); returns the first output."""
        self._bind(np.asarray(batch))
        self._execute()
        out = self._buffers[self.outputs[0]]
        with self._torch.cuda.stream(self.stream):
            host = out.to("cpu", non_blocking=False)
        self.stream.synchronize()
        return host.numpy()

    def time(self, batch, iterations: int = 10, *, warmup: int = 2, min_seconds: float = 0.0,
             max_iterations: int = 100_000) -> list[float]:
        """GPU seconds of each of at least ``iterations`` runs (and until ``min_seconds`` of timed
        runs, at most ``max_iterations``), after ``warmup`` untimed runs. The input is copied to
        the device once, before timing."""
        torch = self._torch
        self._bind(np.asarray(batch))
        for _ in range(max(0, warmup)):
            self._execute()
        self.stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times: list[float] = []
        spent = 0.0
        while len(times) < max(1, max_iterations):
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
            times.append(dt)
            spent += dt
            if len(times) >= iterations and spent >= min_seconds:
                break
        return times


# --- inspecting -----------------------------------------------------------------------------------

_PRECISIONS = [("int8", "INT8"), ("uint8", "UINT8"), ("int32", "INT32"), ("int64", "INT64"), ("int4", "INT4"),
               ("fp8", "FP8"), ("fp4", "FP4"), ("bf16", "BF16"), ("fp16", "FP16"), ("half", "FP16"),
               ("fp32", "FP32"), ("float", "FP32"), ("bool", "BOOL")]
_PRECISION_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(k for k, _ in _PRECISIONS) + r")(?![a-z0-9])", re.I)
_COMPUTE_RE = re.compile(r"conv|gemm|matmul|matrixmultiply|fullyconnected|deconv", re.I)


def _precision(tensor: dict) -> str:
    # TensorRT 11: "DataType": "Int8" / "Half" / "Float"; TensorRT 10: "Format/Datatype": "Row major
    # linear FP32 format (kLINEAR)", "Thirty-two wide channel vectorized row major Int8 format (kCHW32)"
    text = tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or ""
    m = _PRECISION_RE.search(str(text))
    return dict(_PRECISIONS)[m.group(1).lower()] if m else "UNKNOWN"


def summarize_engine_layers(info: dict | str) -> dict:
    """Per-layer precisions from the engine inspector's JSON (TensorRT 10 or 11 layout).

    A layer "runs in INT8" when one of its inputs is INT8 (fused Q/DQ kernels read INT8).
    Returns ``{"layers": [{"name", "type", "inputs", "outputs", "int8"}], "int8_layers": n,
    "not_int8": [names], "not_int8_compute": [names of conv/gemm/matmul layers not in INT8],
    "precisions": {precision: count of layer outputs}}``."""
    if isinstance(info, str):
        info = json.loads(info)
    layers = info.get("Layers", [])
    if layers and isinstance(layers[0], str):
        raise RuntimeError("the engine holds layer names only: rebuild it with the builder config's "
                           "profiling_verbosity = ProfilingVerbosity.DETAILED (dfq-build does) to see precisions")
    out, counts = [], {}
    for layer in layers:
        if isinstance(layer, str):
            layer = json.loads(layer)
        ins = [_precision(t) for t in layer.get("Inputs", [])]
        outs = [_precision(t) for t in layer.get("Outputs", [])]
        for p in outs:
            counts[p] = counts.get(p, 0) + 1
        kind = str(layer.get("LayerType", ""))
        out.append({"name": str(layer.get("Name", "")), "type": kind, "inputs": ins, "outputs": outs,
                    "int8": "INT8" in ins, "compute": bool(_COMPUTE_RE.search(kind + " " +
                                                                             str(layer.get("ParameterType", ""))))})
    not_int8 = [l["name"] for l in out if not l["int8"]]
    return {"layers": out, "int8_layers": sum(l["int8"] for l in out), "not_int8": not_int8,
            "not_int8_compute": [l["name"] for l in out if l["compute"] and not l["int8"]], "precisions": counts}


def inspect_engine(engine_or_path) -> dict:
    """:func:`summarize_engine_layers` of a serialized engine (path or bytes) or an ICudaEngine,
    via ``engine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON)``
    (same call in TensorRT 10 and 11; the JSON layout differs, handled by the summary). Dynamic
    dims show as -1 because no execution context is attached."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime, engine = _deserialize(trt, engine_or_path, logger)
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    del runtime
    return summarize_engine_layers(text)
