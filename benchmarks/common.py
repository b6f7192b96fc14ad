"""Helpers shared by the benchmark scripts: result files and the shared data folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("DFQ_SHARED", REPO.parent / "shared"))


def cpu_label(machine: dict) -> str:
    """The processor and its int8 instructions, e.g. ``Intel(R) Xeon(R) Processor avx512_vnni+amx_int8``:
    part of each record's key, so runs on different machines stand side by side."""
    flags = machine.get("cpu_flags") or []
    isa = "+".join(f for f in ("avx512_vnni", "amx_int8") if f in flags) or "no-vnni"
    return f"{machine.get('cpu') or 'unknown CPU'} {isa}"


def merge_records(path: Path, new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Append ``new`` to the JSON list at ``path``, replacing records with the same ``key`` values."""
    old = json.loads(path.read_text()) if path.exists() else []
    fresh = {tuple(r.get(k) for k in key) for r in new}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in fresh] + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return merged


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_markdown(path: Path, records: list[dict], columns: list[str], title: str) -> None:
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    lines.append("")
    lines.append("Each record in the JSON beside this file carries the command, commit and machine.")
    path.write_text("\n".join(lines) + "\n")
