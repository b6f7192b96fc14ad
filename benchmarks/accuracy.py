"""Accuracy of exported artifacts on the real shared models and images, through the real CLI.

    python benchmarks/accuracy.py --model resnet20 --bits 8 --target onnxruntime --budget default

Runs ``dfq-export`` as a subprocess (the same command a user runs, timed as a whole), reads its
report and appends an ``accuracy`` record to ``benchmarks/results/accuracy.json`` (replacing a
record with the same model/dataset/method/bits/target/budget) and rewrites the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import merge_records, shared_root, write_markdown  # noqa: E402

MODELS = {
    "resnet20": ("models/cifar10/resnet20-12fca82f.th", "data/cifar10-test"),
    "resnet56": ("models/cifar10/resnet56-4bfd9763.th", "data/cifar10-test"),
    "efficientnet_lite0": ("models/imagenet/efficientnet-lite0-57934424.pth", "data/imagenet-val1300"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--bits", default="8", help="8, 4, or weights/activations such as W4A8")
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--method", default="acq")
    ap.add_argument("--budget", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more dfq-export arguments, quoted")
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    args = ap.parse_args(argv)
    root = shared_root()
    ckpt, data = (root / p for p in MODELS[args.model])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{args.model}.onnx"
        cmd = ["dfq-export", str(ckpt), "--bits", str(args.bits), "--target", args.target,
               "--method", args.method, "--budget", args.budget, "--seed", str(args.seed),
               "--val", str(data), "--threads", str(args.threads), "--out", str(out), "--no-progress",
               *shlex.split(args.extra)]
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dfq.cli", *cmd[1:]], text=True)
        wall = time.perf_counter() - t0
        report_path = out.with_name(out.stem + ".report.json")
        if not report_path.exists():
            print(f"dfq-export exited {proc.returncode} without a report", file=sys.stderr)
            return 1
        rep = json.loads(report_path.read_text())
    f = rep["fidelity"]
    rec = {
        "kind": "accuracy", "model": args.model, "dataset": Path(data).name, "method": args.method,
        "bits": rep["quant"]["name"], "avg_weight_bits": rep["quant"].get("avg_weight_bits"),
        "avg_act_bits": rep["quant"].get("avg_act_bits"), "target": args.target, "budget": args.budget, "seed": args.seed,
        "top1_fp": f["top1_fp"], "top1_int": f["top1_int"], "top1_fakequant": f["top1_fakequant"],
        "drop_points": f["top1_drop_points"], "agreement": f["agreement"],
        "agreement_with_fp": f["agreement_with_fp"], "agreement_exact": f.get("agreement_exact"),
        "agreement_float_fakequant": f.get("agreement_float_fakequant"), "reference": f.get("reference"),
        "agreement_openvino": f.get("agreement_openvino"), "top1_openvino": f.get("top1_openvino"),
        "relative_logit_error": f.get("relative_logit_error"),
        "requant_ties_moved": (rep["quant"].get("requant_ties") or {}).get("moved"),
        "images": f["images"],
        "steps": (rep.get("finetune", {}).get("result") or {}).get("steps", 0),
        "batch": (rep.get("finetune", {}).get("config") or {}).get("batch"),
        "finetune_s": rep.get("finetune", {}).get("seconds"),
        "heldout_kd": rep.get("finetune", {}).get("heldout_kd"),
        "calibration": rep["calibration"]["method"], "synthetic_images": rep["synthesis"]["num_images"],
        "bias_correction": rep["calibration"].get("bias_correction"),
        "wall_s": wall, "exit_code": proc.returncode, "timings_s": rep["timings_s"],
        "latency": rep["latency"], "commit": rep["commit"],
        "command": " ".join(shlex.quote(c) for c in cmd).replace(str(root), "../shared").replace(str(out), "OUT.onnx"),
        "machine": rep["machine"],
        "options": args.extra or None,
    }
    print(json.dumps({k: rec[k] for k in ("model", "bits", "target", "top1_fp", "top1_int", "drop_points",
                                          "agreement", "wall_s")}))
    records = merge_records(Path(args.out), [rec], key=("model", "dataset", "method", "bits", "target", "budget", "steps", "options", "seed"))
    write_markdown(Path(args.out).with_suffix(".md"), records,
                   ["model", "dataset", "method", "bits", "avg_weight_bits", "avg_act_bits", "target", "budget", "seed",
                    "steps", "options", "top1_fp", "top1_int", "drop_points", "agreement", "agreement_float_fakequant",
                    "wall_s", "commit"],
                   "Accuracy of exported artifacts (ONNX Runtime, CPU) vs FP32 on the same images")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
