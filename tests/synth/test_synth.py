"""The `slm synth` pipeline over a scripted teacher: strategies, prompt erasure, expansion, the report, resume."""

from __future__ import annotations

import json

import pytest

from slmkit.synth.filters import FilterSettings
from slmkit.synth.run import SynthConfig, run
from slmkit.synth.strategies import GENERIC_SYSTEM, STRATEGIES
from slmkit.synth.teachers import Answer

PROMPTS = ["What makes rain fall?", "Why do leaves change colour?", "How do bees make honey?", "What is a prime?"]


class Scripted:
    """A teacher whose answer is a function of the job; STOP_AFTER answers, then KeyboardInterrupt (a kill)."""

    name = "scripted"

    def __init__(self, answer=None, stop_after: int | None = None):
        self.answer = answer or (lambda job: Answer(
            f"Under {job.info['strategy']}: an answer to {job.messages[-1]['content']} with several words "
            f"(seed {job.seed}).", "stop", 9))
        self.stop_after, self.asked = stop_after, []

    def answers(self, jobs):
        for job in jobs:
            if self.stop_after is not None and len(self.asked) >= self.stop_after:
                raise KeyboardInterrupt
            self.asked.append(job)
            yield job, self.answer(job)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def config(tmp_path, **kw) -> SynthConfig:
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return SynthConfig(teacher="scripted", prompts=[tmp_path / "p.txt"], out=tmp_path / "data.jsonl", quiet=True, **kw)


def test_every_prompt_under_every_strategy_with_the_system_prompt_erased(tmp_path):
    teacher = Scripted()
    report = run(config(tmp_path, strategies="step-by-step,direct"), teacher)
    got = rows(tmp_path / "data.jsonl")
    assert len(got) == report["kept"] == 8
    # the teacher saw the strategy's system prompt; the rows carry the generic one, the strategy in provenance
    assert {j.messages[0]["content"] for j in teacher.asked} == {STRATEGIES["step-by-step"], STRATEGIES["direct"]}
    for r in got:
        system, user, assistant = r["messages"]
        assert system == {"role": "system", "content": GENERIC_SYSTEM}
        assert assistant["content"].startswith(f"Under {r['provenance']['strategy']}") and user["content"] in PROMPTS
        assert set(r["provenance"]) >= {"teacher", "strategy", "temperature", "seed", "created"}
    assert report["by_strategy"] == {"direct": {"kept": 4}, "step-by-step": {"kept": 4}}
    assert json.loads((tmp_path / "data.report.json").read_text())["kept"] == 8


def test_keep_system_and_a_custom_erasure(tmp_path):
    run(config(tmp_path, strategies="explain-then-answer", keep_system=True), Scripted())
    assert {r["messages"][0]["content"] for r in rows(tmp_path / "data.jsonl")} == {STRATEGIES["explain-then-answer"]}
    run(config(tmp_path, erase_system="", overwrite=True), Scripted())
    assert all(r["messages"][0]["role"] == "user" for r in rows(tmp_path / "data.jsonl"))  # '' = no system turn


def test_a_strategy_per_prompt_from_a_column(tmp_path):
    (tmp_path / "p.csv").write_text("task,how\nAdd 2 and 3.,direct\nWhy is the sea salty?,step-by-step\n"
                                    "Name a bird.,\n")
    teacher = Scripted()
    run(SynthConfig("scripted", [tmp_path / "p.csv"], tmp_path / "d.jsonl", strategy_column="how",
                    strategies="explain-then-answer", quiet=True), teacher)
    assert [(j.messages[1]["content"], j.info["strategy"]) for j in teacher.asked] == [
        ("Add 2 and 3.", "direct"), ("Why is the sea salty?", "step-by-step"), ("Name a bird.", "explain-then-answer")]
    (tmp_path / "p.csv").write_text("task,how\nAdd 2 and 3.,socratic\n")
    with pytest.raises(SystemExit, match="unknown strategy 'socratic'"):
        run(SynthConfig("scripted", [tmp_path / "p.csv"], tmp_path / "e.jsonl", strategy_column="how", quiet=True),
            Scripted())


def test_drops_are_counted_by_reason_and_kept_aside(tmp_path):
    answers = {0: "I'm sorry, but I cannot help with that request.", 1: "Short.",
               2: "Bees collect nectar and dry it in the hive until it thickens.",
               3: "Bees collect nectar and dry it in the hive until it thickens."}
    report = run(config(tmp_path, strategies="direct"),
                 Scripted(lambda job: Answer(answers[PROMPTS.index(job.messages[1]["content"])], "stop")))
    assert report["kept"] == 1 and report["dropped"] == {"refusal": 1, "too_short": 1, "duplicate": 1}
    rejected = rows(tmp_path / "data.rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == ["duplicate", "refusal", "too_short"]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rejected)  # the answer, to inspect


def test_nothing_overwritten_without_overwrite_and_never_a_prompt_file(tmp_path):
    cfg = config(tmp_path)
    run(cfg, Scripted())
    before = (tmp_path / "data.jsonl").read_text()
    with pytest.raises(SystemExit, match="exists; pass --resume .* or --overwrite"):
        run(cfg, Scripted())
    assert (tmp_path / "data.jsonl").read_text() == before
    (tmp_path / "seeds.jsonl").write_text('{"prompt": "Hello there?"}\n')
    with pytest.raises(SystemExit, match="is one of the --prompts files"):
        run(SynthConfig("scripted", [tmp_path / "seeds.jsonl"], tmp_path / "seeds.jsonl", overwrite=True), Scripted())
    assert (tmp_path / "seeds.jsonl").read_text() == '{"prompt": "Hello there?"}\n'
    with pytest.raises(SystemExit, match=r"name it \*\.jsonl"):
        run(SynthConfig("scripted", [tmp_path / "p.txt"], tmp_path / "out.txt"), Scripted())


def test_resume_after_an_interruption_loses_nothing_and_repeats_nothing(tmp_path):
    # 16 jobs; samples differ by their seed only, so near-duplicate detection is off here
    cfg = config(tmp_path, strategies="step-by-step,direct", samples=2, filters=FilterSettings(near_dup="off"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, Scripted(stop_after=5))
    assert len(rows(tmp_path / "data.jsonl")) == 5
    with open(tmp_path / "data.jsonl", "a") as fh:  # a kill in the middle of writing a row
        fh.write('{"messages": [{"role": "user", "con')
    cfg.resume = True
    second = Scripted()
    report = run(cfg, second)
    got = rows(tmp_path / "data.jsonl")
    keys = [r["provenance"]["key"] for r in got]
    assert len(second.asked) == 11 and len(got) == 16 == len(set(keys)) == report["kept"]
    assert {r["provenance"]["seed"] for r in got} == {j.seed for j in second.asked} | {
        r["provenance"]["seed"] for r in got[:5]}  # seeds derive from the key: the same on resume
    assert report["answered_this_run"] == 11


def test_expansion_adds_new_tasks_and_drops_near_duplicates(tmp_path):
    def teacher_answer(job):
        if job.key.startswith("expand:"):
            return Answer("Sure! Here are new tasks:\n1. Explain how a rainbow forms after a storm.\n2. What makes "
                          "rain fall?\n3. Draw a map of your town.\n4. Describe how glaciers move slowly.", "stop")
        return Answer(f"A careful answer about {job.messages[1]['content']} in a few words.", "stop")

    teacher = Scripted(teacher_answer)
    report = run(config(tmp_path, strategies="direct", expand=3), teacher)
    # every seed gets the same list; the first 3 tasks count: a new one, a seed, one a text model cannot do
    assert report["prompts"] == {"seeds": 4, "expanded": 1, "total": 5}
    exp = report["expansion"]
    assert exp["asked"] == 4 and exp["kept"] == 1 and exp["unsuitable"] == 4  # "Draw a map of your town."
    assert exp["duplicate"] == 1 + 3 * 2  # the seed each time, and the rainbow after the first seed
    origins = [r["provenance"]["origin"] for r in rows(tmp_path / "data.jsonl")]
    assert origins.count("expanded") == 1 and origins.count("seed") == 4
    # resumed: the expansion is read back, not asked again
    teacher2 = Scripted(teacher_answer)
    run(config(tmp_path, strategies="direct", expand=3, resume=True), teacher2)
    assert teacher2.asked == []


def test_a_failing_teacher_stops_the_run_and_keeps_the_rows(tmp_path):
    calls = {"n": 0}

    def flaky(job):
        calls["n"] += 1
        return Answer("A fine answer with enough words in it.", "stop") if calls["n"] <= 2 else \
            Answer("", error="http://x/v1/chat/completions answered 503")

    (tmp_path / "p.txt").write_text("\n".join(f"Question number {i}?" for i in range(20)) + "\n")
    cfg = SynthConfig("scripted", [tmp_path / "p.txt"], tmp_path / "d.jsonl", quiet=True, strategies="direct")
    with pytest.raises(SystemExit, match="failed 8 requests in a row, the last: .*503.*--resume"):
        run(cfg, Scripted(flaky))
    assert len(rows(tmp_path / "d.jsonl")) == 1  # the second answer is an exact duplicate of the first
    assert json.loads((tmp_path / "d.report.json").read_text())["errors_this_run"] == 8
