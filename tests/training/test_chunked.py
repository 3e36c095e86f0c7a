"""The chunked head loss equals cross-entropy over the whole logits: value and gradients, for slmkit's Llama and a
transformers model, with ignored targets and chunks that do not divide the rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit.training import chunked
from slmkit.training.chunked import IGNORE, cross_entropy, head_loss
from tests.tiny_models import TINY


def _llama(vocab: int = 97):
    from slmkit.model.llama import Llama

    torch.manual_seed(0)
    return Llama({**TINY, "vocab_size": vocab, "tie_word_embeddings": False})


def _reference(model, x, y):
    logits = model(x)
    total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return total / (y != IGNORE).sum().clamp(min=1)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_elements", [97 * 5, 97 * 32, 1 << 23])  # 5 rows a chunk (26, a ragged last), 32
# rows (4 chunks), or the whole logits (a step under 2 chunks)
def test_cross_entropy_matches_whole_logits(monkeypatch, chunk_elements):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk_elements)
    model = _llama()
    x = torch.randint(97, (4, 32))
    y = torch.randint(97, (4, 32))
    y[0, :20] = IGNORE  # a prompt: no loss there
    y[3] = IGNORE
    ours, ref = cross_entropy(model, x, y), _reference(model, x, y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g_ours, g_ref = _grads(model, cross_entropy(model, x, y)), _grads(model, _reference(model, x, y))
    assert set(g_ours) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tied_head_and_all_ignored(monkeypatch):
    from slmkit.model.llama import Llama

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 50 * 7)  # chunks of 7 rows
    torch.manual_seed(1)
    model = Llama({**TINY, "vocab_size": 50})  # tied: the head is the embedding, its gradient sums both uses
    x, y = torch.randint(50, (2, 16)), torch.randint(50, (2, 16))
    g_ours, g_ref = _grads(model, cross_entropy(model, x, y)), _grads(model, _reference(model, x, y))
    torch.testing.assert_close(g_ours["embed.weight"], g_ref["embed.weight"], rtol=1e-4, atol=1e-6)
    none = torch.full_like(y, IGNORE)
    loss = cross_entropy(model, x, none)
    assert loss.item() == 0.0 and loss.requires_grad  # finite, and backward still runs
    loss.backward()


def test_transformers_model_uses_the_chunked_path(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * 10)
    x, y = torch.randint(64, (2, 24)), torch.randint(64, (2, 24))
    h, w = chunked.hidden_and_head(model, x)
    assert h.shape == (2, 24, 32) and w is model.lm_head.weight
    ref = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(cross_entropy(model, x, y), ref, rtol=1e-5, atol=1e-5)


def test_head_loss_any_chunk_loss_and_bf16():
    """A loss without its own gradient goes through autograd chunk by chunk; under bf16 autocast the matmuls run
    in bf16 and the result stays close to fp32's."""
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    target = torch.randn(40, 30).softmax(-1)

    def soft_ce(z, rows):  # cross-entropy against soft targets
        return -(target[rows] * z.log_softmax(-1)).sum()

    ours = head_loss(h, w, soft_ce, scale=0.5, chunk=7)
    gh, gw = torch.autograd.grad(ours, (h, w))
    ref = 0.5 * -(target * (h @ w.t()).log_softmax(-1)).sum()
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head_loss(h, w, soft_ce, scale=0.5, chunk=7)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0.5)
