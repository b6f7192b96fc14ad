"""Quantization-aware fine-tuning by distillation on synthetic images (the ``finetune`` stage).

The student is the fake-quant model in Tune mode (BN folded into every conv on the fly, BN
statistics frozen), so what trains is exactly what is exported: conv/linear weights, the folded
BN affine parameters, and the LSQ step sizes of every weight and activation quantizer
(:func:`dfq.kernels.fake_quant.fake_quantize` is the straight-through estimator with LSQ's scale
gradient). The teacher is the FP model, frozen, in eval mode.

Each step of a generative recipe (:mod:`dfq.pipeline.recipes`):

1. draw labels (and ACQ's attention centres) and noise from a generator seeded by
   ``(seed, step)`` - so a resumed run draws exactly what the uninterrupted run drew;
2. generator update: the FP model sees the batch; the recipe's weighted terms form the loss;
   discriminators (DDAQ) and EMA centroids (ClusterQ) update on the detached features;
3. student update (after ``warmup_steps`` generator-only steps): ``T^2 KL(teacher || student)`` on
   the same, detached batch (+ the recipe's student terms); Adam, cosine learning-rate decay.

The ``fixed`` recipe (``bns-ft``) skips 1-2 and distils on the BN-inversion images instead.
Everything trainable (student, generator, discriminators, optimizers, schedulers, centroids) is
saved to an atomic checkpoint every ``checkpoint_seconds`` and at the end; ``resume`` restores it,
and the run continues from the saved step with identical results (per-step seeding, no other
randomness). The model at the end of the schedule is returned: nothing here looks at real images.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfq.common import distributed as D
from dfq.common.progress import progress as progress_bar
from dfq.pipeline import losses as L
from dfq.pipeline.checkpoint import CHECKPOINT_FORMAT, checkpoint_fingerprint, load_checkpoint, save_checkpoint
from dfq.pipeline.discriminators import BNStatsDiscriminator, DiscrepancyDiscriminator, importance_prior
from dfq.pipeline.generator_terms import TERMS, GeneratorBatch, generator_terms
from dfq.pipeline.generators import make_generator
from dfq.pipeline.models import is_small_input
from dfq.pipeline.qmodules import QuantConv2d
from dfq.pipeline.quantize import QuantizedModel
from dfq.pipeline.recipes import Recipe
from dfq.pipeline.taps import LayerOutputs, TeacherTaps


@dataclass
class FinetuneConfig:
    steps: int = 1000
    batch: int = 64
    warmup_steps: int = 50            # generator-only steps before the student trains
    lr_weights: float = 1e-4          # student weights and folded-BN affine (Adam)
    lr_scales: float = 1e-3           # LSQ step sizes (Adam), relative: lr = lr_scales * mean initial step
    lr_generator: float = 1e-3        # Adam(0.5, 0.999), as GDFQ
    lr_discriminator: float = 1e-3
    latent: int = 100
    seed: int = 0
    checkpoint_seconds: float = 300.0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 2:
            raise ValueError("fine-tuning needs steps >= 1 and batch >= 2")
        if self.warmup_steps >= self.steps:
            self.warmup_steps = max(0, self.steps // 10)

    @classmethod
    def for_budget(cls, budget: str, input_size: tuple[int, int, int], *, steps: int | None = None,
                   seed: int = 0) -> "FinetuneConfig":
        """Schedules per budget, sized by measured step times on a 2-core CPU (README)."""
        small = is_small_input(input_size)
        table = {  # (steps, batch, warmup)
            "fast": (300, 64, 30) if small else (60, 16, 10),
            "default": (2000, 64, 100) if small else (400, 16, 40),
            "long": (6000, 64, 200) if small else (1500, 32, 100),
        }
        if budget not in table:
            raise ValueError(f"unknown budget {budget!r} (fast, default, long)")
        n, batch, warm = table[budget]
        if steps is not None:
            warm = min(warm, max(0, steps // 10))
            n = steps
        return cls(steps=n, batch=batch, warmup_steps=warm, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2 ** 63 - 1))


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return 0.0
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class FinetuneResult:
    steps: int
    wall_s: float
    steps_per_s: float
    first_kd: float | None
    last_kd: float | None
    history: list[dict]
    resumed_from: int | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = self.history[-20:]
        return d


class Finetuner:
    """Holds the state of one fine-tuning run (see the module docstring)."""

    def __init__(self, teacher: nn.Module, qmodel: QuantizedModel, recipe: Recipe, cfg: FinetuneConfig, *,
                 input_size: tuple[int, int, int], num_classes: int,
                 fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dist_info: D.DistInfo = D.SINGLE) -> None:
        if not recipe.trains:
            raise ValueError(f"recipe {recipe.name} does not fine-tune")
        if recipe.generator == "fixed" and fixed is None:
            raise ValueError("the 'fixed' recipe needs the synthetic images to fine-tune on")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.qmodel, self.student = qmodel, qmodel.module
        self.recipe, self.cfg = recipe, cfg
        self.input_size, self.num_classes = input_size, num_classes
        self.fixed = fixed
        self.info = dist_info
        self.step = 0
        self.history: list[dict] = []
        torch.manual_seed(cfg.seed)   # parameter initialisation of the generator/discriminators
        self._setup_student()
        self.generator = self.opt_g = self.taps = self.centroids = None
        self.bn_disc = self.disc = self.opt_d = self.twin = None
        self._layer_tap = None
        if recipe.generative:
            self._setup_generator()
        if recipe.student_features:
            self._tap_layers()

    def _setup_student(self) -> None:
        """The student trains in eval mode (BN is folded; eval keeps dropout/stochastic depth off).
        Adam moves every parameter by about its learning rate per step whatever the gradient's
        size, so each quantizer's step sizes get a learning rate relative to their own magnitude
        (weight steps are ~1e-3, activation steps ~1e-1): one absolute rate would either freeze
        the activation steps or push weight steps through zero."""
        cfg = self.cfg
        self.student.eval()
        for p in self.student.parameters():
            p.requires_grad_(True)
        self.student_train = self._ddp(self.student)   # first: rank 0's parameters everywhere
        scales = [(n, p) for n, p in self.student.named_parameters() if n.endswith("scale")]
        weights = [p for n, p in self.student.named_parameters() if not n.endswith("scale")]
        groups = [{"params": weights, "lr": cfg.lr_weights}]
        for _, p in scales:
            groups.append({"params": [p], "lr": cfg.lr_scales * float(p.detach().abs().mean().clamp(min=1e-8))})
        self.opt_s = torch.optim.Adam(groups)
        self.base_lrs = [g["lr"] for g in groups]

    def _setup_generator(self) -> None:
        """The generator, the teacher's taps, and the state the recipe's terms keep (ClusterQ's
        centroids, DDAQ's discriminators)."""
        recipe, cfg, terms = self.recipe, self.cfg, self.recipe.terms
        self.generator = make_generator(recipe.generator, self.num_classes, self.input_size, latent=cfg.latent)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
        self.generator_train = self._ddp(self.generator)
        self.taps = TeacherTaps(self.teacher, self.info)
        if "centroid" in terms:
            self.centroids = L.ClassCentroids(self.num_classes, self._penultimate_dim(), recipe.centroid_decay)
        disc_params = []
        if "bn_adversarial" in terms:
            self.bn_disc = BNStatsDiscriminator(self.taps.running(), self._bn_spatial(), group=recipe.bn_group)
            disc_params += list(self.bn_disc.parameters())
        if "discrepancy" in terms or recipe.student_discrepancy:
            layers = self._tap_layers()
            prior = importance_prior([m for _, m in layers])
            if self.bn_disc is not None and len(self.bn_disc.weights) == len(prior):
                self.bn_disc.weights.copy_(prior)
            self.disc = DiscrepancyDiscriminator([m.out_channels for _, m in layers], prior)
            disc_params += list(self.disc.parameters())
        if disc_params:
            self.opt_d = torch.optim.Adam(disc_params, lr=cfg.lr_discriminator, betas=(0.5, 0.999))

    def _tap_layers(self) -> list[tuple[str, nn.Module]]:
        """Hooks on every quantized conv of the student, and the FP twin (a frozen copy of the
        student as it starts, quantizers off: the FP model with BN folded) that the layer terms
        compare it with. Idempotent."""
        layers = [(n, m) for n, m in self.student.named_modules() if isinstance(m, QuantConv2d)]
        if self.twin is None:
            # the copy first: a deepcopy of a hooked module keeps the hooks, and the twin's forward
            # would then overwrite the student's recorded outputs
            self.twin = copy.deepcopy(self.qmodel)
            self.twin.set_enabled(False, False)
            self.twin.module.eval()
            for p in self.twin.module.parameters():
                p.requires_grad_(False)
            self.layer_names = [n for n, _ in layers]
            self._layer_tap = LayerOutputs(self.student, self.layer_names)
        return layers

    def twin_layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The FP twin's conv outputs on ``images`` (with autograd to the images where they need it)."""
        tap = LayerOutputs(self.twin.module, self.layer_names)
        try:
            self.twin.module(images)
            return tap.ordered()
        finally:
            tap.remove()

    def student_layers(self) -> list[torch.Tensor]:
        """The student's conv outputs recorded by its last forward."""
        return [self._layer_tap.outputs[n] for n in self.layer_names]

    @contextlib.contextmanager
    def student_frozen(self):
        """The student's parameters without gradients for a forward whose gradients must reach
        only the images (generator terms), not the parameters (nor DDP's hooks); restored after."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def _ddp(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``module`` in a torchrun run (it also broadcasts rank 0's
        parameters, so every rank starts identical); the module itself otherwise."""
        if not self.info.enabled:
            return module
        device_ids = [self.info.local_rank] if self.info.backend == "nccl" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    @torch.no_grad()
    def _probe(self) -> None:
        self.teacher(torch.zeros(2, *self.input_size))

    def _penultimate_dim(self) -> int:
        self._probe()
        if self.taps.penultimate is None:
            raise ValueError("ClusterQ needs a final Linear layer (penultimate features)")
        return self.taps.penultimate.flatten(1).shape[1]

    def _bn_spatial(self) -> list[int]:
        self._probe()
        return [f.shape[2] * f.shape[3] for f in self.taps.features]

    # -- one step ------------------------------------------------------------------------------
    def _generator_step(self, gen: torch.Generator, log: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate a batch, update the generator on the recipe's weighted terms (registered in
        :mod:`dfq.pipeline.generator_terms`), then the discriminators and centroids."""
        weights = self.recipe.terms
        z, labels, centres = self.generator.sample(self.cfg.batch, gen, self.recipe.centre_radius)
        self.generator.train()
        images = self.generator.generate(self.generator_train, z, labels, centres)
        batch = GeneratorBatch(self, images, labels, centres, z, gen)
        for t in TERMS.values():
            if t.name in weights and t.prepare is not None:
                t.prepare(batch)
        batch.observe()
        terms = generator_terms(batch, weights)
        loss = sum(weights[k] * v for k, v in terms.items())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        self._update_critics(batch, log)
        for k, v in terms.items():
            log[k] = float(v.detach())
        log["gen"] = float(loss.detach())
        return images.detach(), labels, batch.logits.detach()

    def _update_critics(self, batch: GeneratorBatch, log: dict) -> None:
        """DDAQ's discriminators (gradients averaged across ranks) and ClusterQ's EMA centroids
        (class sums all-reduced) learn from the batch's detached features."""
        if self.opt_d is not None:
            d_loss = batch.images.new_zeros(())
            if self.bn_disc is not None:
                d_loss = d_loss + self.bn_disc.discriminator_loss(batch.feats, batch.gen)
            if self.disc is not None:
                q_out, fp_out = batch.layer_outputs()
                d_loss = d_loss + self.disc.discriminator_loss(fp_out, q_out)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            D.average_gradients([p for grp in self.opt_d.param_groups for p in grp["params"]], self.info)
            self.opt_d.step()
            log["disc"] = float(d_loss.detach())
        if self.centroids is not None:
            sums, counts = L.ClassCentroids.class_sums(batch.pen, batch.labels, self.num_classes)
            D.all_reduce_sum([sums, counts], self.info)
            self.centroids.update_sums(sums, counts)

    def _student_step(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      log: dict) -> None:
        r = self.recipe
        factor = _cosine(self.step, self.cfg.steps, self.cfg.warmup_steps)
        for group, base in zip(self.opt_s.param_groups, self.base_lrs):
            group["lr"] = base * factor
        logits = self.student_train(images)
        kd = L.kd_loss(logits, teacher_logits, r.temperature)
        loss = kd
        if r.student_ce:
            loss = loss + r.student_ce * F.cross_entropy(logits, labels)
        if r.student_discrepancy and self.disc is not None:
            # the hooks record the layer outputs of the forward above (the same autograd graph)
            loss = loss + r.student_discrepancy * self.disc.student_loss(None, self.student_layers())
        if r.student_features:
            with torch.no_grad():
                target = self.twin_layers(images)
            feat = L.feature_distillation(self.student_layers(), target)
            loss = loss + r.student_features * feat
            log["features"] = float(feat.detach())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning diverged: the student loss is {float(loss)} at step {self.step}")
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_s.step()
        with torch.no_grad():   # a step size must stay positive (the forward clamps it, keep the parameter sane too)
            for group in self.opt_s.param_groups[1:]:
                for p in group["params"]:
                    p.clamp_(min=1e-8)
        log["kd"] = float(kd.detach())
        log["student"] = float(loss.detach())

    def run_step(self) -> dict:
        # each rank draws its own samples; rank 0 of a torchrun run draws what a single process draws
        gen = _step_generator(self.cfg.seed + 1_000 * self.info.rank, self.step)
        log: dict = {"step": self.step}
        if self.generator is not None:
            images, labels, t_logits = self._generator_step(gen, log)
        else:
            imgs, labs = self.fixed
            idx = torch.randint(0, len(imgs), (self.cfg.batch,), generator=gen)
            images, labels = imgs[idx], labs[idx]
            with torch.no_grad():
                t_logits = self.teacher(images)
        if self.step >= self.cfg.warmup_steps or self.generator is None:
            if self.recipe.student_fixed and self.generator is not None and self.fixed is not None:
                images, labels, t_logits = self._with_fixed(images, labels, t_logits, gen)
            if self.recipe.student_mixup:
                images, t_logits = self._mix(images, t_logits, gen)
            self._student_step(images, labels, t_logits, log)
        self.step += 1
        return log

    @torch.no_grad()
    def _with_fixed(self, images: torch.Tensor, labels: torch.Tensor, t_logits: torch.Tensor, gen: torch.Generator):
        """Replace the last ``student_fixed`` fraction of a generated batch by random images of the
        BN-inversion set, with their target labels and the teacher's logits on them."""
        n = len(images)
        k = int(round(self.recipe.student_fixed * n))
        if k == 0:
            return images, labels, t_logits
        pool, pool_labels = self.fixed
        idx = torch.randint(0, len(pool), (k,), generator=gen)
        picked = pool[idx]
        return (torch.cat([images[:n - k], picked]), torch.cat([labels[:n - k], pool_labels[idx]]),
                torch.cat([t_logits[:n - k], self.teacher(picked)]))

    @torch.no_grad()
    def _mix(self, images: torch.Tensor, t_logits: torch.Tensor, gen: torch.Generator):
        """Replace the first ``student_mixup`` fraction of the batch by mixtures
        ``lam*x_i + (1-lam)*x_j`` (lam ~ U(0,1), j a random other sample) with the teacher's logits
        on them: samples between the synthetic classes, where the teacher is less certain and
        distillation carries more. Drawn from the step's generator, so a resumed run mixes alike."""
        n = len(images)
        k = int(round(self.recipe.student_mixup * n))
        if k == 0:
            return images, t_logits
        lam = torch.rand(k, generator=gen).view(-1, *([1] * (images.dim() - 1)))
        partner = torch.randint(0, n, (k,), generator=gen)
        mixed = lam * images[:k] + (1 - lam) * images[partner]
        images = torch.cat([mixed, images[k:]])
        t_logits = torch.cat([self.teacher(mixed), t_logits[k:]])
        return images, t_logits

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "recipe": self.recipe.name,
                 "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
                 "student": self.student.state_dict(), "opt_s": self.opt_s.state_dict(),
                 "base_lrs": torch.tensor(self.base_lrs, dtype=torch.float64),
                 "history": json.dumps(self.history)}
        if self.generator is not None:
            state["generator"] = self.generator.state_dict()
            state["opt_g"] = self.opt_g.state_dict()
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        if self.bn_disc is not None:
            state["bn_disc"] = self.bn_disc.state_dict()
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
        if self.centroids is not None:
            state["centroids"] = self.centroids.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.student.load_state_dict(state["student"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.history = json.loads(state["history"])
        for key, obj in (("generator", self.generator), ("opt_g", self.opt_g), ("opt_d", self.opt_d),
                         ("bn_disc", self.bn_disc), ("disc", self.disc), ("centroids", self.centroids)):
            if obj is not None:
                obj.load_state_dict(state[key])

    def remove_hooks(self) -> None:
        if self.taps is not None:
            self.taps.remove()
        if getattr(self, "_layer_tap", None) is not None:
            self._layer_tap.remove()


def finetune(teacher: nn.Module, qmodel: QuantizedModel, recipe: Recipe, cfg: FinetuneConfig, *,
             input_size: tuple[int, int, int], num_classes: int,
             fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
             checkpoint: Path | None = None, fingerprint: str = "", resume: bool = False,
             progress: bool = True, log: Callable[[str], None] = print,
             stop_after: int | None = None, dist_info: D.DistInfo = D.SINGLE) -> FinetuneResult:
    """Fine-tune ``qmodel`` in place (see the module docstring). ``stop_after`` ends the run
    after that many steps as if interrupted (tests use it), leaving the checkpoint behind."""
    tuner = Finetuner(teacher, qmodel, recipe, cfg, input_size=input_size, num_classes=num_classes, fixed=fixed,
                      dist_info=dist_info)
    progress = progress and dist_info.main
    resumed_from = None
    if resume:
        tuner.load_state_dict(load_checkpoint(checkpoint, fingerprint))
        resumed_from = tuner.step
        log(f"[dfq] resumed fine-tuning at step {tuner.step}/{cfg.steps} from {checkpoint}")
    bar = None
    if progress:
        bar = progress_bar(cfg.steps, f"finetune {recipe.name}", initial=tuner.step)
    t0 = time.perf_counter()
    last_save = t0
    start_step = tuner.step
    first_kd = None
    try:
        while tuner.step < cfg.steps:
            entry = tuner.run_step()
            if "kd" in entry and first_kd is None:
                first_kd = entry["kd"]
            if tuner.step % cfg.log_every == 0 or tuner.step == cfg.steps:
                tuner.history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in entry.items() if k in ("kd", "gen", "ce", "bns")})
            now = time.perf_counter()
            if checkpoint is not None and dist_info.main and now - last_save >= cfg.checkpoint_seconds:
                save_checkpoint(checkpoint, tuner.state_dict(), fingerprint)
                last_save = now
            if stop_after is not None and tuner.step - start_step >= stop_after:
                break
        if checkpoint is not None and dist_info.main:
            save_checkpoint(checkpoint, tuner.state_dict(), fingerprint)
    finally:
        if bar is not None:
            bar.close()
        tuner.remove_hooks()
        qmodel.module.eval()
        for p in qmodel.module.parameters():
            p.requires_grad_(False)
    wall = time.perf_counter() - t0
    done = tuner.step - start_step
    kds = [h["kd"] for h in tuner.history if "kd" in h]
    return FinetuneResult(steps=tuner.step, wall_s=wall, steps_per_s=done / wall if wall > 0 else 0.0,
                          first_kd=first_kd if first_kd is not None else (kds[0] if kds else None),
                          last_kd=kds[-1] if kds else None, history=tuner.history, resumed_from=resumed_from)


__all__ = ["FinetuneConfig", "Finetuner", "FinetuneResult", "finetune", "save_checkpoint", "load_checkpoint",
           "checkpoint_fingerprint"]
