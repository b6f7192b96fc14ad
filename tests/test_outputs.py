"""What dfq-export leaves on disk: the FP32 twin is the FP model, files get the umask's permissions,
a failed write (disk full) leaves nothing at the output paths, the fine-tuning checkpoint goes once
the ONNX is verified, and logs without a terminal get status lines instead of progress bars."""
import errno
import io
import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import dfq.common.files as files
from dfq.cli import main
from dfq.common.errors import OutputError
from dfq.common.progress import LineProgress, progress
from dfq.job import ExportJob
from dfq.run import run_export
from dfq.pipeline.load import load_model

OUTPUTS = ("r20.onnx", "r20.fp32.onnx", "r20.report.json", "r20.report.md")
TINY = ["--method", "bns", "--synth-images", "24", "--synth-steps", "2", "--threads", "1", "--no-progress"]


def _checkpoint(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    path = tmp_path / "resnet20-test.pth"
    torch.save(get_spec("resnet20").build().state_dict(), path)
    return path


def _job(tmp_path, out="r20.onnx", **kw):
    return ExportJob(model=str(_checkpoint(tmp_path)), out=str(tmp_path / out), threads=1, latency_seconds=0.05,
                     synth_overrides={"num_images": 24, "batch_size": 24, "steps": 2}, progress=False,
                     **{"method": "bns", **kw})


def test_fp32_twin_is_the_fp_model_not_the_finetuned_one(tmp_path):
    # fine-tuning with a large learning rate moves the float weights far from the FP model's
    ft = {"steps": 4, "batch": 8, "warmup_steps": 1, "latent": 16, "lr_weights": 1e-2}
    job = _job(tmp_path, method="acq", bits=4, finetune_overrides=ft)
    report = run_export(job, log=lambda m: None).to_dict()
    assert report["finetune"]["ran"]
    fp = load_model(job.model).model
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fp(x).numpy()
    twin = ort.InferenceSession(str(job.fp_onnx_path), providers=["CPUExecutionProvider"])
    got = twin.run(None, {"input": x.numpy()})[0]
    # BN folding reorders float operations: equal up to float32 rounding, not bit for bit
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_outputs_get_the_umask_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        run_export(_job(tmp_path), log=lambda m: None)
    finally:
        os.umask(old)
    for name in OUTPUTS:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_and_sync", full)
    with pytest.raises(OutputError, match="No space left on device") as err:
        files.atomic_write_bytes(path, b"new")
    assert err.value.exit_code == 6 and str(path) in str(err.value)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize("failing_write", range(len(OUTPUTS)))
def test_disk_full_at_any_output_leaves_nothing_at_the_output_paths(tmp_path, capsys, monkeypatch, failing_write):
    ckpt = _checkpoint(tmp_path)
    real = files._write_and_sync
    calls = []

    def filling_up(fd, data):
        calls.append(len(data))
        if len(calls) == failing_write + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(files, "_write_and_sync", filling_up)
    code = main([str(ckpt), "--out", str(tmp_path / "out" / "r20.onnx"), *TINY])
    err = capsys.readouterr().err
    assert code == 6, err
    assert "No space left on device" in err and "Traceback" not in err
    assert len(calls) == failing_write + 1
    assert not (tmp_path / "out").exists()    # nothing written: the directory dfq created is gone too


def test_checkpoint_is_removed_when_the_engine_cannot_be_built(tmp_path):
    from dfq.common.errors import EngineNotBuiltError
    from dfq.export.tensorrt import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a CUDA device are present: the engine would be built")
    job = _job(tmp_path, out="r20.engine", method="acq", bits=4,
               finetune_overrides={"steps": 2, "batch": 8, "warmup_steps": 1, "latent": 16})
    with pytest.raises(EngineNotBuiltError):
        run_export(job, log=lambda m: None)
    assert (tmp_path / "r20.onnx").exists() and not job.checkpoint_path.exists()
    assert json.loads((tmp_path / "r20.report.json").read_text())["status"] == "engine not built"


def test_line_progress_prints_status_lines_not_bars():
    out = io.StringIO()
    bar = LineProgress(100, "finetune acq", stream=out, interval=3600.0)
    for _ in range(3):
        bar.update(10)
    bar.set_postfix({"kd": "0.12"})
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[-1].startswith("[dfq] finetune acq: 30/100 step (30%)") and lines[-1].endswith("(kd=0.12)")
    assert isinstance(progress(10, "x", stream=io.StringIO()), LineProgress)


def test_line_progress_never_prints_the_same_count_twice():
    # interval 0: every update prints, as a slow step on a loaded machine does with the real interval
    out = io.StringIO()
    bar = LineProgress(100, "finetune acq", stream=out, interval=0.0)
    for _ in range(3):
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["10/100", "20/100", "30/100"]
    assert "left" in lines[0]


def test_log_without_a_terminal_has_no_progress_bar_updates(tmp_path):
    ckpt = _checkpoint(tmp_path)
    cmd = [sys.executable, "-m", "dfq.cli", str(ckpt), "--out", str(tmp_path / "r20.onnx"), "--bits", "4",
           "--method", "acq", "--steps", "6", "--batch", "4", "--synth-images", "24", "--synth-steps", "5",
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    assert proc.stderr.count("[dfq] synthesize[bns]: 5/5 step") == 1
    assert proc.stderr.count("[dfq] finetune acq: 6/6 step") == 1
    assert len(proc.stderr.splitlines()) < 40
