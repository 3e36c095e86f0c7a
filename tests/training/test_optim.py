"""Optimizers (slmkit/training/optim.py): AdamW, and MuonAdamW (Muon on hidden matrices, AdamW on the rest)."""

import pytest
import torch
from tiny_models import TINY

from slmkit.model.llama import Llama
from slmkit.training import optim
from slmkit.training.optim import MuonAdamW, make_optimizer, orthogonalize

# Newton-Schulz runs in bf16 on CPUs with fast bf16 products and in fp32 on the rest: both paths, on any host
both_precisions = pytest.mark.parametrize("bf16_fast", [False, True], ids=["fp32", "bf16"])


@both_precisions
def test_orthogonalize_gives_singular_values_near_one(monkeypatch, bf16_fast):
    monkeypatch.setattr(optim, "cpu_bf16_fast", lambda: bf16_fast)
    g = torch.randn(96, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # badly conditioned, tall
    s = torch.linalg.svdvals(orthogonalize(g))
    # quintic Newton-Schulz stops short of exact orthogonality by design: singular values land in ~[0.5, 1.5]
    assert orthogonalize(g).shape == g.shape and orthogonalize(g).dtype == g.dtype
    assert s.min() > 0.4 and s.max() < 1.6, s


@both_precisions
def test_orthogonalize_a_stack_is_each_matrix_on_its_own(monkeypatch, bf16_fast):
    monkeypatch.setattr(optim, "cpu_bf16_fast", lambda: bf16_fast)
    # MuonAdamW orthogonalises every same-shaped part of the model in one stack; that must not mix the matrices
    g = torch.randn(5, 24, 40)
    torch.testing.assert_close(orthogonalize(g), torch.stack([orthogonalize(m) for m in g]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(orthogonalize(g.mT), orthogonalize(g).mT, rtol=1e-4, atol=1e-5)  # tall stacks too


def test_muonadamw_without_muon_groups_is_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([{"params": list(b.parameters()), "weight_decay": 0.1}], lr=1e-2)
    for _ in range(5):
        x = torch.randn(16, 8)
        for m, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_muon_covers_hidden_matrices_splits_fused_projections_and_lowers_the_loss():
    torch.manual_seed(0)
    cfg = {**TINY, "vocab_size": 64}
    model = Llama(cfg)
    opt = make_optimizer(model, 3e-3, 0.1, "cpu", "muon")
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (p.dim() == 2 and "embed" not in name and "lm_head" not in name), name
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    splits = sorted(g["splits"] for g in opt.param_groups if g["muon"])
    assert [cfg["num_attention_heads"] * hd] + [cfg["num_key_value_heads"] * hd] * 2 in splits
    assert [cfg["intermediate_size"]] * 2 in splits
    x = torch.randint(0, cfg["vocab_size"], (4, 17))
    losses = []
    for _ in range(20):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_muon_momentum_ramps_up_over_the_warmup_then_holds():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = MuonAdamW([{"params": [w], "muon": True, "splits": [8], "weight_decay": 0.0}], lr=0.0, momentum_warmup=4)
    g = torch.randn(8, 8)
    expected = torch.zeros(8, 8)
    for t, beta in enumerate([0.85, 0.875, 0.9, 0.925, 0.95, 0.95], start=1):
        w.grad = g * t  # a new gradient each step, so the buffer depends on every beta
        opt.step()
        expected = beta * expected + (1 - beta) * w.grad
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], expected)
    assert int(opt.state[w]["step"]) == 6  # saved with the optimizer state: a resumed run keeps its place


def test_a_checkpoint_from_before_the_momentum_ramp_still_resumes():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = MuonAdamW([{"params": [w], "muon": True, "splits": [8], "weight_decay": 0.0}], lr=0.0)
    old = opt.state_dict()
    del old["param_groups"][0]["momentum_warmup"]  # what an older slmkit saved
    opt.load_state_dict(old)
    w.grad = torch.ones(8, 8)
    opt.step()  # no KeyError; full momentum from the first step, as that run had
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.full((8, 8), 0.05))


def test_a_resumed_muon_keeps_the_newton_schulz_precision_it_started_with(monkeypatch):
    """The precision rests on a timing (cpu_bf16_fast) that a new process can measure differently: it is chosen
    once, kept in the param groups and restored from a checkpoint, so a resumed run continues the same trajectory."""
    torch.manual_seed(0)
    model = Llama({**TINY, "vocab_size": 64})
    monkeypatch.setattr(optim, "cpu_bf16_fast", lambda: True)
    first = make_optimizer(model, 1e-2, 0.1, "cpu", "muon")
    assert any(g["muon"] and g["ns_bf16"] for g in first.param_groups)
    monkeypatch.setattr(optim, "cpu_bf16_fast", lambda: False)  # the resumed process measured otherwise
    resumed = make_optimizer(model, 1e-2, 0.1, "cpu", "muon")
    assert not any(g["ns_bf16"] for g in resumed.param_groups)
    resumed.load_state_dict(first.state_dict())
    assert all(g["ns_bf16"] for g in resumed.param_groups)
    seen = []
    monkeypatch.setattr(optim, "orthogonalize", lambda g, steps, bf16=None: seen.append(bf16) or g)
    model(torch.randint(64, (2, 8))).sum().backward()
    resumed.step()
    assert seen and all(seen)  # Newton-Schulz ran in the run's bf16, not the new measurement's fp32
