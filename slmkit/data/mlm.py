"""Masked-LM pretraining for the BERT family: dynamic masking, the batch function, the loss and held-out evaluation.

`slm train --preset bert-mini` runs the same loop as decoders (`train.fit`); only these three pieces differ:

    token stream -> random windows of BLOCK-1 tokens -> [CLS] + window -> mask 15% (80% [MASK], 10% random, 10% kept)
                 -> cross-entropy on the masked positions only

Masking is dynamic (RoBERTa): it is drawn afresh for every batch from the run's sampler generator, whose state the
checkpoint holds, so `--resume` continues the same trajectory. Documents stay separated by [SEP] as the token
stream stores them. Bits per byte does not apply to a masked LM: evaluation reports NaN for it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MASK_PROB = 0.15  # share of (non-special) tokens the model must predict, as in BERT
MASK_SPLIT = (0.8, 0.1)  # of those: replaced by [MASK], by a random token; the remaining 10% are left unchanged


class MaskInfo(NamedTuple):
    """What masking needs to know about the tokenizer."""
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    cls_id: int


# What to do about a tokenizer mask_info refuses, in `slm train`'s flags; other verbs (eval, distill) have no
# tokenizer flags and pass their own advice.
TRAIN_FIX = "use --tokenizer wordpiece or --tokenizer-from a BERT-family model folder"


def mask_info(tokenizer, fix: str = TRAIN_FIX) -> MaskInfo:
    """MaskInfo for TOKENIZER, or a one-line error (ending in FIX) when it cannot be used for masked-LM training."""
    if tokenizer.mask_token_id is None:
        raise SystemExit(f"error: this tokenizer has no [MASK] token, which masked-LM training needs; {fix}")
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if cls is None:
        raise SystemExit(f"error: this tokenizer has no [CLS] token; {fix}")
    return MaskInfo(int(tokenizer.mask_token_id), len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))),
                    int(cls))


def pick_tokenizer(kind: str | None, encoder: bool, tokenizer_from: str | None = None) -> str:
    """`--tokenizer` default: WordPiece for encoders, byte-level BPE for decoders. BPE and bytes have no [MASK]
    token, so an encoder refuses them before any work is done."""
    if encoder and kind in ("bpe", "byte") and not tokenizer_from:
        raise SystemExit(f"error: --tokenizer {kind} has no [MASK] token, which masked-LM training needs; use "
                         "--tokenizer wordpiece (the default for encoder presets) or --tokenizer-from a BERT folder")
    return kind or ("wordpiece" if encoder else "bpe")


def mask_tokens(ids: torch.Tensor, info: MaskInfo, gen: torch.Generator,
                prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's dynamic masking. ids: (B, T) -> inputs (B, T), labels (B, T) with -100 where nothing is predicted.

    Each non-special token is selected with probability PROB; a selected token becomes [MASK] (80%), a random
    non-special token (10%) or stays itself (10%), and its label is the original id. At least one token is selected,
    so the loss is never an empty mean.
    """
    special = torch.isin(ids, torch.tensor(info.special_ids, dtype=ids.dtype))
    selected = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    if not selected.any() and (~special).any():
        selected.view(-1)[(~special).view(-1).nonzero()[0]] = True
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    to_mask = selected & (r < MASK_SPLIT[0])
    to_random = selected & (r >= MASK_SPLIT[0]) & (r < MASK_SPLIT[0] + MASK_SPLIT[1])
    ordinary = torch.ones(info.vocab_size, dtype=torch.bool)
    ordinary[list(info.special_ids)] = False
    pool = ordinary.nonzero().squeeze(1)  # ids a random replacement may take
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=gen)]
    inputs = torch.where(to_mask, torch.full_like(ids, info.mask_id), ids)
    inputs = torch.where(to_random, random_ids.to(ids.dtype), inputs)
    return inputs, labels


def windows_with_cls(tokens: np.ndarray, starts, block_size: int, cls_id: int) -> torch.Tensor:
    """[CLS] + the BLOCK_SIZE-1 tokens from each start: (B, BLOCK_SIZE) int64."""
    rows = np.stack([tokens[s:s + block_size - 1] for s in starts]).astype(np.int64)  # (B, T-1)
    cls = np.full((len(rows), 1), cls_id, dtype=np.int64)
    return torch.from_numpy(np.concatenate([cls, rows], axis=1))  # (B, T)


def get_mlm_batch(tokens: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, info: MaskInfo,
                  device: str = "cpu", starts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows masked afresh: (inputs, labels), both (B, T). STARTS(batch_size) gives the windows' offsets (e.g.
    data.EpochSampler.take); without it the generator draws them at random. The generator draws the masks."""
    if starts:
        ix = starts(batch_size)
    else:
        ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=gen).tolist()
    x, y = mask_tokens(windows_with_cls(tokens, ix, block_size, info.cls_id), info, gen)
    if device != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def mlm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (labels -100 elsewhere). No padding: windows are full."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, tokens: np.ndarray, block_size: int, token_bytes=None,
                 batch_size: int = 16, max_windows: int | None = None, device: str = "cpu",
                 autocast_dtype: torch.dtype | None = None, *, info: MaskInfo, seed: int = 0) -> dict:
    """Masked-LM loss on non-overlapping held-out windows, masked with a fixed seed so evaluations compare.

    Same signature as `evaluate.evaluate_tokens` (TOKEN_BYTES unused: bits per byte is NaN for a masked LM).
    `tokens` counts the predicted (masked) tokens.
    """
    from slmkit.data.corpus import eval_windows

    was_training = model.training
    model.eval()
    starts = eval_windows(tokens, block_size, max_windows)
    if len(starts) == 0:
        raise SystemExit(f"error: evaluation data has {len(tokens)} tokens, fewer than one window of {block_size}")
    gen = torch.Generator().manual_seed(seed)
    total_loss, total = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = mask_tokens(windows_with_cls(tokens, starts[i:i + batch_size], block_size, info.cls_id), info, gen)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(input_ids=x).logits  # (B, T, V)
        total_loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                      reduction="sum").item()
        total += int((y != -100).sum())
    model.train(was_training)
    mean = total_loss / max(1, total)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "bits_per_byte": float("nan"), "tokens": total}


def masked_lm_evaluator(model_dir, tokenizer):
    """`slm eval` on an encoder folder: (masked-LM model, evaluate function with evaluate_tokens' signature)."""
    from transformers import AutoModelForMaskedLM

    from slmkit.model.weights import open_pretrained

    model = open_pretrained(AutoModelForMaskedLM, model_dir).eval()
    fix = f"{model_dir}'s tokenizer cannot mask: its masked-LM loss cannot be measured"
    return model, partial(evaluate_mlm, info=mask_info(tokenizer, fix))


def mlm_task(tokenizer, train_tokens: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator,
             device: str = "cpu", starts=None):
    """What `slm train` plugs into `fit` for an encoder: (next_batch, loss_fn, evaluate_fn)."""
    info = mask_info(tokenizer)
    if len(train_tokens) <= block_size:
        raise SystemExit(f"error: the corpus has {len(train_tokens):,} training tokens, too few for --block-size "
                         f"{block_size}; add data or lower --block-size")
    return (lambda: get_mlm_batch(train_tokens, batch_size, block_size, gen, info, device, starts), mlm_loss,
            partial(evaluate_mlm, info=info))
