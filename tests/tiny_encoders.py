"""Tiny BERT folders and a separable toy classification task, written on the fly for the encoder tests."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "happy", "lovely", "excellent", "wonderful", "nice", "superb"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "poor", "ugly", "nasty"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "day", "food", "and", "it", "felt", "very", "service",
          "show", "this", "that", "place", "book", "so", "our"]


def toy_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs: filler words plus one or two sentiment words that decide the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(3, 7)) + rng.choices(POSITIVE if label == "pos" else NEGATIVE,
                                                                       k=rng.randint(1, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def wordpiece(extra: list[str] | None = None, vocab_size: int = 200):
    from slmkit.model.tokenizer import train_wordpiece

    texts = [t for t, _ in toy_rows(200)] + (extra or [])
    return train_wordpiece(texts * 3, vocab_size, lowercase=True)


def tiny_bert_config(tokenizer, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, **kw)


def tiny_mlm_folder(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random BertForMaskedLM saved as `slm train --preset bert-*` saves one (slmkit.models.save_model)."""
    from transformers import BertForMaskedLM

    from slmkit.model.folder import save_model

    torch.manual_seed(seed)
    save_model(BertForMaskedLM(tiny_bert_config(tokenizer)), path)
    tokenizer.save_pretrained(path)
    return path


def tiny_base_folder(path: Path, tokenizer, seed: int = 0) -> Path:
    """A random BertModel saved with transformers' save_pretrained: the layout of an imported sentence encoder
    such as all-MiniLM-L6-v2 (architectures: BertModel, pooler included)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(tiny_bert_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
