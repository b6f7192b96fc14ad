"""dfq-bench / dfq-build / export.tensorrt helpers: ORT backend end to end on a tiny model, the
result schema, speedup gates, baseline logic (pure functions), clear exit-9 errors where a
backend is missing, FP16 conversion, engine-inspector parsing. Tests that need TensorRT and a
CUDA GPU are marked ``tensorrt`` and skip otherwise."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dfq import bench_cli, build_cli
from dfq.common.errors import BackendUnavailableError, EngineNotBuiltError, SpeedupError, UsageError, VerificationError
from dfq.export import bench
from dfq.export import tensorrt as trt_mod
from dfq.export.bench import (RECORD_FIELDS, SCHEMA, check_min_speedup, compare_to_baseline, default_fp_path,
                              resolve_fp_path)
from dfq.export.runtimes import make_record
from dfq.export.tensorrt import convert_to_fp16, onnx_input_shape, summarize_engine_layers, trtexec_command
from tests.tiny import tiny_images, tiny_resnet

torch.set_num_threads(1)
TRT_OK, TRT_WHY = trt_mod.tensorrt_status()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a CUDA GPU: {TRT_WHY}")
FAST = ["--iterations", "4", "--warmup", "1", "--threads", "1"]


def _export(tmp, target):
    from dfq.export.onnx_export import export_onnx
    from dfq.pipeline.calibrate import calibrate
    from dfq.pipeline.quantize import quantize
    from tests.tiny import qconfig

    qm = quantize(tiny_resnet(0), qconfig(bits=8, target=target), tiny_images(2))
    calibrate(qm, tiny_images(32, seed=5))
    q, fp = tmp / f"{target}.onnx", tmp / f"{target}.fp32.onnx"
    export_onnx(qm, q, fp_path=fp)
    return q, fp


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"onnxruntime": (qdq, fp32), "tensorrt": (qdq, fp32)} of the tiny ResNet (16x16 input)."""
    d = tmp_path_factory.mktemp("bench")
    return {t: _export(d, t) for t in ("onnxruntime", "tensorrt")}


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# --- ORT backend end to end -----------------------------------------------------------------------

def test_ort_end_to_end_writes_schema(models, tmp_path, capsys):
    q, fp = models["onnxruntime"]
    out = tmp_path / "res" / "bench.json"
    rc = bench_cli.main([str(q), "--batch", "1", "--batch", "2", *FAST, "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "speedup" in stdout and "onnxruntime-cpu" in stdout
    r = json.loads(out.read_text())
    assert r["schema"] == SCHEMA == "dfq-bench/1"
    assert r["command"].startswith("dfq-bench ") and "--batch 2" in r["command"]
    assert r["git_commit"] and isinstance(r["machine"], dict) and "cpu" in r["machine"]
    assert r["models"]["fp"]["path"] == str(fp)  # found beside the quantized model
    assert len(r["models"]["int"]["sha256"]) == 64
    assert r["settings"]["threads"] == 1 and r["settings"]["iterations"] == 4 and r["settings"]["input_shape"] == [3, 16, 16]
    assert [(x["backend"], x["batch"]) for x in r["records"]] == [("onnxruntime-cpu", 1), ("onnxruntime-cpu", 2)]
    for rec in r["records"]:
        assert set(RECORD_FIELDS) <= set(rec)
        assert rec["threads"] == 1 and rec["fp_iterations"] >= 4 and rec["int_iterations"] >= 4
        assert 0 < rec["fp_ms"] <= rec["fp_p90_ms"] and 0 < rec["int_ms"] <= rec["int_p90_ms"]
        assert rec["speedup"] == pytest.approx(rec["fp_ms"] / rec["int_ms"])
        assert rec["int_throughput"] == pytest.approx(rec["batch"] * 1e3 / rec["int_ms"])
    assert r["checks"] == {"min_speedup": None, "baseline": None} and r["passed"] is True
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # atomic write left no temp file


def test_min_speedup_pass_and_fail(models, tmp_path, capsys):
    q, fp = models["onnxruntime"]
    assert bench_cli.main([str(q), "--fp", str(fp), *FAST, "--min-speedup", "1e-6"]) == 0
    assert "min speedup" in capsys.readouterr().out
    out = tmp_path / "fail.json"
    rc = bench_cli.main([str(q), *FAST, "--min-speedup", "1e6", "--out", str(out)])
    assert rc == SpeedupError.exit_code == VerificationError.exit_code == 8
    err = capsys.readouterr().err
    assert "below --min-speedup" in err and "onnxruntime-cpu batch 1" in err and "Traceback" not in err
    r = json.loads(out.read_text())  # written before failing, for the CI artifact
    assert r["passed"] is False and r["checks"]["min_speedup"]["failures"][0]["batch"] == 1


def test_cli_baseline_regression_and_bad_baseline(models, tmp_path, capsys):
    q, _ = models["onnxruntime"]
    old = {"schema": SCHEMA, "records": [{"backend": "onnxruntime-cpu", "batch": 1, "speedup": 1e9}]}
    base = tmp_path / "old.json"
    base.write_text(json.dumps(old))
    assert bench_cli.main([str(q), *FAST, "--baseline", str(base), "--max-regression", "0.2"]) == 8
    captured = capsys.readouterr()
    assert "REGRESSED" in captured.out and "regressed more than 20%" in captured.err
    old["records"][0]["speedup"] = 1e-9
    base.write_text(json.dumps(old))
    assert bench_cli.main([str(q), *FAST, "--baseline", str(base), "--batch", "1", "--batch", "2"]) == 0
    assert "not in the baseline" in capsys.readouterr().out  # batch 2: reported, not failed
    base.write_text(json.dumps({"schema": "something-else"}))
    assert bench_cli.main([str(q), *FAST, "--baseline", str(base)]) == UsageError.exit_code
    assert "not a dfq-bench/1 result" in capsys.readouterr().err
    assert bench_cli.main([str(q), *FAST, "--max-regression", "0.1"]) == 2  # needs --baseline


# --- pure check logic -----------------------------------------------------------------------------

def _rec(backend, batch, speedup):
    return make_record(backend, batch, 1, {"median_ms": speedup, "p90_ms": speedup, "iterations": 3},
                       {"median_ms": 1.0, "p90_ms": 1.0, "iterations": 3})


def test_make_record_fields():
    r = make_record("onnxruntime-cpu", 32, 2, {"median_ms": 10.0, "p90_ms": 12.0, "iterations": 5},
                    {"median_ms": 4.0, "p90_ms": 5.0, "iterations": 6})
    assert r["speedup"] == 2.5 and r["fp_throughput"] == 3200.0 and r["int_throughput"] == 8000.0
    assert (r["fp_p90_ms"], r["int_p90_ms"], r["threads"], r["int_iterations"]) == (12.0, 5.0, 2, 6)


def test_check_min_speedup():
    recs = [_rec("onnxruntime-cpu", 1, 2.0), _rec("onnxruntime-cpu", 32, 1.2), _rec("tensorrt", 1, float("nan"))]
    res = check_min_speedup(recs, 1.5)
    assert not res["passed"] and [(f["backend"], f["batch"]) for f in res["failures"]] == [
        ("onnxruntime-cpu", 32), ("tensorrt", 1)]
    assert check_min_speedup(recs[:1], 2.0)["passed"]  # equal passes


def test_baseline_pass_fail_missing():
    old = [_rec("onnxruntime-cpu", 1, 2.0), _rec("onnxruntime-cpu", 32, 3.0), _rec("tensorrt", 1, 4.0)]
    new = [_rec("onnxruntime-cpu", 1, 1.85), _rec("onnxruntime-cpu", 32, 2.6), _rec("onnxruntime-cuda", 1, 1.0)]
    res = compare_to_baseline(new, old, 0.10)
    by = {(c["backend"], c["batch"]): c for c in res["compared"]}
    assert by[("onnxruntime-cpu", 1)]["passed"]  # 1.85 >= 2.0 * 0.9
    assert not by[("onnxruntime-cpu", 32)]["passed"]  # 2.6 < 3.0 * 0.9
    assert by[("onnxruntime-cpu", 32)]["limit"] == pytest.approx(2.7)
    assert by[("onnxruntime-cpu", 32)]["change"] == pytest.approx(2.6 / 3.0 - 1)
    assert res["missing_in_baseline"] == [{"backend": "onnxruntime-cuda", "batch": 1}]
    assert res["not_measured"] == [{"backend": "tensorrt", "batch": 1}]
    assert [(f["backend"], f["batch"]) for f in res["failures"]] == [("onnxruntime-cpu", 32)]
    assert res["passed"] is False
    # only missing records: reported, not failed; faster than before passes; exact limit passes
    assert compare_to_baseline(new[2:], old, 0.1)["passed"]
    assert compare_to_baseline([_rec("tensorrt", 1, 9.0)], old, 0.0)["passed"]
    assert compare_to_baseline([_rec("tensorrt", 1, 3.0)], old, 0.25)["passed"]
    assert not compare_to_baseline([_rec("tensorrt", 1, 3.99)], old, 0.0)["passed"]
    with pytest.raises(UsageError):
        compare_to_baseline(new, old, 1.0)


# --- missing backends (exit 9) --------------------------------------------------------------------

def test_missing_tensorrt_exit_9(models, capsys, monkeypatch):
    q, _ = models["tensorrt"]
    from dfq.export.runtimes import tensorrt as trt_runtime

    monkeypatch.setattr(trt_runtime, "tensorrt_status",
                        lambda: (False, "no CUDA device is visible (torch.cuda.is_available() is False)"))
    assert bench_cli.main([str(q), *FAST, "--backend", "onnxruntime-cpu", "--backend", "tensorrt"]) == 9
    err = capsys.readouterr().err
    assert "tensorrt backend cannot run here" in err and "no CUDA device" in err and "dfq-build" in err
    assert "Traceback" not in err
    assert issubclass(BackendUnavailableError, EngineNotBuiltError) and BackendUnavailableError.exit_code == 9


@pytest.mark.skipif(TRT_OK, reason="TensorRT and a CUDA device are present")
def test_missing_tensorrt_real_message(models, capsys):
    q, _ = models["tensorrt"]
    assert bench_cli.main([str(q), *FAST, "--backend", "tensorrt"]) == 9
    err = capsys.readouterr().err
    assert ("TensorRT is not importable" in err) or ("no CUDA device" in err)


def test_missing_cuda_ep_exit_9(models, capsys, monkeypatch):
    q, _ = models["onnxruntime"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert bench_cli.main([str(q), *FAST, "--backend", "onnxruntime-cuda"]) == 9
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider" in err and "onnxruntime-gpu" in err


def test_cuda_ep_cpu_fallback_is_refused(models, monkeypatch):
    """ORT falls back to the CPU when the CUDA provider cannot start: never report that as CUDA."""
    q, _ = models["onnxruntime"]
    from dfq.export.runtimes import onnxruntime as ort_runtimes

    class FakeSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_runtimes, "make_session", lambda *a, **k: FakeSession())
    with pytest.raises(BackendUnavailableError, match="fell back"):
        bench.run_bench(q, backends=["onnxruntime-cuda"], threads=1, budget=bench.Budget(warmup=0, iterations=1))


def test_dfq_build_without_tensorrt(models, tmp_path, capsys, monkeypatch):
    q, _ = models["tensorrt"]
    monkeypatch.setattr(trt_mod, "tensorrt_status", lambda: (False, "TensorRT is not importable (test)"))
    engine = tmp_path / "m.engine"
    assert build_cli.main([str(q), "--out", str(engine), "--max-batch", "8", "--opt-batch", "4"]) == 9
    err = capsys.readouterr().err
    assert "NOT built" in err and "TensorRT is not importable" in err
    assert f"trtexec --onnx={q}" in err and "--stronglyTyped" in err and "--maxShapes=input:8x3x16x16" in err
    assert "--optShapes=input:4x3x16x16" in err and "dfq-build" in err and not engine.exists()
    assert build_cli.main([str(q), "--out", str(engine), "--min-batch", "4", "--max-batch", "2"]) == 2
    assert build_cli.main([str(tmp_path / "nope.onnx"), "--out", str(engine)]) == 2


# --- FP counterpart discovery ---------------------------------------------------------------------

def test_default_fp_discovery_and_error(models, tmp_path, capsys):
    q, fp = models["onnxruntime"]
    assert default_fp_path(q) == fp and resolve_fp_path(q, None) == fp
    lone = tmp_path / "lone.onnx"
    shutil.copy(q, lone)
    with pytest.raises(UsageError, match=r"lone\.fp32\.onnx"):
        resolve_fp_path(lone, None)
    assert bench_cli.main([str(lone), *FAST]) == 2
    err = capsys.readouterr().err
    assert "lone.fp32.onnx" in err and "--fp" in err
    assert bench_cli.main([str(lone), "--fp", str(tmp_path / "missing.onnx"), *FAST]) == 2
    assert bench_cli.main([str(tmp_path / "missing.onnx"), *FAST]) == 2
    assert bench_cli.main([str(lone), "--fp", str(fp), *FAST]) == 0


# --- TensorRT helpers that run without TensorRT ---------------------------------------------------

def test_convert_to_fp16_runs_on_ort(models):
    x = tiny_images(16, seed=3).numpy()
    q, fp = models["tensorrt"]
    for path, is_qdq in ((fp, False), (q, True)):
        m = onnx.load(str(path))
        half, info = convert_to_fp16(m)
        assert info["initializers"] > 0 and info["clipped_values"] == 0
        assert info["opset"] == (19 if is_qdq else 17)  # FP16 Q/DQ needs opset 19
        assert onnx_input_shape(half) == ("input", (3, 16, 16))
        assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 I/O kept
        assert not any(t.data_type == onnx.TensorProto.FLOAT for t in half.graph.initializer)
        ref = _session(m).run(None, {"input": x})[0]
        out = _session(half).run(None, {"input": x})[0]
        assert out.dtype == np.float32 and out.shape == ref.shape
        tol = 0.05 if is_qdq else 0.01  # FP16 scales may move a value by one quantization step
        assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())


def test_trtexec_command():
    cmd = trtexec_command("a b.onnx", "m.engine", input_name="input", input_shape=(3, 224, 224), min_batch=1,
                          opt_batch=8, max_batch=32, timing_cache="tc.bin")
    assert cmd.startswith("trtexec '--onnx=a b.onnx' --saveEngine=m.engine --stronglyTyped")
    assert "--optShapes=input:8x3x224x224" in cmd and "--timingCacheFile=tc.bin" in cmd


TRT10_JSON = {"Layers": [
    {"Name": "input_quantize", "LayerType": "Reformat",
     "Inputs": [{"Name": "input", "Format/Datatype": "Row major linear FP32 format (kLINEAR)"}],
     "Outputs": [{"Name": "q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
    {"Name": "stem + relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
     "Inputs": [{"Name": "q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "Outputs": [{"Name": "a", "Format/Datatype": "Channel major INT8 format where channel % 4 == 0 (kCHW4)"}]},
    {"Name": "fc", "LayerType": "CaskGemmConvolution", "ParameterType": "Convolution",
     "Inputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0 (kHWC8)"}],
     "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32 format (kLINEAR)"}]}],
    "Bindings": ["input", "output"]}
TRT11_JSON = {"Layers": [
    {"Name": "stem", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "q", "Format": "kCHW32", "DataType": "Int8"}],
     "Outputs": [{"Name": "a", "Format": "kCHW32", "DataType": "Int8"}]},
    {"Name": "pool", "LayerType": "CaskPooling",
     "Inputs": [{"Name": "a", "Format": "kLINEAR", "DataType": "Half"}],
     "Outputs": [{"Name": "b", "Format": "kLINEAR", "DataType": "Float"}]}],
    "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}]}


def test_summarize_engine_layers_trt10_and_trt11():
    s = summarize_engine_layers(json.dumps(TRT10_JSON))
    assert [l["inputs"] for l in s["layers"]] == [["FP32"], ["INT8"], ["FP16"]]
    assert s["int8_layers"] == 1 and s["not_int8"] == ["input_quantize", "fc"]
    assert s["not_int8_compute"] == ["fc"] and s["precisions"] == {"INT8": 2, "FP32": 1}
    s = summarize_engine_layers(TRT11_JSON)
    assert [(l["inputs"], l["outputs"]) for l in s["layers"]] == [(["INT8"], ["INT8"]), (["FP16"], ["FP32"])]
    assert s["not_int8"] == ["pool"] and s["not_int8_compute"] == []
    with pytest.raises(RuntimeError, match="DETAILED"):
        summarize_engine_layers({"Layers": ["stem", "pool"], "Bindings": []})


# --- TensorRT on a GPU (skipped here) -------------------------------------------------------------

@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_engine_int8_layers_and_matches_ort(models, tmp_path):
    from dfq.export.tensorrt import EngineRunner, build_engine, inspect_engine

    q, _fp = models["tensorrt"]
    engine = tmp_path / "tiny.engine"
    rep = build_engine(q, engine, max_batch=8, opt_batch=8)
    assert engine.exists() and rep["profiling_verbosity"] == "detailed"
    layers = inspect_engine(engine)
    assert layers["int8_layers"] >= 1, layers
    assert layers["not_int8_compute"] == [], layers  # every conv/gemm reads INT8
    x = tiny_images(8, seed=4).numpy()
    runner = EngineRunner(engine)
    out = runner.run(x)
    ref = _session(onnx.load(str(q))).run(None, {"input": x})[0]
    assert out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75
    assert np.abs(out - ref).mean() < 0.05 * max(1.0, np.abs(ref).max())
    times = runner.time(x, 5, warmup=1)
    assert len(times) >= 5 and all(t > 0 for t in times)


@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_bench_and_build_cli(models, tmp_path):
    q, _ = models["tensorrt"]
    out = tmp_path / "trt.json"
    assert bench_cli.main([str(q), "--backend", "tensorrt", "--batch", "1", *FAST, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())["records"][0]
    assert rec["backend"] == "tensorrt" and rec["fp_precision"] == "fp16" and rec["threads"] is None
    assert rec["tensorrt"]["int8_layers"] >= 1
    assert build_cli.main([str(q), "--out", str(tmp_path / "b.engine"), "--max-batch", "4",
                           "--timing-cache", str(tmp_path / "tc.bin")]) == 0
    assert (tmp_path / "b.engine").exists() and (tmp_path / "tc.bin").exists()


def test_openvino_backend_times_both_models(models, tmp_path, capsys):
    from dfq.export.runtimes import get_runtime

    ok, why = get_runtime("openvino").status()
    if not ok:
        pytest.skip(f"OpenVINO cannot load here: {why}")
    q, _ = models["onnxruntime"]
    out = tmp_path / "ov.json"
    assert bench_cli.main([str(q), *FAST, "--backend", "openvino", "--batch", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())["records"][0]
    assert rec["backend"] == "openvino" and rec["batch"] == 2 and rec["speedup"] > 0
    assert rec["fp_iterations"] >= 4 and rec["int_iterations"] >= 4


def test_openvino_runs_the_artifact_close_to_onnxruntime(models):
    from dfq.export.runtimes import get_runtime
    from dfq.export.runtimes.openvino import compile_model, run_logits

    if not get_runtime("openvino").status()[0]:
        pytest.skip("OpenVINO cannot load here")
    q, _ = models["onnxruntime"]
    x = tiny_images(8, seed=9).numpy()
    ov_out = run_logits(compile_model(q, threads=1, batch=8, input_shape=(3, 16, 16)), x)
    ort_out = _session(onnx.load(str(q))).run(None, {"input": x})[0]
    # a different runtime's integer arithmetic: close, not bit-identical
    assert np.abs(ov_out - ort_out).max() < 0.1 * np.abs(ort_out).max() + 1e-3


def test_openvino_breakdown_names_int8_kernels(models, tmp_path):
    """``--breakdown`` profiles both models on OpenVINO: its op types, the kernels of the quantized
    model (the tiny artifact's convs run in int8 there) and their share of the time."""
    from dfq.export.runtimes import get_runtime
    from dfq.export.runtimes.openvino import is_int8_kernel

    if not get_runtime("openvino").status()[0]:
        pytest.skip("OpenVINO cannot load here")
    assert is_int8_kernel("brgconv_avx512_I8") and is_int8_kernel("jit_avx512_dw_U8")
    assert not is_int8_kernel("jit_avx512_FP32") and not is_int8_kernel("undef")
    q, _ = models["onnxruntime"]
    out = tmp_path / "ov.json"
    assert bench_cli.main([str(q), *FAST, "--backend", "openvino", "--backend", "onnxruntime-cpu", "--batch", "2",
                           "--breakdown", "--out", str(out)]) == 0
    recs = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    b = recs["openvino"]["breakdown"]
    assert "Convolution" in b["op_ms_fp32"] and "Convolution" in b["op_ms_quantized"]
    assert any(is_int8_kernel(k) for k in b["exec_ms_quantized"]), b["exec_ms_quantized"]
    assert not any(is_int8_kernel(k) for k in b["exec_ms_fp32"]), b["exec_ms_fp32"]
    assert 0 < b["int8_fraction"] <= 1
    nodes = b["slowest_quantized_nodes"]
    assert nodes and [n["ms"] for n in nodes] == sorted((n["ms"] for n in nodes), reverse=True)
    assert "op_ms_quantized" in recs["onnxruntime-cpu"]["breakdown"]
