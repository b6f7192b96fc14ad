"""Where a result came from: the command, the code's commit, the machine (CPU flags decide int8 speed)."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
from importlib.metadata import version
import sys
from pathlib import Path

import onnx
import onnxruntime
import torch


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
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:])
