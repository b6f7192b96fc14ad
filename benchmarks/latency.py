"""Latency of dfq's ONNX Runtime artifacts vs their FP32 ONNX and vs ONNX Runtime's own
``quantize_static`` (the peer), measured in one process, interleaved, at fixed threads.

    python benchmarks/latency.py --models resnet18 --bits 8 --batches 1 32 --threads 2

Scales do not change latency, so the quantizers are calibrated on seeded Gaussian noise here
(the accuracy benchmarks use real synthesis). Writes ``benchmarks/results/latency.json`` (a list
of records, replacing those with the same model/bits/batch/threads) and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import merge_records, shared_root, write_markdown  # noqa: E402

from dfq.export.onnx_export import export_onnx  # noqa: E402
from dfq.export.ort_runtime import compare_latency  # noqa: E402
from dfq.pipeline.calibrate import calibrate  # noqa: E402
from dfq.pipeline.models import get_spec  # noqa: E402
from dfq.export.targets import get_target  # noqa: E402
from dfq.pipeline.quantize import quantize  # noqa: E402
from dfq.common.provenance import command_line, git_commit, machine_info  # noqa: E402

REAL_WEIGHTS = {"resnet20": "models/cifar10/resnet20-12fca82f.th",
                "resnet56": "models/cifar10/resnet56-4bfd9763.th",
                "efficientnet_lite0": "models/imagenet/efficientnet-lite0-57934424.pth"}


def build_model(name: str):
    spec = get_spec(name)
    path = shared_root() / REAL_WEIGHTS[name] if name in REAL_WEIGHTS else None
    if path is not None and path.exists():
        from dfq.pipeline.load import load_model

        return load_model(path, name).model, spec, "real"
    torch.manual_seed(0)
    return spec.build().eval(), spec, "random"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "latency.json"))
    args = ap.parse_args(argv)
    from peer_ort import quantize_static_peer

    records = []
    machine = machine_info()
    commit = git_commit()
    for name in args.models:
        model, spec, weights = build_model(name)
        gen = torch.Generator().manual_seed(0)
        calib = torch.randn(32, *spec.input_size, generator=gen)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            fp_path = tmp / "fp.onnx"
            peer_path = None
            for bits in args.bits:
                t0 = time.perf_counter()
                qm = quantize(model, get_target("onnxruntime").quant_config(bits=bits), calib[:2])
                calibrate(qm, calib, batch_size=8)
                q_path = tmp / f"w{bits}.onnx"
                export_onnx(qm, q_path, fp_path=fp_path)
                if not args.no_peer and peer_path is None:
                    peer_path = quantize_static_peer(fp_path, tmp / "peer.onnx", calib[:16].numpy())
                for batch in args.batches:
                    res = compare_latency(str(fp_path), str(q_path), batch=batch, threads=args.threads,
                                          rounds=args.rounds, min_seconds=args.min_seconds)
                    rec = {"kind": "latency", "model": name, "weights": weights, "bits": f"W{bits}A{bits}",
                           "target": "onnxruntime", "backend": "onnxruntime-cpu", "batch": batch,
                           "threads": args.threads, "fp_ms": res["fp"]["median_ms"],
                           "int_ms": res["int"]["median_ms"], "fp_p90_ms": res["fp"]["p90_ms"],
                           "int_p90_ms": res["int"]["p90_ms"], "speedup": res["speedup"]}
                    if peer_path is not None and bits == 8:
                        pres = compare_latency(str(fp_path), str(peer_path), batch=batch, threads=args.threads,
                                               rounds=args.rounds, min_seconds=args.min_seconds)
                        # dfq's artifact and the peer's, timed interleaved in one call: the same FP32
                        # file timed in two calls differed by up to 3% between calls, more than the
                        # difference being measured. peer_speedup = speedup * (dfq ms / peer ms).
                        head = compare_latency(str(peer_path), str(q_path), batch=batch, threads=args.threads,
                                               rounds=args.rounds, min_seconds=args.min_seconds)
                        rec.update(peer="onnxruntime.quantization.quantize_static U8S8 per-channel QDQ",
                                   peer_ms=pres["int"]["median_ms"], peer_fp_ms=pres["fp"]["median_ms"],
                                   peer_speedup_own_fp=pres["speedup"],
                                   dfq_over_peer=head["speedup"],   # peer ms / dfq ms, interleaved
                                   peer_speedup=res["speedup"] / head["speedup"])
                    else:
                        rec.update(peer=None, peer_speedup=None)
                    rec.update(commit=commit, command=command_line(), machine=machine,
                               wall_s=time.perf_counter() - t0)
                    records.append(rec)
                    print(json.dumps({k: rec[k] for k in ("model", "bits", "batch", "fp_ms", "int_ms", "speedup",
                                                          "peer_speedup")}))
    all_records = merge_records(Path(args.out), records, key=("model", "bits", "batch", "threads", "backend"))
    write_markdown(Path(args.out).with_suffix(".md"), all_records,
                   ["model", "weights", "bits", "backend", "batch", "threads", "fp_ms", "int_ms", "speedup",
                    "peer_speedup", "commit"], "Latency: dfq ONNX Runtime artifacts vs FP32 ONNX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
