"""The loss terms of the data-free methods, each written once.

Notation: ``N`` batch, ``C`` channels, ``K`` classes, ``L`` BatchNorm layers. For BN layer ``l``
the hook records the batch statistics of its *input* ``mu_l, var_l`` (``[C_l]``) and the layer
holds running statistics ``m_l, v_l``. Every function returns a 0-d tensor unless stated.

* :func:`bn_stats_distance` / :func:`bns_loss` - BN statistics matching (ZeroQ, GDFQ):
  ``sum_l ||mu_l - m_l||_2 + ||sqrt(var_l + eps) - sqrt(v_l + eps)||_2``; BN-statistics inversion
  (:mod:`dfq.pipeline.synthesize`) uses the same per-layer distance.
* :func:`slack_bns_loss` - DSG's slack alignment, a hinge that is zero inside a margin ``delta``:
  ``sum_l mean_c relu(|mu_lc - m_lc| - delta)^2 + relu(|s_lc - sqrt(v_lc)| - delta)^2``.
* :func:`layerwise_enhanced_bns` - DSG layerwise enhancement: per-sample statistics (over space),
  each sample weights one BN layer ``(1 + boost)`` times more.
* :func:`correlation_inhibition` - DSG inter-sample correlation inhibition: mean squared
  off-diagonal cosine similarity of the samples' features.
* :class:`ClassCentroids` / :func:`centroid_alignment` / :func:`intra_class_diversity` - ClusterQ.
* :func:`kd_loss` - distillation ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.
* ACQ terms: :func:`centre_matching`, :func:`mode_seeking_pair`, :func:`attention_consistency`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Stats = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (mu, var, run_mean, run_var)


def bn_stats_distance(mu: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                      running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """One BN layer's statistics mismatch (ZeroQ's 2-norm form):
    ``||mu - m||_2 + ||sqrt(var + eps) - sqrt(v + eps)||_2`` over the channels; 0 when the batch
    statistics equal the running ones. ``eps`` keeps the gradient of the square root finite at zero
    variance (BN-statistics inversion passes the layer's own ``eps``, the generator terms ``1e-8``)."""
    return torch.linalg.vector_norm(mu - running_mean) + torch.linalg.vector_norm(
        var.clamp(min=0).add(eps).sqrt() - running_var.add(eps).sqrt())


def bns_loss(stats: Stats, eps: float = 1e-8) -> torch.Tensor:
    """``sum_l`` :func:`bn_stats_distance` over the layers of ``stats``."""
    total = stats[0][0].new_zeros(())
    for mu, var, rm, rv in stats:
        total = total + bn_stats_distance(mu, var, rm, rv, eps)
    return total


def slack_bns_loss(stats: Stats, delta: float) -> torch.Tensor:
    """DSG slack alignment: ``sum_l mean_c relu(|mu - m| - delta)^2 + relu(|s - sqrt(v)| - delta)^2``.
    Exactly zero while every channel's mean and std lie within ``delta`` of the running ones."""
    total = stats[0][0].new_zeros(())
    for mu, var, rm, rv in stats:
        dm = F.relu((mu - rm).abs() - delta)
        ds = F.relu((var.clamp(min=0).add(1e-8).sqrt() - rv.add(1e-8).sqrt()).abs() - delta)
        total = total + (dm.pow(2) + ds.pow(2)).mean()
    return total


def per_sample_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, H, W]`` -> per-sample channel mean and variance over space, each ``[N, C]``."""
    flat = features.flatten(2)
    return flat.mean(dim=2), flat.var(dim=2, unbiased=False)


def layerwise_enhanced_bns(features: list[torch.Tensor], running: list[tuple[torch.Tensor, torch.Tensor]],
                           chosen: torch.Tensor, boost: float) -> torch.Tensor:
    """DSG layerwise enhancement. ``features[l]`` is BN layer ``l``'s input ``[N, C_l, H, W]``,
    ``running[l] = (m_l, v_l)``, ``chosen`` ``[N]`` the layer each sample emphasises.

    ``mean_n sum_l (1 + boost * [l == chosen_n]) * (||mu_nl - m_l||_2 + ||s_nl - sqrt(v_l)||_2) / L``
    """
    n = features[0].shape[0]
    total = features[0].new_zeros(n)
    for l, (feat, (rm, rv)) in enumerate(zip(features, running)):
        mu, var = per_sample_stats(feat)
        dist = torch.linalg.vector_norm(mu - rm, dim=1) + torch.linalg.vector_norm(
            var.add(1e-8).sqrt() - rv.add(1e-8).sqrt(), dim=1)
        weight = 1.0 + boost * (chosen == l).to(dist.dtype)
        total = total + weight * dist
    return total.mean() / len(features)


def correlation_inhibition(features: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between samples' flattened features
    ``[N, ...]``; 0 for mutually orthogonal samples, 1 for identical ones."""
    f = F.normalize(features.flatten(1), dim=1)
    sim = f @ f.t()
    n = sim.shape[0]
    if n < 2:
        return sim.new_zeros(())
    off = sim - torch.diag_embed(torch.diagonal(sim))
    return off.pow(2).sum() / (n * (n - 1))


class ClassCentroids:
    """ClusterQ: one centroid per class of a deep layer's pooled features ``[K, D]``, kept as an
    exponential moving average ``c_k <- decay * c_k + (1 - decay) * mean_{y_n = k} f_n`` of the
    batch class means (initialised by the first batch that has the class)."""

    def __init__(self, num_classes: int, dim: int, decay: float = 0.9) -> None:
        self.centroids = torch.zeros(num_classes, dim)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.decay = decay

    @staticmethod
    @torch.no_grad()
    def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class feature sums ``[K, D]`` and counts ``[K]`` of a batch (all-reducible across ranks)."""
        feats = features.detach().float().cpu()
        sums = torch.zeros(num_classes, feats.shape[1]).index_add_(0, labels.cpu(), feats)
        counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
        return sums, counts

    @torch.no_grad()
    def update_sums(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA update from class sums/counts (classes with count 0 are left alone)."""
        for k in torch.nonzero(counts > 0).flatten().tolist():
            mean = sums[k] / counts[k]
            if self.seen[k]:
                self.centroids[k] = self.decay * self.centroids[k] + (1 - self.decay) * mean
            else:
                self.centroids[k] = mean
                self.seen[k] = True

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.update_sums(*self.class_sums(features, labels, len(self.centroids)))

    def state_dict(self) -> dict:
        return {"centroids": self.centroids.clone(), "seen": self.seen.clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.centroids = state["centroids"].clone()
        self.seen = state["seen"].clone()
        self.decay = state["decay"]


def centroid_alignment(features: torch.Tensor, labels: torch.Tensor, centroids: ClassCentroids) -> torch.Tensor:
    """ClusterQ alignment: mean over samples whose class has a centroid of
    ``||f_n - c_{y_n}||^2 / D`` (features ``[N, D]``)."""
    known = centroids.seen[labels.cpu()].to(features.device)
    if not known.any():
        return features.new_zeros(())
    c = centroids.centroids.to(features.device, features.dtype)[labels]
    return ((features - c).pow(2).mean(dim=1) * known).sum() / known.sum()


def intra_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ClusterQ diversity (a loss to minimise): minus the mean distance of samples to their
    in-batch class mean, ``-mean_n ||f_n - mean_{y_m = y_n} f_m||_2 / sqrt(D)``; classes with one
    sample contribute nothing."""
    total = features.new_zeros(())
    count = 0
    for k in labels.unique():
        group = features[labels == k]
        if len(group) < 2:
            continue
        total = total + torch.linalg.vector_norm(group - group.mean(dim=0), dim=1).sum()
        count += len(group)
    if count == 0:
        return total
    return -total / (count * features.shape[1] ** 0.5)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    log_target=True, reduction="batchmean") * t * t


def feature_distillation(student: list[torch.Tensor], teacher: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Layer-output distillation: ``mean_l ||s_l - t_l||^2 / ||t_l||^2`` over paired layer outputs
    (any shapes, equal per pair; ``t_l`` is treated as a constant). Each layer is normalised by its
    own teacher energy, so every layer weighs the same whatever its width or scale; 0 when the
    outputs match, 1 for an all-zero student."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_distillation needs equal, non-empty layer lists ({len(student)} vs {len(teacher)})")
    terms = [(s - t.detach()).pow(2).sum() / t.detach().pow(2).sum().clamp(min=eps) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Adversarial generator term (DFAD/ZAQ form): ``-mean_n ||t_n - s_n||_1 / K`` over ``[N, K]``
    logits. The generator minimises it, i.e. seeks images on which the quantized student still
    disagrees with the FP teacher; gradients flow to both logits' inputs."""
    return -(teacher_logits - student_logits).abs().mean()


def centre_matching(centres: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ACQ attention-centre matching: ``mean_n ||centre_n - target_n||_2^2`` (``[N, 2]`` each)."""
    return (centres - targets).pow(2).sum(dim=1).mean()


def mode_seeking_pair(out_a: torch.Tensor, out_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                      eps: float = 1e-5) -> torch.Tensor:
    """ACQ paired-sample term for two samples generated under the same condition from noises
    ``z_a, z_b``: ``mean_n ||z_a - z_b||_1 / (||out_a - out_b||_1 + eps)`` (dimension-normalised
    means). Minimising it pushes outputs of the same condition apart, against mode collapse.
    Symmetric in (a, b)."""
    dz = (z_a - z_b).abs().flatten(1).mean(dim=1)
    dx = (out_a - out_b).abs().flatten(1).mean(dim=1)
    return (dz / (dx + eps)).mean()


def attention_consistency(att_train: torch.Tensor, att_eval: torch.Tensor) -> torch.Tensor:
    """ACQ train/eval consistency: squared L2 distance between the attention maps ``[N, H, W]`` of
    the same images with BN in train mode (batch statistics) and eval mode (running statistics),
    summed over space, mean over the batch."""
    return (att_train - att_eval).pow(2).flatten(1).sum(dim=1).mean()
