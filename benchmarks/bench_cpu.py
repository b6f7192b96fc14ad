"""``dfq-bench`` on the CPU: W8A8 and W4A4 artifacts of resnet18 (random weights: latency does not
depend on them), ResNet-20 and EfficientNet-Lite0 (real weights), batch 1 and 32, on ONNX Runtime
and OpenVINO in one run, through the real ``dfq-bench`` command.

    python benchmarks/bench_cpu.py --threads 2
    python benchmarks/bench_cpu.py --targets onnxruntime tensorrt --backends onnxruntime-cpu openvino
    python benchmarks/bench_cpu.py --models efficientnet_lite0 --bits 8 --batches 1 --breakdown

Artifacts are built here (quantizers calibrated on seeded noise: scales do not change latency;
the accuracy benchmarks use the real pipeline). Each ``dfq-bench`` JSON is kept under
``results/bench_cpu/<cpu>/`` (usable as a ``--baseline``) and its records are merged into
``results/bench_cpu.json`` with a Markdown table. With ``--breakdown`` every record also carries
both models' profile on its runtime (``dfq-bench --breakdown``), summarised per op type in
``results/bench_cpu_breakdown.md`` (on OpenVINO with the int8 share of the quantized model's time).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_label, merge_records, write_markdown  # noqa: E402
from latency import build_model  # noqa: E402

from dfq.common.provenance import machine_info  # noqa: E402
from dfq.export.onnx_export import export_onnx  # noqa: E402
from dfq.pipeline.calibrate import calibrate  # noqa: E402
from dfq.export.targets import get_target  # noqa: E402
from dfq.pipeline.quantize import quantize  # noqa: E402


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _bench_one(name, weights, model, calib, target, bits, args, tmp: Path, out_dir: Path, records) -> int:
    """Build one artifact and time it with dfq-bench on every backend; append the records."""
    t0 = time.perf_counter()
    qm = quantize(model, get_target(target).quant_config(bits=bits), calib[:2])
    calibrate(qm, calib, batch_size=8)
    q_path = tmp / f"{name}-{target}-w{bits}a{bits}.onnx"
    export_onnx(qm, q_path, fp_path=q_path.with_name(q_path.stem + ".fp32.onnx"))
    json_path = out_dir / f"{name}-{target}-w{bits}a{bits}.json"
    cmd = ["dfq-bench", str(q_path), "--threads", str(args.threads), "--seconds", str(args.seconds),
           "--out", str(json_path)]
    for backend in args.backends:
        cmd += ["--backend", backend]
    if args.breakdown:
        cmd.append("--breakdown")
    for b in args.batches:
        cmd += ["--batch", str(b)]
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    proc = subprocess.run([sys.executable, "-m", "dfq.bench_cli", *cmd[1:]], text=True)
    if proc.returncode != 0:
        print(f"dfq-bench exited {proc.returncode}", file=sys.stderr)
        return proc.returncode
    result = json.loads(json_path.read_text())
    machine = result.get("machine") or {}
    cpu = cpu_label(machine)
    for r in result["records"]:
        records.append({"kind": "latency", "model": name, "weights": weights, "bits": f"W{bits}A{bits}",
                        "target": target, **r, "cpu": cpu, "peer": None, "peer_speedup": None,
                        "commit": result.get("git_commit"), "machine": machine,
                        "command": " ".join(cmd).replace(str(tmp), "TMP"), "wall_s": time.perf_counter() - t0})
    return 0


def breakdown_markdown(records: list[dict]) -> str:
    """Per record with a profile: the profiled time per op type of the FP32 and quantized models."""
    lines = ["# Where the time goes: profiled time per op type, FP32 vs quantized (dfq-bench --breakdown)", ""]
    for r in records:
        b = r.get("breakdown")
        if not b:
            continue
        share = f", int8 share of the quantized time {100 * b['int8_fraction']:.0f}%" if "int8_fraction" in b else ""
        lines += [f"## {r['model']} {r['bits']} {r['target']} flavour on {r['backend']}, batch {r['batch']}, "
                  f"{r['threads']} threads ({r['cpu']}, {r['commit']}): speedup {r['speedup']:.2f}x{share}", "",
                  "| op type | FP32 ms | quantized ms | ratio |", "| --- | --- | --- | --- |"]
        for op in dict.fromkeys([*b["op_ms_fp32"], *b["op_ms_quantized"]]):
            fp, q = b["op_ms_fp32"].get(op, 0.0), b["op_ms_quantized"].get(op, 0.0)
            lines.append(f"| {op} | {fp:.3f} | {q:.3f} | {fp / q:.2f}x |" if q else f"| {op} | {fp:.3f} | 0 | - |")
        if "exec_ms_quantized" in b:
            lines += ["", "Quantized model's kernels (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                      b["exec_ms_quantized"].items())]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet20", "efficientnet_lite0"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--targets", nargs="+", default=["onnxruntime"], help="artifact flavours to build")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime-cpu", "openvino"])
    ap.add_argument("--breakdown", action="store_true", help="profile both models per op type (dfq-bench --breakdown)")
    args = ap.parse_args(argv)
    out_dir = HERE / "results" / "bench_cpu" / _slug(cpu_label(machine_info()))
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.models:
        model, spec, weights = build_model(name)
        calib = torch.randn(32, *spec.input_size, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as tmp:
            for target in args.targets:
                for bits in args.bits:
                    rc = _bench_one(name, weights, model, calib, target, bits, args, Path(tmp), out_dir, records)
                    if rc:
                        return rc
    merged = merge_records(HERE / "results" / "bench_cpu.json", records,
                           key=("model", "bits", "target", "backend", "batch", "threads", "cpu"))
    write_markdown(HERE / "results" / "bench_cpu.md", merged,
                   ["model", "weights", "bits", "target", "backend", "batch", "threads", "fp_ms", "int_ms", "speedup",
                    "cpu", "commit"], "dfq-bench on the CPU: quantized ONNX vs its FP32 ONNX, same process, interleaved")
    if args.breakdown:
        (HERE / "results" / "bench_cpu_breakdown.md").write_text(breakdown_markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
