"""The settings of one ``dfq-export`` run (:class:`ExportJob`) and the paths it writes; the run
itself is :func:`dfq.run.run_export`."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

from dfq.common.errors import OutputError, UsageError
from dfq.common.files import remove_orphaned_temporaries
from dfq.export.targets import engine_target, get_target, target_names
from dfq.pipeline.quantize import CALIBRATION_RULES, CalibrationRule, Precision
from dfq.pipeline.recipes import RECIPES, default_method
from dfq.pipeline.synthesize import Budget

BUDGETS: tuple[str, ...] = get_args(Budget)
METHODS = tuple(RECIPES)
ENGINE_SUFFIXES = (".engine", ".plan")
DEFAULT_TARGET = "onnxruntime"


@dataclass
class ExportJob:
    """Everything one ``dfq-export`` run needs; written into the report so a run can be repeated."""

    model: str
    out: str
    arch: str | None = None
    bits: int = 8                         # weight bits (and activation bits unless act_bits)
    act_bits: int | None = None           # bits of the activations conv/linear layers read; None: bits
    # None: the engine target (tensorrt) for an engine output (.engine/.plan), else onnxruntime
    target: str | None = None
    method: str | None = None             # None: default_method of the precision (recon below W8A8, else acq)
    steps: int | None = None              # fine-tuning steps (default: the budget's)
    resume: bool = False                  # continue the fine-tuning checkpoint of an interrupted run
    checkpoint: str | None = None         # default: <out stem>.finetune.ckpt beside the ONNX
    val: str | None = None
    val_limit: int | None = None
    budget: Budget = "default"
    seed: int = 0
    reduce_range: bool | None = None      # None: QuantConfig's default for the target
    residual_bits: int | None = None      # None: QuantConfig's default, 8 (see QuantConfig.residual_bits)
    bias_correction: bool = True          # empirical bias correction of the exported model (dfq.pipeline.bias_correction)
    equalize: bool = False                # cross-layer equalisation of low-bit activations (dfq.pipeline.equalize)
    # activation-range rule (QuantConfig.calibration); "auto" scores the rules on held-out synthetic images
    calibration: CalibrationRule = "auto"
    keep_8bit: tuple[str, ...] | None = None   # None: QuantConfig's default layer policy (first conv, last linear)
    # mixed precision: (average weight bits, average activation bits) to stay within; each layer
    # runs at 8 bits or at bits/act_bits, chosen from the per-layer sensitivities
    mixed_budget: tuple[float, float] | None = None
    sensitivity: bool = False             # measure per-layer sensitivity also at W8A8 (as W4A4)
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
    # API-level overrides of the budget's ReconstructConfig fields (e.g. {"iterations": 50})
    reconstruct_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.act_bits is None:
            self.act_bits = self.bits
        try:
            precision = Precision(self.bits, self.act_bits)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.mixed_budget is not None:
            w, a = self.mixed_budget
            if not (precision.weights <= w <= 8 and precision.activations <= a <= 8) or precision == Precision(8, 8):
                raise UsageError(f"--mixed-budget W{w:g}A{a:g} must lie between --bits {precision} and W8A8 (each layer "
                                 f"runs at {precision} or at 8 bits); give a lower --bits, e.g. --bits 4.")
        if self.calibration not in CALIBRATION_RULES:
            raise UsageError(f"--calibration {self.calibration!r} is unknown: use one of {', '.join(CALIBRATION_RULES)}.")
        if self.target is None:
            self.target = engine_target().name if self.engine_path is not None else DEFAULT_TARGET
        if self.target not in target_names():
            raise UsageError(f"--target {self.target!r} is unknown: use one of {', '.join(target_names())}.")
        missing = get_target(self.target).unavailable()
        if missing is not None:
            raise UsageError(f"--target {self.target} verifies its artifact on a runtime that is not usable here: {missing}")
        if self.engine_path is not None and not get_target(self.target).builds_engines:
            raise UsageError(f"--out {self.out} asks for a TensorRT engine, but --target {self.target} makes an ONNX that "
                             f"TensorRT cannot build. Drop --target (an engine output selects the {engine_target().name} "
                             "flavour) or write a .onnx.")
        named_method = self.method is not None
        if not named_method:
            self.method = default_method(precision.weights, precision.activations)
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
            chosen = f"--method {self.method}" if named_method else f"{precision}'s default method, {self.method},"
            raise UsageError(f"{chosen} does not fine-tune, so --steps/--resume do not apply; "
                             "choose a fine-tuning method (e.g. --method acq, or acq-recon to fine-tune after "
                             "the reconstruction).")
        if self.reconstruct_overrides and not RECIPES[self.method].reconstruct:
            raise UsageError(f"--method {self.method} does not reconstruct, so --recon-iters does not apply; "
                             "choose recon or acq-recon.")

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

    @property
    def sensitivity_path(self) -> Path:
        return self.onnx_path.with_name(self.onnx_path.stem + ".sensitivity.png")

    @property
    def measures_sensitivity(self) -> bool:
        """Per-layer sensitivity is measured below W8A8, for a mixed budget, or when asked for."""
        return self.sensitivity or self.mixed_budget is not None or min(self.bits, self.act_bits) < 8

    def outputs(self) -> list[Path]:
        paths = [self.onnx_path, self.fp_onnx_path, self.report_path, self.markdown_path]
        paths += [self.sensitivity_path] if self.measures_sensitivity else []
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
