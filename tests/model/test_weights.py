"""Corrupt or mismatched inputs end as one line naming the file, never a traceback or a silently random model;
pickles are never unpickled; a fuzz over the loaders with truncated and bit-flipped files."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tiny_encoders import tiny_base_folder, wordpiece
from tiny_models import bpe_tokenizer, tiny_llama_folder, write_llama_gguf

from slmkit.__main__ import main as slm


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("weights") / "model", seed=4)


def copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "copy"))


def one_line(capsys, *argv) -> str:
    """`slm ARGV` in process must fail with one line on stderr that starts with 'error:'."""
    code = slm([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err and err[-1].startswith("error: "), (code, err)
    return err[-1]


def generate(folder: Path) -> tuple[str, ...]:
    return ("generate", folder, "--prompt", "the cat", "--max-new-tokens", "2", "--temperature", "0")


def test_config_of_another_architecture_over_llama_weights_is_refused(model, tmp_path, capsys):
    folder = copy(model, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                    "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "intermediate_size": 64}))
    err = one_line(capsys, *generate(folder))
    assert "model.safetensors does not hold the weights of a bert model" in err and "missing bert." in err
    err = one_line(capsys, "import", folder, "--out", tmp_path / "imported")
    assert "does not hold the weights" in err and not (tmp_path / "imported").exists()


def test_llama_config_that_does_not_match_its_weights_is_refused(model, tmp_path, capsys):
    folder = copy(model, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert "missing model.layers.2." in one_line(capsys, *generate(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    assert "other shapes for model.layers" in one_line(capsys, *generate(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    assert "cannot make a Llama model" in one_line(capsys, *generate(folder))


def test_truncated_weights_non_utf8_config_and_missing_tokenizer_are_one_line(model, tmp_path, capsys):
    folder = copy(model, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = one_line(capsys, *generate(folder))
    assert "model.safetensors: not a readable safetensors file" in err and "truncated or corrupt" in err
    assert "not a readable safetensors file" in one_line(capsys, "quantize", folder, "--out", tmp_path / "q")
    weights.write_bytes(data)
    config = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(b"\xff\xfe" + config)
    assert "config.json is not UTF-8 text" in one_line(capsys, *generate(folder))
    (folder / "config.json").write_bytes(config)
    (folder / "tokenizer.json").unlink()
    assert "cannot load the tokenizer" in one_line(capsys, *generate(folder))


def test_a_tokenizer_larger_than_the_model_is_refused(model, tmp_path, capsys):
    folder = copy(model, tmp_path)
    big = wordpiece(vocab_size=400, extra=["word"] * 3 + [f"token{i}" for i in range(400)])
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    big.save_pretrained(folder)
    assert len(big) > vocab_size
    err = one_line(capsys, *generate(folder))
    assert f"the tokenizer has {len(big)} tokens but config.json's vocab_size is {vocab_size}" in err


def test_pickled_weights_are_never_unpickled(model, tmp_path, capsys, monkeypatch):
    src = tmp_path / "pickled"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / f, src / f)
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")

    def forbidden(*a, **k):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", forbidden)
    err = one_line(capsys, "import", src, "--out", tmp_path / "out")
    assert "pytorch_model.bin is a PyTorch pickle; slmkit never unpickles" in err
    assert "is a PyTorch pickle" in one_line(capsys, *generate(src))


def test_a_gguf_with_a_wrong_tensor_count_is_one_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64))
    path = write_llama_gguf(tmp_path / "m.gguf", hf, tok)
    data = bytearray(path.read_bytes())
    count = struct.unpack_from("<Q", data, 8)[0]  # header: magic, version (u32), tensor count (u64), kv count
    struct.pack_into("<Q", data, 8, count + 3)
    path.write_bytes(bytes(data))
    err = one_line(capsys, "import", path, "--out", tmp_path / "out")
    assert str(path) in err and not (tmp_path / "out").exists()


def test_an_encoder_missing_weights_is_refused_not_random(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tiny_base_folder(tmp_path / "enc", wordpiece(extra=["a cat sat"] * 5))
    sd = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layer.1." not in k}, folder / "model.safetensors")
    (tmp_path / "t.txt").write_text("a cat sat\n")
    err = one_line(capsys, "embed", folder, "--data", tmp_path / "t.txt", "--out", tmp_path / "v.npy")
    assert "missing" in err and "layer.1." in err
    err = one_line(capsys, "export", folder, "--format", "onnx", "--out", tmp_path / "onnx")
    assert "missing" in err and "layer.1." in err and not (tmp_path / "onnx").exists()


# --- fuzz ---------------------------------------------------------------------------------------------------------

def mutations(data: bytes, rng: random.Random, n: int):
    """Truncations at a few points and single bit flips anywhere (header-heavy: the first 2 KB get half of them)."""
    for frac in (0.0, 0.01, 0.3, 0.9, 0.999):
        yield f"truncated at {frac:.0%}", data[: int(len(data) * frac)]
    for i in range(n):
        pos = rng.randrange(min(len(data), 2048)) if i % 2 == 0 else rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"bit flip at byte {pos}", bytes(flipped)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_fuzz_folder_loaders_fail_in_one_line_or_work(name, model, tmp_path, capsys):
    """Whatever happens to one file of a folder, `slm generate` either works or prints one error line."""
    folder = copy(model, tmp_path)
    original = (folder / name).read_bytes()
    rng = random.Random(name)
    outcomes = {"ok": 0, "refused": 0}
    for label, data in mutations(original, rng, 24):
        (folder / name).write_bytes(data)
        try:
            code = slm([str(a) for a in generate(folder)])
        except Exception as e:  # noqa: BLE001 - the point: nothing but SystemExit-turned-exit-codes may escape
            pytest.fail(f"{name} {label}: {type(e).__name__}: {e}")
        out = capsys.readouterr()
        if code == 0:
            outcomes["ok"] += 1
        else:
            lines = out.err.strip().splitlines()
            assert code == 1 and lines and lines[-1].startswith("error: "), f"{name} {label}: {out.err[-400:]}"
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 5  # the truncations at least are refused
    (folder / name).write_bytes(original)


def test_fuzz_gguf_import_fails_in_one_line_or_works(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64))
    original = write_llama_gguf(tmp_path / "m.gguf", hf, tok).read_bytes()
    rng = random.Random(7)
    for i, (label, data) in enumerate(mutations(original, rng, 16)):
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(data)
        try:
            code = slm(["import", str(path), "--out", str(tmp_path / f"out{i}")])
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 0 or (code == 1 and err[-1].startswith("error: ")), f"{label}: {err[-3:]}"
        assert code == 0 or not (tmp_path / f"out{i}").exists()
