"""Issue 6: torch.distributed with gloo on the CPU, 2 processes."""
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dfq.common.distributed import DistInfo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank, world, port, out_dir, method, steps, stop_after, resume, tag):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dfq.pipeline.finetune import FinetuneConfig, finetune
        from dfq.pipeline.generators import GENERATORS
        from dfq.pipeline.recipes import get_recipe
        from tests.test_finetune import SIZE, _setup

        draws = []   # what this rank's generator was fed: noise and labels of every step

        def recording(sample):
            def recording_sample(self, *args):
                z, labels, centres = sample(self, *args)
                draws.append(hashlib.sha256(z.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())
                return z, labels, centres
            return recording_sample

        for cls in GENERATORS.values():
            if "sample" in vars(cls):
                cls.sample = recording(cls.sample)

        teacher, qm = _setup(seed=2)
        if rank == 1:   # DDP must broadcast rank 0's parameters: start rank 1 from different ones
            with torch.no_grad():
                for p in qm.module.parameters():
                    p.add_(0.5)
        cfg = FinetuneConfig(steps=steps, batch=8, warmup_steps=1, latent=16, log_every=1, checkpoint_seconds=0.0)
        info = DistInfo(rank=rank, world=world, local_rank=rank, backend="gloo")
        ckpt = os.path.join(out_dir, "run.ckpt")
        res = finetune(teacher, qm, get_recipe(method), cfg, input_size=SIZE, num_classes=10, progress=False,
                       dist_info=info, checkpoint=ckpt, fingerprint="f", resume=resume, stop_after=stop_after)
        with open(os.path.join(out_dir, f"{tag}.rank{rank}.json"), "w") as f:
            json.dump({"digest": _digest(qm.module), "steps": res.steps, "draws": draws}, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, tag, method="acq", steps=4, stop_after=None, resume=False):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method, steps, stop_after, resume, tag),
             nprocs=2, join=True)
    return [json.loads((tmp_path / f"{tag}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("method", ["acq", "clusterq", "ddaq"])
def test_two_gloo_ranks_stay_in_sync(tmp_path, method):
    r0, r1 = _spawn(tmp_path, "sync", method=method, steps=3)
    assert r0["steps"] == r1["steps"] == 3
    assert r0["digest"] == r1["digest"]            # same parameters on both ranks after training
    assert len(r0["draws"]) == len(r1["draws"]) == 3
    assert not set(r0["draws"]) & set(r1["draws"])   # ... from different samples on each rank
    assert (tmp_path / "run.ckpt").exists()        # written by rank 0 only (one path, no rank suffix)


def test_distributed_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    full.mkdir()
    part.mkdir()
    a = _spawn(full, "a", steps=4)
    _spawn(part, "b", steps=4, stop_after=2)
    c = _spawn(part, "c", steps=4, resume=True)
    assert c[0]["digest"] == c[1]["digest"] == a[0]["digest"]


DRIVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from dfq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_cli_run_only_rank0_writes(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20-dist.pth"
    torch.save(get_spec("resnet20").build().state_dict(), ckpt)
    out = tmp_path / "out"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(ckpt), "--bits", "4", "--method", "gdfq", "--steps", "2", "--budget", "fast", "--batch", "4",
           "--synth-images", "16", "--synth-steps", "1",
           "--out", str(out / "m.onnx"), "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["m.fp32.onnx", "m.onnx", "m.report.json", "m.report.md", "m.sensitivity.png"]
    rep = json.loads((out / "m.report.json").read_text())
    assert rep["finetune"]["processes"] == 2 and rep["finetune"]["global_batch"] == 8
    assert proc.stdout.count("[dfq] wrote") == 1      # one summary: rank 0's


def test_torchrun_low_bits_default_recon_runs_on_every_rank(tmp_path):
    """The default method below W8A8 (recon) under torchrun: synthesis split over the ranks, the
    reconstruction run by each rank on the gathered images, rank 0 alone writing."""
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20-dist.pth"
    torch.save(get_spec("resnet20").build().state_dict(), ckpt)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(ckpt), "--bits", "4", "--budget", "fast", "--synth-images", "16", "--synth-steps", "1",
           "--recon-iters", "3", "--out", str(tmp_path / "out" / "m.onnx"), "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "m.report.json").read_text())
    assert rep["job"]["method"] == "recon" and rep["reconstruction"]["config"]["iterations"] == 3
    assert proc.stdout.count("[dfq] wrote") == 1


def test_backend_is_gloo_on_a_cuda_machine(monkeypatch):
    """dfq's tensors live on the CPU: nccl (CUDA tensors only) would fail at the first all-gather."""
    from dfq.common.distributed import init_from_env

    called = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: called.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = init_from_env()
    assert called == {"backend": "gloo"} and info.backend == "gloo" and (info.rank, info.world) == (1, 2)
