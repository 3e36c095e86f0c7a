"""The losses a training run swaps in: loss_fn(model, x, y) -> a scalar, what `fit` minimises.

x: (B, T) token ids; y: (B, T) targets, -100 (IGNORE) where no loss is taken.
"""

from __future__ import annotations

import torch

from slmkit.data.chat import IGNORE
from slmkit.model.folder import logits_of


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model, x)  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


def sft_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled (assistant) tokens; 0 for a batch without any (keeps the loss finite)."""
    logits = logits_of(model, x)  # (B, T, V)
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                              reduction="sum")
    return total / (y != IGNORE).sum().clamp(min=1)
