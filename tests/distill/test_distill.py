"""`slm distill` end to end on tiny models: causal (live and cached teacher), resume, classify, mlm, the folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slmkit.distill.run import main as distill
from tests.tiny_models import tiny_llama_folder

FAST = dict(block_size=32, batch_size=4, progress=False, eval_tokens=256)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from slmkit.training.train import main as train
    from tests.conftest import corpus_text

    root = tmp_path_factory.mktemp("distill")
    (root / "text.txt").write_text(corpus_text(20_000))
    # a 4-layer teacher that has learnt something, so its distribution is worth matching
    train(data=[str(root / "text.txt")], out=root / "teacher", preset="slm-tiny", vocab_size=300, steps=25,
          block_size=32, batch_size=8, progress=False, set=["num_hidden_layers=4"])
    return root / "teacher", root / "text.txt"


def test_causal_distill_writes_a_model_folder_with_a_card(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from slmkit.model.folder import load_model

    teacher_dir, text = teacher
    out = tmp_path / "student"
    s = distill(teacher_dir, [str(text)], out, student_layers=2, steps=6, **FAST)
    assert s["step"] == 6 and s["task"] == "causal" and s["student"] == "teacher layers [0, 3] of 4"
    assert s["final_eval"]["loss"] > 0 and s["teacher_eval"]["loss"] > 0
    assert s["retention"] == pytest.approx(np.exp(s["teacher_eval"]["loss"] - s["final_eval"]["loss"]))
    card = (out / "README.md").read_text()
    assert str(teacher_dir) in card and "kl" in card and "Retention" in card
    ids = torch.randint(300, (1, 12))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # an ordinary folder: transformers opens it
    torch.testing.assert_close(hf(input_ids=ids).logits, load_model(out)(ids), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "training_summary.json").read_text())["retention"] == s["retention"]
    with pytest.raises(SystemExit, match="already holds a model"):
        distill(teacher_dir, [str(text)], out, student_layers=2, steps=6, **FAST)


def test_distillation_moves_the_student_toward_the_teacher(teacher, tmp_path):
    """A fresh student trained on the teacher's soft targets alone (alpha 1) ends closer to it in KL than it began."""
    from slmkit.distill.losses import kd_full
    from slmkit.model.folder import load_model
    from slmkit.model.llama import Llama

    teacher_dir, text = teacher
    s = distill(teacher_dir, [str(text)], tmp_path / "s", student="slm-tiny", alpha=1.0, steps=30, patience=0,
                lr=3e-3, **FAST)
    t, st = load_model(teacher_dir), load_model(tmp_path / "s")
    torch.manual_seed(0)
    fresh = Llama(dict(st.config)).eval()  # the same student untrained
    x = torch.randint(300, (2, 32))
    with torch.no_grad():
        far, near = (kd_full(m(x).flatten(0, 1), t(x).flatten(0, 1), 1.0, "kl").item() for m in (fresh, st))
    assert near < 0.7 * far, (near, far)
    assert s["loss"] == "kl" and s["alpha"] == 1.0


def test_loss_kinds_and_cached_teacher_agree_with_live(teacher, tmp_path):
    """The top-k cache holds the teacher's top-k at T; a second student reuses it; k = vocabulary gives the live
    teacher's run to float precision."""
    from slmkit.distill.teacher import window_batch
    from slmkit.model.folder import load_model

    teacher_dir, text = teacher
    cache = tmp_path / "cache"
    common = dict(student_layers=2, steps=3, patience=0, loss="jsd", **FAST)
    live = distill(teacher_dir, [str(text)], tmp_path / "live", **common)
    first = distill(teacher_dir, [str(text)], tmp_path / "a", cache_teacher=str(cache), cache_k=300, **common)
    again = distill(teacher_dir, [str(text)], tmp_path / "b", cache_teacher=str(cache), cache_k=300, **common)
    assert not first["cache"]["reused"] and again["cache"]["reused"]
    assert first["cache"]["bytes"] == again["cache"]["bytes"] > 0
    assert first["final_eval"]["loss"] == pytest.approx(live["final_eval"]["loss"], abs=2e-3)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    ids, logp = np.load(folder / "ids.npy"), np.load(folder / "logp.npy")
    from slmkit.data.corpus import load_tokens, tokenize_to_memmap
    from slmkit.model.tokenizer import load_tokenizer

    tokens = load_tokens(*tokenize_to_memmap([text], load_tokenizer(teacher_dir)))
    x, _ = window_batch(tokens, [1], 32, "cpu")
    with torch.no_grad():
        want = torch.log_softmax(load_model(teacher_dir)(x)[0] / 2.0, dim=-1).topk(5)
    assert np.array_equal(ids[1, :, :5], want.indices.numpy())
    np.testing.assert_allclose(logp[1, :, :5], want.values.numpy(), atol=2e-2)


def test_resume_continues_the_same_run(teacher, tmp_path):
    teacher_dir, text = teacher
    common = dict(student_layers=2, patience=0, min_lr_ratio=1.0, **FAST)
    straight = distill(teacher_dir, [str(text)], tmp_path / "straight", steps=8, **common)
    distill(teacher_dir, [str(text)], tmp_path / "cut", steps=4, **common)
    resumed = distill(teacher_dir, [str(text)], tmp_path / "cut", steps=8, resume=True, **common)
    assert resumed["step"] == 8
    assert resumed["final_eval"]["loss"] == pytest.approx(straight["final_eval"]["loss"], abs=1e-4)
    with pytest.raises(SystemExit, match="--temperature 3.0 differs"):
        distill(teacher_dir, [str(text)], tmp_path / "cut", steps=9, resume=True, temperature=3.0, **common)


def test_student_with_another_tokenizer_is_refused(teacher, tmp_path):
    from slmkit.model.tokenizer import train_bpe

    teacher_dir, text = teacher
    other = tiny_llama_folder(tmp_path / "other", tokenizer=train_bpe(["other words entirely " * 40], 280))
    with pytest.raises(SystemExit, match="slm train --tokenizer-from"):
        distill(teacher_dir, [str(text)], tmp_path / "s", student=str(other), steps=1, **FAST)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_classify_task_distillation_with_unlabelled_text(tmp_path):
    from slmkit.training.classify import finetune
    from tests.tiny_encoders import tiny_mlm_folder, toy_rows, wordpiece, write_csv

    base = tiny_mlm_folder(tmp_path / "base", wordpiece())
    rows = toy_rows(240, seed=1)
    data = write_csv(tmp_path / "train.csv", rows[:200])
    held = write_csv(tmp_path / "eval.csv", rows[200:])
    finetune(base, data, tmp_path / "teacher", eval_data=held, epochs=12, lr=3e-3, batch_size=16, progress=False)
    unlabelled = tmp_path / "more.txt"
    unlabelled.write_text("\n".join(t for t, _ in toy_rows(80, seed=5)))
    s = distill(tmp_path / "teacher", [str(data)], tmp_path / "student", student_layers=1, unlabelled=[str(unlabelled)],
                epochs=6, lr=3e-3, progress=False)
    assert s["task"] == "classify" and s["labelled_rows"] > 100 and s["unlabelled_rows"] == 80
    assert s["teacher_eval"]["accuracy"] > 0.8
    assert s["final_eval"]["accuracy"] >= 0.8 and s["retention"] > 0.85
    from slmkit.infer.classify import predict

    out = predict(tmp_path / "student", ["a wonderful lovely day"])  # what `slm classify` runs
    assert out[0][0][0] == "pos"


def test_mlm_triple_loss(tmp_path):
    from tests.tiny_encoders import tiny_mlm_folder, toy_rows, wordpiece

    tok = wordpiece()
    teacher_dir = tiny_mlm_folder(tmp_path / "teacher", tok)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(t for t, _ in toy_rows(400)))
    s = distill(teacher_dir, [str(text)], tmp_path / "student", student_layers=1, steps=4, block_size=16,
                batch_size=4, progress=False, eval_tokens=256)
    assert s["task"] == "mlm" and s["step"] == 4 and np.isfinite(s["final_eval"]["loss"])
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "student").config.num_hidden_layers == 1


def test_the_cli_runs_a_preset_student_with_alpha_zero_and_prints_json(teacher, tmp_path):
    """`slm distill` as a user types it: a fresh preset student, --alpha 0 (no teacher run), --json on stdout."""
    import subprocess
    import sys

    teacher_dir, text = teacher
    r = subprocess.run([sys.executable, "-m", "slmkit", "distill", "--teacher", str(teacher_dir), "--data", str(text),
                        "--student", "slm-tiny", "--alpha", "0", "--steps", "3", "--block-size", "32",
                        "--batch-size", "4", "--eval-tokens", "256", "--no-progress", "--json", "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["step"] == 3 and s["alpha"] == 0.0 and s["student"].startswith("preset slm-tiny")
    assert "alpha 0: the labels alone" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "slmkit", "distill", "--teacher", str(teacher_dir), "--data",
                          str(text), "--student-layers", "9", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--student-layers 9" in bad.stderr and "Traceback" not in bad.stderr


def _teacher_of(kind: str, path):
    from tests.tiny_encoders import tiny_bert_config, tiny_mlm_folder, wordpiece

    if kind == "causal":
        return tiny_llama_folder(path)
    if kind == "mlm":
        return tiny_mlm_folder(path, wordpiece())
    from transformers import BertForSequenceClassification

    tok = wordpiece()
    BertForSequenceClassification(tiny_bert_config(tok, num_labels=2, id2label={0: "neg", 1: "pos"},
                                                   label2id={"neg": 0, "pos": 1})).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind, flag, value", [
    ("causal", "alpha_ce", 1.0), ("causal", "max_length", 64), ("causal", "unlabelled", ["x.txt"]),
    ("causal", "beta", 0.3), ("causal", "cache_k", 8), ("mlm", "alpha", 0.3), ("mlm", "loss", "jsd"),
    ("mlm", "label_col", "y"), ("classify", "block_size", 32), ("classify", "checkpoint_every", "30s"),
    ("classify", "replace_errors", True), ("classify", "alpha_cos", 0.5), ("causal", "cache_teacher", "auto"),
    ("causal", "temperature", 4.0), ("classify", "loss", "jsd")])
def test_a_flag_the_task_would_not_read_is_refused_before_any_work(tmp_path, kind, flag, value):
    """Each of these was accepted and dropped: --alpha-ce on a causal run, --alpha on mlm, --block-size on classify,
    --beta without --loss jsd, --cache-k without --cache-teacher, the soft loss's settings with --alpha 0."""
    teacher_dir = _teacher_of(kind, tmp_path / "teacher")
    data = tmp_path / "rows.txt"
    data.write_text("the cat sat on the mat\n" * 50)
    soft = flag in ("cache_teacher", "temperature", "loss") and kind != "mlm"
    alpha = {"alpha": 0.0} if soft else {}  # the teacher's soft loss left out
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to "):
        distill(teacher_dir, [str(data)], tmp_path / "s", steps=1, progress=False, **alpha, **{flag: value})
    assert not (tmp_path / "s").exists()


def test_replace_errors_is_a_distill_flag_and_reads_undecodable_text(tmp_path):
    """The UTF-8 error advised --replace-errors, which `slm distill` did not have."""
    import argparse

    from slmkit.distill.run import add_args

    p = argparse.ArgumentParser()
    add_args(p)
    assert p.parse_args(["--teacher", "t", "--data", "d", "--out", "o", "--replace-errors"]).replace_errors is True
    teacher_dir = tiny_llama_folder(tmp_path / "teacher")
    data = tmp_path / "text.txt"
    data.write_bytes(b"the cat sat on the mat. " * 200 + b"\xff\xfe broken" + b" the dog sat on the log." * 200)
    with pytest.raises(SystemExit, match="not valid UTF-8 .* pass --replace-errors"):
        distill(teacher_dir, [str(data)], tmp_path / "s", student_layers=1, steps=1, **FAST)
    s = distill(teacher_dir, [str(data)], tmp_path / "s2", student_layers=1, steps=1, replace_errors=True, **FAST)
    assert s["step"] == 1


def test_unlabelled_plain_text_is_read_whole_whatever_the_labelled_rows_text_col(tmp_path):
    """--text-col names the labelled rows' column; a .txt of unlabelled texts has none and is read line by line."""
    from types import SimpleNamespace

    from slmkit.distill.tasks import _unlabelled_texts

    (tmp_path / "more.txt").write_text("one\ntwo\n")
    (tmp_path / "more.jsonl").write_text('{"body": "three"}\n')
    cfg = SimpleNamespace(unlabelled=[str(tmp_path / "more.txt"), str(tmp_path / "more.jsonl")], text_col="body")
    assert _unlabelled_texts(cfg) == ["one", "two", "three"]
