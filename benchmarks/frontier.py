"""Accuracy against average bits for one model, from the accuracy records (no new runs).

    python benchmarks/frontier.py --model efficientnet_lite0

Reads ``benchmarks/results/accuracy.json`` and draws, for every record of the model that states its
average bits (``avg_weight_bits``, ``avg_act_bits``: parameter- and MAC-weighted), exported top-1
against average weight bits, marker by average activation bits, the FP32 top-1 as a line; nearby
points share a number on the chart, whose labels are listed beside it. W8A8
records without the fields are every layer at 8 bits, so they are drawn at (8, 8). Writes
``benchmarks/results/<model>.frontier.png`` and ``.md`` (the points as a table).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_markdown  # noqa: E402


def points(records: list[dict], model: str) -> list[dict]:
    out = []
    for r in records:
        if r.get("model") != model or r.get("exit_code", 0) not in (0, 9):
            continue
        w, a = r.get("avg_weight_bits"), r.get("avg_act_bits")
        if w is None and r.get("bits") == "W8A8":
            w = a = 8.0
        if w is None or a is None:
            continue
        out.append({"bits": r["bits"], "method": r["method"], "budget": r["budget"], "seed": r.get("seed"),
                    "options": r.get("options"), "avg_weight_bits": w, "avg_act_bits": a,
                    "top1_fp": r["top1_fp"], "top1_int": r["top1_int"], "drop_points": r["drop_points"],
                    "commit": r.get("commit")})
    return sorted(out, key=lambda p: (p["avg_weight_bits"], p["avg_act_bits"]))


def joined_label(tags: list[str]) -> str:
    """One label for several points: their common leading words, then what differs, e.g.
    ``W4A8 recon --recon-iters (200 / 300)``; ``plain`` where a point adds nothing. One tag is its own label."""
    words = [t.split() for t in tags]
    n = 0
    while all(len(w) > n and w[n] == words[0][n] for w in words):
        n += 1
    rest = list(dict.fromkeys(" ".join(w[n:]) or "plain" for w in words))
    head = " ".join(words[0][:n])
    return head if len(rest) == 1 and rest[0] == "plain" else f"{head} ({' / '.join(rest)})"


def label_groups(pts: list[dict], near: float = 0.6) -> dict[tuple, list[str]]:
    """One label per group of points at the same average weight bits whose top-1 lie within ``near``
    points of the group's first (lowest) point, so that labels of nearby points do not overprint.
    A point's tag names its seed where the seed is not 0 (seed 0 is every record's default)."""
    groups: dict[tuple, list[str]] = {}
    for p in sorted(pts, key=lambda p: (p["avg_weight_bits"], p["top1_int"])):
        tag = (f"{p['bits']} {p['method']}" + (f" seed {p['seed']}" if p.get("seed") else "")
               + (f" {p['options']}" if p["options"] else ""))
        x, y = p["avg_weight_bits"], 100 * p["top1_int"]
        anchor = next((k for k in groups if k[0] == x and abs(k[1] - y) <= near), None)
        groups.setdefault(anchor or (x, y), []).append(tag)
    return groups


def keyed_groups(pts: list[dict]) -> list[tuple[int, tuple, str]]:
    """The label groups numbered from the top of the chart down: ``(number, (x, y), label)``. The chart
    marks each group with its number and lists the labels beside the axes, where long option strings
    cannot push the axes into a sliver."""
    groups = sorted(label_groups(pts).items(), key=lambda kv: (-kv[0][1], kv[0][0]))
    return [(i, xy, joined_label(names)) for i, (xy, names) in enumerate(groups, 1)]


def draw(pts: list[dict], model: str, path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    ax.axhline(100 * pts[0]["top1_fp"], color="grey", ls="--", label="FP32")
    for eight, marker, label in ((True, "o", "8-bit activations"),
                                 (False, "s", "activations below 8 bits (MAC-weighted)")):
        sel = [p for p in pts if (p["avg_act_bits"] >= 7.99) == eight]
        if sel:
            ax.scatter([p["avg_weight_bits"] for p in sel], [100 * p["top1_int"] for p in sel], marker=marker,
                       label=label)
    lines = []
    for n, xy, label in keyed_groups(pts):
        side = 1 if n % 2 else -1  # alternate sides so that the numbers of close groups do not overprint
        ax.annotate(str(n), xy, fontsize=8, xytext=(6 * side, 0), textcoords="offset points", va="center",
                    ha="left" if side > 0 else "right")
        lines.append(textwrap.fill(f"{n}. {label}", 62, subsequent_indent="    "))
    xs = [p["avg_weight_bits"] for p in pts]
    ax.set_xlim(min(xs) - 0.75, max(xs) + 0.75)
    ax.set_xlabel("average weight bits (parameter-weighted)")
    ax.set_ylabel("top-1 of the exported artifact (%)")
    ax.set_title(f"{model}: accuracy vs average bits (data-free, ONNX Runtime)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    key.axis("off")
    key.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=7, transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--records", default=str(HERE / "results" / "accuracy.json"))
    args = ap.parse_args(argv)
    pts = points(json.loads(Path(args.records).read_text()), args.model)
    if not pts:
        print(f"no accuracy records of {args.model} with average bits", file=sys.stderr)
        return 1
    out = HERE / "results" / f"{args.model}.frontier.png"
    draw(pts, args.model, out)
    write_markdown(out.with_suffix(".md"), pts, list(pts[0]), f"{args.model}: accuracy vs average bits")
    print(f"wrote {out} ({len(pts)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
