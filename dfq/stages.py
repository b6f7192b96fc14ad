"""The stages of ``dfq-export``, each a function from typed values to typed values.

:func:`dfq.run.run_export` runs them in order::

    load -> synthesize -> quantize (+ calibrate) -> finetune -> bias_correct -> export -> verify
         -> measure -> report -> write -> build

Each stage calls the library function of the same name (the public API in :mod:`dfq`) with the
settings of an :class:`~dfq.job.ExportJob`, times itself, and logs one line; a notebook user
composes the same library functions the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from dfq.common import distributed as D
from dfq.common.errors import EngineNotBuiltError, UnsupportedModelError, UsageError, VerificationError
from dfq.common.files import StagedOutputs, atomic_write_bytes
from dfq.common.provenance import command_line, machine_info
from dfq.export.check import CrossCheck, tensor_batches, verify_artifact
from dfq.export.onnx_export import ExportedOnnx, build_onnx, float_graph
from dfq.export.runtimes import Budget, get_runtime
from dfq.export.targets import Target, get_target
from dfq.export.tensorrt import build_engine, require_tensorrt, trtexec_command
from dfq.pipeline.bias_correction import RECONSTRUCTION_KL_RATIO, BiasCorrectionResult, bias_correct
from dfq.pipeline.calibrate import CalibrationResult, batched_logits, calibrate, heldout_kd
from dfq.pipeline.data import image_folder, iterate_images
from dfq.pipeline.finetune import FinetuneConfig, checkpoint_fingerprint, finetune
from dfq.pipeline.load import LoadedModel, has_batchnorm, load_model
from dfq.pipeline.mixed_precision import MixedPrecision, average_bits, check_budget, choose_precision
from dfq.pipeline.quantize import Precision, QuantConfig, QuantizedModel, kept_8bit, quantize, unmatched_patterns
from dfq.pipeline.sensitivity import LayerSensitivity, layer_costs, layer_sensitivity, sensitivity_png
from dfq.pipeline.recipes import RECIPES, Recipe
from dfq.pipeline.reconstruct import ReconstructConfig, reconstruct
from dfq.pipeline.synthesize import SynthConfig, synthesize
from dfq.pipeline.ties import ATTEMPTS, NUDGE, break_ties
from dfq.job import ExportJob
from dfq.report import ExportReport

# An exported artifact that disagrees with the model it came from more often than this is a
# defect, not a quantization loss: the run fails with VerificationError.
MIN_AGREEMENT = 0.99
# An artifact whose logits differ from the reference's by more than this (median over images of
# sum |diff| / sum |ref|) has a defect even where the top-1 answers agree (a scale off by a factor
# keeps the argmax of a confident model). Rounding steps flipped by float32 in the reference move
# a few images, not the median.
MAX_RELATIVE_LOGIT_ERROR = 0.05


@dataclass
class Run:
    """What every stage may read: the job, its target and recipe, torchrun's rank, the log."""

    job: ExportJob
    target: Target
    recipe: Recipe
    info: D.DistInfo
    log: Callable[[str], None]
    commit: str
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t


def start(job: ExportJob, commit: str, log: Callable[[str], None]) -> Run:
    info = D.init_from_env()          # torchrun: data-parallel synthesis and fine-tuning
    quiet = (lambda msg: None) if not info.main else log   # rank 0 speaks for the run
    return Run(job, get_target(job.target), RECIPES[job.method], info, quiet, commit)


# -- load -------------------------------------------------------------------------------------

@dataclass
class Inputs:
    loaded: LoadedModel
    val_set: object | None            # an ImageFolder of labelled real images (--val), or None


def load(run: Run) -> Inputs:
    job = run.job
    with run.timed("load"):
        loaded = load_model(job.model, job.arch)
        if not has_batchnorm(loaded.model):
            raise UnsupportedModelError(
                f"{job.model} ({loaded.spec.name}) has no BatchNorm layers: data-free synthesis reads the "
                "BatchNorm running statistics, so this model cannot be quantized without data. dfq has "
                "no real-data calibration option yet.")
        if job.keep_8bit:
            _check_layer_patterns(job.keep_8bit, loaded.model)
        if job.mixed_budget is not None:
            _check_mixed_budget(run, loaded)
        val_set = image_folder(job.val, loaded.spec) if job.val else None
        torch.manual_seed(job.seed)
    return Inputs(loaded, val_set)


def _check_layer_patterns(patterns, model: nn.Module) -> None:
    """Every ``--keep-8bit`` glob must name at least one conv/linear layer (a typo would otherwise
    silently quantize the layer at the low bit width)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    missing = unmatched_patterns(patterns, names)
    if missing:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise UsageError(f"--keep-8bit {missing[0]!r} matches no conv/linear layer of the model. Layer names look like: "
                         f"{shown} (globs such as '*depthwise*' or 'layer3.*' work; @first and @last name the "
                         "first conv and the last linear).")


def _check_mixed_budget(run: Run, loaded: LoadedModel) -> None:
    """Fail before the expensive stages when the layers fixed at 8 bits alone exceed ``--mixed-budget``
    (the sensitivity stage would only find out after synthesis)."""
    low = Precision(run.job.bits, run.job.act_bits)
    config = _quant_config(run, bits=low.weights, act_bits=low.activations)
    qmodel = quantize(loaded.model, config, torch.zeros(2, *loaded.spec.input_size))
    w, a = run.job.mixed_budget
    try:
        check_budget(layer_costs(qmodel), kept_8bit(qmodel.module, config), low, avg_weight_bits=w, avg_act_bits=a)
    except ValueError as exc:
        raise _mixed_budget_error(run.job, exc) from exc


def _mixed_budget_error(job: ExportJob, exc: ValueError) -> UsageError:
    fix = ("pass --keep-8bit none so that the sensitivities decide the first conv and the last linear too"
           if job.keep_8bit is None else "keep fewer layers at 8 bits with --keep-8bit")
    return UsageError(f"--mixed-budget: {exc}. Raise the budget, or {fix}.")


# -- synthesize -------------------------------------------------------------------------------

@dataclass
class SyntheticData:
    """The BN-inversion set: the last quarter (at least 8 images) is held out, never used for
    ranges or training, to make the data-free choices (calibration rule, keeping fine-tuning or
    bias correction) and, without ``--val``, to check the artifact."""

    images: torch.Tensor
    labels: torch.Tensor
    config: SynthConfig
    seconds: float

    @property
    def holdout_n(self) -> int:
        return max(8, len(self.images) // 4)

    @property
    def calib(self) -> torch.Tensor:
        return self.images[:-self.holdout_n]

    @property
    def calib_labels(self) -> torch.Tensor:
        return self.labels[:len(self.calib)]

    @property
    def holdout(self) -> torch.Tensor:
        return self.images[-self.holdout_n:]

    def to_dict(self, method: str) -> dict:
        return {"method": method, "num_images": len(self.images), "config": self.config.to_dict(),
                "seconds": self.seconds}


def synthesis_config(job: ExportJob, recipe: Recipe, input_size) -> SynthConfig:
    cfg = SynthConfig.for_budget(recipe.synthesis_budget(job.budget), input_size, seed=job.seed,
                                 reconstruction=recipe.reconstruct)
    if job.synth_overrides:
        overrides = dict(job.synth_overrides)
        if "num_images" in overrides and "batch_size" not in overrides:
            overrides["batch_size"] = min(cfg.batch_size, overrides["num_images"])
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def synthesize_stage(run: Run, inputs: Inputs) -> SyntheticData:
    spec = inputs.loaded.spec
    cfg = synthesis_config(run.job, run.recipe, spec.input_size)
    budget = run.recipe.synthesis_budget(run.job.budget)
    purpose = "calibration images" if budget != run.job.budget else "images"
    run.log(f"[dfq] synthesizing {cfg.num_images} {purpose} from {spec.name}'s BatchNorm statistics "
            f"(BN inversion, budget {budget})")
    with run.timed("synthesize"):
        images, labels = synthesize(inputs.loaded.model, spec.input_size, spec.mean, spec.std, spec.num_classes,
                                    cfg, progress=run.job.progress, dist_info=run.info)
    return SyntheticData(images, labels, cfg, run.timings["synthesize"])


# -- sensitivity and mixed precision ----------------------------------------------------------

@dataclass
class Sensitivity:
    precision: Precision                # what each layer was lowered to
    rows: list[LayerSensitivity]
    mixed: MixedPrecision | None        # the per-layer choice under --mixed-budget
    seconds: float

    def to_dict(self) -> dict:
        return {"precision": str(self.precision), "seconds": self.seconds, "layers": [r.to_dict() for r in self.rows],
                "mixed": None if self.mixed is None else self.mixed.to_dict()}


def sensitivity_stage(run: Run, inputs: Inputs, data: SyntheticData) -> Sensitivity | None:
    """Per-layer sensitivity at the job's precision (W4A4 when that is W8A8), and the mixed-precision
    choice when the job sets a budget."""
    job = run.job
    if not job.measures_sensitivity:
        return None
    low = Precision(job.bits, job.act_bits)
    low = Precision(4, 4) if low == Precision(8, 8) else low
    config = _quant_config(run, bits=low.weights, act_bits=low.activations)
    run.log(f"[dfq] measuring each layer's sensitivity at {low} on {len(data.holdout)} held-out synthetic images")
    with run.timed("sensitivity"):
        rows = layer_sensitivity(inputs.loaded.model, config, data.calib, data.holdout, seed=job.seed)
    mixed = None
    if job.mixed_budget is not None:
        w, a = job.mixed_budget
        try:
            mixed = choose_precision(rows, low, avg_weight_bits=w, avg_act_bits=a,
                                     fixed_8bit={r.name for r in rows if r.kept_8bit})
        except ValueError as exc:
            raise _mixed_budget_error(job, exc) from exc
        run.log(f"[dfq] mixed precision within W{w:g}A{a:g}: average weight bits {mixed.avg_weight_bits:.2f}, "
                f"average activation bits {mixed.avg_act_bits:.2f} (MAC-weighted), "
                f"{sum(p != low for p in mixed.layers.values())} of {len(rows)} layers above {low}")
    return Sensitivity(low, rows, mixed, run.timings["sensitivity"])


# -- quantize + calibrate ---------------------------------------------------------------------

@dataclass
class Quantized:
    qmodel: QuantizedModel
    calibration: CalibrationResult
    fp_twin: onnx.ModelProto          # the FP model's graph (BN folded), before any weight changes
    fp_holdout: torch.Tensor | None   # the FP model's logits on the held-out images
    ties: dict | None = None          # weight steps moved off requantization ties (pipeline.ties)


def _quant_config(run: Run, **fields) -> QuantConfig:
    job = run.job
    policy = {} if job.keep_8bit is None else {"keep_8bit": tuple(job.keep_8bit)}
    settings = {"bits": job.bits, "act_bits": job.act_bits, "reduce_range": job.reduce_range,
                "residual_bits": job.residual_bits, "equalize": job.equalize, "calibration": job.calibration,
                **policy, **fields}
    return run.target.quant_config(**settings)


def quantize_stage(run: Run, inputs: Inputs, data: SyntheticData, sensitivity: Sensitivity | None = None) -> Quantized:
    job = run.job
    mixed = sensitivity.mixed if sensitivity is not None else None
    config = _quant_config(run, **({"layer_precision": mixed.layers} if mixed is not None else {}))
    with run.timed("quantize"):
        qmodel = quantize(inputs.loaded.model, config, data.calib[:2])
        result = calibrate(qmodel, data.calib, holdout=data.holdout, seed=job.seed)
        fp_twin = float_graph(qmodel)
    run.log(f"[dfq] {config.name} for {run.target.name}, method {job.method}: {len(qmodel.layer_bits)} layers, "
            f"{result.num_quantizers} activation quantizers, calibration '{result.method}'")
    if qmodel.equalized:
        run.log(f"[dfq] equalised the channel ranges of {len(qmodel.equalized)} low-bit activations between two "
                f"convs (channel scales up to {max(e.spread for e in qmodel.equalized):.0f}x apart)")
    fp_holdout = None
    if run.recipe.trains or run.recipe.reconstruct or job.bias_correction:
        # what the data-free choices after fine-tuning and after bias correction compare with
        fp_holdout = batched_logits(inputs.loaded.model.eval(), data.holdout, 64)
    return Quantized(qmodel, result, fp_twin, fp_holdout)


# -- reconstruct ------------------------------------------------------------------------------

def reconstruct_stage(run: Run, data: SyntheticData, q: Quantized) -> dict | None:
    """Learned rounding (recipes with ``reconstruct``), kept only if the FP->quantized KL on the
    held-out images fell. Returns the report section."""
    if not run.recipe.reconstruct:
        return None
    cfg = ReconstructConfig.for_budget(run.job.budget, data.images.shape[1:], seed=run.job.seed)
    cfg = dataclasses.replace(cfg, **run.job.reconstruct_overrides)
    kl_before = heldout_kd(q.qmodel, data.holdout, q.fp_holdout)
    saved = {k: v.detach().clone() for k, v in q.qmodel.module.state_dict().items()}
    run.log(f"[dfq] reconstructing the rounding of every layer below 8 bits: {cfg.iterations} iterations of "
            f"batch {cfg.batch} each, on {len(data.calib)} synthetic images")
    with run.timed("reconstruct"):
        result = reconstruct(q.qmodel, data.calib, cfg, progress=run.job.progress)
    kl_after = heldout_kd(q.qmodel, data.holdout, q.fp_holdout)
    kept = kl_after < kl_before
    if not kept:
        q.qmodel.module.load_state_dict(saved)
    run.log(f"[dfq] reconstruction {'kept' if kept else 'undone (it did not lower the held-out KL)'}: "
            f"FP->quantized KL {kl_before:.4f} -> {kl_after:.4f}, {100 * result.flipped:.1f}% of the weights "
            "rounded away from the nearest code")
    return {"config": cfg.to_dict(), "result": result.to_dict(), "kept": kept,
            "heldout_kd": {"before": kl_before, "after": kl_after, "images": len(data.holdout)}}


# -- finetune ---------------------------------------------------------------------------------

def finetune_stage(run: Run, inputs: Inputs, data: SyntheticData, q: Quantized) -> dict:
    """Fine-tune; the fine-tuned model is kept unless the FP->quantized KL on the held-out
    BN-inversion images rose (then the calibrated model is restored). Returns the report section."""
    job, recipe, spec = run.job, run.recipe, inputs.loaded.spec
    section = {"recipe": recipe.to_dict(), "ran": False}
    if not recipe.trains:
        return section
    cfg = FinetuneConfig.for_budget(job.budget, spec.input_size, steps=job.steps, seed=job.seed)
    if job.finetune_overrides:
        cfg = dataclasses.replace(cfg, **job.finetune_overrides)
    qc = q.qmodel.config
    fingerprint = checkpoint_fingerprint(
        model_sha256=inputs.loaded.source["sha256"], arch=spec.name, bits=job.bits, target=job.target,
        method=job.method, seed=job.seed, reduce_range=qc.reduce_range, residual_bits=qc.residual_bits,
        keep_8bit=list(qc.keep_8bit), equalize=qc.equalize, synth=data.config.to_dict(), finetune=cfg.to_dict(),
        processes=run.info.world,
        **({} if qc.precision == Precision(job.bits, job.bits) and not qc.layer_precision
           else {"precision": qc.name, "layer_precision": {k: str(v) for k, v in qc.layer_precision.items()}}))
    kd_before = heldout_kd(q.qmodel, data.holdout, q.fp_holdout)
    calibrated = {k: v.detach().clone() for k, v in q.qmodel.module.state_dict().items()}
    run.log(f"[dfq] fine-tuning ({recipe.name}: {recipe.summary}) for {cfg.steps} steps of batch {cfg.batch}; "
            f"checkpoint {job.checkpoint_path}")
    with run.timed("finetune"):
        try:
            result = finetune(inputs.loaded.model, q.qmodel, recipe, cfg, input_size=spec.input_size,
                              num_classes=spec.num_classes, fixed=(data.calib, data.calib_labels),
                              checkpoint=job.checkpoint_path, fingerprint=fingerprint, resume=job.resume,
                              progress=job.progress, log=run.log, dist_info=run.info)
        except FloatingPointError as exc:
            raise VerificationError(f"{exc}. Nothing was exported. Try fewer --steps or another --seed, and "
                                    "report the command: the default schedules are meant not to diverge.") from exc
    kd_after = heldout_kd(q.qmodel, data.holdout, q.fp_holdout)
    keep_calibrated = kd_after > kd_before
    if keep_calibrated:
        q.qmodel.module.load_state_dict(calibrated)
        run.log(f"[dfq] warning: fine-tuning raised the FP->quantized KL on {len(data.holdout)} held-out synthetic "
                f"images from {kd_before:.4f} to {kd_after:.4f}; exporting the calibrated model from before fine-tuning")
    section.update(ran=True, config=cfg.to_dict(), result=result.to_dict(), seconds=run.timings["finetune"],
                   processes=run.info.world, global_batch=cfg.batch * run.info.world,
                   heldout_kd={"before": kd_before, "after": kd_after, "images": len(data.holdout)},
                   exported="calibrated (before fine-tuning)" if keep_calibrated else "fine-tuned")
    return section


# -- bias correction --------------------------------------------------------------------------

def bias_correct_stage(run: Run, data: SyntheticData, q: Quantized) -> BiasCorrectionResult | None:
    """Bias correction of the model that will be exported (the calibrated, reconstructed or fine-tuned
    one), kept only if it brings the model closer to the FP model's logits on the held-out images,
    except after a reconstruction that nothing fine-tuned, where that KL misjudges small changes and
    only a rise past :data:`RECONSTRUCTION_KL_RATIO` times undoes it (:mod:`dfq.pipeline.bias_correction`)."""
    if not run.job.bias_correction:
        return None
    ratio = 1.0 if run.recipe.trains or not run.recipe.reconstruct else RECONSTRUCTION_KL_RATIO
    with run.timed("bias_correction"):
        result = bias_correct(q.qmodel, data.calib, holdout=data.holdout, fp_logits=q.fp_holdout, max_kl_ratio=ratio)
    if not result.applied:
        state = ("not applied (it did not lower the held-out KL)" if ratio == 1.0 else
                 f"not applied (it raised the held-out KL {ratio:g}x or more)")
    elif result.kl_after is not None and result.kl_after >= result.kl_before:
        state = f"applied after the reconstruction (the held-out KL rose, by less than {ratio:g}x)"
    else:
        state = "applied"
    run.log(f"[dfq] bias correction {state}: FP->quantized KL on {len(data.holdout)} held-out synthetic images "
            f"{result.kl_before:.4f} -> {result.kl_after:.4f}")
    return result


def tie_stage(run: Run, q: Quantized) -> None:
    """Move the weight steps of channels whose requantization can tie (:mod:`dfq.pipeline.ties`), the
    last change to the model before export, so every runtime rounds their outputs alike."""
    report = break_ties(q.qmodel)
    q.ties = report.to_dict()
    if report.moved:
        run.log(f"[dfq] moved the weight step of {report.moved} output channels in {len(report.channels)} layers by "
                f"{100 * NUDGE:.4f}% up or down (at most {ATTEMPTS} times): their requantization could land exactly "
                f"between two codes, which runtimes round apart")
    left = sum(report.unresolved.values())
    if left:
        run.log(f"[dfq] {left} output channels keep a requantization near-tie that moving their weight step did not "
                f"clear; their steps are left as calibrated")


# -- export, verify, measure ------------------------------------------------------------------

@dataclass
class Artifact:
    exported: ExportedOnnx
    onnx_tmp: Path                    # the staged files, read back for every check
    fp_tmp: Path
    violations: list[str]


def export_stage(run: Run, q: Quantized, staged: StagedOutputs) -> Artifact:
    job = run.job
    with run.timed("export"):
        exported = build_onnx(q.qmodel)
        onnx_tmp = staged.stage(job.onnx_path, exported.qdq.SerializeToString())
        fp_tmp = staged.stage(job.fp_onnx_path, q.fp_twin.SerializeToString())
    for rewrite, nodes in exported.rewrites.items():
        run.log(f"[dfq] exact graph rewrite {rewrite}: {', '.join(nodes)} (faster on {run.target.name}'s kernels; "
                "same integer results)")
    return Artifact(exported, onnx_tmp, fp_tmp, run.target.violations(exported.qdq))


def verify_stage(run: Run, inputs: Inputs, data: SyntheticData, q: Quantized, artifact: Artifact) -> dict:
    job = run.job
    if inputs.val_set is not None:
        batches, data_name = iterate_images(inputs.val_set, 100, limit=job.val_limit), str(job.val)
    else:
        batches, data_name = tensor_batches(data.holdout, 32), "held-out synthetic images"
    also_on = {name.replace("-", "_"): _cross_check(get_runtime(name), q.qmodel, artifact.onnx_tmp, job.threads)
               for name in run.target.cross_check_runtimes if get_runtime(name).status()[0]}
    with run.timed("check"):
        fidelity = verify_artifact(inputs.loaded.model, q.qmodel, artifact.onnx_tmp, run.target, batches,
                                   threads=job.threads, also_on=also_on)
    fidelity["data"] = data_name
    return fidelity


def _cross_check(runtime, qmodel: QuantizedModel, path: Path, threads: int) -> CrossCheck:
    """The artifact on ``runtime``, compared with that runtime's reference where it has one."""
    return CrossCheck(runtime.session(path, threads), *(runtime.reference(qmodel) or ()))


def measure_stage(run: Run, inputs: Inputs, artifact: Artifact) -> list[dict]:
    """Speedup of the artifact over the FP32 twin on each of the target's latency runtimes available
    here, timed interleaved in one process. Where the artifact is slower than FP32 the record says
    so, with the runtime's breakdown of where the time goes (per op type, slowest nodes)."""
    job = run.job
    runtimes = [get_runtime(n) for n in run.target.latency_backends if get_runtime(n).status()[0]]
    budget = Budget(warmup=3, seconds=job.latency_seconds, max_iterations=1000)
    shape = tuple(inputs.loaded.spec.input_size)
    with run.timed("latency"):
        records = []
        for r in runtimes:
            for b in job.latency_batches:
                rec = r.measure(artifact.fp_tmp, artifact.onnx_tmp, batch=b, threads=job.threads, budget=budget,
                                input_shape=shape)
                rec["slower_than_fp32"] = rec["speedup"] < 1.0
                rec["deployment_runtime"] = r.name in run.target.deploys_on
                if rec["slower_than_fp32"]:
                    rec["breakdown"] = r.breakdown(artifact.fp_tmp, artifact.onnx_tmp, batch=b, threads=job.threads,
                                                   input_shape=shape)
                records.append(rec)
        return records


# -- report, write, build ---------------------------------------------------------------------

def _quant_section(run: Run, qm: QuantizedModel) -> dict:
    """What the report says about the quantized model: configs, numerics, what every layer runs at."""
    avg_w, avg_a, weight_bytes = average_bits(qm.layer_precision, layer_costs(qm))
    return {"name": qm.config.name, "target": run.target.name, "config": qm.config.to_dict(),
            "numerics": run.target.numerics(qm.config), "layer_bits": qm.layer_bits,
            "layer_precision": {n: str(p) for n, p in qm.layer_precision.items()},
            "equalized": [e.to_dict() for e in qm.equalized],
            "layers_at_8bit": [n for n, p in qm.layer_precision.items()
                               if p == Precision(8, 8) and qm.config.precision != Precision(8, 8)],
            "avg_weight_bits": avg_w, "avg_act_bits": avg_a, "weight_bytes": weight_bytes,
            "activation_quantizers": {n: {"bits": a.bits, "signed": a.signed, "scale": float(a.scale.detach()),
                                          "grid": [a.grid.qmin, a.grid.qmax]}
                                      for n, a in sorted(qm.act_quantizers().items())}}


def report_stage(run: Run, inputs: Inputs, data: SyntheticData, sensitivity: Sensitivity | None, q: Quantized,
                 finetune_section: dict, bias: BiasCorrectionResult | None, artifact: Artifact, fidelity: dict,
                 latency: list[dict], reconstruction: dict | None = None) -> ExportReport:
    job, loaded = run.job, inputs.loaded
    outputs = {"onnx": str(job.onnx_path), "fp_onnx": str(job.fp_onnx_path), "report": str(job.report_path),
               "markdown": str(job.markdown_path)}
    if sensitivity is not None:
        outputs["sensitivity_png"] = str(job.sensitivity_path)
    return ExportReport(
        command=command_line(), commit=run.commit, machine=machine_info(), job=job.to_dict(),
        model={"arch": loaded.spec.name, "spec": loaded.spec.to_dict(), "source": loaded.source},
        synthesis=data.to_dict(job.method), quant={**_quant_section(run, q.qmodel), "requant_ties": q.ties},
        calibration={**q.calibration.to_dict(), "bias_correction": None if bias is None else bias.to_dict()},
        finetune=finetune_section, graph_rewrites=artifact.exported.rewrites, rule_violations=artifact.violations,
        fidelity=fidelity, latency=latency, outputs=outputs, timings_s=run.timings,
        sensitivity=None if sensitivity is None else sensitivity.to_dict(), reconstruction=reconstruction)


def fidelity_problem(f: dict) -> str | None:
    """What is wrong with an artifact whose fidelity numbers are ``f``, or None: agreement with the
    reference below :data:`MIN_AGREEMENT`, or logits further from it than
    :data:`MAX_RELATIVE_LOGIT_ERROR` (with a floor for logits that are all ~0)."""
    if f["agreement"] < MIN_AGREEMENT:
        return (f"The exported ONNX agrees with the fake-quant model on only {100 * f['agreement']:.2f}% of "
                f"top-1 predictions ({f['images']} images); expected at least {100 * MIN_AGREEMENT:.0f}%.")
    if f["relative_logit_error"] > MAX_RELATIVE_LOGIT_ERROR and f["mean_abs_logit_diff"] > 1e-4:
        return (f"The exported ONNX's logits differ from the fake-quant model's by "
                f"{100 * f['relative_logit_error']:.1f}% (median over {f['images']} images of sum |diff| / sum |reference|; "
                f"expected at most {100 * MAX_RELATIVE_LOGIT_ERROR:.0f}%) although {100 * f['agreement']:.2f}% of "
                "the top-1 answers agree: a scale or weight in the artifact is wrong.")
    return None


def check_failure(run: Run, report: ExportReport) -> VerificationError | None:
    """The verification failure of the artifact, if any: a rule its target breaks, or a
    :func:`fidelity_problem`."""
    if report.rule_violations:
        return VerificationError(f"The exported graph breaks {run.target.name}'s Q/DQ rules:\n  "
                                 + "\n  ".join(report.rule_violations))
    problem = fidelity_problem(report.fidelity)
    if problem is not None:
        return VerificationError(f"{problem} The artifact is not trustworthy; the report {run.job.report_path} "
                                 "has the details.")
    return None


def write_stage(run: Run, staged: StagedOutputs, report: ExportReport, artifact: Artifact,
                sensitivity: Sensitivity | None, failure: VerificationError | None) -> None:
    """Rename the verified outputs into place; a rejected artifact goes to ``x.rejected.onnx`` and
    an earlier run's ``x.onnx`` / FP twin (``--force``) are removed, so nothing contradicts the
    report. Once the ONNX is verified the fine-tuning checkpoint is removed."""
    job = run.job
    if failure is not None:
        rejected = job.onnx_path.with_name(job.onnx_path.stem + ".rejected.onnx")
        staged.discard()
        staged.stage(rejected, artifact.exported.qdq.SerializeToString())
        report.status = "rejected"
        report.outputs.update(onnx=None, fp_onnx=None, rejected_onnx=str(rejected))
        failure.message += f" The ONNX was written to {rejected} for inspection."
    report.wall_s = time.perf_counter() - run.t_start
    staged.stage(job.report_path, report.to_json())
    staged.stage(job.markdown_path, report.to_markdown().encode())
    if sensitivity is not None:
        staged.stage(job.sensitivity_path, sensitivity_png(sensitivity.rows, str(sensitivity.precision),
                                                           f"{report.model['arch']} ({run.target.name})"))
    if failure is not None:
        for stale in (job.onnx_path, job.fp_onnx_path):
            stale.unlink(missing_ok=True)
    staged.commit(last=job.onnx_path)
    if failure is None and run.recipe.trains and job.checkpoint_path.exists():
        job.checkpoint_path.unlink()   # the artifact is verified and holds the trained model


def build_stage(run: Run, inputs: Inputs, report: ExportReport) -> EngineNotBuiltError | None:
    """Build the engine from the verified ONNX where TensorRT and a CUDA device exist; otherwise
    the error to raise (exit 9) with the trtexec command for the file that was written. The report
    on disk is rewritten with the engine's status either way."""
    job, shape = run.job, tuple(inputs.loaded.spec.input_size)
    failure = None
    try:
        require_tensorrt(job.onnx_path, job.engine_path, trtexec=trtexec_command(
            job.onnx_path, job.engine_path, input_name="input", input_shape=shape, max_batch=32))
        report.engine = {"status": "built", **build_engine(job.onnx_path, job.engine_path, input_shape=shape)}
    except EngineNotBuiltError as exc:
        report.engine = {"status": "not built", "reason": str(exc)}
        report.status = "engine not built"
        failure = exc
    atomic_write_bytes(job.report_path, report.to_json())
    atomic_write_bytes(job.markdown_path, report.to_markdown().encode())
    return failure
