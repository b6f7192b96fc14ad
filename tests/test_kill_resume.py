"""Issue 5: a run killed with SIGKILL during fine-tuning, resumed with the same command, ends
with the same ONNX bytes as an uninterrupted run (tiny ResNet-20, random weights, CPU)."""
import json
import os
import signal
import subprocess
import sys

import torch

DRIVER = r"""
import json, os, signal, sys, torch
torch.set_num_threads(1)
import dfq.common.files as files
from dfq.job import ExportJob
from dfq.run import run_export
args = json.loads(sys.argv[1])
if args["kill_in_write"]:
    # a real SIGKILL at a fixed point, not a timed race: halfway through that many-th file write
    # (a fine-tuning checkpoint; one is written every step here), its temporary file half written
    write, writes = files._write_and_sync, []
    def write_then_die(fd, data):
        writes.append(1)
        if len(writes) == args["kill_in_write"]:
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write(fd, data)
    files._write_and_sync = write_then_die
job = ExportJob(model=args["model"], out=args["out"], method="acq", bits=4, threads=1, latency_seconds=0.05,
                progress=False, resume=args["resume"], force=args["force"],
                synth_overrides={"num_images": 24, "batch_size": 24, "steps": 2},
                finetune_overrides={"steps": 40, "batch": 8, "warmup_steps": 4, "latent": 16,
                                    "checkpoint_seconds": 0.0})
run_export(job, log=lambda m: print(m, flush=True))
"""


def _checkpoint(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    model = get_spec("resnet20").build()
    path = tmp_path / "resnet20-kill.pth"
    torch.save(model.state_dict(), path)
    return path


def _cmd(model, out, resume=False, force=False, kill_in_write=0):
    return [sys.executable, "-c", DRIVER, json.dumps({"model": str(model), "out": str(out), "resume": resume,
                                                       "force": force, "kill_in_write": kill_in_write})]


def test_sigkill_during_finetuning_then_resume_gives_identical_onnx(tmp_path):
    model = _checkpoint(tmp_path)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(model, ref_dir / "m.onnx"), check=True, env=env, capture_output=True)

    ckpt = run_dir / "m.finetune.ckpt"
    killed = subprocess.run(_cmd(model, run_dir / "m.onnx", kill_in_write=12), env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout.decode()[-2000:] + killed.stderr.decode()[-2000:]
    assert ckpt.exists() and not (run_dir / "m.onnx").exists()
    # the kill left the half-written temporary file beside the intact checkpoint of the step before;
    # the next run of the command removes it
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    # the same command without --resume refuses to clobber the checkpoint
    again = subprocess.run(_cmd(model, run_dir / "m.onnx"), env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr

    resumed = subprocess.run(_cmd(model, run_dir / "m.onnx", resume=True), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed fine-tuning at step" in resumed.stdout
    assert (run_dir / "m.onnx").read_bytes() == (ref_dir / "m.onnx").read_bytes()
    assert not ckpt.exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    rep = json.loads((run_dir / "m.report.json").read_text())
    assert rep["finetune"]["result"]["resumed_from"] > 0
    ref = json.loads((ref_dir / "m.report.json").read_text())
    # identical report numbers too (timings aside)
    assert rep["fidelity"] == ref["fidelity"] and rep["calibration"] == ref["calibration"]
