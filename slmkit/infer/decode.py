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
from torch import nn

from slmkit.model.block import BlockOps, BlockWeights, rope
from slmkit.model.llama import Llama, StepOps


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W (out, in) @ x (in,) as a row reduction: inductor streams each contiguous row once, widening bf16 to fp32."""
    return (w.float() * x).sum(-1)  # (out,)


def _norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean() + eps) * gain.float()  # RMSNorm of one fp32 vector (C,)


class CompiledStepOps(StepOps):
    """The block's primitives for the compiled step: the eager step's (one token, preallocated cache, attention
    eager), with products as row reductions and rotary as rope()'s elementwise ops, which inductor fuses. The residual
    stream is fp32 (a row reduction's output); queries, keys and values leave attn_in in KV_DTYPE, the cache's."""

    def __init__(self, kv_dtype: torch.dtype):
        self.kv_dtype = kv_dtype

    def project(self, b: BlockWeights, x: torch.Tensor, gain: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _matvec(w, _norm(x, gain, b.eps))

    def add_product(self, b: BlockWeights, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + _matvec(w, y)  # a bf16 y is widened exactly, as y.float() would

    def rotary(self, qk: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rope(qk, *rot)  # cos, sin: (1, hd) at this position

    def attn_in(self, b: BlockWeights, x: torch.Tensor, rot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = BlockOps.attn_in(self, b, x, rot)  # (nh, hd), (nkv, hd), (nkv, hd) in fp32
        return q.to(self.kv_dtype), k.to(self.kv_dtype), v.to(self.kv_dtype)  # cast inside the kernel: no op


def compile_step(model: nn.Module) -> Callable[[int, list, int], torch.Tensor]:
    """A function (token, cache, pos) -> logits (V,) that computes MODEL.step(token, cache, pos) (our Llama: same
    maths, float rounding aside) with compiled kernels, compiled before it returns. Weights must be float
    nn.Linear/Embedding ones (not int8); they are made contiguous (out, in) in place, the layout a row reduction
    streams fastest. The caches must be model.new_cache's (the model's dtype)."""
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
    eps = model.layers[0].eps if len(model.layers) else 1e-5
    # Plain tensors, not the Block modules: cheaper guards per call (BlockWeights); one kernel serves every layer.
    weights = [BlockWeights(b.n_head, b.n_kv, b.head_dim, b.eps, b.attn_norm, b.wqkv.weight, b.wo.weight,
                            b.mlp_norm, b.w_gate_up.weight, b.w_down.weight) for b in model.layers]
    ops = CompiledStepOps(model.norm.dtype)  # new_cache's dtype
    # The block's two halves become kernels on this instance; ops.block() runs them around the eager attention.
    ops.attn_in, ops.attn_out_mlp = (torch.compile(f, dynamic=False) for f in (ops.attn_in, ops.attn_out_mlp))
    head = torch.compile(lambda x, gain, w: _matvec(w, _norm(x, gain, eps)), dynamic=False)  # (V,) logits, fp32

    def step(token: int, cache: list, pos: int) -> torch.Tensor:
        x = model.embed.weight[token].float().clone()  # (C,): a fresh fp32 vector, like every later layer's input
        rot = model.cos[pos], model.sin[pos]  # (1, hd) each
        for w, kv in zip(weights, cache, strict=True):
            x = ops.block(w, x, rot, kv, pos)  # (C,)
        return head(x, model.norm, head_layer.weight)

    # Compile now, while loading, not during the first token: a reported decoding rate would otherwise include it.
    # Under inference mode, as generate_ids and the server decode (another grad mode would compile again).
    with torch.inference_mode():
        step(0, model.new_cache(1, 1), 0)
    return step
