"""Fidelity records of the cross-check runtimes, read from dfq-export reports (no new runs).

    python benchmarks/fidelity.py --model resnet20 out/r20.report.json [more reports...]

For each report and each runtime the artifact was cross-checked on (``fidelity.cross_checks``, e.g.
``openvino``), appends a ``fidelity`` record (``backend``, ``model``, ``bits``, ``target``,
``agreement`` with that runtime's reference, ``agreement_float_fakequant``, top-1 there and on
ONNX Runtime, images, the CPU and its int8 instructions (``cpu``: part of the key, so runs on
VNNI and AMX machines stand side by side), and the report's command, commit, machine and wall time) to
``benchmarks/results/fidelity.json`` and rewrites ``fidelity.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_label, merge_records, write_markdown  # noqa: E402

COLUMNS = ["backend", "model", "bits", "target", "method", "images", "agreement", "agreement_float_fakequant",
           "reference", "top1", "top1_onnxruntime", "cpu", "commit"]


def records(report: dict, model: str) -> list[dict]:
    f = report["fidelity"]
    out = []
    for name, c in f.get("cross_checks", {}).items():
        if c.get("diagnostic"):
            continue
        out.append({"kind": "fidelity", "backend": name, "model": model, "bits": report["quant"]["name"],
                    "target": report["quant"]["target"], "method": report["job"].get("method"),
                    "images": f["images"], "data": f.get("data"), "agreement": c["agreement"],
                    "agreement_float_fakequant": c.get("agreement_float_fakequant"), "reference": c["reference"],
                    "top1": c.get("top1"), "top1_onnxruntime": f.get("top1_int"),
                    "onnxruntime_agreement": f["agreement"], "cpu": cpu_label(report["machine"]),
                    "command": report["command"],
                    "commit": report["commit"], "machine": report["machine"], "wall_s": report["wall_s"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out", default=str(HERE / "results" / "fidelity.json"))
    args = ap.parse_args(argv)
    new = [r for p in args.reports for r in records(json.loads(Path(p).read_text()), args.model)]
    if not new:
        print("no cross-check results in these reports", file=sys.stderr)
        return 1
    merged = merge_records(Path(args.out), new, key=("backend", "model", "bits", "target", "method", "images", "cpu"))
    write_markdown(Path(args.out).with_suffix(".md"), merged, COLUMNS,
                   "Agreement of the artifact on other runtimes with their reference")
    for r in new:
        print(json.dumps({k: r[k] for k in ("backend", "model", "bits", "agreement", "images")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
