"""Run reports: provenance (command, commit, machine, versions) and JSON/Markdown rendering."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def git_commit() -> str:
    """The dfq source tree's commit (with ``-dirty`` when it has uncommitted changes), else the
    installed version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        # benchmark result files change while benchmarks run; they are not source
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a checkout
        from importlib.metadata import version

        try:
            return "dfq-" + version("dfq")
        except Exception:  # noqa: BLE001
            return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide int8 speed on ONNX Runtime (VNNI doubles int8 throughput)."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:])


def to_json(report: dict) -> bytes:
    return (json.dumps(report, indent=2, sort_keys=False, default=str) + "\n").encode()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def to_markdown(r: dict) -> str:
    """A short human summary of an export report."""
    lines = [f"# dfq export: {r['model']['arch']} {r['quant']['name']} ({r['quant']['target']})", ""]
    lines.append(f"- command: `{r['command']}`")
    lines.append(f"- commit: `{r['commit']}`, machine: {r['machine']['cpu']} ({r['machine']['cores']} cores)")
    lines.append(f"- artifact: `{r['outputs']['onnx']}` (FP32 twin: `{r['outputs']['fp_onnx']}`)")
    lines.append(f"- synthetic data: method `{r['synthesis']['method']}`, {r['synthesis']['num_images']} images, "
                 f"{r['synthesis']['seconds']:.0f} s")
    lines.append(f"- calibration: `{r['calibration']['method']}` (KL by method: "
                 + ", ".join(f"{k} {v:.4g}" for k, v in r["calibration"]["kl_by_method"].items()) + ")")
    lines.append(f"- numerics: {r['quant']['numerics']}")
    lines.append(f"- layers kept at 8 bits: {', '.join(r['quant']['layers_at_8bit']) or 'none'}")
    lines.append(f"- wall time: {r['wall_s']:.0f} s")
    lines.append("")
    f = r["fidelity"]
    lines.append("| check | value |")
    lines.append("| --- | --- |")
    lines.append(f"| images ({f['data']}) | {f['images']} |")
    lines.append(f"| agreement exported ONNX vs {f.get('reference', 'fake-quant model')} (top-1) | {_pct(f['agreement'])} |")
    if "agreement_float_fakequant" in f:
        lines.append(f"| agreement exported ONNX vs fake-quant model (float) (top-1) | {_pct(f['agreement_float_fakequant'])} |")
    lines.append(f"| max / mean abs logit diff | {f['max_abs_logit_diff']:.4g} / {f['mean_abs_logit_diff']:.3g} |")
    lines.append(f"| agreement exported ONNX vs FP (top-1) | {_pct(f['agreement_with_fp'])} |")
    if "top1_fp" in f:
        lines.append(f"| top-1 FP / fake-quant / exported | {_pct(f['top1_fp'])} / {_pct(f['top1_fakequant'])} / "
                     f"{_pct(f['top1_int'])} |")
        lines.append(f"| drop (points) | {f['top1_drop_points']:.2f} |")
    for lat in r.get("latency", []):
        lines.append(f"| ORT latency batch {lat['batch']}, {lat['threads']} threads: FP32 / quantized median | "
                     f"{lat['fp']['median_ms']:.2f} / {lat['int']['median_ms']:.2f} ms ({lat['speedup']:.2f}x) |")
    if r.get("engine"):
        lines.append(f"| TensorRT engine | {r['engine'].get('status')} |")
    lines.append("")
    return "\n".join(lines)
