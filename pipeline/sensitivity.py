"""Data-free per-layer sensitivity: what lowering one layer alone costs the model.

For every conv/linear layer ``l`` and a low precision (``W4A4`` by default, the job's ``--bits``):
the model is quantized and calibrated at that precision everywhere, then every quantizer is turned
off except layer ``l``'s weight quantizer (``weights``), its input's activation quantizer
(``activations``), or both (``both``), and the FP->quantized KL divergence on held-out synthetic
images is measured (nats, mean over images; the FP model's logits are the reference). Everything
else runs in float, so each number is that layer's own contribution.

Each row also carries the layer's parameter count and multiply-accumulates per image, which the
mixed-precision choice (:mod:`dfq.pipeline.mixed_precision`) weighs the bits with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from dfq.pipeline.act_quantizers import input_quantizer_of
from dfq.pipeline.calibrate import batched_logits, calibrate, output_kl
from dfq.pipeline.graph import layer_nodes
from dfq.pipeline.qmodules import ActQuantizer, QuantConv2d
from dfq.pipeline.quantize import QuantConfig, QuantizedModel, kept_8bit, quantize


@dataclass
class LayerSensitivity:
    name: str
    input: str               # the quantized tensor the layer reads (layers reading one tensor share its bits)
    params: int              # weight elements
    macs: int                # multiply-accumulates per image
    kept_8bit: bool          # the config's keep_8bit policy keeps this layer at 8 bits
    weights: float           # KL with only this layer's weights at the low precision
    activations: float       # ... only its input activations
    both: float

    def to_dict(self) -> dict:
        return asdict(self)


def layer_costs(qmodel: QuantizedModel) -> dict[str, tuple[int, int]]:
    """(weight elements, multiply-accumulates per image) of every conv/linear layer."""
    gm = qmodel.module
    out = {}
    for node in layer_nodes(gm):
        m = gm.get_submodule(str(node.target))
        shape = node.meta["tensor_meta"].shape
        if isinstance(m, QuantConv2d):
            per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            macs = int(shape[1] * shape[2] * shape[3]) * per_output
        else:
            macs = m.in_features * m.out_features
        out[str(node.target)] = (int(m.weight.numel()), macs)
    return out


def _only(qmodel: QuantizedModel, weight_of: nn.Module | None, act: ActQuantizer | None) -> None:
    """Every quantizer off except ``weight_of``'s weight quantizer and ``act``."""
    qmodel.set_enabled(False, False)
    if weight_of is not None:
        weight_of.weight_quantizer.enabled = True
    if act is not None:
        act.enabled = True


@torch.no_grad()
def layer_sensitivity(model: nn.Module, config: QuantConfig, calib: torch.Tensor, holdout: torch.Tensor, *,
                      seed: int = 0, fp_logits: torch.Tensor | None = None) -> list[LayerSensitivity]:
    """One :class:`LayerSensitivity` per conv/linear layer of ``model`` (in graph order) at
    ``config``'s precision with no layer policy (every layer is measured), calibrated on ``calib``
    and measured on ``holdout`` (see the module docstring)."""
    low = dataclasses.replace(config, keep_8bit=(), layer_precision={})
    qmodel = quantize(model, low, calib[:2])
    calibrate(qmodel, calib, holdout=holdout, seed=seed)
    if fp_logits is None:
        fp_logits = batched_logits(model.eval(), holdout, 64)
    costs = layer_costs(qmodel)
    gm: fx.GraphModule = qmodel.module
    kept = kept_8bit(gm, config)

    def kl() -> float:
        return output_kl(fp_logits, batched_logits(gm, holdout, 64))

    rows = []
    for node in layer_nodes(gm):
        layer = gm.get_submodule(str(node.target))
        aq_node = input_quantizer_of(gm, node)
        act = gm.get_submodule(str(aq_node.target)) if aq_node is not None else None
        values = []
        for w, a in ((layer, None), (None, act), (layer, act)):
            _only(qmodel, w, a)
            values.append(kl())
        rows.append(LayerSensitivity(str(node.target), aq_node.name if aq_node is not None else str(node.target),
                                     *costs[str(node.target)], str(node.target) in kept, *values))
    qmodel.set_enabled(True, True)
    return rows


def sensitivity_png(rows: list[LayerSensitivity], precision: str, title: str) -> bytes:
    """A bar chart of the rows (graph order, log scale), as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5))
    x = range(len(rows))
    width = 0.28
    for i, (key, label) in enumerate((("weights", "weights"), ("activations", "input activations"), ("both", "both"))):
        ax.bar([v + (i - 1) * width for v in x], [max(getattr(r, key), 1e-6) for r in rows], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("FP -> quantized KL (nats)")
    ax.set_title(f"{title}: {precision}, one layer at a time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
