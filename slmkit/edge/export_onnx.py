"""ONNX export (onnxruntime) and its parity check.

Decoders (our Llama module) export WITH past key values, one graph for prefill and decode:

    inputs   input_ids (B, T) int64, past_keys (L, B, nkv, P, hd), past_values (L, B, nkv, P, hd)   [P may be 0]
    outputs  logits (B, T, V), present_keys (L, B, nkv, P+T, hd), present_values (L, B, nkv, P+T, hd)

Positions start at P (the past length), so a decode step feeds one token and the previous step's presents.
Encoders (BERT family) export as their classification graph (logits) or, without a head, as an embedding graph
(mean-pooled, L2-normalised sentence embeddings, as `slm embed`). `--quant int8` runs onnxruntime's
quantize_dynamic (int8 weights, int8 matmuls) on the fp32 graph.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.edge.runtimes import Crash, empty_past, run_probe
from slmkit.infer.embed import Pooling, load_encoder, pool, pooling_of
from slmkit.model.llama import ForwardOps
from slmkit.model.weights import open_pretrained

__all__ = ["empty_past"]  # re-exported for older callers; it lives in runtimes.py (no torch)


class OnnxOps(ForwardOps):
    """The block's primitives in the ONNX graph: the forward's, with RMSNorm spelt out (opset 17 has none) and
    attention over the past keys/values concatenated with this step's (a graph cannot write into a preallocated
    cache); the concatenations are kept as the graph's presents. ALLOWED: (T, P+T) causal mask over past + new."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed
        self.keys: list[torch.Tensor] = []  # per layer (B, nkv, P+T, hd)
        self.values: list[torch.Tensor] = []

    def project(self, b: nn.Module, x: torch.Tensor, gain: torch.Tensor, w: nn.Module) -> torch.Tensor:
        return w(_rms(x, gain, b.eps))

    def attend(self, b: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor], pos) -> torch.Tensor:
        """q (B, T, nh, hd), k and v (B, T, nkv, hd); CACHE: this layer's past (B, nkv, P, hd) each -> (B, T, nh*hd).
        Written out (product, mask, softmax, product): the graph runs where SDPA's export does not."""
        B, T = q.shape[:2]  # traced: the graph's dynamic batch and length
        nh, hd = b.n_head, b.head_dim  # constants in the graph
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = torch.cat([cache[0], k.transpose(1, 2)], dim=2)  # (B, nkv, P+T, hd)
        v = torch.cat([cache[1], v.transpose(1, 2)], dim=2)  # (B, nkv, P+T, hd)
        self.keys.append(k)
        self.values.append(v)
        rep = nh // b.n_kv  # grouped-query attention: each kv head serves REP query heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, P+T, hd)
        att = (q @ k.transpose(-1, -2)) * hd ** -0.5  # (B, nh, T, P+T)
        att = att.masked_fill(~self.allowed, float("-inf")).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)


class KVDecoder(nn.Module):
    """Our Llama module with concatenated (not preallocated) caches: traceable into one ONNX graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        m = self.m
        T, P = input_ids.shape[1], past_keys.shape[3]
        x = m.embed(input_ids)  # (B, T, C)
        rot = m.cos[P:P + T], m.sin[P:P + T]  # (T, 1, hd) each: positions P.. P+T-1
        q_pos = torch.arange(T, device=x.device).unsqueeze(1) + P  # (T, 1)
        ops = OnnxOps(torch.arange(P + T, device=x.device).unsqueeze(0) <= q_pos)  # (T, P+T) causal over past + new
        for i, b in enumerate(m.layers):
            x = ops.block(b, x, rot, (past_keys[i], past_values[i]), P)  # (B, T, C)
        x = _rms(x, m.norm, m.layers[0].eps)
        logits = F.linear(x, m.embed.weight if m.lm_head is None else m.lm_head.weight)  # (B, T, V)
        return logits, torch.stack(ops.keys), torch.stack(ops.values)  # presents: (L, B, nkv, P+T, hd)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm spelled out (opset 17 has no RMSNorm)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Embedder(nn.Module):
    """Encoder -> sentence embeddings (B, C), pooled as `slm embed` pools them (infer.embed.pool: the folder's
    declared pooling, by default the L2-normalised mean), so the ONNX graph and `slm embed` agree."""

    def __init__(self, encoder: nn.Module, pooling: Pooling | None = None):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling or Pooling()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        return pool(h, attention_mask, self.pooling)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=17, dynamo=False)


@torch.no_grad()
def export_onnx(model_dir: Path, out: Path, int8: bool = False, verify: bool = True, text: str | None = None) -> dict:
    """Write OUT/model.onnx (+ tokenizer, config, slmkit_onnx.json) and check it in onnxruntime (in a child process:
    a failed check is an error, a crashed one leaves OUT marked unverified in slmkit_onnx.json)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SystemExit("error: ONNX export needs onnx and onnxruntime: pip install 'slmkit[export]'") from None
    from slmkit.files import replace_dir
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.llama import Llama
    from slmkit.model.presets import is_encoder
    from slmkit.model.tokenizer import load_tokenizer

    cfg = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp32 = tmp / ("model_fp32.onnx" if int8 else "model.onnx")
        if is_encoder(cfg):
            kind, probe = _export_encoder(model_dir, cfg, fp32)
        else:
            model = load_model(model_dir)
            if not isinstance(model, Llama):
                raise SystemExit(f"error: ONNX export of {cfg.get('model_type')} decoders is not supported; "
                                 "export Llama-architecture folders (slm train / slm import of Llama models)")
            kind = "decoder-with-past"
            ids = torch.tensor([tokenizer(text or "Hello there, how are you?")["input_ids"][:64]])
            past = torch.from_numpy(empty_past(model.config))
            _export(KVDecoder(model).eval(), (ids, past, past), fp32, ["input_ids", "past_keys", "past_values"],
                    ["logits", "present_keys", "present_values"],
                    {"input_ids": {0: "batch", 1: "seq"}, "past_keys": {1: "batch", 3: "past"},
                     "past_values": {1: "batch", 3: "past"}, "logits": {0: "batch", 1: "seq"},
                     "present_keys": {1: "batch", 3: "total"}, "present_values": {1: "batch", 3: "total"}})
            probe = ids
        path = fp32
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = tmp / "model.onnx"
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
            fp32.unlink()
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        result = verify_onnx(path, model_dir, cfg, kind, probe, int8) if verify else {}
        # a crashed checker keeps the export: its metadata says it is unverified and why
        checked = {"verified": result.get("verified", False),
                   **({"reason": result["reason"]} if "reason" in result else {})}
        meta = {"kind": kind, "quant": "int8" if int8 else "fp32", "source": str(Path(model_dir).resolve()),
                **checked}
        (tmp / "slmkit_onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _export_encoder(model_dir: Path, cfg: dict, path: Path) -> tuple[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    archs = cfg.get("architectures") or []
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])  # (1, 6) [CLS]-like id, a few tokens, [SEP]-like id
    mask = torch.ones_like(ids)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if any(a.endswith("ForSequenceClassification") for a in archs):
        model = open_pretrained(AutoModelForSequenceClassification, model_dir).eval()
        _export(_Logits(model), (ids, mask), path, ["input_ids", "attention_mask"], ["logits"],
                {**axes, "logits": {0: "batch"}})
        return "classifier", ids
    model = load_encoder(model_dir)[0]  # checked against its config, as `slm embed` loads it
    embedder = Embedder(model, pooling_of(model_dir)).eval()
    _export(embedder, (ids, mask), path, ["input_ids", "attention_mask"], ["embeddings"],
            {**axes, "embeddings": {0: "batch"}})
    return "embedding", ids


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def verify_onnx(path: Path, model_dir: Path, cfg: dict, kind: str, probe: torch.Tensor, int8: bool) -> dict:
    """Max |logit difference| between onnxruntime (run in a child process) and torch; decoders also through a
    prefill + decode-step split. {"verified": False, "reason": ...} when a signal killed the child."""
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of

    ran = run_probe("onnxruntime", {"path": str(path), "kind": kind, "cfg": cfg, "ids": probe.tolist(),
                                    "threads": torch.get_num_threads()})
    if isinstance(ran, Crash):
        return {"verified": False, "reason": ran.reason}
    got = ran["out"]
    if kind == "decoder-with-past":
        expected = logits_of(load_model(model_dir), probe)[0].numpy()  # (T, V)
        err_t = np.abs(got - expected[None]).max(axis=(0, 2))  # got: (2, T, V) full pass, prefill + decode
        agree = (got.argmax(-1) == expected.argmax(-1)[None]).all(0)
    else:
        from transformers import AutoModelForSequenceClassification

        mask = torch.ones_like(probe)
        if kind == "classifier":
            model = open_pretrained(AutoModelForSequenceClassification, model_dir).eval()
            expected = model(input_ids=probe, attention_mask=mask).logits.numpy()
        else:
            encoder = load_encoder(model_dir)[0]
            expected = Embedder(encoder, pooling_of(model_dir))(probe, mask).numpy()
        err_t = np.abs(got - expected).max(axis=-1)
        agree = got.argmax(-1) == expected.argmax(-1)
    err = float(err_t.max())
    tol = 0.5 * max(1.0, float(np.abs(expected).max())) if int8 else 1e-4 * max(1.0, float(np.abs(expected).max()))
    if err > tol:
        i = int(np.flatnonzero(err_t > tol)[0])
        raise SystemExit(f"error: {path} fails parity with onnxruntime: first diverging position {i}, max |logit "
                         f"error| {err:.3g} (tolerance {tol:.3g}); please report this model")
    return {"verified": True, "runtime": "onnxruntime", "max_abs_logit_diff": err,
            "top1_agreement": float(np.mean(agree))}
