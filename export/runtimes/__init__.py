"""The runtimes dfq measures artifacts on, by name (``dfq-bench --backend NAME``).

Everything runtime-specific (availability, pre-flight checks, timing) lives in their
:class:`~dfq.export.runtimes.base.Runtime` objects; a new runtime is a module with a subclass and
one :func:`register` call.
"""
from __future__ import annotations

from dfq.common.errors import BackendUnavailableError, UsageError
from dfq.common.registry import Registry
from dfq.export.runtimes import onnxruntime, openvino, tensorrt
from dfq.export.runtimes.base import Budget, Runtime, make_record

RUNTIMES: Registry[Runtime] = Registry(
    lambda name, known: UsageError(f"Unknown backend {name!r}; choose from {', '.join(known)}."))
register, runtime_names, get_runtime = RUNTIMES.register, RUNTIMES.names, RUNTIMES.get


def require_runtime(name: str, model="MODEL.onnx") -> Runtime:
    """The runtime, or :class:`BackendUnavailableError` (exit 9) naming what is missing here."""
    runtime = get_runtime(name)
    ok, why = runtime.status()
    if not ok:
        raise BackendUnavailableError(f"The {name} backend cannot run here: {why}.{runtime.unavailable_hint(model)}")
    return runtime


register(onnxruntime.CPU)
register(onnxruntime.CUDA)
register(tensorrt.RUNTIME)
register(openvino.RUNTIME)

__all__ = ["Budget", "Runtime", "make_record", "register", "runtime_names", "get_runtime", "require_runtime"]
