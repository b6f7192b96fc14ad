"""``dfq-bench``: latency of a quantized artifact against its FP counterpart, for CI.

For each backend and batch size the FP model and the quantized model are measured in the same
process, interleaved (FP, INT, FP, INT ... in ``rounds`` rounds, samples pooled per model), so
slow drift hits both alike; the figure of merit is the speedup ``fp_median / int_median``, a
ratio that can be compared across runs and machines where absolute times cannot.

Backends
--------
* ``onnxruntime-cpu``: :func:`dfq.export.ort_runtime.compare_latency` (CPUExecutionProvider).
* ``onnxruntime-cuda``: the same with ``CUDAExecutionProvider`` first; each run includes the
  host-to-device copy of the input and the copy of the output back (numpy in, numpy out).
* ``tensorrt``: two engines per batch size (profile ``1..batch``, optimised for ``batch``) from
  the quantized ONNX as it is (strongly typed: INT8 where the Q/DQ say so) and from the FP ONNX
  converted to FP16 (``fp_precision: "fp16"``; TensorRT 11 has no FP16 builder flag); timed
  with :class:`dfq.export.tensorrt.EngineRunner` (GPU time per ``execute_async_v3``, input
  already on the device). Written against the TensorRT documentation, not yet run on a GPU.

Result JSON (``schema: "dfq-bench/1"``), see docs/benchmarking.md::

    {"schema": "dfq-bench/1", "created_utc": "...", "command": "dfq-bench ...", "git_commit": "...",
     "machine": {... dfq.report.machine_info() ...},
     "models": {"int": {"path": ..., "sha256": ...}, "fp": {"path": ..., "sha256": ...}},
     "settings": {"backends": [...], "batches": [...], "threads": n, "warmup": n, "iterations": n|null,
                  "seconds": s|null, "rounds": 3, "input_shape": [c, h, w]|null},
     "records": [{"backend", "batch", "threads", "fp_ms", "int_ms", "fp_p90_ms", "int_p90_ms",
                  "fp_throughput", "int_throughput", "speedup", "fp_iterations", "int_iterations",
                  "fp_precision", "int_precision"}, ...],
     "checks": {"min_speedup": {...}|null, "baseline": {...}|null}, "passed": true|false}

Times are medians/p90 in milliseconds per run of a whole batch; throughputs are images per
second at the median (``batch * 1000 / median_ms``). ``threads`` is ORT's intra-op thread
count, ``null`` for TensorRT.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from dfq.common.errors import BackendUnavailableError, UnsupportedModelError, UsageError

__all__ = ["SCHEMA", "BACKENDS", "Budget", "default_fp_path", "resolve_fp_path", "backend_status",
           "require_backend", "make_record", "measure", "check_min_speedup", "load_baseline",
           "compare_to_baseline", "run_bench", "format_table", "format_checks"]

SCHEMA = "dfq-bench/1"
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
RECORD_FIELDS = ("backend", "batch", "threads", "fp_ms", "int_ms", "fp_p90_ms", "int_p90_ms",
                 "fp_throughput", "int_throughput", "speedup")


@dataclasses.dataclass
class Budget:
    """Timing budget per model and (backend, batch): ``iterations`` timed runs, or (when None)
    ``seconds`` of timed runs (at most ``max_iterations``); spread over ``rounds`` rounds."""

    warmup: int = 10
    iterations: int | None = None
    seconds: float = 3.0
    rounds: int = 3
    max_iterations: int = 100_000

    def ort_kwargs(self) -> dict:
        if self.iterations is not None:
            return {"warmup": self.warmup, "iterations": self.iterations, "min_seconds": 0.0,
                    "max_iterations": self.iterations, "rounds": self.rounds}
        return {"warmup": self.warmup, "iterations": None, "min_seconds": self.seconds,
                "max_iterations": self.max_iterations, "rounds": self.rounds}


# --- inputs ---------------------------------------------------------------------------------------

def default_fp_path(int_path: str | Path) -> Path:
    """``<stem>.fp32.onnx`` beside the quantized model: the FP twin dfq-export writes."""
    p = Path(int_path)
    return p.with_name(p.stem + ".fp32.onnx")


def resolve_fp_path(int_path: str | Path, fp_path: str | Path | None) -> Path:
    """The FP counterpart: ``fp_path`` if given, else :func:`default_fp_path` if it exists."""
    int_path = Path(int_path)
    if not int_path.is_file():
        raise UsageError(f"The quantized model {int_path} does not exist.")
    if fp_path is not None:
        if not Path(fp_path).is_file():
            raise UsageError(f"The FP model given with --fp, {fp_path}, does not exist.")
        return Path(fp_path)
    guess = default_fp_path(int_path)
    if not guess.is_file():
        raise UsageError(f"No FP counterpart for {int_path}: {guess} (the FP32 twin dfq-export writes beside the "
                         "quantized model) does not exist. Pass the FP ONNX with --fp FP.onnx.")
    return guess


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- backends -------------------------------------------------------------------------------------

def backend_status(backend: str) -> tuple[bool, str]:
    """(True, description) when ``backend`` can run here, else (False, what is missing)."""
    if backend == "onnxruntime-cpu":
        return True, "ONNX Runtime CPUExecutionProvider"
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            return False, (f"this ONNX Runtime build ({ort.__version__}, package onnxruntime) has no "
                           f"CUDAExecutionProvider (available: {', '.join(available)}); install onnxruntime-gpu "
                           "matching the machine's CUDA and cuDNN instead of onnxruntime, on a machine with an "
                           "NVIDIA GPU")
        return True, "ONNX Runtime CUDAExecutionProvider"
    if backend == "tensorrt":
        from dfq.export.tensorrt import tensorrt_status

        return tensorrt_status()
    raise UsageError(f"Unknown backend {backend!r}; choose from {', '.join(BACKENDS)}.")


def require_backend(backend: str, model: str | Path = "MODEL.onnx") -> None:
    """Raise :class:`BackendUnavailableError` (exit 9) naming what is missing for ``backend``."""
    ok, why = backend_status(backend)
    if not ok:
        extra = ""
        if backend == "tensorrt":
            import shlex

            engine = Path(model).with_suffix(".engine")
            extra = (f" Run dfq-bench --backend tensorrt on a GPU machine with TensorRT; an engine alone can be "
                     f"built there with dfq-build {shlex.quote(str(model))} --out {shlex.quote(str(engine))} "
                     f"(or trtexec --onnx={shlex.quote(str(model))} --saveEngine={shlex.quote(str(engine))} "
                     "--stronglyTyped).")
        raise BackendUnavailableError(f"The {backend} backend cannot run here: {why}.{extra}")


def _ort_providers(backend: str) -> list[str]:
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "onnxruntime-cuda"
            else ["CPUExecutionProvider"])


def _check_cuda_session(int_path: Path, threads: int) -> None:
    """ORT falls back to the CPU silently when the CUDA provider cannot start (no GPU, wrong
    CUDA/cuDNN): refuse to report CPU numbers as CUDA ones."""
    from dfq.export.ort_runtime import make_session

    s = make_session(int_path, threads=threads, providers=_ort_providers("onnxruntime-cuda"))
    if s.get_providers()[0] != "CUDAExecutionProvider":
        raise BackendUnavailableError(
            "The onnxruntime-cuda backend cannot run here: ONNX Runtime lists CUDAExecutionProvider but the "
            f"session fell back to {s.get_providers()} (no usable NVIDIA GPU, or CUDA/cuDNN libraries that do "
            "not match this onnxruntime-gpu build).")


# --- measuring ------------------------------------------------------------------------------------

def make_record(backend: str, batch: int, threads: int | None, fp: dict, int_: dict, *,
                fp_precision: str = "fp32", int_precision: str = "qdq") -> dict:
    """One result row from two latency dicts (``median_ms``, ``p90_ms``, ``iterations``)."""
    fp_ms, int_ms = float(fp["median_ms"]), float(int_["median_ms"])
    return {"backend": backend, "batch": int(batch), "threads": threads,
            "fp_ms": fp_ms, "int_ms": int_ms, "fp_p90_ms": float(fp["p90_ms"]), "int_p90_ms": float(int_["p90_ms"]),
            "fp_throughput": batch * 1e3 / fp_ms, "int_throughput": batch * 1e3 / int_ms,
            "speedup": fp_ms / int_ms, "fp_iterations": int(fp.get("iterations", 0)),
            "int_iterations": int(int_.get("iterations", 0)), "fp_precision": fp_precision,
            "int_precision": int_precision}


def _interleaved(timers: dict, budget: Budget) -> dict[str, list[float]]:
    """compare_latency's schedule for non-ORT timers: warm both, then ``rounds`` rounds of each
    timer in turn, each round 1/rounds of the budget after 2 re-warm runs.
    ``timers[k](iterations, min_seconds, max_iterations, warmup) -> [seconds]``."""
    for t in timers.values():
        t(1, 0.0, 1, budget.warmup)
    per_iter = None if budget.iterations is None else max(1, math.ceil(budget.iterations / budget.rounds))
    per_cap = per_iter if per_iter is not None else max(1, budget.max_iterations // budget.rounds)
    per_secs = 0.0 if budget.iterations is not None else budget.seconds / budget.rounds
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(budget.rounds):
        for k, t in timers.items():
            times[k] += t(per_iter or 1, per_secs, per_cap, min(2, budget.warmup))
    return times


def _measure_tensorrt(fp_path: Path, int_path: Path, *, batch: int, budget: Budget, input_shape, workdir: Path,
                      seed: int = 0) -> dict:
    from dfq.export.ort_runtime import LatencyResult
    from dfq.export.tensorrt import EngineRunner, build_engine, inspect_engine

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
    times = _interleaved(timers, budget)
    res = {k: LatencyResult.from_times(v, batch=batch, threads=0).to_dict() for k, v in times.items()}
    rec = make_record("tensorrt", batch, None, res["fp"], res["int"], fp_precision="fp16",
                      int_precision="int8-qdq")
    layers = inspect_engine(engines["int"])
    rec["tensorrt"] = {"version": builds["int"]["tensorrt"], "int8_layers": layers["int8_layers"],
                       "not_int8_compute_layers": layers["not_int8_compute"],
                       "fp16_conversion": builds["fp"].get("fp16_conversion")}
    return rec


def measure(backend: str, fp_path: Path, int_path: Path, *, batch: int, threads: int, budget: Budget,
            input_shape=None, workdir: Path | None = None) -> dict:
    """One record (see :func:`make_record`) for ``backend`` at ``batch``."""
    if backend in ("onnxruntime-cpu", "onnxruntime-cuda"):
        from dfq.export.ort_runtime import compare_latency

        try:
            res = compare_latency(fp_path, int_path, batch=batch, threads=threads, input_shape=input_shape,
                                  providers=_ort_providers(backend), **budget.ort_kwargs())
        except ValueError as exc:  # shapes that do not fit the models
            raise UsageError(f"Cannot time {int_path} at batch {batch}: {exc}") from exc
        return make_record(backend, batch, threads, res["fp"], res["int"])
    if backend == "tensorrt":
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="dfq_bench_trt_") as tmp:
                return _measure_tensorrt(fp_path, int_path, batch=batch, budget=budget, input_shape=input_shape,
                                         workdir=Path(tmp))
        return _measure_tensorrt(fp_path, int_path, batch=batch, budget=budget, input_shape=input_shape,
                                 workdir=workdir)
    raise UsageError(f"Unknown backend {backend!r}; choose from {', '.join(BACKENDS)}.")


# --- checks (pure functions) ----------------------------------------------------------------------

def _key(rec: dict) -> tuple[str, int]:
    return str(rec["backend"]), int(rec["batch"])


def check_min_speedup(records: list[dict], min_speedup: float) -> dict:
    """``{"threshold", "failures": [{"backend", "batch", "speedup"}], "passed"}``: every record
    whose speedup is below ``min_speedup``."""
    failures = [{"backend": r["backend"], "batch": r["batch"], "speedup": r["speedup"]}
                for r in records if not r["speedup"] >= min_speedup]  # NaN fails too
    return {"threshold": min_speedup, "failures": failures, "passed": not failures}


def load_baseline(path: str | Path) -> dict:
    """A previous dfq-bench result; raises UsageError when it is missing or not dfq-bench/1."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"The baseline {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"The baseline {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("records"), list):
        raise UsageError(f"The baseline {path} is not a {SCHEMA} result (schema field: "
                         f"{data.get('schema') if isinstance(data, dict) else None!r}).")
    return data


def compare_to_baseline(records: list[dict], baseline_records: list[dict], max_regression: float) -> dict:
    """Compare speedups (ratios, never absolute times) with a previous run's, per (backend, batch).

    A record fails when ``new_speedup < old_speedup * (1 - max_regression)``. Records without a
    match in the baseline are listed in ``missing_in_baseline`` and do not fail; baseline records
    not measured now are listed in ``not_measured``. Returns ``{"max_regression", "compared":
    [{"backend", "batch", "old_speedup", "new_speedup", "limit", "change", "passed"}],
    "missing_in_baseline", "not_measured", "failures", "passed"}``."""
    if not 0 <= max_regression < 1:
        raise UsageError(f"--max-regression must be in [0, 1), got {max_regression}.")
    old = {_key(r): r for r in baseline_records}
    new_keys = {_key(r) for r in records}
    compared, missing = [], []
    for r in records:
        k = _key(r)
        if k not in old:
            missing.append({"backend": k[0], "batch": k[1]})
            continue
        old_s, new_s = float(old[k]["speedup"]), float(r["speedup"])
        limit = old_s * (1 - max_regression)
        compared.append({"backend": k[0], "batch": k[1], "old_speedup": old_s, "new_speedup": new_s,
                         "limit": limit, "change": new_s / old_s - 1 if old_s else None,
                         "passed": bool(new_s >= limit)})
    not_measured = [{"backend": k[0], "batch": k[1]} for k in old if k not in new_keys]
    failures = [c for c in compared if not c["passed"]]
    return {"max_regression": max_regression, "compared": compared, "missing_in_baseline": missing,
            "not_measured": not_measured, "failures": failures, "passed": not failures}


# --- the whole run --------------------------------------------------------------------------------

def _input_shape(int_path: Path, input_shape) -> tuple[int, ...] | None:
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    from dfq.export.tensorrt import onnx_input_shape

    try:
        return onnx_input_shape(int_path)[1]
    except Exception as exc:  # noqa: BLE001 - not ONNX, several inputs ...
        raise UsageError(f"Cannot read the input of {int_path}: {exc}") from None


def run_bench(int_path: str | Path, fp_path: str | Path | None = None, *, backends=("onnxruntime-cpu",),
              batches=(1,), threads: int = 1, budget: Budget | None = None, input_shape=None,
              min_speedup: float | None = None, baseline: str | Path | dict | None = None,
              max_regression: float = 0.10, command: str = "", log=None) -> dict:
    """Measure every (backend, batch), run the checks, return the dfq-bench/1 result dict.
    Does not raise on failed checks: ``result["passed"]`` says; the CLI turns it into exit 8.
    Raises :class:`BackendUnavailableError` (before timing anything) for a backend that cannot
    run here, :class:`UsageError` for bad inputs."""
    from dfq.report import git_commit, machine_info

    budget = budget or Budget()
    backends = list(dict.fromkeys(backends))
    batches = list(dict.fromkeys(int(b) for b in batches))
    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"Unknown backend {b!r}; choose from {', '.join(BACKENDS)}.")
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch must be >= 1, got {batches}.")
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}.")
    if budget.warmup < 0 or budget.rounds < 1 or (budget.iterations is not None and budget.iterations < 1) \
            or (budget.iterations is None and not budget.seconds > 0):
        raise UsageError("--warmup must be >= 0, --iterations >= 1 and --seconds > 0.")
    if min_speedup is not None and not min_speedup > 0:
        raise UsageError(f"--min-speedup must be > 0, got {min_speedup}.")
    if not 0 <= max_regression < 1:
        raise UsageError(f"--max-regression must be in [0, 1), got {max_regression}.")
    int_path = Path(int_path)
    fp_path = resolve_fp_path(int_path, fp_path)
    base = (baseline if isinstance(baseline, dict) else load_baseline(baseline)) if baseline is not None else None
    for b in backends:  # fail before spending time on the others
        require_backend(b, int_path)
    shape = _input_shape(int_path, input_shape)
    if "tensorrt" in backends:
        if shape is None:
            raise UsageError(f"{int_path} has non-static input dims besides the batch; pass --input-shape C,H,W.")
        import onnx

        from dfq.export.rules import tensorrt_violations

        problems = tensorrt_violations(onnx.load(str(int_path), load_external_data=False))
        if problems:
            raise UsageError(f"{int_path} is not a TensorRT-flavour QDQ model (export it with dfq-export --target "
                             "tensorrt): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
    if "onnxruntime-cuda" in backends:
        _check_cuda_session(int_path, threads)

    records = []
    for backend in backends:
        for batch in batches:
            if log:
                log(f"dfq-bench: {backend} batch {batch} ...")
            records.append(measure(backend, fp_path, int_path, batch=batch, threads=threads, budget=budget,
                                   input_shape=shape))
    checks = {"min_speedup": check_min_speedup(records, min_speedup) if min_speedup is not None else None,
              "baseline": None}
    if base is not None:
        cmp = compare_to_baseline(records, base["records"], max_regression)
        cmp["path"] = str(baseline) if not isinstance(baseline, dict) else None
        cmp["baseline_git_commit"] = base.get("git_commit")
        old_models = base.get("models", {})
        cmp["same_model"] = old_models.get("int", {}).get("sha256") == _sha256(int_path)
        old_machine, new_machine = base.get("machine", {}), machine_info()
        cmp["same_machine"] = all(old_machine.get(k) == new_machine.get(k) for k in ("cpu", "cores", "gpu"))
        checks["baseline"] = cmp
    passed = all(c["passed"] for c in checks.values() if c is not None)
    return {
        "schema": SCHEMA,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "git_commit": git_commit(),
        "machine": machine_info(),
        "models": {"int": {"path": str(int_path), "sha256": _sha256(int_path)},
                   "fp": {"path": str(fp_path), "sha256": _sha256(fp_path)}},
        "settings": {"backends": backends, "batches": batches, "threads": threads, "warmup": budget.warmup,
                     "iterations": budget.iterations, "seconds": None if budget.iterations else budget.seconds,
                     "rounds": budget.rounds, "input_shape": list(shape) if shape else None},
        "records": records,
        "checks": checks,
        "passed": passed,
    }


# --- text -----------------------------------------------------------------------------------------

def format_table(records: list[dict]) -> str:
    head = (f"{'backend':<17}{'batch':>6}{'thr':>5}{'fp ms':>10}{'fp p90':>10}{'int ms':>10}{'int p90':>10}"
            f"{'fp img/s':>11}{'int img/s':>11}{'speedup':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        thr = "-" if r["threads"] is None else str(r["threads"])
        lines.append(f"{r['backend']:<17}{r['batch']:>6}{thr:>5}{r['fp_ms']:>10.3f}{r['fp_p90_ms']:>10.3f}"
                     f"{r['int_ms']:>10.3f}{r['int_p90_ms']:>10.3f}{r['fp_throughput']:>11.1f}"
                     f"{r['int_throughput']:>11.1f}{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def format_checks(checks: dict) -> list[str]:
    lines = []
    ms = checks.get("min_speedup")
    if ms is not None:
        if ms["passed"]:
            lines.append(f"min speedup {ms['threshold']:.2f}x: OK")
        for f in ms["failures"]:
            lines.append(f"min speedup FAILED: {f['backend']} batch {f['batch']}: {f['speedup']:.2f}x < "
                         f"{ms['threshold']:.2f}x")
    bl = checks.get("baseline")
    if bl is not None:
        note = "" if bl.get("same_machine", True) else " (baseline from another machine: ratios compared)"
        lines.append(f"baseline {bl.get('path') or ''}, max regression {100 * bl['max_regression']:.0f}%{note}:")
        for c in bl["compared"]:
            lines.append(f"  {c['backend']} batch {c['batch']}: {c['new_speedup']:.2f}x vs {c['old_speedup']:.2f}x "
                         f"(limit {c['limit']:.2f}x) {'OK' if c['passed'] else 'REGRESSED'}")
        for m in bl["missing_in_baseline"]:
            lines.append(f"  {m['backend']} batch {m['batch']}: not in the baseline (reported, not checked)")
        for m in bl["not_measured"]:
            lines.append(f"  {m['backend']} batch {m['batch']}: in the baseline but not measured now")
    return lines
