"""`--preset auto` (slmkit/training/recipe.py): the size, context and batch it picks for a corpus and a budget."""

import pytest
import torch

from slmkit import hardware
from slmkit.model.presets import DECODERS
from slmkit.training import recipe
from slmkit.training.recipe import (
    AUTO_LADDER,
    MAX_PASSES,
    MIN_SEQUENCES,
    MIN_UPDATES_PER_PASS,
    auto_recipe,
    batch_tokens_for,
    context_for,
    cpu_train_flops,
    dropout_for,
    non_embedding_params,
    pass_cap,
    planned_passes,
    shape_for,
    weight_decay_for,
)

SHAKESPEARE = 1_003_854  # bytes of the time-to-quality benchmark's training file


@pytest.fixture(autouse=True)
def calibration_host(monkeypatch):
    """Plan as on the AMD EPYC (AVX2) hosts that calibrated the recipe: their training step's rate (the floor), so the
    picks below do not depend on the machine running the tests."""
    monkeypatch.setattr(recipe, "cpu_train_flops", lambda threads, dtype="auto": 45e9)


def rung(r: dict) -> int:
    """Position of a pick on the ladder (bigger = larger model)."""
    return [(n, {**o, "tie_word_embeddings": False}) for n, o in AUTO_LADDER].index((r["preset"], r["overrides"]))


def test_the_benchmark_budget_picks_the_measured_model(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    r = auto_recipe(SHAKESPEARE, "cpu", seconds=180)
    # slm-1m with 3 layers, block 256, 16 sequences, untied head: the best 3-minute CPU recipe we measured
    assert (r["preset"], r["overrides"]) == ("slm-1m", {"tie_word_embeddings": False, "num_hidden_layers": 3})
    assert (r["block_size"], r["batch_size"], r["lr"]) == (256, 16, 3e-3)


def test_more_compute_buys_a_larger_model_and_a_small_corpus_caps_it(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    picks = [rung(auto_recipe(SHAKESPEARE, "cpu", seconds=s)) for s in (10, 180, 3600, 36_000)]
    assert picks == sorted(picks) and picks[0] < picks[-1], picks
    big_data = rung(auto_recipe(500_000_000, "cpu", seconds=36_000))
    small_data = rung(auto_recipe(120_000, "cpu", seconds=36_000))
    assert small_data < big_data
    # the cap: ~10 passes over the corpus must buy TOKENS_PER_PARAM tokens per parameter
    r = auto_recipe(120_000, "cpu", seconds=36_000)
    assert 120_000 / 3 * 10 >= 3 * non_embedding_params({**DECODERS[r["preset"]], **r["overrides"]}) or rung(r) == 0


def test_a_gpu_gets_a_longer_context_and_bigger_batches(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, gpu = auto_recipe(50_000_000, "cpu", seconds=600), auto_recipe(50_000_000, "cuda", seconds=600)
    assert gpu["block_size"] == 1024 and gpu["block_size"] * gpu["batch_size"] > cpu["block_size"] * cpu["batch_size"]
    assert rung(gpu) > rung(cpu)
    assert all(r["overrides"]["tie_word_embeddings"] is False for r in (cpu, gpu))


def test_a_gpu_batch_leaves_updates_for_a_small_corpus(monkeypatch):
    """A GPU's 8x batch shrinks until a pass makes MIN_UPDATES_PER_PASS updates (a power of two, never below the
    CPU's batch); the CPU's batch, which the CPU benchmarks calibrated, does not depend on the corpus."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cfg = DECODERS["slm-1m"]
    assert batch_tokens_for(cfg, "cuda", 10**9) == 8 * batch_tokens_for(cfg, "cpu", 10**9) == 32768
    assert batch_tokens_for(cfg, "cuda", SHAKESPEARE // 3) == 4096  # 334k tokens / 64 = 5.2k -> 4096
    assert batch_tokens_for(cfg, "cuda", 1000) == batch_tokens_for(cfg, "cpu", 1000) == 4096
    for n in (10**5, 10**6, 3 * 10**6, 10**7):
        b = batch_tokens_for(cfg, "cuda", n)
        assert b & (b - 1) == 0 and (n // b >= MIN_UPDATES_PER_PASS or b == 4096)
    gpu = auto_recipe(SHAKESPEARE, "cuda", seconds=30)  # the H100's best shape on this corpus: 16 x 256
    assert (gpu["block_size"], gpu["batch_size"]) == (256, 16)
    assert auto_recipe(SHAKESPEARE, "cpu", seconds=180)["batch_size"] == 16  # unchanged on CPU


def test_the_rows_rule_leaves_the_cpu_and_large_gpu_corpora_as_calibrated():
    """shape_for shortens the context only where a step would hold under MIN_SEQUENCES rows: never on the CPU (its
    benchmarks calibrated those shapes) nor on a GPU with a large corpus."""
    for name, overrides in AUTO_LADDER:
        cfg = {**DECODERS[name], **overrides}
        for device, n in (("cpu", 1000), ("cpu", 10**9), ("cuda", 10**9)):
            assert shape_for(cfg, device, n) == (context_for(cfg, device), batch_tokens_for(cfg, device, n))
        block, step_tokens = shape_for(cfg, "cuda", 300_000)  # a small corpus on a GPU: still 16 rows or more
        assert step_tokens // block >= MIN_SEQUENCES and block <= context_for(cfg, "cuda")
    assert shape_for(DECODERS["slm-1m"], "cuda", 300_000) == (256, 4096)  # rows shortened from 1024


def test_the_pass_cap_applies_to_time_budgets_only():
    assert pass_cap(50_000, None, None) == MAX_PASSES * 50_000
    assert pass_cap(50_000, 100, None) is None and pass_cap(50_000, None, 10**6) is None
    assert pass_cap(0, None, None) is None


def test_weight_decay_grows_with_the_passes_over_the_data(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cfg = {**DECODERS["slm-1m"], "num_hidden_layers": 3, "vocab_size": 1024}

    def wd(**budget):  # 400k training tokens, 16 x 256 tokens per step
        return weight_decay_for(planned_passes(cfg, 256, 4096, 400_000, "cpu", **budget))

    assert wd(steps=50) == 0.1  # half a pass: the usual decay
    assert wd(steps=450) == round(0.1 * 450 * 4096 / 400_000, 3) == 0.461  # ~4.6 passes
    assert wd(tokens=100_000_000) == 1.0  # 250 passes: capped
    assert wd(steps=450, tokens=400_000) == 0.1  # the first budget to run out is the one that counts
    assert 0.4 < wd(seconds=180) < 0.5  # the benchmark's 3 minutes on 2 threads: ~1.8M tokens, ~4.5 passes
    assert wd(seconds=180) < wd(seconds=360) < wd(seconds=3600) == 1.0


def test_dropout_joins_once_the_data_repeats_often_on_a_wide_enough_model():
    cfg = {**DECODERS["slm-1m"], "vocab_size": 1024}
    assert dropout_for(cfg, 10.0) == recipe.AUTO_DROPOUT == 0.1  # tiny Shakespeare's 180 s on a fast CPU
    assert dropout_for(cfg, 4.5) == 0.0  # the same on an AVX2 host: decay alone
    assert dropout_for(cfg, 6.4) == 0.1  # a plan that reads the machine slow
    assert dropout_for({**DECODERS["slm-tiny"], "vocab_size": 512}, 16.0) == 0.0  # capacity bound, not data bound


def test_a_faster_cpu_is_measured_and_buys_a_larger_model(monkeypatch):
    """A CPU's time budget is planned at our training step's measured rate, never below the calibrated floor: on a
    Xeon with AMX (126 GFLOP/s sustained) the 180 s benchmark gets slm-1m's 4 layers and more weight decay."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    slow = auto_recipe(SHAKESPEARE, "cpu", seconds=180)
    rates = {"auto": 126e9, "fp32": 96e9}
    monkeypatch.setattr(recipe, "cpu_train_flops", lambda threads, dtype="auto": rates[dtype])
    fast = auto_recipe(SHAKESPEARE, "cpu", seconds=180)
    assert (fast["preset"], fast["overrides"]) == ("slm-1m", {"tie_word_embeddings": False})
    assert rung(fast) == rung(slow) + 1
    cfg = {**DECODERS["slm-1m"], "vocab_size": 1024}
    assert planned_passes(cfg, 256, 4096, 400_000, "cpu", seconds=180) > 9
    # the run's --dtype is the precision planned for (a CPU with fast bf16 trains faster in `auto` than in fp32)
    assert planned_passes(cfg, 256, 4096, 400_000, "cpu", seconds=180, dtype="fp32") < planned_passes(
        cfg, 256, 4096, 400_000, "cpu", seconds=180)
    assert recipe.device_flops("cpu") == 126e9
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: every rank plans with the floor, so all plan the same run
    assert recipe.device_flops("cpu") == 2 * recipe.CPU_FLOPS_PER_THREAD
    monkeypatch.delenv("WORLD_SIZE")
    rates["auto"] = 10e9  # a slow or busy CPU: the floor
    assert recipe.device_flops("cpu") == 2 * recipe.CPU_FLOPS_PER_THREAD


def test_the_training_step_is_measured_once_and_leaves_the_rng_alone():
    cpu_train_flops.cache_clear()  # the real one (the fixture patches the module's name)
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    flops = cpu_train_flops(threads, "fp32")
    assert torch.equal(torch.rand(3), expected)  # a run seeded before planning draws the same numbers
    torch.manual_seed(7)
    hardware.matmul_rates((torch.float32,), rounds=1)  # behind hardware.cpu_bf16_fast, which Muon may ask on bf16 CPUs
    assert torch.equal(torch.rand(3), expected)
    assert 1e9 < flops < 1e14 and cpu_train_flops(threads, "fp32") == flops


def test_the_bf16_speedup_is_measured_once_per_thread_count(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "matmul_rates", lambda dtypes, rounds=5: calls.append(dtypes) or [800e9, 200e9])
    hardware.cpu_bf16_speedup.cache_clear()
    assert hardware.cpu_bf16_speedup(2) == 4.0 and hardware.cpu_bf16_speedup(2) == 4.0
    assert calls == [(torch.bfloat16, torch.float32)]  # both dtypes in one interleaved measurement, once
    hardware.cpu_bf16_speedup.cache_clear()  # later tests measure this machine


def test_matmul_rates_interleave_dtypes_and_leave_the_rng_alone():
    """cpu_bf16_speedup times bf16 and fp32 bursts in turn; the same dtype twice must read about the same rate."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, b = hardware.matmul_rates((torch.float32, torch.float32), rounds=3)
    assert torch.equal(torch.rand(3), expected)
    assert 1e9 < a < 1e14 and 0.5 < a / b < 2, (a, b)
