"""Verb `export`: a model folder -> GGUF (llama.cpp, Ollama), ONNX (onnxruntime) or a clean Hugging Face folder,
each followed by its parity check against the runtime that reads it (when that runtime is installed).

    slm export DIR --format gguf --quant f32|f16|q8_0|q4_0 --out model.gguf   (slmkit/export_gguf.py)
    slm export DIR --format onnx [--quant int8] --out DIR                      (slmkit/export_onnx.py)
    slm export DIR --format hf --out DIR                                       (here)

A failed check is an error: the output is removed and the message names the first diverging position and the
logit error. `--no-verify` skips the check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FORMATS = ("gguf", "onnx", "hf")


def _check_output(out: Path) -> None:
    if not out.parent.is_dir():
        raise SystemExit(f"error: the output directory {out.parent} does not exist; create it first "
                         f"(mkdir -p {out.parent}) or choose another --out")


@torch.no_grad()
def export_hf(model_dir: Path, out: Path, verify: bool = True) -> dict:
    """A plain Hugging Face folder (config.json, model.safetensors, tokenizer files) that transformers opens."""
    import os

    from slmkit.files import replace_dir
    from slmkit.infer.load import load_model
    from slmkit.model.folder import logits_of, save_model
    from slmkit.model.llama import Llama
    from slmkit.model.tokenizer import load_tokenizer

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        result = {}
        if verify and isinstance(model, Llama):  # our module: compare with transformers' LlamaForCausalLM
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()
            probe = (torch.arange(32) * 7 % model.config["vocab_size"]).unsqueeze(0)  # (1, 32) arbitrary ids
            err = (hf(input_ids=probe).logits - logits_of(model, probe)).abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"error: {out}: transformers' logits differ from {model_dir}'s by {err:.2e}; "
                                 "please report this model")
            result = {"runtime": "transformers", "max_abs_logit_diff": err}
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _export_gguf(model_dir: Path, cfg: dict, out: Path, quant: str, verify: bool, text: str | None,
                 max_ppl_rise: float | None, name: str | None) -> dict:
    """Write the GGUF to a temporary file beside OUT, check it in llama.cpp, then rename it into place and write the
    Ollama Modelfile: a failed check leaves nothing behind; a checker killed by a signal (llama.cpp's native code
    crashed, not our file) keeps the file, and the result says {"verified": False, "reason": ...}."""
    from slmkit.edge.export_gguf import QUANTS, verify_gguf, write_gguf, write_modelfile
    from slmkit.files import temp_beside
    from slmkit.model.presets import is_encoder
    from slmkit.model.tokenizer import load_tokenizer

    if quant not in QUANTS:
        raise SystemExit(f"error: unknown --quant {quant!r} for gguf; use one of {', '.join(QUANTS)}")
    if is_encoder(cfg) or cfg.get("model_type", "llama") != "llama":
        raise SystemExit(f"error: {model_dir} is a {cfg.get('model_type')} model; GGUF export holds Llama "
                         "decoders only — use --format onnx (or --format hf) for it")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("error: GGUF export needs gguf: pip install 'slmkit[export]'") from None
    tmp = temp_beside(out)
    try:
        for note in write_gguf(model_dir, tmp, quant, name):
            print(f"note: {note}")
        result = verify_gguf(tmp, model_dir, quant, text, max_ppl_rise) if verify else {}
        tmp.replace(out)  # verified, skipped or crashed-and-marked: in place either way
    finally:
        tmp.unlink(missing_ok=True)
    write_modelfile(out, load_tokenizer(model_dir))
    return result


def main(model_dir: Path, out: Path, format: str = "gguf", quant: str | None = None, verify: bool = True,
         verify_text: Path | None = None, max_ppl_rise: float | None = None, name: str | None = None,
         overwrite: bool = False) -> dict:
    """Export the model in MODEL_DIR to FORMAT at OUT and check it against its runtime. Returns the check's numbers.

    gguf: a llama.cpp / Ollama file (--quant f32, f16, q8_0, q4_0; default f16) plus an Ollama Modelfile beside it.
    onnx: a folder with model.onnx (decoders: logits + past key values; encoders: logits or embeddings) and the
    tokenizer (--quant int8 for onnxruntime dynamic int8). hf: a clean Hugging Face folder with safetensors.
    """
    from slmkit.files import check_out
    from slmkit.infer.load import read_config
    from slmkit.model.folder import refuse_quantized
    from slmkit.options import check_numbers

    check_numbers(dict(max_ppl_rise=max_ppl_rise), non_negative=("max_ppl_rise",))
    model_dir, out = Path(model_dir), Path(out)
    if format not in FORMATS:
        raise SystemExit(f"error: unknown --format {format!r}; use one of {', '.join(FORMATS)}")
    cfg = read_config(model_dir)
    refuse_quantized(model_dir, cfg, "export the float folder it came from (for llama.cpp's 8-bit: --format gguf "
                     "--quant q8_0; for onnxruntime's: --format onnx --quant int8)")  # no exporter reads int8 rows
    _check_output(out)
    check_out(out, overwrite, sources=[model_dir], kind="file" if format == "gguf" else "folder")
    if format == "gguf" and out.with_name("Modelfile").exists() and not overwrite:
        raise SystemExit(f"error: {out.with_name('Modelfile')} already exists (the export writes an Ollama Modelfile "
                         "beside the GGUF); pass --overwrite to replace it, or export into another folder")
    text = None
    if verify_text is not None:
        if not Path(verify_text).is_file():
            raise SystemExit(f"error: --verify-text {verify_text} does not exist")
        text = Path(verify_text).read_text(encoding="utf-8", errors="replace")[:20_000]
    if format == "gguf":
        result = _export_gguf(model_dir, cfg, out, quant or "f16", verify, text, max_ppl_rise, name)
        quant = quant or "f16"
    elif format == "onnx":
        from slmkit.edge.export_onnx import export_onnx

        if quant not in (None, "fp32", "int8"):
            raise SystemExit(f"error: unknown --quant {quant!r} for onnx; use int8 (or leave it out for fp32)")
        result = export_onnx(model_dir, out, quant == "int8", verify, text)
    else:
        if quant not in (None, "fp32"):
            raise SystemExit(f"error: --quant {quant!r} does not apply to --format hf; use `slm quantize` for int8")
        result = export_hf(model_dir, out, verify)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    verified = result.pop("verified", bool(result))
    reason = result.pop("reason", None) or (None if verified else "--no-verify" if not verify else "no check ran")
    summary = {"format": format, "quant": quant, "out": str(out), "bytes": size, "verified": verified,
               **({"reason": reason} if reason else {}), **result}
    checked = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
    print(f"exported {model_dir} -> {out} ({format}{'/' + quant if quant else ''}, {size / 1e6:.2f} MB)"
          + (f"; parity: {checked}" if checked else f"; not verified: {reason}" if reason else ""))
    return json.loads(json.dumps(summary))


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="model folder (written by `slm train`, `slm import`, ...)")
    p.add_argument("--format", default="gguf", choices=FORMATS, help="gguf (llama.cpp/Ollama), onnx (onnxruntime) "
                   "or hf (Hugging Face folder) (default: gguf)")
    p.add_argument("--quant", default=None, help="gguf: f32, f16 (default), q8_0, q4_0; onnx: int8 (default fp32)")
    p.add_argument("--out", type=Path, required=True, help="output file (gguf) or folder (onnx, hf); its parent "
                   "directory must exist")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check against the "
                   "target runtime")
    p.add_argument("--verify-text", type=Path, default=None, help="text file for the parity check (default: a "
                   "built-in English probe)")
    p.add_argument("--max-ppl-rise", type=float, default=None, help="gguf q8_0/q4_0: accepted relative perplexity "
                   "rise on the probe text (default: 0.01 for q8_0, 0.05 for q4_0)")
    p.add_argument("--name", default=None, help="gguf: general.name (default: the folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (and the Modelfile beside a "
                   "GGUF); never the model folder itself or the current folder")
