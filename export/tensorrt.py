"""TensorRT engine building from dfq's QDQ ONNX (optional: TensorRT and a CUDA GPU).

``tensorrt`` is imported lazily, inside the functions that need it, so dfq installs and runs
without it. CUDA device detection and (later) buffers use torch's CUDA runtime: torch is already
a dependency, ships the CUDA runtime in its wheels and needs no compiler, whereas pycuda is a
source-only package that needs the CUDA toolkit and driver to build (DESIGN.md).

Written against the TensorRT 10 and 11 Python API documentation:
* TensorRT 10: ``builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))``
  makes a strongly typed network, whose Q/DQ nodes fix every precision.
* TensorRT 11: strongly typed is the only mode; the flag is deprecated and ignored, so
  ``create_network(0)`` is used when the flag is missing.
Not yet run on a GPU: see the README's "Verified on" table.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from dfq.errors import EngineNotBuiltError


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) when TensorRT imports and a CUDA device is visible, else (False, why)."""
    missing = []
    version = None
    try:
        import tensorrt as trt  # noqa: F401

        version = trt.__version__
    except Exception as exc:  # ImportError, or a broken install raising OSError
        missing.append(f"TensorRT is not importable ({type(exc).__name__}: {exc}); install it on a "
                       "machine with an NVIDIA GPU with `pip install 'dfq[tensorrt]'` (NVIDIA's "
                       "tensorrt wheels)")
    try:
        import torch

        has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        missing.append("no CUDA device is visible (torch.cuda.is_available() is False)")
    if missing:
        return False, "; and ".join(missing)
    return True, f"TensorRT {version}"


def require_tensorrt(onnx_path: str | Path, engine_path: str | Path) -> None:
    """Raise :class:`EngineNotBuiltError` (after the ONNX was written and verified) when the
    engine cannot be built here."""
    ok, why = tensorrt_status()
    if not ok:
        raise EngineNotBuiltError(
            f"The TensorRT engine {engine_path} was NOT built: {why}. The ONNX artifact "
            f"{onnx_path} was written and verified on ONNX Runtime; build the engine from it on a "
            f"GPU machine with: trtexec --onnx={shlex.quote(str(onnx_path))} "
            f"--saveEngine={shlex.quote(str(engine_path))} --stronglyTyped, or run the same "
            "dfq-export command there.")


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, input_shape: tuple[int, int, int],
                 max_batch: int = 32, opt_batch: int = 1, workspace_bytes: int = 1 << 30) -> dict:
    """Parse the QDQ ONNX, build a strongly typed engine with a batch profile ``1..max_batch``,
    write it atomically; return a small build report. Requires TensorRT and a CUDA device."""
    import tensorrt as trt

    from dfq.export.onnx_export import atomic_write_bytes

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT could not parse the ONNX:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, *input_shape), (opt_batch, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    return {"tensorrt": trt.__version__, "engine": str(engine_path), "bytes": len(bytes(serialized)),
            "max_batch": max_batch}
