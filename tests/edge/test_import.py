import json

import pytest
import torch
from tiny_models import TINY, bpe_tokenizer, one_thread, tiny_llama_folder, write_llama_gguf  # noqa: F401 (fixture)

from slmkit.edge.import_model import auto_class_for
from slmkit.edge.import_model import main as import_model
from slmkit.model.tokenizer import CHATML_TEMPLATE

pytest.importorskip("gguf")


def _hf_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_auto_class_dispatch_on_config():
    assert auto_class_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "AutoModelForCausalLM"
    assert auto_class_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}) == "AutoModelForCausalLM"
    assert auto_class_for({"model_type": "bert", "architectures": ["BertForMaskedLM"]}) == "AutoModelForMaskedLM"
    assert auto_class_for({"model_type": "bert", "architectures": ["BertModel"]}) == "AutoModel"
    assert auto_class_for({"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"]}) \
        == "AutoModelForSequenceClassification"


def test_gguf_import_matches_the_original_weights_and_tokenizer(tmp_path):
    """A float32 GGUF written as llama.cpp writes it (q/k permuted, BPE vocab + merges + chat template in the
    metadata) imports as a model folder with the original logits, tokenizer and template."""
    from slmkit.infer.generate import load
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of
    from slmkit.model.llama import Llama
    from slmkit.model.tokenizer import load_tokenizer

    tok = bpe_tokenizer()
    model = _hf_llama(tok)
    gguf_path = write_llama_gguf(tmp_path / "tiny.gguf", model, tok, chat_template=CHATML_TEMPLATE)
    out = import_model(gguf_path, tmp_path / "imported")

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "slmkit_import.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "slmkit_import.json").read_text())
    assert record["format"] == "gguf" and record["model_type"] == "llama"
    ours = load_model(out)
    assert isinstance(ours, Llama)  # plain Llama: runs on slmkit's fast module
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours, ids), model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    imported_tok = load_tokenizer(out)
    text = "the cat sat on the log, hello there"
    assert imported_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert imported_tok.chat_template == CHATML_TEMPLATE
    assert load(out).generate("the cat", max_new_tokens=4, temperature=0) is not None  # slm generate opens it


def test_hf_folder_import_adds_chatml_when_the_tokenizer_has_no_template(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from slmkit.infer.generate import load

    tok = bpe_tokenizer(chat_template=False)
    src = tmp_path / "gpt2"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    gpt2.save_pretrained(src)
    tok.save_pretrained(src)
    out = import_model(src, tmp_path / "imported")
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
    lm = load(out)
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE
    assert isinstance(lm.generate("the", max_new_tokens=3, temperature=0), str)


def test_encoder_folders_are_copied_through_with_their_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = bpe_tokenizer(chat_template=False)
    src = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             num_labels=3)).save_pretrained(src)
    tok.save_pretrained(src)
    out = import_model(src, tmp_path / "imported")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and len(cfg["id2label"]) == 3
    assert json.loads((out / "slmkit_import.json").read_text())["auto_class"] == "AutoModelForSequenceClassification"
    assert not json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")


def test_bad_sources_fail_with_one_line_and_write_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is not a model folder"):
        import_model(tmp_path / "empty", tmp_path / "o1")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match="neither a GGUF file nor a model folder"):
        import_model(tmp_path / "notes.txt", tmp_path / "o2")
    tok = bpe_tokenizer()
    odd = write_llama_gguf(tmp_path / "odd.gguf", _hf_llama(tok), tok, architecture="rwkv6")
    with pytest.raises(SystemExit, match="architecture 'rwkv6', which cannot be imported"):
        import_model(odd, tmp_path / "o3")
    with pytest.raises(SystemExit, match="does not exist"):
        import_model(tmp_path / "missing.gguf", tmp_path / "o4")
    taken = tiny_llama_folder(tmp_path / "taken")
    with pytest.raises(SystemExit, match="is \\(or holds\\) the input"):
        import_model(taken, taken)
    tiny_llama_folder(tmp_path / "taken-too")
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        import_model(taken, tmp_path / "taken-too")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
