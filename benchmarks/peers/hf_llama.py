"""A plain Hugging Face ``transformers`` Llama trained with a plain PyTorch loop: the "off-the-shelf" peer.

The peer is "a plain transformers Llama (3 layers, 128 dims, block 256, batch 16, lr 3e-3, cosine to the time
budget)": ``LlamaForCausalLM`` built from a config (no pretrained weights), SDPA attention, tied embeddings, fp32,
``torch.optim.AdamW`` with betas (0.9, 0.95), linear warmup then cosine decay whose progress is the larger of the
iteration fraction and the elapsed fraction of the time budget, gradient clipping at 1.0, and random training
windows drawn exactly like nanoGPT's ``get_batch``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

# Iterations left out of the median iteration time: the first steps pay for allocator and kernel warm-up.
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
        # so one benchmark's thread setting does not leak into the next one run in the same process
        torch.set_num_threads(previous)


def get_batch(data: np.ndarray, block_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens and their next-token targets, each (B, T) int64.

    The offsets come from one ``torch.randint`` over ``len(data) - block_size``, as nanoGPT draws them, so a seeded
    run sees the batches a nanoGPT run with the same seed would."""
    starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    window = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


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


def check_ids(name: str, ids: np.ndarray, vocab_size: int, block_size: int) -> None:
    """Fail early, with a clear message, on splits too short for one window or ids outside the vocabulary."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"{name} has {len(ids)} tokens; need more than block_size + 1 = {block_size + 1}")
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"{name} holds token id {int(ids.max())} >= vocab_size {vocab_size}")


def default_intermediate_size(n_embd: int) -> int:
    """SwiGLU width 4 * n_embd * 2/3 (the usual Llama ratio), rounded up to a multiple of 32."""
    # Integer ceil-divisions avoid float rounding surprises: ceil(8 * n_embd / 3), then up to the next multiple of 32.
    width = -(-8 * n_embd // 3)
    return -(-width // 32) * 32


def build_hf_llama(
    vocab_size: int, *, n_layer: int, n_embd: int, n_head: int, intermediate_size: int | None, block_size: int
) -> LlamaForCausalLM:
    """A randomly initialised fp32 ``LlamaForCausalLM`` with tied embeddings and SDPA attention."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=intermediate_size or default_intermediate_size(n_embd),
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,  # plain multi-head attention, no grouped-query sharing
        max_position_embeddings=block_size,
        tie_word_embeddings=True,
        use_cache=False,  # training only: a KV cache would just cost memory
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).float()


def _configure_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices and embeddings only, not norm gains: the convention of both nanoGPT and HF's Trainer.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _train_step(
    model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, grad_clip: float
) -> float:
    # Loss computed from the logits against the already-shifted targets (HF's labels= would shift a second time).
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def budget_cosine_lr(
    it: int,
    elapsed: float,
    *,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    max_iters: int | None,
    seconds: float | None,
) -> float:
    """Linear warmup over ``warmup_iters``, then cosine from ``lr`` to ``min_lr`` over the iteration or time budget."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = 0.0
    if max_iters:
        progress = max(progress, it / max_iters)
    if seconds:
        progress = max(progress, elapsed / seconds)
    progress = min(progress, 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def train_hf_llama(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    *,
    vocab_size: int,
    n_layer: int = 3,
    n_embd: int = 128,
    n_head: int = 4,
    intermediate_size: int | None = None,
    block_size: int = 256,
    batch_size: int = 16,
    lr: float = 3e-3,
    seconds: float | None = 180,
    max_iters: int | None = None,
    warmup_iters: int = 50,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 1337,
    threads: int | None = None,
) -> dict:
    """Train a plain ``LlamaForCausalLM`` until ``max_iters`` steps or ``seconds`` of training time, whichever first.

    ``intermediate_size`` defaults to 4 * n_embd * 2/3 rounded up to a multiple of 32. The learning rate warms up
    linearly, then follows a cosine to ``lr * min_lr_ratio`` with progress = max(iter / max_iters, elapsed / seconds).

    Returns ``iters``, ``train_seconds``, ``ms_per_iter`` (median after the
    first 10 steps), ``tokens_per_s``, ``val_loss`` (nats/token over all of ``val_ids`` in non-overlapping
    ``block_size`` windows), ``params`` (unique parameters; Llama has no position table to exclude), plus
    ``final_train_loss``.
    """
    if seconds is None and max_iters is None:
        raise ValueError("give seconds, max_iters or both, or training never stops")
    train_ids = np.asarray(train_ids)
    val_ids = np.asarray(val_ids)
    check_ids("train_ids", train_ids, vocab_size, block_size)
    check_ids("val_ids", val_ids, vocab_size, block_size)

    with num_threads(threads):
        torch.manual_seed(seed)
        model = build_hf_llama(
            vocab_size,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            intermediate_size=intermediate_size,
            block_size=block_size,
        )
        model.train()
        optimizer = _configure_adamw(model, lr, weight_decay)
        min_lr = lr * min_lr_ratio

        iter_times: list[float] = []
        train_seconds = 0.0
        lossf = float("nan")
        it = 0
        while (max_iters is None or it < max_iters) and (seconds is None or train_seconds < seconds):
            lr_now = budget_cosine_lr(
                it,
                train_seconds,
                lr=lr,
                min_lr=min_lr,
                warmup_iters=warmup_iters,
                max_iters=max_iters,
                seconds=seconds,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            t0 = time.perf_counter()
            x, y = get_batch(train_ids, block_size, batch_size)
            lossf = _train_step(model, optimizer, x, y, grad_clip)
            dt = time.perf_counter() - t0
            iter_times.append(dt)
            train_seconds += dt
            it += 1

        model.eval()
        val_loss = split_loss(lambda x, y: model(input_ids=x).logits, val_ids, block_size)

    return {
        "iters": len(iter_times),
        "train_seconds": train_seconds,
        **timing_summary(iter_times, batch_size * block_size),
        "val_loss": val_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "final_train_loss": lossf,
    }


def hf_llama_train_step(
    vocab_size: int,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int = 64,
    intermediate_size: int | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 1337,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], int]:
    """A plain ``LlamaForCausalLM`` at nanoGPT's shape (defaults match ``nanogpt_upstream.nanogpt_train_step``) and
    one training step as ``step(x, y) -> loss`` at a constant learning rate. Returns ``(step, parameter count)``."""
    torch.manual_seed(seed)
    model = build_hf_llama(vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                           intermediate_size=intermediate_size, block_size=block_size)
    model.train()
    optimizer = _configure_adamw(model, lr, weight_decay)
    return (lambda x, y: _train_step(model, optimizer, x, y, grad_clip)), sum(p.numel() for p in model.parameters())
