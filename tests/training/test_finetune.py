import json

import pytest
import torch
from tiny_models import CHATS, bpe_tokenizer, one_thread, tiny_llama_folder, write_chats  # noqa: F401 (fixture)

from slmkit.data.chat import IGNORE, encode_conversation, mask_non_assistant, row_to_messages
from slmkit.model.tokenizer import CHATML_TEMPLATE, byte_tokenizer
from slmkit.training.finetune import main as finetune

FAST = dict(batch_size=4, block_size=64, progress=False, eval_every="1000", lr=3e-3, warmup=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


def test_mask_non_assistant_keeps_only_tokens_starting_in_an_assistant_span():
    ids = [10, 11, 12, 13, 14, 15]
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 12), (12, 14)]  # (0, 0): an added special token
    assert mask_non_assistant(ids, offsets, [(5, 12)]) == [IGNORE, IGNORE, IGNORE, 13, 14, IGNORE]
    assert mask_non_assistant(ids, offsets, []) == [IGNORE] * 6


def test_sft_labels_are_exactly_the_assistant_replies():
    """With one token per byte, the labelled tokens decode to each reply plus its end-of-turn marker."""
    tok = byte_tokenizer()
    messages = row_to_messages(CHATS[2])
    ids, labels = encode_conversation(tok, messages)
    assert len(ids) == len(labels) and labels[0] == IGNORE
    kept = [t for t in labels if t != IGNORE]
    assert tok.decode(kept) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    text = tok.decode(ids)
    assert "<|im_start|>user\nColour of the sky?" in text  # the user turns are in the input, unlabelled
    assert sum(t != IGNORE for t in labels) < len(labels) / 2


SMOL_TEMPLATE = (  # SmolLM2-Instruct's template: a default system turn when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_sft_labels_with_a_template_that_adds_a_system_turn():
    tok = byte_tokenizer()
    for messages, replies in (
            ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "Hello!"),
            ([{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Thanks"},
              {"role": "assistant", "content": "Sure."}], "Welcome.<|im_end|>\nSure.")):
        ids, labels = encode_conversation(tok, messages, SMOL_TEMPLATE)
        assert tok.decode([t for t in labels if t != IGNORE]) == replies + "<|im_end|>\n"
        assert "You are a helpful AI assistant" in tok.decode(ids)


def test_chat_template_round_trip(tmp_path):
    """A tokenizer without a template gets ChatML; saved and reloaded it renders the same prompt `slm chat` uses."""
    from slmkit.data.chat import chat_template_of
    from slmkit.infer.chat import render_prompt
    from slmkit.model.tokenizer import load_tokenizer

    tok = bpe_tokenizer(chat_template=False)
    assert chat_template_of(tok) == CHATML_TEMPLATE
    tok.chat_template = chat_template_of(tok)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    messages = row_to_messages(CHATS[0])[:2]
    assert again.chat_template == CHATML_TEMPLATE
    assert render_prompt(again, messages) == render_prompt(tok, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_row_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="no assistant turn"):
        row_to_messages({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match='"messages" list or "prompt" and "response"'):
        row_to_messages({"text": "hi"})
    with pytest.raises(ValueError, match="role"):
        row_to_messages({"messages": [{"role": "wizard", "content": "hi"}]})


def test_bad_chat_files_fail_with_the_line_number_and_write_nothing(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n{not json\n" + json.dumps(CHATS[1]) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: malformed JSON.*--skip-bad-lines"):
        finetune(base, [str(bad)], tmp_path / "o1", task="sft", steps=2, **FAST)
    mute = tmp_path / "mute.jsonl"
    mute.write_text(json.dumps(CHATS[1]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"mute.jsonl:2: the conversation has no assistant turn"):
        finetune(base, [str(mute)], tmp_path / "o2", task="sft", steps=2, **FAST)
    with pytest.raises(SystemExit, match="is not a model folder"):
        finetune(tmp_path, [str(bad)], tmp_path / "o3", task="sft", steps=2, **FAST)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    summary = finetune(base, [str(bad)] * 4, tmp_path / "o4", task="sft", steps=2, skip_bad_lines=True, **FAST)
    assert summary["step"] == 2


@pytest.mark.parametrize("setting, message", [(dict(lora_r=0), "--lora-r 0 must be positive"),
                                              (dict(lora_dropout=1.0), "--lora-dropout 1.0 must be below 1"),
                                              (dict(grad_accum=0), "--grad-accum 0 must be positive"),
                                              # these four were taken as they came (train refused them already)
                                              (dict(eval_every="0"), "--eval-every 0 must be positive"),
                                              (dict(checkpoint_every="0s"), "--checkpoint-every 0s must be"),
                                              (dict(eval_tokens=0), "--eval-tokens 0 must be positive"),
                                              (dict(patience=-1), "--patience -1 must be 0 or more")])
def test_adapter_and_loop_numbers_that_cannot_train_are_named(base, chats, tmp_path, setting, message):
    """--lora-r 0 used to surface as peft's complaint, blamed on --lora-targets."""
    with pytest.raises(SystemExit, match="^error: " + message):
        finetune(base, [str(chats)], tmp_path / "o", task="sft", steps=2, lora=True, **{**FAST, **setting})
    assert not (tmp_path / "o").exists()


def test_full_sft_learns_the_replies_and_the_folder_chats(base, chats, tmp_path):
    from slmkit.infer.evaluate import main as evaluate
    from slmkit.infer.generate import load

    before = evaluate(base, [str(chats)])
    summary = finetune(base, [str(chats)], tmp_path / "sft", task="sft", steps=40, **FAST)
    out = tmp_path / "sft"
    after = evaluate(out, [str(chats)])
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert summary["trainable_parameters"] == summary["parameters"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png",
                 "checkpoint.safetensors", "training_summary.json"):
        assert (out / name).is_file(), name
    lm = load(out)
    assert lm.tokenizer.chat_template
    from slmkit.infer.chat import render_prompt

    reply = lm.generate(render_prompt(lm.tokenizer, [{"role": "user", "content": "Say yes"}]), max_new_tokens=8,
                        temperature=0)
    assert isinstance(reply, str)


def test_packing_and_causal_continued_pretraining(base, chats, tmp_path):
    packed = finetune(base, [str(chats)], tmp_path / "packed", task="sft", packing=True, steps=5, **FAST)
    assert packed["final_eval"]["tokens"] > 0
    text = tmp_path / "domain.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log.\n" * 200)
    summary = finetune(base, [str(text)], tmp_path / "causal", task="causal", steps=30, **FAST)
    rows = [json.loads(line) for line in (tmp_path / "causal" / "metrics.jsonl").read_text().splitlines()]
    first_train = next(r for r in rows if r["kind"] == "train")
    assert summary["final_eval"]["loss"] < first_train["loss"] - 1.0
    with pytest.raises(SystemExit, match="already holds a model"):
        finetune(base, [str(text)], tmp_path / "causal", task="causal", steps=1, **FAST)
    with pytest.raises(SystemExit, match="is not chat JSONL"):
        finetune(base, [str(text)], tmp_path / "o", task="sft", steps=1, **FAST)


def test_sft_takes_every_conversation_once_a_pass(base, chats, tmp_path, monkeypatch):
    """--sampling epoch (the default) draws conversations without replacement: the first pass holds each training
    conversation once; --sampling random repeats some (same seed, so this never flips)."""
    import slmkit.data.chat as cd

    real, drawn = cd.padded_batch, []
    monkeypatch.setattr(cd, "padded_batch", lambda ex, rows, pad: drawn.append((len(ex), rows)) or real(ex, rows, pad))

    def training_rows() -> tuple[list[int], int]:  # evaluation batches come from the (smaller) held-out list
        n = max(size for size, _ in drawn)
        return [r for size, rows in drawn if size == n for r in rows], n

    summary = finetune(base, [str(chats)], tmp_path / "epoch", task="sft", steps=12, **FAST)
    rows, n = training_rows()
    assert summary["sampling"] == "epoch" and len(rows) >= n
    assert sorted(rows[:n]) == list(range(n))
    drawn.clear()
    finetune(base, [str(chats)], tmp_path / "random", task="sft", steps=12, sampling="random", **FAST)
    rows, n = training_rows()
    assert len(set(rows[:n])) < n
    with pytest.raises(SystemExit, match="--sampling 'sometimes'"):
        finetune(base, [str(chats)], tmp_path / "bad", task="sft", steps=1, sampling="sometimes", **FAST)
    assert not (tmp_path / "bad").exists()


def test_lora_resume_continues_the_same_loss_curve(base, chats, tmp_path):
    """6 steps + --resume to 12 ends where 12 straight steps end (constant lr: the schedule is fit's own test)."""
    from safetensors.torch import load_file

    common = dict(task="sft", lora=True, lora_r=4, lora_dropout=0.1, min_lr_ratio=1.0, **FAST)
    straight = finetune(base, [str(chats)], tmp_path / "straight", steps=12, **common)
    finetune(base, [str(chats)], tmp_path / "cut", steps=6, **common)
    resumed = finetune(base, [str(chats)], tmp_path / "cut", steps=12, resume=True, **common)
    assert resumed["step"] == straight["step"] == 12
    assert resumed["trainable_parameters"] < resumed["parameters"] / 5
    assert resumed["final_eval"]["loss"] == pytest.approx(straight["final_eval"]["loss"], abs=1e-5)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for name in ("adapter_config.json", "adapter_model.safetensors", "slmkit_adapter.json", "tokenizer.json"):
        assert (tmp_path / "cut" / name).is_file(), name
    assert not (tmp_path / "cut" / "config.json").exists()
    plain = {k: v for k, v in common.items() if not k.startswith("lora_")}  # (--lora-r alone is refused)
    with pytest.raises(SystemExit, match="lora False differs"):
        finetune(base, [str(chats)], tmp_path / "cut", steps=14, resume=True, **{**plain, "lora": False})


def test_classify_is_handed_to_slmkit_classify(base, chats, tmp_path, monkeypatch):
    """--task classify runs training/classify.py on a ClassifyConfig: the options given reach it, those left out
    take the classifier's own defaults (16 rows a batch, not causal/sft's 8)."""
    from slmkit.training import classify

    seen = []
    monkeypatch.setattr(classify, "run", lambda cfg: seen.append(cfg) or 7)
    assert finetune(base, [str(chats)], tmp_path / "c", task="classify", lora=True, steps=3) == 7
    cfg = seen[0]
    assert (cfg.model_dir, cfg.steps, cfg.batch_size, cfg.weight_decay) == (base, 3, 16, 0.01)
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16.0)


def test_classify_options_pass_through_and_are_refused_elsewhere(base, chats, tmp_path, monkeypatch):
    from slmkit.training import classify

    seen = []
    monkeypatch.setattr(classify, "run", lambda cfg: seen.append(cfg) or 1)
    finetune(base, [str(chats)], tmp_path / "c", task="classify", eval_data=tmp_path / "dev.csv", epochs=1.5,
             patience=2, max_length=64)
    cfg = seen[0]
    assert (cfg.eval_data, cfg.epochs, cfg.patience, cfg.max_length) == (tmp_path / "dev.csv", 1.5, 2, 64)
    with pytest.raises(SystemExit, match="are for --task classify"):
        finetune(base, [str(chats)], tmp_path / "s", task="sft", eval_data=tmp_path / "dev.csv")
    with pytest.raises(SystemExit, match="--packing cannot be used with --task classify"):
        finetune(base, [str(chats)], tmp_path / "c", task="classify", packing=True)


def test_early_stopping_keeps_the_best_weights(base, tmp_path):
    """2 KB of text overfits at a high learning rate: finetune stops once --patience evaluations scored over 1%
    worse than the best, and the output folder holds the best evaluation's weights. (5 KB of Python's documentation,
    the corpus on a machine without ../shared, still improved after 600 steps.)"""
    from conftest import corpus_text

    text = tmp_path / "domain.txt"
    text.write_text(corpus_text(2000))
    out = tmp_path / "full"
    s = finetune(base, [str(text)], out, task="causal", steps=600, patience=2, val_fraction=0.2,
                 **{**FAST, "eval_every": "10", "lr": 1e-2})
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    best = min(evals, key=lambda e: e["loss"])
    assert s["stopped_early"] and s["step"] < 600 and s["best_step"] == best["step"] < s["step"]
    # The final evaluation (the same held-out windows) scores the weights restored from the output folder.
    assert s["final_eval"]["loss"] == pytest.approx(best["loss"], abs=1e-5)
    assert s["final_eval"]["loss"] < evals[-1]["loss"] / 1.01


def test_best_adapter_is_restored_from_the_adapter_folder(base, tmp_path):
    """With --lora, the best weights are the adapter's: written with save_pretrained, read back with peft."""
    from slmkit.training.config import LoraConfig
    from slmkit.training.finetune import lora_model
    from slmkit.training.stages import Weights

    model, _ = lora_model(base, LoraConfig(r=4, alpha=8, dropout=0.0), 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    model.save_pretrained(tmp_path)
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    Weights(model, tmp_path, adapter={}).restore()
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, kept[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("task, setting", [
    ("sft", dict(lora_r=4)), ("causal", dict(lora_targets="q_proj")), ("classify", dict(lora_alpha=8.0)),
    ("causal", dict(packing=True)), ("sft", dict(text_col="body")), ("sft", dict(replace_errors=True))])
def test_a_flag_the_run_would_not_read_is_refused_first(base, chats, tmp_path, task, setting):
    """Each was accepted and dropped: adapter settings without --lora (on every task), --packing on raw text,
    --text-col and --replace-errors on chat JSONL."""
    flag = list(setting)[0].replace("_", "-")
    with pytest.raises(SystemExit, match=f"^error: --{flag} does not apply "):
        finetune(base, [str(chats)], tmp_path / "o", task=task, steps=1, **{**FAST, **setting})
    assert not (tmp_path / "o").exists()
