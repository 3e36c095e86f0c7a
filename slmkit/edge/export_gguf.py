"""GGUF export (llama.cpp / Ollama) and its parity check against llama.cpp through llama-cpp-python.

    model folder (Llama, HF names)  --gguf.GGUFWriter-->  FILE.gguf (llama arch, tokenizer, chat template)
                                                           + Modelfile (Ollama) beside it

Tensor names follow llama.cpp's `llama` architecture; q/k rows are permuted the way convert_hf_to_gguf.py does
(llama.cpp's rotary embedding pairs adjacent dimensions, transformers' pairs the two halves). The tokenizer is
written as a `gpt2` (byte-level BPE) vocabulary whose `tokenizer.ggml.pre` names the split rules of the folder's
tokenizer.json (gguf_vocab.py: `gpt-2` for slmkit's own, `smollm` for SmolLM2's, ...). The check after writing runs
llama.cpp in a child process (runtimes.py) and compares its tokenization, logits and perplexity with our torch
model; a child killed by a signal leaves the file in place, marked unverified.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from slmkit.edge.gguf_vocab import pre_name, vocab_of
from slmkit.edge.runtimes import Crash, installed, llama_cpp_model, run_probe

__all__ = ["llama_cpp_model", "vocab_of"]  # re-exported: synth's GGUF teacher and older callers import them here

QUANTS = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 and q4_0 quantize rows in blocks of 32 values
# Relative perplexity rise the parity check accepts per quant type (the goals: int8 <= 1%, 4-bit <= 5%).
PPL_RISE = {"q8_0": 0.01, "q4_0": 0.05}
# Built-in probe text for the parity check: plain English with punctuation, digits, newlines and non-ASCII.
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times;\n"
              "in 1859 Dickens wrote 45 chapters — and “quotes”, café, naïve, 12.5% of 3,000 words!\n"
              "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n") * 3


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotary halves) -> llama.cpp's interleaved pairs, as convert_hf_to_gguf.py does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, np.ndarray]:
    """LlamaForCausalLM state dict -> llama.cpp tensor names (float32 numpy, q/k permuted)."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    f = {k: v.detach().float().cpu().numpy() for k, v in sd.items()}
    out = {"token_embd.weight": f["model.embed_tokens.weight"], "output_norm.weight": f["model.norm.weight"]}
    if "lm_head.weight" in f and not cfg.get("tie_word_embeddings", True):
        out["output.weight"] = f["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_q.weight"] = _permute(f[p + "self_attn.q_proj.weight"], nh)
        out[f"blk.{i}.attn_k.weight"] = _permute(f[p + "self_attn.k_proj.weight"], nkv)
        for g, h in names.items():
            out[f"blk.{i}.{g}.weight"] = f[p + h + ".weight"]
    return out


def tensor_type(name: str, shape: tuple[int, ...], quant: str, head: str = "output.weight") -> tuple[str, str | None]:
    """The GGML type a tensor is stored as under QUANT, and why it differs (None when it doesn't).

    1-D tensors (norms) stay f32 as llama.cpp keeps them. Block quant types need rows (the last numpy dim, ggml's
    ne[0]) that are a multiple of 32; other tensors fall back to f16 with a message. Under q4_0 the output head (HEAD:
    output.weight, or token_embd.weight when the embeddings are tied) stays q8_0, as llama.cpp's own quantizer keeps
    it wider: every logit goes through it (SmolLM2-135M's probe perplexity: +29% with it at q4_0, +20% at q8_0).
    """
    if len(shape) == 1:
        return "f32", None
    if quant in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return "f16", f"{name} {list(shape)}: row size {shape[-1]} is not a multiple of {BLOCK}, stored as f16"
    if quant == "q4_0" and name == head:
        return "q8_0", None
    return quant, None


def add_tokenizer(w, tokenizer, n_vocab: int, model_dir: Path) -> None:
    """The tokenizer as llama.cpp reads it: a gpt2 (byte-level BPE) vocabulary, the pre-tokenizer's name, special
    token ids, whether to add BOS, the chat template."""
    import gguf

    tokens, types, merges = vocab_of(tokenizer, n_vocab)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_name(spec, getattr(tokenizer, "init_kwargs", {}).get("gguf_pre"), f"{model_dir}/tokenizer.json")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)  # llama.cpp's name for the split rules of our tokenizer.json
    w.add_token_list(tokens)
    w.add_token_types(types)
    # llama.cpp requires merges, and the writer drops an empty list: the byte tokenizer (no merges) gets one merge of
    # two special tokens, which can never apply (BPE merges start from single characters of plain text).
    if not merges:
        special = next(t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL)
        merges = [f"{special} {special}"]
    w.add_token_merges(merges)
    bos = tokenizer.bos_token_id
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])  # our post-processor adds it
    w.add_add_eos_token(False)
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        w.add_eot_token_id(vocab["<|im_end|>"])  # ends a chat turn
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def write_gguf(model_dir: Path, out: Path, quant: str, name: str | None = None) -> list[str]:
    """Write MODEL_DIR as a GGUF file at OUT (the caller's temporary path). Returns the per-tensor fallback messages."""
    import gguf
    from gguf import quants
    from safetensors.torch import load_file

    from slmkit.infer.load import read_config
    from slmkit.model.block import rope_theta
    from slmkit.model.tokenizer import load_tokenizer

    cfg = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    sd = load_file(model_dir / "model.safetensors")
    tensors = gguf_tensors(sd, cfg)
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    w = gguf.GGUFWriter(str(out), "llama")
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_name(name or model_dir.resolve().name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(ftypes[quant])
    add_tokenizer(w, tokenizer, cfg["vocab_size"], model_dir)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied: the embedding is the head
    notes = []
    for tname, arr in tensors.items():
        kind, note = tensor_type(tname, arr.shape, quant, head)
        if note:
            notes.append(note)
        if kind == "f32":
            w.add_tensor(tname, arr.astype(np.float32))
        elif kind == "f16":
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            w.add_tensor(tname, quants.quantize(arr.astype(np.float32), qtypes[kind]),
                         raw_dtype=qtypes[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return notes


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile` (written atomically)."""
    from slmkit.files import atomic_write_bytes

    lines = [f"FROM ./{gguf_path.name}"]
    if "<|im_start|>" in tokenizer.get_vocab():  # ChatML, the template slmkit trains and imports with
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}', "{{ .Content }}<|im_end|>",
                  '{{ end }}<|im_start|>assistant', '"""', 'PARAMETER stop "<|im_end|>"']
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path = gguf_path.with_name("Modelfile")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


# ----------------------------------------------------------------------------------------------------------------
# Parity with llama.cpp


def open_llama_cpp(path: Path, n_ctx: int, threads: int | None = None):
    """A llama_cpp.Llama with every position's logits kept, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return llama_cpp_model(path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                           n_threads=threads or torch.get_num_threads(), n_batch=min(512, n_ctx))


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """(T, V) logits llama.cpp computes for IDS from position 0."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    x = torch.from_numpy(logits[:-1]).double()
    return math.exp(torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:])).item())


@torch.no_grad()
def verify_gguf(path: Path, model_dir: Path, quant: str, text: str | None = None,
                max_ppl_rise: float | None = None) -> dict:
    """Compare the GGUF in llama.cpp (run in a child process) with our torch model. Raises SystemExit on a mismatch;
    {"verified": False, "reason": ...} when llama.cpp is not installed or its process was killed by a signal.

    Tokenization must be identical. f32/f16: the top-1 token must agree at every position and the max |logit
    difference| stay under a tolerance. q8_0/q4_0: perplexity on the probe text may rise by at most MAX_PPL_RISE.
    """
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.folder import logits_of
    from slmkit.model.tokenizer import load_tokenizer

    cfg = read_config(model_dir)
    ctx = min(cfg["max_position_embeddings"], 512)  # every position's logits are kept: bound that buffer
    if not installed("llama.cpp"):
        print("note: llama-cpp-python is not installed, GGUF parity not checked: pip install 'slmkit[export]'")
        return {"verified": False, "reason": "llama-cpp-python is not installed"}
    tokenizer = load_tokenizer(model_dir)
    text = text or PROBE_TEXT
    ours = tokenizer(text)["input_ids"][:ctx]
    probe = run_probe("llama.cpp", {"path": str(path), "n_ctx": ctx, "text": text, "ids": ours,
                                    "threads": torch.get_num_threads()})
    if isinstance(probe, Crash):
        return {"verified": False, "reason": probe.reason}
    theirs = probe["tokens"].tolist()[:ctx]
    if ours != theirs:
        i = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        raise SystemExit(f"error: {path}: llama.cpp tokenizes the probe text differently from {model_dir}'s "
                         f"tokenizer at token {i} (ours {ours[i:i + 3]}, llama.cpp {theirs[i:i + 3]})")
    expected = logits_of(load_model(model_dir), torch.tensor([ours]))[0].numpy()  # (T, V)
    got = probe["logits"]  # (T, V)
    err = np.abs(got - expected).max(axis=-1)  # (T,)
    agree = got.argmax(-1) == expected.argmax(-1)
    ppl_ours, ppl_theirs = _ppl(expected, ours), _ppl(got, ours)
    result = {"verified": True, "tokens": len(ours), "top1_agreement": float(agree.mean()),
              "max_abs_logit_diff": float(err.max()), "perplexity_torch": ppl_ours, "perplexity_gguf": ppl_theirs,
              "perplexity_rise": ppl_theirs / ppl_ours - 1}
    _judge(path, quant, expected, got, result, max_ppl_rise)
    return result


def _judge(path: Path, quant: str, expected: np.ndarray, got: np.ndarray, result: dict,
           max_ppl_rise: float | None) -> None:
    """Raise the one-line parity error when llama.cpp's (T, V) logits GOT are too far from torch's EXPECTED."""
    err = np.abs(got - expected).max(axis=-1)  # (T,)
    agree = got.argmax(-1) == expected.argmax(-1)
    ppl_ours, ppl_theirs = result["perplexity_torch"], result["perplexity_gguf"]
    if quant in ("f32", "f16"):
        tol = 1e-3 if quant == "f32" else 5e-2
        tol *= max(1.0, float(np.abs(expected).max()))  # relative to the logit scale
        # a top-1 flip only counts where our own top two are not a near tie
        top2 = np.sort(expected, axis=-1)[:, -2:]
        flips = ~agree & (top2[:, 1] - top2[:, 0] > 2 * tol)
        bad = np.flatnonzero(flips | (err > tol))
        if len(bad):
            i = int(bad[0])
            raise SystemExit(f"error: {path} fails parity with llama.cpp: first diverging position {i} (top-1 ours "
                             f"{int(expected[i].argmax())}, llama.cpp {int(got[i].argmax())}), max |logit error| "
                             f"{err[i]:.3g} (tolerance {tol:.3g}); please report this model")
    else:
        bound = PPL_RISE[quant] if max_ppl_rise is None else max_ppl_rise
        if result["perplexity_rise"] > bound:
            i = int(np.flatnonzero(~agree)[0]) if (~agree).any() else 0
            raise SystemExit(f"error: {path} fails parity with llama.cpp: perplexity {ppl_theirs:.3f} vs torch "
                             f"{ppl_ours:.3f} (+{100 * result['perplexity_rise']:.2f}% > {100 * bound:.1f}%); first "
                             f"diverging top-1 at position {i}, max |logit error| {err.max():.3g}; use a wider quant "
                             "type (q8_0, f16) or pass --max-ppl-rise")
