"""`slm synth` against real teachers: a tiny model folder (batched), a tiny `slm serve` endpoint, a tiny GGUF in
llama.cpp; a run killed with SIGKILL and resumed; the rows read by `slm finetune --task sft`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_synth import PROMPTS, Scripted, config, rows
from tiny_models import bpe_tokenizer, one_thread, tiny_llama_folder, write_llama_gguf  # noqa: F401 (fixture)

from slmkit.synth.cli import main as synth
from slmkit.synth.teachers import Job, LocalTeacher

LENIENT = dict(min_words=0, keep_truncated=True, near_dup="off", quiet=True)  # a random tiny model's answers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("teacher") / "tiny")


def prompts_file(path: Path, n: int) -> Path:
    path.write_text("\n".join(f"Question {i}: what is {i} plus {i}?" for i in range(n)) + "\n")
    return path


def judged(out: Path) -> list[dict]:
    """Every answer written: kept and rejected."""
    rejected = out.with_suffix("").with_name(out.stem + ".rejected.jsonl")
    return rows(out) + (rows(rejected) if rejected.exists() else [])


def test_a_model_folder_teacher_decodes_its_requests_together(tiny):
    teacher = LocalTeacher(tiny, batch=4)
    jobs = [Job(f"k{i}", [{"role": "user", "content": p}], max_new_tokens=8, temperature=0.0, seed=i)
            for i, p in enumerate(PROMPTS * 2)]
    try:
        got = dict((job.key, ans) for job, ans in teacher.answers(jobs))
        assert sorted(got) == sorted(j.key for j in jobs) and all(a.error is None for a in got.values())
        assert teacher.engine.max_seen_batch == 4  # rows shared forward passes
        assert teacher.lm.context < teacher.native_context  # the cache holds what the requests need, not 256 rows
        # greedy: the same prompt gives the same answer, batched or not
        assert got["k0"].text == got["k4"].text and got["k0"].finish_reason in ("stop", "length")
    finally:
        teacher.close()


def test_a_teacher_without_a_chat_template_stops_at_the_next_user_turn(tmp_path):
    """A plain User:/Assistant: transcript: the answer ends where the model starts the next "User:" turn (or at the
    token budget), and never contains it."""
    teacher = LocalTeacher(tiny_llama_folder(tmp_path / "plain", tokenizer=bpe_tokenizer(chat_template=False)),
                           batch=4)
    assert teacher.stop == ["\nUser:"]
    jobs = [Job(f"k{i}", [{"role": "user", "content": p}], max_new_tokens=40, temperature=1.0, seed=i)
            for i, p in enumerate(PROMPTS * 3)]
    try:
        got = [ans for _, ans in teacher.answers(jobs)]
    finally:
        teacher.close()
    assert len(got) == len(jobs) and all(a.error is None for a in got)
    assert all("User:" not in a.text and a.finish_reason in ("stop", "length") for a in got)


def test_synth_from_a_model_folder(tiny, tmp_path):
    report = synth(str(tiny), [prompts_file(tmp_path / "p.txt", 6)], tmp_path / "d.jsonl",
                   strategies="direct,step-by-step", max_new_tokens=8, batch=4, **LENIENT)
    got = judged(tmp_path / "d.jsonl")
    assert len(got) == 12 == report["kept"] + sum(report["dropped"].values())
    assert {r["provenance"]["teacher"] for r in got} == {"tiny"} and report["rows_per_s"] > 0


def test_synth_from_an_slm_serve_endpoint_with_a_key(tiny, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from tiny_server import running, serve_folders

    p = prompts_file(tmp_path / "p.txt", 8)
    with running(serve_folders({"tiny": tiny}, api_keys=["sekret"])) as url:
        with pytest.raises(SystemExit, match="SYNTH_KEY .* is not set"):
            synth(url + "/v1", [p], tmp_path / "a.jsonl", api_key_env="SYNTH_KEY", quiet=True)
        monkeypatch.setenv("SYNTH_KEY", "sekret")
        report = synth(url + "/v1", [p], tmp_path / "d.jsonl", teacher_model="tiny", api_key_env="SYNTH_KEY",
                       concurrency=4, max_new_tokens=8, **LENIENT)
    got = judged(tmp_path / "d.jsonl")
    assert len(got) == 8 and report["errors_this_run"] == 0
    assert got[0]["provenance"]["teacher"] == f"{url}/v1 tiny"
    assert "sekret" not in (tmp_path / "d.report.json").read_text()  # only the variable's name is recorded


def test_an_unreachable_endpoint_stops_after_a_run_of_failures(tmp_path):
    from tiny_server import free_port

    with pytest.raises(SystemExit, match="failed 8 requests in a row.*cannot be reached.*--resume"):
        synth(f"http://127.0.0.1:{free_port()}/v1", [prompts_file(tmp_path / "p.txt", 12)], tmp_path / "d.jsonl",
              teacher_model="m", retries=1, timeout=2, concurrency=2, quiet=True)


def test_synth_from_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from tiny_models import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.model.tokenizer import CHATML_TEMPLATE

    tok = bpe_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    gguf = write_llama_gguf(tmp_path / "tiny.gguf", model, tok, chat_template=CHATML_TEMPLATE)
    report = synth(str(gguf), [prompts_file(tmp_path / "p.txt", 3)], tmp_path / "d.jsonl", max_new_tokens=6,
                   temperature=0.0, **LENIENT)
    got = judged(tmp_path / "d.jsonl")
    assert len(got) == 3 and report["teacher"] == "tiny.gguf" and report["errors_this_run"] == 0


def test_a_killed_run_resumes_without_losing_or_repeating_a_row(tiny, tmp_path):
    p, out = prompts_file(tmp_path / "p.txt", 40), tmp_path / "d.jsonl"
    cmd = [sys.executable, "-m", "slmkit", "synth", "--teacher", str(tiny), "--prompts", str(p), "--out", str(out),
           "--max-new-tokens", "48", "--batch", "1", "--min-words", "0", "--keep-truncated", "--near-dup", "off",
           "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while len(judged(out) if out.exists() else []) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 60, "no rows within 60 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before, text = judged(out), out.read_text()
    assert 3 <= len(before) < 40  # killed mid-run
    report = synth(str(tiny), [p], out, max_new_tokens=48, batch=4, resume=True, **LENIENT)
    after = judged(out)
    keys = [r["provenance"]["key"] for r in after]
    assert len(after) == 40 == len(set(keys)) and report["answered_this_run"] == 40 - len(before)
    assert out.read_text().startswith(text[:text.rfind("\n") + 1])  # every row written before the kill, untouched


def test_the_rows_are_what_finetune_sft_reads(tiny, tmp_path):
    from slmkit.data.chat import read_conversations
    from slmkit.training.finetune import main as finetune

    run_report = __import__("slmkit.synth.run", fromlist=["run"]).run(config(tmp_path, strategies="direct"),
                                                                      Scripted())
    assert run_report["kept"] == 4
    conversations = read_conversations([tmp_path / "data.jsonl"])
    assert [c[-1]["role"] for c in conversations] == ["assistant"] * 4
    summary = finetune(tiny, [str(tmp_path / "data.jsonl")], tmp_path / "ft", task="sft", steps=2, batch_size=2,
                       block_size=256, progress=False, eval_every="1000", lr=3e-3, warmup=0)
    assert (tmp_path / "ft" / "model.safetensors").is_file() and summary
    assert json.loads((tmp_path / "data.report.json").read_text())["kept"] == 4


@pytest.mark.parametrize("teacher, flags", [
    ("http://127.0.0.1:9/v1", dict(batch=4)), ("http://127.0.0.1:9/v1", dict(threads=2)),
    ("x.gguf", dict(device="cpu")), ("x.gguf", dict(concurrency=2)), ("folder", dict(timeout=5.0)),
    ("folder", dict(retries=2)), ("folder", dict(keep_system=True, erase_system="Be kind.")),
    ("folder", dict(near_dup="off", near_dup_threshold=0.5))])
def test_a_flag_nothing_would_read_is_refused_before_any_work(tiny, tmp_path, teacher, flags):
    """--batch/--dtype/--device are a folder teacher's, --concurrency/--timeout/--retries a URL's: given to another
    kind they were dropped; so were --erase-system under --keep-system and a threshold with --near-dup off."""
    flag = list(flags)[-1].replace("_", "-")
    with pytest.raises(SystemExit, match=f"^error: --{flag} does not apply to "):
        synth(str(tiny) if teacher == "folder" else teacher, [prompts_file(tmp_path / "p.txt", 2)],
              tmp_path / "d.jsonl", quiet=True, **flags)
    assert not (tmp_path / "d.jsonl").exists()
