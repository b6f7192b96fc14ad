"""The whole ``dfq-export`` path as one function over a config: load -> synthesize -> quantize ->
calibrate -> export -> check -> report (-> build the engine where TensorRT and a GPU exist)."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

from dfq import distributed as D
from dfq.common.errors import (EngineNotBuiltError, OutputError, UnsupportedModelError, UsageError,
                               VerificationError)
from dfq.common.files import StagedOutputs, atomic_write_bytes, remove_orphaned_temporaries
from dfq.export.check import compare_on_batches, tensor_batches
from dfq.export.exact import exact_integer_graph
from dfq.export.onnx_export import build_onnx, float_graph
from dfq.export.ort_reference import OrtIntegerReference
from dfq.export.ort_runtime import compare_latency, make_session
from dfq.export.rules import tensorrt_violations
from dfq.export.tensorrt import build_engine, require_tensorrt, trtexec_command
from dfq.kernels.fake_quant import activation_grid, weight_grid
from dfq.pipeline.calibrate import batched_logits, bias_correct, calibrate, heldout_kd
from dfq.pipeline.data import image_folder, iterate_images
from dfq.pipeline.finetune import FinetuneConfig, checkpoint_fingerprint, finetune
from dfq.pipeline.load import has_batchnorm, load_model
from dfq.pipeline.models import is_small_input
from dfq.pipeline.quantize import QuantConfig, quantize, unmatched_patterns
from dfq.pipeline.recipes import DEFAULT_METHOD, RECIPES
from dfq.pipeline.synthesize import SynthConfig, synthesize, synthesize_batches
from dfq.report import command_line, git_commit, machine_info, to_json, to_markdown

BUDGETS = ("fast", "default", "long")

METHODS = tuple(RECIPES)
ENGINE_SUFFIXES = (".engine", ".plan")

# An exported artifact that disagrees with the model it came from more often than this is a
# defect, not a quantization loss: the run fails with VerificationError.
MIN_AGREEMENT = 0.99


@dataclass
class ExportJob:
    """Everything one ``dfq-export`` run needs; written into the report so a run can be repeated."""

    model: str
    out: str
    arch: str | None = None
    bits: int = 8
    # None: tensorrt for an engine output (.engine/.plan), else onnxruntime
    target: Literal["onnxruntime", "tensorrt"] | None = None
    method: str = DEFAULT_METHOD
    steps: int | None = None              # fine-tuning steps (default: the budget's)
    resume: bool = False                  # continue the fine-tuning checkpoint of an interrupted run
    checkpoint: str | None = None         # default: <out stem>.finetune.ckpt beside the ONNX
    val: str | None = None
    val_limit: int | None = None
    budget: Literal["fast", "default", "long"] = "default"
    seed: int = 0
    reduce_range: bool | None = None      # None: QuantConfig's default for the target
    residual_bits: int | None = None      # None: QuantConfig's default, 8 (see QuantConfig.residual_bits)
    bias_correction: bool = True          # see QuantConfig.bias_correction
    keep_8bit: tuple[str, ...] | None = None   # None: QuantConfig's default layer policy (first conv, last linear)
    report: str | None = None
    force: bool = False
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    latency_batches: tuple[int, ...] = (1,)
    latency_seconds: float = 3.0          # timed seconds per model per batch size (after warm-up)
    progress: bool = True
    # API-level overrides of the budget's SynthConfig fields (e.g. {"num_images": 32, "steps": 5})
    synth_overrides: dict = field(default_factory=dict)
    # API-level overrides of the budget's FinetuneConfig fields (e.g. {"batch": 8})
    finetune_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"--bits {self.bits} is not supported: use --bits 8 (W8A8) or --bits 4 (W4A4).")
        if self.target is None:
            self.target = "tensorrt" if self.engine_path is not None else "onnxruntime"
        if self.engine_path is not None and self.target != "tensorrt":
            raise UsageError(f"--out {self.out} asks for a TensorRT engine, but --target {self.target} makes an ONNX that "
                             "TensorRT cannot build (UINT8 activations, non-zero zero points). Drop --target (an engine "
                             "output selects the tensorrt flavour) or write a .onnx for ONNX Runtime.")
        if self.target not in ("onnxruntime", "tensorrt"):
            raise UsageError(f"--target {self.target!r} is unknown: use onnxruntime or tensorrt.")
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r} is not available: choose from {', '.join(METHODS)}.")
        if self.budget not in BUDGETS:
            raise UsageError(f"--budget {self.budget!r} is unknown: use one of {', '.join(BUDGETS)}.")
        if self.threads < 1:
            raise UsageError("--threads must be at least 1.")
        if any(b < 1 for b in self.latency_batches):
            raise UsageError("latency batch sizes must be at least 1.")
        if self.val_limit is not None and self.val_limit < 1:
            raise UsageError("--val-limit must be at least 1.")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be at least 1.")
        if (self.steps is not None or self.resume) and not RECIPES[self.method].trains:
            raise UsageError(f"--method {self.method} does not fine-tune, so --steps/--resume do not apply; "
                             "choose a fine-tuning method (e.g. --method acq).")

    # -- output paths ------------------------------------------------------------------------
    @property
    def engine_path(self) -> Path | None:
        p = Path(self.out)
        return p if p.suffix in ENGINE_SUFFIXES else None

    @property
    def onnx_path(self) -> Path:
        p = Path(self.out)
        return p.with_suffix(".onnx") if p.suffix in ENGINE_SUFFIXES else p

    @property
    def fp_onnx_path(self) -> Path:
        return self.onnx_path.with_name(self.onnx_path.stem + ".fp32.onnx")

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else self.onnx_path.with_name(self.onnx_path.stem + ".report.json")

    @property
    def markdown_path(self) -> Path:
        return self.report_path.with_suffix(".md")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else self.onnx_path.with_name(
            self.onnx_path.stem + ".finetune.ckpt")

    def outputs(self) -> list[Path]:
        paths = [self.onnx_path, self.fp_onnx_path, self.report_path, self.markdown_path]
        return paths + ([self.engine_path] if self.engine_path else [])

    def check_outputs(self) -> list[Path]:
        """Before any work: the output suffix is known and nothing is overwritten without --force;
        missing output directories are created (returned, so a run that fails can remove them)."""
        suffix = Path(self.out).suffix
        if suffix not in (".onnx",) + ENGINE_SUFFIXES:
            raise UsageError(f"--out {self.out}: the output must end in .onnx (ONNX artifact) or .engine/.plan "
                             "(TensorRT engine, with the ONNX written beside it).")
        existing = [str(p) for p in self.outputs() if p.exists()]
        if existing and not self.force:
            raise OutputError(f"Output already exists: {', '.join(existing)}. Pass --force to overwrite, "
                              "or choose another --out.")
        if RECIPES[self.method].trains and not self.resume and not self.force and self.checkpoint_path.exists():
            raise OutputError(f"A fine-tuning checkpoint from an earlier, unfinished run exists: {self.checkpoint_path}. "
                              "Pass --resume to continue it (same command), or --force to start over.")
        created = []
        for p in self.outputs() + [self.checkpoint_path]:
            created += _make_directory(p.parent if str(p.parent) else Path("."))
        for p in self.outputs() + [self.checkpoint_path]:
            remove_orphaned_temporaries(p)   # left by a killed earlier run of this command
        return created

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_batches"] = list(self.latency_batches)
        return d


def _make_directory(parent: Path) -> list[Path]:
    """Create ``parent`` (and its missing ancestors) unless it exists; returns what was created,
    deepest first. Raises OutputError when it cannot be created or written."""
    missing = [d for d in [parent, *parent.parents] if not d.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"The output directory {parent} cannot be created ({exc.strerror or exc}); "
                          "choose another --out.") from exc
    if not parent.is_dir():
        raise OutputError(f"The output location {parent} is not a directory; choose another --out.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"The output directory {parent} is not writable; choose another --out.")
    return missing


def remove_empty_directories(created: list[Path]) -> None:
    """Undo :meth:`ExportJob.check_outputs`' directory creation where nothing was written into them."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            pass


def _numerics(bits: int, target: str, reduce_range: bool) -> str:
    w = weight_grid(bits, reduce_range)
    a_u = activation_grid(bits, False, target)
    a_s = activation_grid(bits, True, target)
    container = "INT8" if target == "tensorrt" else "UINT8 activations (signed ones with zero point 128) / INT8 weights"
    text = (f"weights per-channel symmetric on [{w.qmin}, {w.qmax}]; activations per-tensor on "
            f"[{a_u.qmin}, {a_u.qmax}] after ReLU/ReLU6, [{a_s.qmin}, {a_s.qmax}] otherwise; stored as {container}")
    if bits == 4:
        text += ("; 4-bit numerics run on INT8 kernels (4-bit grids in INT8 containers, activations clipped "
                 "to the 4-bit range): this is not an INT4 engine")
    return text


def _check_layer_patterns(patterns, model) -> None:
    """Every ``--keep-8bit`` glob must name at least one conv/linear layer (a typo would otherwise
    silently quantize the layer at the low bit width)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    missing = unmatched_patterns(patterns, names)
    if missing:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise UsageError(f"--keep-8bit {missing[0]!r} matches no conv/linear layer of the model. Layer names look like: "
                         f"{shown} (globs such as '*depthwise*' or 'layer3.*' work; @first and @last name the "
                         "first conv and the last linear).")


def run_export(job: ExportJob, *, log=print) -> dict:
    """Run the whole path; returns the report (also written as JSON and Markdown). A run that
    fails removes the output directories it created, if nothing was written into them."""
    created = job.check_outputs()
    try:
        return _run_export(job, log)
    except BaseException:
        remove_empty_directories(created)
        raise


def _run_export(job: ExportJob, log) -> dict:
    t_start = time.perf_counter()
    commit = git_commit()             # the code this run started with
    timings: dict[str, float] = {}
    info = D.init_from_env()          # torchrun: data-parallel synthesis and fine-tuning
    if not info.main:
        log = lambda msg: None        # noqa: E731 - rank 0 speaks for the run
    loaded = load_model(job.model, job.arch)
    spec = loaded.spec
    if not has_batchnorm(loaded.model):
        raise UnsupportedModelError(
            f"{job.model} ({spec.name}) has no BatchNorm layers: data-free synthesis reads the "
            "BatchNorm running statistics, so this model cannot be quantized without data. dfq has "
            "no real-data calibration option yet.")
    if job.keep_8bit:
        _check_layer_patterns(job.keep_8bit, loaded.model)
    val_set = None
    if job.val:
        val_set = image_folder(job.val, spec)
    torch.manual_seed(job.seed)
    timings["load"] = time.perf_counter() - t_start

    # synthesize -------------------------------------------------------------------------------
    t = time.perf_counter()
    # Methods with a generator spend the budget on fine-tuning; their BN-inversion images only
    # initialise the activation ranges (which then train), so they use the fast set.
    synth_budget = "fast" if RECIPES[job.method].generator in ("conditional", "acq") else job.budget
    synth_cfg = SynthConfig.for_budget(synth_budget, spec.input_size, seed=job.seed)
    if job.synth_overrides:
        overrides = dict(job.synth_overrides)
        if "num_images" in overrides and "batch_size" not in overrides:
            overrides["batch_size"] = min(synth_cfg.batch_size, overrides["num_images"])
        synth_cfg = dataclasses.replace(synth_cfg, **overrides)
    purpose = "calibration images" if synth_budget != job.budget else "images"
    log(f"[dfq] synthesizing {synth_cfg.num_images} {purpose} from {spec.name}'s BatchNorm statistics "
        f"(BN inversion, budget {synth_budget})")
    if info.enabled:
        parts = list(synthesize_batches(loaded.model, spec.input_size, spec.mean, spec.std, spec.num_classes,
                                        synth_cfg, progress=job.progress and info.main,
                                        shard=(info.rank, info.world)))
        mine = [b for b in range(synth_cfg.num_batches) if b % info.world == info.rank]
        index = torch.cat([torch.arange(b * synth_cfg.batch_size, b * synth_cfg.batch_size + len(y))
                           for b, (_, y) in zip(mine, parts)]) if parts else torch.zeros(0, dtype=torch.int64)
        local_x = torch.cat([x for x, _ in parts]) if parts else torch.zeros(0, *spec.input_size)
        local_y = torch.cat([y for _, y in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        order = D.all_gather_cat(index, info).argsort()
        images = D.all_gather_cat(local_x.contiguous(), info)[order]
        synth_labels = D.all_gather_cat(local_y, info)[order]
    else:
        images, synth_labels = synthesize(loaded.model, spec.input_size, spec.mean, spec.std, spec.num_classes,
                                          synth_cfg, progress=job.progress)
    timings["synthesize"] = time.perf_counter() - t

    # quantize + calibrate ---------------------------------------------------------------------
    t = time.perf_counter()
    holdout_n = max(8, len(images) // 4)
    calib, holdout = images[:-holdout_n], images[-holdout_n:]
    policy = {} if job.keep_8bit is None else {"keep_8bit": tuple(job.keep_8bit)}
    qconfig = QuantConfig(bits=job.bits, target=job.target, reduce_range=job.reduce_range,
                          residual_bits=job.residual_bits, bias_correction=job.bias_correction, **policy)
    qmodel = quantize(loaded.model, qconfig, calib[:2])
    calib_result = calibrate(qmodel, calib, holdout=holdout, seed=job.seed)
    fp_twin = float_graph(qmodel)     # the FP model itself (BN folded): before fine-tuning and bias correction
    timings["quantize"] = time.perf_counter() - t
    log(f"[dfq] {qconfig.name} for {job.target}: {len(qmodel.layer_bits)} layers, "
        f"{calib_result.num_quantizers} activation quantizers, calibration '{calib_result.method}'")

    # the FP model's logits on the held-out synthetic images: what the data-free choices after
    # fine-tuning and after bias correction compare with
    recipe = RECIPES[job.method]
    fp_holdout = None
    if recipe.trains or qconfig.bias_correction:
        fp_holdout = batched_logits(loaded.model.eval(), holdout, 64)

    # fine-tune --------------------------------------------------------------------------------
    finetune_report = {"recipe": recipe.to_dict(), "ran": False}
    if recipe.trains:
        t = time.perf_counter()
        ft_cfg = FinetuneConfig.for_budget(job.budget, spec.input_size, steps=job.steps, seed=job.seed)
        if job.finetune_overrides:
            ft_cfg = dataclasses.replace(ft_cfg, **job.finetune_overrides)
        fingerprint = checkpoint_fingerprint(
            model_sha256=loaded.source["sha256"], arch=spec.name, bits=job.bits, target=job.target,
            method=job.method, seed=job.seed, reduce_range=qconfig.reduce_range,
            residual_bits=qconfig.residual_bits, keep_8bit=list(qconfig.keep_8bit), synth=synth_cfg.to_dict(),
            finetune=ft_cfg.to_dict(), processes=info.world)
        kd_before = heldout_kd(qmodel, holdout, fp_holdout)
        calibrated_state = {k: v.detach().clone() for k, v in qmodel.module.state_dict().items()}
        log(f"[dfq] fine-tuning ({recipe.name}: {recipe.summary}) for {ft_cfg.steps} steps of batch {ft_cfg.batch}; "
            f"checkpoint {job.checkpoint_path}")
        try:
            ft = finetune(loaded.model, qmodel, recipe, ft_cfg, input_size=spec.input_size,
                          num_classes=spec.num_classes, fixed=(calib, synth_labels[:len(calib)]),
                          checkpoint=job.checkpoint_path, fingerprint=fingerprint, resume=job.resume,
                          progress=job.progress, log=log, dist_info=info)
        except FloatingPointError as exc:
            raise VerificationError(f"{exc}. Nothing was exported. Try fewer --steps or another --seed, and "
                                    "report the command: the default schedules are meant not to diverge.") from exc
        timings["finetune"] = time.perf_counter() - t
        finetune_report.update(ran=True, config=ft_cfg.to_dict(), result=ft.to_dict(), seconds=timings["finetune"],
                               processes=info.world, global_batch=ft_cfg.batch * info.world)
        # Data-free model choice (never the validation images): the fine-tuned model is exported
        # unless the FP->quantized KL on the held-out BN-inversion images (which neither calibration
        # ranges nor fine-tuning saw) rose; then the calibrated model is kept (seen: EfficientNet-Lite0
        # W8A8, fast budget).
        kd_after = heldout_kd(qmodel, holdout, fp_holdout)
        keep_calibrated = kd_after > kd_before
        if keep_calibrated:
            qmodel.module.load_state_dict(calibrated_state)
        finetune_report["heldout_kd"] = {"before": kd_before, "after": kd_after, "images": len(holdout)}
        finetune_report["exported"] = "calibrated (before fine-tuning)" if keep_calibrated else "fine-tuned"
        if keep_calibrated and info.main:
            log(f"[dfq] warning: fine-tuning raised the FP->quantized KL on {len(holdout)} held-out synthetic images "
                f"from {kd_before:.4f} to {kd_after:.4f}; exporting the calibrated model from before fine-tuning")
    if not info.main:
        # only rank 0 exports, checks and writes; the other ranks are done
        return {"kind": "dfq-export-worker", "rank": info.rank, "processes": info.world}

    # bias correction of the model that will be exported (the calibrated or the fine-tuned one): last,
    # because fine-tuning from a bias-corrected start was measured worse (ResNet-20 W4A4 acq fast,
    # seed 0: held-out KL after fine-tuning 0.415 vs 0.369, drop 4.70 vs 4.56)
    bias_result = None
    if qconfig.bias_correction:
        t = time.perf_counter()
        small = is_small_input(spec.input_size)
        # kept only if it brings the model closer to the FP model itself (after fine-tuning the
        # quantizers-off model is not the FP model any more)
        bias_result = bias_correct(qmodel, calib, holdout=holdout, fp_logits=fp_holdout,
                                   max_images=256 if small else 64)
        timings["bias_correction"] = time.perf_counter() - t
        log("[dfq] bias correction " + ("applied" if bias_result.applied else "not applied (it did not lower the held-out KL)")
            + f": FP->quantized KL on {len(holdout)} held-out synthetic images {bias_result.kl_before:.4f} -> "
              f"{bias_result.kl_after:.4f}")

    # export -----------------------------------------------------------------------------------
    t = time.perf_counter()
    # Every output is staged as a temporary file beside its path, checked, and renamed into place
    # only once verified; a failed write or check leaves nothing at the output paths.
    staged = StagedOutputs()
    try:
        return _check_and_write(job, staged, exported=build_onnx(qmodel), fp_twin=fp_twin, t_export=t,
                                loaded=loaded, spec=spec, qmodel=qmodel, qconfig=qconfig, calib_result=calib_result,
                                bias_result=bias_result, finetune_report=finetune_report, recipe=recipe,
                                images=images, holdout=holdout, synth_cfg=synth_cfg, val_set=val_set,
                                timings=timings, commit=commit, t_start=t_start, log=log)
    finally:
        staged.discard()


def _check_and_write(job, staged, *, exported, fp_twin, t_export, loaded, spec, qmodel, qconfig, calib_result,
                     bias_result, finetune_report, recipe, images, holdout, synth_cfg, val_set, timings, commit,
                     t_start, log) -> dict:
    onnx_tmp = staged.stage(job.onnx_path, exported.qdq.SerializeToString())
    fp_tmp = staged.stage(job.fp_onnx_path, fp_twin.SerializeToString())
    timings["export"] = time.perf_counter() - t_export
    for rewrite, nodes in exported.rewrites.items():
        log(f"[dfq] exact graph rewrite {rewrite}: {', '.join(nodes)} (ONNX Runtime's fused kernels run it faster; "
            "same integer results)")
    violations = tensorrt_violations(exported.qdq) if job.target == "tensorrt" else []

    # check ------------------------------------------------------------------------------------
    t = time.perf_counter()
    # The onnxruntime flavour is checked on the kernels it deploys to (ORT's fused integer ops).
    # The tensorrt flavour is checked against what an INT8 engine computes: integer convolutions
    # accumulated exactly, scaled once (dfq.export.exact rewrites the artifact read back from
    # disk so that ORT's float kernels do exactly that). ORT's fused x86 kernels would add their
    # own int16 saturation for full-range weights, and its unfused float path rounds every
    # product, which flips about 1% of ResNet-20's answers through 20 layers.
    exact = make_session(exact_integer_graph(onnx.load(str(onnx_tmp))), threads=job.threads,
                         optimization="disable")
    extra_sessions = {}
    if job.target == "tensorrt":
        session = exact
        check_runtime = "onnxruntime, integer-exact evaluation of the QDQ graph (int32 accumulation as in TensorRT)"
    else:
        session = make_session(str(onnx_tmp), threads=job.threads, optimization="all")
        extra_sessions["exact"] = exact
        check_runtime = ("onnxruntime, all graph optimizations (its fused integer kernels); agreement_exact: "
                         "integer-exact evaluation of the same graph vs the float fake-quant model")
    if val_set is not None:
        batches = iterate_images(val_set, 100, limit=job.val_limit)
        data_name = str(job.val)
    else:
        batches = tensor_batches(holdout, 32)
        data_name = "held-out synthetic images"
    reference = None
    if job.target == "onnxruntime":
        # agreement is measured against the fake-quant model evaluated in ORT's integer
        # arithmetic (exact accumulation, float32 requantization as its fused kernels do it): the
        # float model rounds differently near ties, which no artifact can reproduce
        reference = OrtIntegerReference(qmodel)
    fidelity = compare_on_batches(loaded.model.eval(), qmodel.module.eval(), session, batches,
                                  extra_sessions=extra_sessions, reference=reference)
    if reference is not None:
        fidelity["reference_float_nodes"] = reference.float_nodes
    fidelity["data"] = data_name
    fidelity["runtime"] = check_runtime
    timings["check"] = time.perf_counter() - t

    t = time.perf_counter()
    latency = []
    for b in job.latency_batches:
        res = compare_latency(str(fp_tmp), str(onnx_tmp), batch=b, threads=job.threads,
                              min_seconds=job.latency_seconds, warmup=3)
        res.update(batch=b, threads=job.threads)
        latency.append(res)
    timings["latency"] = time.perf_counter() - t

    report = {
        "kind": "dfq-export",
        "command": command_line(),
        "commit": commit,
        "machine": machine_info(),
        "job": job.to_dict(),
        "model": {"arch": spec.name, "spec": spec.to_dict(), "source": loaded.source},
        "synthesis": {"method": job.method, "num_images": len(images), "config": synth_cfg.to_dict(),
                      "seconds": timings["synthesize"]},
        "quant": {"name": qconfig.name, "target": job.target, "config": qconfig.to_dict(),
                  "numerics": _numerics(job.bits, job.target, qconfig.reduce_range),
                  "layer_bits": qmodel.layer_bits,
                  "layers_at_8bit": [n for n, b in qmodel.layer_bits.items() if b == 8 and job.bits != 8],
                  "activation_quantizers": {n: {"bits": q.bits, "signed": q.signed, "scale": float(q.scale.detach()),
                                                "grid": [q.grid.qmin, q.grid.qmax]}
                                            for n, q in sorted(qmodel.act_quantizers().items())}},
        "calibration": {**calib_result.to_dict(),
                        "bias_correction": None if bias_result is None else bias_result.to_dict()},
        "finetune": finetune_report,
        "graph_rewrites": exported.rewrites,
        "tensorrt_rule_violations": violations,
        "fidelity": fidelity,
        "latency": latency,
        "outputs": {"onnx": str(job.onnx_path), "fp_onnx": str(job.fp_onnx_path),
                    "report": str(job.report_path), "markdown": str(job.markdown_path)},
        "timings_s": timings,
    }
    failure = None
    if violations:
        failure = VerificationError("The exported graph breaks TensorRT's Q/DQ rules:\n  " + "\n  ".join(violations))
    elif fidelity["agreement"] < MIN_AGREEMENT:
        failure = VerificationError(
            f"The exported ONNX agrees with the fake-quant model on only {100 * fidelity['agreement']:.2f}% of "
            f"top-1 predictions ({fidelity['images']} images); expected at least {100 * MIN_AGREEMENT:.0f}%. "
            f"The artifact is not trustworthy; the report {job.report_path} has the details.")
    if failure is not None:
        # an artifact that failed its check never sits at the path a deployment would pick up
        rejected = job.onnx_path.with_name(job.onnx_path.stem + ".rejected.onnx")
        staged.discard()
        staged.stage(rejected, exported.qdq.SerializeToString())
        report["status"] = "rejected"
        report["outputs"].update(onnx=None, fp_onnx=None, rejected_onnx=str(rejected))
        failure.message += f" The ONNX was written to {rejected} for inspection."
    report.setdefault("status", "ok")
    report["wall_s"] = time.perf_counter() - t_start
    staged.stage(job.report_path, to_json(report))
    staged.stage(job.markdown_path, to_markdown(report).encode())
    if failure is not None:
        for stale in (job.onnx_path, job.fp_onnx_path):   # an earlier run's files (--force) would contradict the report
            stale.unlink(missing_ok=True)
    staged.commit(last=job.onnx_path)
    if recipe.trains and job.checkpoint_path.exists() and failure is None:
        job.checkpoint_path.unlink()   # the artifact is verified and holds the trained model
    if failure is None and job.engine_path is not None:
        failure = _build_engine(job, spec, report)
    if failure is not None:
        failure.report = report  # the CLI still prints the summary
        raise failure
    return report


def _build_engine(job: ExportJob, spec, report: dict):
    """Build the engine from the verified ONNX; the EngineNotBuiltError to raise where TensorRT or a
    CUDA device is missing (the report on disk is rewritten with the engine's status either way)."""
    failure = None
    try:
        require_tensorrt(job.onnx_path, job.engine_path, trtexec=trtexec_command(
            job.onnx_path, job.engine_path, input_name="input", input_shape=tuple(spec.input_size), max_batch=32))
        report["engine"] = {"status": "built", **build_engine(job.onnx_path, job.engine_path,
                                                               input_shape=tuple(spec.input_size))}
    except EngineNotBuiltError as exc:
        report["engine"] = {"status": "not built", "reason": str(exc)}
        report["status"] = "engine not built"
        failure = exc
    atomic_write_bytes(job.report_path, to_json(report))
    atomic_write_bytes(job.markdown_path, to_markdown(report).encode())
    return failure


def summary_lines(report: dict) -> list[str]:
    f = report["fidelity"]
    lines = [f"[dfq] wrote {report['outputs']['onnx']} ({report['quant']['name']}, target {report['quant']['target']})"]
    lines.append(f"[dfq] agreement with the {f.get('reference', 'fake-quant model')}: {100 * f['agreement']:.2f}% on "
                 f"{f['images']} {f['data']} (max |logit diff| {f['max_abs_logit_diff']:.3g})"
                 + (f"; with the float fake-quant model {100 * f['agreement_float_fakequant']:.2f}%"
                    if "agreement_float_fakequant" in f else ""))
    if "top1_fp" in f:
        lines.append(f"[dfq] top-1: FP {100 * f['top1_fp']:.2f}%  exported {100 * f['top1_int']:.2f}%  "
                     f"(drop {f['top1_drop_points']:.2f} points)")
    for lat in report["latency"]:
        lines.append(f"[dfq] ORT latency batch {lat['batch']} ({lat['threads']} threads): FP32 {lat['fp']['median_ms']:.2f} ms, "
                     f"quantized {lat['int']['median_ms']:.2f} ms, speedup {lat['speedup']:.2f}x")
    lines.append(f"[dfq] report: {report['outputs']['report']} and {report['outputs']['markdown']}"
                 f" ({report['wall_s']:.0f} s)")
    return lines
