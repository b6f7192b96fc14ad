"""Model architectures dfq knows by name, and how their inputs are prepared.

``get_spec(name).build()`` gives a randomly initialised model whose state_dict keys match the
usual checkpoints; :mod:`dfq.pipeline.load` fills in the weights.
"""
from __future__ import annotations

from .registry import ModelSpec, get_spec, infer_arch, is_small_input, list_archs

__all__ = ["ModelSpec", "get_spec", "infer_arch", "is_small_input", "list_archs"]
