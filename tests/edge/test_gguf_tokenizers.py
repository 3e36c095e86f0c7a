"""GGUF export of tokenizers that are not slmkit's own: the llama.cpp pre-tokenizer name comes from tokenizer.json
(or from the GGUF a folder was imported from), and llama.cpp must then tokenize exactly as the folder does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_llama_folder

from slmkit.edge.export import main as export
from slmkit.edge.gguf_vocab import FAMILIES, LLAMA3_REGEX, family_of, pre_name

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# digits in runs, contractions in both cases, punctuation before words, newlines: where the split rules differ
TRAIN = ("In 1859 Dickens wrote 45 chapters, 12.5% of 3,000 words; in 2024 there were 123456 more. "
         "I DON'T know, you don't. WON'T they? (hello) \"quoted\" text.\n\nNew line  two spaces. ") * 40
SAMPLE = "Call 5551234 or 1859! DON'T stop; (hello) world.\n\n  She said 3,000 times 42.\n"


def family_tokenizer(family: str, train_family: str | None = None):
    """A ~400-token byte-level BPE with FAMILY's pre-tokenizer (SmolLM2's, Llama 3's ...), trained with
    TRAIN_FAMILY's split (default: the same), wrapped as transformers wraps a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def pre_of(f: str):
        steps = FAMILIES[f][1]
        spec = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
        holder = json.loads(Tokenizer(models.BPE()).to_str())
        return Tokenizer.from_str(json.dumps({**holder, "pre_tokenizer": spec})).pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_of(train_family or family)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN], trainer)
    tok.pre_tokenizer = pre_of(family)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def _field(path: Path, key: str):
    from gguf import GGUFReader

    f = GGUFReader(path).fields[key]
    return bytes(f.parts[f.data[0]]).decode()


def _llama_cpp_tokens(path: Path, text: str) -> list[int]:
    from slmkit.edge.export_gguf import open_llama_cpp

    return open_llama_cpp(path, 256, threads=1).tokenize(text.encode(), add_bos=False, special=False)


def test_tokenizers_own_json_is_recognised_per_family():
    for family in FAMILIES:
        spec = json.loads(family_tokenizer(family).backend_tokenizer.to_str())
        assert family_of(spec["pre_tokenizer"]) == family
    spec = json.loads(family_tokenizer("gpt2").backend_tokenizer.to_str())
    assert pre_name(spec, None, "x") == "gpt-2"
    smol = json.loads(family_tokenizer("digits+gpt2").backend_tokenizer.to_str())
    assert pre_name(smol, "starcoder", "x") == "starcoder"  # a recorded name with the same rules is kept
    assert pre_name(smol, "gpt-2", "x") == "smollm"  # one with other rules is not


def test_an_unknown_split_is_refused_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    tok = family_tokenizer("gpt2")
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.json: its pre-tokenizer \(Split\+ByteLevel\) matches "
                                         r"none of llama.cpp's .*; export with --format onnx"):
        pre_name(spec, None, f"{tmp_path}/tokenizer.json")


@pytest.mark.parametrize("family, name", [("digits+gpt2", "smollm"), ("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_gguf_writes_the_pre_tokenizer_llama_cpp_needs(family, name, tmp_path):
    pytest.importorskip("llama_cpp")
    # trained with GPT-2's split (merges across digits), used with FAMILY's: only the right name tokenizes alike
    model = tiny_llama_folder(tmp_path / "m", seed=3, tokenizer=family_tokenizer(family, train_family="gpt2"))
    out = tmp_path / "m.gguf"
    result = export(model, out, format="gguf", quant="f32", verify_text=_text(tmp_path))  # checks tokenization
    assert result["verified"] and result["top1_agreement"] == 1.0
    assert _field(out, "tokenizer.ggml.pre") == name
    from slmkit.model.tokenizer import load_tokenizer

    assert _llama_cpp_tokens(out, SAMPLE) == load_tokenizer(model)(SAMPLE)["input_ids"]


def test_the_gpt2_name_on_a_smollm_tokenizer_fails_the_check(tmp_path, monkeypatch):
    """What the exporter used to write for every tokenizer: the check catches it and nothing is left behind."""
    pytest.importorskip("llama_cpp")
    import slmkit.edge.export_gguf as eg

    model = tiny_llama_folder(tmp_path / "m", seed=3, tokenizer=family_tokenizer("digits+gpt2", train_family="gpt2"))
    monkeypatch.setattr(eg, "pre_name", lambda spec, recorded, where: "gpt-2")
    with pytest.raises(SystemExit, match="llama.cpp tokenizes the probe text differently"):
        export(model, tmp_path / "m.gguf", format="gguf", quant="f32", verify_text=_text(tmp_path))
    assert not (tmp_path / "m.gguf").exists()


def test_a_folder_imported_from_gguf_keeps_its_pre_tokenizer_through_export(tmp_path, capsys):
    """GGUF (smollm) -> slm import -> folder that splits digits as llama.cpp does -> slm export -> smollm again, and
    llama.cpp's greedy tokens are the folder's."""
    pytest.importorskip("llama_cpp")
    from slmkit.edge.import_model import main as import_model
    from slmkit.infer.generate import SamplingParams, generate_ids, load

    model = tiny_llama_folder(tmp_path / "m", seed=5, tokenizer=family_tokenizer("digits+gpt2", train_family="gpt2"))
    export(model, tmp_path / "src.gguf", format="gguf", quant="f32")
    imported = import_model(tmp_path / "src.gguf", tmp_path / "imported")
    assert json.loads((imported / "tokenizer_config.json").read_text())["gguf_pre"] == "smollm"
    assert family_of(json.loads((imported / "tokenizer.json").read_text())["pre_tokenizer"]) == "digits+gpt2"
    assert json.loads((imported / "slmkit_import.json").read_text())["gguf_pre_tokenizer"] == "smollm"
    (tmp_path / "again").mkdir()
    out = tmp_path / "again" / "m.gguf"
    assert export(imported, out, format="gguf", quant="f32", verify_text=_text(tmp_path))["verified"]
    assert _field(out, "tokenizer.ggml.pre") == "smollm"
    lm = load(imported)
    prompt = lm.encode(SAMPLE)
    ours = list(generate_ids(lm.model, prompt, SamplingParams(max_new_tokens=16, temperature=0), set(), 256))
    from slmkit.edge.export_gguf import open_llama_cpp

    llm = open_llama_cpp(out, 256, threads=1)
    llm.eval(prompt)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "probe.txt"
    path.write_text(SAMPLE * 3)
    return path


def test_llama3_regex_is_the_spelling_tokenizers_writes():
    spec = json.loads(family_tokenizer("llama3").backend_tokenizer.to_str())
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": LLAMA3_REGEX}
