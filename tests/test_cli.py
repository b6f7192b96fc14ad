"""The dfq-export command line: option errors, output protection, the engine message, and one
end-to-end run on a tiny checkpoint (registered under a test-only architecture name)."""
import json
import subprocess
import sys

import pytest
import torch

from dfq.cli import main
from dfq.job import ExportJob
from dfq.common.errors import OutputError, UsageError


def test_bits_outside_supported_is_usage_error(tmp_path, capsys):
    code = main([str(tmp_path / "m.pth"), "--bits", "3", "--out", str(tmp_path / "x.onnx")])
    assert code == UsageError.exit_code
    assert "--bits 3 is not supported" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_unknown_method_and_bad_suffix(tmp_path, capsys):
    assert main([str(tmp_path / "m.pth"), "--method", "magic", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--method 'magic'" in capsys.readouterr().err
    assert main([str(tmp_path / "m.pth"), "--out", str(tmp_path / "x.tflite")]) == 2
    assert ".onnx" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"old")
    job = ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"))
    with pytest.raises(OutputError, match="--force"):
        job.check_outputs()
    assert (tmp_path / "x.onnx").read_bytes() == b"old"
    ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), force=True).check_outputs()


def test_missing_output_directories_are_created(tmp_path):
    created = ExportJob(model="m.pth", out=str(tmp_path / "a" / "b" / "x.onnx")).check_outputs()
    assert (tmp_path / "a" / "b").is_dir() and created == [tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        ExportJob(model="m.pth", out=str(tmp_path / "afile" / "x.onnx")).check_outputs()


def test_engine_output_selects_the_tensorrt_flavour():
    assert ExportJob(model="m.pth", out="r18.engine").target == "tensorrt"
    assert ExportJob(model="m.pth", out="r18.plan").target == "tensorrt"
    assert ExportJob(model="m.pth", out="r18.onnx").target == "onnxruntime"
    with pytest.raises(UsageError, match="TensorRT cannot build"):
        ExportJob(model="m.pth", out="r18.engine", target="onnxruntime")


def test_engine_output_with_onnxruntime_target_exits_2(tmp_path, capsys):
    code = main([str(tmp_path / "m.pth"), "--target", "onnxruntime", "--out", str(tmp_path / "x.engine")])
    assert code == 2 and "--target onnxruntime" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_engine_paths():
    job = ExportJob(model="m.pth", out="dir/r18.engine")
    assert str(job.onnx_path) == "dir/r18.onnx" and str(job.fp_onnx_path) == "dir/r18.fp32.onnx"
    assert str(job.report_path) == "dir/r18.report.json" and str(job.markdown_path) == "dir/r18.report.md"


def _tiny_resnet20_checkpoint(tmp_path):
    from dfq.pipeline.models import get_spec

    torch.manual_seed(0)
    model = get_spec("resnet20").build()
    path = tmp_path / "resnet20-test.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return path


def _job(tmp_path, out, **kw):
    return ExportJob(model=str(_tiny_resnet20_checkpoint(tmp_path)), out=str(tmp_path / out), threads=1,
                     synth_overrides={"num_images": 24, "batch_size": 24, "steps": 2}, latency_seconds=0.1,
                     progress=False, **{"method": "bns", **kw})


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_end_to_end_export_writes_verified_artifacts(tmp_path, target):
    from dfq.run import run_export

    report = run_export(_job(tmp_path, "r20.onnx", target=target), log=lambda m: None).to_dict()
    for name in ("r20.onnx", "r20.fp32.onnx", "r20.report.json", "r20.report.md"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "r20.report.json").read_text())
    assert saved["model"]["arch"] == "resnet20" and saved["model"]["source"]["prefix_stripped"] == "module."
    assert saved["quant"]["layer_bits"]["conv1"] == 8
    bc = saved["calibration"]["bias_correction"]
    assert bc["layers"] == 20 and bc["applied"] == (bc["kl_after"] < bc["kl_before"])
    assert report["fidelity"]["agreement"] >= 0.99
    if target == "onnxruntime":   # measured against ORT's integer arithmetic; the float model kept beside
        assert report["fidelity"]["reference_float_nodes"] == []
        assert 0.9 <= report["fidelity"]["agreement_float_fakequant"] <= 1.0
    assert saved["rule_violations"] == []
    assert saved["latency"][0]["speedup"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_engine_without_tensorrt_writes_onnx_and_explains(tmp_path):
    from dfq.common.errors import EngineNotBuiltError
    from dfq.export.tensorrt import tensorrt_status
    from dfq.run import run_export

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a CUDA device are present: the engine would be built")
    with pytest.raises(EngineNotBuiltError) as err:
        run_export(_job(tmp_path, "r20.engine", target="tensorrt"), log=lambda m: None)
    msg = str(err.value)
    assert "NOT built" in msg and "trtexec --onnx=" in msg and str(tmp_path / "r20.onnx") in msg
    assert ("TensorRT is not importable" in msg) or ("no CUDA device" in msg)
    assert err.value.exit_code == 9
    assert (tmp_path / "r20.onnx").exists() and not (tmp_path / "r20.engine").exists()
    assert json.loads((tmp_path / "r20.report.json").read_text())["engine"]["status"] == "not built"


def test_cli_subprocess_exit_codes(tmp_path):
    exe = [sys.executable, "-m", "dfq.cli"]
    missing = subprocess.run(exe + [str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x.onnx")],
                             capture_output=True, text=True)
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.onnx").exists()
    archs = subprocess.run(exe + ["--list-archs"], capture_output=True, text=True)
    assert archs.returncode == 0 and "resnet20" in archs.stdout and "efficientnet_lite0" in archs.stdout


def test_end_to_end_acq_fine_tunes_and_cleans_its_checkpoint(tmp_path):
    from dfq.run import run_export

    job = _job(tmp_path, "r20.onnx", method="acq", bits=4,
               finetune_overrides={"steps": 3, "batch": 8, "warmup_steps": 1, "latent": 16})
    report = run_export(job, log=lambda m: None).to_dict()
    ft = report["finetune"]
    assert ft["ran"] and ft["recipe"]["name"] == "acq" and ft["result"]["steps"] == 3
    kd = ft["heldout_kd"]   # data-free health check on held-out synthetic images, before and after
    assert kd["images"] == 8 and kd["before"] > 0 and kd["after"] > 0 and kd["before"] != kd["after"]
    assert report["fidelity"]["agreement"] >= 0.99
    assert not job.checkpoint_path.exists()   # removed after success


def test_leftover_checkpoint_needs_resume_or_force(tmp_path):
    job = ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), method="acq")
    job.checkpoint_path.write_bytes(b"partial")
    with pytest.raises(OutputError, match="--resume"):
        job.check_outputs()
    ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), method="acq", resume=True).check_outputs()
    with pytest.raises(UsageError, match="does not fine-tune"):
        ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), method="bns", steps=10)


def test_artifact_failing_its_check_is_moved_aside(tmp_path, monkeypatch):
    # a verification failure (here: an agreement threshold no artifact can meet) exits 8, keeps the
    # report that says why, and leaves nothing at the ONNX path a deployment would pick up
    import dfq.stages
    from dfq.common.errors import VerificationError
    from dfq.run import run_export

    monkeypatch.setattr(dfq.stages, "MIN_AGREEMENT", 1.01)
    with pytest.raises(VerificationError) as err:
        run_export(_job(tmp_path, "r20.onnx"), log=lambda m: None)
    assert err.value.exit_code == 8 and "r20.rejected.onnx" in str(err.value)
    assert not (tmp_path / "r20.onnx").exists() and (tmp_path / "r20.rejected.onnx").stat().st_size > 0
    saved = json.loads((tmp_path / "r20.report.json").read_text())
    assert saved["status"] == "rejected" and saved["outputs"]["onnx"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_machine_gives_identical_artifact_and_numbers(tmp_path):
    from dfq.run import run_export

    reports = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        reports.append(run_export(_job(tmp_path, f"{sub}/r20.onnx"), log=lambda m: None).to_dict())
    assert (tmp_path / "a/r20.onnx").read_bytes() == (tmp_path / "b/r20.onnx").read_bytes()
    assert (tmp_path / "a/r20.fp32.onnx").read_bytes() == (tmp_path / "b/r20.fp32.onnx").read_bytes()
    for key in ("fidelity", "calibration", "quant", "synthesis"):
        a, b = reports[0][key], reports[1][key]
        if key == "synthesis":
            a, b = {k: v for k, v in a.items() if k != "seconds"}, {k: v for k, v in b.items() if k != "seconds"}
        assert a == b, key


def test_finetuning_that_worsens_the_heldout_kl_is_not_exported(tmp_path, monkeypatch):
    # the data-free criterion says fine-tuning made things worse -> the calibrated model is exported,
    # byte for byte the one a run without fine-tuning exports
    import dfq.stages as C
    import dfq.stages as F
    from dfq.run import run_export

    ft = {"steps": 3, "batch": 8, "warmup_steps": 1, "latent": 16}
    values = iter([0.1, 0.2])
    monkeypatch.setattr(C, "heldout_kd", lambda *a, **k: next(values))
    (tmp_path / "a").mkdir()
    rep = run_export(_job(tmp_path, "a/r20.onnx", method="acq", bits=4, finetune_overrides=ft),
                     log=lambda m: None).to_dict()
    assert rep["finetune"]["exported"] == "calibrated (before fine-tuning)"
    assert rep["finetune"]["result"]["steps"] == 3

    class _NoTraining:
        def to_dict(self):
            return {"steps": 0}

    monkeypatch.setattr(C, "heldout_kd", lambda *a, **k: 0.1)
    monkeypatch.setattr(F, "finetune", lambda *a, **k: _NoTraining())
    (tmp_path / "b").mkdir()
    run_export(_job(tmp_path, "b/r20.onnx", method="acq", bits=4, finetune_overrides=ft), log=lambda m: None)
    assert (tmp_path / "a/r20.onnx").read_bytes() == (tmp_path / "b/r20.onnx").read_bytes()


def test_keep_8bit_patterns(tmp_path, capsys):
    from dfq.cli import _layer_policy
    from dfq.run import run_export

    assert _layer_policy(None) is None
    assert _layer_policy(["layer1.*"]) == ("@first", "@last", "layer1.*")
    assert _layer_policy(["none", "layer1.*"]) == ("layer1.*",)
    ckpt = _tiny_resnet20_checkpoint(tmp_path)
    # a pattern that names no layer is a usage error before any work, and nothing is written
    code = main([str(ckpt), "--bits", "4", "--keep-8bit", "layer9.*", "--out", str(tmp_path / "x.onnx"),
                 "--method", "bns", "--no-progress"])
    assert code == UsageError.exit_code
    assert "--keep-8bit 'layer9.*' matches no conv/linear layer" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    report = run_export(_job(tmp_path, "w4.onnx", bits=4, keep_8bit=("@first", "@last", "layer3.2.*")),
                        log=lambda m: None).to_dict()
    bits = report["quant"]["layer_bits"]
    assert bits["layer3.2.conv1"] == bits["layer3.2.conv2"] == bits["conv1"] == bits["linear"] == 8
    assert bits["layer3.1.conv2"] == 4


def test_orphaned_temporaries_of_a_killed_run_are_removed(tmp_path):
    for name in (".x.onnx.abc123.tmp", ".x.finetune.ckpt.zz9.tmp", ".other.onnx.q1.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    ExportJob(model="m.pth", out=str(tmp_path / "x.onnx")).check_outputs()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.onnx.q1.tmp"]


def test_equalize_option_reaches_the_quantized_model_and_the_report(tmp_path):
    from dfq.cli import build_parser, job_from_args
    from dfq.run import run_export

    ckpt = _tiny_resnet20_checkpoint(tmp_path)
    args = [str(ckpt), "--bits", "4", "--out", str(tmp_path / "x.onnx")]
    assert not job_from_args(build_parser().parse_args(args)).equalize
    assert job_from_args(build_parser().parse_args(args + ["--equalize"])).equalize
    report = run_export(_job(tmp_path, "eq.onnx", bits=4, equalize=True), log=lambda m: None).to_dict()
    pairs = {(e["producer"], e["consumer"]) for e in report["quant"]["equalized"]}
    assert pairs == {(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2") for s in (1, 2, 3) for b in range(3)}
    assert report["quant"]["config"]["equalize"] is True
    assert report["fidelity"]["agreement"] >= 0.99


def test_calibration_option_pins_the_activation_range_rule(tmp_path):
    from dfq.cli import build_parser, job_from_args
    from dfq.run import run_export

    args = [str(tmp_path / "m.pth"), "--out", str(tmp_path / "x.onnx")]
    assert job_from_args(build_parser().parse_args(args)).calibration == "auto"
    assert job_from_args(build_parser().parse_args(args + ["--calibration", "minmax"])).calibration == "minmax"
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--calibration", "entropy"])
    with pytest.raises(UsageError, match="--calibration 'entropy' is unknown"):
        ExportJob(model="m.pth", out=str(tmp_path / "x.onnx"), calibration="entropy")
    auto = run_export(_job(tmp_path, "auto.onnx"), log=lambda m: None).to_dict()["calibration"]
    assert set(auto["kl_by_method"]) == {"minmax", "percentile", "mse"}
    report = run_export(_job(tmp_path, "p.onnx", calibration="percentile"), log=lambda m: None).to_dict()
    assert report["calibration"]["method"] == "percentile"
    assert report["calibration"]["kl_by_method"] == {}          # nothing scored: the rule was given
    assert report["quant"]["config"]["calibration"] == "percentile"
    assert "- calibration: `percentile` (pinned with --calibration" in (tmp_path / "p.report.md").read_text()


@pytest.mark.parametrize("method, reconstruction_ratio", [("recon", True), ("bns", False), ("acq-recon", False)])
def test_bias_correction_allows_a_bounded_kl_rise_only_after_a_plain_reconstruction(tmp_path, monkeypatch, method,
                                                                                    reconstruction_ratio):
    import dfq.stages as S
    from dfq.pipeline.bias_correction import RECONSTRUCTION_KL_RATIO
    from dfq.run import run_export

    seen = []
    real = S.bias_correct
    monkeypatch.setattr(S, "bias_correct", lambda *a, **kw: seen.append(kw["max_kl_ratio"]) or real(*a, **kw))
    extra = {"reconstruct_overrides": {"iterations": 2}} if "recon" in method else {}
    if method == "acq-recon":
        extra.update(steps=2, finetune_overrides={"batch": 8})
    report = run_export(_job(tmp_path, "m.onnx", bits=4, method=method, **extra), log=lambda m: None).to_dict()
    expected = RECONSTRUCTION_KL_RATIO if reconstruction_ratio else 1.0
    assert RECONSTRUCTION_KL_RATIO > 1.0 and seen == [expected]
    assert report["calibration"]["bias_correction"]["max_kl_ratio"] == expected


def test_an_undone_bias_correction_leaves_the_artifact_as_without_it(tmp_path, monkeypatch):
    """A correction the held-out KL rejects is undone exactly: the exported weights and biases are
    those of the same run with ``--no-bias-correction``."""
    import onnx
    from onnx import numpy_helper

    import dfq.pipeline.bias_correction as cal
    from dfq.run import run_export

    kls = iter([1.0, 2.0])
    monkeypatch.setattr(cal, "output_kl", lambda fp, q: next(kls))
    undone = run_export(_job(tmp_path, "undone.onnx", bits=4), log=lambda m: None).to_dict()
    run_export(_job(tmp_path, "off.onnx", bits=4, bias_correction=False), log=lambda m: None)
    assert undone["calibration"]["bias_correction"]["applied"] is False

    def weights(name):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / name)).graph.initializer}

    a, b = weights("undone.onnx"), weights("off.onnx")
    assert a.keys() == b.keys() and len(a) > 20
    assert all((a[k] == b[k]).all() for k in a)
