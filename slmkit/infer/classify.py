"""Sequence classification: fine-tune an encoder (or any model folder) on labelled text, evaluate it, predict.

    labelled CSV/TSV/JSONL/Parquet -> labels discovered (config.json id2label) -> AutoModelForSequenceClassification
    -> train.fit (full, or LoRA with the head always trained) -> early stopping on held-out rows -> model folder
    + classification_metrics.json (accuracy, macro-F1, per-class report) + confusion_matrix.png

`finetune` is what `slm finetune DIR --task classify` runs; `predict` and `evaluate_file` back `slm classify` and
`slm eval` on a classifier folder. Metrics are computed with numpy (no scikit-learn).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.data.labelled import read_labelled_files


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true labels)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)  # (true, predicted)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0  # macro average over the labels that occur in the evaluated data
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(labels)}
    return {"accuracy": float(tp.sum() / max(1, len(y_true))),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": per_class, "confusion_matrix": cm.tolist(), "labels": list(labels), "examples": len(y_true)}


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token id lists to the longest: (B, T). The attention mask is derived as ids != pad_id."""
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long)


def classifier_logits(model, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, n_labels) logits."""
    return model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits


@torch.no_grad()
def representation_spread(model, seqs: list[list[int]], pad_id: int) -> float:
    """How much the base model's mean-pooled features differ between SEQS, relative to their scale: the std across
    texts over the std across feature dimensions. A briefly pretrained masked LM passes through a phase where it
    predicts token frequencies and maps every text to nearly the same vector (spread ~1e-3); a classifier head on
    such features barely learns, whatever its learning rate. A healthy encoder, or a fresh random one, is ~0.1-1."""
    was_training = model.training
    model.eval()
    ids = pad_batch(seqs, pad_id)  # (B, T)
    mask = (ids != pad_id).unsqueeze(-1).float()  # (B, T, 1)
    hidden = model.base_model(input_ids=ids, attention_mask=mask.squeeze(-1).long()).last_hidden_state  # (B, T, C)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, C)
    model.train(was_training)
    return float(pooled.std(0).mean() / pooled.std(1).mean().clamp(min=1e-12))


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


@torch.no_grad()
def predict_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32, device: str = "cpu"):
    """Logits for pre-tokenized SEQS, batched by similar length (less padding): (N, n_labels) float32 on CPU."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = torch.empty(len(seqs), model.config.num_labels)
    for i in range(0, len(seqs), batch_size):
        idx = order[i:i + batch_size]
        out[torch.from_numpy(idx)] = classifier_logits(model, pad_batch([seqs[j] for j in idx], pad_id).to(device),
                                                       pad_id).float().cpu()
    model.train(was_training)
    return out


def evaluate_classifier(model, seqs: list[list[int]], y: list[int], pad_id: int, labels: list[str],
                        batch_size: int = 32, device: str = "cpu") -> dict:
    """Held-out loss, accuracy, macro-F1 (and the per-class report) of MODEL on tokenized SEQS with label ids Y."""
    logits = predict_logits(model, seqs, pad_id, batch_size, device)
    target = torch.tensor(y, dtype=torch.long)
    loss = F.cross_entropy(logits, target).item()
    return {"loss": loss, **classification_metrics(target.numpy(), logits.argmax(-1).numpy(), labels)}


def is_classifier(cfg: dict) -> bool:
    return any("ForSequenceClassification" in a for a in cfg.get("architectures") or [])


def load_classifier(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer, labels) of a classifier folder; a one-line error for any other folder."""
    from transformers import AutoModelForSequenceClassification

    from slmkit.infer.load import read_config
    from slmkit.model.tokenizer import load_tokenizer
    from slmkit.model.weights import open_pretrained

    cfg = read_config(Path(model_dir))
    if not is_classifier(cfg):
        raise SystemExit(f"error: {model_dir} is not a classifier (architectures: "
                         f"{', '.join(cfg.get('architectures') or ['none'])}); train one with "
                         f"`slm finetune {model_dir} --task classify --data train.csv --out DIR`")
    model = open_pretrained(AutoModelForSequenceClassification, Path(model_dir)).to(device).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, load_tokenizer(Path(model_dir)), labels


def pad_id_for(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SystemExit("error: the tokenizer has neither a pad nor an end-of-text token to pad batches with")
    return pad


def max_length_for(model_cfg, tokenizer, wanted: int | None) -> int:
    limit = getattr(model_cfg, "max_position_embeddings", None) or 512
    return min(wanted or limit, limit, tokenizer.model_max_length or limit)


def predict(model_dir: Path, texts: list[str], top_k: int = 1, batch_size: int = 32,
            max_length: int | None = None) -> list[list[tuple[str, float]]]:
    """Top-K (label, probability) pairs for each of TEXTS, most probable first."""
    model, tokenizer, labels = load_classifier(model_dir)
    seqs = encode(tokenizer, texts, max_length_for(model.config, tokenizer, max_length))
    probs = predict_logits(model, seqs, pad_id_for(tokenizer), batch_size).softmax(-1)  # (N, n_labels)
    p, idx = probs.topk(min(max(1, top_k), len(labels)), dim=-1)  # (N, k)
    return [[(labels[j], q) for q, j in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(p.tolist(), idx.tolist(), strict=True)]


def evaluate_file(model_dir: Path, data: list[str], text_col: str = "text", label_col: str = "label",
                  batch_size: int = 32, as_json: bool = False, device: str = "cpu") -> dict:
    """`slm eval` on a classifier: loss, accuracy, macro-F1 (and per-class figures) on labelled DATA."""
    model, tokenizer, labels = load_classifier(model_dir, device)
    texts, names = read_labelled_files(data, text_col, label_col, labels, ("label", "model's labels"))
    y = [labels.index(v) for v in names]
    seqs = encode(tokenizer, texts, max_length_for(model.config, tokenizer, None))
    result = evaluate_classifier(model, seqs, y, pad_id_for(tokenizer), labels, batch_size, device)
    if as_json:
        print(json.dumps({k: result[k] for k in ("loss", "accuracy", "macro_f1", "examples", "per_class")}))
    else:
        print(f"loss {result['loss']:.4f} | accuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} | "
              f"examples {result['examples']:,}")
    return result


def texts_to_classify(text: str | None, data: Path | None, text_col: str, top_k: int, batch_size: int,
                      max_length: int | None) -> list[str]:
    """`slm classify`'s input (--text or the rows of --data), its numbers checked: one line for each mistake. Shared
    by classifier and cascade folders."""
    from slmkit.data.labelled import read_texts
    from slmkit.options import check_numbers

    check_numbers(dict(top_k=top_k, batch_size=batch_size, max_length=max_length),
                  {"top_k": "labels to show per text", "batch_size": "texts per forward pass"})
    if (text is None) == (data is None):
        raise SystemExit("error: give --text TEXT or --data FILE (one of them)")
    if text is not None and not text.strip():
        raise SystemExit("error: --text is empty; give the text to classify")
    if text is not None and text_col != "text":
        raise SystemExit("error: --text-col does not apply to --text: it names the column of a --data file")
    return [text] if text is not None else read_texts(Path(data), text_col)


def main(model_dir: Path, text: str | None = None, data: Path | None = None, text_col: str = "text", top_k: int = 1,
         as_json: bool = False, batch_size: int = 32, max_length: int | None = None) -> list[dict]:
    """Classify --text or every row of --data with the classifier in MODEL_DIR: top-k labels with probabilities."""
    texts = texts_to_classify(text, data, text_col, top_k, batch_size, max_length)
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
