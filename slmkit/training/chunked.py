"""Losses over the output head computed chunk by chunk, never holding a step's whole (tokens, vocabulary) logits.

A decoder's last matmul, hidden (N, C) @ head (V, C)^T, gives N x V logits: at a 49,152-token vocabulary (SmolLM2's,
which a student distilled from it must share) and a 16 x 256 batch that is 200M floats, ~800 MB in fp32, written
once and read back by the softmax, the loss and their backward passes. On a CPU the step then waits on memory, not
on arithmetic (slm-3m with SmolLM2's tokenizer trained ~9x slower than with its own 4k vocabulary).

`head_loss` walks the rows in chunks of ~CHUNK_ELEMENTS logits. For each chunk it computes the logits, the loss
and, at once, the loss's gradient with respect to those logits (autograd on the chunk alone), folds that gradient
into the gradients of the hidden states (g @ W) and of the head (g^T @ h), and drops the chunk. The backward pass
then only scales the two stored gradients. This is the approach of Liger's fused linear cross-entropy and Apple's
cut-cross-entropy (compute the loss and its gradient per block of rows); here the per-chunk loss is any function of
the chunk's logits, so cross-entropy and the distillation divergences (slmkit.distill.losses) share it.

Rows whose targets are all ignored (SFT's prompt tokens, a masked LM's unmasked ones) are dropped before the head,
which saves their share of the matmul too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.data.chat import IGNORE
from slmkit.model.folder import config_value, logits_of, unwrap
from slmkit.model.llama import Llama

# Logits per chunk: 8M floats (32 MB; 170 rows at a 49k vocabulary). Smaller chunks measured slower on 2 CPU cores:
# each chunk's head gradient g^T @ h is a matmul over its rows only, slow when they are few (docs/benchmarks.md,
# "chunked head loss").
CHUNK_ELEMENTS = 1 << 23

# Causal LMs whose logits are exactly final hidden state @ output embedding^T (no bias, soft-capping or scaling):
# transformers' implementations of these return that hidden state as base_model(...)[0].
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neo", "gpt2", "smollm3", "olmo2")

# loss_of(logits (n, V) fp32, rows: the chunk's indices into the kept rows) -> the chunk's summed loss (a scalar,
# differentiated by autograd), or (that loss, its gradient with respect to the logits)
ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def hidden_and_head(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, T) ids -> (the final hidden states (B, T, C), the head's weight (V, C)) such that logits = h @ W^T; None
    for a model whose head is not a plain linear map of its last hidden state (then compute the logits whole)."""
    m = unwrap(model)
    if isinstance(m, Llama):
        return model(idx, head=False), (m.embed.weight if m.lm_head is None else m.lm_head.weight)
    base = m.get_base_model() if hasattr(m, "get_base_model") else m  # a peft model: the model under its adapters
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES or not isinstance(head, nn.Linear)
            or head.bias is not None or getattr(config, "final_logit_softcapping", None)):
        return None
    return base.base_model(input_ids=idx)[0], head.weight


class _HeadLoss(torch.autograd.Function):
    """loss = sum over chunks of loss_of(h_chunk @ W^T) * scale; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, loss_of: ChunkLoss, chunk: int, scale: float, compute_dtype):
        dt = compute_dtype or h.dtype
        hc_all, w = h.detach().to(dt), weight.detach().to(dt)
        grad_h = torch.empty_like(hc_all) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            rows = slice(s, min(s + chunk, h.shape[0]))
            hc = hc_all[rows]
            with torch.enable_grad():
                z = (hc @ w.t()).float().requires_grad_()  # (n, V): the only logits alive
                loss = loss_of(z, rows)
                if isinstance(loss, tuple):  # the loss brought its own gradient (cross-entropy: in place, faster)
                    loss, g = loss
                else:
                    (g,) = torch.autograd.grad(loss, z)
            total += loss.detach()
            g = g.mul_(scale).to(dt)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[rows])
            if grad_w is not None:
                if dt == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_out).to(ctx.h_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


@torch.compiler.disable  # a Python loop with autograd inside: eager is what it is written for
def head_loss(h: torch.Tensor, weight: torch.Tensor, loss_of: ChunkLoss, scale: float = 1.0,
              chunk: int | None = None) -> torch.Tensor:
    """SCALE x the sum over row chunks of LOSS_OF(h[rows] @ WEIGHT^T, rows), differentiable in H (N, C) and WEIGHT
    (V, C), with at most CHUNK rows' logits (default: ~CHUNK_ELEMENTS of them) in memory at once. Under autocast the
    matmuls run in its dtype and the loss in fp32, as autocast would run them."""
    device = h.device.type
    dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _HeadLoss.apply(h, weight, loss_of, chunk, scale, dt)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of MODEL on (x, y) (y: -100 where no loss is taken): the mean over the targets
    that count (0 when there are none), the value of F.cross_entropy(logits, y, ignore_index=-100) where that is
    defined. Chunk by chunk when the step's logits exceed 2 x CHUNK_ELEMENTS (a large vocabulary); below that the
    logits whole, as before chunking (one chunk would gain nothing, and `--compile` fuses the whole loss)."""
    large = y.numel() * (config_value(model, "vocab_size") or 0) > 2 * CHUNK_ELEMENTS
    found = hidden_and_head(model, x) if large else None
    if found is None:  # a small step (the whole logits are cheap, and compile into one graph) or an unsplittable head
        logits = logits_of(model, x).float()
        total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        return total / (y != IGNORE).sum().clamp(min=1)
    h, weight = found
    keep = (y != IGNORE).flatten()
    targets = y.flatten()
    h = h.flatten(0, 1)
    if not bool(keep.all()):
        h, targets = h[keep], targets[keep]  # only rows with a target go through the head
    if targets.numel() == 0:
        return h.sum() * 0.0  # nothing to learn from: a zero that still reaches the graph
    return head_loss(h, weight, lambda z, rows: cross_entropy_and_grad(z, targets[rows]), scale=1.0 / targets.numel())


def cross_entropy_and_grad(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits Z (n, V) against TARGETS (n,) and its gradient softmax(z) - onehot, computed
    in Z's memory: five passes over it with one exp, where autograd's log-softmax and its backward allocate and make
    more. Z is overwritten."""
    z = z.detach()
    rows = torch.arange(len(targets), device=z.device)
    picked = z[rows, targets]  # (n,), before Z is overwritten
    m = z.amax(-1, keepdim=True)  # (n, 1)
    norm = z.sub_(m).exp_().sum(-1, keepdim=True)  # z = exp(z - max)
    loss = (norm.log().squeeze(-1) + m.squeeze(-1) - picked).sum()
    g = z.div_(norm)  # softmax
    g[rows, targets] -= 1.0
    return loss, g
