"""slm export: GGUF (round trip, llama.cpp parity), ONNX (onnxruntime parity), HF, and the bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_encoders import tiny_base_folder, wordpiece
from tiny_models import TINY, bpe_tokenizer, tiny_llama_folder

from slmkit.edge.export import main as export


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("bpe") / "model", seed=1)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    from slmkit.model.tokenizer import byte_tokenizer

    return tiny_llama_folder(tmp_path_factory.mktemp("byte") / "model", seed=2, tokenizer=byte_tokenizer())


def _field(reader, key: str):
    f = reader.fields[key]
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype == np.uint8 else v[0].item()
    return [bytes(f.parts[i]).decode() for i in f.data]


def test_gguf_round_trip_names_shapes_and_metadata(bpe_model, tmp_path):
    from gguf import GGUFReader

    from slmkit.model.tokenizer import load_tokenizer

    out = tmp_path / "m.gguf"
    export(bpe_model, out, format="gguf", quant="f32", verify=False)
    r = GGUFReader(out)
    tok = load_tokenizer(bpe_model)
    tensors = {t.name: t for t in r.tensors}
    assert tensors["token_embd.weight"].shape.tolist() == [32, len(tok)]  # ggml lists ne[0] (row size) first
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [32, 16]  # 2 kv heads of 8
    assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [64, 32]
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 9 * TINY["num_hidden_layers"]
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.ggml.tokens")[tok.eos_token_id] == "<|endoftext|>"
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")
    assert _field(r, "llama.attention.head_count_kv") == 2
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf")


def test_q_and_k_are_permuted_for_llama_cpp(bpe_model, tmp_path):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from slmkit.edge.export_gguf import _permute

    out = tmp_path / "m.gguf"
    export(bpe_model, out, format="gguf", quant="f32", verify=False)
    q = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    hf = load_file(bpe_model / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(q.data).reshape(hf.shape), _permute(hf, 4))


def test_rows_that_do_not_fit_a_block_fall_back_to_f16_with_a_message(tmp_path, capsys):
    from gguf import GGUFReader

    from slmkit.edge.export_gguf import tensor_type

    assert tensor_type("blk.0.ffn_down.weight", (32, 40), "q4_0")[0] == "f16"
    assert tensor_type("blk.0.attn_norm.weight", (32,), "q8_0") == ("f32", None)
    # under q4_0 the output head (the tied embedding here) stays q8_0, as llama.cpp's quantizer keeps it
    assert tensor_type("token_embd.weight", (320, 32), "q4_0", head="token_embd.weight") == ("q8_0", None)
    assert tensor_type("token_embd.weight", (320, 32), "q4_0", head="output.weight") == ("q4_0", None)
    from slmkit.model.folder import save_model
    from slmkit.model.llama import Llama

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    save_model(Llama({**TINY, "intermediate_size": 40, "vocab_size": len(tok)}), tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", format="gguf", quant="q8_0", verify=False)
    assert "row size 40 is not a multiple of 32, stored as f16" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def _greedy_llama_cpp(path: Path, prompt_ids: list[int], n: int) -> list[int]:
    from slmkit.edge.export_gguf import open_llama_cpp

    llm = open_llama_cpp(path, 256, threads=1)
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@pytest.mark.parametrize("which", ["bpe_model", "byte_model"])
def test_gguf_greedy_matches_llama_cpp(which, request, tmp_path):
    pytest.importorskip("llama_cpp")
    from slmkit.infer.generate import SamplingParams, generate_ids, load

    model_dir = request.getfixturevalue(which)
    out = tmp_path / "m.gguf"
    result = export(model_dir, out, format="gguf", quant="f32")  # includes the tokenization + logit check
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-3
    lm = load(model_dir)
    prompt = lm.encode("the cat sat on the mat, café")
    ours = list(generate_ids(lm.model, prompt, SamplingParams(max_new_tokens=24, temperature=0), set(), 256))
    assert _greedy_llama_cpp(out, prompt, 24) == ours


@pytest.mark.parametrize("quant,bound", [("f16", 0.002), ("q8_0", 0.01), ("q4_0", 0.05)])
def test_quantized_gguf_loads_and_stays_within_its_perplexity_bound(quant, bound, tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    result = export(tiny_model, tmp_path / f"m-{quant}.gguf", format="gguf", quant=quant)
    assert abs(result["perplexity_rise"]) <= bound
    (tmp_path / "f32").mkdir()  # its own folder: each export writes a Modelfile beside its GGUF
    f32 = export(tiny_model, tmp_path / "f32" / "m.gguf", format="gguf", quant="f32", verify=False)
    assert result["bytes"] < f32["bytes"]


def test_a_gguf_that_fails_parity_is_an_error_naming_the_position(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    import slmkit.edge.export_gguf as eg

    monkeypatch.setattr(eg, "_permute", lambda w, n_head: w)  # what a naive exporter writes: no q/k permutation
    with pytest.raises(SystemExit, match=r"first diverging position \d+.*logit error"):
        export(tiny_model, tmp_path / "bad.gguf", format="gguf", quant="f32")
    assert not (tmp_path / "bad.gguf").exists()


def test_onnx_decoder_with_past_matches_torch_within_1e_4(bpe_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from slmkit.edge.runtimes import empty_past, onnx_session
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.folder import logits_of

    out = tmp_path / "onnx"
    result = export(bpe_model, out, format="onnx")
    assert result["max_abs_logit_diff"] < 1e-4
    ids = torch.tensor([[0, 5, 17, 99, 200, 33, 7, 150]])
    expected = logits_of(load_model(bpe_model), ids)[0].detach().numpy()
    sess, past = onnx_session(out / "model.onnx", 1), empty_past(read_config(bpe_model))
    logits, k, v = sess.run(None, {"input_ids": ids[:, :5].numpy(), "past_keys": past, "past_values": past})
    step = sess.run(None, {"input_ids": ids[:, 5:].numpy(), "past_keys": k, "past_values": v})[0]
    got = np.concatenate([logits[0], step[0]])
    assert np.abs(got - expected).max() < 1e-4


def test_onnx_int8_is_smaller_and_agrees(bpe_model, tmp_path):
    pytest.importorskip("onnxruntime")
    fp32 = export(bpe_model, tmp_path / "fp32", format="onnx")
    int8 = export(bpe_model, tmp_path / "int8", format="onnx", quant="int8")
    assert int8["bytes"] < fp32["bytes"] and int8["top1_agreement"] >= 0.9


def test_encoder_exports_to_onnx_as_an_embedding_graph_but_not_to_gguf(tmp_path):
    pytest.importorskip("onnxruntime")
    enc = tiny_base_folder(tmp_path / "enc", wordpiece())
    with pytest.raises(SystemExit, match="bert.*use --format onnx"):
        export(enc, tmp_path / "enc.gguf", format="gguf")
    result = export(enc, tmp_path / "enc-onnx", format="onnx")
    assert result["max_abs_logit_diff"] < 1e-4
    assert '"embedding"' in (tmp_path / "enc-onnx" / "slmkit_onnx.json").read_text()


def test_hf_export_opens_in_transformers_with_the_same_logits(bpe_model, tmp_path):
    result = export(bpe_model, tmp_path / "hf", format="hf")
    assert result["max_abs_logit_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="gguf", quant="q3_k"), "unknown --quant 'q3_k'"),
    (dict(format="onnx", quant="q4_0"), "unknown --quant 'q4_0' for onnx"),
    (dict(format="hf", quant="int8"), "does not apply to --format hf"),
])
def test_bad_quant_types_are_one_line_errors(bpe_model, tmp_path, kwargs, message):
    with pytest.raises(SystemExit, match=message):
        export(bpe_model, tmp_path / "x", **kwargs)


@pytest.mark.parametrize("rise", [-1.0, float("nan")])
def test_a_negative_perplexity_bound_is_refused(rise, tmp_path):
    """--max-ppl-rise -1 made every export fail parity with a message about a -100% bound."""
    with pytest.raises(SystemExit, match="^error: --max-ppl-rise .* must be 0 or more"):
        export(tmp_path / "no-model", tmp_path / "m.gguf", max_ppl_rise=rise)


def test_a_missing_output_directory_is_an_error(bpe_model, tmp_path):
    with pytest.raises(SystemExit, match="does not exist; create it first"):
        export(bpe_model, tmp_path / "no" / "such" / "m.gguf", format="gguf")


def test_cli_help_documents_every_option():
    from slmkit.__main__ import main

    for verb in ("export", "quantize", "bench"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0


def test_an_onnx_embedding_graph_pools_as_slm_embed_does(tmp_path):
    """A folder declaring CLS pooling without normalisation: the ONNX graph gives `slm embed`'s vectors."""
    import json

    ort = pytest.importorskip("onnxruntime")
    from slmkit.infer.embed import embed
    from slmkit.model.tokenizer import load_tokenizer

    texts = ["the cat sat on the mat", "a dog"]
    enc = tiny_base_folder(tmp_path / "enc", wordpiece(extra=texts * 5))
    (enc / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (enc / "1_Pooling").mkdir()
    (enc / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    export(enc, tmp_path / "onnx", format="onnx")
    tok = load_tokenizer(enc)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    for text, want in zip(texts, embed(enc, texts), strict=True):
        batch = tok([text], return_tensors="np")
        got = session.run(None, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0][0]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert abs(np.linalg.norm(want) - 1.0) > 1e-3  # CLS, not normalised: the mean-pooled graph would differ
