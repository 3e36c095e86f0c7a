"""Chat rows -> token ids whose labels cover the assistant turns only: the data side of `slm finetune --task sft`
and of `slm eval` on chat JSONL.

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}   (OpenAI format)
    {"prompt": ..., "response": ...}   (optional "system")

A conversation is rendered with the model's chat template (ChatML when it has none) into one text. The character
span of every assistant turn (its content and end-of-turn marker) is found by rendering growing prefixes of the
conversation; tokens that start inside such a span keep their id as the label, every other token gets -100, which
the cross-entropy ignores. So the model learns to answer, not to predict the user.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

IGNORE = -100  # label of tokens that carry no loss (torch's cross_entropy ignore_index default)
ROLES = {"system", "user", "assistant", "tool", "developer"}

# ----------------------------------------------------------------------------------------------------------------
# Rows -> conversations


def is_chat_jsonl(path: Path) -> bool:
    """Is PATH a JSONL file whose first row is a chat row (messages, or prompt + response)?"""
    if Path(path).suffix.lower() not in {".jsonl", ".json"}:
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("messages" in row or ("prompt" in row and "response" in row))
    return False


def row_to_messages(row: object) -> list[dict]:
    """One JSONL row -> a list of {"role", "content"} messages. Raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f'message {i} needs a "role" ({", ".join(sorted(ROLES))}) and a string "content"')
            out.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in row and "response" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            raise ValueError('"prompt" and "response" must be strings')
        out = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        if isinstance(row.get("system"), str) and row["system"]:
            out.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise ValueError('expected a "messages" list or "prompt" and "response" fields')
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant turn, so there is nothing to learn from it")
    return out


def read_conversations(files: list[Path], skip_bad_lines: bool = False) -> list[list[dict]]:
    """Every conversation in the chat JSONL FILES. A bad row is a one-line error naming file and line number
    (or, with SKIP_BAD_LINES, a warning)."""
    conversations = []
    from slmkit.data.corpus import iter_jsonl

    for f in files:
        for lineno, row in iter_jsonl(f, skip_bad_lines):
            try:
                conversations.append(row_to_messages(row))
            except ValueError as e:  # parsed, but not a usable conversation (no assistant turn, bad roles …)
                if skip_bad_lines:
                    print(f"warning: {f}:{lineno}: skipped: {e}", file=sys.stderr)
                    continue
                raise SystemExit(f"error: {f}:{lineno}: {e}; fix the line or pass --skip-bad-lines") from None
    if not conversations:
        raise SystemExit(f"error: no conversations in {', '.join(map(str, files[:3]))}")
    return conversations


# ----------------------------------------------------------------------------------------------------------------
# Conversation -> text, assistant spans, token ids and labels


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or ChatML (what slmkit writes into the tokenizers it trains)."""
    from slmkit.model.tokenizer import CHATML_TEMPLATE

    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def assistant_spans(render: Callable[[list[dict], bool], str], messages: list[dict]) -> tuple[str, list[tuple]]:
    """The rendered conversation and the [start, end) character span of each assistant turn in it.

    RENDER(messages, add_generation_prompt) -> text. A turn's span starts where the prompt for it ends (the prefix
    rendered with the generation prompt) and ends where the prefix including it ends.
    """
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(messages[:i + 1], False)
        if i == 0:  # an opening reply: templates may add a default system turn, so find the reply's own text
            start = max(0, upto.rfind(m["content"])) if m["content"] else 0
        else:
            before = render(messages[:i], True)
            start = len(before) if upto.startswith(before) else -1
        if start < 0 or not full.startswith(upto):
            raise SystemExit("error: the chat template does not render a conversation as a prefix of its "
                             "continuation, so assistant turns cannot be located; use a ChatML-style template")
        spans.append((start, len(upto)))
    return full, spans


def mask_non_assistant(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels for IDS: the id where the token (character OFFSETS [start, end)) starts inside an assistant span,
    IGNORE (-100) elsewhere. Tokens with an empty offset (added special tokens) are never labels."""
    labels = []
    for tid, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(a <= start < b for a, b in spans)
        labels.append(tid if inside else IGNORE)
    return labels


def encode_conversation(tokenizer, messages: list[dict], template: str | None = None) -> tuple[list[int], list]:
    """MESSAGES -> (token ids, labels): the text the chat template renders, tokenized as `slm chat` tokenizes its
    prompt (with the tokenizer's own special tokens), labels on assistant tokens only."""
    template = template or chat_template_of(tokenizer)

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)

    text, spans = assistant_spans(render, messages)
    enc = tokenizer(text, return_offsets_mapping=True)
    return enc["input_ids"], mask_non_assistant(enc["input_ids"], enc["offset_mapping"], spans)


def build_examples(conversations: list[list[dict]], tokenizer, block_size: int) -> list[tuple[np.ndarray, ...]]:
    """Tokenized (ids, labels) pairs cut to BLOCK_SIZE + 1 tokens; conversations left with no assistant token after
    the cut are dropped (with a note), since they would train nothing."""
    template = chat_template_of(tokenizer)
    examples, dropped = [], 0
    for messages in conversations:
        ids, labels = encode_conversation(tokenizer, messages, template)
        ids, labels = ids[:block_size + 1], labels[:block_size + 1]
        if all(t == IGNORE for t in labels[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        examples.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    if dropped:
        print(f"note: {dropped} conversation(s) had no assistant token within --block-size {block_size}; "
              "skipped them (raise --block-size to keep them)", file=sys.stderr)
    if not examples:
        raise SystemExit(f"error: no conversation has an assistant reply within --block-size {block_size}; "
                         "raise --block-size")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Batches


def padded_batch(examples: list, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ROWS -> x (B, T) right-padded with PAD_ID, y (B, T) next-token labels with IGNORE on padding.

    Right padding needs no attention mask: attention is causal, so real tokens never see the padding after them.
    """
    T = max(len(examples[r][0]) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids, labels = examples[r]
        n = len(ids) - 1
        x[i, :n] = torch.from_numpy(ids[:-1])
        y[i, :n] = torch.from_numpy(labels[1:])  # (T,): the label of position t is token t+1
    return x, y


def pack(examples: list) -> tuple[np.ndarray, np.ndarray]:
    """All examples end to end as one (ids, labels) stream, for --packing: no padding is computed."""
    return np.concatenate([e[0] for e in examples]), np.concatenate([e[1] for e in examples])


def packed_batch(stream: tuple[np.ndarray, np.ndarray], batch_size: int, block_size: int,
                 gen: torch.Generator, starts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the packed stream at STARTS (default: random block-aligned ones): x (B, T), y (B, T)."""
    ids, labels = stream
    if starts is None:
        n_windows = max(1, (len(ids) - 1) // block_size)
        starts = (torch.randint(n_windows, (batch_size,), generator=gen) * block_size).tolist()
    T = min(block_size, len(ids) - 1)
    x = torch.from_numpy(np.stack([ids[s:s + T] for s in starts]))  # (B, T)
    y = torch.from_numpy(np.stack([labels[s + 1:s + T + 1] for s in starts]))  # (B, T)
    return x, y


@torch.no_grad()
def evaluate_chat(model: torch.nn.Module, examples: list, pad_id: int, batch_size: int = 8,
                  device: str = "cpu") -> dict:
    """Mean loss on assistant tokens over EXAMPLES: {"loss", "perplexity", "tokens"}."""
    from slmkit.model.folder import logits_of

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = padded_batch(examples, list(range(i, min(i + batch_size, len(examples)))), pad_id)
        logits = logits_of(model, x.to(device))  # (B, T, V)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                   ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train(was_training)
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
