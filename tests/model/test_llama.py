import pytest
import torch

from slmkit.infer.load import load_model
from slmkit.model.folder import build_model, load_saved_weights, save_model
from slmkit.model.llama import decode_layout
from slmkit.model.presets import build_config


def _model(vocab=300, **overrides):
    torch.manual_seed(0)
    return build_model(build_config("slm-tiny", vocab, overrides, block_size=64))


def test_saved_folder_opens_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model().eval()
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_untied_head_and_custom_rope_round_trip(tmp_path):
    model = _model(tie_word_embeddings=False, rope_theta=50000.0).eval()
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    assert again.lm_head is not None


def test_kv_cache_decoding_equals_full_forward():
    model = _model().eval()
    x = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 30)
        prefill = model(x[:, :12], cache=cache, pos=0)
        steps = [model(x[:, i:i + 1], cache=cache, pos=i) for i in range(12, 30)]
    torch.testing.assert_close(prefill, full[:, :12], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], rtol=1e-4, atol=1e-5)


def test_one_token_decode_step_equals_full_forward():
    # step() is the batch-1 decode path generate() uses: its own ops (matrix-vector products, rotary as a matrix),
    # so it must give forward()'s logits, with grouped-query attention, a tied head and an untied one.
    for overrides in ({}, {"tie_word_embeddings": False, "num_key_value_heads": 2}):
        model = _model(**overrides).eval()
        x = torch.randint(0, 300, (1, 30))
        with torch.no_grad():
            full = model(x)
            cache = model.new_cache(1, 30)
            model(x[:, :12], cache=cache, pos=0)
            steps = torch.stack([model.step(int(x[0, i]), cache, i) for i in range(12, 30)])  # (18, V)
        torch.testing.assert_close(steps, full[0, 12:], rtol=1e-4, atol=1e-5)


def test_every_consumer_runs_the_one_block_definition():
    """The training forward, the eager step, the compiled step and the ONNX graph supply primitives only (products,
    rotary, attention with its cache); the block's sequence is BlockOps' alone. The compiled step wraps attn_in to
    cast to the cache's dtype inside its kernel, around the shared one."""
    from slmkit.edge.export_onnx import OnnxOps
    from slmkit.infer.decode import CompiledStepOps
    from slmkit.model.block import BlockOps
    from slmkit.model.llama import ForwardOps, StepOps

    for ops in (ForwardOps, StepOps, OnnxOps, CompiledStepOps):
        assert ops.block is BlockOps.block and ops.attn_out_mlp is BlockOps.attn_out_mlp
        for primitive in ("project", "add_product", "rotary", "attend"):
            assert getattr(ops, primitive) is not getattr(BlockOps, primitive), (ops, primitive)
    assert all(ops.attn_in is BlockOps.attn_in for ops in (ForwardOps, StepOps, OnnxOps))


def test_decode_layout_keeps_the_function(tmp_path):
    # Inference relays weights out as (in, out) storage for faster matrix-vector products and folds each block's
    # RMSNorm weights into the matrix they feed: same shapes, same logits from forward() and step(), idempotent, and
    # the folder saved afterwards is the same model. Trained norm weights are not ones: random ones here.
    model = _model(tie_word_embeddings=False).eval()
    with torch.no_grad():
        for b in model.layers:
            b.attn_norm.uniform_(0.5, 1.5)
            b.mlp_norm.uniform_(0.5, 1.5)
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        full = model(x)
        decode_layout(model)
        once = [p.clone() for p in model.parameters()]
        decode_layout(model)
        assert all(torch.equal(a, b) for a, b in zip(once, model.parameters(), strict=True))  # folded once
        b = model.layers[0]
        assert b.norms_folded and torch.equal(b.attn_norm, torch.ones_like(b.attn_norm))
        w = b.wqkv.weight
        assert w.stride() == (1, w.shape[0]) and model.embed.weight.stride() == (1, 300)
        torch.testing.assert_close(model(x), full)
        cache = model.new_cache(1, 20)
        model(x[:, :10], cache=cache, pos=0)
        torch.testing.assert_close(model.step(int(x[0, 10]), cache, 10), full[0, 10], rtol=1e-4, atol=1e-5)
        save_model(model, tmp_path)
        torch.testing.assert_close(load_model(tmp_path)(x), full)


def test_matvec_reads_a_large_weight_in_one_block_per_thread(monkeypatch):
    # With several threads, a weight decode_layout marked `split_rows` is read as slabs of rows through one bmm,
    # one per thread: the same numbers as mv, with and without the residual; step() gives the same logits either
    # way. decode_layout marks weights by size, with a lower floor once the model no longer fits in cache.
    from slmkit.model import llama as models

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _f=real, **kw: (calls.append(_n), _f(*a, **kw))[1])
    try:
        lin = decode_layout(torch.nn.Linear(48, 64, bias=False))
        assert not lin.split_rows  # 3k elements: mv
        x, r = torch.randn(48), torch.randn(64)
        for split in (False, True):  # mv/addmv, then the slabs: scale and residual ride on the product
            lin.split_rows = split
            torch.testing.assert_close(models.matvec(lin, x), torch.mv(lin.weight, x))
            torch.testing.assert_close(models.matvec(lin, x, residual=r), torch.addmv(r, lin.weight, x))
            torch.testing.assert_close(models.matvec(lin, x, scale=0.3), 0.3 * torch.mv(lin.weight, x))
            torch.testing.assert_close(models.matvec(lin, x, 0.3, r), r + 0.3 * torch.mv(lin.weight, x))
        assert calls == ["bmm", "baddbmm", "baddbmm", "baddbmm"]
        odd = decode_layout(torch.nn.Linear(47, 64, bias=False))  # 47 inputs do not split in 2: plain mv
        odd.split_rows = True
        models.matvec(odd, torch.randn(47))
        assert len(calls) == 4

        two = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(256, 256), torch.nn.Linear(16, 16))
        assert [m.split_rows for m in decode_layout(two)] == [True, False, False]  # fits in cache: >= 1 MB only
        monkeypatch.setattr(models, "CACHED_MODEL_BYTES", 0)  # as if it streamed from RAM: >= 256 KB
        two = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(256, 256), torch.nn.Linear(16, 16))
        assert [m.split_rows for m in decode_layout(two)] == [True, True, False]

        monkeypatch.setattr(models, "SPLIT_MIN_ELEMENTS", {"cached": 0, "streamed": 0})
        model = decode_layout(_model().eval())
        with torch.no_grad():
            cache = model.new_cache(1, 12)
            model(torch.arange(10)[None], cache=cache, pos=0)
            calls.clear()
            split = model.step(7, cache, 10)
            assert len(calls) > 4
            for m in model.modules():
                m.split_rows = False
            calls.clear()
            whole = model.step(7, cache, 10)
            assert calls == []  # unsplit: mv/addmv only
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_matvec_on_bf16_weights(monkeypatch, bf16_units):
    """bf16 weights take torch.mv on CPUs with bf16 units (faster there) and F.linear's product without them: the
    same numbers either way, scale and residual included, and a bf16 decode step matches the full forward."""
    from slmkit.model import llama as models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: bf16_units)
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: (calls.append("mv"), real_mv(*a))[1])
    lin = torch.nn.Linear(48, 64, bias=False).to(torch.bfloat16)
    x, r = torch.randn(48, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    ref = (lin.weight.float() @ x.float())
    torch.testing.assert_close(models.matvec(lin, x).float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(models.matvec(lin, x, 0.5, r).float(), r.float() + 0.5 * ref, rtol=2e-2, atol=2e-2)
    assert calls == (["mv", "mv"] if bf16_units else [])
    model = _model().eval().to(torch.bfloat16)
    with torch.no_grad():
        idx = torch.arange(11)[None]
        cache = model.new_cache(1, 12)
        model(idx[:, :10], cache=cache, pos=0)
        torch.testing.assert_close(model.step(10, cache, 10).float(), model(idx)[0, -1].float(), rtol=0.05, atol=0.05)


def test_saved_weights_load_back_into_a_live_model(tmp_path):
    """Early stopping restores the best weights from the folder into the training model: ours, GPT-Neo (tied head,
    stored once) and a BERT masked LM alike; a folder of another model is refused."""
    from transformers import BertConfig, BertForMaskedLM

    neo = build_model(build_config("gpt-neo-125m", 300, {"num_layers": 1, "attention_types": [[["global"], 1]],
                                                         "hidden_size": 32, "num_heads": 2}, block_size=64))
    bert = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))
    for i, model in enumerate([_model(), neo, bert]):
        save_model(model, tmp_path / str(i))
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        load_saved_weights(model, tmp_path / str(i))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    with pytest.raises(SystemExit, match="does not hold the weights of this BertForMaskedLM.*missing bert"):
        load_saved_weights(bert, tmp_path / "1")


@pytest.mark.parametrize("tied", [True, False])
def test_scale_logits_scales_every_logit_exactly(tied, tmp_path):
    """Folded into the final norm, so the folder (and transformers) computes the scaled logits too."""
    from transformers import AutoModelForCausalLM

    from slmkit.model.folder import scale_logits

    model = _model(tie_word_embeddings=tied).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(x)
        assert scale_logits(model, 0.8)
        torch.testing.assert_close(model(x), 0.8 * before, rtol=1e-5, atol=1e-6)
    save_model(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, 0.8 * before,
                                   rtol=1e-5, atol=1e-6)


def test_scale_logits_on_gpt_neo_and_refuses_an_unknown_architecture():
    from transformers import BertConfig, BertForMaskedLM, GPTNeoConfig, GPTNeoForCausalLM

    from slmkit.model.folder import scale_logits

    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                         attention_types=[[["global", "local"], 1]], max_position_embeddings=64)).eval()
    x = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        before = neo(x).logits
        assert scale_logits(neo, 1.5)
        torch.testing.assert_close(neo(x).logits, 1.5 * before, rtol=1e-5, atol=1e-5)
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    assert not scale_logits(bert, 2.0)


@pytest.mark.parametrize("n_kv", [4, 2])  # multi-head and grouped-query
def test_causal_attention_written_out_under_bf16_autocast_matches_sdpa(n_kv, monkeypatch):
    import torch.nn.functional as F

    from slmkit.model import llama as models

    torch.manual_seed(0)
    q = torch.randn(3, 4, 50, 16, requires_grad=True)
    k, v = (torch.randn(3, n_kv, 50, 16, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != 4)  # fp32
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    calls, baddbmm = [], torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **kw: calls.append(1) or baddbmm(*a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = models.causal_attention(q, k, v)
    assert calls and y.dtype == torch.bfloat16  # the written-out path ran, in bf16
    grads = torch.autograd.grad(y.float().square().sum(), (q, k, v))
    # bf16's rounding (the flash kernel under the same autocast is ~0.01 off too); causal: no future token leaks in
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.02)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() < 0.02 * r.abs().max()
    calls.clear()
    assert torch.equal(models.causal_attention(q, k, v), ref)  # fp32: SDPA itself
    assert not calls


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_residual_dropout_drops_p_and_keeps_the_mean(p):
    """The CPU's cheaper dropout: a share p of elements zeroed, the rest scaled by 1 / (1 - p) (so the mean holds),
    the gradient through the same mask, and the masks set by the seed."""
    from slmkit.model.llama import residual_dropout

    x = torch.ones(1000, 1001, requires_grad=True)  # an odd count: the last 64-bit word is partly used
    torch.manual_seed(0)
    y = residual_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.003 and abs(y.mean().item() - 1) < 0.006
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx = mask, and here y = mask
    torch.manual_seed(0)
    assert torch.equal(residual_dropout(x, p), y)
    assert not torch.equal(residual_dropout(x, p), y)  # the next draw differs


def test_blocks_use_dropout_only_while_training():
    from slmkit.model.llama import set_dropout

    torch.manual_seed(0)
    model = build_model(build_config("slm-tiny", 64, block_size=16))
    x = torch.randint(64, (2, 16))
    set_dropout(model, 0.2)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, ref) and not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
