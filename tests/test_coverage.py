"""Every architecture dfq lists exports on both targets: random weights (the constructors'), a
tiny budget. One fast cell per target runs in the default suite; the whole matrix (every arch x
W8A8/W4A4 x both targets) with ``-m slow``; ``benchmarks/coverage.py`` records it."""
import pytest
import torch

from dfq.job import ExportJob
from dfq.pipeline.models import get_spec, list_archs
from dfq.run import run_export

FAST = {("mobilenet_v3_small", 8)}


def _cells():
    for arch in list_archs():
        for bits in (8, 4):
            for target in ("onnxruntime", "tensorrt"):
                marks = () if (arch, bits) in FAST else (pytest.mark.slow,)
                yield pytest.param(arch, bits, target, marks=marks, id=f"{arch}-W{bits}A{bits}-{target}")


@pytest.mark.parametrize("arch,bits,target", list(_cells()))
def test_listed_architecture_exports(tmp_path, arch, bits, target):
    torch.manual_seed(0)
    ckpt = tmp_path / f"{arch}.pth"
    torch.save(get_spec(arch).build().state_dict(), ckpt)
    job = ExportJob(model=str(ckpt), out=str(tmp_path / "m.onnx"), bits=bits, target=target, method="bns",
                    threads=1, latency_seconds=0.2, progress=False,
                    synth_overrides={"num_images": 16, "batch_size": 16, "steps": 3})
    report = run_export(job, log=lambda m: None).to_dict()
    assert report["status"] == "ok" and report["rule_violations"] == []
    f = report["fidelity"]
    assert f["agreement"] >= 0.999
    ort = [r for r in report["latency"] if r["backend"] == "onnxruntime-cpu"]
    assert ort and ort[0]["speedup"] > 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
