"""`slm synth`'s flags and its entry point: every option of SynthConfig, then the report as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from slmkit.options import check_numbers
from slmkit.synth.filters import FilterSettings
from slmkit.synth.strategies import DEFAULT_STRATEGIES, GENERIC_SYSTEM, STRATEGIES


def main(teacher: str, prompts: list[Path], out: Path, as_json: bool = False, **options) -> dict:
    """Chat training data from a teacher (Orca-2 style): the teacher answers every prompt under named strategies
    (system prompts such as step-by-step), the rows keep a generic system prompt (prompt erasure), answers are
    filtered and deduplicated, and the JSONL that comes out is what `slm finetune --task sft` reads.

    TEACHER is a model folder (batched on this machine), a .gguf file (llama.cpp) or an OpenAI-compatible URL
    (http://host:8000/v1 with --teacher-model NAME, the key in the variable --api-key-env names). Returns the report
    (also written to OUT's .report.json)."""
    from slmkit.synth.run import SynthConfig, run

    check_numbers(options, positive={"samples": "answers per prompt and strategy",
                                     "limit": "seed prompts used", "max_new_tokens": "the answer's token budget",
                                     "concurrency": "requests in flight", "batch": "rows per forward pass",
                                     "timeout": "seconds per request", "retries": "tries per request",
                                     "max_words": "words an answer may have"},
                  non_negative=("expand", "min_words", "temperature", "seed"))
    if options.get("top_p") is not None and not 0 < options["top_p"] <= 1:
        raise SystemExit(f"error: --top-p {options['top_p']} must be in (0, 1]")
    refuse_unused(str(teacher), options)
    filters = FilterSettings(**{f.name: options.pop(f.name) for f in fields(FilterSettings)
                                if options.get(f.name) is not None})
    options = {k: v for k, v in options.items() if v is not None}
    report = run(SynthConfig(teacher=str(teacher), prompts=list(prompts), out=Path(out), filters=filters, **options))
    print(json.dumps(report, indent=2) if as_json else summary(report))
    return report


# The flags only one kind of teacher reads: given for another, each is refused in one line rather than dropped.
_URL = {k: "it is for a URL teacher (an OpenAI-compatible API)"
        for k in ("teacher_model", "api_key_env", "concurrency", "timeout", "retries")}
_FOLDER = {k: "it is for a model folder teacher (decoded here with PyTorch)" for k in ("batch", "dtype", "device")}
NOT_FOR_TEACHER = {"a URL teacher": {**_FOLDER, "threads": "the server decodes with its own threads"},
                   "a .gguf teacher": {**_URL, **_FOLDER}, "a model folder teacher": _URL}


def refuse_unused(teacher: str, options: dict) -> None:
    """One line for a flag that TEACHER's kind, or another flag, leaves unread (OPTIONS: None = not given)."""
    from slmkit.compose.remote import is_url
    from slmkit.options import refuse_unused as refuse

    kind = "a URL teacher" if is_url(teacher) else "a .gguf teacher" if teacher.lower().endswith(".gguf") else \
        "a model folder teacher"
    refuse(kind, options, NOT_FOR_TEACHER[kind])
    if options.get("keep_system"):
        refuse("--keep-system", options, {"erase_system": "the rows keep the strategy's system prompt; drop one"})
    if options.get("near_dup") == "off":
        refuse("--near-dup off", options, {"near_dup_threshold": "nothing is compared; drop one"})


def summary(report: dict) -> str:
    """The report as a few lines: kept, dropped by reason, per strategy, speed."""
    dropped = sum(report["dropped"].values())
    lines = [f"{report['out']}: {report['kept']} rows kept, {dropped} dropped "
             f"(teacher {report['teacher']}; {report['prompts']['total']} prompts, "
             f"{report['prompts']['expanded']} written by the teacher)"]
    lines += [f"  dropped {reason:<16} {n}" for reason, n in report["dropped"].items()]
    for name, c in report["by_strategy"].items():
        lines.append(f"  strategy {name:<20} kept {c.get('kept', 0)} of {sum(c.values())}")
    if report["rows_per_s"]:
        lines.append(f"  this run: {report['answered_this_run']} answers in {report['seconds']:.1f} s "
                     f"({report['rows_per_s']:.2f} rows/s, {report['tokens_per_s']:.0f} answer tokens/s)")
    if report["errors_this_run"]:
        lines.append(f"  {report['errors_this_run']} requests failed: rerun with --resume to ask again")
    return "\n".join(lines)


def add_args(p) -> None:
    p.add_argument("--teacher", required=True, help="a model folder, a .gguf file, or an OpenAI-compatible API base "
                   "URL (http://host:8000/v1)")
    p.add_argument("--prompts", nargs="+", type=Path, required=True, help="seed prompts: .txt (one per line), .jsonl "
                   "(prompt / instruction [+ input] / question / text / messages) or .csv/.tsv")
    p.add_argument("--out", type=Path, required=True, help="the chat JSONL to write (sidecars beside it: "
                   ".rejected.jsonl, .instructions.jsonl, .report.json)")
    g = p.add_argument_group("a URL teacher")
    g.add_argument("--teacher-model", help="the model name to ask for (default: the first the server lists)")
    g.add_argument("--api-key-env", metavar="VAR", help="the environment variable holding the API key (never the "
                   "key itself: a flag's value shows in ps and shell history)")
    g.add_argument("--concurrency", type=int, help="requests in flight (default: 4)")
    g.add_argument("--timeout", type=float, help="seconds per request before it is retried (default: 120)")
    g.add_argument("--retries", type=int, help="tries per request on 429/5xx/timeouts, with backoff (default: 5)")
    g = p.add_argument_group("prompts and strategies")
    g.add_argument("--column", help="the prompt field of JSONL/CSV rows (default: prompt, instruction, question, "
                   "text, or a row's last user message)")
    g.add_argument("--strategy-column", help="a field naming each prompt's strategy (cautious reasoning: one "
                   "strategy per task); prompts without one use --strategies")
    g.add_argument("--strategies", help=f"comma-separated strategies every prompt is answered under, of "
                   f"{', '.join(STRATEGIES)} (default: {DEFAULT_STRATEGIES})")
    g.add_argument("--strategy-file", type=Path, help="a JSON object name -> system prompt adding strategies")
    g.add_argument("--erase-system", help=f"the system prompt the saved rows carry instead of the strategy's "
                   f"(default: {GENERIC_SYSTEM!r}; '' for none)")
    g.add_argument("--keep-system", action="store_true", default=None, help="no prompt erasure: rows carry the "
                   "strategy's system prompt")
    g.add_argument("--expand", type=int, help="self-instruct: ask the teacher for N new tasks per seed, kept when not "
                   "near-duplicates of the pool (ROUGE-L < 0.7)")
    g.add_argument("--samples", type=int, help="answers per prompt and strategy, each with its own seed (default: 1)")
    g.add_argument("--limit", type=int, help="use the first N seed prompts only")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, help="tokens per answer (default: 256)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default: 0.7; expansion samples at 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (default: 0.95)")
    g.add_argument("--seed", type=int, help="each request's seed derives from it and the request (default: 0)")
    g = p.add_argument_group("filters (every drop is counted by reason in the report)")
    g.add_argument("--min-words", type=int, help="shorter answers are dropped (default: 3)")
    g.add_argument("--max-words", type=int, help="longer answers are dropped (default: 800)")
    g.add_argument("--blacklist", action="append", metavar="REGEX", help="drop answers (and new tasks) matching "
                   "it, case-insensitively; repeatable")
    g.add_argument("--keep-refusals", action="store_true", default=None, help="keep answers that refuse "
                   "(\"I'm sorry, I can't ...\")")
    g.add_argument("--keep-truncated", action="store_true", default=None, help="keep answers cut by "
                   "--max-new-tokens")
    g.add_argument("--near-dup", choices=("minhash", "rouge", "off"), help="near-duplicate answers: MinHash over "
                   "word 3-grams (scales), ROUGE-L against every kept answer (quadratic), or off (default: minhash)")
    g.add_argument("--near-dup-threshold", type=float, help="similarity at which an answer is a near-duplicate "
                   "(default: 0.8 Jaccard for minhash, 0.7 ROUGE-L for rouge)")
    g = p.add_argument_group("the run")
    g.add_argument("--resume", action="store_true", default=None, help="continue OUT: skip every (prompt, strategy, "
                   "sample) already written or dropped")
    g.add_argument("--overwrite", action="store_true", default=None, help="delete OUT and its sidecars first")
    g.add_argument("--batch", type=int, help="a model folder teacher: rows decoded together (default: 16)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), help="a model folder teacher's weights (default: fp32)")
    g.add_argument("--device", help="a model folder teacher's device: cpu, cuda, auto (default: auto, a GPU when "
                   "there is one)")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    g.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")
