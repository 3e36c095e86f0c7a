import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slmkit.training import recipe
from slmkit.training.train import RUN_FILE, parse_overrides
from slmkit.training.train import main as train


def test_parse_overrides():
    assert parse_overrides(["num_hidden_layers=6", "rope_theta=1e5", "x=abc"]) == {
        "num_hidden_layers": 6, "rope_theta": 100000.0, "x": "abc"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["hidden_size"])


def test_training_lowers_loss_and_writes_a_complete_folder(tiny_model):
    metrics = [json.loads(line) for line in (tiny_model / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if m["kind"] == "final"][-1]
    assert final["loss"] < math.log(320) - 0.5  # well below a uniform guess over the vocabulary
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "loss.png", "checkpoint.safetensors", "train_args.json"):
        assert (tiny_model / name).is_file(), name
    card = (tiny_model / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "bits per byte" in card
    assert "| learning rate | 0.009 (warmup + cosine) |" in card  # Muon's 3 x 3e-3, not 0.009000000000000001
    assert final["step"] == 30


def test_saved_model_generates_in_transformers(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("ROMEO:", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "slmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def test_interrupted_run_resumes_to_the_same_weights(corpus, tmp_path):
    """Ctrl-C mid-run saves a checkpoint; --resume finishes with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    # On the CPU: exact equality needs deterministic kernels (a GPU's atomics in backward are not)
    common = ["--data", corpus, "--preset", "slm-tiny", "--vocab-size", "300", "--steps", "400", "--device", "cpu",
              "--block-size", "32", "--batch-size", "4", "--no-progress", "--eval-every", "400"]
    straight = _cli("train", *common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "train", *map(str, common), "--out", tmp_path / "cut"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:  # first log line: training is under way
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    state = json.loads((tmp_path / "cut" / "training_summary.json").read_text())
    assert state["interrupted"] and 0 < state["step"] < 400, state["step"]
    resumed = _cli("train", *common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_preset_auto_run_resumes(corpus, tmp_path):
    """--preset auto's own config fields (the untied LM head) are saved with the run, so --resume rebuilds the model
    it checkpointed (it once built the preset's tied head and refused its own checkpoint)."""
    out = tmp_path / "m"
    common = dict(data=[str(corpus)], out=out, tokenizer="byte", batch_size=2, block_size=32, progress=False)
    train(**common, steps=2)
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["preset"] != "auto" and saved["auto_overrides"]["tie_word_embeddings"] is False
    summary = train(**common, steps=4, resume=True)
    assert summary["step"] == 4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_resumed_run_keeps_the_precision_it_started_with(corpus, tmp_path, monkeypatch):
    """`--dtype auto` rests on a timing (hardware.cpu_bf16_fast) that a new process can measure differently: the start's
    pick is saved with the run and a --resume trains on in it."""
    out = tmp_path / "m"
    common = dict(data=[str(corpus)], out=out, preset="slm-1m", vocab_size=300, batch_size=2, block_size=32,
                  progress=False, device="cpu", set=["num_hidden_layers=1"])
    monkeypatch.setattr("slmkit.hardware.cpu_bf16_fast", lambda: True)
    train(**common, steps=2)
    assert json.loads((out / RUN_FILE).read_text())["precision"] == "bf16"
    assert json.loads((out / "training_summary.json").read_text())["dtype"] == "bf16"
    monkeypatch.setattr("slmkit.hardware.cpu_bf16_fast", lambda: False)  # the resuming process measured otherwise
    assert train(**common, steps=3, resume=True)["step"] == 3
    assert json.loads((out / "training_summary.json").read_text())["dtype"] == "bf16"


@pytest.mark.parametrize("preset,dtype,expected", [("slm-tiny", "auto", False), ("slm-1m", "fp32", False),
                                                    ("slm-1m", "auto", True)])
def test_muon_orthogonalizes_in_the_runs_precision(corpus, tmp_path, monkeypatch, preset, dtype, expected):
    """Newton-Schulz follows the training precision on a CPU: an fp32 run (a model too narrow for bf16, or --dtype
    fp32) must not do it in bf16 because the bf16 timing came out fast in this process: two runs of one seed on a
    busy machine trained different weights (the resume test failed once in a full-suite run)."""
    from slmkit.training import optim

    monkeypatch.setattr("slmkit.hardware.cpu_bf16_fast", lambda: True)
    monkeypatch.setattr(optim, "cpu_bf16_fast", lambda: True)
    seen = []
    real = optim.orthogonalize
    monkeypatch.setattr(optim, "orthogonalize", lambda g, steps, bf16=None: seen.append(bf16) or real(g, steps, bf16))
    train(data=[str(corpus)], out=tmp_path / "m", preset=preset, vocab_size=300, batch_size=2, block_size=32, steps=2,
          dtype=dtype, progress=False, device="cpu", set=["num_hidden_layers=1"])
    assert seen and all(flag is expected for flag in seen), seen


@pytest.mark.parametrize("case", ["no-checkpoint", "other-arch", "other-optimizer", "existing"])
def test_resume_and_output_folder_errors(corpus, tmp_path, case, tiny_model):
    out = tmp_path / "m"
    if case == "no-checkpoint":
        out.mkdir()
        with pytest.raises(SystemExit, match="holds no checkpoint.safetensors"):
            train(data=[str(corpus)], out=out, resume=True, progress=False)
    elif case == "other-arch":
        with pytest.raises(SystemExit, match="differs from the saved run"):
            train(data=[str(corpus)], out=tiny_model, preset="slm-1m", resume=True, progress=False)
    elif case == "other-optimizer":  # Muon's saved state (the default for Llama decoders) cannot continue as AdamW's
        assert json.loads((tiny_model / RUN_FILE).read_text())["optimizer"] == "muon"
        with pytest.raises(SystemExit, match="--optimizer adamw differs from the saved run"):
            train(data=[str(corpus)], out=tiny_model, optimizer="adamw", resume=True, progress=False)
    else:
        with pytest.raises(SystemExit, match="already holds a model; pass --resume"):
            train(data=[str(corpus)], out=tiny_model, steps=1, progress=False)


def test_eval_data_holds_out_separate_files_and_val_fraction_zero_holds_out_nothing(corpus, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text(corpus.read_text()[:4000])
    common = dict(data=[str(corpus)], preset="slm-tiny", tokenizer="byte", steps=3, block_size=32, batch_size=2,
                  progress=False)
    s = train(out=tmp_path / "a", eval_data=[str(val)], **common)
    n = len(val.read_bytes()) + 1  # byte tokens + one EOS
    assert s["final_eval"]["tokens"] == len(range(0, n - 33, 32)) * 32  # every full window of the separate file
    card = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert card["eval_data"] == [str(val)] and card["val_fraction"] == 0.0
    assert card["corpus_tokens"] == len(corpus.read_bytes()) + 1  # bytes + one EOS: all of --data
    s = train(out=tmp_path / "b", val_fraction=0.0, **common)
    assert s["step"] == 3 and s["final_eval"] == {}
    with pytest.raises(SystemExit, match="--eval-data or --val-fraction, not both"):
        train(out=tmp_path / "c", eval_data=[str(val)], val_fraction=0.1, **common)
    val.write_text("tiny")
    with pytest.raises(SystemExit, match=f"--eval-data {val} has 5 tokens, too few for --block-size 32"):
        train(out=tmp_path / "d", eval_data=[str(val)], **common)


def test_weight_decay_follows_the_passes_over_the_data(corpus, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:2000])
    n = len(small.read_bytes()) + 1  # byte tokens + one EOS, all of them trained on
    common = dict(data=[str(small)], preset="slm-tiny", tokenizer="byte", steps=80, block_size=32, batch_size=4,
                  val_fraction=0.0, progress=False)
    train(out=tmp_path / "a", **common)  # 80 x 4 x 32 tokens: ~5 passes over the data
    card = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert card["weight_decay"] == round(0.1 * 80 * 4 * 32 / n, 3) > 0.4
    assert f"| weight decay | {card['weight_decay']:.3g} |" in (tmp_path / "a" / "README.md").read_text()
    assert json.loads((tmp_path / "a" / RUN_FILE).read_text())["weight_decay"] == card["weight_decay"]  # resume
    train(out=tmp_path / "b", weight_decay=0.05, **common)  # an explicit value wins
    assert json.loads((tmp_path / "b" / "training_summary.json").read_text())["weight_decay"] == 0.05
    train(out=tmp_path / "c", **{**common, "steps": 5})  # under one pass: the usual 0.1
    assert json.loads((tmp_path / "c" / "training_summary.json").read_text())["weight_decay"] == 0.1


def test_a_time_budget_ends_after_max_passes_over_a_small_corpus(corpus, tmp_path, capsys):
    """--time on a corpus the budget would repeat many times: the schedule (and the run) ends after MAX_PASSES
    passes (progress counts the capped tokens, so the learning rate has decayed by then) instead of overfitting at
    peak learning rate; --tokens keeps what the user asked for."""
    from slmkit.training.recipe import MAX_PASSES

    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:1000])
    n = len(small.read_bytes()) + 1  # byte tokens + one EOS, all of them trained on
    common = dict(data=[str(small)], preset="slm-tiny", tokenizer="byte", block_size=32, batch_size=4,
                  val_fraction=0.0, progress=False, device="cpu")
    s = train(out=tmp_path / "a", time="10m", **common)
    step_tokens = 4 * 32
    assert s["tokens_seen"] == -(-MAX_PASSES * n // step_tokens) * step_tokens  # the first step at or past the cap
    assert s["train_seconds"] < 60
    assert f"schedule: ends after {MAX_PASSES} passes over the {n:,} training tokens" in capsys.readouterr().out
    # more time does not train further past the cap, and --resume says what would
    r = train(out=tmp_path / "a", time="20m", resume=True, **{k: v for k, v in common.items() if k != "preset"})
    assert r["step"] == s["step"] and "to train further raise --tokens" in capsys.readouterr().out
    s = train(out=tmp_path / "b", tokens=(MAX_PASSES + 5) * n, **common)  # an explicit budget is kept
    assert s["tokens_seen"] >= (MAX_PASSES + 5) * n


def test_compile_trains_through_torch_compile(corpus, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    counters.clear()
    common = dict(data=[str(corpus)], preset="slm-tiny", tokenizer="byte", steps=2, block_size=32, batch_size=2,
                  progress=False, compile=True, device="cpu")  # the compiler check is for CPU inductor
    s = train(out=tmp_path / "m", **common)
    assert s["step"] == 2 and math.isfinite(s["final_eval"]["loss"])
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward ran as a compiled graph
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without a C++ compiler
    with pytest.raises(SystemExit, match="--compile needs a C\\+\\+ compiler"):
        train(out=tmp_path / "n", **common)
    assert not (tmp_path / "n").exists()  # failed before writing anything


def test_corpus_too_small_for_the_block(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("only a few words here")
    with pytest.raises(SystemExit, match="too few for --block-size 256"):
        train(data=[str(f)], out=tmp_path / "m", tokenizer="byte", block_size=256, steps=1, progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun gloo test is run on Linux CI")
def test_two_process_torchrun_trains_data_parallel(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slmkit",
           "train", "--data", str(corpus), "--out", str(tmp_path / "ddp"), "--preset", "slm-tiny", "--vocab-size",
           "300", "--steps", "20", "--block-size", "32", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 4x2x1" in r.stdout
    summary = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert summary["step"] == 20 and summary["tokens_seen"] == 20 * 4 * 32 * 2


def test_early_stopping_keeps_the_best_weights(tmp_path):
    """5 KB of text overfits a 2-layer, 128-wide model within ~10 passes: training stops once --patience evaluations
    scored over 1% worse than the best, and the folder holds the weights of the best evaluation, not the last."""
    from conftest import corpus_text

    from slmkit.data.corpus import load_tokens, split_tokens, tokenize_to_memmap
    from slmkit.infer.evaluate import evaluate_tokens
    from slmkit.infer.load import load_model
    from slmkit.model.tokenizer import load_tokenizer, token_byte_lengths

    f = tmp_path / "small.txt"
    f.write_text(corpus_text(6000), encoding="utf-8")
    out = tmp_path / "m"
    s = train(data=[str(f)], out=out, preset="slm-1m", set=["num_hidden_layers=2"], tokenizer="byte", block_size=32,
              batch_size=8, steps=600, val_fraction=0.2, eval_every="20", progress=False, device="cpu", patience=3)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    best = min(evals, key=lambda e: e["loss"])
    assert s["stopped_early"] and s["step"] < 600 and s["step"] == evals[-1]["step"]
    assert s["best_step"] == best["step"] < s["step"]
    worse = [e for e in evals if e["step"] > best["step"] and e["loss"] > best["loss"] * 1.01]
    assert len(worse) == 3  # the held-out loss rose: overfitting
    # The folder on disk scores the best evaluation's loss on the same held-out windows, not the last one's.
    tok = load_tokenizer(out)
    _, val = split_tokens(load_tokens(*tokenize_to_memmap([f], tok)), 0.2, 32)
    r = evaluate_tokens(load_model(out), val, 32, token_byte_lengths(tok), max_windows=65536 // 32)
    assert r["loss"] == pytest.approx(best["loss"], abs=1e-5) and r["loss"] < worse[-1]["loss"]
    assert s["final_eval"]["loss"] == pytest.approx(best["loss"], abs=1e-5)
    card = (out / "README.md").read_text()
    assert "(stopped early: held-out loss rose)" in card and f"| weights kept | step {best['step']:,} " in card


def test_checkpoint_records_the_final_evaluation_of_the_best_weights(corpus, tmp_path):
    """The last weights, scored after the loop, can be the best: the final checkpoint must know, or a resumed run
    would compare against an older best and overwrite the folder with worse weights."""
    from slmkit.model.checkpoint import CHECKPOINT, read_checkpoint_state

    s = train(data=[str(corpus)], out=tmp_path / "m", preset="slm-tiny", tokenizer="byte", block_size=32,
              batch_size=4, steps=45, eval_every="20", progress=False, device="cpu")
    state = read_checkpoint_state(tmp_path / "m" / CHECKPOINT)
    assert s["best_step"] == state["best_step"] == 45  # still learning: the final weights are the best
    assert state["best_loss"] == pytest.approx(s["final_eval"]["loss"], rel=0.05)


def test_logits_are_calibrated_on_the_held_out_split_unless_told_not_to(corpus, tmp_path, capsys):
    """~40 passes over 6,000 characters, held out on the rest of the corpus: the model ends overconfident, so the
    fitted temperature softens its logits and lowers the held-out loss; --no-calibrate leaves them as trained."""
    text = corpus.read_text(encoding="utf-8")
    (tmp_path / "small.txt").write_text(text[:6000], encoding="utf-8")
    (tmp_path / "rest.txt").write_text(text[6000:], encoding="utf-8")
    common = dict(data=[str(tmp_path / "small.txt")], eval_data=[str(tmp_path / "rest.txt")], preset="slm-tiny",
                  vocab_size=300, steps=150, block_size=64, batch_size=8, progress=False, patience=0, device="cpu")

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    train(out=tmp_path / "cal", **common)
    assert "calibrated: logits / " in capsys.readouterr().out
    cal = [r for r in rows(tmp_path / "cal") if r["kind"] == "calibration"]
    final = [r for r in rows(tmp_path / "cal") if r["kind"] == "final"][-1]
    assert len(cal) == 1 and cal[0]["temperature"] > 1.0 and cal[0]["loss_after"] < cal[0]["loss_before"]
    assert final["loss"] == pytest.approx(cal[0]["loss_after"], rel=1e-4)  # the folder holds the calibrated logits
    assert json.loads((tmp_path / "cal" / "training_summary.json").read_text())["logit_temperature"] == \
        cal[0]["temperature"]
    card = (tmp_path / "cal" / "README.md").read_text()
    assert f"| logits | divided by {cal[0]['temperature']:g} after training" in card

    train(out=tmp_path / "raw", calibrate=False, **common)
    assert "calibrated: logits" not in capsys.readouterr().out
    assert not [r for r in rows(tmp_path / "raw") if r["kind"] == "calibration"]
    final = [r for r in rows(tmp_path / "raw") if r["kind"] == "final"][-1]
    assert final["loss"] == pytest.approx(cal[0]["loss_before"], rel=1e-4)
    assert json.loads((tmp_path / "raw" / "training_summary.json").read_text())["logit_temperature"] == 1.0


def test_an_explicit_block_size_keeps_the_recipes_tokens_per_step(corpus, tmp_path):
    """--block-size alone changes the context, not the update size: slm-tiny's 4,096 tokens per step become 64 rows
    of 64 (the recipe's 16 rows of 256 would have quartered each update)."""
    auto = recipe.auto_recipe(100_000, "cpu", steps=1)
    assert auto["batch_size"] * auto["block_size"] == 4096
    train(data=[str(corpus)], out=tmp_path / "m", preset="slm-tiny", tokenizer="byte", block_size=64, steps=1,
          progress=False, device="cpu")
    card = json.loads((tmp_path / "m" / "training_summary.json").read_text())
    assert (card["block_size"], card["batch_size"]) == (64, 4096 // 64)


def test_late_dropout_starts_at_its_fraction_of_the_budget(corpus, tmp_path, monkeypatch):
    """--dropout from --dropout-start on (late dropout): none in the first half of this 4-step run, 0.1 after; the
    value is saved with the run and shown in the summary; a run saved before the flag resumes with dropout from the
    first step and random windows, as it trained."""
    import slmkit.training.train as train_module

    calls = []
    real = train_module.set_dropout
    monkeypatch.setattr(train_module, "set_dropout", lambda model, p: calls.append(p) or real(model, p))
    out = tmp_path / "m"
    common = dict(data=[str(corpus)], out=out, preset="slm-tiny", tokenizer="byte", block_size=32, batch_size=2,
                  progress=False, device="cpu", dropout=0.1)
    train(**common, steps=4, dropout_start=0.5)
    assert calls == [0.1, 0.0, 0.1]  # built with it, off at progress 0, on again at step 2 of 4
    assert json.loads((out / "training_summary.json").read_text())["dropout_start"] == 0.5
    card = (out / "README.md").read_text()
    assert "| residual dropout | 0.1 from 50% of the budget |" in card
    assert "| data order | shuffled passes: every window once a pass, at a moving phase |" in card
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["dropout_start"] == 0.5
    assert saved["sampling"] == "epoch"
    del saved["dropout_start"], saved["sampling"]  # as written before late dropout and shuffled passes
    (out / RUN_FILE).write_text(json.dumps(saved))
    calls.clear()
    train(**common, steps=6, resume=True)
    assert calls == [0.1]  # on from the start, never switched off
    assert json.loads((out / "training_summary.json").read_text())["sampling"] == "random"  # as it trained


def test_a_time_budget_replans_decay_and_dropout_from_the_runs_own_speed(corpus, tmp_path, monkeypatch, capsys):
    """The plan's timing is a 1-3 s probe; at REPLAN_AT of a --time budget the run's own speed decides again. Here the
    plan is told 1 pass (0.1 decay, no dropout) while the run makes MAX_PASSES: from 10% on it trains with what
    MAX_PASSES passes get, the optimizer's decaying groups included, and the run file saves it for --resume. A flag
    the user set stays; a --steps budget is planned exactly and not re-planned."""
    import slmkit.training.train as train_module

    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:2000])
    monkeypatch.setattr(recipe, "planned_passes", lambda *a, **k: 1.0)
    optimizers = []
    real = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    common = dict(data=[str(small)], preset="slm-1m", tokenizer="byte", block_size=32, batch_size=4,
                  val_fraction=0.0, progress=False, device="cpu", dtype="fp32")
    train(out=tmp_path / "a", time="10m", **common)
    expected = {"weight_decay": recipe.weight_decay_for(recipe.MAX_PASSES), "dropout": recipe.AUTO_DROPOUT}
    assert expected == {"weight_decay": 1.0, "dropout": 0.1}
    summary = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert {k: summary[k] for k in expected} == expected
    saved = json.loads((tmp_path / "a" / RUN_FILE).read_text())
    assert {k: saved[k] for k in expected} == expected and saved["replan"] == []
    assert {g["weight_decay"] for g in optimizers[-1].param_groups} == {0.0, 1.0}
    err = capsys.readouterr().err
    assert "re-planned at 10% of the budget from this run's speed: 16.0 passes over the data, not the 1.0 planned: " \
           "weight decay 0.1 -> 1, dropout 0 -> 0.1" in err
    train(out=tmp_path / "b", time="10m", weight_decay=0.3, **common)  # the user's value stays
    summary = json.loads((tmp_path / "b" / "training_summary.json").read_text())
    assert (summary["weight_decay"], summary["dropout"]) == (0.3, 0.1)
    assert "planned: dropout 0 -> 0.1" in capsys.readouterr().err
    train(out=tmp_path / "c", steps=20, **common)
    saved = json.loads((tmp_path / "c" / RUN_FILE).read_text())
    assert (saved["weight_decay"], saved["dropout"], saved["replan"]) == (0.1, 0.0, [])
    assert "re-planned" not in capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    dict(tokenizer_from="DIR", vocab_size=500), dict(tokenizer_from="DIR", tokenizer="bpe"),
    dict(tokenizer_from="DIR", lowercase=True), dict(lowercase=True), dict(tokenizer="byte", lowercase=True),
    dict(tokenizer="byte", vocab_size=500), dict(preset="bert-tiny", dropout=0.1),
    dict(preset="gpt-neo-125m", dropout_start=0.5), dict(preset="bert-tiny", no_calibrate=False)])
def test_a_tokenizer_or_dropout_flag_the_run_would_not_read_is_refused_first(tmp_path, flags):
    """Each was accepted and dropped: the tokenizer's flags with --tokenizer-from, --lowercase without WordPiece,
    --vocab-size with raw bytes, --dropout on presets whose blocks are not slmkit's Llama block, --no-calibrate on
    encoders (never calibrated)."""
    flag = list(flags)[-1].replace("_", "-")
    options = {("calibrate" if k == "no_calibrate" else k): v for k, v in flags.items()}  # --no-calibrate's option
    with pytest.raises(SystemExit, match=f"^error: --{flag} does not apply to "):
        train(data=[str(tmp_path / "none.txt")], out=tmp_path / "m", steps=1, **options)
    assert not (tmp_path / "m").exists()
