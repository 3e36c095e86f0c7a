"""Batch-1 decode speed: slmkit's KV-cache loop vs `transformers` generate() on the same weights, same run.

Weights are random (speed does not depend on them); shapes are slmkit presets plus SmolLM2-135M's architecture.
Greedy decoding of --new tokens after a 32-token prompt; EOS is disabled so both produce exactly --new tokens.

    python benchmarks/bench_decode.py [--new 128] [--threads 2] [--compile] [--json benchmarks/results/decode.json]
    python benchmarks/bench_decode.py --device cuda        # the same comparison on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkit.infer.decode import compile_step  # noqa: E402
from slmkit.infer.generate import SamplingParams, generate_ids  # noqa: E402
from slmkit.infer.load import load_model
from slmkit.model.folder import build_model, count_parameters, save_model  # noqa: E402
from slmkit.model.llama import decode_layout  # noqa: E402
from slmkit.model.presets import build_config  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=2048)
SHAPES = {"slm-1m": ("slm-1m", 2048, {}), "slm-7m": ("slm-7m", 8192, {}), "slm-30m": ("slm-30m", 16384, {}),
          "smollm2-135m shape": ("slm-125m", 49152, SMOLLM2_135M)}


def sync(model) -> None:
    """On a GPU, wait for queued kernels so the host clock measures the work, not the queueing."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, prompt: list[int], new: int) -> float:
    sync(model)
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, prompt, SamplingParams(max_new_tokens=new, temperature=0), set(), 4096))
    assert n == new
    sync(model)
    return new / (time.perf_counter() - t0)


def time_hf(model, prompt: list[int], new: int) -> float:
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    sync(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert out.shape[1] == len(prompt) + new
    sync(model)
    return new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=128, help="tokens to generate per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="models to time")
    ap.add_argument("--device", default="cpu", help="cpu (the issue's target) or cuda")
    ap.add_argument("--compile", action="store_true",
                    help="also time `slm generate --compile` (decode.compile_step; compile seconds reported)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    rows = {}
    print(f"{'model':<22}{'dtype':>6}{'params':>13}{'slmkit tok/s':>14}{'HF generate':>13}{'speed-up':>10}"
          + (f"{'compiled':>10}{'speed-up':>10}{'compile s':>11}" if args.compile else ""))
    for name in args.shapes:
        preset, vocab, overrides = SHAPES[name]
        torch.manual_seed(0)
        model = build_model(build_config(preset, vocab, overrides))
        prompt = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(1)).tolist()
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            with tempfile.TemporaryDirectory() as d:
                save_model(model, Path(d))
                # As slmkit.load() / `slm generate [--compile]` prepare it (decode_layout keeps bf16 as is).
                ours = decode_layout(load_model(Path(d), dtype=dtype).to(args.device))
                compiled = load_model(Path(d), dtype=dtype).to(args.device) if args.compile else None
                hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval().to(args.device)
            r = {"params": count_parameters(ours)}
            if compiled is not None:
                t0 = time.perf_counter()
                compiled.compiled_step = compile_step(compiled)  # compiles before it returns, as slmkit.load does
                time_ours(compiled, prompt, 2)  # and a first prompt's prefill
                r["compile_s"] = time.perf_counter() - t0
            time_ours(ours, prompt, 8), time_hf(hf, prompt, 8)  # warm-up
            times: dict[str, list[float]] = {"slmkit": [], "hf": [], "compiled": []}
            for _ in range(args.repeats):  # interleaved, so all see the same machine conditions
                times["slmkit"].append(time_ours(ours, prompt, args.new))
                times["hf"].append(time_hf(hf, prompt, args.new))
                if compiled is not None:
                    times["compiled"].append(time_ours(compiled, prompt, args.new))
            r["slmkit_tok_s"], r["hf_tok_s"] = statistics.median(times["slmkit"]), statistics.median(times["hf"])
            r["speedup"] = r["slmkit_tok_s"] / r["hf_tok_s"]
            line = (f"{name:<22}{dtype_name:>6}{r['params']:>13,}{r['slmkit_tok_s']:>14.1f}{r['hf_tok_s']:>13.1f}"
                    f"{r['speedup']:>9.2f}x")
            if compiled is not None:
                r["compiled_tok_s"] = statistics.median(times["compiled"])
                r["compiled_speedup"] = r["compiled_tok_s"] / r["hf_tok_s"]
                line += f"{r['compiled_tok_s']:>10.1f}{r['compiled_speedup']:>9.2f}x{r['compile_s']:>11.1f}"
            rows[f"{name} {dtype_name}"] = r
            print(line, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "threads": args.threads, "new_tokens": args.new, "results": rows}
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
