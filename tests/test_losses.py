"""Loss terms on inputs whose answer is known by hand (groundwork for the generative methods)."""
import pytest
import torch

from dfq.kernels.attention import attention_centre, attention_map
from dfq.pipeline import losses as L
from dfq.pipeline.losses import (ClassCentroids, bns_loss, centre_matching, centroid_alignment,
                                 correlation_inhibition, intra_class_diversity, kd_loss,
                                 mode_seeking_pair, slack_bns_loss)


def test_centre_of_one_hot_attention():
    att = torch.zeros(1, 4, 4)
    att[0, 0, 3] = 1.0  # top row, rightmost pixel: x = (3.5/4)*2-1 = 0.75, y = (0.5/4)*2-1 = -0.75
    torch.testing.assert_close(attention_centre(att), torch.tensor([[0.75, -0.75]]))
    uniform = attention_map(torch.ones(2, 3, 5, 5))
    torch.testing.assert_close(uniform.sum(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(attention_centre(uniform), torch.zeros(2, 2), atol=1e-6, rtol=0)


def test_bns_zero_when_statistics_match_and_slack_zero_inside_margin():
    m, v = torch.randn(8), torch.rand(8) + 0.5
    assert bns_loss([(m, v, m, v)]).item() < 1e-3
    assert bns_loss([(m + 1, v, m, v)]).item() > 1.0
    assert slack_bns_loss([(m + 0.05, v, m, v)], delta=0.1).item() == 0.0
    assert slack_bns_loss([(m + 0.3, v, m, v)], delta=0.1).item() > 0.0


def test_pair_term_symmetric_and_smaller_for_distinct_outputs():
    za, zb = torch.randn(4, 8), torch.randn(4, 8)
    xa, xb = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(mode_seeking_pair(xa, xb, za, zb), mode_seeking_pair(xb, xa, zb, za))
    assert mode_seeking_pair(xa, 3 * xb, za, zb) < mode_seeking_pair(xa, xa + 1e-3, za, zb)


def test_correlation_kd_centre_and_centroids():
    assert correlation_inhibition(torch.eye(4)).item() == 0.0
    assert abs(correlation_inhibition(torch.ones(4, 3)).item() - 1.0) < 1e-6
    logits = torch.randn(5, 10)
    assert kd_loss(logits, logits, temperature=4.0).abs().item() < 1e-6
    assert centre_matching(torch.zeros(3, 2), torch.ones(3, 2)).item() == 2.0
    cents = ClassCentroids(num_classes=3, dim=2, decay=0.5)
    feats, labels = torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([0, 0])
    cents.update(feats, labels)
    torch.testing.assert_close(cents.centroids[0], torch.tensor([2.0, 2.0]))
    assert centroid_alignment(feats, labels, cents).item() == 1.0
    cents.update(torch.tensor([[4.0, 4.0]]), torch.tensor([0]))
    torch.testing.assert_close(cents.centroids[0], torch.tensor([3.0, 3.0]))
    assert intra_class_diversity(feats, labels).item() < 0


def test_feature_distillation_by_hand():
    t1, t2 = torch.full((2, 3, 4, 4), 0.5), torch.randn(2, 5, 2, 2)
    assert float(L.feature_distillation([torch.zeros_like(t1)], [t1])) == pytest.approx(1.0)
    assert float(L.feature_distillation([t2.clone()], [t2])) == 0.0
    # per-layer normalisation: a layer at twice its teacher's value costs 1 whatever its scale
    s1 = (2 * t1).requires_grad_()
    loss = L.feature_distillation([s1, t2.clone()], [t1, t2])
    assert float(loss.detach()) == pytest.approx(0.5)
    teacher = t1.clone().requires_grad_()
    L.feature_distillation([s1], [teacher]).backward()
    assert teacher.grad is None and s1.grad is not None
    with pytest.raises(ValueError, match="equal"):
        L.feature_distillation([t1], [])


def test_disagreement_by_hand():
    t = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    s = torch.tensor([[0.0, 2.0], [0.0, -2.0]])
    assert float(L.disagreement(t, s)) == pytest.approx(-(1 + 0 + 0 + 2) / 4)
    assert float(L.disagreement(t, t)) == 0.0
