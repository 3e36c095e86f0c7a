"""The training loop's pure parts (slmkit/training/fit.py) and the device and precision policy (slmkit/hardware.py);
`fit` itself runs in every training test."""

import pytest
import torch

from slmkit.options import parse_count, parse_duration
from slmkit.training.fit import Budget, FitState, _bar_position, get_lr


def test_parse_budgets():
    assert parse_duration("180") == parse_duration("180s") == parse_duration("3m") == 180
    assert parse_duration("1h") == 3600 and parse_duration(90) == 90
    assert parse_count("5M") == 5_000_000 and parse_count("20k") == 20_000 and parse_count("7") == 7
    with pytest.raises(SystemExit, match="cannot read duration"):
        parse_duration("soon")


def test_the_progress_bar_follows_whichever_budget_ends_first():
    state = FitState(step=50, tokens=4_000, train_seconds=30.0)
    assert _bar_position(Budget(seconds=120), state) == (120, "s", 30)
    assert _bar_position(Budget(steps=200), state) == (200, "step", 50)
    assert _bar_position(Budget(tokens=10_000), state) == (10_000, "tok", 4_000)
    # --time with the pass cap: the cap ends this run first (40% of its tokens vs 25% of the time)
    assert _bar_position(Budget(seconds=120, tokens=10_000), state) == (100, "%", 40)
    assert _bar_position(Budget(steps=100, seconds=600), state) == (100, "%", 50)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0 must be positive"), (["--time", "0"], "--time 0.0 must be positive"),
    (["--lr", "-1"], "--lr -1.0 must be positive"), (["--grad-accum", "0"], "--grad-accum 0 must be positive"),
    (["--batch-size", "0"], "--batch-size 0 must be positive"), (["--warmup", "-5"], "--warmup -5 must be 0 or more"),
    (["--clip", "nan"], "--clip nan must be 0 or more"), (["--dropout", "1"], "--dropout 1.0 must be below 1"),
    (["--dropout-start", "1"], "--dropout-start 1.0 must be below 1"),
    (["--dropout-start", "-0.1"], "--dropout-start -0.1 must be 0 or more"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0 must be in"), (["--patience", "-1"], "--patience -1 must be 0"),
    (["--eval-tokens", "0"], "--eval-tokens 0 must be positive"), (["--eval-every", "0"], "--eval-every 0 must be"),
    (["--checkpoint-every", "0s"], "--checkpoint-every 0s must be positive"),
    (["--vocab-size", "0"], "--vocab-size 0 must be positive")])  # quietly meant one sized to the corpus
def test_numbers_that_cannot_train_are_refused_before_any_work(flags, message, corpus, tmp_path, capsys):
    """They used to train silently (0 steps meant the default budget, a negative lr trained uphill) or crash
    (--grad-accum 0: ZeroDivisionError); now one line names the flag, and nothing is written."""
    from slmkit.__main__ import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--preset", "slm-tiny", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_lr_warms_up_then_decays_to_the_floor():
    assert get_lr(0, 0.0, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert get_lr(9, 0.0, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert get_lr(10, 0.5, 1.0, warmup_steps=10) == pytest.approx(0.55)
    assert get_lr(500, 1.0, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert Budget(steps=100, seconds=10).progress(step=50, tokens=0, seconds=8) == pytest.approx(0.8)


def test_bf16_on_a_cpu_without_bf16_units_warns(monkeypatch, capsys):
    import torch

    from slmkit import hardware

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.pick_dtype("bf16", "cpu") is torch.bfloat16  # the user's choice stands, with a warning
    assert "no bf16 units" in capsys.readouterr().err
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    hardware.pick_dtype("bf16", "cpu")
    assert capsys.readouterr().err == ""
    assert hardware.pick_dtype("auto", "cpu") is None


def test_auto_dtype_is_bf16_on_a_cpu_with_fast_bf16_for_models_wide_enough(monkeypatch):
    import torch

    from slmkit import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_fast", lambda: True)
    assert hardware.pick_dtype("auto", "cpu", hardware.CPU_BF16_MIN_WIDTH) is torch.bfloat16
    assert hardware.pick_dtype("auto", "cpu", 64) is None  # tiny shapes gain nothing in bf16
    assert hardware.pick_dtype("fp32", "cpu", 4096) is None  # an explicit choice stands
    monkeypatch.setattr(hardware, "cpu_bf16_fast", lambda: False)
    assert hardware.pick_dtype("auto", "cpu", 4096) is None  # no bf16 units, or bf16 products barely faster: fp32


def test_cpu_bf16_fast_compares_measured_bf16_and_fp32_peaks(monkeypatch):
    import torch

    from slmkit import hardware

    peaks = {torch.float32: 190e9, torch.bfloat16: 860e9}
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda threads: peaks[torch.bfloat16] / peaks[torch.float32])
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)

    def fast() -> bool:  # measured afresh: the real answer is kept for the rest of a process
        hardware.cpu_bf16_fast.cache_clear()
        return hardware.cpu_bf16_fast()

    assert fast()  # 4.5x, as an AMD Zen 5 measured
    from slmkit import distributed

    with monkeypatch.context() as m:  # under torchrun another rank measured it slow: no rank trains in bf16
        m.setattr(distributed, "any_rank", lambda flag: True)
        assert not fast()
    peaks[torch.bfloat16] = 2 * peaks[torch.float32]
    assert not fast()  # bf16 units, but the casts would eat a 2x gain
    assert not hardware.cpu_bf16_fast()  # asked again: the process's answer, not a new measurement
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda *a: pytest.fail("emulated bf16 must not be measured"))
    assert not fast()
    hardware.cpu_bf16_fast.cache_clear()  # later tests measure this machine again


def test_train_reports_the_dtype_auto_picked(monkeypatch, corpus, tmp_path):
    import json

    import torch

    from slmkit import hardware
    from slmkit.training.train import main as train

    monkeypatch.setattr(hardware, "cpu_bf16_fast", lambda: True)
    common = dict(data=[str(corpus)], preset="slm-tiny", tokenizer="byte", steps=2, block_size=32, batch_size=2,
                  device="cpu", progress=False, val_fraction=0.1)
    train(out=tmp_path / "wide", set=["hidden_size=256", "intermediate_size=704"], **common)
    train(out=tmp_path / "narrow", **common)
    summaries = [json.loads((tmp_path / m / "training_summary.json").read_text()) for m in ("wide", "narrow")]
    assert [s["dtype"] for s in summaries] == ["bf16", "fp32"]
    # trained under bf16 autocast, evaluated in fp32: the reported held-out loss is the saved folder's own
    from slmkit.data.corpus import load_tokens, split_tokens, tokenize_to_memmap
    from slmkit.infer.evaluate import evaluate_tokens
    from slmkit.infer.load import load_model
    from slmkit.model.tokenizer import load_tokenizer, token_byte_lengths

    tok = load_tokenizer(tmp_path / "wide")
    _, val = split_tokens(load_tokens(*tokenize_to_memmap([corpus], tok)), 0.1, 32)
    r = evaluate_tokens(load_model(tmp_path / "wide"), val, 32, token_byte_lengths(tok), max_windows=4_000_000 // 32)
    assert r["loss"] == pytest.approx(summaries[0]["final_eval"]["loss"], abs=1e-6)
    assert hardware.eval_dtype(torch.bfloat16, "cpu") is None
    assert hardware.eval_dtype(torch.bfloat16, "cuda") is torch.bfloat16


def test_a_gpu_that_is_not_there_is_a_one_line_error(monkeypatch):
    import torch

    from slmkit.hardware import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match=r"--device cuda: PyTorch .* sees 0 CUDA GPU\(s\); use --device cpu"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == "cuda:1" and pick_device("cuda") == "cuda"
    with pytest.raises(SystemExit, match="--device cuda:2: .* sees 2 CUDA GPU"):
        pick_device("cuda:2")


def test_fit_logs_the_first_and_the_last_step_however_short_the_run():
    """A run shorter than the log interval (a GPU run right after compiling) still logs its last step, so the
    progress bar, metrics.jsonl and the loss plot end where training ended."""
    import torch

    from slmkit.training.fit import FitConfig, FitState, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    rows = []
    state = fit(model, opt, lambda: (x, y), lambda m, a, b: torch.nn.functional.mse_loss(m(a), b), Budget(steps=7),
                FitConfig(log_every_s=1e9, warmup_steps=1, progress_bar=False), FitState(), log=rows.append)
    assert state.step == 7
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 7]


def test_fit_reports_the_schedules_progress_before_each_step():
    """on_progress sees the schedule's progress (0 first, then step / steps) before each step: train's late dropout
    switches on from it."""
    import torch

    from slmkit.training.fit import FitConfig, FitState, fit

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    seen = []
    fit(model, opt, lambda: (x, y), lambda m, a, b: torch.nn.functional.mse_loss(m(a), b), Budget(steps=4),
        FitConfig(warmup_steps=1, progress_bar=False, on_progress=seen.append), FitState())
    assert seen == [0.0, 0.25, 0.5, 0.75]


def test_fp16_steps_use_a_gradient_scaler_so_small_gradients_do_not_vanish():
    """Without scaling, fp16 turns gradients under ~6e-8 into zeros and the step changes nothing."""
    from slmkit.training.fit import FitConfig, _step

    changes = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
        before = m[0].weight.detach().clone()
        x = torch.randn(8, 16)
        _step(m, torch.optim.SGD(m.parameters(), lr=1e6), lambda x=x: (x, None),
              lambda model, x, y: model(x).float().mean() * 1e-7, FitConfig(autocast_dtype=torch.float16, clip=0),
              torch.amp.GradScaler("cpu") if scaled else None)
        changes[scaled] = (m[0].weight - before).abs().max().item()
    assert changes[False] == 0.0 and changes[True] > 1e-3


def test_fp16_training_is_refused_on_cpu():
    from slmkit.hardware import pick_dtype

    with pytest.raises(SystemExit, match="--dtype fp16 trains on CUDA GPUs only"):
        pick_dtype("fp16", "cpu", 64)
