"""training.classify."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.data.labelled import discover_labels, read_labelled, stratified_split
from slmkit.infer.classify import (
    _max_length,
    _pad_id,
    classifier_logits,
    encode,
    evaluate_classifier,
    pad_batch,
    quiet_transformers,
    representation_spread,
)

LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "mobilebert": ["query", "value"]}  # peft knows bert and llama


HEAD_MODULES = ("pre_classifier", "classifier", "pooler", "score")  # trained in full even under LoRA


def plot_confusion(cm, labels: list[str], out_png: Path, title: str = "") -> Path:
    """Confusion-matrix heat map with counts (rows: true label, columns: predicted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmkit.files import atomic_write_bytes

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

    from slmkit.files import atomic_write_json
    from slmkit.hardware import pick_device
    from slmkit.infer.load import read_config
    from slmkit.model.folder import save_model
    from slmkit.model.tokenizer import load_tokenizer
    from slmkit.options import check_numbers, parse_count, parse_duration
    from slmkit.training.fit import Budget, FitConfig, FitState, fit
    from slmkit.training.optim import make_optimizer
    from slmkit.training.report import plot_loss, read_metrics

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


main = finetune  # `slm finetune DIR --task classify` (slmkit/training/finetune.py) calls this


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
