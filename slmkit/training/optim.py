"""Optimizers for `fit`: AdamW, and Muon for the hidden weight matrices with AdamW for everything else.

Muon (Jordan et al. 2024, "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each hidden matrix's
momentum update by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations), which equalises the update
across directions; at the same learning rate and weight decay as AdamW (the update is rescaled to AdamW's RMS) it
needs fewer steps to the same loss. Embeddings, the tied LM head, norms and biases stay on AdamW, as in the paper.
`torch.optim.Muon` exists but orthogonalises in bfloat16, which CPUs without bf16 units run ~100x slower than fp32,
and it cannot split our fused projections; this is the same update with both fixed.
"""

from __future__ import annotations

import math

import torch

from slmkit.hardware import cpu_bf16_fast

# Quintic Newton-Schulz coefficients tuned for the steepest slope at zero (Keller Jordan's Muon reference).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Muon's momentum ramps linearly from this to its target (0.95) over the first MOMENTUM_WARMUP steps, as in the
# modded-nanoGPT speedruns: early updates follow the fast-changing gradient more closely. On tiny Shakespeare
# (slm-1m 3L, 450 steps) it gave 2.219 vs 2.229 bits/byte on the held-out 10% (docs/benchmarks.md).
MOMENTUM_START, MOMENTUM_WARMUP = 0.85, 150


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: str,
                   name: str = "adamw", ns_bf16: bool | None = None) -> torch.optim.Optimizer:
    """NAME 'adamw': AdamW, weight decay on matrices only, the fused kernel where PyTorch has one. NAME 'muon':
    MuonAdamW — Muon on the hidden matrices of the transformer blocks, AdamW on the rest, one lr for both; NS_BF16:
    its Newton-Schulz precision (None: MuonAdamW's rule)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "muon":
        return MuonAdamW(muon_groups(model, params, weight_decay), lr=lr, ns_bf16=ns_bf16)
    if name != "adamw":
        raise SystemExit(f"error: unknown --optimizer {name!r}; use adamw or muon")
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """WEIGHT_DECAY for every parameter group that decays (make_optimizer's norms, biases and the like keep 0)."""
    for group in optimizer.param_groups:
        if group["weight_decay"]:
            group["weight_decay"] = weight_decay


def muon_groups(model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list:
    """Param groups for MuonAdamW. Hidden matrices (2-D, not embeddings or the head) go to Muon; a fused projection
    (our Llama's wqkv and w_gate_up) is orthogonalised per part, as if the parts were separate layers."""
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else getattr(cfg, "to_dict", lambda: {})()
    hd = cfg.get("head_dim") or cfg.get("hidden_size", 1) // max(1, cfg.get("num_attention_heads", 1))
    splits = {"wqkv": [cfg.get("num_attention_heads", 0) * hd] + [cfg.get("num_key_value_heads", 0) * hd] * 2,
              "w_gate_up": [cfg.get("intermediate_size", 0)] * 2}
    by_split: dict[tuple, list] = {}
    decay, no_decay = [], []
    for n, p in params:
        if p.dim() == 2 and "embed" not in n and "lm_head" not in n and "wte" not in n and "wpe" not in n:
            part = next((s for key, s in splits.items() if f".{key}." in f".{n}" and sum(s) == p.shape[0]), None)
            by_split.setdefault(tuple(part or [p.shape[0]]), []).append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": ps, "muon": True, "splits": list(s), "weight_decay": weight_decay}
              for s, ps in by_split.items()]
    return groups + [{"params": decay, "muon": False, "weight_decay": weight_decay},
                     {"params": no_decay, "muon": False, "weight_decay": 0.0}]


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, bf16: bool | None = None) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to G (roughly U V^T of its SVD) by quintic Newton-Schulz iterations.
    G: (A, B) or a stack (N, A, B), each orthogonalised on its own. In bf16 as the reference does, on GPUs and on
    CPUs with fast bf16 products (loop.cpu_bf16_fast: 2.7-3.6x faster than fp32 on a Zen 5 at 128-256 dims, where
    Muon's fp32 step cost ~10% of a training step); fp32 on other CPUs, which emulate bf16 or gain little from it."""
    a, b, c = NS_COEFFICIENTS
    if bf16 is None:  # BF16: the caller's choice (MuonAdamW fixes it once per run)
        bf16 = g.device.type != "cpu" or cpu_bf16_fast()
    x = g.bfloat16() if bf16 else g.float()
    x = x.reshape(-1, *g.shape[-2:])  # (N, A, B)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, A, A)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*gram + c*gram@gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a*x + poly@x
    return (x.mT if tall else x).reshape(g.shape).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with muon=True (split along dim 0 by the group's `splits`), AdamW for the others.

    A plain torch Optimizer, so `fit` sets every group's lr, and checkpoints save and restore it like AdamW."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5, momentum_warmup: int = MOMENTUM_WARMUP,
                 ns_bf16: bool | None = None):
        # Newton-Schulz's precision (NS_BF16; None: bf16 on GPUs and on CPUs with fast bf16 products) is chosen once
        # and kept in the param groups, so checkpoints carry it: a resumed run must not switch because
        # cpu_bf16_fast's timing came out differently in the new process
        groups = [{**g, "params": list(g["params"])} for g in groups]  # iterables too: read here and by the base
        if ns_bf16 is None:
            ns_bf16 = any(p.device.type != "cpu" for g in groups for p in g["params"]) or cpu_bf16_fast()
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                                      momentum_warmup=momentum_warmup, weight_decay=0.0, muon=False, splits=None,
                                      ns_bf16=ns_bf16))

    @torch.no_grad()
    def step(self, closure=None):
        ortho: dict[tuple, list] = {}  # (wide shape, lr, ns steps) -> [(weight part, update part, transposed?)]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr, wd = group["lr"], group["weight_decay"]
            if group["muon"] and params:
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                for p in params:  # a tensor, as AdamW's step: checkpoints save it and a resume keeps the ramp
                    self.state[p]["step"] = self.state[p].get("step", torch.zeros(())) + 1
                warmup = group.get("momentum_warmup", 0)  # absent from checkpoints written before the ramp: none
                ramp = min(1.0, (float(self.state[params[0]]["step"]) - 1) / warmup) if warmup else 1.0
                beta = MOMENTUM_START + (group["momentum"] - MOMENTUM_START) * ramp
                grads = [p.grad for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - beta)
                updates = torch._foreach_lerp(grads, bufs, beta)  # Nesterov
                torch._foreach_mul_(params, 1 - lr * wd)
                for p, update in zip(params, updates, strict=True):
                    for w, u in zip(p.split(group["splits"]), update.split(group["splits"]), strict=True):
                        tall = u.shape[0] > u.shape[1]
                        key = (*sorted(u.shape), lr, group["ns_steps"], group.get("ns_bf16"))
                        ortho.setdefault(key, []).append((w, u.T if tall else u, tall))
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                b1, b2 = group["betas"]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
        # Every same-shaped part (wide side up) is orthogonalised in one stack: a few batched matmuls per
        # Newton-Schulz step instead of a few per matrix, which at small widths is most of Muon's cost.
        for (_, large, lr, ns_steps, ns_bf16), parts in ortho.items():
            o = orthogonalize(torch.stack([u for _, u, _ in parts]), ns_steps, bf16=ns_bf16).unbind(0)  # N x (s, l)
            o = [oi.T if tall else oi for oi, (_, _, tall) in zip(o, parts, strict=True)]
            # 0.2 * sqrt(max(A, B)): the orthogonal update's RMS matched to AdamW's, so one lr fits both
            torch._foreach_add_([w for w, _, _ in parts], o, alpha=-lr * 0.2 * math.sqrt(large))
        return None
