"""One forward pass over ragged rows: the next token of every sequence being decoded and chunks of new prompts,
flattened into one (N, C) batch of tokens.

Why: on a CPU a small model's step is bound by reading the weights, not by arithmetic, so the prompt tokens of a
new request cost little when they ride in the same pass as the decode steps, and the sequences already streaming do
not stop while a prompt is read (the engine cuts long prompts into chunks, `Engine.prefill_chunk` tokens per step).
The products (norms, q/k/v, o, gate/up, down, the head) see all N tokens at once; only attention is per row:

    decode rows   rows 0..d-1 of the cache, one token each at its own position: one masked SDPA for all of them
    prompt chunks one row each, T tokens at positions p..p+T-1: causal within the chunk, full view of the row's past

The maths is `Llama.forward`'s (`ForwardOps`, the one definition of the block in model/block.py); only `attend`
differs. `tests/serve` checks that decoding through it gives generate()'s tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmkit.model.llama import ForwardOps


@dataclass
class Plan:
    """Where each of a pass's N tokens goes: D decode rows first (cache rows 0..D-1), then prompt chunks."""

    decode_pos: list[int]  # (D,) each decode row's position
    chunks: list[tuple[int, int, int]]  # (cache row, first position, tokens) of each prompt chunk, in token order
    device: torch.device | str = "cpu"

    def __post_init__(self):
        d, dev = len(self.decode_pos), self.device
        rows = list(range(d)) + [r for r, _, t in self.chunks for _ in range(t)]
        pos = list(self.decode_pos) + [p + i for _, p, t in self.chunks for i in range(t)]
        self.rows, self.positions = torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)  # (N,) each
        self.n_decode = d
        if d:
            self.decode_end = max(self.decode_pos) + 1
            dpos = self.positions[:d]
            self.decode_mask = (torch.arange(self.decode_end, device=dev) <= dpos[:, None])[:, None, None, :]
        self.chunk_masks = [torch.ones(t, p + t, dtype=torch.bool, device=dev).tril(diagonal=p)
                            for _, p, t in self.chunks]  # (T, p+T): causal in the chunk, the whole past before it
        ends = [i for i in range(d)]
        at = d
        for _, _, t in self.chunks:
            at += t
            ends.append(at - 1)
        self.last = torch.tensor(ends, device=dev)  # (D + chunks,): the token whose logits each row needs


class RaggedOps(ForwardOps):
    """ForwardOps over (N, C) tokens of several rows; attention follows the pass's `Plan` (given as POS)."""

    def attend(self, b, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
               plan: Plan) -> torch.Tensor:
        """q (N, nh, hd), k and v (N, nkv, hd) -> (N, nh*hd); this pass's keys and values are written to CACHE
        (rows, nkv, length, hd) first."""
        k_cache, v_cache = cache
        k_cache[plan.rows, :, plan.positions] = k  # (N, nkv, hd) into each token's row and position
        v_cache[plan.rows, :, plan.positions] = v
        gqa = k.shape[1] != q.shape[1]
        out = []
        d = plan.n_decode
        if d:
            end = plan.decode_end
            y = F.scaled_dot_product_attention(q[:d, :, None], k_cache[:d, :, :end], v_cache[:d, :, :end],
                                               attn_mask=plan.decode_mask, enable_gqa=gqa)  # (D, nh, 1, hd)
            out.append(y.flatten(1))  # (D, nh*hd)
        at = d
        for (row, p, t), mask in zip(plan.chunks, plan.chunk_masks, strict=True):
            qc = q[at:at + t].transpose(0, 1)[None]  # (1, nh, T, hd)
            y = F.scaled_dot_product_attention(qc, k_cache[row:row + 1, :, :p + t], v_cache[row:row + 1, :, :p + t],
                                               attn_mask=mask, enable_gqa=gqa)  # (1, nh, T, hd)
            out.append(y[0].transpose(0, 1).flatten(1))  # (T, nh*hd)
            at += t
        return torch.cat(out) if len(out) > 1 else out[0]


RAGGED = RaggedOps()


def ragged_forward(model: torch.nn.Module, tokens: list[int], cache: list, plan: Plan) -> torch.Tensor:
    """TOKENS (N, in PLAN's order) through slmkit's Llama MODEL, keys and values into CACHE (the engine's rows) ->
    logits (D + chunks, V): each decode row's next token, and the next token after each prompt chunk."""
    x = model.embed(torch.tensor(tokens, device=plan.device))  # (N, C)
    cos = model.cos[plan.positions].to(x.dtype)  # (N, 1, hd): each token's rotary at its own position
    sin = model.sin[plan.positions].to(x.dtype)
    for block, kv in zip(model.layers, cache, strict=True):
        x = RAGGED.block(block, x, (cos, sin), kv, plan)  # (N, C)
    x = x[plan.last]  # (R, C): only the tokens whose next-token logits someone needs
    x = F.rms_norm(x, (x.shape[-1],), model.norm, model.layers[0].eps if len(model.layers) else 1e-5)
    return F.linear(x, model.embed.weight) if model.lm_head is None else model.lm_head(x)  # (R, V)
