"""The report of one ``dfq-export`` run: a typed record, written as JSON and as Markdown.

The JSON carries ``schema`` (:data:`SCHEMA`); its sections are the stages' own results
(``synthesis``, ``quant``, ``calibration``, ``finetune``, ``fidelity``, ``latency`` ...), each written
by the stage that produced it (:mod:`dfq.stages`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

SCHEMA = "dfq-export/2"

# A cross-check below this agreement with its reference is a console warning, not a failure: the
# ResNet-20 artifacts agree 99.82% (W8A8) and 99.92% (W4A4) with the OpenVINO reference on 10,000
# images; what is left is the runtime's own float32 arithmetic, which no reference reproduces.
CROSS_CHECK_WARN = 0.995
# Below this top-1 agreement of the exported model with the FP model, a cross-check's disagreements
# may be near-ties rather than a modelling gap (ResNet-20 on CIFAR-10: 98% at W8A8, 88% at W4A4; a
# random-weight resnet18 at W4A4 on 16 synthetic images: 50%).
FRAGILE_ANSWERS = 0.75


def to_json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _sensitivity_table(section: dict, layer_precision: dict) -> list[str]:
    """Most sensitive layers first: FP->quantized KL with each layer alone at the low precision."""
    lines = [f"## Layer sensitivity ({section['precision']}, each layer alone; FP->quantized KL on held-out "
             "synthetic images)", "", "| layer | params | MACs | weights | activations | both | runs at |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(section["layers"], key=lambda r: -r["both"]):
        lines.append(f"| {r['name']} | {r['params']} | {r['macs']} | {r['weights']:.4g} | {r['activations']:.4g} | "
                     f"{r['both']:.4g} | {layer_precision.get(r['name'], '-')} |")
    return lines + [""]


@dataclass
class ExportReport:
    command: str
    commit: str
    machine: dict
    job: dict
    model: dict                  # arch, spec, source (path, sha256, format)
    synthesis: dict              # BN-inversion set: config, size, seconds
    quant: dict                  # config, numerics, per-layer bits, activation quantizers
    calibration: dict            # range rule kept, KL per rule, bias correction
    finetune: dict               # recipe, schedule, result, held-out KL before/after, what was exported
    graph_rewrites: dict[str, list[str]]
    rule_violations: list[str]   # the target's static rules (TensorRT's Q/DQ rules for tensorrt)
    fidelity: dict               # agreement with the reference, logit differences, top-1 with --val
    latency: list[dict]
    outputs: dict
    timings_s: dict[str, float]
    status: str = "ok"           # ok | rejected | engine not built
    wall_s: float = 0.0
    engine: dict | None = None
    sensitivity: dict | None = None   # per-layer sensitivity (and the mixed-precision choice)
    reconstruction: dict | None = None   # learned rounding (recipes that reconstruct)
    kind: str = "dfq-export"
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> bytes:
        return to_json(self.to_dict())

    def _calibration_scores(self) -> str:
        scores = self.calibration["kl_by_method"]
        if not scores:
            return "(pinned with --calibration, not scored)"
        return "(KL by method: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) + ")"

    def to_markdown(self) -> str:
        """A short human summary."""
        q, f = self.quant, self.fidelity
        lines = [f"# dfq export: {self.model['arch']} {q['name']} ({q['target']})", "",
                 f"- command: `{self.command}`",
                 f"- commit: `{self.commit}`, machine: {self.machine['cpu']} ({self.machine['cores']} cores)",
                 f"- artifact: `{self.outputs['onnx']}` (FP32 twin: `{self.outputs['fp_onnx']}`), status {self.status}",
                 f"- synthetic data: method `{self.synthesis['method']}`, {self.synthesis['num_images']} images, "
                 f"{self.synthesis['seconds']:.0f} s",
                 f"- calibration: `{self.calibration['method']}` " + self._calibration_scores(),
                 f"- numerics: {q['numerics']}",
                 f"- layers kept at 8 bits: {', '.join(q['layers_at_8bit']) or 'none'}",
                 f"- average bits: weights {q['avg_weight_bits']:.2f} (parameter-weighted, "
                 f"{q['weight_bytes'] / 1024:.1f} KiB of weights), activations {q['avg_act_bits']:.2f} (MAC-weighted)",
                 f"- wall time: {self.wall_s:.0f} s", "",
                 "| check | value |", "| --- | --- |",
                 f"| images ({f['data']}) | {f['images']} |",
                 f"| agreement exported ONNX vs {f.get('reference', 'fake-quant model')} (top-1) | {_pct(f['agreement'])} |"]
        if "agreement_float_fakequant" in f:
            lines.append(f"| agreement exported ONNX vs fake-quant model (float) (top-1) | "
                         f"{_pct(f['agreement_float_fakequant'])} |")
        for name, c in f.get("cross_checks", {}).items():
            lines.append(f"| agreement on {name} vs {c['reference']} (top-1) | {_pct(c['agreement'])}"
                         + (f" (vs the float fake-quant model {_pct(c['agreement_float_fakequant'])})"
                            if "agreement_float_fakequant" in c else "") + " |")
        lines.append(f"| max / mean abs logit diff | {f['max_abs_logit_diff']:.4g} / {f['mean_abs_logit_diff']:.3g} |")
        if "relative_logit_error" in f:
            lines.append(f"| relative logit error | {f['relative_logit_error']:.3g} |")
        lines.append(f"| agreement exported ONNX vs FP (top-1) | {_pct(f['agreement_with_fp'])} |")
        if "top1_fp" in f:
            lines.append(f"| top-1 FP / fake-quant / exported | {_pct(f['top1_fp'])} / {_pct(f['top1_fakequant'])} / "
                         f"{_pct(f['top1_int'])} |")
            lines.append(f"| drop (points) | {f['top1_drop_points']:.2f} |")
        for lat in self.latency:
            lines.append(f"| {lat['backend']} latency batch {lat['batch']}, {lat['threads']} threads: FP32 / quantized "
                         f"median | {lat['fp_ms']:.2f} / {lat['int_ms']:.2f} ms ({lat['speedup']:.2f}x"
                         + (", SLOWER than FP32" if lat.get("slower_than_fp32") else "") + ") |")
        if self.engine:
            lines.append(f"| TensorRT engine | {self.engine.get('status')} |")
        lines.append("")
        for lat in self.latency:
            if lat.get("breakdown"):
                lines += _breakdown_table(lat)
        if self.sensitivity:
            lines += _sensitivity_table(self.sensitivity, self.quant.get("layer_precision", {}))
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        """What the CLI prints at the end of a run."""
        f = self.fidelity
        if self.status == "rejected":
            lines = [f"[dfq] REJECTED: the artifact failed its check and was written to "
                     f"{self.outputs.get('rejected_onnx')} ({self.quant['name']}, target {self.quant['target']})"]
        else:
            lines = [f"[dfq] wrote {self.outputs['onnx']} ({self.quant['name']}, target {self.quant['target']})"]
        lines.append(f"[dfq] agreement with the {f.get('reference', 'fake-quant model')}: {100 * f['agreement']:.2f}% "
                     f"on {f['images']} {f['data']} (max |logit diff| {f['max_abs_logit_diff']:.3g})"
                     + (f"; with the float fake-quant model {100 * f['agreement_float_fakequant']:.2f}%"
                        if "agreement_float_fakequant" in f else ""))
        for name, c in f.get("cross_checks", {}).items():
            if not c.get("diagnostic"):
                lines.append(f"[dfq] on {name}: agreement with the {c['reference']}: {100 * c['agreement']:.2f}%"
                             + (f" (with the float fake-quant model {100 * c['agreement_float_fakequant']:.2f}%)"
                                if "agreement_float_fakequant" in c else ""))
                if c["agreement"] < CROSS_CHECK_WARN:
                    lines.append(_cross_check_warning(name, c, f))
        if "top1_fp" in f:
            lines.append(f"[dfq] top-1: FP {100 * f['top1_fp']:.2f}%  exported {100 * f['top1_int']:.2f}%  "
                         f"(drop {f['top1_drop_points']:.2f} points)")
        for lat in self.latency:
            lines.append(f"[dfq] {lat['backend']} latency batch {lat['batch']} ({lat['threads']} threads): FP32 "
                         f"{lat['fp_ms']:.2f} ms, quantized {lat['int_ms']:.2f} ms, speedup {lat['speedup']:.2f}x")
            if lat.get("slower_than_fp32"):
                lines.append(_slower_warning(lat, self.quant["target"]))
        lines.append(f"[dfq] report: {self.outputs['report']} and {self.outputs['markdown']} ({self.wall_s:.0f} s)")
        return lines


def _cross_check_warning(name: str, c: dict, f: dict) -> str:
    """The console line for a runtime whose answers differ from its reference on too many images.
    When the exported model's own top-1 often differs from the FP model's, many images sit near a
    decision boundary and any difference in arithmetic flips answers: said so."""
    text = (f"[dfq] WARNING: on {name} the artifact's answers differ from its reference on "
            f"{100 * (1 - c['agreement']):.2f}% of the images (measured on ResNet-20: 0.08-0.18%): "
            "that runtime computes something the reference does not model")
    if f.get("agreement_with_fp", 1.0) < FRAGILE_ANSWERS:
        text += (f"; or this model's answers are fragile: the exported model itself agrees with the FP model on "
                 f"only {100 * f['agreement_with_fp']:.2f}% of them, so small differences in arithmetic flip answers "
                 "(nearly flat logits, as random weights give, or a large quantization error)")
    return text


def _slower_warning(lat: dict, target: str) -> str:
    """The console line for an artifact slower than its FP32 twin on a runtime, naming the slowest
    nodes of the quantized graph where the runtime could profile it."""
    text = (f"[dfq] WARNING: on {lat['backend']} (batch {lat['batch']}) the quantized artifact is SLOWER than FP32 "
            f"({lat['speedup']:.2f}x)")
    nodes = (lat.get("breakdown") or {}).get("slowest_quantized_nodes") or []
    if nodes:
        text += "; slowest nodes: " + ", ".join(f"{n['node']} ({n['op']}, {n['ms']:.2f} ms)" for n in nodes[:5])
    if lat.get("deployment_runtime") is False:
        text += f". The {target} flavour is laid out for other runtimes, not for this one."
    return text


def _breakdown_table(lat: dict) -> list[str]:
    """Markdown: kernel time per op type of both models, for a runtime where the artifact is slower."""
    b = lat["breakdown"]
    ops = list(dict.fromkeys([*b["op_ms_quantized"], *b["op_ms_fp32"]]))
    lines = [f"## Slower than FP32 on {lat['backend']}, batch {lat['batch']} ({lat['speedup']:.2f}x)", "",
             "Profiled kernel time per op type (ms):", "", "| op | FP32 | quantized |", "| --- | --- | --- |"]
    lines += [f"| {op} | {b['op_ms_fp32'].get(op, 0):.3f} | {b['op_ms_quantized'].get(op, 0):.3f} |" for op in ops]
    lines += ["", "Slowest nodes of the quantized graph: "
              + ", ".join(f"{n['node']} ({n['op']}, {n['ms']:.3f} ms)" for n in b["slowest_quantized_nodes"]), ""]
    return lines
