"""Fine-tuning a sequence classifier: `slm finetune DIR --task classify` (labelled rows -> a classifier folder).

    labelled rows (data/labelled.py) -> stratified held-out split -> token ids -> AutoModelForSequenceClassification
      (+ LoRA on the attention, the head trained in full) -> Session.fit (the stages every recipe shares: early
      stopping keeps the best weights) -> the adapter merged in -> classifier folder, metrics, confusion matrix

Labels are discovered in the data and stored in config.json (id2label / label2id). Training runs for --epochs (or
--steps, or --time, whichever ends first), evaluating on --eval-data or a stratified --val-fraction split: about 8
times in runs under 8 epochs, else once an epoch, and stopping after --patience evaluations that are not better than
the best (not before one epoch). Runs are minutes long: no checkpoints, no --resume.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.data.corpus import EpochSampler, epoch_rows
from slmkit.data.labelled import discover_labels, read_labelled, stratified_split
from slmkit.files import atomic_write_json
from slmkit.hardware import pick_device, pick_dtype, precision_name
from slmkit.infer.classify import (
    classifier_logits,
    encode,
    evaluate_classifier,
    max_length_for,
    pad_batch,
    pad_id_for,
    representation_spread,
)
from slmkit.infer.load import read_config
from slmkit.model.tokenizer import load_tokenizer
from slmkit.options import defaults_of, refuse_unused
from slmkit.training.config import Budget, ClassifyConfig, LoraConfig
from slmkit.training.fit import EarlyStop
from slmkit.training.optim import make_optimizer
from slmkit.training.report import plot_confusion
from slmkit.training.stages import Session, Task, Weights, add_lora, cleans_up, fit_config, open_output

LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "mobilebert": ["query", "value"]}  # peft knows bert and llama
HEAD_MODULES = ("pre_classifier", "classifier", "pooler", "score")  # trained in full even under LoRA


def finetune(model_dir: Path, data: Path | list, out: Path, lora: bool = False, **options) -> dict:
    """Fine-tune MODEL_DIR as a sequence classifier on labelled DATA (a file or a list of files) and write a
    classifier folder to OUT (options: slmkit.training.config.ClassifyConfig; lora_r, lora_alpha, lora_dropout,
    lora_targets with LORA). Returns accuracy, macro_f1, loss, steps and paths."""
    adapters = {k: options.pop(f"lora_{k}") for k in ("r", "alpha", "dropout", "targets") if f"lora_{k}" in options}
    return run(ClassifyConfig(model_dir=model_dir, data=data, out=out,
                              lora=LoraConfig(**adapters) if lora else None, **options))


main = finetune


def labelled_rows(cfg: ClassifyConfig) -> tuple:
    """-> (labels, training texts, their label ids, held-out texts, their label ids)."""
    texts, names = [], []
    for f in cfg.data:
        t, n = read_labelled(f, cfg.text_col, cfg.label_col)
        texts, names = texts + t, names + n
    labels = discover_labels(names, cfg.data[0], cfg.label_col)
    if cfg.eval_data is not None:
        val_texts, val_names = read_labelled(cfg.eval_data, cfg.text_col, cfg.label_col)
        unseen = sorted(set(val_names) - set(labels))
        if unseen:
            raise SystemExit(f"error: {cfg.eval_data}: label {unseen[0]!r} never occurs in {cfg.data[0]}; the model "
                             "cannot learn it (add training rows or drop it)")
    else:
        tr, va = stratified_split(names, cfg.val_fraction, cfg.seed)
        if len(va) == 0 or len(tr) == 0:
            raise SystemExit(f"error: {cfg.data[0]} has too few rows to hold some out; add rows or pass --eval-data")
        val_texts, val_names = [texts[i] for i in va], [names[i] for i in va]
        texts, names = [texts[i] for i in tr], [names[i] for i in tr]
    label2id = {name: i for i, name in enumerate(labels)}
    return labels, texts, [label2id[v] for v in names], val_texts, [label2id[v] for v in val_names]


def classifier_model(cfg: ClassifyConfig, labels: list[str], tokenizer):
    """The model folder with a fresh classification head for LABELS (and LoRA adapters with --lora)."""
    from transformers import AutoModelForSequenceClassification

    from slmkit.model.weights import HEADS, open_pretrained

    # checked: only the head (and a pooler) may start from scratch, not a layer the folder should have held
    return open_pretrained(AutoModelForSequenceClassification, cfg.model_dir, may_miss=HEADS, may_drop=True,
                           may_resize=True, num_labels=len(labels), id2label=dict(enumerate(labels)),
                           label2id={name: i for i, name in enumerate(labels)},
                           problem_type="single_label_classification", pad_token_id=pad_id_for(tokenizer),
                           ignore_mismatched_sizes=True)


def classify_task(cfg: ClassifyConfig, seqs, y, val_seqs, val_y, labels, pad_id: int, dev: str) -> Task:
    """Shuffled passes over the rows, padded to the longest in the batch; cross-entropy on the labels."""
    bsz = max(1, min(cfg.batch_size, len(seqs)))
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = EpochSampler(lambda epoch: epoch_rows(len(seqs), cfg.seed, epoch))

    def next_batch():
        idx = rows.take(bsz)
        return pad_batch([seqs[j] for j in idx], pad_id).to(dev), torch.tensor([y[j] for j in idx]).to(dev)

    def loss_fn(m, x, target):
        return F.cross_entropy(classifier_logits(m, x, pad_id).float(), target)

    def evaluate(m, n_tokens: int) -> dict:  # every held-out row, whatever N_TOKENS
        r = evaluate_classifier(m, val_seqs, val_y, pad_id, labels, device=dev)
        return {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "tokens": r["examples"]}

    return Task(next_batch, loss_fn, evaluate, max(1, len(seqs) // bsz), gen, rows,
                f"{len(seqs):,} train / {len(val_seqs):,} held-out rows")


# RunConfig fields a classifier run has no use for, with what to use instead: given, each is refused in one line
# rather than dropped (every flag takes effect or says why not).
NOT_FOR_CLASSIFY = {
    "resume": "classifier runs keep no checkpoint (they are minutes long); run again with --overwrite",
    "checkpoint_every": "classifier runs keep no checkpoint (they are minutes long)",
    "tokens": "budget a classifier in --epochs, --steps or --time",
    "block_size": "use --max-length (tokens per text)",
    "eval_tokens": "a classifier is evaluated on its whole held-out split",
    "sampling": "classifier runs draw shuffled passes (epochs)",
    "replace_errors": "labelled rows are read as UTF-8 text; fix or re-encode the file",
}


@cleans_up()
def run(cfg: ClassifyConfig) -> dict:
    """The pipeline of `slm finetune --task classify` over CFG; returns the run's summary."""
    refuse_unused("--task classify", vars(cfg), NOT_FOR_CLASSIFY, defaults_of(ClassifyConfig))
    read_config(cfg.model_dir)
    if cfg.out.resolve() == cfg.model_dir.resolve():
        raise SystemExit("error: --out must differ from the model folder being fine-tuned")
    open_output(cfg.out, False, cfg.overwrite, "", resumable=False, sources=[cfg.model_dir, *cfg.data])
    labels, texts, y, val_texts, val_y = labelled_rows(cfg)
    torch.manual_seed(cfg.seed)
    dev = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model_dir)
    pad_id = pad_id_for(tokenizer)
    model = classifier_model(cfg, labels, tokenizer)
    max_len = max_length_for(model.config, tokenizer, cfg.max_length)
    seqs, val_seqs = encode(tokenizer, texts, max_len), encode(tokenizer, val_texts, max_len)
    warn_if_undertrained(cfg, model, seqs, pad_id)
    weights = Weights(model, cfg.out)
    if cfg.lora:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        model = add_lora(model, cfg.lora, "SEQ_CLS", LORA_TARGETS.get(model.config.model_type), "query,value",
                         modules_to_save=[h for h in HEAD_MODULES if h in present])
        weights = Weights(model, cfg.out / "adapter", adapter={"base_model": str(cfg.model_dir.resolve()),
                                                               "task": "classify"})
    model.to(dev)
    autocast = pick_dtype(cfg.dtype, dev, model.config.hidden_size)
    task = classify_task(cfg, seqs, y, val_seqs, val_y, labels, pad_id, dev)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * task.batches_per_pass))
    budget = Budget(steps=steps, seconds=cfg.time)
    lr = cfg.lr or (1e-3 if cfg.lora else 1e-4 if model.config.hidden_size < 512 else 5e-5)
    if cfg.eval_every is None:  # once an epoch, or ~8 times in runs under 8 epochs
        cfg = replace(cfg, eval_every=max(1, min(task.batches_per_pass, steps // 8)))
    session = Session(cfg.out, make_optimizer(model, lr, cfg.weight_decay, dev), task, weights,
                      EarlyStop(cfg.patience, worse_by=0.0, min_step=task.batches_per_pass), checkpoints=False)
    cfg.out.mkdir(parents=True, exist_ok=True)
    session.start_log(resume=False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"fine-tuning {cfg.model_dir.name} as a {len(labels)}-label classifier{' with LoRA' if cfg.lora else ''}: "
          f"{n_train:,} trainable parameters | {task.note} | {steps:,} steps max | lr {lr:g} | "
          f"{precision_name(autocast)}")
    warmup = cfg.warmup if cfg.warmup is not None else max(1, steps // 10)
    session.fit(budget, fit_config(cfg, budget, dev, lr, warmup, autocast, None))
    if cfg.lora:
        model = merge_lora(model, val_seqs[:16], pad_id, cfg.out / "adapter")
    return finish(session, cfg, model, tokenizer, labels, val_seqs, val_y, pad_id, dev, n_train)


def warn_if_undertrained(cfg: ClassifyConfig, model, seqs, pad_id: int) -> None:
    spread = representation_spread(model, seqs[:16], pad_id) if len(seqs) > 1 else 1.0
    if spread < 0.01:
        print(f"warning: {cfg.model_dir} maps different texts to almost the same features (spread {spread:.1e}): it "
              "is undertrained (a masked LM early in pretraining) and fine-tuning it will barely learn; pretrain it "
              "longer or start from a pretrained encoder (slm import)")


def finish(session: Session, cfg: ClassifyConfig, model, tokenizer, labels, val_seqs, val_y, pad_id: int, dev: str,
           n_train: int) -> dict:
    """The classifier folder (the merged model, its tokenizer), its held-out metrics and confusion matrix."""
    model.eval()
    final = evaluate_classifier(model, val_seqs, val_y, pad_id, labels, device=dev)
    Weights(model, cfg.out).write()
    tokenizer.save_pretrained(cfg.out)
    held_out = str(cfg.eval_data) if cfg.eval_data else f"{cfg.val_fraction:.0%} of {cfg.data[0]} (stratified)"
    atomic_write_json(cfg.out / "classification_metrics.json", {**final, "data": str(cfg.data[0]),
                                                                "eval_data": held_out})
    plot_confusion(final["confusion_matrix"], labels, cfg.out / "confusion_matrix.png",
                   title=f"{cfg.out.name}\naccuracy {final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f}")
    st = session.state
    summary = {**session.summary(), "labels": labels, "accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
               "loss": final["loss"], "steps": st.step, "lora": cfg.lora is not None, "trainable_parameters": n_train}
    session.finish({k: final[k] for k in ("loss", "accuracy", "macro_f1")}, summary,
                   title=f"{cfg.out.name}: classifier")
    print(f"held-out: accuracy {final['accuracy']:.4f} | macro-F1 {final['macro_f1']:.4f} | loss {final['loss']:.4f} | "
          f"{st.step:,} steps{' (stopped early)' if summary['stopped_early'] else ''}\nmodel folder: {cfg.out}")
    return summary


def merge_lora(peft_model, probe: list[list[int]], pad_id: int, adapter_dir: Path):
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
