"""slm quantize: int8 folders are smaller, load through slmkit.load and stay close to the float model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama_folder

from slmkit.edge.quantize import main as quantize
from slmkit.model.int8 import Int8Linear, quantize_rows


def test_quantize_rows_round_trips_within_half_a_step():
    w = torch.randn(16, 64)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


def test_int8_model_runs_through_slmkit_load_and_is_smaller(tmp_path):
    from slmkit.infer.generate import load
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of

    src = tiny_llama_folder(tmp_path / "fp32", seed=3)
    out = quantize(src, tmp_path / "int8")
    assert (out / "model.safetensors").stat().st_size < 0.35 * (src / "model.safetensors").stat().st_size
    model = load_model(out)
    assert isinstance(model.layers[0].wqkv, Int8Linear) and model.layers[0].wqkv.q.dtype == torch.int8
    ids = torch.tensor([[0, 5, 17, 99, 200, 33]])
    ref = logits_of(load_model(src), ids)
    assert (logits_of(model, ids) - ref).abs().max() < 0.05 * ref.abs().max()
    lm = load(out)
    assert lm.generate("the cat", max_new_tokens=8, temperature=0) == load(src).generate(
        "the cat", max_new_tokens=8, temperature=0)


def test_bad_quantize_inputs_are_one_line_errors(tmp_path):
    src = tiny_llama_folder(tmp_path / "fp32", seed=3)
    with pytest.raises(SystemExit, match="unknown --method 'int4'"):
        quantize(src, tmp_path / "x", method="int4")
    with pytest.raises(SystemExit, match="does not exist"):
        quantize(src, tmp_path / "no" / "x")
    quantize(src, tmp_path / "q")
    with pytest.raises(SystemExit, match="already quantized"):
        quantize(tmp_path / "q", tmp_path / "q2")


def test_int8_model_decodes_in_the_servers_batching_engine(tmp_path):
    # the engine feeds Llama modules per-row positions (a LongTensor pos); the int8 module must take them too
    from tiny_server import decode_concurrently

    from slmkit.infer.generate import SamplingParams, generate_ids, load
    from slmkit.serve.batching import Engine

    lm = load(quantize(tiny_llama_folder(tmp_path / "fp32", seed=3), tmp_path / "int8"))
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [lm.encode(s) for s in ["the cat", "hello there, how are you", "x"]]
    expected = [list(generate_ids(lm.model, ids, greedy, lm.eos_ids, lm.context)) for ids in prompts]
    engine = Engine(lm, max_batch=3).start()
    try:
        got = decode_concurrently(engine, prompts, greedy)
    finally:
        engine.stop()
    assert got == expected
