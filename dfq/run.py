"""``run_export``: one ``dfq-export`` run, the stages of :mod:`dfq.stages` in order."""
from __future__ import annotations

from dfq import stages as S
from dfq.common.files import StagedOutputs
from dfq.common.provenance import git_commit
from dfq.job import ExportJob, remove_empty_directories
from dfq.report import ExportReport


def run_export(job: ExportJob, *, log=print) -> ExportReport | None:
    """Run the whole path; returns the report (also written as JSON and Markdown), or None on a
    torchrun rank other than 0 (they stop after fine-tuning). Errors are :mod:`dfq.common.errors`
    exceptions; a run that fails removes the output directories it created, if nothing was written
    into them, and leaves nothing at the output paths."""
    commit = git_commit()             # the code this run started with
    created = job.check_outputs()
    try:
        return _run_stages(S.start(job, commit, log))
    except BaseException:
        remove_empty_directories(created)
        raise


def _run_stages(run: S.Run) -> ExportReport | None:
    inputs = S.load(run)
    data = S.synthesize_stage(run, inputs)
    sensitivity = S.sensitivity_stage(run, inputs, data)
    quantized = S.quantize_stage(run, inputs, data, sensitivity)
    reconstruction = S.reconstruct_stage(run, data, quantized)
    finetune_section = S.finetune_stage(run, inputs, data, quantized)
    if not run.info.main:
        return None                   # only rank 0 exports, checks and writes
    bias = S.bias_correct_stage(run, data, quantized)
    S.tie_stage(run, quantized)
    with StagedOutputs() as staged:   # nothing reaches an output path before it is verified
        artifact = S.export_stage(run, quantized, staged)
        fidelity = S.verify_stage(run, inputs, data, quantized, artifact)
        latency = S.measure_stage(run, inputs, artifact)
        report = S.report_stage(run, inputs, data, sensitivity, quantized, finetune_section, bias, artifact,
                                fidelity, latency, reconstruction)
        failure = S.check_failure(run, report)
        S.write_stage(run, staged, report, artifact, sensitivity, failure)
    if failure is None and run.job.engine_path is not None:
        failure = S.build_stage(run, inputs, report)
    if failure is not None:
        failure.report = report       # the CLI still prints the summary
        raise failure
    return report
