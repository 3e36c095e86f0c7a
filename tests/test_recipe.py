"""`--preset auto` (slmkit/recipe.py): the size, context and batch it picks for a corpus and a budget."""

import torch

from slmkit.presets import DECODERS
from slmkit.recipe import AUTO_LADDER, auto_recipe, non_embedding_params

SHAKESPEARE = 1_003_854  # bytes of the time-to-quality benchmark's training file


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
