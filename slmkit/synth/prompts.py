"""Prompts: the seed tasks a teacher answers, read from files, and self-instruct's expansion of them.

    lines.txt     one prompt per line (blank lines skipped)
    rows.jsonl    {"prompt": ...} (or "instruction" [+ "input"], "question", "text"; or "messages": the last user turn)
    rows.csv/tsv  a header row; the prompt column as for JSONL, or the first column

--column names the prompt field, --strategy-column a field holding each prompt's strategy (Orca 2's "cautious
reasoning": the strategy is chosen per task, by whoever wrote the prompt file).

Expansion (Wang et al. 2022, "self-instruct"; Alpaca): for each seed, the teacher is shown a few tasks from the pool
(the seed and two others) and asked for N new ones, one per line; the new ones join the pool only when they pass
filters.check_instruction and are not near-duplicates (ROUGE-L >= 0.7) of any task already in it.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_FIELDS = ("prompt", "instruction", "question", "text")


@dataclass(frozen=True)
class Prompt:
    text: str
    strategy: str | None = None  # from --strategy-column; None: --strategies
    origin: str = "seed"  # "seed" (from --prompts) or "expanded" (written by the teacher)

    @property
    def id(self) -> str:
        """A stable id from the text: the resume key of every answer to it."""
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:12]


def read_prompts(paths: list[Path], column: str | None = None, strategy_column: str | None = None) -> list[Prompt]:
    """Every prompt in PATHS, in order, exact repeats dropped. A file that yields none, or a row without the prompt
    field, is one line naming the file (and line) and what to do."""
    out: dict[str, Prompt] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise SystemExit(f"error: --prompts {path}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _jsonl_prompts(path, column, strategy_column)
        elif suffix in (".csv", ".tsv"):
            rows = _csv_prompts(path, column, strategy_column, "\t" if suffix == ".tsv" else ",")
        else:
            if column or strategy_column:
                raise SystemExit(f"error: --prompts {path}: a text file has no columns; drop --column/"
                                 "--strategy-column or give a .jsonl/.csv file")
            rows = [Prompt(line.strip()) for line in _text_lines(path) if line.strip()]
        if not rows:
            raise SystemExit(f"error: --prompts {path}: no prompts in it")
        for p in rows:
            out.setdefault(p.text, p)
    return list(out.values())


def _text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --prompts {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _prompt_of(row: dict, column: str | None) -> str | None:
    """The prompt text of one JSONL/CSV row, or None when it has none."""
    if column:
        value = row.get(column)
    elif isinstance(row.get("messages"), list):
        users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    else:
        value = next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str) and row[k].strip()), None)
        if value is not None and "instruction" in row and isinstance(row.get("input"), str) and row["input"].strip():
            value = f"{value}\n\n{row['input']}"  # Alpaca's rows: the instruction, then its input
    return value.strip() if isinstance(value, str) and value.strip() else None


def _jsonl_prompts(path: Path, column: str | None, strategy_column: str | None) -> list[Prompt]:
    from slmkit.data.corpus import iter_jsonl

    rows = []
    for lineno, row in iter_jsonl(path):
        text = _prompt_of(row, column) if isinstance(row, dict) else None
        if text is None:
            field = repr(column) if column else "prompt field (" + ", ".join(PROMPT_FIELDS) + ", or messages)"
            raise SystemExit(f"error: {path}:{lineno}: no {field} with text; name the field with --column")
        rows.append(Prompt(text, _strategy_of(row, strategy_column, f"{path}:{lineno}")))
    return rows


def _csv_prompts(path: Path, column: str | None, strategy_column: str | None, delimiter: str) -> list[Prompt]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        names = reader.fieldnames or []
        col = column or next((k for k in PROMPT_FIELDS if k in names), names[0] if names else None)
        for want, flag in ((col, "--column"), (strategy_column, "--strategy-column")):
            if want is not None and want not in names:
                raise SystemExit(f"error: {path}: no column {want!r} (columns: {', '.join(names)}); check {flag}")
        rows = []
        for lineno, row in enumerate(reader, 2):
            text = (row.get(col) or "").strip()
            if text:
                rows.append(Prompt(text, _strategy_of(row, strategy_column, f"{path}:{lineno}")))
    return rows


def _strategy_of(row: dict, strategy_column: str | None, where: str) -> str | None:
    if not strategy_column:
        return None
    value = row.get(strategy_column)
    if value is not None and not isinstance(value, str):
        raise SystemExit(f"error: {where}: {strategy_column!r} must be a strategy name (a string)")
    return value.strip() or None if value else None


# -- self-instruct ---------------------------------------------------------------------------------------------------
def expansion_messages(examples: list[str], n: int) -> list[dict]:
    """The chat that asks a teacher for N new tasks like EXAMPLES."""
    listing = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
    return [{"role": "system", "content": "You write new tasks for an AI assistant to do."},
            {"role": "user", "content": f"Here are some tasks:\n{listing}\n\nWrite {n} new tasks, each different from "
                                        f"these and from each other. Write one task per line, numbered 1 to {n}, "
                                        "and nothing else."}]


def expansion_examples(seed: Prompt, pool: list[str], rng: random.Random, k: int = 3) -> list[str]:
    """The seed and K-1 other tasks of the pool, shuffled: what the teacher imitates."""
    others = [t for t in pool if t != seed.text]
    picked = [seed.text] + rng.sample(others, min(k - 1, len(others)))
    rng.shuffle(picked)
    return picked


_PREAMBLE = re.compile(r"^(?:here (?:are|is)|here's|sure|okay|certainly)\b", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:(?:task|instruction)\s*)?(?:\d+\s*[.):\-]|[-*\u2022])\s*", re.IGNORECASE)


def parse_instructions(text: str) -> list[str]:
    """A teacher's list of new tasks -> the tasks: numbering, bullets and quotes stripped; preambles ("Here are
    three new tasks", "Sure!") and empty lines dropped."""
    out = []
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"').strip()
        if line and not line.endswith(":") and not _PREAMBLE.match(line):
            out.append(line)
    return out
