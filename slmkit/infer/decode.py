"""Compiled batch-1 decoding: `Llama.step` as torch.compile'd kernels, two per layer and one for the LM head.

Why: decoding one token reads every weight once, so at batch 1 on a CPU the speed is the rate at which the
matrix-vector products stream weights from RAM. The eager kernels (MKL's gemv/bmm) read ~18-24 GB/s on 2 cores of a
machine whose plain sum reads ~37 GB/s; bf16 weights fare worse (~10 GB/s: no fast bf16 gemv). Inductor writes each
product as a row reduction over the weight (one contiguous row per output, rows split across threads) fused with
the norm, rotary, residual and SwiGLU around it: ~28-38 GB/s in fp32, and bf16 weights are widened in registers, so
they cost half the bytes. Measured in docs/benchmarks.md (benchmarks/bench_decode.py --compile).

The residual stream stays fp32 whatever the weights' dtype; keys and values are stored in the cache's dtype.
Attention over the cache (whose length grows every step) stays eager, so the compiled kernels never see a changing
shape and compile once per model: ~3-9 s on 2 cores (less when inductor's on-disk cache already holds them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W (out, in) @ x (in,) as a row reduction: inductor streams each contiguous row once, widening bf16 to fp32."""
    return (w.float() * x).sum(-1)  # (out,)


def _norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean() + eps) * gain.float()  # RMSNorm of one fp32 vector (C,)


def compile_step(model: nn.Module) -> Callable[[int, list, int], torch.Tensor]:
    """A function (token, cache, pos) -> logits (V,) that computes MODEL.step(token, cache, pos) (our Llama: same
    maths, float rounding aside) with compiled kernels, compiled before it returns. Weights must be float
    nn.Linear/Embedding ones (not int8); they are made contiguous (out, in) in place, the layout a row reduction
    streams fastest."""
    from slmkit.model.llama import Llama

    if not isinstance(model, Llama):
        raise ValueError("--compile speeds up slmkit's Llama decoder only (a plain Llama config)")
    head_layer = model.embed if model.lm_head is None else model.lm_head  # tied or not
    linears = [m for b in model.layers for m in (b.wqkv, b.wo, b.w_gate_up, b.w_down)] + [head_layer]
    if any(not isinstance(getattr(m, "weight", None), torch.Tensor) or not m.weight.is_floating_point()
           for m in linears):
        raise ValueError("--compile needs float weights (this model has quantized layers)")
    with torch.no_grad():
        for m in linears:
            m.weight.data = m.weight.data.contiguous()  # undo decode_layout's transposed storage if it was applied
    c = model.config
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], model.head_dim
    eps = model.layers[0].eps if len(model.layers) else 1e-5

    def attn_in(x, gain, wqkv, cos, sin, kv_dtype: torch.dtype):
        """x (C,) -> queries (nh, hd) and this token's keys and values (nkv, hd), rotary applied."""
        qkv = _matvec(wqkv, _norm(x, gain, eps)).view(nh + 2 * nkv, hd)
        qk = qkv[:nh + nkv]
        qk = qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin  # models.rope's sign-folded rotate_half
        return qk[:nh].to(kv_dtype), qk[nh:].to(kv_dtype), qkv[nh + nkv:].to(kv_dtype)

    def attn_out_mlp(x, y, wo, gain, w_gate_up, w_down):
        """Residual x (C,), attention output y (nh*hd,) -> the block's output (C,): o-projection, RMSNorm, SwiGLU."""
        x = x + _matvec(wo, y.float())
        gate_up = _matvec(w_gate_up, _norm(x, gain, eps))
        ffn = gate_up.shape[0] // 2
        return x + _matvec(w_down, F.silu(gate_up[:ffn]) * gate_up[ffn:])

    def head(x, gain, w):
        return _matvec(w, _norm(x, gain, eps))  # (V,) logits in fp32

    attn_in, attn_out_mlp, head = (torch.compile(f, dynamic=False) for f in (attn_in, attn_out_mlp, head))

    def step(token: int, cache: list, pos: int) -> torch.Tensor:
        x = model.embed.weight[token].float().clone()  # (C,): a fresh fp32 vector, like every later layer's input
        cos, sin = model.cos[pos], model.sin[pos]  # (1, hd)
        for block, (k_cache, v_cache) in zip(model.layers, cache, strict=True):
            q, k, v = attn_in(x, block.attn_norm, block.wqkv.weight, cos, sin, k_cache.dtype)
            k_cache.select(2, pos).copy_(k)  # (1, nkv, hd) <- (nkv, hd)
            v_cache.select(2, pos).copy_(v)
            y = F.scaled_dot_product_attention(q.view(1, nh, 1, hd), k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                               enable_gqa=nkv != nh)  # (1, nh, 1, hd)
            x = attn_out_mlp(x, y.view(-1), block.wo.weight, block.mlp_norm, block.w_gate_up.weight,
                             block.w_down.weight)
        return head(x, model.norm, head_layer.weight)

    # Compile now, while loading, not during the first token: a reported decoding rate would otherwise include it.
    # Under inference mode, as generate_ids and the server decode (another grad mode would compile again).
    with torch.inference_mode():
        step(0, model.new_cache(1, 1), 0)
    return step
