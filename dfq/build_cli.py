"""``dfq-build``: a TensorRT engine from a (QDQ) ONNX, via :func:`dfq.export.tensorrt.build_engine`.

Strongly typed build (the Q/DQ nodes fix the INT8 layers), one optimization profile over the
batch dim, ``ProfilingVerbosity.DETAILED`` so the per-layer precision summary printed at the end
(and :func:`dfq.export.tensorrt.inspect_engine`) can say which layers run in INT8.
Without TensorRT or a CUDA device it exits 9 saying which is missing and printing the equivalent
trtexec command. Other exits: 2 bad usage, 5 TensorRT could not parse/build the model, 6 the
engine exists (no ``--force``) or cannot be written. Not yet run on a GPU (docs/benchmarking.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfq.bench_cli import _shape
from dfq.common.errors import OutputError, UnsupportedModelError, UsageError, run_cli
from dfq.export.tensorrt import (build_engine, inspect_engine, onnx_input_shape, require_tensorrt,
                                trtexec_command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfq-build",
        description="Build a strongly typed TensorRT engine from an ONNX (dfq-export's QDQ model, or its FP twin "
                    "with --fp16). Needs TensorRT and an NVIDIA GPU.")
    p.add_argument("model", help="the ONNX to build from")
    p.add_argument("--out", required=True, help="the engine file to write (.engine/.plan)")
    p.add_argument("--fp16", action="store_true",
                   help="build from an FP16 conversion of the graph (float initializers and compute in FP16, "
                        "FP32 inputs/outputs): the strongly typed way to get FP16 kernels; TensorRT 11 has no FP16 "
                        "builder flag. On a QDQ model the layers between Q/DQ pairs then run in FP16")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit in MiB (default 1024)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file: read if present, written after the build")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile (default 1)")
    p.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default: --max-batch)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the profile (default 32)")
    p.add_argument("--input-shape", type=_shape,
                   help="input shape without the batch dim, e.g. 3,224,224 (default: the model's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing engine")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("dfq-build", lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    model, out = Path(args.model), Path(args.out)
    if not model.is_file():
        raise UsageError(f"The ONNX model {model} does not exist.")
    opt = args.max_batch if args.opt_batch is None else args.opt_batch
    if not 1 <= args.min_batch <= opt <= args.max_batch:
        raise UsageError(f"Need 1 <= --min-batch <= --opt-batch <= --max-batch, got {args.min_batch}, {opt}, "
                         f"{args.max_batch}.")
    if args.workspace_mb < 1:
        raise UsageError(f"--workspace-mb must be >= 1, got {args.workspace_mb}.")
    if out.exists() and not args.force:
        raise OutputError(f"{out} exists; pass --force to overwrite it.")
    try:
        name, shape = onnx_input_shape(model)
    except Exception as exc:  # noqa: BLE001 - not an ONNX file, several inputs ...
        raise UsageError(f"Cannot read the input of {model}: {exc}") from None
    shape = args.input_shape or shape
    if shape is None:
        raise UsageError(f"{model} has non-static input dims besides the batch; pass --input-shape C,H,W.")
    cmd = trtexec_command(model, out, input_name=name, input_shape=shape, min_batch=args.min_batch,
                          opt_batch=opt, max_batch=args.max_batch, timing_cache=args.timing_cache)
    if args.fp16:
        cmd += (" (with --fp16: run it on an FP16 copy of the graph, e.g. from NVIDIA ModelOpt AutoCast; "
                "strongly typed TensorRT takes precisions from the graph)")
    require_tensorrt(model, out, trtexec=cmd, verified=False, rerun="the same dfq-build command")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the folder of {out}: {exc}.") from None
    try:
        report = build_engine(model, out, input_shape=shape, min_batch=args.min_batch, opt_batch=opt,
                              max_batch=args.max_batch, workspace_bytes=args.workspace_mb << 20, fp16=args.fp16,
                              timing_cache=args.timing_cache)
    except PermissionError as exc:
        raise OutputError(f"Cannot write {out}: {exc}.") from None
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(f"TensorRT could not build an engine from {model}: {exc}") from None
    print(f"engine: {out} ({report['bytes'] / 2**20:.1f} MiB, TensorRT {report['tensorrt']}, batch "
          f"{report['min_batch']}..{report['opt_batch']}..{report['max_batch']}, {report['precision']})")
    try:
        layers = inspect_engine(out)
        print(f"layers: {len(layers['layers'])}, reading INT8: {layers['int8_layers']}")
        if layers["not_int8_compute"]:
            print("conv/gemm layers NOT in INT8: " + ", ".join(layers["not_int8_compute"]))
    except Exception as exc:  # noqa: BLE001 - the engine is built; the summary is extra
        print(f"dfq-build: warning: could not inspect the engine's layers: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
