# Vendored from https://github.com/karpathy/nanoGPT (model.py; training recipe from train.py and
# config/train_shakespeare_char.py), used as a reference peer for benchmarks.
#
# MIT License
#
# Copyright (c) 2022 Andrej Karpathy
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""nanoGPT's GPT model, vendored, plus a trainer that reproduces its ``train.py`` CPU recipe.

Full definition of a GPT Language Model, all of it in this single file.
References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

Changes from upstream ``model.py``: ``from_pretrained`` (downloads GPT-2 weights), ``generate`` and ``estimate_mfu``
are dropped as unused; type hints added; ``%``-formatting turned into f-strings for the linter. The model maths,
initialisation and optimizer grouping are unchanged.

The reproduced command is::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 \
        --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 \
        --lr_decay_iters=2000 --dropout=0.0
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------------------------------
# model.py (upstream)
# ---------------------------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # flash attention make GPU go brrrrr but support is only in PyTorch >= 2.0
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        if not self.flash:
            print("WARNING: using slow attention. Flash Attention requires PyTorch >= 2.0")
            # causal mask to ensure that attention is only applied to the left in the input sequence
            self.register_buffer(
                "bias",
                torch.tril(torch.ones(config.block_size, config.block_size)).view(
                    1, 1, config.block_size, config.block_size
                ),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
        if self.flash:
            # efficient attention using Flash Attention CUDA kernels
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            # manual implementation of attention
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    """GELU feed-forward block with a 4x hidden width."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual connection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    """GPT hyperparameters (upstream defaults are GPT-2 124M)."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster


class GPT(nn.Module):
    """GPT-2 style decoder with learned positions and an LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # with weight tying when using torch.compile() some warnings get generated:
        # "UserWarning: functional_call was passed multiple values for tied weights.
        # This behavior is deprecated and will be an error in future versions"
        # not 100% sure what this is, so far seems to be harmless. TODO investigate
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        # report number of parameters
        print(f"number of parameters: {self.get_num_params() / 1e6:.2f}M")

    def get_num_params(self, non_embedding: bool = True) -> int:
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, (
            f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        )
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        # model surgery to decrease the block size if necessary
        # e.g. we may load the GPT2 pretrained model checkpoint (block size 1024)
        # but want to use a smaller block size for some smaller, simpler model
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if hasattr(block.attn, "bias"):
                block.attn.bias = block.attn.bias[:, :, :block_size, :block_size]

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        # start with all of the candidate parameters
        param_dict = {pn: p for pn, p in self.named_parameters()}
        # filter out those that do not require grad
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")

        return optimizer


# ---------------------------------------------------------------------------------------------------------------------
# Shared benchmark helpers (also used by benchmarks.peers.hf_llama)
# ---------------------------------------------------------------------------------------------------------------------

# Iterations excluded from the median iteration time: the first steps pay for allocator and kernel warm-up.
WARMUP_ITERS_EXCLUDED = 10


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)`` (if given), restoring the previous value afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        # Restore so one benchmark's thread setting does not leak into the next one run in the same process.
        torch.set_num_threads(previous)


def get_batch(data: np.ndarray, block_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (input, next-token target) windows, exactly as nanoGPT's ``get_batch`` on CPU."""
    # Same single torch.randint call as upstream, so the global RNG stream (and hence the batches) match train.py.
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x, y


@torch.no_grad()
def split_loss(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: np.ndarray,
    block_size: int,
    windows_per_batch: int = 64,
) -> float:
    """Mean next-token cross-entropy (nats/token) over the whole split, in non-overlapping ``block_size`` windows.

    ``logits_fn(x, y)`` must return logits of shape (B, T, vocab) for inputs ``x``. Every token after the first is
    predicted exactly once; the last, shorter window covers the tail so no token is dropped.
    """
    ids = np.asarray(ids)
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise ValueError("split needs at least 2 tokens")
    starts = list(range(0, n_pred, block_size))
    full = [s for s in starts if s + block_size <= n_pred]
    tail = starts[len(full) :]
    total = 0.0

    def add(batch_starts: list[int], length: int) -> float:
        x = torch.stack([torch.from_numpy(ids[s : s + length].astype(np.int64)) for s in batch_starts])
        y = torch.stack([torch.from_numpy(ids[s + 1 : s + 1 + length].astype(np.int64)) for s in batch_starts])
        logits = logits_fn(x, y)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()

    for i in range(0, len(full), windows_per_batch):
        total += add(full[i : i + windows_per_batch], block_size)
    if tail:
        total += add(tail, n_pred - tail[0])
    return total / n_pred


def timing_summary(iter_times: list[float], tokens_per_iter: int) -> dict[str, float]:
    """Median ms/iter and tokens/s, skipping the first warm-up iterations when there are enough to spare."""
    steady = iter_times[WARMUP_ITERS_EXCLUDED:] if len(iter_times) > WARMUP_ITERS_EXCLUDED else iter_times
    median_s = statistics.median(steady)
    return {"ms_per_iter": median_s * 1e3, "tokens_per_s": tokens_per_iter / median_s}


# ---------------------------------------------------------------------------------------------------------------------
# train.py recipe
# ---------------------------------------------------------------------------------------------------------------------


def nanogpt_lr(it: int, *, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's ``get_lr``: linear warmup, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat."""
    # 1) linear warmup for warmup_iters steps (the (it + 1) / (warmup_iters + 1) form is upstream since PR #578)
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (lr - min_lr)


def check_ids(name: str, ids: np.ndarray, vocab_size: int, block_size: int) -> None:
    """Fail early, with a clear message, on splits too short for one window or ids outside the vocabulary."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"{name} has {len(ids)} tokens; need more than block_size + 1 = {block_size + 1}")
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"{name} holds token id {int(ids.max())} >= vocab_size {vocab_size}")


def train_nanogpt(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int = 64,
    batch_size: int = 12,
    max_iters: int = 2000,
    seconds: float | None = None,
    lr: float = 1e-3,
    min_lr: float = 1e-4,
    warmup_iters: int = 100,
    lr_decay_iters: int = 2000,
    weight_decay: float = 0.1,
    beta2: float = 0.99,
    grad_clip: float = 1.0,
    dropout: float = 0.0,
    vocab_size: int,
    eval_iters: int = 20,
    eval_interval: int = 250,
    seed: int = 1337,
    threads: int | None = None,
) -> dict:
    """Train nanoGPT as ``train.py config/train_shakespeare_char.py --device=cpu --compile=False ...`` would.

    Mirrors upstream step for step: seed, model init (bias=False, the train.py default), AdamW groups with betas
    (0.9, beta2), warmup + cosine schedule, one random batch prefetched ahead of each step, gradient clipping, fp32
    (on CPU train.py uses a null autocast context and its GradScaler is a no-op). The periodic ``estimate_loss``
    (every ``eval_interval`` iterations, ``eval_iters`` batches per split) is also run, because it draws from the same
    torch RNG and so shapes which training batches follow; its time is excluded from the timings.

    Like upstream (``if iter_num > max_iters: break``) a full run takes ``max_iters + 1`` optimizer steps. Training
    also stops once ``seconds`` of training time have elapsed; the schedule stays iteration-based, as upstream.

    Returns ``iters`` (optimizer steps taken), ``train_seconds``, ``ms_per_iter`` (median after the first 10 steps),
    ``tokens_per_s``, ``val_loss`` (nats/token over all of ``val_ids``, non-overlapping ``block_size`` windows),
    ``params`` (``get_num_params()``), plus ``final_train_loss`` and ``evals`` (the periodic estimates).
    """
    train_ids = np.asarray(train_ids)
    val_ids = np.asarray(val_ids)
    check_ids("train_ids", train_ids, vocab_size, block_size)
    check_ids("val_ids", val_ids, vocab_size, block_size)

    with num_threads(threads):
        torch.manual_seed(seed)
        config = GPTConfig(
            block_size=block_size,
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            bias=False,  # train.py's default, which config/train_shakespeare_char.py does not override
        )
        model = GPT(config)
        optimizer = model.configure_optimizers(weight_decay, lr, (0.9, beta2), "cpu")

        @torch.no_grad()
        def estimate_loss() -> dict[str, float]:
            # upstream's estimate_loss: eval_iters random batches per split, in eval mode
            out = {}
            model.eval()
            for split, data in (("train", train_ids), ("val", val_ids)):
                losses = torch.zeros(eval_iters)
                for k in range(eval_iters):
                    X, Y = get_batch(data, block_size, batch_size)
                    _, loss = model(X, Y)
                    losses[k] = loss.item()
                out[split] = losses.mean().item()
            model.train()
            return out

        evals: list[dict[str, float]] = []
        iter_times: list[float] = []
        train_seconds = 0.0
        lossf = float("nan")
        X, Y = get_batch(train_ids, block_size, batch_size)  # fetch the very first batch
        iter_num = 0
        while True:
            lr_now = nanogpt_lr(
                iter_num, lr=lr, min_lr=min_lr, warmup_iters=warmup_iters, lr_decay_iters=lr_decay_iters
            )
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_now

            if iter_num % eval_interval == 0:
                evals.append({"iter": iter_num, **estimate_loss()})

            t0 = time.perf_counter()
            _, loss = model(X, Y)
            # upstream fetches the next batch here, between forward and backward; same order, same RNG draws
            X, Y = get_batch(train_ids, block_size, batch_size)
            loss.backward()
            if grad_clip != 0.0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lossf = loss.item()  # upstream logs this every step with log_interval=1
            dt = time.perf_counter() - t0
            iter_times.append(dt)
            train_seconds += dt

            iter_num += 1
            if iter_num > max_iters:
                break
            if seconds is not None and train_seconds >= seconds:
                break

        model.eval()
        val_loss = split_loss(lambda x, y: model(x, y)[0], val_ids, block_size)

    return {
        "iters": len(iter_times),
        "train_seconds": train_seconds,
        **timing_summary(iter_times, batch_size * block_size),
        "val_loss": val_loss,
        "params": model.get_num_params(),
        "final_train_loss": lossf,
        "evals": evals,
    }


def nanogpt_train_step(
    vocab_size: int,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    beta2: float = 0.99,
    grad_clip: float = 1.0,
    seed: int = 1337,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], int]:
    """nanoGPT's model and optimizer at its CPU recipe's shape, and one training iteration of its ``train.py`` as a
    function ``step(X, Y) -> loss`` (forward, backward, clipping, AdamW, zero_grad; a constant learning rate, since
    the schedule does not change the cost of a step). Returns ``(step, parameter count)``: for step-interleaved
    throughput timing against other systems (benchmarks/bench_throughput.py)."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       bias=False)
    model = GPT(config)
    optimizer = model.configure_optimizers(weight_decay, lr, (0.9, beta2), "cpu")

    def step(X: torch.Tensor, Y: torch.Tensor) -> float:
        _, loss = model(X, Y)
        loss.backward()
        if grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model.get_num_params()
