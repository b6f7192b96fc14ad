"""OpenVINO as a measuring runtime (``openvino``, CPU plugin).

OpenVINO reads dfq's QDQ ONNX directly and runs the quantized regions in its own int8 kernels
(VNNI, and AMX on Intel CPUs that have it). Both models are compiled for the CPU with one stream,
``INFERENCE_NUM_THREADS = threads`` and FP32 inference precision (so the FP baseline is FP32, not
bf16 on AMX machines), reshaped to the batch size, and timed interleaved with
:func:`dfq.export.runtimes.base.interleaved` (one synchronous ``infer`` per run, the input already
in host memory as for ONNX Runtime). :meth:`OpenVINORuntime.breakdown` profiles both models with
OpenVINO's per-node counters (``PERF_COUNT``): time per op type and per kernel ("exec type", e.g.
``jit_avx512_dw_I8``: which nodes run in int8 and which fall back to float), the int8 share of
the quantized model's time, and its slowest nodes. OpenVINO is the optional extra
``pip install 'dfq[openvino]'``, imported where it is used.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dfq.export.openvino_reference import OpenVINOReference
from dfq.export.ort_runtime import LatencyResult, ms_by
from dfq.export.runtimes.base import Budget, Runtime, interleaved, make_record
from dfq.export.tensorrt import onnx_input_shape


def compile_model(path: str | Path, *, threads: int, batch: int | None = None, input_shape=None,
                  profile: bool = False):
    """An OpenVINO CPU compiled model of the ONNX at ``path`` (reshaped to ``(batch, *input_shape)``
    when both are given; with per-node performance counters when ``profile``)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None and input_shape is not None:
        model.reshape({model.inputs[0].any_name: [batch, *input_shape]})
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": bool(profile)}
    return core.compile_model(model, "CPU", config)


def run_logits(compiled, images: np.ndarray) -> np.ndarray:
    """The first output of ``compiled`` on one batch."""
    request = compiled.create_infer_request()
    request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
    return np.asarray(request.get_output_tensor(0).data).copy()


def is_int8_kernel(exec_type: str) -> bool:
    """Whether an OpenVINO CPU kernel name (``brgconv_avx512_I8``, ``jit_avx512_FP32``...) computes
    in 8-bit integers (``I8``/``U8`` in its precision suffix)."""
    return exec_type.rsplit("_", 1)[-1].upper() in ("I8", "U8")


def node_times(path: str | Path, *, batch: int, threads: int, input_shape, runs: int = 5) -> list[dict]:
    """Where one model's time goes on OpenVINO's CPU plugin: ``{"node", "op", "exec", "ms"}`` per
    executed node of the compiled graph (OpenVINO's op type and kernel name; mean ``real_time`` over
    ``runs`` profiled runs after one warm-up), slowest first. Nodes OpenVINO fused away do not run
    and are not listed; a fused node's time is its host's."""
    runs = max(1, runs)
    request = compile_model(path, threads=threads, batch=batch, input_shape=input_shape,
                            profile=True).create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    request.infer({0: x})
    total: dict[str, list] = {}
    for _ in range(runs):
        request.infer({0: x})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                row = total.setdefault(info.node_name, [info.node_type, info.exec_type, 0.0])
                row[2] += info.real_time.total_seconds() * 1e3 / runs
    return sorted(({"node": n, "op": op, "exec": ex, "ms": ms} for n, (op, ex, ms) in total.items()),
                  key=lambda r: -r["ms"])


def time_breakdown(fp_path, int_path, *, batch: int, threads: int, input_shape, top: int = 8) -> dict:
    """Both models' profiled time per op type, the quantized model's time per kernel, its int8
    share (``int8_fraction``: time in nodes whose kernel computes in int8, of all profiled time) and
    its slowest nodes; the same keys as ONNX Runtime's breakdown plus the kernel view."""
    fp = node_times(fp_path, batch=batch, threads=threads, input_shape=input_shape)
    q = node_times(int_path, batch=batch, threads=threads, input_shape=input_shape)
    total_q = sum(r["ms"] for r in q)
    int8_q = sum(r["ms"] for r in q if is_int8_kernel(r["exec"]))
    return {"op_ms_fp32": ms_by(fp, "op"), "op_ms_quantized": ms_by(q, "op"), "exec_ms_quantized": ms_by(q, "exec"),
            "exec_ms_fp32": ms_by(fp, "exec"),
            "int8_fraction": round(int8_q / total_q, 4) if total_q else 0.0,
            "profiled_ms": {"fp32": round(sum(r["ms"] for r in fp), 4), "quantized": round(total_q, 4)},
            "slowest_quantized_nodes": [{**r, "ms": round(r["ms"], 4)} for r in q[:top]]}


def _model_shape(int_path: Path, input_shape) -> tuple[int, ...]:
    """The per-image input shape: the one given, else the ONNX input's."""
    return tuple(input_shape) if input_shape is not None else onnx_input_shape(int_path)[1]


class _Input:
    name = "input"


class OpenVINOSession:
    """An OpenVINO compiled model behind the two methods of an ONNX Runtime session that dfq's checks
    use (``get_inputs()[0].name`` and ``run(None, {name: images})``); dynamic batch."""

    def __init__(self, path: str | Path, threads: int) -> None:
        self.request = compile_model(path, threads=threads).create_infer_request()

    def get_inputs(self):
        return [_Input()]

    def run(self, outputs, feed: dict) -> list[np.ndarray]:
        self.request.infer({0: np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32)})
        return [np.asarray(self.request.get_output_tensor(0).data).copy()]


class OpenVINORuntime(Runtime):
    name = "openvino"
    description = "OpenVINO CPU plugin"

    def status(self) -> tuple[bool, str]:
        try:
            import openvino as ov

            return True, f"OpenVINO {ov.__version__} on {ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}"
        except Exception as exc:  # ImportError, or a wheel that cannot load on this CPU
            return False, (f"OpenVINO is not usable ({type(exc).__name__}: {exc}); install it with "
                           "`pip install 'dfq[openvino]'`")

    def reference(self, qmodel):
        """OpenVINO fuses residual Adds into the convolution before them and drops that conv
        output's requantization (:mod:`dfq.export.openvino_reference`, with the measurements)."""
        ref = OpenVINOReference(qmodel)
        return (ref, ref.description) if ref.skipped else None

    def session(self, path: Path, threads: int) -> OpenVINOSession:
        return OpenVINOSession(path, threads)

    def measure(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, budget: Budget,
                input_shape=None) -> dict:
        shape = _model_shape(int_path, input_shape)
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        requests = {k: compile_model(p, threads=threads, batch=batch, input_shape=shape).create_infer_request()
                    for k, p in (("fp", fp_path), ("int", int_path))}

        def timer(request):
            def run(n, secs, cap, warm):
                for _ in range(warm):
                    request.infer({0: x})
                times, spent = [], 0.0
                while len(times) < cap:
                    t0 = time.perf_counter()
                    request.infer({0: x})
                    times.append(time.perf_counter() - t0)
                    spent += times[-1]
                    if len(times) >= n and spent >= secs:
                        break
                return times
            return run

        times = interleaved({k: timer(r) for k, r in requests.items()}, budget)
        res = {k: LatencyResult.from_times(v, batch=batch, threads=threads).to_dict() for k, v in times.items()}
        return make_record(self.name, batch, threads, res["fp"], res["int"], int_precision="qdq (openvino int8)")

    def breakdown(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, input_shape=None) -> dict | None:
        return time_breakdown(fp_path, int_path, batch=batch, threads=threads,
                              input_shape=_model_shape(int_path, input_shape))


RUNTIME = OpenVINORuntime()
