"""Strategies: the system prompts a teacher answers under (Orca 2's "explanation tuning"), as plain data.

The teacher sees the strategy's system prompt; the saved row carries a generic one instead ("prompt erasure", on by
default), so a student fine-tuned on the rows has to learn when to reason step by step from the task itself, not
from an instruction it will never be given in use. The strategy stays in each row's provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

# name -> system prompt. Written for small instruction-tuned teachers: short, concrete, one behaviour each.
STRATEGIES: dict[str, str] = {
    "direct": "You are a helpful assistant. Answer directly and briefly, without explaining your reasoning.",
    "step-by-step": ("You are a helpful assistant. Work through the task step by step: number the steps, say what "
                     "each one does and why, then give the final answer on its own line."),
    "explain-then-answer": ("You are a helpful assistant. First explain, in a few sentences, the ideas the task "
                            "depends on; then give the answer."),
    "recall-then-answer": ("You are a helpful assistant. First recall the facts you know that bear on the task, "
                           "then use them to write the answer."),
}
DEFAULT_STRATEGIES = "step-by-step"
GENERIC_SYSTEM = "You are a helpful assistant."  # what rows carry after prompt erasure (--erase-system)


def load_strategies(strategy_file: Path | None = None) -> dict[str, str]:
    """The built-in strategies, plus (or overridden by) those in STRATEGY_FILE: a JSON object name -> prompt."""
    table = dict(STRATEGIES)
    if strategy_file is None:
        return table
    try:
        extra = json.loads(Path(strategy_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: --strategy-file {strategy_file}: cannot read it as JSON ({e}); write an object "
                         'such as {"socratic": "Ask yourself questions, then answer."}') from None
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in extra.items()):
        raise SystemExit(f"error: --strategy-file {strategy_file}: must be a JSON object of name -> system prompt "
                         "(non-empty strings)")
    return {**table, **extra}


def parse_strategies(text: str, table: dict[str, str]) -> list[str]:
    """'step-by-step,direct' -> ['step-by-step', 'direct'], each a name in TABLE (one line naming the unknown)."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if not names:
        raise SystemExit("error: --strategies is empty; name one or more of " + ", ".join(table))
    for name in names:
        if name not in table:
            raise SystemExit(f"error: --strategies: unknown strategy {name!r}; use one of {', '.join(table)} "
                             "(or add it with --strategy-file)")
    return list(dict.fromkeys(names))  # keep order, drop repeats
