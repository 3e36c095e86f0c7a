"""The losses a training run swaps in: loss_fn(model, x, y) -> a scalar, what `fit` minimises.

x: (B, T) token ids; y: (B, T) targets, -100 (IGNORE) where no loss is taken. Both compute the output head and the
cross-entropy chunk by chunk (training/chunked.py): a step never holds its whole (B*T, vocabulary) logits.
"""

from __future__ import annotations

import torch

from slmkit.training.chunked import cross_entropy


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that count."""
    return cross_entropy(model, x, y)


def sft_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled (assistant) tokens; 0 for a batch without any (keeps the loss finite)."""
    return cross_entropy(model, x, y)
