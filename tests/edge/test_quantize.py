"""slm quantize: int8 and w8a8 folders are smaller, load through slmkit.load and stay close to the float model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama_folder

from slmkit.edge.quantize import main as quantize
from slmkit.edge.smoothquant import ALPHAS
from slmkit.model.int8 import Int8Linear, W8A8Linear, int8_matmul_engine, quantize_rows

needs_engine = pytest.mark.skipif(int8_matmul_engine() is None, reason="this PyTorch build has no x86/fbgemm "
                                  "quantized engine (w8a8 folders then run as int8: tested below)")


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


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_int8_model_decodes_in_the_servers_batching_engine(method, tmp_path):
    # the engine feeds Llama modules per-row positions (a LongTensor pos); the int8 module must take them too
    from tiny_server import decode_concurrently

    from slmkit.infer.generate import SamplingParams, generate_ids, load
    from slmkit.serve.batching import Engine

    lm = load(quantize(tiny_llama_folder(tmp_path / "fp32", seed=3), tmp_path / "int8", method=method))
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [lm.encode(s) for s in ["the cat", "hello there, how are you", "x"]]
    expected = [list(generate_ids(lm.model, ids, greedy, lm.eos_ids, lm.context)) for ids in prompts]
    engine = Engine(lm, max_batch=3).start()
    try:
        got = decode_concurrently(engine, prompts, greedy)
    finally:
        engine.stop()
    if method == "int8":
        assert got == expected
    else:  # w8a8 rounds each token's activations to 8 bits: the batched pass and the one-token step add in another
        # order, and a 1e-7 difference can cross a rounding boundary and move a near-tie (docs/compose.md). So: every
        # token the engine chose is the model's own greedy choice over the engine's text, up to such a near-tie
        assert [len(g) for g in got] == [len(e) for e in expected]
        with torch.inference_mode():
            for ids, new in zip(prompts, got, strict=True):
                logits = lm.model(torch.tensor([ids + new]))[0, len(ids) - 1:-1].float()  # (len(new), V)
                chosen = logits.gather(1, torch.tensor(new)[:, None])[:, 0]
                assert (chosen >= logits.amax(1) - 0.02 * logits.abs().amax(1)).all()


def test_smoothing_keeps_the_float_function_and_flattens_activations(tmp_path):
    # SmoothQuant's factors are folded into norms, `up` rows and `v` rows: the float model must compute the same
    # logits (grouped-query attention included: TINY has 4 query heads over 2 key/value heads)
    from slmkit.edge.smoothquant import activation_stats, smooth, untie_head
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of

    model = load_model(tiny_llama_folder(tmp_path / "fp32", seed=5))
    with torch.no_grad():  # an outlier channel, as trained models have: the case smoothing is for
        model.layers[0].attn_norm[3] = 40.0
    ids = torch.tensor([[1, 7, 30, 99, 12, 64, 5, 200]])
    ref = logits_of(model, ids)
    untie_head(model)  # TINY ties its head: untied, the head is smoothed too (through the final norm)
    assert model.lm_head is not None and torch.allclose(logits_of(model, ids), ref)
    before, sample = activation_stats(model, ids.tolist())
    chosen = smooth(model, before, sample)  # each product picks its alpha
    assert set(chosen.values()) <= set(ALPHAS) and len(chosen) == 4 * 2 + 1 and "lm_head" in chosen
    assert torch.allclose(logits_of(model, ids), ref, atol=1e-4, rtol=1e-4)
    after, _ = activation_stats(model, ids.tolist())
    spread = {k: (v.max() / v.median()).item() for k, v in before.items()}
    assert after["layers.0.wqkv"].max() / after["layers.0.wqkv"].median() < spread["layers.0.wqkv"] / 3


@needs_engine
def test_w8a8_rows_do_not_depend_on_their_batch():
    # fixed input quantization after each row's own scaling: a row alone, in a batch and in a multi-token pass
    # gives bit-identical outputs (the decode step and the speculative verify pass agree)
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    layer = W8A8Linear(*quantize_rows(w))
    x = torch.randn(5, 32) * torch.tensor([1.0, 100.0, 0.01, 3.0, 0.0])[:, None]  # rows of very different sizes
    together = layer(x)
    for i in range(5):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])
    assert together[4].abs().max() == 0  # an all-zero row stays zero
    for i in range(5):  # the decode step's one-vector path: the same product (up to a value rounded the other way
        # on a boundary), with the scale and the residual on top
        r, one = torch.randn(48), layer.matvec(x[i])
        assert (one - together[i]).norm() <= 0.01 * together[i].norm()
        assert torch.allclose(layer.matvec(x[i], 0.5, r), r + 0.5 * one, rtol=1e-5, atol=1e-5)
    rel = (together[:4] - x[:4] @ w.t()).norm(dim=1) / (x[:4] @ w.t()).norm(dim=1)
    assert rel.max() < 0.03  # 8-bit weights and activations: ~1% error on random data


@needs_engine
def test_w8a8_folder_is_int8_smoothed_and_close_to_float(tmp_path):
    from slmkit.infer.generate import load
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of, read_config

    src = tiny_llama_folder(tmp_path / "fp32", seed=3)
    text = tmp_path / "cal.txt"
    text.write_text("the cat sat on the mat. hello there, how are you? " * 40)
    out = quantize(src, tmp_path / "w8a8", method="w8a8", calibrate=text, calibration_tokens=256)
    quant = read_config(out)["slmkit_quantization"]
    assert quant["method"] == "w8a8" and quant["smoothquant"]["calibration"] == str(text)
    assert quant["smoothquant"]["calibration_tokens"] == 256
    model = load_model(out)
    assert isinstance(model.layers[0].wqkv, W8A8Linear) and isinstance(model.lm_head, W8A8Linear)
    ids = torch.tensor([[0, 5, 17, 99, 200, 33]])
    ref = logits_of(load_model(src), ids)
    assert (logits_of(model, ids) - ref).abs().max() < 0.05 * ref.abs().max()
    self_sampled = quantize(src, tmp_path / "self", method="w8a8", calibration_tokens=64)
    assert read_config(self_sampled)["slmkit_quantization"]["smoothquant"]["calibration"] == "the model's own samples"
    assert (logits_of(load_model(self_sampled), ids) - ref).abs().max() < 0.05 * ref.abs().max()
    assert len(load(self_sampled).generate("the cat", max_new_tokens=8, temperature=0)) > 0


def test_w8a8_folder_runs_as_int8_without_the_engine(tmp_path, monkeypatch):
    # a build without fbgemm/x86 (ARM) still loads the folder: the same int8 weights, float activations
    import slmkit.model.int8 as int8
    from slmkit.infer.load import load_model

    out = quantize(tiny_llama_folder(tmp_path / "fp32", seed=3), tmp_path / "w8a8", method="w8a8",
                   calibration_tokens=64)
    monkeypatch.setattr(int8, "int8_matmul_engine", lambda: None)
    assert isinstance(load_model(out).layers[0].wqkv, Int8Linear)


def test_w8a8_options_are_checked_in_one_line(tmp_path):
    src = tiny_llama_folder(tmp_path / "fp32", seed=3)
    with pytest.raises(SystemExit, match="apply to --method w8a8 only"):
        quantize(src, tmp_path / "a", calibrate=tmp_path / "x.txt")
    with pytest.raises(SystemExit, match="--calibrate .*no such file"):
        quantize(src, tmp_path / "b", method="w8a8", calibrate=tmp_path / "missing.txt")
    with pytest.raises(SystemExit, match="--alpha 1.5"):
        quantize(src, tmp_path / "c", method="w8a8", alpha=1.5)
    with pytest.raises(SystemExit, match="--calibration-tokens 0 must be positive"):
        quantize(src, tmp_path / "c", method="w8a8", calibration_tokens=0)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(SystemExit, match="tokens of text"):
        quantize(src, tmp_path / "d", method="w8a8", calibrate=tmp_path / "tiny.txt")
    assert not any((tmp_path / n).exists() for n in "abcd")


@needs_engine
def test_the_alpha_search_scores_what_w8a8linear_computes():
    # smoothquant.w8a8_error emulates W8A8Linear in float (no engine needed to pick factors): the same error
    from slmkit.edge.smoothquant import w8a8_error
    from slmkit.hardware import cpu_has_vnni

    torch.manual_seed(1)
    w, x = torch.randn(64, 48), torch.randn(40, 48) * torch.linspace(0.1, 10, 48)  # uneven channels
    ref = x @ w.t()
    real = float((W8A8Linear(*quantize_rows(w))(x) - ref).norm() / ref.norm())
    levels = 127 if cpu_has_vnni() else 63  # 7-bit activations on CPUs without VNNI, as W8A8Linear uses there
    assert abs(w8a8_error(x, w, levels) - real) < 0.05 * real


def test_verbs_that_need_float_weights_refuse_a_quantized_folder_in_one_line(tmp_path):
    # export, finetune, distill and federate read float weights: an int8 folder was a traceback, a NaN export or
    # a misleading "weights of another model" error
    from slmkit.distill.run import main as distill
    from slmkit.edge.export import main as export
    from slmkit.training.finetune import main as finetune

    src = tiny_llama_folder(tmp_path / "fp32", seed=3)
    q = quantize(src, tmp_path / "q", method="int8")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    with pytest.raises(SystemExit, match=r"`slm quantize` folder \(int8\), for inference only; export the float "
                       r"folder"):
        export(q, tmp_path / "m.gguf")
    for run in (lambda: finetune(q, data=[text], out=tmp_path / "ft", steps=1),
                lambda: distill(teacher=q, student="slm-131k", data=[text], out=tmp_path / "d", steps=1)):
        with pytest.raises(SystemExit, match=r"`slm quantize` folder \(int8\), for inference only"):
            run()
    assert not any((tmp_path / n).exists() for n in ("m.gguf", "ft", "d"))
