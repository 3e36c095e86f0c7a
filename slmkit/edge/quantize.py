"""edge.quantize."""

from __future__ import annotations

import shutil
from pathlib import Path

from slmkit.model.int8 import METHODS, is_quantized, quantize_rows


def main(model_dir: Path, out: Path, method: str = "int8", overwrite: bool = False) -> Path:
    """Quantize the Llama model in MODEL_DIR to METHOD (int8: weight-only, per channel) into the folder OUT."""
    from safetensors.torch import save

    from slmkit.files import atomic_write_json, check_out, replace_dir, temp_beside
    from slmkit.infer.load import read_config
    from slmkit.model.folder import supports_fast_path
    from slmkit.model.tokenizer import load_tokenizer
    from slmkit.model.weights import read_weights

    model_dir, out = Path(model_dir), Path(out)
    if method not in METHODS:
        raise SystemExit(f"error: unknown --method {method!r}; use one of {', '.join(METHODS)}")
    cfg = read_config(model_dir)
    if is_quantized(cfg):
        raise SystemExit(f"error: {model_dir} is already quantized; quantize the float folder it came from")
    if not supports_fast_path(cfg) or not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"error: {model_dir} is a {cfg.get('model_type')} model; `slm quantize` handles Llama "
                         "decoders — use `slm export --format onnx --quant int8` for other architectures")
    if not out.parent.is_dir():
        raise SystemExit(f"error: the output directory {out.parent} does not exist; create it first")
    check_out(out, overwrite, sources=[model_dir])
    sd = read_weights(model_dir / "model.safetensors")
    if cfg.get("tie_word_embeddings", True):
        sd.pop("lm_head.weight", None)
    tensors = {}
    for name, w in sd.items():
        if w.dim() == 2:
            tensors[name], tensors[name + ".scale"] = quantize_rows(w)
        else:
            tensors[name] = w.float().contiguous()
    tmp = temp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt", "slmkit": "int8"}))
        atomic_write_json(tmp / "config.json", {**cfg, "slmkit_quantization": {"method": method, "per": "row"}})
        load_tokenizer(model_dir).save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = (model_dir / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    print(f"quantized {model_dir} -> {out} ({method}: {b / 1e6:.2f} MB, {100 * b / a:.0f}% of {a / 1e6:.2f} MB)")
    return out


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="a Llama model folder (float32/bf16 safetensors)")
    p.add_argument("--method", default="int8", choices=METHODS, help="int8: weight-only per-channel int8, run with "
                   "int8 matmuls (default: int8)")
    p.add_argument("--out", type=Path, required=True, help="output model folder (its parent must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never MODEL_DIR itself)")
