"""model.folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from slmkit.files import atomic_write_bytes, atomic_write_json
from slmkit.model.block import rope_theta
from slmkit.model.llama import Llama
from slmkit.model.presets import is_encoder


def build_model(cfg: dict) -> nn.Module:
    """A freshly initialised model for CFG: our Llama module, or a transformers model for other types."""
    if cfg.get("model_type", "llama") == "llama":
        return Llama(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    hf = dict(cfg)
    model_type = hf.pop("model_type")
    auto = AutoModelForMaskedLM if is_encoder(cfg) else AutoModelForCausalLM  # encoders pretrain as masked LMs
    return auto.from_config(AutoConfig.for_model(model_type, **hf))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def base_parameter_count(model: nn.Module) -> int:
    """Parameters without task heads: for encoders the base model as published (BertModel with its pooler, which
    the masked-LM and classification models leave out or replace), for decoders every parameter."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if config is None or not is_encoder({"model_type": getattr(config, "model_type", None)}):
        return count_parameters(model)
    from transformers import AutoModel

    with torch.device("meta"):  # no memory, even for bert-base
        return count_parameters(AutoModel.from_config(config))


def logits_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T, V) for our module and transformers models alike."""
    if isinstance(unwrap(model), Llama):
        return model(idx)
    return model(input_ids=idx).logits


def config_value(model: nn.Module, key: str, default=None):
    """A config field of our module (a dict) or a transformers / peft model (an attribute), through any wrapper."""
    m = unwrap(model)
    if isinstance(m, Llama):
        return m.config.get(key, default)
    return getattr(getattr(m, "config", None), key, default)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def scale_logits(model: nn.Module, factor: float) -> bool:
    """Multiply every logit MODEL computes by FACTOR, in its weights: the final norm's gain (and bias) feed only the
    LM head, which is linear and bias-free, so scaling them scales the logits exactly, tied head or not. Our Llama
    and GPT-Neo; False (nothing changed) for other architectures."""
    m = unwrap(model)
    norm = m.norm if isinstance(m, Llama) else getattr(getattr(m, "transformer", None), "ln_f", None)
    if norm is None or getattr(getattr(m, "lm_head", None), "bias", None) is not None:
        return False
    with torch.no_grad():
        for p in (norm,) if isinstance(norm, nn.Parameter) else norm.parameters():
            p.mul_(factor)
    return True


def to_hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Our fused weights -> LlamaForCausalLM tensor names (q/k/v and gate/up split back out)."""
    c, hd = model.config, model.head_dim
    nq, nkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm}
    for i, b in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = b.wqkv.weight.split([nq, nkv, nkv], dim=0)
        gate, up = b.w_gate_up.weight.chunk(2, dim=0)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": b.wo.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": b.w_down.weight,
                   p + "input_layernorm.weight": b.attn_norm, p + "post_attention_layernorm.weight": b.mlp_norm})
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight")


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each LlamaForCausalLM tensor CFG implies (per-layer ones by their name within the layer)."""
    c, v, i = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or c // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    per_layer = dict(zip(LAYER_TENSORS, [(q, c), (kv, c), (kv, c), (c, q), (i, c), (i, c), (c, i), (c,), (c,)],
                         strict=True))
    return {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,), "lm_head.weight": (v, c), **per_layer}


def from_hf_state_dict(model: Llama, sd: dict[str, torch.Tensor], path: Path | str = "model.safetensors") -> Llama:
    """Load LlamaForCausalLM tensors into our module (fusing q/k/v and gate/up). Tensors missing, unexpected or of
    another shape than the config says are a one-line error naming PATH (never a partly random model)."""
    from slmkit.model.weights import check_tensors, refuse_mismatch

    shapes = llama_shapes(model.config)
    need = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}" for i in range(len(model.layers)) for n in LAYER_TENSORS}
    if model.lm_head is not None:
        need.add("lm_head.weight")  # untied: its own output matrix
    rotary = {k for k in sd if k.endswith("rotary_emb.inv_freq")}  # a buffer some exporters keep; recomputed here
    what = f"the {len(model.layers)}-layer Llama model config.json describes"
    check_tensors(Path(path), sd, need, {"lm_head.weight"} | rotary, what)
    resized = [k for k in sorted(need | ({"lm_head.weight"} & sd.keys()))
               if tuple(sd[k].shape) != shapes[k.split(".", 3)[-1] if k.startswith("model.layers.") else k]]
    refuse_mismatch(Path(path), what, [], [], resized)
    ours = {"embed.weight": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    for i in range(len(model.layers)):
        p = f"model.layers.{i}."
        ours[f"layers.{i}.wqkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        ours[f"layers.{i}.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        ours[f"layers.{i}.w_gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                         sd[p + "mlp.up_proj.weight"]], dim=0)
        ours[f"layers.{i}.w_down.weight"] = sd[p + "mlp.down_proj.weight"]
        ours[f"layers.{i}.attn_norm"] = sd[p + "input_layernorm.weight"]
        ours[f"layers.{i}.mlp_norm"] = sd[p + "post_attention_layernorm.weight"]
    if model.lm_head is not None:
        ours["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model


def hf_config_dict(cfg: dict) -> dict:
    """The config.json a transformers LlamaForCausalLM reads, from our config dict."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError("hf_config_dict is for llama configs")
    from transformers import LlamaConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
            "head_dim")
    kwargs = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    hf = LlamaConfig(**kwargs, rope_theta=rope_theta(cfg)).to_dict()
    hf["rope_theta"] = rope_theta(cfg)  # older transformers and llama.cpp's converter read the flat key
    hf["architectures"] = ["LlamaForCausalLM"]
    hf["torch_dtype"] = "float32"
    return hf


def supports_fast_path(hf_cfg: dict) -> bool:
    """Can our Llama module run this transformers config exactly?"""
    rope = hf_cfg.get("rope_parameters") or {}
    return (hf_cfg.get("model_type") == "llama" and not hf_cfg.get("attention_bias") and not hf_cfg.get("mlp_bias")
            and hf_cfg.get("hidden_act", "silu") == "silu" and rope.get("rope_type", "default") == "default"
            and not hf_cfg.get("rope_scaling") and hf_cfg.get("pretraining_tp", 1) == 1)


def save_model(model: nn.Module, out: Path, extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors (atomically) into OUT for our module or a transformers model."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if isinstance(model, Llama):
        cfg = hf_config_dict({**model.config, **(extra_config or {})})
        tensors = to_hf_state_dict(model)
    else:
        for k, v in (extra_config or {}).items():
            setattr(model.config, k, v)
        cfg = model.config.to_dict()
        cfg["architectures"] = [type(model).__name__]
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # Tied weights are stored once, as transformers does.
        for key in getattr(model, "_tied_weights_keys", None) or []:
            if isinstance(key, str) and key in tensors and cfg.get("tie_word_embeddings", True):
                tensors.pop(key)
        if cfg.get("tie_word_embeddings", True):
            tensors.pop("lm_head.weight", None)
    atomic_write_bytes(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", cfg)


def load_saved_weights(model: nn.Module, model_dir: Path) -> nn.Module:
    """Copy the weights save_model wrote to MODEL_DIR back into MODEL, in place (parameters keep their device)."""
    from slmkit.model.weights import read_weights, refuse_mismatch

    path = Path(model_dir) / "model.safetensors"
    sd = read_weights(path, check_finite=False)
    m = unwrap(model)
    if isinstance(m, Llama):
        return from_hf_state_dict(m, sd, path)
    own = m.state_dict()
    resized = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    refuse_mismatch(path, f"this {type(m).__name__}", [], [], resized)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    by_storage: dict[int, list[str]] = {}
    for k, v in m.state_dict().items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    tied = {k for keys in by_storage.values() if len(keys) > 1 for k in keys}  # stored once by save_model
    refuse_mismatch(path, f"this {type(m).__name__}", sorted(set(missing) - tied), list(unexpected))
    return model


def read_config(model_dir: Path) -> dict:
    """MODEL_DIR's config.json as a dict, or a one-line error when there is none (an adapter folder's base config:
    infer.load.read_config)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SystemExit(f"error: {model_dir} is not a model folder (no config.json); "
                         "point at a folder written by `slm train` or a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}); the file is corrupt — restore it from "
                         "the model's source") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e}); fix or restore the file") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: {path} holds a JSON {type(cfg).__name__}, not the object a model config is; "
                         "restore the file")
    return cfg


def build_llama(cfg: dict, model_dir: Path) -> Llama:
    """Our Llama module for CFG, or one line saying which sizes in MODEL_DIR/config.json cannot make a model."""
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
             "max_position_embeddings")
    bad = [k for k in sizes if not (isinstance(cfg.get(k), int) and 0 < cfg[k] < 2**24)]
    kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    if not bad and not (isinstance(kv, int) and kv > 0 and cfg["num_attention_heads"] % kv == 0
                        and cfg["hidden_size"] % cfg["num_attention_heads"] == 0):
        bad = ["hidden_size / num_attention_heads / num_key_value_heads (must divide evenly)"]
    try:
        if not bad:
            return Llama(cfg)
    except (AssertionError, ValueError, TypeError, RuntimeError, ZeroDivisionError, KeyError) as e:
        bad = [f"{type(e).__name__}: {e}"]
    raise SystemExit(f"error: {Path(model_dir) / 'config.json'}: these settings cannot make a Llama model: "
                     f"{', '.join(bad)}; restore the file from the model's source")


def refuse_quantized(model_dir: Path, cfg: dict,
                     instead: str = "train, fine-tune or distill from the float folder it came from") -> None:
    """One line where a verb that needs float weights (training, fine-tuning, distilling, federating from a base,
    exporting) is given an `slm quantize` folder: its int8 rows and scales are for slmkit's inference only."""
    quant = cfg.get("slmkit_quantization")
    if quant:
        raise SystemExit(f"error: {model_dir} is an `slm quantize` folder ({quant.get('method', 'int8')}), for "
                         f"inference only; {instead}")


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a float model folder: our fast module for plain Llama configs, a transformers model otherwise. (Adapter
    and int8 folders: infer.load.load_model.)"""
    from slmkit.model.weights import open_pretrained, read_weights, refuse_pickles

    model_dir = Path(model_dir)
    hf_cfg = read_config(model_dir)
    refuse_quantized(model_dir, hf_cfg)
    weights = model_dir / "model.safetensors"
    if supports_fast_path(hf_cfg) and weights.is_file():
        cfg = dict(hf_cfg)
        cfg["rope_theta"] = rope_theta(hf_cfg)
        cfg.setdefault("rms_norm_eps", 1e-6)
        model = from_hf_state_dict(build_llama(cfg, model_dir), read_weights(weights), weights)
        return model.to(dtype).eval()
    refuse_pickles(model_dir)
    if not weights.is_file() and not any(model_dir.glob("model-*.safetensors")):
        raise SystemExit(f"error: {model_dir} has no model.safetensors; slmkit loads safetensors weights only")
    from transformers import AutoModelForCausalLM

    return open_pretrained(AutoModelForCausalLM, model_dir, dtype=dtype).eval()
