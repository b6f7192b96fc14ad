"""``dfq-bench``: latency of a quantized ONNX against its FP counterpart (ONNX Runtime CPU/CUDA,
TensorRT), as a table on stdout and a ``dfq-bench/1`` JSON for CI, with speedup gates.

The CLI parses arguments and calls :func:`dfq.export.bench.run_bench`. Errors print one
paragraph (no traceback unless ``--debug``) and exit with the code of their class: 2 bad usage or
missing model, 5 TensorRT could not build an engine, 6 ``--out`` not writable, 8 a speedup check
failed (``SpeedupError``; the JSON is written first), 9 a backend is not available here
(``BackendUnavailableError``). See docs/benchmarking.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from dfq.common.errors import OutputError, SpeedupError, UsageError, run_cli
from dfq.common.files import atomic_write_bytes
from dfq.export.bench import BACKENDS, Budget, format_checks, format_table, run_bench
from dfq.report import to_json


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (positive integers), got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfq-bench",
        description="Measure a quantized ONNX and its FP counterpart in the same run (interleaved) on one or "
                    "more backends and batch sizes; report median/p90 latency, throughput and speedup "
                    "(FP median / quantized median); optionally fail on a too-small speedup or a regression "
                    "against a previous result.")
    p.add_argument("model", help="the quantized (QDQ) ONNX")
    p.add_argument("--fp", help="the FP ONNX to compare with (default: <stem>.fp32.onnx beside MODEL, as "
                                "dfq-export writes it)")
    p.add_argument("--backend", action="append", dest="backends", choices=BACKENDS,
                   help="repeatable; default onnxruntime-cpu")
    p.add_argument("--batch", action="append", dest="batches", type=int, help="repeatable; default 1")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model first (default 10)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, help="timed runs per model and (backend, batch)")
    budget.add_argument("--seconds", type=float,
                        help="seconds of timed runs per model and (backend, batch) (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="ONNX Runtime intra-op threads (default: all cores); fix it in CI")
    p.add_argument("--input-shape", type=_shape,
                   help="input shape without the batch dim, e.g. 3,224,224 (default: the model's)")
    p.add_argument("--out", help="write the dfq-bench/1 result JSON here (atomically)")
    p.add_argument("--min-speedup", type=float, help="fail (exit 8) when any speedup is below this")
    p.add_argument("--baseline", help="a previous dfq-bench JSON: fail (exit 8) when a speedup regressed")
    p.add_argument("--max-regression", type=float,
                   help="allowed relative speedup drop against --baseline (default 0.10)")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile both models on each backend that can (time per op type and kernel, "
                        "slowest nodes; OpenVINO: which nodes run in int8) into the result JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_cli("dfq-bench", lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.max_regression is not None and args.baseline is None:
        raise UsageError("--max-regression compares against a previous result: give it with --baseline OLD.json.")
    if args.iterations is not None:
        budget = Budget(warmup=args.warmup, iterations=args.iterations)
    else:
        budget = Budget(warmup=args.warmup, seconds=3.0 if args.seconds is None else args.seconds)
    result = run_bench(args.model, args.fp, backends=args.backends or ["onnxruntime-cpu"],
                       batches=args.batches or [1], threads=args.threads, budget=budget,
                       input_shape=args.input_shape, min_speedup=args.min_speedup, baseline=args.baseline,
                       max_regression=0.10 if args.max_regression is None else args.max_regression,
                       command=" ".join(shlex.quote(a) for a in ["dfq-bench", *argv]),
                       log=lambda m: print(m, file=sys.stderr), breakdown=args.breakdown)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, to_json(result))
        except OSError as exc:
            raise OutputError(f"Cannot write the result to {out}: {exc}.") from None
    print(format_table(result["records"]))
    for line in format_checks(result["checks"]):
        print(line)
    if args.out:
        print(f"result: {args.out}")
    if not result["passed"]:
        failed = []
        ms = result["checks"]["min_speedup"]
        if ms is not None and not ms["passed"]:
            failed.append("speedup below --min-speedup " + f"{ms['threshold']:g}: " + ", ".join(
                f"{f['backend']} batch {f['batch']} {f['speedup']:.2f}x" for f in ms["failures"]))
        bl = result["checks"]["baseline"]
        if bl is not None and not bl["passed"]:
            failed.append(f"speedup regressed more than {100 * bl['max_regression']:g}% against the baseline: "
                          + ", ".join(f"{c['backend']} batch {c['batch']} {c['new_speedup']:.2f}x (was "
                                      f"{c['old_speedup']:.2f}x)" for c in bl["failures"]))
        raise SpeedupError("The benchmark check failed: " + "; ".join(failed) + "."
                           + (f" The measurements are in {args.out}." if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
