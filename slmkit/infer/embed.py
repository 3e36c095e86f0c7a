"""Verb `embed`: sentence embeddings from any encoder folder: mean of the last hidden states over real tokens
(padding excluded), L2-normalized, so a dot product is a cosine similarity. Written as .npy (N, H) float32 or as
Parquet (columns `text` and `embedding`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_encoder(model_dir: Path, device: str = "cpu"):
    """(base model, tokenizer) of MODEL_DIR: masked-LM, classifier and plain encoder folders all load their encoder."""
    from transformers import AutoModel

    from slmkit.infer.classify import quiet_transformers
    from slmkit.infer.load import read_config
    from slmkit.model.tokenizer import load_tokenizer

    read_config(Path(model_dir))
    with quiet_transformers():  # a missing pooler is expected: mean pooling does not use it
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    return model, load_tokenizer(Path(model_dir))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) of 0/1 -> L2-normalized mean over the unmasked positions (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, H)
    return F.normalize(summed / m.sum(dim=1).clamp(min=1.0), dim=-1)


@torch.no_grad()
def embed(model_dir: Path, texts: list[str], batch_size: int = 32, max_length: int | None = None,
          device: str = "cpu", model=None, tokenizer=None) -> np.ndarray:
    """Embeddings of TEXTS: (N, hidden_size) float32, each row of unit length. Pass MODEL/TOKENIZER to reuse them."""
    if model is None or tokenizer is None:
        model, tokenizer = load_encoder(model_dir, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    max_len = min(max_length or limit, limit)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    for i in range(0, len(texts), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).last_hidden_state  # (B, T, H)
        out[idx] = mean_pool(hidden.float(), enc["attention_mask"].to(device)).cpu().numpy()
    return out


def main(model_dir: Path, data: Path, out: Path, text_col: str = "text", batch_size: int = 32,
         max_length: int | None = None, device: str = "cpu") -> Path:
    """Embed every text of DATA with the encoder in MODEL_DIR and write OUT (.npy or .parquet). Returns OUT."""
    from slmkit.data.labelled import read_texts
    from slmkit.files import atomic_write_bytes
    from slmkit.options import check_numbers

    check_numbers(dict(batch_size=batch_size, max_length=max_length), {"batch_size": "texts per forward pass"})
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".parquet"):
        raise SystemExit(f"error: --out {out} must end in .npy or .parquet")
    texts = read_texts(Path(data), text_col)
    vectors = embed(Path(model_dir), texts, batch_size, max_length, device)
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
    print(f"{len(texts):,} embeddings of size {vectors.shape[1]} -> {out}")
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
