"""Verb `quantize`: a model folder -> an int8 model folder for in-process PyTorch inference (`slmkit.load`,
`slm generate`, `slm eval`, `slm serve`).

Both methods store every 2-D weight W (out, in) as round(W / s) in int8 with s = max|W_row| / 127 (float32, one per
row) under `NAME` and `NAME.scale` in model.safetensors; norms stay float32. config.json gains
`"slmkit_quantization": {"method": ...}`. At load the int8 weights stay int8 in memory; the tied embedding is looked
up row by row and dequantized. Files and resident weights are about 4x smaller than float32 (w8a8 unties a tied
head to smooth it: ~3.3x).

- `int8`: weight-only. Each linear layer runs PyTorch's int8-weight matmul (`_weight_int8pack_mm`, the kernel
  gpt-fast uses) on float activations (bf16 ones on CPUs with bf16 units, where that kernel is fast).
- `w8a8`: the weights after SmoothQuant (edge.smoothquant, folded in at quantize time), and int8 activations per
  token at run time through fbgemm's int8 GEMM (W8A8Linear): llama.cpp q8_0's scheme, and its speed class.
  Where PyTorch has no x86/fbgemm engine the same folder runs as `int8`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from slmkit.hardware import cpu_has_bf16, cpu_has_vnni
from slmkit.model.block import rope_theta, rotary_tables

METHODS = ("int8", "w8a8")


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
        self._bf16_scale: torch.Tensor | None = None  # the scales in bf16, for bf16 activations (made on first use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cpu and cpu_has_bf16():
            # The kernel's bf16-activation path is ~5x faster on CPU than its fp32 one (1 token of SmolLM2-135M's
            # gate/up product: 124 vs 605 us, Xeon AMX): activations rounded to bf16's 8-bit mantissa, finer than
            # the 8-bit integers llama.cpp's q8_0 rounds them to; accumulation stays fp32 (docs/benchmarks.md).
            if self._bf16_scale is None or self._bf16_scale.device != self.scale.device:
                self._bf16_scale = self.scale.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.q, self._bf16_scale)
        else:
            y = torch._weight_int8pack_mm(x2.float().contiguous(), self.q, self.scale)
        return y.view(*shape[:-1], -1).to(x.dtype)


def int8_matmul_engine() -> str | None:
    """The PyTorch quantized engine W8A8Linear runs on (fbgemm, or x86, which picks fbgemm for linear layers), or
    None where this build has neither (ARM, some custom builds): those run w8a8 folders with Int8Linear."""
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm") or engine not in torch.backends.quantized.supported_engines:
        return None
    # PyTorch has deprecated its quantized tensors (the packed weight is made from one): a release without them
    # runs w8a8 folders as int8 instead of failing
    have = hasattr(torch, "_make_per_channel_quantized_tensor") and all(
        hasattr(torch.ops.quantized, op) for op in ("linear_with_input_q_dq_qweight_dq_output_fp32", "linear_dynamic"))
    return engine if have else None


class W8A8Linear(nn.Module):
    """y = x @ (q * scale)^T with int8 activations too, quantized per row (token) at run time: what llama.cpp's q8_0
    does, with one scale a row where q8_0 has one per 32 values. Each row x is divided by max|x| and the int8
    product runs with fixed input quantization (step 1/127 around 128, in uint8), then the row's max multiplies the
    output back. The fixed parameters make each row's result independent of the other rows in the batch (the
    products are summed in int32, exactly): a row gives the same numbers in any batch or multi-token pass. The
    decode step's lone row takes `matvec` (fbgemm's dynamic path), which rounds a value the other way here and
    there. On CPUs without VNNI the activations use 7 bits (1/63 around 64), the range fbgemm's 16-bit pair sums
    cannot overflow. The weight lives only in fbgemm's packed layout (a copy of q, which is not kept)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the deprecation notice of quantized tensors, on every layer (see above)
            warnings.simplefilter("ignore", UserWarning)
            packed_q = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(packed_q, None)
        self.step, self.zero_point = (1 / 127, 128) if cpu_has_vnni() else (1 / 63, 64)
        self.reduce_range = not cpu_has_vnni()  # the same 7-bit rule for the dynamic one-row path
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        peak = x2.abs().amax(1, keepdim=True).clamp_(min=1e-30)  # (rows, 1)
        y = self._product(x2 * peak.reciprocal())  # each row in [-1, 1]
        return y.mul_(peak).view(*shape[:-1], -1).to(x.dtype)

    def matvec(self, x: torch.Tensor, scale: float = 1.0, residual: torch.Tensor | None = None) -> torch.Tensor:
        """SCALE * forward(x) (+ RESIDUAL) for one fp32 vector x (in,) in one quantized op: the decode step's call
        (llama.matvec). A lone row is quantized by the kernel from its own range (fbgemm's dynamic path: min to max
        in 255 steps, a little finer than forward's symmetric ones; 5 us less per product than measuring the peak
        here). Its int8 inputs thus differ from forward's by a step here and there: forward is for batches."""
        y = torch.ops.quantized.linear_dynamic(x.view(1, -1), self.packed, self.reduce_range).view(-1)  # (out,)
        if residual is None:
            return y if scale == 1.0 else y.mul_(scale)
        return torch.add(residual, y, alpha=scale)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) fp32 in [-1, 1] -> (rows, out) fp32: x rounded to int8 at the fixed step around the zero
        point, then the int8 GEMM."""
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, self.step, self.zero_point,
                                                                                self.packed)


def int8_linear(q: torch.Tensor, scale: torch.Tensor, method: str) -> nn.Module:
    """The layer for a quantized weight: W8A8Linear for w8a8 folders where the engine is there, else Int8Linear."""
    if method == "w8a8" and int8_matmul_engine():
        return W8A8Linear(q, scale)
    return Int8Linear(q, scale)


class Int8Embedding(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)  # (V, C) int8
        self.register_buffer("scale", scale.float())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx].unsqueeze(-1)  # (B, T, C)


def int8_llama(cfg: dict, sd: dict[str, torch.Tensor], method: str = "int8") -> nn.Module:
    """Our Llama module with int8 linear layers, embedding and output projection, from a quantized folder."""
    from slmkit.model.llama import Llama

    with torch.device("meta"):  # no float weights are ever allocated; every tensor is replaced below
        model = Llama(cfg)

    def qs(*names: str) -> nn.Module:
        return int8_linear(torch.cat([sd[n] for n in names]), torch.cat([sd[n + ".scale"] for n in names]), method)

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
    method = (cfg.get("slmkit_quantization") or {}).get("method", "int8")
    return int8_llama(c, read_weights(Path(model_dir) / "model.safetensors"), method)
