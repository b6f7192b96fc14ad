"""``dfq-export``: a trained CNN checkpoint in, a verified QDQ ONNX (and TensorRT engine) out.

The CLI only parses arguments and calls :func:`dfq.run.run_export`. Errors a user can cause
print one paragraph (no traceback unless ``--debug``) and exit with the code of their class
(see ``dfq.common.errors`` and the README's exit-code table).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from dfq.common import distributed
from dfq.common.errors import UsageError, run_cli
from dfq.export.targets import target_names
from dfq.job import BUDGETS, ExportJob
from dfq.run import run_export
from dfq.pipeline.models import list_archs
from dfq.pipeline.quantize import CALIBRATION_RULES, Precision


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfq-export",
        description="Quantize a trained CNN without its training data and export a QDQ ONNX "
                    "(ONNX Runtime or TensorRT flavour), verified on ONNX Runtime.")
    p.add_argument("model", nargs="?", help="checkpoint (.pth/.pt/.th): a state_dict or a dict holding one; loaded with "
                                 "weights_only=True")
    p.add_argument("--arch", help="architecture name (default: inferred from the file name); see --list-archs")
    p.add_argument("--bits", default="8",
                   help="precision: 8 (W8A8), 4 (W4A4), or weight and activation bits such as W4A8 (default 8)")
    p.add_argument("--mixed-budget", metavar="WxAy",
                   help="mixed precision: each layer runs at --bits or at 8 bits, chosen from the measured per-layer "
                        "sensitivity so that the average weight bits (parameter-weighted) stay <= x and the average "
                        "activation bits (MAC-weighted) <= y, e.g. W5A5")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure per-layer sensitivity (done anyway below W8A8): report table and <out>.sensitivity.png")
    p.add_argument("--target", choices=target_names(),
                   help="artifact flavour; fixes activation grids and Q/DQ placement (default: tensorrt for an "
                        ".engine/.plan output, else onnxruntime)")
    p.add_argument("--out", required=False, help="output .onnx, or .engine/.plan (the .onnx is written beside it)")
    p.add_argument("--method",
                   help="data-free method (default: recon below W8A8, acq at W8A8): recon (BN inversion, then "
                        "layer-wise learned rounding), acq, acq-recon (recon, then acq fine-tuning), gdfq, dsg, "
                        "clusterq, ddaq, bns-ft (fine-tune on BN-inversion images) or bns (BN inversion and "
                        "calibration only)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: set by --budget)")
    p.add_argument("--recon-iters", type=int,
                   help="recon/acq-recon: learned-rounding iterations per layer (default: set by --budget)")
    p.add_argument("--batch", type=int, help="fine-tuning batch per process (default: set by --budget)")
    p.add_argument("--synth-images", type=int, help="number of BN-inversion images (default: set by --budget)")
    p.add_argument("--synth-steps", type=int, help="optimisation steps per BN-inversion batch (default: set by --budget)")
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tuning checkpoint of an interrupted run of the same command")
    p.add_argument("--checkpoint", help="fine-tuning checkpoint path (default: <out>.finetune.ckpt; written every "
                                        "few minutes, removed when the run succeeds)")
    p.add_argument("--val", help="ImageFolder of real labelled images for accuracy (optional)")
    p.add_argument("--val-limit", type=int, help="use at most this many --val images")
    p.add_argument("--budget", default="default", choices=BUDGETS,
                   help="synthesis/fine-tuning budget (fast = smoke test)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--report", help="report JSON path (default: <out>.report.json; Markdown beside it)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="ONNX Runtime threads for checks and latency (default: all cores)")
    p.add_argument("--latency-batch", type=int, action="append", dest="latency_batches",
                   help="batch size for the latency comparison (repeatable; default 1)")
    p.add_argument("--full-range-weights", action="store_true",
                   help="onnxruntime target: 8-bit weights on [-127,127] instead of [-63,63] (exact only on "
                        "CPUs with VNNI; AVX2-only CPUs saturate)")
    p.add_argument("--residual-bits", type=int, choices=(4, 8),
                   help="bits of every tensor a residual Add reads; every conv still reads --bits-bit inputs, "
                        "a requantization where it shares the tensor with an Add (default 8: the runtimes add "
                        "on 8-bit kernels anyway)")
    p.add_argument("--keep-8bit", action="append", metavar="PATTERN", dest="keep_8bit",
                   help="with --bits 4: also keep the conv/linear layers whose module name matches this glob at 8 "
                        "bits (repeatable; added to the default first-conv/last-linear policy; 'none' drops that "
                        "default)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="skip the empirical bias correction after calibration (on by default; it is kept only "
                        "when it lowers the FP->quantized KL on held-out synthetic images)")
    p.add_argument("--calibration", choices=CALIBRATION_RULES, default="auto",
                   help="activation-range rule: auto (default) scores min/max, percentile and MSE on held-out "
                        "synthetic images and keeps the best; or pin one of them")
    p.add_argument("--equalize", action="store_true",
                   help="equalise the channel ranges of activations below 8 bits that pass a ReLU from one conv "
                        "to the next (cross-layer equalisation from the BatchNorm statistics; the float model is "
                        "unchanged by it; off by default)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--list-archs", action="store_true", help="print known architecture names and exit")
    return p


def _layer_policy(patterns: list[str] | None) -> tuple[str, ...] | None:
    """--keep-8bit values -> QuantConfig.keep_8bit (None: the default policy)."""
    if not patterns:
        return None
    base = () if "none" in patterns else ("@first", "@last")
    return base + tuple(p for p in patterns if p != "none")


def _mixed_budget(text: str | None) -> tuple[float, float] | None:
    """``--mixed-budget W5A5`` -> (5.0, 5.0)."""
    if text is None:
        return None
    m = re.fullmatch(r"W(\d+(?:\.\d+)?)A(\d+(?:\.\d+)?)", text.strip().upper())
    if not m:
        raise UsageError(f"--mixed-budget {text}: give average weight and activation bits as WxAy, e.g. W5A5 or W4.5A6.")
    return float(m.group(1)), float(m.group(2))


def job_from_args(args: argparse.Namespace) -> ExportJob:
    """The :class:`ExportJob` the command line asks for (usage errors raised here)."""
    for flag, value in (("--batch", args.batch), ("--synth-images", args.synth_images),
                        ("--synth-steps", args.synth_steps), ("--recon-iters", args.recon_iters)):
        least = {"--batch": 2, "--synth-images": 16, "--synth-steps": 1, "--recon-iters": 1}[flag]
        if value is not None and value < least:
            why = (" (8 images are held out to choose the calibration, at least 8 calibrate)"
                   if flag == "--synth-images" else "")
            raise UsageError(f"{flag} {value} is too small: use at least {least}{why}.")
    synth = {}
    if args.synth_images is not None:
        synth["num_images"] = args.synth_images
    if args.synth_steps is not None:
        synth["steps"] = args.synth_steps
    tune = {"batch": args.batch} if args.batch is not None else {}

    try:
        precision = Precision.parse(args.bits)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    job = ExportJob(model=args.model, out=args.out, arch=args.arch, bits=precision.weights,
                    act_bits=precision.activations, target=args.target,
                    mixed_budget=_mixed_budget(args.mixed_budget), sensitivity=args.sensitivity,
                    method=args.method, steps=args.steps, resume=args.resume, checkpoint=args.checkpoint,
                    val=args.val, val_limit=args.val_limit, budget=args.budget,
                    seed=args.seed, report=args.report,
                    reduce_range=False if args.full_range_weights else None, residual_bits=args.residual_bits,
                    bias_correction=not args.no_bias_correction, equalize=args.equalize,
                    calibration=args.calibration, keep_8bit=_layer_policy(args.keep_8bit),
                    force=args.force, threads=args.threads,
                    latency_batches=tuple(args.latency_batches or (1,)), progress=not args.no_progress,
                    synth_overrides=synth, finetune_overrides=tune,
                    reconstruct_overrides={} if args.recon_iters is None else {"iterations": args.recon_iters})
    return job


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli("dfq-export", lambda: _run(args), debug=args.debug)
    finally:
        distributed.shutdown(distributed.current())


def _run(args: argparse.Namespace) -> int:
    if args.list_archs:
        print("\n".join(list_archs()))
        return 0
    if not args.model:
        raise UsageError("a checkpoint path is required: dfq-export MODEL --out OUT.onnx")
    if not args.out:
        raise UsageError("--out is required: the path of the .onnx (or .engine) to write.")
    job = job_from_args(args)
    report = run_export(job, log=lambda msg: print(msg, file=sys.stderr))
    for line in report.summary_lines() if report is not None else ():   # None: a torchrun rank other than 0
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
