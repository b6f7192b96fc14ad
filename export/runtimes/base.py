"""What a runtime is for dfq's measurements: something that can time a quantized ONNX against its FP
counterpart, interleaved in one process, and say why it cannot run on this machine.

Records (:func:`make_record`) are flat and the same for every runtime::

    {"backend", "batch", "threads", "fp_ms", "int_ms", "fp_p90_ms", "int_p90_ms", "fp_throughput",
     "int_throughput", "speedup", "fp_iterations", "int_iterations", "fp_precision", "int_precision"}

Times are medians/p90 in milliseconds per run of a whole batch; throughputs are images per second
at the median; ``speedup = fp_ms / int_ms``. A new runtime is one module with a :class:`Runtime`
subclass and one :func:`dfq.export.runtimes.register` call.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path


@dataclasses.dataclass
class Budget:
    """Timing budget per model and (runtime, batch): ``iterations`` timed runs, or (when None)
    ``seconds`` of timed runs (at most ``max_iterations``); spread over ``rounds`` rounds."""

    warmup: int = 10
    iterations: int | None = None
    seconds: float = 3.0
    rounds: int = 3
    max_iterations: int = 100_000

    def ort_kwargs(self) -> dict:
        if self.iterations is not None:
            return {"warmup": self.warmup, "iterations": self.iterations, "min_seconds": 0.0,
                    "max_iterations": self.iterations, "rounds": self.rounds}
        return {"warmup": self.warmup, "iterations": None, "min_seconds": self.seconds,
                "max_iterations": self.max_iterations, "rounds": self.rounds}


def make_record(backend: str, batch: int, threads: int | None, fp: dict, int_: dict, *,
                fp_precision: str = "fp32", int_precision: str = "qdq") -> dict:
    """One result row from two latency dicts (``median_ms``, ``p90_ms``, ``iterations``)."""
    fp_ms, int_ms = float(fp["median_ms"]), float(int_["median_ms"])
    return {"backend": backend, "batch": int(batch), "threads": threads,
            "fp_ms": fp_ms, "int_ms": int_ms, "fp_p90_ms": float(fp["p90_ms"]), "int_p90_ms": float(int_["p90_ms"]),
            "fp_throughput": batch * 1e3 / fp_ms, "int_throughput": batch * 1e3 / int_ms,
            "speedup": fp_ms / int_ms, "fp_iterations": int(fp.get("iterations", 0)),
            "int_iterations": int(int_.get("iterations", 0)), "fp_precision": fp_precision,
            "int_precision": int_precision}


def interleaved(timers: dict, budget: Budget) -> dict[str, list[float]]:
    """The interleaved schedule for timers that are not ORT sessions: warm both, then ``rounds``
    rounds of each timer in turn, each round 1/rounds of the budget after 2 re-warm runs.
    ``timers[k](iterations, min_seconds, max_iterations, warmup) -> [seconds]``."""
    for t in timers.values():
        t(1, 0.0, 1, budget.warmup)
    per_iter = None if budget.iterations is None else max(1, math.ceil(budget.iterations / budget.rounds))
    per_cap = per_iter if per_iter is not None else max(1, budget.max_iterations // budget.rounds)
    per_secs = 0.0 if budget.iterations is not None else budget.seconds / budget.rounds
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(budget.rounds):
        for k, t in timers.items():
            times[k] += t(per_iter or 1, per_secs, per_cap, min(2, budget.warmup))
    return times


class Runtime:
    """One place a model can run (subclasses set ``name`` and override what differs)."""

    name: str
    description: str

    def status(self) -> tuple[bool, str]:
        """(True, description) when the runtime can run here, else (False, what is missing)."""
        return True, self.description

    def unavailable_hint(self, model: Path) -> str:
        """What to do instead, appended to the 'cannot run here' message."""
        return ""

    def session(self, path: Path, threads: int):
        """A session-like object that runs the model on this machine's CPU for the checks
        (``get_inputs()``, ``run(None, feed)``), or None where the runtime is not a CPU one."""
        return None

    def reference(self, qmodel):
        """``(images -> logits, description)``: the fake-quant model as this runtime computes dfq's
        artifacts, where its graph transformations change what the artifact computes; None where
        it runs the QDQ graph as written (it is then compared with the float fake-quant model)."""
        return None

    def preflight(self, int_path: Path, threads: int, input_shape) -> None:
        """Checks before anything is timed (raise UsageError / BackendUnavailableError)."""

    def measure(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, budget: Budget,
                input_shape=None) -> dict:
        raise NotImplementedError

    def breakdown(self, fp_path: Path, int_path: Path, *, batch: int, threads: int, input_shape=None) -> dict | None:
        """Where the time goes in both models (per op type, slowest nodes), or None where this
        runtime cannot say."""
        return None
