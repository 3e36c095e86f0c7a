"""The Llama block, defined once.

    x -> RMSNorm -> fused q/k/v product -> rotary on q and k -> attention -> o-product + residual
      -> RMSNorm -> fused gate/up product -> SwiGLU -> down-product + residual

`BlockOps` writes this sequence once (`attn_in`, `attn_out_mlp`, `block`: the head layout, the splits, the SwiGLU)
over four primitives, and each place that runs the block supplies only those primitives:

    consumer                  class                        weight products        rotary      attention, cache
    training, prefill, serve  llama.ForwardOps             the layer (F.linear)   rope        causal / preallocated
    eager batch-1 step        llama.StepOps                matvec, norms folded   (hd, hd) mm one token, preallocated
    compiled step             infer.decode.CompiledStepOps row reductions         rope        the eager step's
    ONNX graph                edge.export_onnx.OnnxOps     the forward's          rope        past concatenated

int8 folders run the first two with `Int8Linear` layers (matvec calls a layer it cannot multiply itself).
Why primitives and not one code path: the consumers' costs differ (a training step is arithmetic; an eager decode
step is per-op overhead, ~20 us an op on cold caches, so its norm rides on the product; the compiled step fuses all
between two attention calls; ONNX needs ops its opset has), but a change to the block itself is made here, for all
four. The indirection costs the eager step a few Python calls per layer (~0.1 us each against 80-400 us for a
layer); the splits use tensor_split, which at any leading dims costs what the step's plain slices cost
(A/B: docs/benchmarks.md, 2026-12-06).

Shapes: x is (..., C), the leading dims (B, T) in the forward and the ONNX graph, none in the one-token steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class BlockWeights(NamedTuple):
    """What the block reads of a layer: a `llama.Block` has these attributes; the compiled step passes this tuple of
    plain tensors instead (a compiled function checks a module input's guards on every call: 3-6% of the compiled
    step's time at slm-1m, measured)."""

    n_head: int
    n_kv: int
    head_dim: int
    eps: float
    attn_norm: Any  # (C,) RMSNorm gain
    wqkv: Any  # ((nh+2nkv)*hd, C): queries, keys, values stacked; a Linear, an Int8Linear or a tensor
    wo: Any  # (C, nh*hd)
    mlp_norm: Any  # (C,)
    w_gate_up: Any  # (2*ffn, C): gate and up stacked
    w_down: Any  # (C, ffn)


class BlockOps:
    """The block over four primitives a consumer supplies (subclasses override them):

    project(b, x, gain, w)          W (RMSNorm(x) * gain): a norm and the product it feeds, as one primitive so the
                                    eager step can fold the norm into the product; -> (..., out)
    add_product(b, x, w, y)         x + W y: a product added onto the residual stream; -> (..., C)
    rotary(qk, rot)                 queries and keys (..., nh+nkv, hd) rotated by ROT, the consumer's rotary tables
                                    for these positions
    attend(b, q, k, v, cache, pos)  attention of q (..., nh, hd) over the keys/values so far, with this step's k and v
                                    (..., nkv, hd) stored in CACHE at POS as the consumer keeps it; -> (..., nh*hd)

    b is the layer's weights and sizes (a `Block`, or `BlockWeights`)."""

    def project(self, b, x: torch.Tensor, gain, w) -> torch.Tensor:
        raise NotImplementedError

    def add_product(self, b, x: torch.Tensor, w, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotary(self, qk: torch.Tensor, rot) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, b, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, pos) -> torch.Tensor:
        raise NotImplementedError

    def attn_in(self, b, x: torch.Tensor, rot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., C) -> queries (..., nh, hd), this step's keys and values (..., nkv, hd), rotary applied."""
        nh, nkv = b.n_head, b.n_kv
        qkv = self.project(b, x, b.attn_norm, b.wqkv)  # (..., (nh+2nkv)*hd)
        qkv = qkv.unflatten(-1, (nh + 2 * nkv, b.head_dim))  # (..., nh+2nkv, hd): one row per head
        # tensor_split along the head axis (-2): views at any leading dims for what two plain slices cost (an
        # Ellipsis index costs ~0.6 us more each); positional arguments parse faster than keywords in a decode step
        qk, v = qkv.tensor_split((nh + nkv,), -2)  # (..., nh+nkv, hd), (..., nkv, hd)
        q, k = self.rotary(qk, rot).tensor_split((nh,), -2)  # one rotary call for queries and keys together
        return q, k, v

    def attn_out_mlp(self, b, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual x (..., C), attention output y (..., nh*hd) -> the block's output (..., C)."""
        x = self.add_product(b, x, b.wo, y)  # (..., C)
        gate, up = self.project(b, x, b.mlp_norm, b.w_gate_up).chunk(2, -1)  # (..., ffn) each
        return self.add_product(b, x, b.w_down, F.silu(gate) * up)  # (..., C)

    def block(self, b, x: torch.Tensor, rot, cache=None, pos: int | torch.Tensor = 0) -> torch.Tensor:
        """One Llama block: x (..., C) -> (..., C). The compiled step replaces attn_in and attn_out_mlp on its
        instance with their compiled versions; attention between them stays eager (the cache grows each step)."""
        q, k, v = self.attn_in(b, x, rot)
        return self.attn_out_mlp(b, x, self.attend(b, q, k, v, cache, pos))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the 'rotate half' layout that transformers' Llama uses. x: (..., H, hd).

    rotate_half(x) = cat(-x2, x1) equals roll(x, hd/2) times a sign pattern; the sign is folded into SIN (see
    rotary_tables), so this is 4 ops instead of 6 — it matters at small widths, where elementwise ops dominate.
    The ONNX exporter writes the roll as two slices and a concat. cos, sin: (T, 1, hd), or anything broadcasting so.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def rope_theta(c: dict) -> float:
    """transformers 5 moved rope_theta into rope_parameters; read either."""
    return float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)))


def rotary_tables(c: dict, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables for every position of config C: (max_T, 1, hd) each, for `rope`."""
    inv_freq = 1.0 / (rope_theta(c) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    t = torch.arange(c["max_position_embeddings"], dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (max_T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_T, hd): both halves of a head share a frequency
    sign = torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2)))  # rotate_half's signs, (hd,)
    return emb.cos().unsqueeze(1), (emb.sin() * sign).unsqueeze(1)  # (max_T, 1, hd): broadcast over heads
