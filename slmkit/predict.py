"""Verb `classify`: the top-k labels, with probabilities, of a text or of every row of a file (a classifier folder).

The model work is `slmkit.classify.predict`; this module only reads the input and prints.
"""

from __future__ import annotations

import json
from pathlib import Path


def main(model_dir: Path, text: str | None = None, data: Path | None = None, text_col: str = "text", top_k: int = 1,
         as_json: bool = False, batch_size: int = 32, max_length: int | None = None) -> list[dict]:
    """Classify --text or every row of --data with the classifier in MODEL_DIR: top-k labels with probabilities."""
    from slmkit.classify import predict, read_texts
    from slmkit.loop import check_numbers

    check_numbers(dict(top_k=top_k, batch_size=batch_size, max_length=max_length),
                  {"top_k": "labels to show per text", "batch_size": "texts per forward pass"})
    if (text is None) == (data is None):
        raise SystemExit("error: give --text TEXT or --data FILE (one of them)")
    if text is not None and not text.strip():
        raise SystemExit("error: --text is empty; give the text to classify")
    texts = [text] if text is not None else read_texts(Path(data), text_col)
    results = [{"text": t, "labels": [{"label": label, "score": p} for label, p in top]}
               for t, top in zip(texts, predict(Path(model_dir), texts, top_k, batch_size, max_length), strict=True)]
    for r in results:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        elif text is not None:
            print("\n".join(f"{x['label']}\t{x['score']:.4f}" for x in r["labels"]))
        else:
            labels = "\t".join(f"{x['label']} {x['score']:.3f}" for x in r["labels"])
            print(f"{labels}\t{r['text'][:80]!r}")
    return results


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="classifier folder (written by `slm finetune --task classify`)")
    p.add_argument("--text", help="one text to classify")
    p.add_argument("--data", type=Path, help="texts to classify: CSV/TSV/JSONL/Parquet (--text-col) or a .txt file, "
                   "one text per line")
    p.add_argument("--text-col", default="text", help="text column for CSV, JSONL and Parquet (default: text)")
    p.add_argument("--top-k", type=int, default=1, help="labels to show per text (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, help="tokens per text, longer texts are cut (default: the model's)")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help='one JSON object per text: {"text": …, "labels": [{"label": …, "score": …}]}')
