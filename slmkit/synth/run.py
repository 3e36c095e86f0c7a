"""Verb `synth`: chat training data from a teacher, as a pipeline of stages over one SynthConfig.

    open_outputs   OUT and its sidecars; refuse to overwrite without --overwrite; with --resume, read what is done
    expand_pool    --expand N: N new tasks per seed from the teacher (self-instruct), filtered against the pool
    plan_jobs      every (prompt, strategy, sample) not answered yet, with its seed and the strategy's system prompt
    answer_jobs    the teacher answers; each answer is filtered and appended to OUT (kept) or OUT.rejected.jsonl
    finish         the report: kept / dropped by reason, per strategy, rows/s; OUT.report.json

Files beside OUT (data.jsonl): data.rejected.jsonl (dropped answers with their reason: inspect them, tune the
filters), data.instructions.jsonl (the tasks --expand wrote, one record per seed), data.report.json. Every row is
appended and flushed as soon as it is judged, so a killed run loses at most the requests in flight; `--resume`
skips every (prompt, strategy, sample) already in OUT or in the rejected file, and rebuilds the duplicate index from
the rows kept so far.
"""

from __future__ import annotations

import json
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from slmkit.files import atomic_write_json
from slmkit.synth.filters import Dedup, FilterSettings, check_answer, check_instruction
from slmkit.synth.prompts import Prompt, expansion_examples, expansion_messages, parse_instructions, read_prompts
from slmkit.synth.strategies import DEFAULT_STRATEGIES, GENERIC_SYSTEM, load_strategies, parse_strategies
from slmkit.synth.teachers import Job, open_teacher

MAX_FAILURES = 8  # requests failing in a row before the run stops (the teacher is down, or misconfigured)


@dataclass
class SynthConfig:
    teacher: str
    prompts: list[Path]
    out: Path
    teacher_model: str | None = None
    api_key_env: str | None = None
    column: str | None = None
    strategy_column: str | None = None
    strategies: str = DEFAULT_STRATEGIES
    strategy_file: Path | None = None
    erase_system: str = GENERIC_SYSTEM
    keep_system: bool = False
    expand: int = 0
    samples: int = 1
    limit: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    filters: FilterSettings = field(default_factory=FilterSettings)
    resume: bool = False
    overwrite: bool = False
    concurrency: int = 4
    batch: int = 16
    timeout: float = 120.0
    retries: int = 5
    dtype: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False


@dataclass
class Files:
    rows: Path
    rejected: Path
    instructions: Path
    report: Path

    @classmethod
    def beside(cls, out: Path) -> Files:
        stem = out.with_suffix("")
        return cls(out, Path(f"{stem}.rejected.jsonl"), Path(f"{stem}.instructions.jsonl"), Path(f"{stem}.report.json"))

    def all(self) -> list[Path]:
        return [self.rows, self.rejected, self.instructions, self.report]


@dataclass
class Tally:
    """Counts over the whole output (resumed runs included); `answered`/`errors`/`seconds`: this run's."""

    by_strategy: dict[str, Counter] = field(default_factory=dict)  # strategy -> {"kept": n, reason: n, ...}
    answered: int = 0
    tokens: int = 0  # answer tokens this run (as the teacher counted them)
    errors: int = 0
    seconds: float = 0.0
    expansion: Counter = field(default_factory=Counter)  # "asked" (seeds), "kept" (tasks), reasons

    def count(self, strategy: str, outcome: str) -> None:
        self.by_strategy.setdefault(strategy, Counter())[outcome] += 1

    @property
    def kept(self) -> int:
        return sum(c["kept"] for c in self.by_strategy.values())

    def dropped(self) -> Counter:
        out: Counter = Counter()
        for c in self.by_strategy.values():
            out.update({k: v for k, v in c.items() if k != "kept"})
        return out


# -- output files -----------------------------------------------------------------------------------------------
def open_outputs(cfg: SynthConfig) -> tuple[Files, set[str], Tally, Dedup]:
    """OUT's files, checked; with --resume, the keys already judged, their counts and the kept answers' index."""
    files = Files.beside(Path(cfg.out))
    if files.rows.suffix.lower() != ".jsonl":
        raise SystemExit(f"error: --out {cfg.out}: name it *.jsonl (slm finetune --task sft reads chat rows from "
                         ".jsonl files)")
    sources = {Path(p).resolve() for p in cfg.prompts}
    for f in files.all():
        if f.resolve() in sources:
            raise SystemExit(f"error: --out {cfg.out}: {f} is one of the --prompts files; write elsewhere")
    existing = [f for f in files.all() if f.exists()]
    if existing and cfg.overwrite:
        for f in existing:
            f.unlink()
    elif existing and not cfg.resume:
        raise SystemExit(f"error: {existing[0]} exists; pass --resume to continue that run or --overwrite to start "
                         "again")
    files.rows.parent.mkdir(parents=True, exist_ok=True)
    dedup = Dedup(cfg.filters.near_dup, cfg.filters.near_dup_threshold)
    done, tally = set(), Tally()
    for path, kept in ((files.rows, True), (files.rejected, False)):
        for row in read_rows(path):
            prov = row.get("provenance") or {}
            done.add(prov.get("key"))
            tally.count(prov.get("strategy", "?"), "kept" if kept else row.get("reason", "?"))
            if kept:
                dedup.add(row["messages"][-1]["content"])
    return files, done, tally, dedup


def read_rows(path: Path) -> list[dict]:
    """The complete rows of an append-only JSONL file; a last line cut short by a kill is removed first."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        print(f"note: {path}: removed a last row cut short (the previous run was killed while writing it)",
              file=sys.stderr)
        data = data[:data.rfind(b"\n") + 1]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SystemExit(f"error: {path}:{lineno}: not a row slm synth wrote; fix the line, or start again with "
                             "--overwrite") from None
    return rows


def append(fh, row: dict) -> None:
    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    fh.flush()  # in the OS's hands: a killed process loses nothing written


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- stages -----------------------------------------------------------------------------------------------------
def expand_pool(cfg: SynthConfig, teacher, seeds: list[Prompt], files: Files, tally: Tally) -> list[Prompt]:
    """The seeds plus the tasks the teacher wrote: --expand new ones per seed, kept when they pass the filters and
    are no near-duplicate (ROUGE-L >= 0.7) of the pool. Seeds already expanded (a resumed run) are not asked again."""
    records = read_rows(files.instructions)
    for r in records:
        tally.expansion.update(asked=1, kept=len(r["new"]), **r.get("dropped", {}))
    if not cfg.expand:
        return seeds
    pool = [p.text for p in seeds] + [t for r in records for t in r["new"]]
    index = Dedup("rouge", 0.7)
    for t in pool:
        index.add(t)
    asked = {r["seed"] for r in records}
    rng = random.Random(cfg.seed)
    jobs = [Job(f"expand:{s.id}", expansion_messages(expansion_examples(s, pool, rng), cfg.expand),
                max_new_tokens=48 * cfg.expand + 16, temperature=1.0, top_p=1.0, seed=_seed(cfg, s.id),
                info={"seed": s}) for s in seeds if s.id not in asked]
    with _bar(cfg, len(jobs), "expanding") as bar, open(files.instructions, "a", encoding="utf-8") as fh:
        failures = 0
        for job, ans in teacher.answers(jobs):
            failures = _failed(ans, failures, tally)
            if ans.error:
                continue
            new, dropped = [], Counter()
            for text in parse_instructions(ans.text)[:cfg.expand]:
                reason = check_instruction(text, cfg.filters) or index.check(text)
                if reason:
                    dropped[reason] += 1
                else:
                    index.add(text)
                    new.append(text)
            append(fh, {"seed": job.info["seed"].id, "new": new, "dropped": dict(dropped), "created": now()})
            tally.expansion.update(asked=1, kept=len(new), **dropped)
            pool += new
            bar.update(1)
    return seeds + [Prompt(t, None, "expanded") for t in pool[len(seeds):]]  # the file's tasks, in its order


def plan_jobs(cfg: SynthConfig, pool: list[Prompt], table: dict[str, str], names: list[str],
              done: set[str]) -> list[Job]:
    """One Job per (prompt, strategy, sample) not in DONE. A prompt's own strategy (--strategy-column) wins over
    --strategies."""
    jobs = []
    for p in pool:
        for strategy in [p.strategy] if p.strategy else names:
            if strategy not in table:
                raise SystemExit(f"error: --strategy-column {cfg.strategy_column}: unknown strategy {strategy!r} "
                                 f"(prompt {p.text[:40]!r}); use one of {', '.join(table)} or add it with "
                                 "--strategy-file")
            for k in range(cfg.samples):
                key = f"{p.id}:{strategy}:{k}"
                if key in done:
                    continue
                messages = [{"role": "system", "content": table[strategy]}, {"role": "user", "content": p.text}]
                jobs.append(Job(key, messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p, _seed(cfg, key),
                                {"prompt": p, "strategy": strategy}))
    return jobs


def answer_jobs(cfg: SynthConfig, teacher, jobs: list[Job], table: dict[str, str], files: Files, tally: Tally,
                dedup: Dedup) -> None:
    """Ask the teacher; judge every answer; append it to OUT (kept) or to the rejected file (with its reason)."""
    t0, failures = time.perf_counter(), 0
    with (_bar(cfg, len(jobs), "answering") as bar, open(files.rows, "a", encoding="utf-8") as kept,
          open(files.rejected, "a", encoding="utf-8") as rejected):
        for job, ans in teacher.answers(jobs):
            failures = _failed(ans, failures, tally)
            if ans.error:
                continue
            prompt, strategy = job.info["prompt"], job.info["strategy"]
            if ans.finish_reason == "prompt_too_long":
                reason = "prompt_too_long"
            else:
                reason = check_answer(prompt.text, ans.text, ans.finish_reason, cfg.filters) or dedup.check(ans.text)
            row = _row(cfg, teacher.name, job, ans.text, table[strategy])
            if reason is None:
                dedup.add(ans.text)
                append(kept, row)
            else:
                append(rejected, {"reason": reason, **row})
            tally.count(strategy, reason or "kept")
            tally.answered += 1
            tally.tokens += ans.tokens
            tally.seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(kept=tally.kept, dropped=sum(tally.dropped().values()), refresh=False)


def _row(cfg: SynthConfig, teacher: str, job: Job, answer: str, strategy_prompt: str) -> dict:
    """A chat row `slm finetune --task sft` reads, with the system prompt erased (or kept) and its provenance."""
    prompt = job.info["prompt"]
    system = strategy_prompt if cfg.keep_system else cfg.erase_system
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt.text}, {"role": "assistant", "content": answer}]
    return {"messages": messages,
            "provenance": {"teacher": teacher, "strategy": job.info["strategy"], "temperature": job.temperature,
                           "seed": job.seed, "created": now(), "origin": prompt.origin, "key": job.key}}


def _seed(cfg: SynthConfig, key: str) -> int:
    """A request's seed: --seed and the request's key, so a resumed run asks exactly what the killed one would."""
    return (cfg.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31


def _failed(ans, failures: int, tally: Tally) -> int:
    """Count a failed request; stop the run after MAX_FAILURES in a row. Returns the new run of failures."""
    if not ans.error:
        return 0
    tally.errors += 1
    if failures + 1 >= MAX_FAILURES:
        raise SystemExit(f"error: the teacher failed {MAX_FAILURES} requests in a row, the last: {ans.error}; the "
                         "rows written are kept: fix the teacher, then rerun with --resume")
    return failures + 1


def _bar(cfg: SynthConfig, total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="row", disable=cfg.quiet or not total, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


# -- the verb ---------------------------------------------------------------------------------------------------
def run(cfg: SynthConfig, teacher=None) -> dict:
    """Write synthetic chat rows to cfg.out; returns the report. TEACHER: an object with `name` and `answers(jobs)`
    (default: opened from cfg.teacher)."""
    table = load_strategies(cfg.strategy_file)
    names = parse_strategies(cfg.strategies, table)
    seeds = read_prompts(cfg.prompts, cfg.column, cfg.strategy_column)[:cfg.limit]
    files, done, tally, dedup = open_outputs(cfg)
    own = teacher is None
    if own:
        teacher = open_teacher(cfg.teacher, cfg.teacher_model, cfg.api_key_env, cfg.concurrency, cfg.batch,
                               cfg.dtype, cfg.device, cfg.threads, cfg.timeout, cfg.retries)
    pool: list[Prompt] = seeds
    try:
        pool = expand_pool(cfg, teacher, seeds, files, tally)
        jobs = plan_jobs(cfg, pool, table, names, done)
        answer_jobs(cfg, teacher, jobs, table, files, tally, dedup)
    finally:  # interrupted or failed too: the report says what the files hold
        report = make_report(cfg, teacher.name, seeds, pool, tally)
        atomic_write_json(files.report, report)
        if own:
            teacher.close()
    return report


def make_report(cfg: SynthConfig, teacher: str, seeds: list[Prompt], pool: list[Prompt], tally: Tally) -> dict:
    rate = tally.answered / tally.seconds if tally.seconds else None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                if k not in ("prompts", "out", "filters", "quiet")}
    return {"out": str(cfg.out), "teacher": teacher, "created": now(),
            "prompts": {"seeds": len(seeds), "expanded": len(pool) - len(seeds), "total": len(pool)},
            "kept": tally.kept, "dropped": dict(tally.dropped().most_common()),
            "by_strategy": {s: dict(c) for s, c in sorted(tally.by_strategy.items())},
            "expansion": dict(tally.expansion), "answered_this_run": tally.answered, "errors_this_run": tally.errors,
            "seconds": round(tally.seconds, 2), "rows_per_s": round(rate, 3) if rate else None,
            "tokens_per_s": round(tally.tokens / tally.seconds, 1) if tally.seconds else None,
            "settings": {**settings, "prompts": [str(p) for p in cfg.prompts],
                         "filters": {k: v for k, v in vars(cfg.filters).items() if not k.endswith("_re")}}}
