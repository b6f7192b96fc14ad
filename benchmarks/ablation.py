"""Method ablation: every data-free method at the same budget, through the real CLI.

    python benchmarks/ablation.py --model resnet20 --bits 4 --budget fast
    python benchmarks/ablation.py --plot-only

Runs :mod:`accuracy` once per method (records land in ``results/accuracy.json``), then draws
``results/ablation.png`` (top-1 drop of the exported ONNX vs FP, per method and bit width, one panel
per model/budget, onnxruntime target) and ``results/ablation.md`` from every accuracy record with a method.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ["bns", "bns-ft", "gdfq", "dsg", "clusterq", "ddaq", "acq"]


def plot(records: list[dict], png: Path, md: Path) -> None:
    rows = [r for r in records if r.get("method") in METHODS and not r.get("options")]  # default options only
    lines = ["# Data-free method ablation (exported ONNX top-1 vs FP, ONNX Runtime CPU)", "",
             "| model | bits | target | budget | method | steps | top1_fp | top1_int | drop_points | agreement | wall_s | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"], r["target"], r.get("budget", ""),
                                         METHODS.index(r["method"]))):
        lines.append(f"| {r['model']} | {r['bits']} | {r['target']} | {r.get('budget')} | {r['method']} | "
                     f"{r.get('steps', 0)} | {100 * r['top1_fp']:.2f} | {100 * r['top1_int']:.2f} | "
                     f"{r['drop_points']:.2f} | {r['agreement']:.4f} | {r['wall_s']:.0f} | {str(r.get('commit', ''))[:7]} |")
    lines += ["", "Drop in points of top-1 (FP minus exported ONNX). Rows come from different commits (last "
              "column): a method's row is only comparable with rows of the same commit. Commands and machines are "
              "in accuracy.json. The plot beside this file shows the same numbers."]
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    panels = sorted({(r["model"], r.get("budget")) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (model, budget) in zip(axes[0], panels):
        sel = [r for r in rows if r["model"] == model and r.get("budget") == budget and r["target"] == "onnxruntime"]
        bits = sorted({r["bits"] for r in sel})
        width = 0.8 / max(1, len(bits))
        for j, b in enumerate(bits):
            xs, ys = [], []
            for i, m in enumerate(METHODS):
                hit = [r for r in sel if r["bits"] == b and r["method"] == m]
                if hit:
                    xs.append(i + (j - (len(bits) - 1) / 2) * width)
                    ys.append(hit[-1]["drop_points"])
            ax.bar(xs, ys, width=width, label=b)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=30)
        ax.set_ylabel("top-1 drop vs FP (points)")
        ax.set_title(f"{model}, budget {budget}")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--budget", default="fast")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.plot_only:
        for m in args.methods.split(","):
            subprocess.run([sys.executable, str(HERE / "accuracy.py"), "--model", args.model, "--bits", str(args.bits),
                            "--target", args.target, "--method", m, "--budget", args.budget], check=False)
    records = json.loads((RESULTS / "accuracy.json").read_text())
    plot(records, RESULTS / "ablation.png", RESULTS / "ablation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
