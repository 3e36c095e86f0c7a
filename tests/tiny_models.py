"""Tiny model folders, chat data and GGUF files written on the fly for the finetune / import / merge tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"prompt": "What is 2+2?", "response": "4."},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."}]},
    {"prompt": "Say yes", "response": "Yes."},
]


def bpe_tokenizer(chat_template: bool = True):
    """A small byte-level BPE (slmkit's own trainer): real merges, the ChatML special tokens."""
    from slmkit.model.tokenizer import train_bpe

    text = ["the cat sat on the mat. the dog sat on the log. hello there, how are you? " * 20]
    tok = train_bpe(text, 300)
    if not chat_template:
        tok.chat_template = None
    return tok


def tiny_llama_folder(path: Path, seed: int = 0, tokenizer=None) -> Path:
    """A randomly initialised 2-layer Llama model folder (slmkit's module, saved in the HF layout)."""
    from slmkit.model.folder import save_model
    from slmkit.model.llama import Llama

    tok = tokenizer or bpe_tokenizer()
    torch.manual_seed(seed)
    model = Llama({**TINY, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id})
    save_model(model, path)
    tok.save_pretrained(path)
    return path


def write_chats(path: Path, rows: list | None = None, repeat: int = 8) -> Path:
    rows = rows if rows is not None else CHATS * repeat
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer, architecture: str = "llama", chat_template: str | None = None):
    """MODEL (transformers LlamaForCausalLM) + TOKENIZER (byte-level BPE) -> a float32 GGUF as llama.cpp writes it."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control (special), 1 = normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    if chat_template:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], nkv))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
