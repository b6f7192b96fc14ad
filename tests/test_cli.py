"""The dfq-export command line: option errors, output protection, the engine message, and one
end-to-end run on a tiny checkpoint (registered under a test-only architecture name)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dfq.cli import main
from dfq.job import ExportJob
from dfq.errors import OutputError, UsageError


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


def test_missing_output_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        ExportJob(model="m.pth", out=str(tmp_path / "nope" / "x.onnx")).check_outputs()


def test_engine_paths():
    job = ExportJob(model="m.pth", out="dir/r18.engine")
    assert str(job.onnx_path) == "dir/r18.onnx" and str(job.fp_onnx_path) == "dir/r18.fp32.onnx"
    assert str(job.report_path) == "dir/r18.report.json" and str(job.markdown_path) == "dir/r18.report.md"
