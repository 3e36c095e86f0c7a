"""Prompts in, reasons out: the pure parts of `slm synth` (reading prompts, parsing new tasks, the filters)."""

from __future__ import annotations

import json

import pytest

from slmkit.synth.filters import Dedup, FilterSettings, check_answer, check_instruction
from slmkit.synth.prompts import Prompt, parse_instructions, read_prompts
from slmkit.synth.strategies import STRATEGIES, load_strategies, parse_strategies


def test_prompts_from_text_jsonl_and_csv(tmp_path):
    (tmp_path / "a.txt").write_text("What is rain?\n\n  Why is grass green?  \nWhat is rain?\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Sum the numbers.", "input": "2, 3", "kind": "direct"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Name a colour."}]},
        {"question": "Is ice water?"}]) + "\n")
    (tmp_path / "c.csv").write_text("id,task,how\n1,Explain tides.,step-by-step\n2,List two metals.,\n")
    got = read_prompts([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [p.text for p in got] == ["What is rain?", "Why is grass green?", "Sum the numbers.\n\n2, 3",
                                     "Name a colour.", "Is ice water?"]  # repeats dropped, Alpaca input appended
    rows = read_prompts([tmp_path / "c.csv"], column="task", strategy_column="how")
    assert [(p.text, p.strategy) for p in rows] == [("Explain tides.", "step-by-step"), ("List two metals.", None)]
    assert read_prompts([tmp_path / "b.jsonl"], strategy_column="kind")[0].strategy == "direct"
    assert Prompt("x").id == Prompt("x", "direct").id != Prompt("y").id  # the id is the text's


def test_bad_prompt_files_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: no prompt field .*--column"):
        read_prompts([tmp_path / "bad.jsonl"])
    (tmp_path / "c.csv").write_text("a,b\nx,y\n")
    with pytest.raises(SystemExit, match=r"no column 'task' \(columns: a, b\); check --column"):
        read_prompts([tmp_path / "c.csv"], column="task")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="no prompts in it"):
        read_prompts([tmp_path / "empty.txt"])
    with pytest.raises(SystemExit, match="no such file"):
        read_prompts([tmp_path / "missing.txt"])


def test_strategies_named_and_from_a_file(tmp_path):
    table = load_strategies()
    assert {"direct", "step-by-step", "explain-then-answer"} <= set(table) and table == STRATEGIES
    assert parse_strategies("step-by-step, direct,direct", table) == ["step-by-step", "direct"]
    with pytest.raises(SystemExit, match="unknown strategy 'socratic'"):
        parse_strategies("socratic", table)
    f = tmp_path / "s.json"
    f.write_text('{"socratic": "Ask yourself questions first."}')
    assert parse_strategies("socratic", load_strategies(f)) == ["socratic"]
    f.write_text('["not", "an object"]')
    with pytest.raises(SystemExit, match="--strategy-file"):
        load_strategies(f)


def test_parse_instructions_strips_numbering_and_preambles():
    text = ('Here are three new tasks:\n1. Write a poem about rain.\n2) "Explain gravity to a child."\n'
            '- Sort a list.\n\n')
    assert parse_instructions(text) == ["Write a poem about rain.", "Explain gravity to a child.", "Sort a list."]


@pytest.mark.parametrize("answer, finish, reason", [
    ("   ", "stop", "empty"),
    ("caf\ufffd is open all day", "stop", "invalid_text"),
    ("a bell \x07 rings three times", "stop", "invalid_text"),
    ("The answer is four and", "length", "truncated"),
    ("Four.", "stop", "too_short"),
    ("word " * 900, "stop", "too_long"),
    ("the cat sat on the mat " * 12, "stop", "repetition"),
    ("I'm sorry, but I can't help with that request.", "stop", "refusal"),
    ("As an AI language model I have no opinions on rivers.", "stop", "refusal"),
    ("Please visit example.com for the full answer today.", "stop", "blacklist"),
    ("Explain why the sky is blue on clear days", "stop", "echo"),
    ("Why, the sky is blue on clear days.", "stop", "echo"),
    ("The sky is blue on clear days because of air.", "stop", None),  # restates it, then answers
    ("Sunlight scatters off air molecules; blue light scatters most.", "stop", None),
])
def test_each_reason(answer, finish, reason):
    s = FilterSettings(blacklist=[r"example\.com"])
    assert check_answer("Explain why the sky is blue on clear days", answer, finish, s) == reason


def test_keep_flags_and_bad_settings():
    s = FilterSettings(keep_truncated=True, keep_refusals=True)
    assert check_answer("q?", "I'm sorry, I cannot help with that one.", "length", s) is None
    with pytest.raises(SystemExit, match="--blacklist"):
        FilterSettings(blacklist=["(unclosed"])
    with pytest.raises(SystemExit, match="--near-dup-threshold"):
        FilterSettings(near_dup_threshold=1.5)


def test_instruction_checks():
    s = FilterSettings()
    assert check_instruction("Draw a picture of a cat sitting down.", s) == "unsuitable"
    assert check_instruction("Hi there", s) == "too_short"
    assert check_instruction("...and then what happened next?", s) == "invalid_text"
    assert check_instruction("Explain how tides work in simple words.", s) is None


@pytest.mark.parametrize("method", ["minhash", "rouge"])
def test_dedup_exact_and_near(method):
    d = Dedup(method, 0.8 if method == "minhash" else 0.7)
    base = "Rivers carry water from mountains to the sea, cutting valleys and carrying sand along the way."
    d.add(base)
    assert d.check("  rivers CARRY water from mountains to the sea, cutting valleys and carrying sand along the way.") \
        == "duplicate"  # case and spacing aside
    near = base.replace("the way.", "the way down.")
    assert d.check(near) == "near_duplicate"
    assert d.check("Volcanoes form where magma rises through cracks in the crust of the earth.") is None
