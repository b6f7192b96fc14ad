"""Coverage matrix: every architecture dfq lists, random weights, a tiny budget, both targets.

    python benchmarks/coverage.py                          # the full matrix (about an hour on 2 cores)
    python benchmarks/coverage.py --arch mobilenet_v2 --bits 8

Each cell runs ``dfq-export`` as a user would (a state_dict of the architecture's own constructor
with random weights saved as ``<arch>.pth``, ``--method bns --synth-images 16 --synth-steps 3``) and
records its exit code, the TensorRT rule violations, the agreement with the reference and the
ORT-CPU speedup over the FP32 twin, in ``benchmarks/results/coverage.json`` and ``coverage.md``.
Random weights are the hard case for the agreement check: their logits are nearly tied.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import merge_records, write_markdown  # noqa: E402

from dfq.common.provenance import git_commit, machine_info  # noqa: E402
from dfq.pipeline.models import get_spec, list_archs  # noqa: E402

COLUMNS = ["arch", "bits", "target", "exit_code", "rule_violations", "agreement", "ort_speedup",
           "openvino_speedup", "slower_than_fp32", "wall_s", "commit"]


def save_random_weights(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = get_spec(arch).build()
    path = folder / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return path


def run_cell(ckpt: Path, arch: str, bits: str, target: str, threads: int, folder: Path) -> dict:
    out = folder / f"{arch}-{bits}-{target}.onnx"
    cmd = ["dfq-export", ckpt.name, "--bits", bits, "--target", target, "--method", "bns", "--synth-images", "16",
           "--synth-steps", "3", "--threads", str(threads), "--out", out.name, "--no-progress", "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dfq.cli", *cmd[1:]], cwd=folder, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    report = folder / f"{out.stem}.report.json"
    rep = json.loads(report.read_text()) if report.exists() else {}
    lat = {r["backend"]: r for r in rep.get("latency", []) if r.get("batch") == 1}
    f = rep.get("fidelity", {})
    return {"kind": "coverage", "arch": arch, "bits": bits, "target": target, "exit_code": proc.returncode,
            "error": None if proc.returncode in (0, 9) else proc.stderr.strip().splitlines()[-1:],
            "rule_violations": len(rep.get("rule_violations", [])) if rep else None,
            "agreement": f.get("agreement"), "relative_logit_error": f.get("relative_logit_error"),
            "ort_speedup": lat.get("onnxruntime-cpu", {}).get("speedup"),
            "openvino_speedup": lat.get("openvino", {}).get("speedup"),
            "slower_than_fp32": sorted(k for k, r in lat.items() if r.get("slower_than_fp32")),
            "wall_s": round(wall, 1), "threads": threads,
            "command": " ".join(shlex.quote(c) for c in cmd), "commit": git_commit(), "machine": machine_info()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="architectures (default: all of --list-archs)")
    ap.add_argument("--bits", action="append", help="8 and/or 4 (default: both)")
    ap.add_argument("--target", action="append", help="default: onnxruntime and tensorrt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "coverage.json"))
    args = ap.parse_args(argv)
    archs = args.arch or list_archs()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dfq-coverage-") as tmp:
        folder = Path(tmp)
        for arch in archs:
            ckpt = save_random_weights(arch, folder)
            for bits in args.bits or ["8", "4"]:
                for target in args.target or ["onnxruntime", "tensorrt"]:
                    rec = run_cell(ckpt, arch, bits, target, args.threads, folder)
                    failed += rec["exit_code"] not in (0, 9)
                    print(json.dumps({k: rec[k] for k in COLUMNS}), flush=True)
                    records = merge_records(Path(args.out), [rec], ("arch", "bits", "target"))
                    write_markdown(Path(args.out).with_suffix(".md"), records, COLUMNS,
                                   "Coverage: every listed architecture, random weights, both targets")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
