"""The serve engine on a `transformers` decoder that is not slmkit's Llama: rows batched (serve/hf_batch.py) vs
decoded in turn (the engine's fallback, what every such model got before), same model, same run.

model    a GPT-2-shaped decoder (--layers x --width; default 12 x 768, GPT-2 small's shape, ~124M parameters with a
         50,257 vocabulary), random weights: speed does not depend on them; tokens are greedy and the same both ways.
         --arch lfm2: an LFM2-shaped hybrid instead (short-convolution layers with per-row states, and attention
         layers in LFM2-350M's pattern, 6 of every 16), same sizes
load     N concurrent requests (one thread each), --tokens new tokens each, prompts of ~40 tokens
score    aggregate tokens/s, median of --repeats, for each N in --clients

    python benchmarks/bench_hf_batch.py [--clients 1 4 8 16] [--tokens 64] [--repeats 3] [--dtype fp32|bf16]
        [--arch gpt2|lfm2] [--model DIR]

Writes benchmarks/results/hf_batch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS = ROOT / "benchmarks" / "results" / "hf_batch.json"


LFM2_ATTENTION = {2, 5, 8, 10, 12, 14}  # LFM2-350M's attention layers among its 16; the rest are short convolutions


def make_folder(work: Path, layers: int, width: int, vocab: int, arch: str = "gpt2") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmkit.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    ids = dict(vocab_size=max(vocab, len(tok)), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "lfm2":
        cfg = AutoConfig.for_model("lfm2", num_hidden_layers=layers, hidden_size=width, num_attention_heads=width // 64,
                                   num_key_value_heads=max(1, width // 256), intermediate_size=4 * width,
                                   max_position_embeddings=1024, **ids,
                                   layer_types=["full_attention" if i % 16 in LFM2_ATTENTION else "conv"
                                                for i in range(layers)])
    else:
        cfg = AutoConfig.for_model("gpt2", n_layer=layers, n_embd=width, n_head=width // 64, n_positions=1024, **ids)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work)
    tok.save_pretrained(work)
    return work


def run(lm, batched: bool, clients: int, tokens: int) -> tuple[float, list]:
    from tiny_server import decode_concurrently

    from slmkit.infer.generate import SamplingParams
    from slmkit.serve.batching import Engine

    engine = Engine(lm, max_batch=max(16, clients))
    if not batched:  # the fallback every non-Llama decoder took before hf_batch.py
        engine.hf = engine.kv = None
    engine.start()
    prompts = [lm.encode(f"Request {i}: tell me about the history of the union, as the president told it") for i in
               range(clients)]
    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    try:
        t0 = time.perf_counter()
        got = decode_concurrently(engine, prompts, params)
        dt = time.perf_counter() - t0
    finally:
        engine.stop()
    return sum(len(g) for g in got) / dt, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--model", type=Path, help="a model folder to serve instead (e.g. an imported Gemma 3 270M)")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "lfm2"], help="the random model's architecture")
    args = ap.parse_args()
    from slmkit.hardware import in_fresh_thread
    from slmkit.infer.generate import load

    with tempfile.TemporaryDirectory() as work:
        folder = args.model or make_folder(Path(work), args.layers, args.width, args.vocab, args.arch)
        # loaded in a thread that ends (hardware.in_fresh_thread: as slm serve loads its models)
        lm = in_fresh_thread(lambda: load(folder, dtype=args.dtype))
        rows = []
        for n in args.clients:
            res, same, reference = {}, True, None
            for batched in (False, True):
                run(lm, batched, n, 8)  # warm-up
                runs = [run(lm, batched, n, args.tokens) for _ in range(args.repeats)]
                res["batched" if batched else "in_turn"] = statistics.median(r[0] for r in runs)
                reference = reference or runs[0][1]  # in turn's
                same = same and all(r[1] == reference for r in runs)  # greedy: the same tokens either way
            rows.append({"clients": n, **{k: round(v, 1) for k, v in res.items()},
                         "ratio": round(res["batched"] / res["in_turn"], 2), "same_tokens": same})
            print(rows[-1], flush=True)
    print(f"\n{'clients':>7} {'in turn tok/s':>14} {'batched tok/s':>14} {'ratio':>6} {'same tokens':>12}")
    for r in rows:
        print(f"{r['clients']:>7} {r['in_turn']:>14.1f} {r['batched']:>14.1f} {r['ratio']:>5.2f}x "
              f"{str(r['same_tokens']):>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tag = "_" + args.model.name if args.model else "" if args.arch == "gpt2" else "_" + args.arch
    out = RESULTS.with_name(f"hf_batch{tag}.json")
    out.write_text(json.dumps({"host": platform.processor() or platform.machine(),
                               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
