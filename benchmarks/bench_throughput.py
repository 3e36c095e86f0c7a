"""Training throughput at nanoGPT's exact CPU shape: slmkit vs nanoGPT vs a plain transformers Llama, same run.

Shape: char/byte-sized vocabulary (65), 4 layers, 4 heads, 128 dims, block 64, batch 12 (768 tokens per step).
Every system's training step (forward, backward, clipping, optimizer) is timed *interleaved*: each round runs
--steps steps of every system in turn, and a system's speed-up over nanoGPT is the median over rounds of the ratio
of the two in that round, so a busy minute on this shared machine slows both sides of a ratio alike.
Also reports model-FLOPs utilisation against this machine's matmul peak, measured here (fp32 and bf16).

    python benchmarks/bench_throughput.py [--rounds 8] [--steps 15] [--threads 2] [--compile] [--ceiling]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers.hf_llama import hf_llama_train_step  # noqa: E402
from benchmarks.peers.nanogpt_upstream import nanogpt_available, nanogpt_train_step  # noqa: E402
from slmkit.hardware import (
    cpu_has_bf16,  # noqa: E402
    matmul_rates,  # noqa: E402
)
from slmkit.model.folder import build_model, count_parameters  # noqa: E402
from slmkit.model.presets import build_config  # noqa: E402
from slmkit.training.losses import causal_lm_loss  # noqa: E402
from slmkit.training.optim import make_optimizer  # noqa: E402
from slmkit.training.recipe import step_flops_per_token  # noqa: E402

VOCAB, LAYERS, HEADS, DIM, BLOCK, BATCH = 65, 4, 4, 128, 64, 12
Step = Callable[[torch.Tensor, torch.Tensor], float]


def ceiling_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, pos=0) -> torch.Tensor:
    """NOT a model: our block with its RMSNorms, rotary embedding and SwiGLU product deleted (the gate half of the
    gate/up projection feeds w_down directly). The same matmuls, attention and residuals: the step time eager mode
    could reach if every Llama-specific elementwise op were free (--ceiling)."""
    B, T, C = x.shape
    nh, nkv, hd = self.n_head, self.n_kv, self.head_dim
    qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hd)  # (B, T, nh+2nkv, hd)
    q, k, v = (qkv[:, :, a:b].transpose(1, 2) for a, b in ((0, nh), (nh, nh + nkv), (nh + nkv, nh + 2 * nkv)))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    x = x + self.wo(y)
    gate, _ = self.w_gate_up(x).chunk(2, dim=-1)
    return x + self.w_down(gate)


def slmkit_train_step(compile: bool = False, dtype: torch.dtype | None = None, optimizer: str = "adamw",
                      ceiling: bool = False) -> tuple[Step, int]:
    """slmkit's model at nanoGPT's shape (multi-head attention, as nanoGPT) and the training step `slm train` runs."""
    torch.manual_seed(1337)
    cfg = build_config("slm-1m", VOCAB, {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                         "num_key_value_heads": HEADS, "hidden_size": DIM}, block_size=BLOCK)
    model = build_model(cfg)
    if ceiling:
        for block in model.layers:
            block.forward = types.MethodType(ceiling_forward, block)
    # Muon's Newton-Schulz in the step's precision, as `slm train` runs it on a CPU
    opt = make_optimizer(model, 1e-3, 0.1, "cpu", optimizer, ns_bf16=dtype == torch.bfloat16)
    loss_fn = torch.compile(causal_lm_loss) if compile else causal_lm_loss  # as `slm train --compile` does
    return training_step(model, opt, loss_fn, dtype), count_parameters(model)


def training_step(model, opt, loss_fn, dtype) -> Step:
    """The step `slm train` runs: the loss under autocast in DTYPE (None: fp32), backward, clipping at 1, OPT."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step: Step, n: int) -> list[float]:
    """Seconds per step for N steps on fresh random batches (made outside the timed part)."""
    times = []
    for _ in range(n):
        x, y = torch.randint(VOCAB, (BATCH, BLOCK)), torch.randint(VOCAB, (BATCH, BLOCK))
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="rounds; each runs every system for --steps steps")
    ap.add_argument("--steps", type=int, default=15, help="steps per system per round (their median is the round's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time slmkit with torch.compile (`slm train "
                    "--compile`); its first 10 steps (compilation) are reported apart")
    ap.add_argument("--ceiling", action="store_true", help="also time slmkit's step with the Llama block's norms, "
                    "rotary and SwiGLU product deleted (not a model: the bound on what fusing them could gain)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the practical peak: best of 5 bursts of large square products (bf16 in short ones: emulated on AVX2 hosts)
    (peak32,), (peak16,) = matmul_rates((torch.float32,), reps=20), matmul_rates((torch.bfloat16,), reps=2)
    makers = {}
    if nanogpt_available():  # upstream model.py from ../shared/peers/nanogpt; the baseline of every ratio
        makers["nanoGPT"] = lambda: nanogpt_train_step(VOCAB)
    makers |= {"transformers Llama": lambda: hf_llama_train_step(VOCAB),
              "slmkit": slmkit_train_step,
              "slmkit Muon (train default)": lambda: slmkit_train_step(optimizer="muon")}
    # bf16 autocast (what `slm train --dtype auto` picks on CPUs with fast bf16 products) gets a place in every round
    # where the CPU has bf16 units; elsewhere it runs emulated, ~15x slower: one short turn after the rounds
    bf16_units = cpu_has_bf16()
    if bf16_units:
        makers["slmkit bf16 autocast"] = lambda: slmkit_train_step(dtype=torch.bfloat16)
    if args.compile:
        makers["slmkit + torch.compile"] = lambda: slmkit_train_step(compile=True)
        if bf16_units:
            makers["slmkit bf16 + torch.compile"] = lambda: slmkit_train_step(compile=True, dtype=torch.bfloat16)
    if args.ceiling:
        makers["slmkit, no norm/rotary/SwiGLU"] = lambda: slmkit_train_step(ceiling=True)
    steps, rows = {}, {}
    for name, make in makers.items():
        steps[name], params = make()
        t0 = time.perf_counter()
        time_steps(steps[name], 10)  # one-off costs: the allocator's first blocks, torch.compile's compilation
        rows[name] = {"params": params, "first_10_steps_s": time.perf_counter() - t0, "rounds_ms": []}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rows[name]["rounds_ms"].append(statistics.median(time_steps(step, args.steps)) * 1000)
    if not bf16_units:
        bf16_step, params = slmkit_train_step(dtype=torch.bfloat16)
        bf16_ms = statistics.median(time_steps(bf16_step, 5)[2:]) * 1000
        rows["slmkit bf16 autocast (one turn)"] = {"params": params, "rounds_ms": [bf16_ms]}

    flops_tok = step_flops_per_token(build_config("slm-1m", VOCAB, {"num_hidden_layers": LAYERS, "num_attention_heads":
                                     HEADS, "num_key_value_heads": HEADS, "hidden_size": DIM}, block_size=BLOCK),
                                     VOCAB, BLOCK)
    base = rows["nanoGPT"]["rounds_ms"] if "nanoGPT" in rows else None
    print(f"matmul peak ({args.threads} threads): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s; "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    print(f"{'system':<32}{'ms/iter':>9}{'tokens/s':>11}{'vs nanoGPT':>12}{'range':>12}{'MFU fp32':>10}")
    for name, r in rows.items():
        ms = statistics.median(r["rounds_ms"])
        if base is None:  # no nanoGPT peer: no ratio to it
            ratios = None
        elif len(r["rounds_ms"]) == len(base):  # interleaved: the ratio within each round
            ratios = [b / m for b, m in zip(base, r["rounds_ms"], strict=True)]
        else:
            ratios = [statistics.median(base) / ms]
        r.update(ms_per_iter=ms, tokens_per_s=BATCH * BLOCK / ms * 1000,
                 vs_nanogpt=statistics.median(ratios) if ratios else None,
                 vs_nanogpt_range=[min(ratios), max(ratios)] if ratios else None, flops_per_token=flops_tok)
        r["mfu_fp32"] = r["tokens_per_s"] * flops_tok / peak32
        extra = f"   (first 10 steps {r['first_10_steps_s']:.0f} s)" if "compile" in name else ""
        vs = f"{r['vs_nanogpt']:>11.2f}x{min(ratios):>6.2f}-{max(ratios):<5.2f}" if ratios else f"{'-':>12}{'':>12}"
        print(f"{name:<32}{ms:>9.1f}{r['tokens_per_s']:>11,.0f}{vs}{r['mfu_fp32']:>9.1%}{extra}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "peak_fp32": peak32, "peak_bf16": peak16,
                                     "rounds": args.rounds, "steps_per_round": args.steps,
                                     "shape": dict(vocab=VOCAB, layers=LAYERS, heads=HEADS, dim=DIM, block=BLOCK,
                                                   batch=BATCH), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
