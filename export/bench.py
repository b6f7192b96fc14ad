"""``dfq-bench``: latency of a quantized artifact against its FP counterpart, for CI.

For each backend and batch size the FP model and the quantized model are measured in the same
process, interleaved (FP, INT, FP, INT ... in ``rounds`` rounds, samples pooled per model), so
slow drift hits both alike; the figure of merit is the speedup ``fp_median / int_median``, a
ratio that can be compared across runs and machines where absolute times cannot.

Backends are the runtimes of :mod:`dfq.export.runtimes` (``onnxruntime-cpu`` always;
``onnxruntime-cuda`` and ``tensorrt`` where present); each one's module says how it times.

Result JSON (``schema: "dfq-bench/1"``), see docs/benchmarking.md::

    {"schema": "dfq-bench/1", "created_utc": "...", "command": "dfq-bench ...", "git_commit": "...",
     "machine": {... dfq.common.provenance.machine_info() ...},
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

import datetime as _dt
import hashlib
import json
from pathlib import Path

from dfq.common.errors import UsageError
from dfq.common.provenance import git_commit, machine_info
from dfq.export.runtimes import Budget, get_runtime, require_runtime, runtime_names
from dfq.export.tensorrt import onnx_input_shape

__all__ = ["SCHEMA", "BACKENDS", "Budget", "default_fp_path", "resolve_fp_path", "check_min_speedup",
           "load_baseline", "compare_to_baseline", "run_bench", "format_table", "format_checks"]

SCHEMA = "dfq-bench/1"
BACKENDS = tuple(runtime_names())
RECORD_FIELDS = ("backend", "batch", "threads", "fp_ms", "int_ms", "fp_p90_ms", "int_p90_ms",
                 "fp_throughput", "int_throughput", "speedup")


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
    try:
        return onnx_input_shape(int_path)[1]
    except Exception as exc:  # noqa: BLE001 - not ONNX, several inputs ...
        raise UsageError(f"Cannot read the input of {int_path}: {exc}") from None


def run_bench(int_path: str | Path, fp_path: str | Path | None = None, *, backends=("onnxruntime-cpu",),
              batches=(1,), threads: int = 1, budget: Budget | None = None, input_shape=None,
              min_speedup: float | None = None, baseline: str | Path | dict | None = None,
              max_regression: float = 0.10, command: str = "", log=None, breakdown: bool = False) -> dict:
    """Measure every (backend, batch), run the checks, return the dfq-bench/1 result dict. With
    ``breakdown`` each record also carries the runtime's profile of both models
    (:meth:`Runtime.breakdown`: time per op type, slowest nodes; None where it cannot profile).
    Does not raise on failed checks: ``result["passed"]`` says; the CLI turns it into exit 8.
    Raises :class:`BackendUnavailableError` (before timing anything) for a backend that cannot
    run here, :class:`UsageError` for bad inputs."""
    budget = budget or Budget()
    backends = list(dict.fromkeys(backends))
    batches = list(dict.fromkeys(int(b) for b in batches))
    for b in backends:
        get_runtime(b)   # an unknown name is a usage error
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
    runtimes = [require_runtime(b, int_path) for b in backends]  # fail before spending time on the others
    shape = _input_shape(int_path, input_shape)
    for runtime in runtimes:
        runtime.preflight(int_path, threads, shape)

    records = []
    for backend in backends:
        for batch in batches:
            if log:
                log(f"dfq-bench: {backend} batch {batch} ...")
            runtime = get_runtime(backend)
            rec = runtime.measure(fp_path, int_path, batch=batch, threads=threads, budget=budget, input_shape=shape)
            if breakdown:
                rec["breakdown"] = runtime.breakdown(fp_path, int_path, batch=batch, threads=threads,
                                                     input_shape=shape)
            records.append(rec)
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
