"""`--preset auto`: pick a model size, context, batch and learning rate for a corpus and a budget.

The rule is compute-first. Small models trained briefly are limited by how many tokens they see, so the model is
sized for the compute the budget buys: estimate the training FLOPs (6 x params x tokens) this device delivers in the
budget (on a CPU: measured, device_flops), then take the largest preset that still sees about TOKENS_PER_PARAM tokens
per parameter. The constants were calibrated on 2 CPU cores (docs/benchmarks.md: tinyshakespeare, 180 s) — re-check
them when the loop changes.
"""

from __future__ import annotations

import functools
import time

import torch

from slmkit import distributed
from slmkit.model.presets import DECODERS, llama_params

# Sustained training FLOP/s of our loop at small shapes (measured: docs/benchmarks.md). Conservative on purpose:
# an overestimate picks a model too big to converge in the budget, which costs more than one a size too small.
# On the CPU this is the floor: a time budget is planned at our own training step's measured rate (cpu_train_flops)
# where that is more. The CPUs we met span 2.5x at the same core count: ~50 GFLOP/s on AMD EPYC (AVX2) hosts, 96
# (fp32) and 115 (bf16) on an AMD EPYC with AVX-512 (Zen 5), 126 on a Xeon with AMX; a fixed share of the matmul peak
# missed the Zen 5 by 1.8x (0.33 of 193 GFLOP/s planned, 0.50 of it sustained), so the step itself is timed.
CPU_FLOPS_PER_THREAD = 25e9


GPU_FLOPS = 60e12


# Tokens per non-embedding parameter the budget must buy. Far below Chinchilla's 20: on minutes-long CPU budgets
# the best held-out loss came from models that see only ~3 tokens per parameter (docs/benchmarks.md).
TOKENS_PER_PARAM = 3


# --optimizer muon's lr over AdamW's: best at 4-6x on slm-tiny (64 dims, 200 steps), 2-3.3x alike on slm-1m
# (128 dims, 180 s); wider models keep AdamW's rate (Moonlight's setting).
MUON_LR_SCALE = 3.0


# (preset, config overrides), smallest first; the 3-layer slm-1m is the best 3-minute CPU model we measured.
AUTO_LADDER: list[tuple[str, dict]] = [
    ("slm-tiny", {}), ("slm-1m", {"num_hidden_layers": 3}), ("slm-1m", {}), ("slm-3m", {}), ("slm-7m", {}),
    ("slm-15m", {}), ("slm-30m", {}), ("slm-65m", {}), ("slm-125m", {}),
]


DEFAULT_SECONDS = 300.0  # when no budget is given at all


# Config fields every auto pick sets. An untied LM head costs no extra matmul FLOPs (the tied one is multiplied all
# the same), only its optimizer state and storage, and at a fixed step count it trained to 0.031 bits/byte better
# (tiny Shakespeare, slm-1m 3L, 450 steps, two seeds: docs/benchmarks.md). `--set tie_word_embeddings=true` keeps
# the smaller file for the edge.
AUTO_OVERRIDES = {"tie_word_embeddings": False}


# Weight decay grows with the passes the budget makes over the data: WEIGHT_DECAY_PER_PASS x passes, between the
# usual single-pass 0.1 and WEIGHT_DECAY_MAX. Repeated data overfits, and decay is the regulariser that paid here
# (dropout did not, at that many passes): on tiny Shakespeare at ~4.5 passes every value from 0.3 to 1.0 beat 0.1 on
# two seeds (this rule's 0.45: -0.011 bits/byte); on a 120 KB corpus (~50 passes budgeted, early stopping ends at
# ~15) 1.0 gave -0.084 and 2.0 less (docs/benchmarks.md).
WEIGHT_DECAY_PER_PASS, WEIGHT_DECAY_MAX = 0.1, 1.0


# Residual dropout joins weight decay once a budget repeats the data often enough that decay alone no longer holds
# off overfitting. On tiny Shakespeare (slm-1m, 128 dims, 180 s) at ~9-10 passes, 0.1 gained 0.021-0.028 bits/byte
# on a Xeon (two seeds) and 0.023 on an AMD Zen 5, and the runs no longer passed their best held-out loss before the
# schedule's end; at ~4.5 passes (AVX2 hosts) it did not pay, and on a 120 KB corpus slm-tiny (64 dims, capacity
# bound: 16 passes) lost 0.027-0.034 with it (docs/benchmarks.md). Late dropout (below) is neutral at 5 and 6.5
# passes (+0.002, -0.004 at equal steps), so the threshold sits at 6, not 8: a time budget's plan rests on a timing
# that can read ~25% slow, and a run planned at 6.4 passes that makes 8.9 then still gets its dropout.
AUTO_DROPOUT, DROPOUT_MIN_PASSES, DROPOUT_MIN_WIDTH = 0.1, 6.0, 128


# ... and it starts at this fraction of the budget ("late dropout", Liu et al., 2023: an overfitting model trains
# without it until it starts to repeat its data). Same benchmark, Zen 5, `--dropout 0.1`, four runs each: from the
# first step a mean of 2.132 bits/byte, from 40% of the budget 2.112 (best 2.101); 20% and 60% did worse
# (docs/benchmarks.md).
LATE_DROPOUT_START = 0.4


# A GPU's larger batch only where the corpus has room for it: each pass over the data must still make this many
# updates. On tiny Shakespeare (1 MB) the H100's 32k-token batch made 12 updates per pass; the run overfitted after
# 216 updates, still near its peak learning rate, and scored worse than 2 CPU cores' 4k-token batches
# (docs/benchmarks.md, "On a GPU"). Never below the CPU's batch, which the CPU benchmarks calibrated.
MIN_UPDATES_PER_PASS = 64


# A time budget's schedule ends after at most this many passes over the training data: beyond it a small corpus is
# only memorised, and early stopping then keeps weights from mid-schedule, before the learning rate decayed. On a
# 120 KB corpus on 2 CPU cores (~90 passes in the budget), two seeds each: no cap 3.305 / 3.314 bits/byte in 30 s,
# 16 passes 3.288 / 3.307 in 25 s, 10 passes 3.318 / 3.328 in 16 s (docs/benchmarks.md).
MAX_PASSES = 16


# A time budget's weight decay and dropout are chosen again at this fraction of the budget, from the passes the run
# will really make at the speed it has shown so far (train.py). The plan rests on a 1-3 s timing of our step
# (cpu_train_flops) that read 81-147 GFLOP/s in four processes on one idle Zen 5; one run planned 6.4 passes and made
# 8.9. By 10% of the budget the run has timed ~100 of its own steps.
REPLAN_AT = 0.1


# Sequences per optimizer step at least (shape_for): the context shortens before the batch gets fewer rows.
MIN_SEQUENCES = 16


def device_flops(device: str, dtype: str = "auto") -> float:
    """Training FLOP/s a time budget is planned with: a constant on GPUs; on the CPU the calibrated floor, or our
    training step's measured rate in the precision `--dtype DTYPE` trains in (cpu_train_flops) where that is more.
    Under torchrun the floor alone, so every rank plans the same run."""
    if device.startswith("cuda"):
        return GPU_FLOPS
    threads = torch.get_num_threads()
    floor = CPU_FLOPS_PER_THREAD * threads
    if distributed.world_size() > 1:
        return floor
    return max(floor, cpu_train_flops(threads, dtype))


@functools.cache
def cpu_train_flops(threads: int, dtype: str = "auto") -> float:
    """FLOP/s of our own training step on this CPU at the small end of AUTO_LADDER (slm-1m 3L, 16 x 256 tokens, vocab
    1,024), where FLOP/s are lowest, so larger rungs are planned conservatively: forward, backward, clipping and
    a Muon step (train's default optimizer), in the precision `--dtype DTYPE` gives a 128-dim model; the median of 6
    steps after two warm-up steps. ~1-3 s; leaves the RNG as it was."""
    from slmkit.hardware import cpu_bf16_fast
    from slmkit.model.folder import build_model
    from slmkit.model.presets import build_config
    from slmkit.training.losses import causal_lm_loss
    from slmkit.training.optim import make_optimizer

    vocab, block, batch = 1024, 256, MIN_SEQUENCES
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = build_config("slm-1m", vocab, {**AUTO_OVERRIDES, "num_hidden_layers": 3}, block_size=block)
        model = build_model(cfg)
        x, y = torch.randint(vocab, (2, batch, block))  # (B, T) each
    bf16 = dtype in ("bf16", "bfloat16") or (dtype == "auto" and cpu_bf16_fast())
    opt = make_optimizer(model, 1e-3, 0.1, "cpu", "muon", ns_bf16=bf16)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    # the middle two of 6: steps 0 and 1 warm the allocator and thread pool (1.1-1.6x a later step), and later steps
    # still vary 104-171 ms on a Zen 5; the middle two of 4 after one warm-up put the same idle machine at 121-178
    # GFLOP/s in six processes, enough to move a 180 s plan across the dropout rule's threshold
    seconds = sorted(times[2:])[2:4]
    return step_flops_per_token(cfg, vocab, block) * batch * block * 2 / sum(seconds)


def non_embedding_params(cfg: dict) -> int:
    return llama_params(**{**cfg, "vocab_size": 0}) - cfg["hidden_size"]


def step_flops_per_token(cfg: dict, vocab_size: int, block_size: int) -> float:
    """Forward+backward FLOPs per token: 6 x (matmul params incl. the LM head) + attention scores."""
    matmul = non_embedding_params(cfg) + vocab_size * cfg["hidden_size"]
    attention = 6 * cfg["num_hidden_layers"] * block_size * cfg["hidden_size"]  # QK^T and AV, fwd+bwd, causal half
    return 6 * matmul + attention


def context_for(cfg: dict, device: str) -> int:
    if device.startswith("cuda"):
        return 1024
    return 256 if cfg["hidden_size"] <= 256 else 512


def shape_for(cfg: dict, device: str, corpus_tokens: int | None = None) -> tuple[int, int]:
    """(block size, tokens per step): the device's context, shortened until a step holds MIN_SEQUENCES sequences.
    A GPU's batch shrinks on a small corpus (batch_tokens_for), and 4 sequences of 1024 tokens trained worse than 16
    of 256 on the H100 (tiny Shakespeare: 2.28-2.31 vs 2.16 bits/byte, docs/benchmarks.md); the CPU's shapes and a
    GPU's on a large corpus already hold 16 or more."""
    batch_tokens = batch_tokens_for(cfg, device, corpus_tokens)
    return min(context_for(cfg, device), batch_tokens // MIN_SEQUENCES), batch_tokens


def auto_recipe(corpus_bytes: int, device: str, seconds: float | None = None, steps: int | None = None,
                tokens: int | None = None, bytes_per_token: float = 3.0, dtype: str = "auto") -> dict:
    """Choose preset, block size, batch size, learning rate and warmup for this corpus and budget (DTYPE: the run's
    --dtype, which sets how fast a time budget is planned to train)."""
    corpus_tokens = int(corpus_bytes / bytes_per_token)
    choice = AUTO_LADDER[0]
    for name, overrides in AUTO_LADDER:
        cfg = {**DECODERS[name], **overrides}
        block, batch_tokens = shape_for(cfg, device, corpus_tokens)
        vocab = auto_vocab_size(corpus_bytes, cfg["hidden_size"])
        budget_tokens = planned_tokens(cfg, vocab, block, batch_tokens, device, steps, tokens,
                                       seconds if seconds or steps or tokens else DEFAULT_SECONDS, dtype)
        # A model that needs more than ~10 passes over a small corpus to get its tokens only memorises it.
        enough_data = corpus_tokens * 10 >= TOKENS_PER_PARAM * non_embedding_params(cfg)
        if budget_tokens >= TOKENS_PER_PARAM * non_embedding_params(cfg) and (enough_data or choice[0] == name):
            choice = (name, overrides)
    name, overrides = choice
    cfg = {**DECODERS[name], **overrides}
    block, batch_tokens = shape_for(cfg, device, corpus_tokens)
    d = cfg["hidden_size"]
    return {"preset": name, "overrides": {**AUTO_OVERRIDES, **overrides}, "block_size": block,
            "batch_size": max(1, batch_tokens // block), "lr": peak_lr(d), "warmup_steps": 50 if d <= 256 else 200}


def planned_passes(cfg: dict, block: int, step_tokens: int, train_tokens: int, device: str, steps: int | None = None,
                   tokens: int | None = None, seconds: float | None = None, dtype: str = "auto") -> float:
    """Passes over TRAIN_TOKENS that training CFG, STEP_TOKENS per step, makes until the first of the budgets runs
    out (a time budget's tokens estimated at device_flops)."""
    return planned_tokens(cfg, cfg["vocab_size"], block, step_tokens, device, steps, tokens, seconds, dtype) / max(
        1, train_tokens)


def weight_decay_for(passes: float) -> float:
    """Weight decay for a run that makes PASSES passes over its data: 0.1 up to one pass, 0.1 per pass beyond
    that, at most WEIGHT_DECAY_MAX."""
    return round(min(WEIGHT_DECAY_MAX, max(WEIGHT_DECAY_PER_PASS, WEIGHT_DECAY_PER_PASS * passes)), 3)


def dropout_for(cfg: dict, passes: float) -> float:
    """Residual dropout for a run of CFG that makes PASSES passes over its data: AUTO_DROPOUT from
    DROPOUT_MIN_PASSES passes on, for models DROPOUT_MIN_WIDTH wide or more; 0 otherwise."""
    return AUTO_DROPOUT if passes >= DROPOUT_MIN_PASSES and cfg["hidden_size"] >= DROPOUT_MIN_WIDTH else 0.0


def planned_tokens(cfg: dict, vocab: int, block: int, step_tokens: int, device: str, steps: int | None = None,
                   tokens: int | None = None, seconds: float | None = None, dtype: str = "auto") -> float:
    """Training tokens until the first of the budgets runs out (`slm train` stops at the first); a time budget's
    tokens estimated from device_flops. 0 when no budget is given."""
    planned = [t for t in (tokens, (steps or 0) * step_tokens) if t]
    if seconds:
        planned.append(device_flops(device, dtype) * seconds / step_flops_per_token(cfg, vocab, block))
    return min(planned, default=0)


def peak_lr(width: int, optimizer: str = "adamw") -> float:
    """Peak learning rate by model width. AdamW's ladder is the usual one for small decoders (nanoGPT's 1e-3 at
    384 dims sits between its rungs). Muon's update is rescaled to AdamW's RMS, but at these sizes it trains best
    at a higher rate: MUON_LR_SCALE times the ladder up to 256 dims, measured on tiny Shakespeare
    (docs/benchmarks.md); wider models, where we have not measured, keep AdamW's rate as Moonlight (Liu et al.) does."""
    lr = 3e-3 if width <= 128 else 2e-3 if width <= 256 else 1e-3 if width <= 512 else 6e-4
    return lr * (MUON_LR_SCALE if optimizer == "muon" and width <= 256 else 1.0)


def batch_tokens_for(cfg: dict, device: str, corpus_tokens: int | None = None) -> int:
    """Tokens per optimizer step: small for tiny models (more updates per second), larger as models grow; a GPU's
    8x larger batch shrinks (to a power of two, not below the CPU's) until a pass over CORPUS_TOKENS makes
    MIN_UPDATES_PER_PASS updates."""
    d = cfg["hidden_size"]
    base = 4096 if d <= 128 else 8192 if d <= 256 else 16384 if d <= 512 else 32768
    if not device.startswith("cuda"):
        return base
    room = corpus_tokens // MIN_UPDATES_PER_PASS if corpus_tokens else base * 8
    return max(base, min(base * 8, 1 << max(0, room.bit_length() - 1)))


def pass_cap(train_tokens: int, steps: int | None, tokens: int | None) -> int | None:
    """The token budget that ends a time-budgeted run after MAX_PASSES passes over TRAIN_TOKENS (the schedule then
    anneals within the passes the corpus supports); None when --steps or --tokens was given: those are kept."""
    return None if steps or tokens or not train_tokens else MAX_PASSES * train_tokens


def auto_vocab_size(corpus_bytes: int, hidden_size: int) -> int:
    """BPE vocabulary: ~sqrt(corpus bytes) as a power of two, capped so the LM head stays a small share of a tiny
    model's compute (16 x width)."""
    from slmkit.model.tokenizer import default_vocab_size

    return max(512, min(default_vocab_size(corpus_bytes), 16 * hidden_size))
