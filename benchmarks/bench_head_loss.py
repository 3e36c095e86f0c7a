"""The chunked head loss (training/chunked.py) against whole logits, at a large vocabulary: slm-3m with SmolLM2's
49,152-token vocabulary, 16 x 256 tokens a step, the step `slm train` runs (Muon, clipping), same run.

"chunked" is `slm train`'s loss (training/losses.py), which chunks when a step's logits exceed two chunks: at the
default --vocab it does; at a small --vocab both variants run the whole logits.
"whole logits" is the loss `slm train` used before the chunked one: logits (B, T, V) from the model, then
F.cross_entropy. Steps of every variant are interleaved: each round runs --steps steps of each in turn, a ratio is the
median over rounds of the two variants' medians in that round, so a busy minute slows both sides alike.

    python benchmarks/bench_head_loss.py [--rounds 4] [--steps 4] [--threads 2] [--vocab 49152] [--preset slm-3m]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import training_step  # noqa: E402

from slmkit.hardware import cpu_bf16_speedup, cpu_has_bf16  # noqa: E402
from slmkit.model.folder import build_model, count_parameters  # noqa: E402
from slmkit.model.presets import build_config  # noqa: E402
from slmkit.training.losses import causal_lm_loss  # noqa: E402
from slmkit.training.optim import make_optimizer  # noqa: E402

BATCH, BLOCK = 16, 256


def whole_logits_loss(model, x, y):
    """The reference: every position's logits at once, then cross-entropy (what the chunked loss replaces)."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


def make_step(preset: str, vocab: int, loss_fn, dtype):
    torch.manual_seed(1337)
    model = build_model(build_config(preset, vocab, block_size=BLOCK))
    opt = make_optimizer(model, 1e-3, 0.1, "cpu", "muon", ns_bf16=dtype == torch.bfloat16)
    return training_step(model, opt, loss_fn, dtype), count_parameters(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--preset", default="slm-3m")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/head_loss.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [None] + ([torch.bfloat16] if cpu_has_bf16() else [])
    variants, params = {}, 0
    for dt in dtypes:
        name = "bf16" if dt else "fp32"
        variants[f"whole logits {name}"], params = make_step(args.preset, args.vocab, whole_logits_loss, dt)
        variants[f"chunked {name}"], _ = make_step(args.preset, args.vocab, causal_lm_loss, dt)
    gen = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randint(args.vocab, (BATCH, BLOCK), generator=gen),
                     torch.randint(args.vocab, (BATCH, BLOCK), generator=gen))
    for step in variants.values():
        step(*batch())  # warm-up: allocator, Muon state
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, step in variants.items():
            times = []
            for _ in range(args.steps):
                x, y = batch()
                t0 = time.perf_counter()
                step(x, y)
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {BATCH * BLOCK / v[-1]:,.0f} tok/s"
                                                          for k, v in per_round.items()), file=sys.stderr)
    base = "whole logits bf16" if torch.bfloat16 in dtypes and cpu_bf16_speedup(args.threads) >= 3 else \
        "whole logits fp32"  # what `slm train --dtype auto` ran before: bf16 on CPUs with fast bf16 products
    rows = []
    print(f"\n{args.preset} at vocab {args.vocab:,} ({params:,} parameters), {BATCH}x{BLOCK} tokens a step, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}; baseline: {base}")
    print(f"| variant | tokens/s | vs {base} (median of rounds) |\n|---|---|---|")
    for name, secs in per_round.items():
        ratio = statistics.median(b / s for b, s in zip(per_round[base], secs, strict=True))
        rows.append({"variant": name, "tokens_per_s": BATCH * BLOCK / statistics.median(secs), "ratio": ratio})
        print(f"| {name} | {rows[-1]['tokens_per_s']:,.0f} | {ratio:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"preset": args.preset, "vocab": args.vocab, "params": params,
                                     "threads": args.threads, "baseline": base, "rows": rows,
                                     "bf16_speedup": cpu_bf16_speedup(args.threads) if cpu_has_bf16() else None},
                                    indent=1))


if __name__ == "__main__":
    main()
