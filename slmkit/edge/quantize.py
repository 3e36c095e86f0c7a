"""edge.quantize."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from slmkit.edge.smoothquant import ALPHAS
from slmkit.model.int8 import METHODS, is_quantized, quantize_rows


def main(model_dir: Path, out: Path, method: str = "int8", overwrite: bool = False, calibrate: Path | None = None,
         calibration_tokens: int = 2048, alpha: float | None = None, seed: int = 0) -> Path:
    """Quantize the Llama model in MODEL_DIR to METHOD into the folder OUT. int8: weight-only, per channel; w8a8:
    the same int8 weights after SmoothQuant (factors measured on CALIBRATE's text, or on the model's own samples),
    run with int8 activations per token (model.int8.W8A8Linear)."""
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
    from slmkit.options import check_numbers

    check_numbers(dict(calibration_tokens=calibration_tokens), {"calibration_tokens": "e.g. 2048"})
    if method != "w8a8" and (calibrate is not None or alpha is not None):
        raise SystemExit("error: --calibrate and --alpha apply to --method w8a8 only")
    check_out(out, overwrite, sources=[model_dir])
    quant = {"method": method, "per": "row"}
    if method == "w8a8":
        sd, quant["smoothquant"] = _smoothed(model_dir, calibrate, calibration_tokens, alpha, seed)
        cfg = {**cfg, "tie_word_embeddings": False}  # the head was untied to be smoothed (edge/smoothquant.py)
    else:
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
        atomic_write_json(tmp / "config.json", {**cfg, "slmkit_quantization": quant})
        load_tokenizer(model_dir).save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = (model_dir / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    print(f"quantized {model_dir} -> {out} ({method}: {b / 1e6:.2f} MB, {100 * b / a:.0f}% of {a / 1e6:.2f} MB)")
    return out


def _smoothed(model_dir: Path, calibrate: Path | None, tokens: int, alpha: float | None,
              seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """MODEL_DIR's float weights with SmoothQuant folded in (Hugging Face names), and what the config records."""
    from slmkit.edge.smoothquant import activation_stats, calibration_rows, smooth, untie_head
    from slmkit.infer.load import load_model
    from slmkit.model.folder import to_hf_state_dict
    from slmkit.model.tokenizer import load_tokenizer

    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"error: --alpha {alpha}: use a value from 0 (no smoothing) to 1")
    if calibrate is not None and not Path(calibrate).exists():
        raise SystemExit(f"error: --calibrate {calibrate}: no such file or folder")
    model = load_model(model_dir).eval()
    rows = calibration_rows(model, load_tokenizer(model_dir), calibrate, tokens, seed)
    untie_head(model)
    chosen = smooth(model, *activation_stats(model, rows), alpha)
    source = str(calibrate) if calibrate is not None else "the model's own samples"
    alphas = sorted(set(chosen.values()))
    return to_hf_state_dict(model), {"alpha": alpha if alpha is not None else "per product",
                                     "alphas_used": {str(a): list(chosen.values()).count(a) for a in alphas},
                                     "calibration": source, "calibration_tokens": sum(len(r) for r in rows)}


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="a Llama model folder (float32/bf16 safetensors)")
    p.add_argument("--method", default="int8", choices=METHODS, help="int8: weight-only per-channel int8 "
                   "(activations stay float: the closer to the float model); w8a8: the same int8 weights after "
                   "SmoothQuant, and int8 activations per token at run time, as llama.cpp's q8_0 (the faster: ~1.4x "
                   "int8's tokens/s on x86 CPUs with VNNI; see docs/edge.md) (default: int8)")
    p.add_argument("--calibrate", type=Path, default=None, help="w8a8: text to measure activations on (a file or "
                   "folder `slm train --data` reads); default: text the model samples itself")
    p.add_argument("--calibration-tokens", type=int, default=2048, help="w8a8: tokens of calibration text "
                   "(default: 2048)")
    p.add_argument("--alpha", type=float, default=None, help="w8a8: SmoothQuant's migration strength for every "
                   "product, 0 (none) to 1 (default: each product picks from " + ", ".join(map(str, ALPHAS)) + " the "
                   "one with the least int8 error on the calibration text)")
    p.add_argument("--seed", type=int, default=0, help="w8a8: seed of the self-sampled calibration text (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output model folder (its parent must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never MODEL_DIR itself)")
