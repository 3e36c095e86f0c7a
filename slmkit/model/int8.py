"""Verb `quantize`: a model folder -> an int8 model folder for in-process PyTorch inference (`slmkit.load`,
`slm generate`, `slm eval`).

Method `int8`: weight-only, symmetric, per output channel. Every 2-D weight W (out, in) is stored as
round(W / s) in int8 with s = max|W_row| / 127 (float32, one per row) under `NAME` and `NAME.scale` in
model.safetensors; norms stay float32. config.json gains `"slmkit_quantization": {"method": "int8"}`. At load the
int8 weights stay int8 in memory and each linear layer runs PyTorch's int8-weight matmul (`_weight_int8pack_mm`,
the kernel gpt-fast uses); the tied embedding is looked up row by row and dequantized. Files and resident weights
are about 4x smaller than float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from slmkit.model.block import rope_theta, rotary_tables

METHODS = ("int8",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and float32 scales (out,): symmetric, per row."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T without materialising the float weight."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)  # (out, in) int8
        self.register_buffer("scale", scale.float())  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), self.q, self.scale)
        return y.view(*shape[:-1], -1).to(x.dtype)


class Int8Embedding(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)  # (V, C) int8
        self.register_buffer("scale", scale.float())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)  # (B, T, C)


def int8_llama(cfg: dict, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Our Llama module with int8 linear layers, embedding and output projection, from a quantized folder."""
    from slmkit.model.llama import Llama

    with torch.device("meta"):  # no float weights are ever allocated; every tensor is replaced below
        model = Llama(cfg)

    def qs(*names: str) -> Int8Linear:
        return Int8Linear(torch.cat([sd[n] for n in names]), torch.cat([sd[n + ".scale"] for n in names]))

    for i, b in enumerate(model.layers):
        p = f"model.layers.{i}."
        b.wqkv = qs(*(p + f"self_attn.{n}_proj.weight" for n in "qkv"))
        b.wo = qs(p + "self_attn.o_proj.weight")
        b.w_gate_up = qs(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        b.w_down = qs(p + "mlp.down_proj.weight")
        b.attn_norm = nn.Parameter(sd[p + "input_layernorm.weight"].float())
        b.mlp_norm = nn.Parameter(sd[p + "post_attention_layernorm.weight"].float())
    model.norm = nn.Parameter(sd["model.norm.weight"].float())
    e = "model.embed_tokens.weight"
    model.embed = Int8Embedding(sd[e], sd[e + ".scale"])
    model.lm_head = qs("lm_head.weight" if "lm_head.weight" in sd else e)  # shares the tied int8 data
    cos, sin = rotary_tables(cfg, model.head_dim)  # the buffers built on meta, rebuilt for real
    model.register_buffer("cos", cos, persistent=False)
    model.register_buffer("sin", sin, persistent=False)
    return model.eval()


def is_quantized(cfg: dict) -> bool:
    return bool(cfg.get("slmkit_quantization"))


def load_quantized(model_dir: Path, cfg: dict) -> nn.Module:
    """What `slmkit.infer.load.load_model` calls for a folder written by `slm quantize`."""
    from slmkit.model.weights import read_weights

    c = dict(cfg)
    c["rope_theta"] = rope_theta(cfg)
    c.setdefault("rms_norm_eps", 1e-6)
    return int8_llama(c, read_weights(Path(model_dir) / "model.safetensors"))
