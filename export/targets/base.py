"""What an export target is: everything that differs between the runtimes dfq builds artifacts for.

A :class:`Target` owns

* the fake-quant numerics (:attr:`Target.scheme`, a :class:`~dfq.kernels.fake_quant.QuantScheme`:
  activation and weight grids, which layer outputs are quantized, int32 biases), which the
  pipeline builds the fake-quant model from;
* how the artifact stores them (:attr:`Target.qdq`, a :class:`~dfq.export.qdq.QDQFormat`) and the
  exact graph rewrites made for its runtime (:meth:`Target.rewrite`);
* the static rules its runtime imposes on the graph (:meth:`Target.violations`);
* how the artifact is verified: which runtime session runs it and which reference it is compared
  with (:meth:`Target.verification`);
* the runtimes its latency is measured on (:attr:`Target.latency_backends`), the other runtimes its
  artifact is run on for agreement and top-1 (:attr:`Target.cross_check_runtimes`), and whether
  ``.engine`` outputs are built for it (:attr:`Target.builds_engines`).

A new target is one module defining a subclass and registering an instance with
:func:`dfq.export.targets.register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import torch

from dfq.export.qdq import QDQFormat
from dfq.kernels.fake_quant import QuantScheme, weight_grid
from dfq.pipeline.quantize import QuantConfig, QuantizedModel


@dataclass
class Verification:
    """How an artifact is checked: ``session`` runs it; ``reference`` (images -> logits) is the
    fake-quant model in that runtime's arithmetic (None: the float fake-quant model, with float64
    re-checks near ties); ``extra_sessions`` (variants of the checking runtime, diagnostics) run the
    same images and report their agreement with the float fake-quant model; ``runtime`` says all that in the report."""

    session: ort.InferenceSession
    runtime: str
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra_sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    reference_float_nodes: list[str] | None = None


class Target:
    """One artifact flavour; subclasses set the class attributes and override what differs."""

    name: str
    summary: str
    scheme: QuantScheme
    qdq: QDQFormat
    latency_backends: tuple[str, ...] = ("onnxruntime-cpu", "openvino")   # measured where available
    cross_check_runtimes: tuple[str, ...] = ("openvino",)   # also run the artifact there, where available
    # the runtimes the flavour is laid out for (its speed elsewhere is informative only)
    deploys_on: tuple[str, ...] = ("onnxruntime-cpu", "onnxruntime-cuda", "openvino")
    builds_engines: bool = False

    def quant_config(self, **fields) -> QuantConfig:
        """A :class:`QuantConfig` for this target (``bits``, ``keep_8bit``, ... as keywords)."""
        return QuantConfig(scheme=self.scheme, **fields)

    def rewrite(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
        """Exact rewrites of the simplified QDQ graph for this runtime: (model, name -> nodes)."""
        return model, {}

    def violations(self, model: onnx.ModelProto) -> list[str]:
        """The ways ``model`` breaks this runtime's rules for Q/DQ graphs (empty: none)."""
        return []

    def unavailable(self) -> str | None:
        """Why this target cannot verify its artifacts here (a runtime it needs is missing), or None."""
        return None

    def verification(self, qmodel: QuantizedModel, onnx_path: Path, threads: int) -> Verification:
        raise NotImplementedError

    def numerics(self, config: QuantConfig) -> str:
        """One sentence for the report: grids and containers of ``config`` on this target."""
        w = weight_grid(config.bits, config.reduce_range)
        a_u = self.scheme.activation_grid(config.act_bits, False)
        a_s = self.scheme.activation_grid(config.act_bits, True)
        text = (f"weights per-channel symmetric on [{w.qmin}, {w.qmax}]; activations per-tensor on "
                f"[{a_u.qmin}, {a_u.qmax}] after ReLU/ReLU6, [{a_s.qmin}, {a_s.qmax}] otherwise; stored as "
                f"{self.qdq.describe()}")
        if min(config.bits, config.act_bits) == 4 or config.layer_precision:
            text += ("; 4-bit numerics run on INT8 kernels (4-bit grids in INT8 containers, activations clipped "
                     "to the 4-bit range): this is not an INT4 engine")
        if config.layer_precision:
            text += "; per-layer precision as in layer_precision (mixed)"
        return text
