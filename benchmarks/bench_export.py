"""Edge export: size and held-out perplexity per quant type, and decode tokens/s of our GGUF in llama.cpp vs our
torch decode loop vs `transformers` generate(), same run, on a model trained by slmkit.

    slm train --data train.txt --preset slm-15m --time 120s --out /tmp/edge15m
    python benchmarks/bench_export.py /tmp/edge15m --data held_out.txt [--threads 2]

Perplexity: non-overlapping windows of the model's context over the first --ppl-tokens tokens of --data (the same
token ids for every format: llama.cpp's tokenization is checked identical at export). Goals (issue 5): int8 <= 30%
of the f32 size with <= 1% perplexity rise, 4-bit <= 18% with <= 5%.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkit.edge.export import main as export  # noqa: E402
from slmkit.edge.export_gguf import open_llama_cpp  # noqa: E402
from slmkit.edge.quantize import main as quantize  # noqa: E402
from slmkit.infer.generate import SamplingParams, generate_ids  # noqa: E402
from slmkit.infer.load import load_model, read_config
from slmkit.model.folder import logits_of  # noqa: E402
from slmkit.model.tokenizer import load_tokenizer  # noqa: E402


def ppl_torch(model, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[s:s + window + 1]])
            if chunk.shape[1] < 2:
                break
            lg = logits_of(model, chunk[:, :-1])[0].double()
            nll += torch.nn.functional.cross_entropy(lg, chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def ppl_llama_cpp(path: Path, ids: list[int], window: int, threads: int) -> float:
    llm = open_llama_cpp(path, window, threads)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window + 1]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk[:-1])
        lg = torch.from_numpy(np.array(llm.scores[:len(chunk) - 1])).double()
        nll += torch.nn.functional.cross_entropy(lg, torch.tensor(chunk[1:]), reduction="sum").item()
        n += len(chunk) - 1
    return math.exp(nll / n)


def decode_llama_cpp(path: Path, prompt: list[int], new: int, threads: int) -> float:
    llm = open_llama_cpp(path, len(prompt) + new + 1, threads)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    for _ in range(new):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new / (time.perf_counter() - t0)


def decode_ours(model, prompt: list[int], new: int) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, prompt, SamplingParams(max_new_tokens=new, temperature=0), set(), 4096))
    return n / (time.perf_counter() - t0)


def decode_hf(model, prompt: list[int], new: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="a model folder trained by slmkit")
    ap.add_argument("--data", type=Path, required=True, help="held-out text for perplexity")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--new", type=int, default=128, help="tokens to decode per speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/export.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = read_config(args.model_dir)
    window = cfg["max_position_embeddings"]
    tok = load_tokenizer(args.model_dir)
    ids = tok(args.data.read_text(encoding="utf-8")[:400_000])["input_ids"][:args.ppl_tokens + 1]
    model = load_model(args.model_dir)
    f32_bytes = (args.model_dir / "model.safetensors").stat().st_size
    rows = {"torch fp32 (safetensors)": {"bytes": f32_bytes, "perplexity": ppl_torch(model, ids, window)}}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        q = quantize(args.model_dir, d / "int8")
        rows["torch int8 (slm quantize)"] = {"bytes": (q / "model.safetensors").stat().st_size,
                                             "perplexity": ppl_torch(load_model(q), ids, window)}
        ggufs = {}
        for quant in ("f32", "f16", "q8_0", "q4_0"):
            path = d / f"model-{quant}.gguf"
            export(args.model_dir, path, format="gguf", quant=quant, verify=False)
            ggufs[quant] = path
            rows[f"gguf {quant} (llama.cpp)"] = {"bytes": path.stat().st_size,
                                                 "perplexity": ppl_llama_cpp(path, ids, window, args.threads)}
        base = rows["torch fp32 (safetensors)"]
        print(f"{'format':<28}{'MB':>8}{'% of f32':>10}{'perplexity':>12}{'rise':>9}")
        for name, r in rows.items():
            r["size_vs_f32"] = r["bytes"] / base["bytes"]
            r["ppl_rise"] = r["perplexity"] / base["perplexity"] - 1
            print(f"{name:<28}{r['bytes'] / 1e6:>8.2f}{100 * r['size_vs_f32']:>9.1f}%{r['perplexity']:>12.3f}"
                  f"{100 * r['ppl_rise']:>8.2f}%")
        prompt = ids[:32]
        hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True).eval()
        int8 = load_model(q)
        runners = {"slmkit torch fp32": lambda: decode_ours(model, prompt, args.new),
                   "slmkit torch int8": lambda: decode_ours(int8, prompt, args.new),
                   "transformers generate() fp32": lambda: decode_hf(hf, prompt, args.new),
                   **{f"llama.cpp gguf {k}": (lambda p=p: decode_llama_cpp(p, prompt, args.new, args.threads))
                      for k, p in ggufs.items()}}
        speeds: dict[str, list[float]] = {k: [] for k in runners}
        for fn in runners.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved, so every runtime sees the same machine conditions
            for k, fn in runners.items():
                speeds[k].append(fn())
    decode = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"\n{'decode (batch 1, greedy)':<32}{'tok/s':>8}")
    for k, v in decode.items():
        print(f"{k:<32}{v:>8.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model_dir), "params_config": cfg.get("hidden_size"),
                                     "threads": args.threads, "ppl_tokens": len(ids) - 1, "window": window,
                                     "new_tokens": args.new, "formats": rows, "decode_tok_s": decode}, indent=2))


if __name__ == "__main__":
    main()
