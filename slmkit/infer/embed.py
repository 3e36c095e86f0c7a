"""Verb `embed`: sentence embeddings from any encoder folder, pooled the way the folder declares it: a
sentence-transformers folder (modules.json + 1_Pooling/config.json, kept by `slm import`) says cls, mean, max,
mean_sqrt_len or lasttoken pooling, whether a Normalize module follows and its max_seq_length; other folders (slmkit's
own encoders) get the mean of the last hidden states over real tokens, L2-normalized, so a dot product is a cosine
similarity. Written as .npy (N, H) float32 or as Parquet (columns `text` and `embedding`).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_encoder(model_dir: Path, device: str = "cpu"):
    """(base model, tokenizer) of MODEL_DIR: masked-LM, classifier and plain encoder folders all load their encoder."""
    from transformers import AutoModel

    from slmkit.infer.load import read_config
    from slmkit.model.tokenizer import load_tokenizer
    from slmkit.model.weights import open_pretrained

    read_config(Path(model_dir))
    # A masked-LM or classifier folder holds a head the base encoder drops, and may lack BERT's pooler (unused here).
    model = open_pretrained(AutoModel, Path(model_dir), may_miss=("pooler.",), may_drop=True).to(device).eval()
    return model, load_tokenizer(Path(model_dir))


POOLINGS = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector."""
    mode: str = "mean"  # one of POOLINGS
    normalize: bool = True  # L2-normalize the result
    max_length: int | None = None  # tokens per text the folder was trained with (sentence_bert_config.json)


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"error: {path}: unreadable ({type(e).__name__}); restore it from the model's source or "
                         "delete it to mean-pool") from None


def pooling_of(model_dir: Path) -> Pooling:
    """The pooling MODEL_DIR declares (sentence-transformers modules.json), or slmkit's default (normalized mean)."""
    modules_file = Path(model_dir) / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = _read_json(modules_file)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
    mode, max_length = "mean", None
    if "Pooling" in kinds:
        cfg = _read_json(Path(model_dir) / kinds["Pooling"] / "config.json")
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
                 if cfg.get(f"pooling_mode_{m}")]
        if len(modes) != 1:
            raise SystemExit(f"error: {model_dir / kinds['Pooling'] / 'config.json'}: {len(modes)} pooling modes "
                             f"set; slm embed takes exactly one of {', '.join(POOLINGS)} (or pass --pooling)")
        mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(modes[0], modes[0])
    bert_cfg = Path(model_dir) / "sentence_bert_config.json"
    if bert_cfg.is_file():
        max_length = _read_json(bert_cfg).get("max_seq_length")
    return Pooling(mode, "Normalize" in kinds, max_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling = Pooling()) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) of 0/1 (padding on the right or left) -> one vector per text (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    n = m.sum(dim=1).clamp(min=1.0)  # (B, 1) real tokens per text
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    elif pooling.mode == "lasttoken":
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)  # (B,) last real position
        out = hidden[torch.arange(hidden.shape[0]), last]
    else:
        out = (hidden * m).sum(dim=1) / (n if pooling.mode == "mean" else n.sqrt())
    return F.normalize(out, dim=-1) if pooling.normalize else out


@torch.no_grad()
def embed(model_dir: Path, texts: list[str], batch_size: int = 32, max_length: int | None = None,
          device: str = "cpu", model=None, tokenizer=None, pooling: Pooling | None = None) -> np.ndarray:
    """Embeddings of TEXTS: (N, hidden_size) float32, pooled as MODEL_DIR declares (pooling_of) unless POOLING is
    given. Pass MODEL/TOKENIZER to reuse them."""
    if model is None or tokenizer is None:
        model, tokenizer = load_encoder(model_dir, device)
    if pooling is None:
        pooling = pooling_of(model_dir) if model_dir is not None else Pooling()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    max_len = min(max_length or pooling.max_length or limit, limit)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).last_hidden_state  # (B, T, H)
        out[idx] = pool(hidden.float(), enc["attention_mask"].to(device), pooling).cpu().numpy()
    return out


def main(model_dir: Path, data: Path, out: Path, text_col: str = "text", batch_size: int = 32,
         max_length: int | None = None, device: str = "cpu", pooling: str = "auto", normalize: bool | None = None,
         overwrite: bool = False) -> Path:
    """Embed every text of DATA with the encoder in MODEL_DIR and write OUT (.npy or .parquet). Returns OUT."""
    from dataclasses import replace

    from slmkit.data.labelled import read_texts
    from slmkit.files import atomic_write_bytes, check_out
    from slmkit.options import check_numbers

    check_numbers(dict(batch_size=batch_size, max_length=max_length), {"batch_size": "texts per forward pass"})
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".parquet"):
        raise SystemExit(f"error: --out {out} must end in .npy or .parquet")
    check_out(out, overwrite, sources=[Path(data), Path(model_dir)], kind="file")
    how = pooling_of(Path(model_dir))
    if pooling != "auto":
        how = replace(how, mode=pooling)
    if normalize is not None:
        how = replace(how, normalize=normalize)
    texts = read_texts(Path(data), text_col)
    vectors = embed(Path(model_dir), texts, batch_size, max_length, device, pooling=how)
    buf = io.BytesIO()
    if out.suffix.lower() == ".npy":
        np.save(buf, vectors)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("error: writing Parquet needs pyarrow: pip install 'slmkit[data]' (or use .npy)") from None
        pq.write_table(pa.table({"text": texts, "embedding": list(vectors)}), buf)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    print(f"{len(texts):,} embeddings of size {vectors.shape[1]} ({how.mode} pooling"
          f"{', normalized' if how.normalize else ''}) -> {out}")
    return out


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="encoder folder (trained, fine-tuned or imported)")
    p.add_argument("--data", type=Path, required=True, help="texts: CSV/TSV/JSONL/Parquet (--text-col) or a .txt "
                   "file, one text per line")
    p.add_argument("--out", type=Path, required=True, help="vectors.npy (N x hidden, float32) or vectors.parquet")
    p.add_argument("--text-col", default="text", help="text column for CSV, JSONL and Parquet (default: text)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, help="tokens per text, longer texts are cut (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda … (default: cpu)")
    p.add_argument("--pooling", default="auto", choices=("auto", *POOLINGS), help="how token vectors become one: "
                   "auto = what the folder declares (sentence-transformers modules.json), else mean (default: auto)")
    p.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction, help="L2-normalize each "
                   "vector (default: as the folder declares; normalized for folders that declare nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
