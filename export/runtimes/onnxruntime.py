"""ONNX Runtime as a measuring runtime: ``onnxruntime-cpu`` (always) and ``onnxruntime-cuda``.

Both time the two models with :func:`dfq.export.ort_runtime.compare_latency` (sessions built and
warmed together, then interleaved rounds). The CUDA flavour includes the host-to-device copy of
the input and the copy of the output back (numpy in, numpy out), and refuses to report CPU numbers
when ORT falls back to the CPU silently.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from dfq.common.errors import BackendUnavailableError, UsageError
from dfq.export.ort_runtime import compare_latency, make_session, time_breakdown
from dfq.export.runtimes.base import Budget, Runtime, make_record


class OrtCpu(Runtime):
    name = "onnxruntime-cpu"
    description = "ONNX Runtime CPUExecutionProvider"
    providers = ("CPUExecutionProvider",)

    def measure(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, budget: Budget,
                input_shape=None) -> dict:
        try:
            res = compare_latency(fp_path, int_path, batch=batch, threads=threads, input_shape=input_shape,
                                  providers=list(self.providers), **budget.ort_kwargs())
        except ValueError as exc:  # shapes that do not fit the models
            raise UsageError(f"Cannot time {int_path} at batch {batch}: {exc}") from exc
        return make_record(self.name, batch, threads, res["fp"], res["int"])

    def breakdown(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, input_shape=None) -> dict | None:
        return time_breakdown(fp_path, int_path, batch=batch, threads=threads, input_shape=input_shape)


class OrtCuda(OrtCpu):
    name = "onnxruntime-cuda"
    description = "ONNX Runtime CUDAExecutionProvider"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def breakdown(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, input_shape=None) -> dict | None:
        return None   # ORT's CPU profile says nothing about the CUDA kernels

    def status(self) -> tuple[bool, str]:
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            return False, (f"this ONNX Runtime build ({ort.__version__}, package onnxruntime) has no "
                           f"CUDAExecutionProvider (available: {', '.join(available)}); install onnxruntime-gpu "
                           "matching the machine's CUDA and cuDNN instead of onnxruntime, on a machine with an "
                           "NVIDIA GPU")
        return True, self.description

    def preflight(self, int_path: Path, threads: int, input_shape) -> None:
        """ORT falls back to the CPU silently when the CUDA provider cannot start (no GPU, wrong
        CUDA/cuDNN): refuse to report CPU numbers as CUDA ones."""
        s = make_session(int_path, threads=threads, providers=list(self.providers))
        if s.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError(
                "The onnxruntime-cuda backend cannot run here: ONNX Runtime lists CUDAExecutionProvider but the "
                f"session fell back to {s.get_providers()} (no usable NVIDIA GPU, or CUDA/cuDNN libraries that do "
                "not match this onnxruntime-gpu build).")


CPU = OrtCpu()
CUDA = OrtCuda()
