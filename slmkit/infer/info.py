"""Verb `info`: architecture and exact parameter count of a model folder or a preset."""

from __future__ import annotations

import json
from pathlib import Path


def describe(model_dir: Path | None = None, preset: str | None = None) -> dict:
    """Architecture summary with the exact parameter count (`parameters`), built on the meta device (no memory)."""
    import torch

    from slmkit.infer.load import read_config
    from slmkit.model.folder import base_parameter_count, build_model, supports_fast_path
    from slmkit.model.presets import build_config, get_preset, is_encoder

    if (model_dir is None) == (preset is None):
        raise SystemExit("error: give a model folder or --preset NAME (one of them)")
    if preset is not None:
        cfg = build_config(preset, get_preset(preset)["vocab_size"])
        with torch.device("meta"):
            model = build_model(cfg)
        source = {"preset": preset}
    else:
        cfg = read_config(Path(model_dir))
        with torch.device("meta"):
            if supports_fast_path(cfg):
                from slmkit.model.block import rope_theta
                from slmkit.model.llama import Llama

                model = Llama({**cfg, "rope_theta": rope_theta(cfg), "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6)})
            elif is_encoder(cfg):  # masked-LM, classifier or plain encoder folder: count the base model
                from transformers import AutoConfig, AutoModel

                model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
            else:
                from transformers import AutoConfig, AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        source = {"model_dir": str(model_dir)}
    get = lambda *keys: next((cfg[k] for k in keys if cfg.get(k) is not None), None)  # noqa: E731
    return {**source, "model_type": cfg.get("model_type", "llama"), "parameters": base_parameter_count(model),
            "layers": get("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
            "hidden_size": get("hidden_size", "n_embd", "dim"),
            "heads": get("num_attention_heads", "num_heads", "n_head", "n_heads"),
            "kv_heads": get("num_key_value_heads", "num_attention_heads", "num_heads", "n_heads"),
            "intermediate_size": get("intermediate_size", "hidden_dim"), "vocab_size": get("vocab_size"),
            "context": get("max_position_embeddings", "n_positions"),
            "tied_embeddings": cfg.get("tie_word_embeddings", True)}


def main(model_dir: Path | None = None, preset: str | None = None, as_json: bool = False) -> dict:
    """Print the architecture and exact parameter count of MODEL_DIR or --preset NAME."""
    info = describe(model_dir, preset)
    if as_json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return info


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, nargs="?", help="model folder")
    p.add_argument("--preset", help="describe a preset instead (e.g. slm-7m, gpt-neo-125m)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object (key: parameters, …)")
