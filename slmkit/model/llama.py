"""Preset -> config -> model, and the model folder on disk.

slmkit trains Llama-architecture decoders with its own compact module (`Llama` below): fused QKV and gate/up
projections and PyTorch's fused attention make it faster than `transformers`' LlamaForCausalLM on small shapes,
where per-op overhead dominates. The weights map one-to-one onto LlamaForCausalLM, so the folder we write is a
plain Hugging Face model folder (config.json + model.safetensors + tokenizer.json) and opens in `transformers`
with the same logits (`tests/model/test_llama.py` checks it). Other architectures (GPT-Neo, anything imported) run as
`transformers` models.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.hardware import cpu_has_bf16
from slmkit.model.block import BlockOps, rope, rotary_tables
from slmkit.model.block import rope_theta as rope_theta  # re-exported: callers written against llama.rope_theta


class Block(nn.Module):
    """One layer's weights and sizes; its maths is `block.BlockOps` (the one definition), run here with
    `ForwardOps` by forward() and with `StepOps` by Llama.step()."""

    def __init__(self, d: int, n_head: int, n_kv: int, head_dim: int, ffn: int, eps: float):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.eps = n_head, n_kv, head_dim, eps
        self.dropout = 0.0  # training-only regulariser on the residual branches; inference never uses it
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.wqkv = nn.Linear(d, (n_head + 2 * n_kv) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, d, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.w_gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.w_down = nn.Linear(ffn, d, bias=False)
        self.norms_folded = False  # decode_layout folded attn_norm/mlp_norm into wqkv/w_gate_up (StepOps skips them)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int | torch.Tensor = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). cos, sin: rotary tables at the T positions, (T, 1, hd) or, with a LongTensor
        POS, (B, 1, 1, hd); CACHE: this layer's preallocated (keys, values), each (B, nkv, max_T, hd)."""
        return FORWARD.block(self, x, (cos, sin), cache, pos)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.dropout and self.training):
            return x
        return residual_dropout(x, self.dropout) if x.device.type == "cpu" else F.dropout(x, self.dropout, True)


class ForwardOps(BlockOps):
    """The block's primitives for sequences (B, T, C): training, prefill, and batched decoding (serve)."""

    def project(self, b: Block, x: torch.Tensor, gain: torch.Tensor, w: nn.Module) -> torch.Tensor:
        return w(F.rms_norm(x, (x.shape[-1],), gain, b.eps))

    def add_product(self, b: Block, x: torch.Tensor, w: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return x + b._drop(w(y))

    def rotary(self, qk: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rope(qk, *rot)

    def attend(self, b: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor] | None, pos: int | torch.Tensor) -> torch.Tensor:
        """q (B, T, nh, hd), k and v (B, T, nkv, hd) -> (B, T, nh*hd). Without a cache: causal self-attention;
        with one, this step's keys/values are written into it at POS and q attends over everything so far."""
        B, T, nh, hd = q.shape
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd): SDPA's layout
        if cache is None:
            y = causal_attention(q, k, v)
        elif isinstance(pos, torch.Tensor):  # one decode step, each row at its own position (serve's batching)
            y = _attend_rows(q, k, v, cache, pos)
        else:
            y = _attend_from(q, k, v, cache, pos)
        return y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                 pos: torch.Tensor) -> torch.Tensor:
    """One token per row, row i at position pos[i]: q (B, nh, 1, hd), k and v (B, nkv, 1, hd) -> (B, nh, 1, hd)."""
    k_cache, v_cache = cache  # (B, nkv, max_T, hd)
    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, pos] = k[:, :, 0]  # (B, nkv, hd)
    v_cache[rows, :, pos] = v[:, :, 0]
    end = int(pos.max()) + 1
    mask = (torch.arange(end, device=q.device) <= pos[:, None])[:, None, None, :]  # (B, 1, 1, end): each row's past
    return F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _attend_from(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                 pos: int) -> torch.Tensor:
    """T new tokens at positions POS.. of every row: q (B, nh, T, hd), k and v (B, nkv, T, hd) -> (B, nh, T, hd)."""
    T = q.shape[2]
    k_cache, v_cache = cache  # (B, nkv, max_T, hd)
    k_cache[:, :, pos:pos + T] = k
    v_cache[:, :, pos:pos + T] = v
    mask = None
    if T > 1:  # prefill: causal within the new tokens, full view of the cached prefix
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)  # (T, pos+T)
    return F.scaled_dot_product_attention(q, k_cache[:, :, :pos + T], v_cache[:, :, :pos + T], attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


class StepOps(BlockOps):
    """The block's primitives for one new token of one sequence (x: (C,)), in about half the ops of forward() and
    with matrix-vector products: decoding a small model at batch 1 costs per-op overhead, not arithmetic."""

    def project(self, b: Block, x: torch.Tensor, gain: torch.Tensor, w: nn.Module | torch.Tensor) -> torch.Tensor:
        """RMSNorm(x) * gain = v * s: on CPU in fp32 the scalar s = 1/rms(x) rides on the product (matvec's alpha)
        instead of costing an op, and where decode_layout folded the gain into W, v is x itself: no op at all."""
        if x.is_cpu and x.dtype == torch.float32:  # is_cpu: 0.3 us less than x.device.type, twice a layer
            return matvec(w, x if b.norms_folded else x * gain, inv_rms(x, b.eps))
        return matvec(w, rms_norm(x, gain, b.eps))

    def add_product(self, b: Block, x: torch.Tensor, w: nn.Module | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return matvec(w, y, residual=x)  # the residual rides on the product (addmv's beta)

    def rotary(self, qk: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        return torch.mm(qk, rot)  # (nh+nkv, hd) @ (hd, hd): Llama.step's rotary matrix at this position

    def attend(self, b: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor], pos: int) -> torch.Tensor:
        """q (nh, hd), k and v (nkv, hd) at POS -> (nh*hd,). Caches: (1, nkv, max_T, hd)."""
        nh, nkv, hd = b.n_head, b.n_kv, b.head_dim
        k_cache, v_cache = cache
        k_cache.select(2, pos).copy_(k)  # (1, nkv, hd) <- (nkv, hd); fewer view ops than k_cache[0, :, pos]
        v_cache.select(2, pos).copy_(v)
        y = F.scaled_dot_product_attention(q.view(1, nh, 1, hd), k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                           enable_gqa=nkv != nh)  # (1, nh, 1, hd)
        return y.view(-1)  # (nh*hd,)


FORWARD, STEP = ForwardOps(), StepOps()


def residual_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) for the CPU at half its cost. PyTorch's CPU dropout draws one Bernoulli sample per element:
    4.2 ms forward + backward for a (16, 256, 128) bf16 activation on 2 Zen 5 cores, with 8 of them a step at slm-1m
    (~15% of the step once dropout is on). Here 64-bit random words are split into four 16-bit lanes, each element
    kept when its lane is at least p of the way up its range, and the kept values scaled by 1 / (1 - p): 2.0 ms.
    p is thus rounded to 1/65,536. The torch RNG draws the words, so a seed (and a checkpoint's saved RNG state)
    gives the same masks."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)  # all 64 bits
    lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    cut = round(p * 65536)
    mask = (lanes >= cut - 32768).to(x.dtype).mul_(65536 / (65536 - cut))  # kept: 1 / (1 - p); dropped: 0
    return x * mask


# Longest sequence for which causal_attention spells attention out on CPU under bf16 autocast. Its (T, T) scores
# grow with T squared (8 MB a layer at 16 x 4 heads x 256 in bf16, kept for the backward pass).
EXPLICIT_ATTENTION_MAX_T = 512


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention: q (B, nh, T, hd), k and v (B, nkv, T, hd) -> (B, nh, T, hd).

    On CPU under bf16 autocast, sequences up to EXPLICIT_ATTENTION_MAX_T take a written-out product, softmax,
    product: PyTorch's CPU flash-attention kernel is slow in bf16, and forward + backward ran 1.8-2.3x slower than this
    at T = 64-256 (AMD Zen 5, 2 cores; docs/benchmarks.md), ~40% of a training step. The softmax output is bf16, as
    the probabilities a bf16 flash kernel multiplies V by. Elsewhere (fp32, GPUs, long sequences): SDPA."""
    B, nh, T, hd = q.shape
    if not (q.device.type == "cpu" and T <= EXPLICIT_ATTENTION_MAX_T and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != nh)
    if k.shape[1] != nh:  # grouped-query attention: each key/value head serves nh / nkv query heads
        k, v = (t.repeat_interleave(nh // k.shape[1], dim=1) for t in (k, v))
    bias = _causal_bias.__wrapped__(T) if torch.compiler.is_compiling() else _causal_bias(T)  # compile: a constant
    scores = torch.baddbmm(bias, q.reshape(B * nh, T, hd), k.reshape(B * nh, T, hd).transpose(1, 2),
                           alpha=hd ** -0.5)  # (B*nh, T, T); the bias is -inf above the diagonal
    return torch.bmm(scores.softmax(-1), v.reshape(B * nh, T, hd)).view(B, nh, T, hd)


@functools.lru_cache(maxsize=8)
def _causal_bias(T: int) -> torch.Tensor:
    """(1, T, T) bf16: 0 on and below the diagonal, -inf above (broadcast over the batch by baddbmm)."""
    return torch.full((T, T), float("-inf")).triu(1).to(torch.bfloat16)[None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm's result in fewer dispatched ops (on CPU F.rms_norm runs ~12 small ones): faster for one token.
    Normalised in fp32 and cast back before the weight, as transformers' LlamaRMSNorm does (no-ops for fp32)."""
    if x.dim() == 1 and x.dtype == torch.float32 and x.device.type == "cpu":
        return x * inv_rms(x, eps) * weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def inv_rms(x: torch.Tensor, eps: float) -> float:
    """1 / sqrt(mean(x^2) + eps) of one fp32 vector on CPU as a Python float: 2 ops (dot, item) instead of 5. The
    decode step normalises twice per layer per token, so it is worth ~10% of a small model's decode (benchmarks.md)."""
    return 1.0 / math.sqrt(float(torch.dot(x, x)) / x.shape[0] + eps)


def matvec(layer: nn.Module | torch.Tensor, x: torch.Tensor, scale: float = 1.0,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """SCALE * LAYER(x) (+ RESIDUAL) for one vector x (C,). A plain fp32 weight (a Linear's or an Embedding's, or a
    tensor) takes torch.mv/addmv, cheaper on CPU than F.linear's (1, C) matrix product, or one bmm over a slab of rows
    per thread where decode_layout marked the layer `split_rows` (below); a bf16 weight takes mv on CPUs with bf16
    units (AVX512-BF16, AMX) and F.linear elsewhere; a layer with a `matvec` method (W8A8Linear) takes it; other
    layers (Int8Linear) are called as is.
    The scale and the residual ride on the product itself (addmv's/baddbmm's alpha and beta): each op saved is worth
    ~20 us per layer per token in a decode step, where small ops run on cold caches."""
    w = layer if isinstance(layer, torch.Tensor) else layer.weight if isinstance(layer, (nn.Linear, nn.Embedding)) \
        else None
    if w is None or w.dtype != torch.float32:
        if w is None and hasattr(layer, "matvec"):  # a layer with its own one-vector path (int8.W8A8Linear)
            return layer.matvec(x, scale, residual)
        if w is None:
            y = layer(x[None])[0]
        elif w.dtype == torch.bfloat16 and x.device.type == "cpu" and w.is_contiguous() and cpu_has_bf16():
            y = torch.mv(w, x)  # with bf16 units mv streams bf16 weights ~1.4x faster than F.linear's product
        else:  # without them mv has no fast bf16 kernel
            y = F.linear(x[None], w)[0]
        y = y if scale == 1.0 else y * scale
        return y if residual is None else residual + y
    out, inp = w.shape
    k = torch.get_num_threads()
    if getattr(layer, "split_rows", False) and k > 1 and inp % k == 0 and w.stride() == (1, out):
        # decode_layout's weight: (in, out) rows in memory. One mv streams it on one core, which cannot draw the
        # machine's memory bandwidth alone. Cut into k contiguous slabs of in/k rows (a view: no copy), one bmm
        # streams one slab per thread into a partial sum, and the k partials are added. The residual joins as
        # 1/k of it in each partial (exact for k a power of two).
        slabs = getattr(layer, "slabs", None)  # the view, made once: it costs two dispatched ops per product
        if slabs is None or slabs.shape[0] != k or slabs.data_ptr() != w.data_ptr():
            slabs = layer.slabs = w.t().view(k, inp // k, out)  # (k, in/k, out)
        xs = x.view(k, 1, inp // k)
        if residual is not None:
            partial = torch.baddbmm(residual.view(1, 1, out), xs, slabs, beta=1.0 / k, alpha=scale)
        elif scale != 1.0:
            partial = torch.baddbmm(_ZERO, xs, slabs, beta=0.0, alpha=scale)  # beta=0: the input is not read
        else:
            partial = torch.bmm(xs, slabs)  # (k, 1, out)
        return partial.view(k, out).sum(0)  # (out,)
    if residual is None and scale == 1.0:
        return torch.mv(w, x)
    return torch.addmv(_ZERO if residual is None else residual, w, x, beta=0.0 if residual is None else 1.0,
                       alpha=scale)


_ZERO = torch.zeros(())  # matvec's ignored input to baddbmm/addmv when beta=0 (CPU fp32 only: scale != 1 there)


class Llama(nn.Module):
    """A Llama decoder whose weights map exactly onto transformers' LlamaForCausalLM."""

    def __init__(self, config: dict):
        super().__init__()
        c = self.config = dict(config)
        d, L = c["hidden_size"], c["num_hidden_layers"]
        n_head, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or d // n_head
        self.embed = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList(Block(d, n_head, n_kv, self.head_dim, c["intermediate_size"], c["rms_norm_eps"])
                                    for _ in range(L))
        self.norm = nn.Parameter(torch.ones(d))
        self.lm_head = None if c.get("tie_word_embeddings", True) else nn.Linear(d, c["vocab_size"], bias=False)
        cos, sin = rotary_tables(c, self.head_dim)  # (max_T, 1, hd) each; sin carries rotate_half's signs
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._rot_basis: tuple[torch.Tensor, torch.Tensor] | None = None  # built by step() on first use
        self.compiled_step = None  # decode.compile_step's function, which step() then runs instead
        self.apply(self._init)
        for block in self.layers:  # GPT-2's scaled init of residual projections keeps early activations bounded
            std = c.get("initializer_range", 0.02) / math.sqrt(2 * L)
            nn.init.normal_(block.wo.weight, std=std)
            nn.init.normal_(block.w_down.weight, std=std)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.get("initializer_range", 0.02))

    def forward(self, idx: torch.Tensor, cache: list | None = None, pos: int | torch.Tensor = 0,
                head: bool = True) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V). With `cache`, positions start at `pos`; a LongTensor POS (B,)
        (with T = 1) puts each row at its own position, so sequences of different lengths decode in one batch.
        HEAD False: the final hidden states (B, T, C) instead, for losses that apply the head chunk by chunk
        (training.chunked)."""
        T = idx.shape[1]
        x = self.embed(idx)  # (B, T, C)
        if isinstance(pos, torch.Tensor):
            cos, sin = self.cos[pos].unsqueeze(1).to(x.dtype), self.sin[pos].unsqueeze(1).to(x.dtype)  # (B, 1, 1, hd)
        else:
            cos, sin = self.cos[pos:pos + T].to(x.dtype), self.sin[pos:pos + T].to(x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, None if cache is None else cache[i], pos)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.layers[0].eps if len(self.layers) else 1e-5)
        if not head:
            return x
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)

    def step(self, token: int, cache: list, pos: int) -> torch.Tensor:
        """One decode step of one sequence: TOKEN at position POS -> logits (V,). The same maths as
        forward(tensor([[token]]), cache, pos)[0, -1] (tests/model/test_llama.py checks it) in fewer, cheaper ops."""
        if self.compiled_step is not None:
            return self.compiled_step(token, cache, pos)
        x = self.embed(torch.tensor([token], device=self.cos.device))[0]  # (C,)
        rot = self._rotation(pos, x)  # (hd, hd)
        for block, kv in zip(self.layers, cache, strict=True):
            x = STEP.block(block, x, rot, kv, pos)  # (C,)
        x = rms_norm(x, self.norm, self.layers[0].eps if len(self.layers) else 1e-5)
        return matvec(self.embed if self.lm_head is None else self.lm_head, x)  # (V,)

    def _rotation(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        """Rotary at POS as one (hd, hd) matrix for every layer: q @ rot = q * cos + rotate_half(q) * sin, one
        product (StepOps.rotary) instead of rope()'s four ops. The roll that rope() uses is the permutation matrix
        `perm`; sin already carries rotate_half's signs."""
        if self._rot_basis is None or self._rot_basis[0].device != x.device:
            eye = torch.eye(self.head_dim, device=x.device)
            self._rot_basis = (eye, eye.roll(self.head_dim // 2, dims=1))  # perm[i, j] = 1 for i = j - hd/2 mod hd
        eye, perm = self._rot_basis
        return (eye * self.cos[pos] + perm * self.sin[pos]).to(x.dtype)  # (hd, hd)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list:
        """Preallocated key/value tensors, one pair per layer: (B, nkv, max_len, hd). Dtype and device follow the final
        norm's weight: a float parameter every Llama module has, int8 ones included."""
        p = self.norm
        shape = (batch, self.config["num_key_value_heads"], max_len, self.head_dim)
        return [(torch.zeros(shape, dtype=dtype or p.dtype, device=p.device),
                 torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)) for _ in self.layers]


def set_dropout(model: nn.Module, p: float) -> None:
    """Residual dropout for training our module (not part of the saved config: inference is unaffected)."""
    for block in model.modules():  # through DDP and torch.compile wrappers too
        if isinstance(block, Block):
            block.dropout = p


# decode_layout's rule for reading a weight with all threads at once (matvec's `split_rows`). It only pays when the
# weights come from RAM: A/B in docs/benchmarks.md, 2 threads. A model whose fp32 weights fit in ~16 MB of cache
# (1M: 4 MB) lost up to 16% when its small weights were split, so there only weights of 1 MB or more are; a larger
# model (7M: 26 MB) gained 14% from splitting every weight of 256 KB or more.
CACHED_MODEL_BYTES = 16 << 20


SPLIT_MIN_ELEMENTS = {"cached": 1 << 18, "streamed": 1 << 16}


def decode_layout(model: nn.Module) -> nn.Module:
    """Store every float Linear/Embedding weight of MODEL transposed in memory, in place: the same (out, in) tensor
    and values, as a view of (in, out) storage. Decoding one token multiplies each weight by a vector, and on CPU
    MKL streams a weight from RAM ~1.2-1.8x faster in this layout (decode A/B in docs/benchmarks.md: +15% tokens/s
    at 135M parameters, +30% at 7M). Large weights are also marked `split_rows`: `matvec` reads them with every
    thread (+17-22% at 30M-135M on 2 cores). Each Llama block's two RMSNorm weights are folded into the matrices they
    feed (wqkv, w_gate_up; the norms become ones): the same function up to float rounding, two ops fewer per layer
    in step(). fp32 only: bf16 weights in this layout take a slow kernel (3x slower measured). For inference on CPU
    only: optimizers expect contiguous weights. Saving still works (save_model writes contiguous copies of the folded,
    equivalent weights); calling it twice changes nothing."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
              and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    total = sum(m.weight.numel() * 4 for m in {id(m.weight): m for m in layers}.values())
    floor = SPLIT_MIN_ELEMENTS["cached" if total <= CACHED_MODEL_BYTES else "streamed"]
    for m in layers:
        w = m.weight
        if w.is_contiguous():
            w.data = w.data.t().contiguous().t()  # (out, in) view, strides (1, out)
        m.split_rows = w.numel() >= floor
    fast = {id(m) for m in layers if type(m) is nn.Linear}
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, Block) and not b.norms_folded and all(
                    id(lin) in fast and norm.dtype == torch.float32 for norm, lin in ((b.attn_norm, b.wqkv),
                                                                                      (b.mlp_norm, b.w_gate_up))):
                # RMSNorm(x) * g feeds W: W (RMSNorm(x) * g) = (W diag(g)) RMSNorm(x). Scaling W's input columns by
                # g once and setting g to ones gives the same model (forward() too), and step() skips two ops a layer.
                for norm, lin in ((b.attn_norm, b.wqkv), (b.mlp_norm, b.w_gate_up)):
                    lin.weight.mul_(norm)  # (out, in) * (in,)
                    norm.fill_(1.0)
                b.norms_folded = True
    return model
