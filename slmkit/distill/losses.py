"""Distillation divergences between a teacher's and a student's next-token (or label) distributions.

Both sides are softened by the temperature T (Hinton et al. 2015): p = softmax(teacher / T), q = softmax(student / T),
and the divergence is scaled by T^2 so its gradients keep their size as T changes (DistilBERT does the same).

    kl          KL(p || q), forward: the student covers every mode of the teacher (Hinton; DistilBERT's soft CE up to a
                constant: the teacher's entropy)
    reverse-kl  KL(q || p): the student may drop the teacher's low-probability modes (MiniLLM)
    jsd         beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q: TRL's generalised JSD
                (GKD); beta 0.5 is the symmetric Jensen-Shannon divergence

A cached teacher keeps only its top-k tokens (teacher.py). Its distribution is then over k + 1 buckets: the k tokens
and "any other token", whose probability is the rest (1 - the top-k's). The student's distribution is coarsened onto
the same buckets, and the divergence is the exact divergence between the two coarsened distributions: for k = V it
is the full one, and it never asks the cache for what it did not keep.

Every function returns the divergence summed over rows (callers normalise), differentiable in the student's logits.
"""

from __future__ import annotations

import torch

LOSSES = ("kl", "reverse-kl", "jsd")


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Summed divergence KIND between teacher log-probabilities LOG_P (n, K) and the student's LOG_Q (n, K) over the
    same K buckets (rows sum to 1 in probability)."""
    if kind == "kl":
        return _kl(log_p, log_q)
    if kind == "reverse-kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(log_p, log_q)  # the limits: m -> q and m -> p
        if beta >= 1.0:
            return _kl(log_q, log_p)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta)),
                                             log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    raise SystemExit(f"error: unknown --loss {kind!r}; use {', '.join(LOSSES)}")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Summed KL(a || b) from log-probabilities; terms where a is 0 count 0 (no 0 * inf)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum()


def kd_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str,
            beta: float = 0.5) -> torch.Tensor:
    """T^2 x divergence between softened teacher logits TEACHER (n, V) and student logits STUDENT (n, V)."""
    t = temperature
    log_p = torch.log_softmax(teacher.float() / t, dim=-1)
    log_q = torch.log_softmax(student.float() / t, dim=-1)
    return t * t * divergence(log_p, log_q, kind, beta)


def kd_topk(student: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, temperature: float, kind: str,
            beta: float = 0.5) -> torch.Tensor:
    """T^2 x divergence over k + 1 buckets between a cached teacher (TOP_IDS (n, k), TOP_LOGP (n, k): its top-k tokens
    and their log-probabilities at TEMPERATURE) and student logits STUDENT (n, V). The definition, through autograd;
    training runs kd_topk_and_grad, its loss and gradient in closed form (tested equal)."""
    t = temperature
    log_q_all = torch.log_softmax(student.float() / t, dim=-1)  # (n, V)
    log_q_top = log_q_all.gather(-1, top_ids.long())  # (n, k)
    log_p = torch.cat([top_logp.float(), _log_rest(top_logp.float())], dim=-1)  # (n, k + 1)
    log_q = torch.cat([log_q_top, _log_rest(log_q_top)], dim=-1)
    return t * t * divergence(log_p, log_q, kind, beta)


def kd_topk_and_grad(z: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, temperature: float, kind: str,
                     beta: float, alpha: float, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPHA x kd_topk + (1 - ALPHA) x summed next-token cross-entropy against TARGETS, and its gradient with respect
    to the logits Z (n, V), computed in two (n, V) buffers (Z's, reused, and one more) where autograd keeps ~six.

    Autograd differentiates the divergence on the (n, k) top-k log-probabilities alone (the rest bucket is a function
    of them); the gradient is carried to the logits in closed form: with q = softmax(z / T) and g = dL/dlog q_top,
    d log q_i / d z_j = (1[i = j] - q_j) / T, so dL/dz_j = (g_j - q_j sum_i g_i) / T (g_j = 0 outside the top-k).
    Z is overwritten."""
    t = temperature
    z = z.detach()
    q = z * (1.0 / t)  # (n, V): the one extra buffer, softmax(z / T) in the end; each pass below is in place
    m_t = q.amax(-1, keepdim=True)
    s_t = q.sub_(m_t).exp_().sum(-1, keepdim=True)  # q = exp(z / T - max), s_t its row sums
    log_q_top = (z.gather(-1, top_ids.long()) * (1.0 / t) - m_t - s_t.log()).requires_grad_()  # (n, k)
    with torch.enable_grad():
        log_q = torch.cat([log_q_top, _log_rest(log_q_top)], dim=-1)  # (n, k + 1); the rest is 1 - the top-k
        log_p = torch.cat([top_logp.float(), _log_rest(top_logp.float())], dim=-1)
        soft = t * t * divergence(log_p, log_q, kind, beta)
        (g_top,) = torch.autograd.grad(soft, log_q_top)  # (n, k)
    grad = q.mul_(-g_top.sum(-1, keepdim=True) * (alpha / t) / s_t)  # -q_j sum_i g_i / T (q normalised here)
    grad.scatter_add_(-1, top_ids.long(), g_top * (alpha / t))
    loss = alpha * soft.detach()
    if alpha < 1.0:
        ce, probs, norm = _softmax_in_place(z, targets)
        loss = loss + (1.0 - alpha) * ce
        grad.addcmul_(probs, (1.0 - alpha) / norm)  # + (1 - alpha) softmax(z)
        grad[torch.arange(len(targets), device=z.device), targets] -= 1.0 - alpha
    return loss, grad


def _softmax_in_place(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed cross-entropy of logits Z against TARGETS, exp(z - max) in Z's memory, its row sums (n, 1)):
    softmax(z) = the second / the third. One exp pass and no new (n, V) buffer."""
    picked = z[torch.arange(len(targets), device=z.device), targets]  # (n,), before Z is overwritten
    m = z.amax(-1, keepdim=True)
    norm = z.sub_(m).exp_().sum(-1, keepdim=True)
    return (norm.log().squeeze(-1) + m.squeeze(-1) - picked).sum(), z, norm


def _log_rest(log_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(LOG_TOP))) per row (n, 1): the probability of every token outside the top-k. Clamped away from
    log 0: a top-k that holds all the mass (k = V, or rounding) leaves a bucket of ~1e-7, which barely counts."""
    mass = log_top.exp().sum(-1, keepdim=True)
    return torch.log1p(-mass.clamp(max=1.0 - 1e-6))


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x the cross-entropy H(p, q) summed over rows: DistilBERT's L_ce (KL(p || q) plus the teacher's entropy,
    which has no gradient in the student)."""
    t = temperature
    p = torch.softmax(teacher.float() / t, dim=-1)
    return -t * t * (p * torch.log_softmax(student.float() / t, dim=-1)).sum()
