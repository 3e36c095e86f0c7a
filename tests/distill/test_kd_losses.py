"""The KD divergences against hand computations on tiny distributions."""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.distill.losses import divergence, kd_full, kd_topk, kd_topk_and_grad, soft_cross_entropy


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


TEACHER, STUDENT, T = [2.0, 0.5, -1.0, 0.0], [0.3, 1.2, -0.4, 0.1], 2.0


def test_kl_reverse_and_jsd_match_the_formulas():
    p, q = _softmax(TEACHER, T), _softmax(STUDENT, T)
    s, t = torch.tensor([STUDENT]), torch.tensor([TEACHER])
    assert kd_full(s, t, T, "kl").item() == pytest.approx(T * T * _kl(p, q), rel=1e-5)
    assert kd_full(s, t, T, "reverse-kl").item() == pytest.approx(T * T * _kl(q, p), rel=1e-5)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    assert kd_full(s, t, T, "jsd").item() == pytest.approx(T * T * (_kl(p, m) + _kl(q, m)) / 2, rel=1e-5)
    m = [0.2 * a + 0.8 * b for a, b in zip(p, q, strict=True)]  # generalised: beta = the teacher's share
    assert kd_full(s, t, T, "jsd", beta=0.2).item() == pytest.approx(
        T * T * (0.2 * _kl(p, m) + 0.8 * _kl(q, m)), rel=1e-5)
    # DistilBERT's soft cross-entropy is KL plus the teacher's entropy
    entropy = -sum(x * math.log(x) for x in p)
    assert soft_cross_entropy(s, t, T).item() == pytest.approx(T * T * (_kl(p, q) + entropy), rel=1e-5)


def test_divergences_vanish_for_equal_distributions_and_sum_over_rows():
    z = torch.randn(3, 10)
    for kind in ("kl", "reverse-kl", "jsd"):
        assert kd_full(z, z, 2.0, kind).item() == pytest.approx(0.0, abs=1e-5)
    a, b = torch.randn(2, 10), torch.randn(2, 10)
    rows = kd_full(a[:1], b[:1], 1.0, "kl") + kd_full(a[1:], b[1:], 1.0, "kl")
    assert kd_full(a, b, 1.0, "kl").item() == pytest.approx(rows.item(), rel=1e-5)


def test_top_k_buckets_by_hand():
    """k = 2 of 4 tokens: buckets {0}, {1}, rest. The cached teacher keeps log p of its top two at T."""
    p, q = _softmax(TEACHER, T), _softmax(STUDENT, T)
    top = [0, 1]  # the teacher's two most likely tokens
    p_b = [p[0], p[1], 1 - p[0] - p[1]]
    q_b = [q[0], q[1], 1 - q[0] - q[1]]
    got = kd_topk(torch.tensor([STUDENT]), torch.tensor([top]), torch.tensor([[math.log(p[0]), math.log(p[1])]]),
                  T, "kl")
    assert got.item() == pytest.approx(T * T * _kl(p_b, q_b), rel=1e-4)
    # all of the vocabulary kept: the full divergence
    full_ids = torch.tensor([[0, 1, 3, 2]])
    full_logp = torch.log(torch.tensor([[p[0], p[1], p[3], p[2]]]))
    for kind in ("kl", "reverse-kl", "jsd"):
        assert kd_topk(torch.tensor([STUDENT]), full_ids, full_logp, T, kind).item() == pytest.approx(
            kd_full(torch.tensor([STUDENT]), torch.tensor([TEACHER]), T, kind).item(), rel=1e-3, abs=1e-5)


def test_gradient_flows_to_the_student_only_and_unknown_kind():
    s = torch.randn(2, 6, requires_grad=True)
    t = torch.randn(2, 6)
    kd_full(s, t, 2.0, "reverse-kl").backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(SystemExit, match="unknown --loss"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "l2")


@pytest.mark.parametrize("kind", ["kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 1.0), (3.0, 0.0)])
def test_fused_top_k_gradient_equals_autograd(kind, temperature, alpha):
    """The cached-teacher path's loss and closed-form gradient (what training uses) against autograd on kd_topk + CE."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    z, teacher = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    top = torch.log_softmax(teacher / temperature, -1).topk(5, -1)
    targets = torch.randint(0, 40, (6,), generator=g)
    zz = z.clone().requires_grad_()
    want = alpha * kd_topk(zz, top.indices, top.values, temperature, kind, 0.3) + \
        (1 - alpha) * F.cross_entropy(zz, targets, reduction="sum")
    want.backward()
    loss, grad = kd_topk_and_grad(z.clone(), top.indices, top.values, temperature, kind, 0.3, alpha, targets)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    assert torch.allclose(grad, zz.grad, atol=1e-5)
