"""Sequence classification: fine-tune an encoder (or any model folder) on labelled text, evaluate it, predict.

    labelled CSV/TSV/JSONL/Parquet -> labels discovered (config.json id2label) -> AutoModelForSequenceClassification
    -> train.fit (full, or LoRA with the head always trained) -> early stopping on held-out rows -> model folder
    + classification_metrics.json (accuracy, macro-F1, per-class report) + confusion_matrix.png

`finetune` is what `slm finetune DIR --task classify` runs; `predict` and `evaluate_file` back `slm classify` and
`slm eval` on a classifier folder. Metrics are computed with numpy (no scikit-learn).
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_LABELS = 1000  # more distinct values than this is almost surely a text or id column, not labels
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "mobilebert": ["query", "value"]}  # peft knows bert and llama
HEAD_MODULES = ("pre_classifier", "classifier", "pooler", "score")  # trained in full even under LoRA

# ----------------------------------------------------------------------------------------------------------------
# Reading labelled (and unlabelled) rows


def read_rows(path: Path, columns: dict[str, str]) -> list[tuple]:
    """Rows of PATH as tuples (line number, value of each column). COLUMNS maps column name -> the flag naming it.

    CSV/TSV (header row), JSONL (one object per line) and Parquet; plain .txt/.md files count as one text per line
    when only a text column is asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist")
    names, suffix = list(columns), path.suffix.lower()

    def missing(col: str, where: str, have) -> SystemExit:
        return SystemExit(f"error: {where}: no {col!r} column (columns: {', '.join(map(str, have)) or 'none'}); "
                          f"name it with {columns[col]}")

    rows: list[tuple] = []
    if suffix in (".jsonl", ".json"):
        from slmkit.data import iter_jsonl

        for lineno, row in iter_jsonl(path):
            for col in names:
                if not isinstance(row, dict) or col not in row:
                    raise missing(col, f"{path}:{lineno}", row if isinstance(row, dict) else [])
            rows.append((lineno, *(row[c] for c in names)))
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for col in names:
                if col not in (reader.fieldnames or []):
                    raise missing(col, str(path), reader.fieldnames or [])
            rows = [(reader.line_num, *(row[c] for c in names)) for row in reader]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("error: reading Parquet needs pyarrow: pip install 'slmkit[data]'") from None
        table = pq.read_table(path)
        for col in names:
            if col not in table.column_names:
                raise missing(col, str(path), table.column_names)
        cols = [table.column(c).to_pylist() for c in names]
        rows = [(i + 1, *vals) for i, vals in enumerate(zip(*cols, strict=True))]
    elif len(names) == 1:  # plain text: one example per non-empty line
        with open(path, encoding="utf-8", errors="strict") as fh:
            rows = [(i, line.rstrip("\n")) for i, line in enumerate(fh, 1) if line.strip()]
    else:
        raise SystemExit(f"error: {path} is plain text; labelled data must be CSV, TSV, JSONL or Parquet with "
                         f"columns {' and '.join(map(repr, names))}")
    if not rows:
        raise SystemExit(f"error: {path} holds no rows")
    return rows


def read_texts(path: Path, text_col: str = "text") -> list[str]:
    """The text column (or the lines of a text file), refusing empty texts with the line that holds one."""
    return [_text(t, path, line, text_col) for line, t in read_rows(path, {text_col: "--text-col"})]


def read_labelled(path: Path, text_col: str = "text", label_col: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from PATH, with one-line errors for missing columns and empty cells."""
    texts, labels = [], []
    for line, text, label in read_rows(path, {text_col: "--text-col", label_col: "--label-col"}):
        texts.append(_text(text, path, line, text_col))
        if label is None or str(label).strip() == "":
            raise SystemExit(f"error: {path}:{line}: empty label in column {label_col!r}; fill it or drop the row")
        labels.append(str(label).strip())
    return texts, labels


def _text(value, path: Path, line: int, col: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SystemExit(f"error: {path}:{line}: empty text in column {col!r}; fill it or drop the row")
    return value


def discover_labels(labels: list[str], path: Path, label_col: str) -> list[str]:
    """The sorted label set (numerically when every label is an integer); refuse one label or a non-label column."""
    distinct = set(labels)
    if len(distinct) < 2:
        raise SystemExit(f"error: {path}: column {label_col!r} has a single label ({next(iter(distinct))!r}); "
                         "classification needs at least two")
    if len(distinct) > MAX_LABELS or (len(labels) >= 50 and len(distinct) > len(labels) / 2):
        raise SystemExit(f"error: {path}: column {label_col!r} has {len(distinct):,} distinct values in "
                         f"{len(labels):,} rows: probably not a label column (the text, or an id?); pick the label "
                         "column with --label-col")
    numeric = all(s.lstrip("-").isdigit() for s in distinct)
    return sorted(distinct, key=(lambda s: (int(s), s)) if numeric else None)


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): about FRACTION of each label held out, at least one of any label with 2+."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for idx in by_label.values():
        idx = rng.permutation(idx)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Metrics (pure, numpy)


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


def plot_confusion(cm, labels: list[str], out_png: Path, title: str = "") -> Path:
    """Confusion-matrix heat map with counts (rows: true label, columns: predicted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmkit.models import atomic_write_bytes

    cm = np.asarray(cm)
    k = len(labels)
    size = min(16, 4 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(cm, cmap="Blues")
    if k <= 30:  # beyond that the numbers are unreadable; the colours still show the structure
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)


# ----------------------------------------------------------------------------------------------------------------
# Batches, loss, evaluation


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


# ----------------------------------------------------------------------------------------------------------------
# Loading


@contextmanager
def quiet_transformers():
    """No 'newly initialized weights' warnings (a new head is the point) and no per-file loading bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def is_classifier(cfg: dict) -> bool:
    return any("ForSequenceClassification" in a for a in cfg.get("architectures") or [])


def load_classifier(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer, labels) of a classifier folder; a one-line error for any other folder."""
    from transformers import AutoModelForSequenceClassification

    from slmkit.models import read_config
    from slmkit.tokenizer import load_tokenizer

    cfg = read_config(Path(model_dir))
    if not is_classifier(cfg):
        raise SystemExit(f"error: {model_dir} is not a classifier (architectures: "
                         f"{', '.join(cfg.get('architectures') or ['none'])}); train one with "
                         f"`slm finetune {model_dir} --task classify --data train.csv --out DIR`")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, load_tokenizer(Path(model_dir)), labels


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SystemExit("error: the tokenizer has neither a pad nor an end-of-text token to pad batches with")
    return pad


def _max_length(model_cfg, tokenizer, wanted: int | None) -> int:
    limit = getattr(model_cfg, "max_position_embeddings", None) or 512
    return min(wanted or limit, limit, tokenizer.model_max_length or limit)


def predict(model_dir: Path, texts: list[str], top_k: int = 1, batch_size: int = 32,
            max_length: int | None = None) -> list[list[tuple[str, float]]]:
    """Top-K (label, probability) pairs for each of TEXTS, most probable first."""
    model, tokenizer, labels = load_classifier(model_dir)
    seqs = encode(tokenizer, texts, _max_length(model.config, tokenizer, max_length))
    probs = predict_logits(model, seqs, _pad_id(tokenizer), batch_size).softmax(-1)  # (N, n_labels)
    p, idx = probs.topk(min(max(1, top_k), len(labels)), dim=-1)  # (N, k)
    return [[(labels[j], q) for q, j in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(p.tolist(), idx.tolist(), strict=True)]


def evaluate_file(model_dir: Path, data: list[str], text_col: str = "text", label_col: str = "label",
                  batch_size: int = 32, as_json: bool = False) -> dict:
    """`slm eval` on a classifier: loss, accuracy, macro-F1 (and per-class figures) on labelled DATA."""
    model, tokenizer, labels = load_classifier(model_dir)
    texts, y = [], []
    for path in data:
        t, ls = read_labelled(Path(path), text_col, label_col)
        unknown = sorted(set(ls) - set(labels))
        if unknown:
            raise SystemExit(f"error: {path}: label {unknown[0]!r} is not one of the model's labels "
                             f"({', '.join(labels[:20])}); check --label-col or the data")
        texts += t
        y += [labels.index(v) for v in ls]
    seqs = encode(tokenizer, texts, _max_length(model.config, tokenizer, None))
    result = evaluate_classifier(model, seqs, y, _pad_id(tokenizer), labels, batch_size)
    if as_json:
        print(json.dumps({k: result[k] for k in ("loss", "accuracy", "macro_f1", "examples", "per_class")}))
    else:
        print(f"loss {result['loss']:.4f} | accuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} | "
              f"examples {result['examples']:,}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning


def finetune(model_dir: Path, data: Path | list, out: Path, text_col: str = "text", label_col: str = "label",
             eval_data: Path | None = None, lora: bool = False, lora_r: int = 8, lora_alpha: float = 16,
             lora_dropout: float = 0.05, lora_targets: list[str] | None = None, time: str | float | None = None,
             steps: int | str | None = None,
             epochs: float = 3.0, lr: float | None = None, batch_size: int = 16, max_length: int | None = 128,
             patience: int = 3, val_fraction: float = 0.1, weight_decay: float = 0.01, warmup: int | None = None,
             seed: int = 1337, device: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune MODEL_DIR as a sequence classifier on labelled DATA (a file or a list of files) and write a
    classifier folder to OUT.

    Labels are discovered in DATA and stored in config.json (id2label / label2id). Training runs for EPOCHS (or
    STEPS, or TIME, whichever ends first), evaluating on EVAL_DATA (or a stratified VAL_FRACTION split of DATA)
    and stopping after PATIENCE evaluations without a better held-out loss; the best weights are kept. With LORA,
    low-rank adapters train the encoder while the classification head is trained in full; the merged model is
    saved (plus the adapter in OUT/adapter). Returns accuracy, macro_f1, loss, steps and paths.
    """
    from transformers import AutoModelForSequenceClassification

    from slmkit.loop import Budget, FitConfig, FitState, check_numbers, fit, parse_count, parse_duration, pick_device
    from slmkit.models import atomic_write_json, read_config, save_model
    from slmkit.optim import make_optimizer
    from slmkit.report import plot_loss, read_metrics
    from slmkit.tokenizer import load_tokenizer

    check_numbers(dict(steps=parse_count(steps), time=parse_duration(time), lr=lr, batch_size=batch_size,
                       warmup=warmup, weight_decay=weight_decay, val_fraction=val_fraction, epochs=epochs,
                       patience=patience, max_length=max_length,
                       **(dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout) if lora else {})))
    files = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    model_dir, data, out = Path(model_dir), files[0], Path(out)
    read_config(model_dir)
    if out.resolve() == model_dir.resolve():
        raise SystemExit("error: --out must differ from the model folder being fine-tuned")
    if (out / "config.json").exists() and not overwrite:
        raise SystemExit(f"error: {out} already holds a model; pass --overwrite or choose another --out")
    texts, str_labels = [], []
    for f in files:
        t, ls = read_labelled(f, text_col, label_col)
        texts, str_labels = texts + t, str_labels + ls
    labels = discover_labels(str_labels, data, label_col)
    if eval_data is not None:
        val_texts, val_str = read_labelled(Path(eval_data), text_col, label_col)
        unseen = sorted(set(val_str) - set(labels))
        if unseen:
            raise SystemExit(f"error: {eval_data}: label {unseen[0]!r} never occurs in {data}; the model cannot "
                             "learn it (add training rows or drop it)")
    else:
        tr, va = stratified_split(str_labels, val_fraction, seed)
        if len(va) == 0 or len(tr) == 0:
            raise SystemExit(f"error: {data} has too few rows to hold some out; add rows or pass --eval-data")
        val_texts, val_str = [texts[i] for i in va], [str_labels[i] for i in va]
        texts, str_labels = [texts[i] for i in tr], [str_labels[i] for i in tr]
    label2id = {name: i for i, name in enumerate(labels)}
    y, val_y = [label2id[v] for v in str_labels], [label2id[v] for v in val_str]

    torch.manual_seed(seed)
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_dir)
    pad_id = _pad_id(tokenizer)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
            problem_type="single_label_classification", pad_token_id=pad_id, ignore_mismatched_sizes=True,
            local_files_only=True)
    max_len = _max_length(model.config, tokenizer, max_length)
    seqs, val_seqs = encode(tokenizer, texts, max_len), encode(tokenizer, val_texts, max_len)
    spread = representation_spread(model, seqs[:16], pad_id) if len(seqs) > 1 else 1.0
    if spread < 0.01:
        print(f"warning: {model_dir} maps different texts to almost the same features (spread {spread:.1e}): it is "
              "undertrained (a masked LM early in pretraining) and fine-tuning it will barely learn; pretrain it "
              "longer or start from a pretrained encoder (slm import)")
    if lora:
        model = _add_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets)
    model.to(dev)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Batches: epochs of shuffled rows, padded to the longest in the batch.
    gen = torch.Generator().manual_seed(seed)
    bsz = max(1, min(batch_size, len(seqs)))
    steps_per_epoch = max(1, len(seqs) // bsz)

    def batches():
        while True:
            perm = torch.randperm(len(seqs), generator=gen).tolist()
            for i in range(0, steps_per_epoch * bsz, bsz):
                idx = perm[i:i + bsz]
                yield pad_batch([seqs[j] for j in idx], pad_id).to(dev), torch.tensor([y[j] for j in idx]).to(dev)

    stream = batches()

    def loss_fn(m, x, target):
        return F.cross_entropy(classifier_logits(m, x, pad_id).float(), target)

    # Early stopping (not before one epoch): PATIENCE evaluations without a better loss; the best weights are kept.
    total_steps = parse_count(steps) or max(1, math.ceil(epochs * steps_per_epoch))
    budget = Budget(steps=total_steps, seconds=parse_duration(time))
    track = {"best": None, "weights": None, "bad": 0, "evals": 0}
    every = max(1, min(steps_per_epoch, total_steps // 8))  # every epoch, or ~8 times in runs of under 8 epochs

    def evaluate(m) -> dict:
        r = evaluate_classifier(m, val_seqs, val_y, pad_id, labels, device=dev)
        track["evals"] += 1
        if track["best"] is None or r["loss"] < track["best"] - 1e-4:
            track.update(best=r["loss"], bad=0, weights={k: v.detach().clone() for k, v in m.state_dict().items()})
        else:
            track["bad"] += 1
        return {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "tokens": r["examples"],
                "stop": track["bad"] >= patience and track["evals"] * every >= steps_per_epoch}  # not before 1 epoch

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    def log(row: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    peak_lr = lr or (1e-3 if lora else 1e-4 if model.config.hidden_size < 512 else 5e-5)
    fit_cfg = FitConfig(lr=peak_lr, warmup_steps=warmup if warmup is not None else max(1, total_steps // 10),
                        device=dev, progress_bar=progress, checkpoint_every_s=float("inf"),
                        eval_every_steps=every)
    optimizer = make_optimizer(model, peak_lr, weight_decay, dev)
    print(f"fine-tuning {model_dir.name} as a {len(labels)}-label classifier{' with LoRA' if lora else ''}: "
          f"{n_train:,} trainable parameters | {len(seqs):,} train / {len(val_seqs):,} held-out rows | "
          f"{total_steps:,} steps max | lr {peak_lr:g}")
    state = fit(model, optimizer, lambda: next(stream), loss_fn, budget, fit_cfg, FitState(), evaluate=evaluate,
                log=log)
    stopped_early = bool(state.last_eval.get("stop"))
    if track["weights"] is None or (state.step % fit_cfg.eval_every_steps and not stopped_early):
        evaluate(model)  # the steps after the last evaluation may have helped
    model.load_state_dict(track["weights"])

    if lora:
        model = _merge_lora(model, val_seqs[:16], pad_id, out / "adapter")
    model.eval()
    final = evaluate_classifier(model, val_seqs, val_y, pad_id, labels, device=dev)
    save_model(model, out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / "classification_metrics.json", {**final, "data": str(data), "eval_data":
                      str(eval_data) if eval_data else f"{val_fraction:.0%} of {data} (stratified)"})
    plot_confusion(final["confusion_matrix"], labels, out / "confusion_matrix.png",
                   title=f"{out.name}\naccuracy {final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f}")
    log({"kind": "final", "loss": final["loss"], "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
         "step": state.step, "tokens": state.tokens, "train_seconds": state.train_seconds})
    plot_loss(read_metrics(metrics_path), out / "loss.png", title=f"{out.name}: classifier")
    summary = {"out": str(out), "labels": labels, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
               "loss": final["loss"], "steps": state.step, "train_seconds": state.train_seconds,
               "stopped_early": stopped_early, "lora": lora, "trainable_parameters": n_train}
    atomic_write_json(out / "training_summary.json", summary)
    print(f"held-out: accuracy {final['accuracy']:.4f} | macro-F1 {final['macro_f1']:.4f} | loss {final['loss']:.4f} | "
          f"{state.step:,} steps{' (stopped early)' if stopped_early else ''}\nmodel folder: {out}")
    return summary


def _add_lora(model, r: int, alpha: float, dropout: float, targets: list[str] | None = None):
    """Wrap MODEL with LoRA adapters on the attention projections; the head modules train in full."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise SystemExit("error: --lora needs peft: pip install 'slmkit[finetune]'") from None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    heads = [h for h in HEAD_MODULES if h in present]
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=targets or LORA_TARGETS.get(model.config.model_type), modules_to_save=heads)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise SystemExit(f"error: LoRA: {str(e).splitlines()[0]}; name this model's attention layers with "
                         "--lora-targets (e.g. query,value)") from None


main = finetune  # `slm finetune DIR --task classify` (slmkit/finetune.py) calls slmkit.classify.main


def _merge_lora(peft_model, probe: list[list[int]], pad_id: int, adapter_dir: Path):
    """Save the adapter (with its trained head), merge it into the weights, and check the merge changed nothing."""
    peft_model.eval()
    peft_model.save_pretrained(adapter_dir)
    probe_ids = pad_batch(probe, pad_id).to(next(peft_model.parameters()).device)
    with torch.no_grad():
        before = classifier_logits(peft_model, probe_ids, pad_id)
        merged = peft_model.merge_and_unload()
        after = classifier_logits(merged, probe_ids, pad_id)
    if not torch.allclose(before, after, atol=1e-4, rtol=1e-3):
        raise SystemExit(f"error: merging the LoRA adapter changed the logits (max diff "
                         f"{(before - after).abs().max().item():.2e}); the adapter is in {adapter_dir}")
    return merged


def add_args(p) -> None:
    """Options of `slm finetune DIR --task classify` (the finetune verb adds model_dir, --task and --out)."""
    p.add_argument("--data", type=Path, required=True, help="labelled rows: CSV, TSV, JSONL or Parquet")
    p.add_argument("--text-col", default="text", help="text column (default: text)")
    p.add_argument("--label-col", default="label", help="label column (default: label)")
    p.add_argument("--eval-data", type=Path, help="held-out rows (default: a stratified 10%% split of --data)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (+ the classification head in full)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training rows (default: 3)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--time", help="training-time limit: 180, 3m, 1h")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 full, 5e-5 for width >= 512, "
                   "1e-3 LoRA)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (default: 16)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text, longer texts are cut (default: 128)")
    p.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without a better "
                   "held-out loss (default: 3)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when --eval-data is not given")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda …")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
