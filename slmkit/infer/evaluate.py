"""Verb `eval`: loss, perplexity and bits per byte of a model on held-out text.

Bits per byte makes models with different tokenizers comparable: the summed loss (nats) over the predicted tokens,
divided by ln 2 and by the UTF-8 bytes those tokens stand for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from slmkit.data.corpus import eval_windows


def to_json(result: dict) -> str:
    """One JSON object; a metric that does not apply (NaN, e.g. bits per byte of a masked LM) becomes null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    return json.dumps(clean, allow_nan=False)


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Mean loss in nats/token over TOKENS predicted tokens covering N_BYTES bytes -> bits per byte."""
    return loss * tokens / (math.log(2) * max(1, n_bytes))


def window_logits(model: torch.nn.Module, tokens: np.ndarray, starts: np.ndarray, block_size: int,
                  batch_size: int, device: str, autocast_dtype: torch.dtype | None):
    """Yield (rows, logits, targets) for the windows of TOKENS at STARTS, BATCH_SIZE windows at a time: rows (B, T+1)
    numpy token ids, logits (B, T, V) in fp32, targets (B, T). The caller sets eval mode and no_grad."""
    from slmkit.model.folder import logits_of

    for i in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s:s + block_size + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        xy = torch.from_numpy(rows).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = logits_of(model, xy[:, :-1])  # (B, T, V)
        yield rows, logits.float(), xy[:, 1:]


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, block_size: int, token_bytes: np.ndarray,
                    batch_size: int = 16, max_windows: int | None = None, device: str = "cpu",
                    autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean next-token loss over non-overlapping windows of TOKENS (thinned to MAX_WINDOWS)."""
    was_training = model.training
    model.eval()
    starts = eval_windows(tokens, block_size, max_windows)
    if len(starts) == 0:
        raise SystemExit(f"error: evaluation data has {len(tokens)} tokens, fewer than one window of {block_size}")
    total_loss, total_tokens, total_bytes = 0.0, 0, 0
    for rows, logits, y in window_logits(model, tokens, starts, block_size, batch_size, device, autocast_dtype):
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        total_loss += loss.item()
        total_tokens += y.numel()
        total_bytes += int(token_bytes[rows[:, 1:]].sum())
    model.train(was_training)
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)),
            "bits_per_byte": bits_per_byte(mean, total_tokens, total_bytes), "tokens": total_tokens}


# Temperatures fit_temperature tries: 1 to 1.5 in steps of ~2% (a grid: one pass over the data, no optimiser). It
# only softens: overconfidence after repeated passes is what it corrects. Sharpening (T < 1) was fitted once on a
# 120 KB corpus's 571 held-out tokens (T 0.986) and cost 0.009 bits/byte on unseen text (docs/benchmarks.md).
TEMPERATURES = np.exp(np.linspace(0.0, math.log(1.5), 21)).round(4).tolist()


@torch.no_grad()
def fit_temperature(model: torch.nn.Module, tokens: np.ndarray, block_size: int, device: str = "cpu",
                    autocast_dtype: torch.dtype | None = None,
                    max_logits: int = 64_000_000) -> tuple[float, float, float]:
    """Temperature scaling (Guo et al., 2017): the T among TEMPERATURES (T = 1 first) that minimises the mean
    next-token loss of logits / T over TOKENS, on at most MAX_LOGITS logits' worth of windows. Returns (T, loss at
    T = 1, loss at T).

    A model trained for several passes over a small corpus ends overconfident: on tiny Shakespeare after ~4.5
    passes, T = 1.02-1.04 fitted on the 1% held out lowered the loss on the next play by 0.004-0.009 bits/byte
    (docs/benchmarks.md)."""
    was_training = model.training
    model.eval()
    sums, count = torch.zeros(len(TEMPERATURES), dtype=torch.float64), 0
    starts = eval_windows(tokens, block_size, None)
    # one window at a time: the cap on logits is known only once the first window shows the vocabulary
    for _, logits, y in window_logits(model, tokens, starts, block_size, 1, device, autocast_dtype):
        for i, t in enumerate(TEMPERATURES):
            sums[i] += torch.nn.functional.cross_entropy(logits[0] / t, y[0], reduction="sum").item()
        count += block_size
        if count * logits.shape[-1] >= max_logits:
            break
    model.train(was_training)
    losses = (sums / max(1, count)).tolist()
    best = min(range(len(losses)), key=losses.__getitem__)
    return TEMPERATURES[best], losses[0], losses[best]


_LABELLED = {"block_size": "labelled rows are read whole, each text up to the model's own length",
             "max_tokens": "every labelled row is scored",
             "replace_errors": "labelled rows are read as UTF-8; re-encode the file",
             "skip_bad_lines": "labelled rows are read whole; fix or drop the malformed row"}
# The flags only some folders or data read: given where nothing would read it, each is refused in one line
# (refuse_for). The keys: a router or classifier folder on labelled rows, a decoder on chat JSONL or on text.
UNUSED = {
    "router": {**_LABELLED, "batch_size": "a router classifies 32 texts per pass"},
    "classifier": _LABELLED,
    "chat": {"text_col": "chat rows are read from their messages (or prompt/response) fields",
             "label_col": "chat rows have no labels (--label-col is for classifier and router folders)",
             "max_tokens": "every conversation is scored",
             "replace_errors": "chat JSONL is read as UTF-8; re-encode the file"},
    "text": {"label_col": "text has no labels (--label-col is for classifier and router folders)"},
}


def refuse_for(kind: str, given: dict) -> None:
    """One line for a flag of GIVEN that `slm eval` on KIND (a key of UNUSED) would not read."""
    from slmkit.options import defaults_of, refuse_unused

    what = {"router": "a router folder", "classifier": "a classifier folder", "chat": "chat JSONL",
            "text": "text"}.get(kind, kind)
    refuse_unused(f"`slm eval` on {what}", given, UNUSED[kind], defaults_of(main))


def main(model_dir: Path, data: list[str], text_col: str = "text", block_size: int | None = None,
         batch_size: int = 8, max_tokens: int | None = None, replace_errors: bool = False,
         as_json: bool = False, skip_bad_lines: bool = False, label_col: str = "label", device: str = "auto") -> dict:
    """Evaluate the model in MODEL_DIR on DATA: loss, perplexity, bits per byte, token count.

    On chat JSONL ({"messages": [...]} or {"prompt", "response"} rows): loss and perplexity on assistant tokens.
    On a classifier folder (labelled CSV/JSONL/Parquet rows): loss, accuracy, macro-F1 and a per-class report.
    On a router folder (`slm route train`; rows {"text", "label": ROUTE}): routing accuracy and the confusion matrix.
    """
    from slmkit.data.chat import is_chat_jsonl
    from slmkit.data.corpus import expand_paths, load_tokens, tokenize_to_memmap
    from slmkit.data.mlm import masked_lm_evaluator
    from slmkit.hardware import pick_device
    from slmkit.infer.classify import evaluate_file, is_classifier
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.presets import is_encoder
    from slmkit.model.tokenizer import load_tokenizer, token_byte_lengths
    from slmkit.options import check_numbers

    check_numbers(dict(block_size=block_size, batch_size=batch_size, max_tokens=max_tokens),
                  {"block_size": "tokens per window; leave it out for the model's context",
                   "batch_size": "windows per forward pass", "max_tokens": "tokens to score; leave it out for all"})
    model_dir = Path(model_dir)
    from slmkit.compose.router import evaluate_router, is_router

    given = dict(text_col=text_col, label_col=label_col, block_size=block_size, batch_size=batch_size,
                 max_tokens=max_tokens, replace_errors=replace_errors, skip_bad_lines=skip_bad_lines)
    if is_router(model_dir):  # a router: routing accuracy and the confusion matrix (slmkit/compose/router.py)
        refuse_for("router", given)
        return evaluate_router(model_dir, data, text_col, label_col, as_json, pick_device(device))
    cfg = read_config(model_dir)
    if is_classifier(cfg):  # sequence classifiers: accuracy and macro-F1 on labelled rows (slmkit/classify.py)
        refuse_for("classifier", given)
        return evaluate_file(model_dir, data, text_col, label_col, batch_size, as_json, pick_device(device))
    tokenizer = load_tokenizer(model_dir)
    dev = pick_device(device)
    files = expand_paths(data)
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 1024
    if all(is_chat_jsonl(f) for f in files):  # chat rows: loss on the assistant tokens, as `finetune --task sft`
        refuse_for("chat", given)
        return _evaluate_chat(model_dir, files, tokenizer, min(block_size or context, context), batch_size,
                              skip_bad_lines, as_json, dev)
    refuse_for("text", given)
    bin_path, meta = tokenize_to_memmap(files, tokenizer, text_col=text_col, replace_errors=replace_errors,
                                        skip_bad_lines=skip_bad_lines)
    tokens = load_tokens(bin_path, meta)
    block = min(block_size or context, context, max(2, len(tokens) - 2))
    max_windows = None if max_tokens is None else max(1, max_tokens // block)
    if is_encoder(cfg):  # masked-LM loss on the masked tokens; bits per byte does not apply (slmkit/encoders.py)
        model, evaluate_fn = masked_lm_evaluator(model_dir, tokenizer)
    else:
        model, evaluate_fn = load_model(model_dir), evaluate_tokens
    result = evaluate_fn(model.to(dev), tokens, block, token_byte_lengths(tokenizer), batch_size=batch_size,
                         max_windows=max_windows, device=dev)
    if as_json:
        print(to_json(result))
    else:
        print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
              f"bits/byte {result['bits_per_byte']:.4f} | tokens {result['tokens']:,}")
    return result


def _evaluate_chat(model_dir: Path, files, tokenizer, block: int, batch_size: int, skip_bad_lines: bool,
                   as_json: bool, device: str = "cpu") -> dict:
    from slmkit.data.chat import build_examples, evaluate_chat, pad_id_of, read_conversations
    from slmkit.infer.load import load_model

    examples = build_examples(read_conversations(files, skip_bad_lines), tokenizer, block)
    result = evaluate_chat(load_model(model_dir).to(device), examples, pad_id_of(tokenizer), batch_size, device)
    if as_json:
        print(to_json(result))
    else:
        print(f"assistant-token loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
              f"tokens {result['tokens']:,}")
    return result


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="model folder (written by `slm train` or a Hugging Face folder)")
    p.add_argument("--data", nargs="+", required=True, help="held-out text: .txt/.md files, dirs, globs, JSONL, CSV, "
                   "Parquet")
    p.add_argument("--text-col", default="text", help="text field/column for JSONL, CSV and Parquet (default: text)")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens (evenly spread)")
    p.add_argument("--replace-errors", action="store_true", help="replace undecodable bytes instead of failing")
    p.add_argument("--label-col", default="label", help="classifier and router folders: label (route) column "
                   "(default: label)")
    p.add_argument("--skip-bad-lines", action="store_true", help="JSONL: skip malformed rows (with a warning)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:1 …")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print one JSON object with keys loss, perplexity, bits_per_byte, tokens")
