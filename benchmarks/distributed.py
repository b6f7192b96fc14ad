"""1-process vs N-process (torchrun, gloo on the CPU) runs of the same short schedule.

    python benchmarks/distributed.py --model resnet20 --bits 4 --method acq --steps 100 --processes 1 2

Each run is ``torchrun --standalone --nproc_per_node P -m dfq.cli ...`` with ``--val``; the record
holds ``processes``, the global batch, fine-tuning steps per second, images per second, the
exported model's top-1 and the wall time. Every process gets ``cores // P`` torch threads, so the
comparison is at equal hardware. Records go to ``results/distributed.json`` and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import MODELS  # noqa: E402
from common import merge_records, shared_root, write_markdown  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="acq")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    root = shared_root()
    ckpt, data = (root / p for p in MODELS[args.model])
    records = []
    for procs in args.processes:
        threads = max(1, args.cores // procs)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.onnx"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   "-m", "dfq.cli", str(ckpt), "--bits", str(args.bits), "--method", args.method,
                   "--budget", "fast", "--steps", str(args.steps), "--val", str(data), "--threads", str(args.cores),
                   "--out", str(out), "--no-progress"]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode not in (0, 8):
                return proc.returncode
            rep = json.loads(out.with_name("m.report.json").read_text())
        ft = rep["finetune"]
        res = ft["result"]
        rec = {"kind": "distributed", "model": args.model, "bits": rep["quant"]["name"], "method": args.method,
               "processes": procs, "threads_per_process": threads, "steps": res["steps"],
               "batch_per_process": ft["config"]["batch"], "global_batch": ft["global_batch"],
               "steps_per_s": res["steps_per_s"], "images_per_s": res["steps_per_s"] * ft["global_batch"],
               "finetune_s": ft["seconds"], "synthesize_s": rep["timings_s"]["synthesize"],
               "top1_fp": rep["fidelity"]["top1_fp"], "top1_int": rep["fidelity"]["top1_int"],
               "agreement": rep["fidelity"]["agreement"], "wall_s": wall, "commit": rep["commit"],
               "command": " ".join(shlex.quote(c) for c in cmd).replace(str(root), "../shared").replace(tmp, "TMP"),
               "machine": rep["machine"]}
        print(json.dumps({k: rec[k] for k in ("processes", "steps_per_s", "images_per_s", "top1_int", "wall_s")}))
        records.append(rec)
    merged = merge_records(HERE / "results" / "distributed.json", records,
                           key=("model", "bits", "method", "steps", "processes"))
    write_markdown(HERE / "results" / "distributed.md", merged,
                   ["model", "bits", "method", "processes", "threads_per_process", "steps", "global_batch",
                    "steps_per_s", "images_per_s", "synthesize_s", "finetune_s", "top1_int", "wall_s", "commit"],
                   "torchrun (gloo, CPU): the same fine-tuning schedule on 1 and 2 processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
