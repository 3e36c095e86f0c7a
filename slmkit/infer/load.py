"""Open any model folder slmkit writes or reads: the dispatch between the kinds of folder, above the model layer.

    LoRA adapter folder (adapter_config.json, no config.json) -> merged into its base in memory (model.adapters)
    `slm quantize` folder (config.json with slmkit_quantization) -> int8 Llama (model.int8)
    anything else -> model.folder: slmkit's Llama module for plain Llama configs, a transformers model otherwise
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from slmkit.model import folder
from slmkit.model.adapters import base_dir_of, is_adapter_folder, load_merged
from slmkit.model.int8 import is_quantized, load_quantized


def read_config(model_dir: Path) -> dict:
    """MODEL_DIR's config.json; for a LoRA adapter folder, its base model's."""
    model_dir = Path(model_dir)
    if is_adapter_folder(model_dir):
        return folder.read_config(base_dir_of(model_dir))
    return folder.read_config(model_dir)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model in MODEL_DIR, whichever kind of folder it is, in eval mode."""
    model_dir = Path(model_dir)
    if is_adapter_folder(model_dir):
        return load_merged(model_dir, dtype)
    cfg = folder.read_config(model_dir)
    if is_quantized(cfg):  # int8 weights, int8 matmuls
        return load_quantized(model_dir, cfg)
    return folder.load_model(model_dir, dtype)
