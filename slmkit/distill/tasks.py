"""What a distillation run trains on, per --task: batches, the loss against the teacher, held-out evaluation.

    causal    token-level KD on text: alpha x T^2 x divergence(teacher, student) + (1 - alpha) x next-token CE, per
              position, over the output head chunk by chunk (training/chunked.py: neither side's whole logits)
    mlm       DistilBERT's triple loss on masked windows: alpha_ce x T^2 x soft CE (masked positions) + alpha_mlm x
              masked-LM CE + alpha_cos x (1 - cosine) between the last hidden states (every position)
    classify  task distillation: alpha x T^2 x divergence on the teacher's label distribution, for labelled and
              unlabelled rows alike, + (1 - alpha) x CE on the labels where a row has one

Each returns a training.stages.Task, plus the function that scores the teacher on the same held-out split (the
retention the model card reports).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmkit.data.corpus import (
    EpochSampler,
    cache_dir,
    epoch_rows,
    expand_paths,
    load_tokens,
    split_tokens,
    tokenize_to_memmap,
)
from slmkit.distill import teacher as teachers
from slmkit.distill.losses import kd_full, kd_topk_and_grad, soft_cross_entropy
from slmkit.infer.evaluate import evaluate_tokens
from slmkit.model.folder import logits_of
from slmkit.model.tokenizer import token_byte_lengths
from slmkit.training.chunked import IGNORE, cross_entropy_and_grad, head_loss, hidden_and_head
from slmkit.training.stages import Task


@dataclass
class KD:
    """The soft loss's settings."""
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft loss; 1 - alpha: the hard labels'
    kind: str = "kl"  # kl, reverse-kl, jsd
    beta: float = 0.5  # jsd's mixture weight


# ----------------------------------------------------------------------------------------------------------------
# causal: a decoder teacher, text


def causal_data(cfg, tok, block: int):
    """-> (training tokens, held-out tokens, the token file's key): the text with the teacher's tokenizer."""
    bin_path, meta = tokenize_to_memmap(expand_paths(cfg.data), tok, text_col=cfg.text_col,
                                        replace_errors=cfg.replace_errors)
    train, val = split_tokens(load_tokens(bin_path, meta), cfg.val_fraction, block)
    if teachers.grid_windows(len(train), block) < 1:
        raise SystemExit(f"error: --data has {len(train):,} training tokens, too few for --block-size {block}; add "
                         "text or lower --block-size")
    return train, val, f"{bin_path.stem}|{len(train)}"


def causal_task(cfg, tok, teacher, data, block: int, kd: KD, dev: str, cache=None) -> tuple[Task, callable]:
    """Token-level KD over shuffled passes of fixed-grid windows (the grid the teacher cache holds)."""
    train, val, _ = data
    bsz, token_bytes = cfg.batch_size, token_byte_lengths(tok)
    n_windows = teachers.grid_windows(len(train), block)
    windows = EpochSampler(lambda epoch: epoch_rows(n_windows, cfg.seed, epoch))
    drawn: dict = {}  # the windows of the batch next_batch last gave: the loss looks their cached rows up

    def next_batch():
        drawn["w"] = windows.take(bsz)
        return teachers.window_batch(train, drawn["w"], block, dev)

    def loss_fn(model, x, y):
        targets = y.flatten()
        if cache is not None:
            ids, logp = cache.rows(drawn["w"], dev)
        elif kd.alpha > 0.0:  # (alpha 0: the data's labels alone, training without a teacher on the same windows)
            th, tw = teachers.teacher_hidden(teacher, x)

            def soft(z, rows):
                return kd_full(z, teachers.teacher_logits(th, tw, rows), kd.temperature, kd.kind, kd.beta)

        def chunk_loss(z, rows):
            if kd.alpha == 0.0:
                return cross_entropy_and_grad(z, targets[rows])
            if cache is not None:  # loss and gradient in one pass over the chunk's logits
                return kd_topk_and_grad(z, ids[rows], logp[rows], kd.temperature, kd.kind, kd.beta, kd.alpha,
                                        targets[rows])
            loss = kd.alpha * soft(z, rows)
            if kd.alpha < 1.0:
                loss = loss + (1.0 - kd.alpha) * F.cross_entropy(z, targets[rows], reduction="sum")
            return loss

        return _over_head(model, x, chunk_loss, targets.numel())

    def evaluate(m, n_tokens: int) -> dict:
        return evaluate_tokens(m, val, block, token_bytes, max_windows=max(1, n_tokens // block), device=dev)

    task = Task(next_batch, loss_fn, evaluate if len(val) else None, max(1, n_windows // bsz),
                torch.Generator().manual_seed(cfg.seed), windows,
                f"data {len(train):,} train / {len(val):,} val tokens")
    return task, (lambda n_tokens: evaluate(teacher, n_tokens)) if len(val) else None


def _over_head(model, x, chunk_loss, n: int) -> torch.Tensor:
    """The mean of CHUNK_LOSS over the N positions, the student's head applied chunk by chunk where it can be."""
    found = hidden_and_head(model, x)
    if found is None:  # a head that is not a plain linear map: its logits whole
        z = logits_of(model, x).float().flatten(0, 1)
        loss = chunk_loss(z.clone(), slice(0, n))  # a copy: the fused losses overwrite their logits
        if isinstance(loss, tuple):  # (value, its gradient in the logits): a surrogate with that value and gradient
            value, g = loss
            loss = value + (z * g).sum() - (z * g).sum().detach()
        return loss / n
    h, w = found
    return head_loss(h.flatten(0, 1), w, chunk_loss, scale=1.0 / n)


def cache_for(cfg, teacher, data, block: int, kd: KD, dev: str, autocast) -> tuple[object, dict]:
    """--cache-teacher: the teacher's top-k over the training windows, built now or found -> (cache, its report)."""
    train, _, data_key = data
    root = cache_dir("teacher") if cfg.cache_teacher == "auto" else teachers.Path(cfg.cache_teacher)
    key = teachers.cache_key(teacher, data_key, block, cfg.cache_k, kd.temperature,
                             teachers.grid_windows(len(train), block))
    found = teachers.open_cache(root, key)
    started = time.perf_counter()
    cache = found or teachers.build_cache(teacher, train, block, cfg.cache_k, kd.temperature, root, key, dev,
                                          autocast, progress=cfg.progress)
    meta = cache.meta
    report = {"path": str(cache.path), "reused": found is not None, "bytes": cache.bytes, "k": meta["k"],
              "tokens": meta["windows"] * block, "build_seconds": meta["build_seconds"],
              "teacher_tokens_per_s": meta["built_tokens"] / max(1e-9, meta["build_seconds"]),
              "seconds_this_run": time.perf_counter() - started}
    print(f"teacher cache: {cache.path} ({'reused' if found else 'built'}) | top-{meta['k']} of "
          f"{report['tokens']:,} positions | {cache.bytes / 2**20:,.0f} MiB | built in {meta['build_seconds']:.0f} s "
          f"({report['teacher_tokens_per_s']:,.0f} teacher tokens/s)")
    return cache, report


# ----------------------------------------------------------------------------------------------------------------
# mlm: DistilBERT's triple loss


def mlm_task(cfg, tok, teacher, student, data, block: int, kd: KD, dev: str) -> tuple[Task, callable]:
    from functools import partial

    from slmkit.data.corpus import epoch_windows
    from slmkit.data.mlm import evaluate_mlm, get_mlm_batch, mask_info

    train, val, _ = data
    info, bsz = mask_info(tok, "the teacher's tokenizer cannot mask: --task mlm needs a BERT-family teacher"), \
        cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = EpochSampler(lambda epoch: epoch_windows(len(train), block, cfg.seed, epoch))
    same_width = student.config.hidden_size == teacher.config.hidden_size
    alpha_cos = cfg.alpha_cos if same_width else 0.0
    if cfg.alpha_cos and not same_width:
        print(f"note: the student is {student.config.hidden_size} wide, the teacher {teacher.config.hidden_size}: "
              "no hidden-state cosine term (it needs equal widths)")

    def loss_fn(model, x, y):
        out = model(input_ids=x, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=x, output_hidden_states=True)
        masked = y != IGNORE  # (B, T)
        n = masked.sum().clamp(min=1)
        s_logits, t_logits = out.logits[masked].float(), t_out.logits[masked].float()  # (n, V)
        loss = cfg.alpha_ce * soft_cross_entropy(s_logits, t_logits, kd.temperature) / n
        loss = loss + cfg.alpha_mlm * F.cross_entropy(s_logits, y[masked], reduction="sum") / n
        if alpha_cos:
            hs, ht = out.hidden_states[-1].flatten(0, 1).float(), t_out.hidden_states[-1].flatten(0, 1).float()
            loss = loss + alpha_cos * (1.0 - F.cosine_similarity(hs, ht, dim=-1)).mean()
        return loss

    evaluate_fn = partial(evaluate_mlm, info=info)

    def evaluate(m, n_tokens: int) -> dict:
        return evaluate_fn(m, val, block, max_windows=max(1, n_tokens // block), device=dev)

    task = Task(lambda: get_mlm_batch(train, bsz, block, gen, info, dev, windows.take), loss_fn,
                evaluate if len(val) > block + 1 else None, max(1, len(train) // (bsz * block)), gen, windows,
                f"data {len(train):,} train / {len(val):,} val tokens")
    return task, (lambda n_tokens: evaluate(teacher, n_tokens)) if task.evaluate else None


# ----------------------------------------------------------------------------------------------------------------
# classify: the teacher's soft labels


def classify_task(cfg, tok, teacher, kd: KD, dev: str) -> tuple[Task, callable, dict]:
    """Labelled rows (--data; a held-out split) and unlabelled text (--unlabelled), soft labels from the teacher,
    computed once for every training row before the first step (the labels are few: nothing to cache on disk)."""
    from slmkit.infer.classify import (
        classifier_logits,
        encode,
        evaluate_classifier,
        max_length_for,
        pad_batch,
        pad_id_for,
        predict_logits,
    )

    labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    texts, y, val_texts, val_y = labelled_split(cfg, labels)
    unlabelled = _unlabelled_texts(cfg)
    pad_id = pad_id_for(tok)
    max_len = max_length_for(teacher.config, tok, cfg.max_length)
    seqs = encode(tok, texts + unlabelled, max_len)
    hard = torch.tensor(y + [IGNORE] * len(unlabelled))
    val_seqs = encode(tok, val_texts, max_len)
    started = time.perf_counter()
    soft_targets = predict_logits(teacher, seqs, pad_id, device=dev)  # (N, labels)
    teacher_seconds = time.perf_counter() - started
    bsz = max(1, min(cfg.batch_size, len(seqs)))
    rows = EpochSampler(lambda epoch: epoch_rows(len(seqs), cfg.seed, epoch))
    drawn: dict = {}

    def next_batch():
        drawn["r"] = rows.take(bsz)
        return pad_batch([seqs[j] for j in drawn["r"]], pad_id).to(dev), hard[drawn["r"]].to(dev)

    def loss_fn(m, x, target):
        s = classifier_logits(m, x, pad_id).float()  # (B, labels)
        loss = kd.alpha * kd_full(s, soft_targets[drawn["r"]].to(dev), kd.temperature, kd.kind, kd.beta) / len(s)
        known = target != IGNORE
        if kd.alpha < 1.0 and bool(known.any()):
            loss = loss + (1.0 - kd.alpha) * F.cross_entropy(s[known], target[known])
        return loss

    def evaluate(m, n_tokens: int) -> dict:  # every held-out row
        r = evaluate_classifier(m, val_seqs, val_y, pad_id, labels, device=dev)
        return {"loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "tokens": r["examples"]}

    task = Task(next_batch, loss_fn, evaluate, max(1, len(seqs) // bsz), torch.Generator().manual_seed(cfg.seed),
                rows, f"{len(texts):,} labelled + {len(unlabelled):,} unlabelled train / {len(val_texts):,} "
                f"held-out rows")
    info = {"labelled_rows": len(texts), "unlabelled_rows": len(unlabelled), "teacher_seconds": teacher_seconds}
    return task, (lambda n_tokens: evaluate(teacher, n_tokens)), info


def labelled_split(cfg, labels: list[str]) -> tuple[list, list, list, list]:
    """-> (training texts, their label ids, held-out texts, their label ids) in the teacher's label order."""
    from slmkit.data.labelled import read_labelled, stratified_split

    texts, names = [], []
    for f in expand_paths(cfg.data):
        t, n = read_labelled(f, cfg.text_col, cfg.label_col)
        texts, names = texts + t, names + n
    if cfg.eval_data:
        val_texts, val_names = read_labelled(cfg.eval_data, cfg.text_col, cfg.label_col)
    else:
        tr, va = stratified_split(names, cfg.val_fraction, cfg.seed)
        if len(va) == 0:
            raise SystemExit(f"error: {cfg.data[0]} has too few rows to hold some out; add rows or pass --eval-data")
        val_texts, val_names = [texts[i] for i in va], [names[i] for i in va]
        texts, names = [texts[i] for i in tr], [names[i] for i in tr]
    ids = {str(name): i for i, name in enumerate(labels)}
    for name in (*names, *val_names):
        if str(name) not in ids:
            raise SystemExit(f"error: label {name!r} (column {cfg.label_col!r}) is not one of the teacher's labels "
                             f"({', '.join(map(str, labels))}); distillation keeps the teacher's label set")
    return texts, [ids[str(n)] for n in names], val_texts, [ids[str(n)] for n in val_names]


def _unlabelled_texts(cfg) -> list[str]:
    from slmkit.data.labelled import COLUMNED, read_texts

    # --text-col names the labelled rows' column: plain text lines (no columns) are read whole
    return [t for f in expand_paths(cfg.unlabelled or [])
            for t in read_texts(f, cfg.text_col if f.suffix.lower() in COLUMNED else "text")]
