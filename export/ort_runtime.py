"""Everything dfq does with ONNX Runtime on the CPU: sessions, batched inference, the op types
ORT's graph optimizer turns a QDQ graph into, and latency measured the same way for every model.

Conventions
-----------
* Sessions use only ``CPUExecutionProvider`` unless ``providers`` is given (``dfq-bench
  --backend onnxruntime-cuda`` passes ``["CUDAExecutionProvider", "CPUExecutionProvider"]``),
  ``intra_op_num_threads = threads`` (``None``: ORT's default, one thread per physical core),
  ``inter_op_num_threads = 1`` and sequential execution, so a thread count means the same thing
  for every model measured.
* ``optimization`` is one of ``"all" | "layout" | "extended" | "basic" | "disable"``
  (``GraphOptimizationLevel.ORT_ENABLE_ALL`` ... ``ORT_DISABLE_ALL``; ``"layout"`` exists only in
  ORT versions that have ``ORT_ENABLE_LAYOUT``).
* Op-type counts (``optimized_op_types``) are keyed ``"<op_type>"`` for the default ONNX domain
  (``""`` or ``"ai.onnx"``) and ``"<domain>.<op_type>"`` for every other domain, e.g.
  ``"QLinearConv"`` (ONNX), ``"com.microsoft.QLinearAdd"``, ``"com.microsoft.QLinearGlobalAveragePool"``,
  ``"com.microsoft.nchwc.Conv"``. Nodes inside subgraphs (If/Loop/Scan bodies) are counted too.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["OPTIMIZATION_LEVELS", "make_session", "run_logits", "optimized_op_types", "LatencyResult",
           "measure_latency", "compare_latency", "node_times", "ms_by", "time_breakdown"]

_LEVEL_NAMES = {
    "all": "ORT_ENABLE_ALL",
    "layout": "ORT_ENABLE_LAYOUT",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}
OPTIMIZATION_LEVELS: dict[str, Any] = {k: getattr(ort.GraphOptimizationLevel, v)
                                       for k, v in _LEVEL_NAMES.items()
                                       if hasattr(ort.GraphOptimizationLevel, v)}


def _session_options(threads: int | None, optimization: str) -> ort.SessionOptions:
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (ORT default), got {threads!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only; ORT warns e.g. about hardware-specific saved models
    return so


def _model_source(onnx_path_or_bytes) -> str | bytes:
    if isinstance(onnx_path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(onnx_path_or_bytes)
    if isinstance(onnx_path_or_bytes, (str, os.PathLike)):
        path = Path(onnx_path_or_bytes)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        return str(path)
    if hasattr(onnx_path_or_bytes, "SerializeToString"):  # an onnx.ModelProto
        return onnx_path_or_bytes.SerializeToString()
    raise TypeError(f"expected a path, bytes or onnx.ModelProto, got {type(onnx_path_or_bytes).__name__}")


def make_session(onnx_path_or_bytes, *, threads: int | None = None,
                 optimization: str = "all", providers=None) -> ort.InferenceSession:
    """An ORT session: ``intra_op_num_threads=threads`` (None: ORT default), inter-op 1,
    sequential execution, graph optimization ``optimization``. Accepts a path, the serialized
    model bytes or an ``onnx.ModelProto``. ``providers``: ORT execution providers (default
    ``["CPUExecutionProvider"]``); ORT silently falls back to the CPU when a requested provider
    cannot start, so callers that need it check ``session.get_providers()``."""
    so = _session_options(threads, optimization)
    return ort.InferenceSession(_model_source(onnx_path_or_bytes), sess_options=so,
                                providers=list(providers or ["CPUExecutionProvider"]))


def _single_input(session: ort.InferenceSession):
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"expected a model with one input, got {[i.name for i in inputs]}")
    return inputs[0]


def _fixed_batch(shape) -> int | None:
    """The input's batch size if it is fixed in the graph, None if it is symbolic/dynamic."""
    if not shape:
        raise ValueError("model input has no dimensions; expected [batch, ...]")
    d = shape[0]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


def _as_float32(images) -> np.ndarray:
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch here
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(images, dtype=np.float32))


def run_logits(session: ort.InferenceSession, images, batch_size: int) -> np.ndarray:
    """Run ``images`` ([N, ...], numpy or torch) through ``session`` in batches of ``batch_size``
    and return the first output as float32 ``[N, classes]`` (trailing dims flattened).

    With a dynamic batch dim the last batch may be smaller. If the model's batch dim is fixed to
    ``k``, batches of ``k`` are used instead of ``batch_size`` and a last partial batch is padded
    by repeating its last image (the padded rows are dropped): inference of an eval-mode CNN is
    per-sample, so this leaves the results unchanged."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inp = _single_input(session)
    x = _as_float32(images)
    if x.ndim != len(inp.shape):
        raise ValueError(f"images have shape {x.shape}, the model input {inp.name!r} has rank "
                         f"{len(inp.shape)} ({inp.shape})")
    n = x.shape[0]
    fixed = _fixed_batch(inp.shape)
    step = fixed if fixed is not None else batch_size
    outs = []
    for start in range(0, n, step):
        chunk = x[start:start + step]
        real = chunk.shape[0]
        if fixed is not None and real < fixed:
            pad = np.repeat(chunk[-1:], fixed - real, axis=0)
            chunk = np.concatenate([chunk, pad], axis=0)
        y = session.run(None, {inp.name: chunk})[0]
        outs.append(np.asarray(y)[:real])
    if not outs:
        out_shape = session.get_outputs()[0].shape
        classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else 0
        return np.zeros((0, classes), dtype=np.float32)
    y = np.concatenate(outs, axis=0)
    return y.reshape(n, -1).astype(np.float32, copy=False)


def _count_nodes(graph, counter: collections.Counter) -> None:
    for node in graph.node:
        domain = node.domain or ""
        key = node.op_type if domain in ("", "ai.onnx") else f"{domain}.{node.op_type}"
        counter[key] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _count_nodes(attr.g, counter)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _count_nodes(g, counter)


def optimized_op_types(onnx_path, *, optimization: str = "extended") -> collections.Counter:
    """Let ORT optimise the graph at ``optimization`` level, save the result
    (``SessionOptions.optimized_model_filepath``) into a temporary folder, load it with onnx and
    count the node op types. Keys: ``"QLinearConv"`` for ONNX-domain ops, ``"<domain>.<op>"``
    otherwise (``"com.microsoft.QLinearAdd"``, ``"com.microsoft.nchwc.Conv"``).

    Note: at ``"all"`` (and ``"layout"``) the saved graph contains layout transforms for this
    CPU (NCHWc), so those counts describe this machine, not a portable model."""
    so = _session_options(None, optimization)
    with tempfile.TemporaryDirectory(prefix="dfq_ort_opt_") as tmp:
        out = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(_model_source(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        if not out.exists():
            raise RuntimeError(f"ONNX Runtime did not write the optimized model to {out}")
        model = onnx.load(str(out), load_external_data=False)
    counter: collections.Counter = collections.Counter()
    _count_nodes(model.graph, counter)
    return counter


@dataclasses.dataclass
class LatencyResult:
    """Per-run wall times of ``session.run`` (ms) at a fixed batch and thread count."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    iterations: int
    batch: int
    threads: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_times(cls, times_s, *, batch: int, threads: int) -> "LatencyResult":
        t = np.asarray(times_s, dtype=np.float64) * 1e3
        if t.size == 0:
            raise ValueError("no timed runs")
        return cls(median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)), mean_ms=float(t.mean()),
                   min_ms=float(t.min()), iterations=int(t.size), batch=int(batch), threads=int(threads))


def _latency_feed(session: ort.InferenceSession, batch: int, input_shape, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal input of shape (batch, *input_shape); ``input_shape`` (without the
    batch dim) defaults to the model's own input shape, which must then be static."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    inp = _single_input(session)
    fixed = _fixed_batch(inp.shape)
    if fixed is not None and fixed != batch:
        raise ValueError(f"model input {inp.name!r} has a fixed batch dim {fixed}; cannot time batch {batch}")
    if input_shape is None:
        rest = list(inp.shape[1:])
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in rest):
            raise ValueError(f"model input {inp.name!r} has non-static dims {inp.shape}; pass input_shape "
                             "(the shape without the batch dim)")
        input_shape = rest
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != len(inp.shape) - 1:
        raise ValueError(f"input_shape {input_shape} is the shape without the batch dim; the model input "
                         f"has rank {len(inp.shape)}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
    return {inp.name: x}


def _timed_runs(session, feed, *, warmup: int, iterations: int | None, min_seconds: float,
                max_iterations: int) -> list[float]:
    """Warm up, then time each ``session.run`` until ``iterations`` runs (if given) AND
    ``min_seconds`` of timed runs are done, or ``max_iterations`` runs (at least one run)."""
    for _ in range(max(0, warmup)):
        session.run(None, feed)
    need = iterations or 0
    cap = max(1, max_iterations)
    times: list[float] = []
    spent = 0.0
    while len(times) < cap:
        t0 = time.perf_counter()
        session.run(None, feed)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if len(times) >= need and spent >= min_seconds:
            break
    return times


def _check_budget(iterations, min_seconds, max_iterations) -> None:
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if iterations is not None and not 1 <= iterations <= max_iterations:
        raise ValueError(f"iterations must be in [1, max_iterations={max_iterations}], got {iterations}")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")


def measure_latency(onnx_path, *, batch: int, threads: int, warmup: int = 10, iterations: int | None = None,
                    min_seconds: float = 3.0, max_iterations: int = 1000, input_shape=None,
                    optimization: str = "all", seed: int = 0) -> LatencyResult:
    """Latency of one model: a fixed seeded random input of shape (batch, *input_shape), where
    ``input_shape`` excludes the batch dim and defaults to the model's; ``warmup`` untimed runs;
    then every ``session.run`` is timed with ``time.perf_counter`` until ``iterations`` runs (if
    given) and ``min_seconds`` of timed runs are both done, never more than ``max_iterations``."""
    _check_budget(iterations, min_seconds, max_iterations)
    session = make_session(onnx_path, threads=threads, optimization=optimization)
    feed = _latency_feed(session, batch, input_shape, seed)
    times = _timed_runs(session, feed, warmup=warmup, iterations=iterations, min_seconds=min_seconds,
                        max_iterations=max_iterations)
    return LatencyResult.from_times(times, batch=batch, threads=threads)


def compare_latency(fp_path, int_path, *, batch: int, threads: int, rounds: int = 3, warmup: int = 10,
                    iterations: int | None = None, min_seconds: float = 3.0, max_iterations: int = 1000,
                    input_shape=None, optimization: str = "all", seed: int = 0, providers=None) -> dict:
    """FP and quantized model measured in this one process, interleaved: both sessions are built
    and warmed up (``warmup`` runs each), then ``rounds`` rounds of FP, INT, FP, INT, ... each
    spend ``1/rounds`` of the budget (``iterations``, ``min_seconds``, ``max_iterations`` are the
    totals per model) after two re-warm runs. The samples of all rounds are pooled per model,
    so slow drift (clock, thermals, neighbours) hits both alike. Both get the same input.
    ``providers`` as in :func:`make_session` (default CPU only).

    Returns ``{"fp": LatencyResult.to_dict(), "int": ..., "speedup": fp_median / int_median,
    "rounds": rounds}``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    _check_budget(iterations, min_seconds, max_iterations)
    sessions = {"fp": make_session(fp_path, threads=threads, optimization=optimization, providers=providers),
                "int": make_session(int_path, threads=threads, optimization=optimization, providers=providers)}
    feeds = {k: _latency_feed(s, batch, input_shape, seed) for k, s in sessions.items()}
    shapes = {k: next(iter(f.values())).shape for k, f in feeds.items()}
    if shapes["fp"] != shapes["int"]:
        raise ValueError(f"FP and quantized models take different input shapes: {shapes}")
    for k, s in sessions.items():
        for _ in range(max(0, warmup)):
            s.run(None, feeds[k])
    per_iter = None if iterations is None else max(1, math.ceil(iterations / rounds))
    per_cap = max(1, max_iterations // rounds)
    if per_iter is not None:
        per_cap = max(per_cap, per_iter)
    times: dict[str, list[float]] = {"fp": [], "int": []}
    for _ in range(rounds):
        for k in ("fp", "int"):
            times[k] += _timed_runs(sessions[k], feeds[k], warmup=min(2, warmup), iterations=per_iter,
                                    min_seconds=min_seconds / rounds, max_iterations=per_cap)
    res = {k: LatencyResult.from_times(v, batch=batch, threads=threads) for k, v in times.items()}
    return {"fp": res["fp"].to_dict(), "int": res["int"].to_dict(),
            "speedup": res["fp"].median_ms / res["int"].median_ms, "rounds": rounds}


def node_times(onnx_path, *, batch: int, threads: int, input_shape=None, runs: int = 5,
               optimization: str = "all") -> list[dict]:
    """Where one model's time goes on ORT's CPU provider: ``{"node", "op", "ms"}`` per node of the
    optimized graph (mean kernel time over ``runs`` profiled runs after one warm-up), slowest first.
    Profiling adds a little overhead to every node; compare these numbers with each other."""
    runs = max(1, runs)
    so = _session_options(threads, optimization)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="dfq-profile-") as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(_model_source(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        feed = _latency_feed(session, batch, input_shape, seed=0)
        for _ in range(1 + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    total: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            total.setdefault(node, (e.get("args", {}).get("op_name", "?"), []))[1].append(float(e["dur"]))
    out = []
    for node, (op, durs) in total.items():
        kept = durs[-runs:]   # the timed runs, not the warm-up
        out.append({"node": node, "op": op, "ms": sum(kept) / len(kept) / 1e3})
    return sorted(out, key=lambda r: -r["ms"])


def ms_by(rows: list[dict], key: str) -> dict[str, float]:
    """Profiled node rows (``{key: ..., "ms": ...}``) summed per ``row[key]`` (op type, kernel),
    largest first, in ms rounded to 0.1 us."""
    acc: dict[str, float] = collections.Counter()
    for r in rows:
        acc[r[key]] += r["ms"]
    return {k: round(v, 4) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def time_breakdown(fp_path, int_path, *, batch: int, threads: int, input_shape=None, top: int = 8) -> dict:
    """Why a quantized model is not faster than its FP32 twin on ORT's CPU provider: kernel time
    per op type of each (ms, profiled) and the quantized graph's slowest nodes."""
    fp = node_times(fp_path, batch=batch, threads=threads, input_shape=input_shape)
    q = node_times(int_path, batch=batch, threads=threads, input_shape=input_shape)
    return {"op_ms_fp32": ms_by(fp, "op"), "op_ms_quantized": ms_by(q, "op"),
            "slowest_quantized_nodes": [{**r, "ms": round(r["ms"], 4)} for r in q[:top]]}
