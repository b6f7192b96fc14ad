"""Checks of an exported artifact on ONNX Runtime: fidelity to the fake-quant model, accuracy
against the FP model on real images, on held-out synthetic images when there are none."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F


# Two logits closer than this (relative to the image's largest |logit|) are a numerical tie: which of
# them float32 or an integer kernel puts first is arbitrary. Real models almost never have such
# margins; untrained ones (every logit ~equal) do on most images.
TIE_RTOL = 1e-5


def agrees(q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per image: whether ``q``'s top-1 class is ``ref``'s top-1 class or tied with it in ``ref``
    (its ``ref`` logit within :data:`TIE_RTOL` of the maximum)."""
    pick = q.argmax(1)
    best = ref.max(1)
    tol = TIE_RTOL * np.maximum(1.0, np.abs(ref).max(1))
    return ref[np.arange(len(ref)), pick] >= best - tol


@dataclass
class Tally:
    """Running counts over batches of (FP, fake-quant, exported) logits and labels."""

    n: int = 0
    fp_correct: int = 0
    fq_correct: int = 0
    int_correct: int = 0
    agree_int_fq: int = 0
    agree_int_fp: int = 0
    max_abs_diff: float = 0.0
    sum_abs_diff: float = 0.0
    image_errors: list = field(default_factory=list)
    kl_sum: float = 0.0
    numel: int = 0

    def update(self, fp: np.ndarray, fq: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
        self.n += len(q)
        if labels is not None:
            self.fp_correct += int((fp.argmax(1) == labels).sum())
            self.fq_correct += int((fq.argmax(1) == labels).sum())
            self.int_correct += int((q.argmax(1) == labels).sum())
        self.agree_int_fq += int(agrees(q, fq).sum())
        self.agree_int_fp += int(agrees(q, fp).sum())
        diff = np.abs(q - fq)
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self.sum_abs_diff += float(diff.sum())
        self.image_errors += (diff.sum(1) / np.maximum(np.abs(fq).sum(1), 1e-30)).tolist()
        self.numel += diff.size
        self.kl_sum += float(F.kl_div(F.log_softmax(torch.from_numpy(q), 1), F.log_softmax(torch.from_numpy(fp), 1),
                                      log_target=True, reduction="sum"))

    def summary(self, with_labels: bool) -> dict:
        out = {
            "images": self.n,
            "agreement": self.agree_int_fq / max(1, self.n),
            "agreement_with_fp": self.agree_int_fp / max(1, self.n),
            "max_abs_logit_diff": self.max_abs_diff,
            "mean_abs_logit_diff": self.sum_abs_diff / max(1, self.numel),
            # median over images of sum |artifact - reference| / sum |reference|: a wrong scale moves
            # every image, a rounding step flipped by float32 in the reference a few
            "relative_logit_error": float(np.median(self.image_errors)) if self.image_errors else 0.0,
            "kl_fp_to_int": self.kl_sum / max(1, self.n),
        }
        if with_labels:
            out.update(top1_fp=self.fp_correct / max(1, self.n), top1_fakequant=self.fq_correct / max(1, self.n),
                       top1_int=self.int_correct / max(1, self.n))
            out["top1_drop_points"] = 100.0 * (out["top1_fp"] - out["top1_int"])
        return out


@dataclass
class CrossCheck:
    """The artifact on another runtime (``session``), compared with ``reference`` (images -> logits:
    the fake-quant model as that runtime computes dfq's graphs, see
    :meth:`dfq.export.runtimes.base.Runtime.reference`) or, where there is none, with the float
    fake-quant model. Both agreements are kept: the reference one checks the runtime, the
    fake-quant one says how far its arithmetic moves the answers."""

    session: object
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    describes: str | None = None        # what the reference is, for the report
    diagnostic: bool = False            # a variant of the checking runtime (report only), not a deployment runtime
    agree: int = 0
    agree_fakequant: int = 0
    correct: int = 0

    def run(self, images: torch.Tensor) -> np.ndarray:
        feed = {self.session.get_inputs()[0].name: images.numpy().astype(np.float32)}
        return self.session.run(None, feed)[0]

    def update(self, images: torch.Tensor, out: np.ndarray, fq: np.ndarray, labels: np.ndarray | None) -> None:
        """Count one batch: ``out`` is :meth:`run` on ``images``, ``fq`` the fake-quant logits."""
        self.agree_fakequant += int(agrees(out, fq).sum())
        ref = fq if self.reference is None else self.reference(images).float().numpy()
        self.agree += int(agrees(out, ref).sum())
        if labels is not None:
            self.correct += int((out.argmax(1) == labels).sum())

    def summary(self, n: int, with_labels: bool) -> dict:
        out = {"agreement": self.agree / max(1, n),
               "reference": self.describes if self.reference is not None else "fake-quant model (float)"}
        if self.reference is not None:
            out["agreement_float_fakequant"] = self.agree_fakequant / max(1, n)
        if with_labels:
            out["top1"] = self.correct / max(1, n)
        if self.diagnostic:
            out["diagnostic"] = True
        return out


@torch.no_grad()
def compare_on_batches(fp_model: torch.nn.Module, fq_model: torch.nn.Module, session,
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *,
                       progress=None, recheck_margin: float = 1.0, cross_checks: dict | None = None,
                       reference=None) -> dict:
    """Run the FP model, the fake-quant model and the exported ONNX (``session``) on the same
    batches; return agreement (top-1 equal, or numerically tied: :func:`agrees`), logit differences
    and, when labels are given, top-1 of each.
    The torch models run in channels-last memory format (about 1.5x faster convs on the CPU);
    the models are converted in place.

    The fake-quant reference is the model's exact arithmetic: float32 convs differ from the
    artifact's exact integer accumulation in the last bits, which flips a rounding step now and
    then. Images where the exported top-1 differs from the float32 reference, or where the
    reference's top-2 margin is below ``recheck_margin``, are re-run in float64 (8x slower, so
    not for every image), whose result replaces the float32 one.

    ``reference`` (images -> logits), when given, is what ``agreement``, the logit differences and
    ``top1_reference`` compare the artifact with: the fake-quant model evaluated in the target
    runtime's integer arithmetic (:class:`dfq.export.ort_reference.OrtIntegerReference`). The float
    fake-quant model is then still run: ``agreement_float_fakequant`` and ``top1_fakequant``.

    ``cross_checks`` (name -> :class:`CrossCheck`) run the same images on other runtimes: reported
    as ``agreement_<name>`` (with their own reference where they have one), ``top1_<name>``."""
    fq64 = copy.deepcopy(fq_model).double()
    fp_model.to(memory_format=torch.channels_last)
    fq_model.to(memory_format=torch.channels_last)
    tally = Tally()
    rechecked = 0
    cross_checks = cross_checks or {}
    with_labels = False
    float_agree = float_correct = 0
    input_name = session.get_inputs()[0].name
    for images, labels in batches:
        fast = images.contiguous(memory_format=torch.channels_last)
        fp = fp_model(fast).float().numpy()
        fq = fq_model(fast).float().numpy()
        q = session.run(None, {input_name: images.numpy().astype(np.float32)})[0]
        disagree = ~agrees(q, fq)
        cross = {name: c.run(images) for name, c in cross_checks.items()}
        for name, c in cross_checks.items():
            if c.reference is None:
                disagree |= ~agrees(cross[name], fq)
        top2 = np.sort(fq, axis=1)[:, -2:]
        recheck = disagree | (top2[:, 1] - top2[:, 0] < recheck_margin)
        if recheck.any():
            idx = torch.from_numpy(np.nonzero(recheck)[0])
            fq[recheck] = fq64(images[idx].double()).float().numpy()
            rechecked += int(recheck.sum())
        lab = None if labels is None else labels.numpy()
        for name, c in cross_checks.items():
            c.update(images, cross[name], fq, lab)
        with_labels = with_labels or lab is not None
        if reference is not None:
            float_agree += int(agrees(q, fq).sum())
            if lab is not None:
                float_correct += int((fq.argmax(1) == lab).sum())
            tally.update(fp, reference(images).float().numpy(), q, lab)
        else:
            tally.update(fp, fq, q, lab)
        if progress is not None:
            progress.update(len(images))
    out = tally.summary(with_labels)
    out["reference"] = (getattr(reference, "description", "fake-quant model in the runtime's integer arithmetic")
                        if reference is not None else "fake-quant model (float)")
    if reference is not None:
        out["agreement_float_fakequant"] = float_agree / max(1, tally.n)
        if with_labels:
            out["top1_reference"] = out["top1_fakequant"]
            out["top1_fakequant"] = float_correct / max(1, tally.n)
    out["reference_rechecked_float64"] = rechecked
    out["cross_checks"] = {name: c.summary(tally.n, with_labels) for name, c in cross_checks.items()}
    for name, c in out["cross_checks"].items():   # flat keys: agreement_<name>, top1_<name>
        out[f"agreement_{name}"] = c["agreement"]
        if "top1" in c:
            out[f"top1_{name}"] = c["top1"]
    return out


def verify_artifact(fp_model: torch.nn.Module, qmodel, onnx_path, target, batches, *, threads: int,
                    also_on: dict | None = None) -> dict:
    """Fidelity of the artifact at ``onnx_path`` to ``qmodel`` (and top-1 of it, the fake-quant model
    and ``fp_model`` where ``batches`` carry labels), run and referenced as ``target`` says
    (:meth:`dfq.export.targets.Target.verification`). ``also_on`` (name -> :class:`CrossCheck` of
    the same artifact on another runtime) are reported as ``agreement_<name>`` / ``top1_<name>``."""
    check = target.verification(qmodel, onnx_path, threads)
    cross = {name: CrossCheck(session, diagnostic=True) for name, session in check.extra_sessions.items()}
    cross.update(also_on or {})
    fidelity = compare_on_batches(fp_model.eval(), qmodel.module.eval(), check.session, batches,
                                  cross_checks=cross, reference=check.reference)
    if check.reference_float_nodes is not None:
        fidelity["reference_float_nodes"] = check.reference_float_nodes
    fidelity["runtime"] = check.runtime
    return fidelity


def tensor_batches(images: torch.Tensor, batch_size: int, labels: torch.Tensor | None = None):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], None if labels is None else labels[i:i + batch_size]
