"""The generator's loss terms, one registered function each; recipes weight them by name.

A term is ``fn(batch) -> 0-d tensor`` over a :class:`GeneratorBatch`: one generated batch as the
FP teacher sees it (logits, BatchNorm inputs, penultimate features) plus the fine-tuning state the
term needs (student, discriminators, class centroids). The formulas live in
:mod:`dfq.pipeline.losses`; the registry says which one each name means:

==================  ==========================================================================
``ce``              cross-entropy of the teacher's logits to the generator's target labels (GDFQ)
``bns``             :func:`~dfq.pipeline.losses.bns_loss` of the BN inputs, mean over layers
``slack_bns``       DSG slack alignment on statistics standardised by the running std (margin
                    ``slack_delta`` in std units), mean over layers
``layerwise``       DSG layerwise enhancement (each sample boosts one random BN layer)
``correlation``     DSG inter-sample correlation inhibition of the penultimate features
``centroid``        ClusterQ: penultimate features pulled to their class's EMA centroid
``diversity``       ClusterQ: spread of same-class features within the batch (negative)
``bn_adversarial``  DDAQ: fool the BN-statistics discriminator
``discrepancy``     DDAQ: expose the FP/quantized layer-output discrepancy to its discriminator
``adversarial``     DFAD/ZAQ: images on which the student disagrees with the teacher
``centre``          ACQ: attention centre of the deepest BN input matches the condition
``consistency``     ACQ: attention with BN in train mode equals attention in eval mode
``pair``            ACQ: same condition, different noise -> different images (mode seeking)
==================  ==========================================================================

Terms are evaluated in this registration order whatever a recipe lists, so the forward passes,
random draws and autograd graph of a step are always built the same way (reproducible runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from dfq.kernels.attention import attention_centre, attention_map
from dfq.pipeline import losses as L
from dfq.pipeline.taps import BNBatchStatsNoUpdate

if TYPE_CHECKING:   # annotations only: the fine-tuner imports this module
    from dfq.pipeline.finetune import Finetuner


@dataclass
class GeneratorBatch:
    """One generated batch and what the terms read of it. ``observe`` records the teacher's view
    (after any term's ``prepare``); the attention map and the student/twin layer outputs are
    computed once, at first use."""

    tuner: "Finetuner"
    images: torch.Tensor
    labels: torch.Tensor
    centres: torch.Tensor | None
    z: torch.Tensor
    gen: torch.Generator
    logits: torch.Tensor | None = None
    feats: list[torch.Tensor] = field(default_factory=list)
    pen: torch.Tensor | None = None
    att_train: torch.Tensor | None = None
    _att: torch.Tensor | None = None
    _layers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def observe(self) -> None:
        taps = self.tuner.taps
        self.logits = self.tuner.teacher(self.images)
        self.feats = list(taps.features)
        self.pen = taps.penultimate.flatten(1) if taps.penultimate is not None else None

    def attention(self) -> torch.Tensor:
        """Attention map of the deepest BN layer's input (eval-mode BN)."""
        if self._att is None:
            self._att = attention_map(self.feats[-1], self.tuner.recipe.attention_p)
        return self._att

    def layer_outputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(student, FP twin) outputs of every quantized conv on these images; gradients reach
        only the images."""
        if self._layers is None:
            tuner = self.tuner
            with tuner.student_frozen():
                tuner.student(self.images)
            self._layers = (tuner.student_layers(), tuner.twin_layers(self.images))
        return self._layers


@dataclass(frozen=True)
class Term:
    name: str
    fn: Callable[[GeneratorBatch], torch.Tensor]
    prepare: Callable[[GeneratorBatch], None] | None = None   # before the teacher's forward of the batch


TERMS: dict[str, Term] = {}


def term(name: str, prepare: Callable[[GeneratorBatch], None] | None = None):
    """Register ``fn`` as generator term ``name`` (decorator)."""
    def register(fn):
        TERMS[name] = Term(name, fn, prepare)
        return fn
    return register


@term("ce")
def _ce(b: GeneratorBatch) -> torch.Tensor:
    """``CE(teacher(x), y)``."""
    return F.cross_entropy(b.logits, b.labels)


@term("bns")
def _bns(b: GeneratorBatch) -> torch.Tensor:
    """``bns_loss(stats) / L`` over the teacher's L BatchNorm inputs."""
    return L.bns_loss(b.tuner.taps.stats()) / len(b.feats)


@term("slack_bns")
def _slack_bns(b: GeneratorBatch) -> torch.Tensor:
    """``slack_bns_loss`` on statistics divided by the running std (margin in std units) / L."""
    std = []
    for mu, var, rm, rv in b.tuner.taps.stats():
        s = rv.add(1e-8).sqrt()
        std.append((mu / s, var / s.pow(2), rm / s, torch.ones_like(rv)))
    return L.slack_bns_loss(std, b.tuner.recipe.slack_delta) / len(b.feats)


@term("layerwise")
def _layerwise(b: GeneratorBatch) -> torch.Tensor:
    """``layerwise_enhanced_bns`` with one random layer per sample (drawn from the step's generator)."""
    chosen = torch.randint(0, len(b.feats), (len(b.images),), generator=b.gen)
    return L.layerwise_enhanced_bns(b.feats, b.tuner.taps.running(), chosen, b.tuner.recipe.layerwise_boost)


@term("correlation")
def _correlation(b: GeneratorBatch) -> torch.Tensor:
    """``correlation_inhibition(penultimate features)``."""
    return L.correlation_inhibition(b.pen)


@term("centroid")
def _centroid(b: GeneratorBatch) -> torch.Tensor:
    """``centroid_alignment(penultimate features, y, EMA centroids)``."""
    return L.centroid_alignment(b.pen, b.labels, b.tuner.centroids)


@term("diversity")
def _diversity(b: GeneratorBatch) -> torch.Tensor:
    """``intra_class_diversity(penultimate features, y)``."""
    return L.intra_class_diversity(b.pen, b.labels)


@term("bn_adversarial")
def _bn_adversarial(b: GeneratorBatch) -> torch.Tensor:
    """The BN-statistics discriminator's generator loss on the BN inputs."""
    return b.tuner.bn_disc.generator_loss(b.feats)


@term("discrepancy")
def _discrepancy(b: GeneratorBatch) -> torch.Tensor:
    """The discrepancy discriminator's generator loss on (FP twin, student) layer outputs."""
    q_out, fp_out = b.layer_outputs()
    return b.tuner.disc.generator_loss(fp_out, q_out)


@term("adversarial")
def _adversarial(b: GeneratorBatch) -> torch.Tensor:
    """``disagreement(teacher logits, student logits)`` (the student's parameters get no gradient)."""
    with b.tuner.student_frozen():
        return L.disagreement(b.logits, b.tuner.student(b.images))


@term("centre")
def _centre(b: GeneratorBatch) -> torch.Tensor:
    """``centre_matching(attention_centre(attention), condition centres)``."""
    return L.centre_matching(attention_centre(b.attention()), b.centres)


def _train_mode_attention(b: GeneratorBatch) -> None:
    with BNBatchStatsNoUpdate(b.tuner.teacher):
        b.tuner.teacher(b.images)
    b.att_train = attention_map(b.tuner.taps.features[-1], b.tuner.recipe.attention_p)


@term("consistency", prepare=_train_mode_attention)
def _consistency(b: GeneratorBatch) -> torch.Tensor:
    """``attention_consistency(attention with BN batch statistics, attention with running statistics)``."""
    return L.attention_consistency(b.att_train, b.attention())


@term("pair")
def _pair(b: GeneratorBatch) -> torch.Tensor:
    """``mode_seeking_pair`` of samples ``i`` and ``i + N/2`` (same condition, different noise)."""
    half = len(b.images) // 2
    return L.mode_seeking_pair(b.images[:half], b.images[half:], b.z[:half], b.z[half:])


def generator_terms(b: GeneratorBatch, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Every weighted term's value, in registration order."""
    return {name: t.fn(b) for name, t in TERMS.items() if name in weights}
