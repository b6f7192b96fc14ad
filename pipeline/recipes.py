"""The data-free methods as recipes: which generator, which loss terms, with which weights.

A recipe declares; :mod:`dfq.pipeline.finetune` executes. The generator terms it weights are the
registered functions of :mod:`dfq.pipeline.generator_terms` (formulas in
:mod:`dfq.pipeline.losses`).

The student of a generative recipe distils on batches that are half generator images, half
BN-inversion images (``student_fixed``). Student terms: ``T^2 KL`` distillation at ``temperature``
always, ``student_ce`` times CE to the generator's labels, for DDAQ ``student_discrepancy`` times
the fooling term, and ``student_features`` times the layer-output distillation (every quantized
conv's output against the same layer of the FP model, BN folded, on the same images;
:func:`dfq.pipeline.losses.feature_distillation`). Weights follow the papers where they state them
(GDFQ's BNS weight 0.1); elsewhere they were set once so that each term starts at a magnitude
comparable to the cross-entropy, and are the same for every model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dfq.pipeline.generator_terms import TERMS
from dfq.pipeline.generators import GENERATORS

# generator kinds besides the image generators: no fine-tuning, or fine-tuning on the fixed
# BN-inversion set
NO_GENERATOR = ("none", "fixed")


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    generator: str                      # none | fixed | conditional | acq
    terms: dict[str, float] = field(default_factory=dict)
    reconstruct: bool = False           # learned rounding layer by layer before any fine-tuning (pipeline.reconstruct)
    temperature: float = 1.0            # distillation temperature
    student_ce: float = 0.0
    student_discrepancy: float = 0.0    # DDAQ: fool the discrepancy discriminator
    student_features: float = 0.0       # layer-output distillation against the FP model
    student_mixup: float = 0.0          # fraction of each student batch replaced by mixed pairs
    # Generative recipes: fraction of each student batch drawn from the BN-inversion (calibration)
    # images instead of the generator; the same for every generative recipe (the data the student
    # sees is the fine-tuning stage's, not the method's; README "Methods" has the measurements).
    student_fixed: float = 0.5
    slack_delta: float = 0.1            # DSG margin, in running-std units
    layerwise_boost: float = 1.0        # DSG: weight (1 + boost) on each sample's chosen layer
    centroid_decay: float = 0.9         # ClusterQ EMA
    attention_p: float = 2.0            # ACQ attention map |F|^p
    centre_radius: float = 0.5          # ACQ: condition centres drawn in this disc of [-1, 1]^2
    bn_group: int = 8                   # DDAQ: samples per BN-statistics token

    def __post_init__(self) -> None:
        unknown = set(self.terms) - set(TERMS)
        if unknown:
            raise ValueError(f"recipe {self.name}: unknown terms {sorted(unknown)}")
        if self.generator not in NO_GENERATOR + tuple(GENERATORS):
            raise ValueError(f"recipe {self.name}: unknown generator kind {self.generator!r}")

    @property
    def trains(self) -> bool:
        return self.generator != "none"

    @property
    def generative(self) -> bool:
        """Whether the student trains on images of a generator trained alongside it."""
        return self.generator in GENERATORS

    def synthesis_budget(self, budget: str) -> str:
        """The budget of the BN-inversion set: generative recipes spend the budget on fine-tuning;
        their BN-inversion images only initialise the activation ranges (which then train) and
        fill half of each student batch, so they use the fast set."""
        return "fast" if self.generative else budget

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bns", "BN-statistics inversion of noise images, calibration only (no fine-tuning)", "none"),
    Recipe("bns-ft", "BN-statistics inversion, then QAT by distillation on that fixed synthetic set", "fixed"),
    Recipe("gdfq", "GDFQ: conditional generator trained with CE + BNS; QAT by distillation", "conditional",
           {"ce": 1.0, "bns": 0.1}),
    Recipe("dsg", "DSG: slack BN alignment, layerwise enhancement, inter-sample correlation inhibition",
           "conditional", {"ce": 1.0, "slack_bns": 1.0, "layerwise": 0.1, "correlation": 1.0}),
    Recipe("clusterq", "ClusterQ: BNS plus class-centroid alignment (EMA centroids) and intra-class diversity",
           "conditional", {"ce": 1.0, "bns": 0.1, "centroid": 1.0, "diversity": 0.1}),
    Recipe("ddaq", "DDAQ: BN-statistics and FP/quantized-discrepancy discriminators weighted by a "
           "per-layer importance prior", "conditional",
           {"ce": 1.0, "bns": 0.05, "bn_adversarial": 0.1, "discrepancy": 0.1}, student_discrepancy=0.1),
    Recipe("acq", "ACQ: generator conditioned on (label, attention centre); centre matching, "
           "same-condition pair term, train/eval attention consistency, with CE + BNS", "acq",
           {"ce": 1.0, "bns": 0.1, "centre": 1.0, "pair": 0.1, "consistency": 10.0}),
    Recipe("recon", "BN inversion, then layer-wise reconstruction with learned rounding (AdaRound + QDrop, "
           "data-free as Genie-M); no fine-tuning", "none", reconstruct=True),
    Recipe("acq-recon", "layer-wise learned rounding on the BN-inversion images, then ACQ fine-tuning", "acq",
           {"ce": 1.0, "bns": 0.1, "centre": 1.0, "pair": 0.1, "consistency": 10.0}, reconstruct=True),
]}

# The method a run gets without --method, by precision (issue 15, item 5; README "Methods"). Below
# W8A8 layer-wise reconstruction beats fine-tuning on the measurements: ResNet-20 W4A4 at the fast
# budget (mean drop over seeds 0-2: recon 2.14, acq 2.66/2.69 at seeds 0/1), and it is the only
# method that holds on EfficientNet-Lite0 (W4A8 71.5% where acq/bns collapse at W4A4). At W8A8
# the methods differ by less than the seeds do, and acq stays the default.
DEFAULT_METHOD = "acq"
DEFAULT_LOW_BIT_METHOD = "recon"


def default_method(weight_bits: int, act_bits: int) -> str:
    """The method a run at this precision gets when none is named."""
    return DEFAULT_METHOD if min(weight_bits, act_bits) >= 8 else DEFAULT_LOW_BIT_METHOD


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(RECIPES)}") from None
