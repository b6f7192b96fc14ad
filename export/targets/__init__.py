"""The export targets by name: ``get_target("onnxruntime")``, ``get_target("tensorrt")``,
``get_target("openvino")``.

Everything that differs between targets lives in their :class:`~dfq.export.targets.base.Target`
objects; no other code compares target names. A new target is a module with a ``Target`` subclass
and one :func:`register` call.
"""
from __future__ import annotations

from dfq.common.registry import Registry
from dfq.export.targets import onnxruntime, openvino, tensorrt
from dfq.export.targets.base import Target, Verification

TARGETS: Registry[Target] = Registry(
    lambda name, known: ValueError(f"unknown target {name!r}; known targets: {', '.join(known)}"))
register, unregister, target_names, get_target = TARGETS.register, TARGETS.unregister, TARGETS.names, TARGETS.get


def engine_target() -> Target:
    """The target whose artifacts ``.engine``/``.plan`` outputs are built from."""
    return next(t for t in TARGETS if t.builds_engines)


register(onnxruntime.TARGET)
register(tensorrt.TARGET)
register(openvino.TARGET)

__all__ = ["Target", "Verification", "register", "unregister", "get_target", "target_names", "engine_target"]
