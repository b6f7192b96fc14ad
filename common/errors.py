"""Errors that the command line turns into one clear paragraph and a documented exit code.

Every failure a user can cause (bad checkpoint, unknown architecture, unwritable output, ...)
raises a subclass of :class:`DfqError`. The CLI prints ``str(error)`` without a traceback
(unless ``--debug``) and exits with ``error.exit_code``. The table is in the README; the
subclasses ``SpeedupError`` (8) and ``BackendUnavailableError`` (9) keep their parents' codes
(docs/benchmarking.md).
"""
from __future__ import annotations

import sys
from typing import Callable


class DfqError(Exception):
    """Base class: a message saying what is wrong and what to do, plus an exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class UsageError(DfqError):
    """Invalid option values or combinations (``--bits 3``, unknown ``--method`` ...)."""

    exit_code = 2


class CheckpointError(DfqError):
    """The checkpoint file is missing, unreadable, unsafe, or does not fit the architecture."""

    exit_code = 3


class ArchitectureError(DfqError):
    """The architecture is unknown or cannot be inferred from the file name."""

    exit_code = 4


class UnsupportedModelError(DfqError):
    """The model holds something dfq cannot quantize or synthesize data for (no BatchNorm, an
    operator the exporter does not know, NaN weights ...)."""

    exit_code = 5


class OutputError(DfqError):
    """The output exists (and ``--force`` was not given) or its location cannot be written."""

    exit_code = 6


class DataError(DfqError):
    """The ``--val`` directory is missing, empty, or not an ImageFolder."""

    exit_code = 7


class VerificationError(DfqError):
    """The exported artifact does not agree with the model it was exported from."""

    exit_code = 8


class EngineNotBuiltError(DfqError):
    """A TensorRT engine was requested but TensorRT or a CUDA device is missing. The ONNX
    was written and verified; the message says how to build the engine from it later."""

    exit_code = 9


class SpeedupError(VerificationError):
    """``dfq-bench``: a measured speedup (FP median / quantized median) is below ``--min-speedup``
    or regressed past ``--max-regression`` against ``--baseline``. Exit code 8, like every
    "the artifact does not do what it should" failure; the result JSON is still written."""


class BackendUnavailableError(EngineNotBuiltError):
    """``dfq-bench``/``dfq-build``: a requested backend cannot run here (ONNX Runtime without
    ``CUDAExecutionProvider`` or without a usable GPU; TensorRT or a CUDA device missing). Exit
    code 9; the message names what is missing."""


def run_cli(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's ``body`` and return its exit code: a :class:`DfqError` becomes one
    ``PROG: error: ...`` paragraph on stderr and its ``exit_code`` (after the summary of the report
    it carries, if any; re-raised with ``debug``), Ctrl-C ``PROG: interrupted`` and 130."""
    try:
        return body()
    except DfqError as exc:
        if debug:
            raise
        report = getattr(exc, "report", None)
        for line in report.summary_lines() if report is not None else ():
            print(line)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
