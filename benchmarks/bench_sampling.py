"""Cost of picking one token: slmkit's sample_next vs transformers' logits processors + torch.multinomial, same run.

What `slm generate` and the server pay per token on top of the model step. The peer is what transformers'
generate(do_sample=True) runs per token: TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper over all V,
softmax, torch.multinomial (greedy: argmax). Logits are 3 x randn (a real model's are more peaked, which only helps
slmkit's top-p search).

    python benchmarks/bench_sampling.py [--calls 1000] [--json benchmarks/results/sampling.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkit.infer.generate import SamplingParams, sample_next  # noqa: E402

CASES = {  # name: (temperature, top_k, top_p); top_k 0 = off
    "default (T 0.8, top-k 50)": (0.8, 50, 1.0),
    "greedy": (0.0, 0, 1.0),
    "top-k 50 + top-p 0.9": (0.8, 50, 0.9),
    "top-p 1 alone (server)": (0.8, 0, 1.0),
    "top-p 0.9 alone": (0.8, 0, 0.9),
}


def hf_pick(logits: torch.Tensor, t: float, k: int, p: float, gen: torch.Generator) -> int:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None]  # (1, V): the processors work on batches
    if t <= 0:
        return int(torch.argmax(scores, dim=-1))
    scores = TemperatureLogitsWarper(t)(None, scores)
    if k:
        scores = TopKLogitsWarper(k)(None, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen))


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000, help="calls timed per case")
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 16384, 49152])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'vocab':>7}  {'case':<28}{'slmkit us':>11}{'HF us':>10}{'speed-up':>10}")
    for v in args.vocab:
        logits = torch.randn(v, generator=torch.Generator().manual_seed(0)) * 3
        for name, (t, k, p) in CASES.items():
            params = SamplingParams(temperature=t, top_k=k, top_p=p)
            g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
            ours = per_call_us(lambda: sample_next(logits.clone(), params, None, g1), args.calls)  # noqa: B023
            hf = per_call_us(lambda: hf_pick(logits.clone(), t, k, p, g2), args.calls)  # noqa: B023
            rows.append({"vocab": v, "case": name, "slmkit_us": round(ours, 1), "hf_us": round(hf, 1),
                         "speedup": round(hf / ours, 2)})
            print(f"{v:>7}  {name:<28}{ours:>11.1f}{hf:>10.1f}{hf / ours:>9.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "calls": args.calls, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
