"""Named model configurations as plain data: Llama-style decoders, GPT-Neo, and the BERT family of encoders.

Decoder presets are Llama-architecture models (RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings).
Every width is a multiple of 32 so that GGUF block quantization (32-element blocks) applies to every matrix later.
`params` is the exact parameter count at the preset's default `vocab_size`; `tests/model/test_presets.py` checks it.
The vocabulary is normally replaced by the size of the tokenizer trained on the user's corpus.
"""

from __future__ import annotations

import json
import math

DECODERS: dict[str, dict] = {
    # A toy for tests and smoke runs: trains in seconds.
    "slm-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=192, vocab_size=512, params=131_392),
    "slm-1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=352, vocab_size=2048, params=1_000_576),
    "slm-3m": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=512, vocab_size=4096, params=3_148_224),
    "slm-7m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=704, vocab_size=8192, params=6_524_160),
    "slm-15m": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=1024, vocab_size=8192, params=15_735_168),
    "slm-30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=1376, vocab_size=16384, params=31_597_056),
    "slm-65m": dict(hidden_size=640, num_hidden_layers=10, num_attention_heads=10, num_key_value_heads=5,
                    intermediate_size=1728, vocab_size=32000, params=65_959_040),
    "slm-125m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                     intermediate_size=2048, vocab_size=32000, params=125_264_640),
}

# GPT-Neo 125M exactly as published (EleutherAI/gpt-neo-125m config.json): alternating global/local attention,
# learned absolute positions, GELU MLP, LM head tied to the token embedding.
GPT_NEO_125M: dict = dict(
    model_type="gpt_neo", vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
    num_heads=12, attention_types=[[["global", "local"], 6]], intermediate_size=None, window_size=256,
    activation_function="gelu_new", resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
    layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=50256, eos_token_id=50256,
    tie_word_embeddings=True, params=125_198_592,
)

# Fields every decoder preset shares (transformers LlamaConfig names).
LLAMA_DEFAULTS: dict = dict(
    model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
    tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
)

# Encoders exactly as published, built as transformers models (BertForMaskedLM, DistilBertForMaskedLM,
# MobileBertForMaskedLM). `params` counts the base model without task heads (BertModel with its pooler), the
# figure the papers and model cards report; training adds the masked-LM head (tied to the token embedding).
ENCODER_TYPES = ("bert", "distilbert", "mobilebert")
_BERT = dict(model_type="bert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
             initializer_range=0.02, pad_token_id=0)
ENCODERS: dict[str, dict] = {
    # Turc et al. 2019, "Well-Read Students Learn Better" (google-research/bert, the 24 compact BERTs)
    "bert-tiny": dict(_BERT, num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                      params=4_385_920),
    "bert-mini": dict(_BERT, num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                      params=11_170_560),
    "bert-small": dict(_BERT, num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                       params=28_763_648),
    "bert-medium": dict(_BERT, num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                        params=41_373_184),
    # Devlin et al. 2018 (google-bert/bert-base-uncased config.json)
    "bert-base": dict(_BERT, num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                      params=109_482_240),
    # Sanh et al. 2019 (distilbert/distilbert-base-uncased config.json); DistilBertConfig maps hidden_size -> dim,
    # num_hidden_layers -> n_layers, num_attention_heads -> n_heads
    "distilbert": dict(model_type="distilbert", vocab_size=30522, max_position_embeddings=512, hidden_size=768,
                       num_hidden_layers=6, num_attention_heads=12, hidden_dim=3072, activation="gelu", dropout=0.1,
                       attention_dropout=0.1, sinusoidal_pos_embds=False, initializer_range=0.02, pad_token_id=0,
                       params=66_362_880),
    # Sun et al. 2020 (google/mobilebert-uncased config.json): 24 thin layers with 128-wide bottlenecks, 4 stacked
    # feed-forward networks per layer, NoNorm, trigram input embedding
    "mobilebert": dict(model_type="mobilebert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                       hidden_size=512, embedding_size=128, num_hidden_layers=24, num_attention_heads=4,
                       intermediate_size=512, intra_bottleneck_size=128, true_hidden_size=128, use_bottleneck=True,
                       use_bottleneck_attention=False, key_query_shared_bottleneck=True, num_feedforward_networks=4,
                       normalization_type="no_norm", trigram_input=True, hidden_act="relu", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02,
                       pad_token_id=0, params=24_844_544),
}

PRESETS: dict[str, dict] = {**DECODERS, "gpt-neo-125m": GPT_NEO_125M, **ENCODERS}


def is_encoder(cfg_or_preset: dict | str) -> bool:
    """True for BERT-family configs (a config dict or a preset name): trained with masked-LM, not next-token."""
    cfg = PRESETS.get(cfg_or_preset, {}) if isinstance(cfg_or_preset, str) else cfg_or_preset
    return cfg.get("model_type") in ENCODER_TYPES


def get_preset(name: str) -> dict:
    """Return a copy of preset NAME, or exit with the list of known names."""
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (or 'auto')")
    cfg = dict(PRESETS[name])
    cfg.pop("params", None)
    if cfg.get("model_type", "llama") == "llama":
        cfg = {**LLAMA_DEFAULTS, **cfg}
    return cfg


def llama_params(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                 intermediate_size: int, vocab_size: int, tie_word_embeddings: bool = True, head_dim: int | None = None,
                 **_: object) -> int:
    """Exact parameter count of a bias-free Llama decoder (used by `--preset auto` before building anything)."""
    hd = head_dim or hidden_size // num_attention_heads
    attn = hidden_size * hd * (2 * num_attention_heads + 2 * num_key_value_heads)  # q, o + k, v
    mlp = 3 * hidden_size * intermediate_size  # gate, up, down
    per_layer = attn + mlp + 2 * hidden_size  # + two RMSNorm weights
    emb = vocab_size * hidden_size * (1 if tie_word_embeddings else 2)
    return emb + num_hidden_layers * per_layer + hidden_size  # + final norm


def build_config(preset: str, vocab_size: int, overrides: dict | None = None, block_size: int | None = None) -> dict:
    """Preset + tokenizer vocabulary + command-line overrides -> a transformers-style config dict."""
    cfg = get_preset(preset)
    cfg["vocab_size"] = vocab_size
    kind = cfg.get("model_type", "llama")
    if block_size and kind == "llama":
        cfg["max_position_embeddings"] = block_size  # the context it is trained for; --set can raise it
    known = _KNOWN_FIELDS.get(kind, {})
    for key, value in (overrides or {}).items():
        if key not in cfg and key not in known:
            raise SystemExit(f"error: unknown config field {key!r} for preset {preset!r}; "
                             f"known fields: {', '.join(sorted(set(cfg) | set(known)))}")
        cfg[key] = check_override(key, value, cfg.get(key, known.get(key)), kind)
    if kind == "gpt_neo" and "num_layers" in (overrides or {}) and "attention_types" not in overrides:
        n = cfg["num_layers"]  # GPT-Neo alternates global and local attention layers; keep that for any depth
        cfg["attention_types"] = [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])
    check_config(cfg)
    if kind != "llama" and overrides:
        check_transformers_config(cfg)
    return cfg


def check_transformers_config(cfg: dict) -> None:
    """Overridden GPT-Neo/BERT-family configs go to transformers as they are: let it check them now, as one line."""
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.activations import ACT2FN

    for key in ("hidden_act", "activation", "activation_function"):
        if isinstance(cfg.get(key), str) and cfg[key] not in ACT2FN:
            raise SystemExit(f"error: --set {key}={json.dumps(cfg[key])}: unknown activation; transformers knows "
                             f"{', '.join(sorted(ACT2FN))}")
    try:
        with torch.device("meta"):  # builds the module (where BERT checks its sizes) without allocating weights
            hf = dict(cfg)
            AutoModel.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    except Exception as e:  # transformers' checks raise TypeError, ValueError or huggingface_hub's own errors
        reason = " ".join(str(e).split())[:300]
        raise SystemExit(f"error: --set: transformers rejects this {cfg['model_type']} config: {reason}") from None


# Fields a preset may lack but a --set may give, with an example of their type.
_KNOWN_FIELDS = {"llama": {"head_dim": 1, "rope_theta": 1.0, "rms_norm_eps": 1.0, "max_position_embeddings": 1,
                           "tie_word_embeddings": True, "initializer_range": 1.0},
                 "gpt_neo": {"window_size": 1, "max_position_embeddings": 1},
                 "bert": {"classifier_dropout": 0.1, "position_embedding_type": "absolute"},
                 "distilbert": {"seq_classif_dropout": 0.1}, "mobilebert": {"classifier_dropout": 0.1}}
# What our Llama module computes: a config saying otherwise would open in transformers as a different model.
_LLAMA_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def check_override(key: str, value: object, example: object, kind: str) -> object:
    """A --set value, typed like the preset's own value (EXAMPLE), or a one-line error that names the field."""
    def bad(what: str) -> SystemExit:
        return SystemExit(f"error: --set {key}={json.dumps(value)}: {what}")

    if key == "vocab_size":
        raise bad("the vocabulary comes from the tokenizer; use --vocab-size (or --tokenizer-from DIR)")
    if key == "model_type":
        raise bad("the architecture comes from --preset")
    if kind == "llama" and key in _LLAMA_FIXED and value != _LLAMA_FIXED[key]:
        raise bad(f"slmkit's Llama computes {key}={json.dumps(_LLAMA_FIXED[key])} only")
    if isinstance(example, bool):
        if not isinstance(value, bool):
            raise bad("expected true or false")
    elif isinstance(example, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("expected a whole number")
        if value < (0 if key.endswith("_token_id") else 1):
            raise bad("expected a positive number")
    elif isinstance(example, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad("expected a number")
        if "dropout" in key or key.endswith("_prob"):
            if not 0.0 <= value < 1.0:
                raise bad("expected a probability from 0 up to 1")
        elif value <= 0.0:
            raise bad("expected a positive number")
        return float(value)
    elif isinstance(example, str) and not isinstance(value, str):
        raise bad("expected a string")
    return value


def check_config(cfg: dict) -> None:
    """Derived sizes must divide evenly; say which value is wrong."""
    if cfg.get("model_type", "llama") != "llama":
        return
    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if d % nh:
        raise SystemExit(f"error: hidden_size={d} is not divisible by num_attention_heads={nh}")
    if nh % nkv:
        raise SystemExit(f"error: num_attention_heads={nh} is not divisible by num_key_value_heads={nkv}")
    hd = cfg.get("head_dim") or d // nh
    if hd % 2:
        raise SystemExit(f"error: head size {hd} must be even for rotary embeddings")
