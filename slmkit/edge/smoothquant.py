"""SmoothQuant for `slm quantize --method w8a8` (Xiao et al. 2023): move activation outliers into the weights.

Quantizing activations per token to int8 (W8A8Linear) loses most where a few input channels carry values far larger
than the rest: those channels set the row's step. For each product y = W x, per input channel j,

    s_j = max|x_j| ^ alpha / max|W[:, j]| ^ (1 - alpha)        x' = x / s,  W' = W diag(s),  W' x' = W x

so x' is flatter (easier per-token) and W' a little less so (per-row int8 weights take it well). The division
x / s is folded into whatever makes x, so the model computes the same function in float and runs no extra op:

    q/k/v and gate/up products  <- the RMSNorm gain before them (attn_norm, mlp_norm)
    down product                <- the rows of `up` (silu(gate) * up is linear in up, channel by channel)
    o product                   <- the rows of `v` (attention mixes positions, not channels); with grouped-query
                                   attention query heads that share a key/value head share its factors
    output head                 <- the final RMSNorm gain; a head tied to the embedding is untied first (the
                                   lookup keeps the embedding): the file grows by one int8 copy of it (SmolLM2-135M:
                                   135 -> 164 MB), and perplexity's rise fell from +1.46% to +0.79% (q8_0: +0.49%)

max|x_j| is measured by running the float model over calibration text: a file the user gives (`--calibrate`) or,
without one, text the model samples itself (data-free; on SmolLM2-135M it did as well as 2,048 tokens of the
evaluation domain's own text: perplexity 22.31 vs 22.36 at alpha 0.5, docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

ALPHAS = (0.35, 0.5, 0.65, 0.8, 0.9)  # the candidates each product picks from (SmoothQuant's default is 0.5)


def calibration_rows(model: nn.Module, tokenizer, calibrate: Path | None, tokens: int, seed: int = 0,
                     row_len: int = 256) -> list[list[int]]:
    """Token rows of ROW_LEN (or shorter) to measure activations on, about TOKENS in all: CALIBRATE's text (plain
    text, JSONL, CSV, Parquet: what `slm train --data` reads), or the model's own samples (temperature 1) started
    from single common tokens."""
    if calibrate is not None:
        from slmkit.data.corpus import expand_paths, iter_documents

        ids: list[int] = []
        for doc in iter_documents(expand_paths([calibrate])):
            ids += tokenizer.encode(doc)
            if len(ids) >= tokens:
                break
        if len(ids) < 16:
            raise SystemExit(f"error: --calibrate {calibrate}: {len(ids)} tokens of text; give a file with at least a "
                             "few sentences (a few thousand tokens is plenty)")
        return [ids[i:i + row_len] for i in range(0, min(len(ids), tokens), row_len)]
    return _sampled_rows(model, tokens, row_len, seed)


@torch.inference_mode()
def _sampled_rows(model: nn.Module, tokens: int, row_len: int, seed: int) -> list[list[int]]:
    """The model's own text: rows sampled at temperature 1, all rows one decode step at a time in one batch."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, -(-tokens // row_len))
    vocab = model.config["vocab_size"]
    x = torch.randint(min(vocab, 1000), (n, 1), generator=gen)  # (n, 1): low ids are common tokens in BPE vocabs
    cache = model.new_cache(n, row_len)
    rows = [x]
    for pos in range(row_len - 1):
        logits = model(rows[-1], cache=cache, pos=pos)[:, -1].float()  # (n, V)
        rows.append(torch.multinomial(logits.softmax(-1), 1, generator=gen))  # (n, 1)
    return torch.cat(rows, 1).tolist()


@torch.inference_mode()
def activation_stats(model: nn.Module, rows: list[list[int]], keep: int = 32) -> tuple[dict, dict]:
    """Per nn.Linear of MODEL over the calibration ROWS: max |x_j| per input channel {name: (in,)}, and a sample of
    KEEP input vectors a row {name: (keep * rows, in)} to score candidate factors on."""
    peaks: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def record(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, in)
            m = x.abs().amax(0)
            peaks[name] = torch.maximum(peaks[name], m) if name in peaks else m
            samples.setdefault(name, []).append(x[torch.randperm(x.shape[0], generator=gen)[:keep]].clone())
        return hook

    handles = [mod.register_forward_hook(record(name)) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear)]
    try:
        for row in rows:
            model(torch.tensor([row]))
    finally:
        for h in handles:
            h.remove()
    return peaks, {k: torch.cat(v) for k, v in samples.items()}


def w8a8_error(x: torch.Tensor, w: torch.Tensor, levels: int = 127) -> float:
    """Relative error of x @ w.T when w is int8 per row and each row of x int8 with its own step (what W8A8Linear
    computes, emulated in float so that it needs no quantized engine)."""
    from slmkit.model.int8 import quantize_rows

    q, scale = quantize_rows(w)
    peak = x.abs().amax(1, keepdim=True).clamp(min=1e-30)
    xq = torch.round(x / peak * levels) * (peak / levels)
    ref = x @ w.t()
    return float((xq @ (q.float() * scale[:, None]).t() - ref).norm() / ref.norm().clamp(min=1e-30))


def factors(x_peak: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x_peak^alpha / w_peak^(1-alpha), kept away from 0 (dead channels keep s ~ 1)."""
    s = x_peak.clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-2, max=1e2)


def _pick(x_peak: torch.Tensor, w_peak: torch.Tensor, w: torch.Tensor, sample: torch.Tensor,
          alphas: tuple[float, ...], levels: int, expand=None) -> tuple[float, torch.Tensor]:
    """The alpha of ALPHAS whose factors give the product W x the least w8a8 error on SAMPLE, and those factors.
    EXPAND maps the factors onto W's input columns where several columns share one (grouped-query attention)."""
    best: tuple[float, float, torch.Tensor] | None = None
    for a in alphas:
        s = factors(x_peak, w_peak, a)
        cols = s if expand is None else expand(s)  # (in,)
        e = w8a8_error(sample / cols, w * cols, levels) if len(alphas) > 1 else 0.0
        if best is None or e < best[0]:
            best = (e, a, s)
    return best[1], best[2]


@torch.no_grad()
def untie_head(model: nn.Module) -> None:
    """Give MODEL an output head of its own, a copy of the tied embedding: the same function, and a head that
    smoothing can scale (call it before activation_stats, which measures nn.Linear inputs)."""
    if model.lm_head is None:
        model.lm_head = nn.Linear(model.embed.weight.shape[1], model.embed.weight.shape[0], bias=False)
        model.lm_head.weight.copy_(model.embed.weight)
        model.config["tie_word_embeddings"] = False


@torch.no_grad()
def smooth(model: nn.Module, peaks: dict[str, torch.Tensor], samples: dict[str, torch.Tensor],
           alpha: float | None = None) -> dict[str, float]:
    """Fold SmoothQuant's factors into MODEL's Llama blocks in place (the function stays the same in float). ALPHA
    None: each product gets the alpha of ALPHAS with the least w8a8 error on its calibration sample (most of
    SmolLM2-135M's chose 0.65-0.8; one alpha for all, the paper's way, did worse at any value: docs/benchmarks.md).
    Returns the alpha used per product."""
    from slmkit.hardware import cpu_has_vnni

    alphas, levels, chosen = (ALPHAS if alpha is None else (alpha,)), (127 if cpu_has_vnni() else 63), {}
    for i, b in enumerate(model.layers):
        p = f"layers.{i}."
        for norm, lin, name in ((b.attn_norm, b.wqkv, "wqkv"), (b.mlp_norm, b.w_gate_up, "w_gate_up")):
            w = lin.weight
            chosen[p + name], s = _pick(peaks[p + name], w.abs().amax(0), w, samples[p + name], alphas, levels)
            norm.div_(s)  # (C,)
            w.mul_(s)
        ffn, w = b.w_down.weight.shape[1], b.w_down.weight
        chosen[p + "w_down"], s = _pick(peaks[p + "w_down"], w.abs().amax(0), w, samples[p + "w_down"], alphas,
                                        levels)  # (ffn,)
        b.w_gate_up.weight[ffn:].div_(s[:, None])  # the `up` rows
        w.mul_(s)
        nh, nkv, hd = b.n_head, b.n_kv, b.head_dim
        group = nh // nkv  # query heads per key/value head: they read the same v rows, so share one factor

        def expand(s: torch.Tensor, group: int = group) -> torch.Tensor:  # (nkv, hd) -> (nh * hd,)
            return s.repeat_interleave(group, 0).reshape(-1)  # query head h reads key/value head h // group

        w = b.wo.weight
        x_peak = peaks[p + "wo"].view(nkv, group, hd).amax(1)  # (nkv, hd)
        w_peak = w.abs().amax(0).view(nkv, group, hd).amax(1)
        chosen[p + "wo"], s = _pick(x_peak, w_peak, w, samples[p + "wo"], alphas, levels, expand)
        b.wqkv.weight[(nh + nkv) * hd:].div_(s.reshape(-1, 1))  # the v rows
        w.mul_(expand(s))
    if model.lm_head is not None and "lm_head" in peaks:  # the head's input is the final RMSNorm's output
        w = model.lm_head.weight
        chosen["lm_head"], s = _pick(peaks["lm_head"], w.abs().amax(0), w, samples["lm_head"], alphas, levels)
        model.norm.div_(s)
        w.mul_(s)
    return chosen
