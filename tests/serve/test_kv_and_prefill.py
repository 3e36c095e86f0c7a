"""The engine's key/value memory (grown as needed within --kv-memory) and its chunked prompt reading (a new prompt
rides along with the decode steps of the rows already streaming, a chunk per step), on a tiny random model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_server import decode_concurrently, model_folders, running  # noqa: E402

from slmkit.infer.generate import SamplingParams, generate_ids, load  # noqa: E402
from slmkit.serve.batching import Engine, Finish, Token  # noqa: E402
from slmkit.serve.kv import parse_memory  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("kv"))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def test_a_long_prompt_is_read_between_the_tokens_of_a_stream_without_stalling_it(folders):
    lm = load(folders["tiny"])
    engine = Engine(lm, max_batch=4, prefill_chunk=8).start()
    a_steps: list[int] = []  # engine.steps (forward passes so far) when each of A's tokens was sampled
    b_first: list[int] = []
    b_submitted = threading.Event()
    long_prompt = (lm.encode("the dog sat on the log. ") * 20)[:60]

    def a_sink(ev):
        if isinstance(ev, Token):
            a_steps.append(engine.steps)
            if len(a_steps) == 3:  # A is streaming: B arrives with a prompt of 60 tokens, 8 read per step
                engine.submit(long_prompt, greedy(5), b_sink)
                b_submitted.set()

    def b_sink(ev):
        if isinstance(ev, Token) and not b_first:
            b_first.append(engine.steps)

    try:
        done = threading.Event()
        engine.submit(lm.encode("the cat"), greedy(40), lambda ev: (a_sink(ev), isinstance(ev, Finish) and done.set()))
        assert done.wait(30) and b_submitted.is_set()
        t0 = time.time()
        while not b_first and time.time() - t0 < 10:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert len(a_steps) == 40
    assert all(b - a == 1 for a, b in zip(a_steps, a_steps[1:], strict=False))  # a token after every single pass
    assert b_first and b_first[0] - a_steps[2] >= 60 // 8  # B's prompt took ceil(60 / 8) passes, shared with A
    assert engine.max_step_tokens <= 1 + 8  # A's token and one chunk, never the whole prompt at once


def test_chunked_reading_gives_the_tokens_of_a_whole_prompt_prefill(folders):
    lm = load(folders["tiny"])
    prompts = [lm.encode(s) for s in ["the dog sat on the log. the cat sat on the mat. the", "x", "hello there"]]
    expected = [list(generate_ids(lm.model, ids, greedy(20), lm.eos_ids, lm.context)) for ids in prompts]
    engine = Engine(lm, max_batch=3, prefill_chunk=3).start()  # long prompts take several passes
    try:
        got = decode_concurrently(engine, prompts, greedy(20))
    finally:
        engine.stop()
    assert got == expected


def test_kv_memory_bounds_the_cache_queues_what_does_not_fit_and_frees_it_when_idle(folders):
    lm = load(folders["tiny"])
    prompts = [lm.encode(s) for s in ["the cat", "the dog", "a log", "hello"]]
    need = max(len(p) for p in prompts) + 30  # positions one request may reach: its prompt and max_tokens
    probe = Engine(lm, max_batch=8)
    budget = 2 * need * probe.kv.position_bytes  # room for two of them at a time
    engine = Engine(lm, max_batch=8, kv_memory=budget)
    peak = []
    forward = engine._forward
    engine._forward = lambda *a: (forward(*a), peak.append(engine.kv.allocated_bytes))  # after each growth
    expected = [list(generate_ids(lm.model, ids, greedy(30), lm.eos_ids, lm.context)) for ids in prompts]
    engine.start()
    try:
        got = decode_concurrently(engine, prompts, greedy(30))
        t0 = time.time()
        while engine.kv.allocated_bytes and time.time() - t0 < 5:
            time.sleep(0.01)
        assert engine.kv.allocated_bytes == 0  # idle: the cache's memory is given back
        with pytest.raises(ValueError, match=r"--kv-memory .* lower max_tokens"):  # could never fit: refused now
            engine.submit(prompts[0], greedy(3 * need), lambda ev: None)
    finally:
        engine.stop()
    assert got == expected  # every request answered, the later ones after a row came free
    assert engine.max_seen_batch == 2 and max(peak) <= budget


def test_a_lone_row_is_allocated_for_what_it_needs_not_the_context(folders):
    lm = load(folders["tiny"])
    engine = Engine(lm, max_batch=16).start()
    sizes = []
    try:
        for _ in engine.generate(lm.encode("the cat"), greedy(10)):
            sizes.append((engine.kv.rows, engine.kv.length))
    finally:
        engine.stop()
    rows, length = max(sizes)  # (the engine may free the cache before the last token is read here)
    assert rows == 1 and 0 < length < lm.context  # not 16 x 256: one row, rounded up from 2 + 10 positions


@pytest.mark.parametrize("text, n", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("800kb", 800 << 10),
                                     ("1000000", 1_000_000)])
def test_kv_memory_sizes_parse(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("setting, message", [
    (dict(kv_memory="lots"), "--kv-memory 'lots' is not a size: give bytes or a number with K, M, G or T, e.g. 2G"),
    (dict(kv_memory="0"), "--kv-memory '0' must be positive"),
    (dict(prefill_chunk=0), "--prefill-chunk 0 must be positive"),
    (dict(draft_tokens=3), "--draft-tokens does not apply without --draft")])
def test_kv_memory_and_prefill_chunk_errors_are_one_line(setting, message, tmp_path):
    from slmkit.serve import main as serve

    with pytest.raises(SystemExit, match="^error: " + message) as e:
        serve([str(tmp_path / "no-model")], **setting)
    assert "\n" not in str(e.value)


def test_http_request_over_the_kv_budget_is_a_400_and_a_slow_tokenizer_does_not_block_the_loop(folders):
    from slmkit.serve import load_served
    from slmkit.serve.app import create_app
    from slmkit.serve.protocol import Settings

    m = load_served("tiny", folders["tiny"], max_batch=2, kv_memory=40 * 256)  # 40 positions of the tiny model
    encode = m.lm.encode
    m.lm.encode = lambda text: (time.sleep(2) if text == "slow" else None, encode(text))[1]
    app = create_app({"tiny": m}, Settings(max_tokens_limit=200))

    async def go(url):
        async with httpx.AsyncClient(timeout=30) as c:
            slow = asyncio.create_task(c.post(url + "/v1/completions", json={"model": "tiny", "prompt": "slow",
                                                                               "max_tokens": 3}))
            await asyncio.sleep(0.3)  # the slow request is being tokenized now
            t0 = time.perf_counter()
            health = await c.get(url + "/health")
            waited = time.perf_counter() - t0
            big = await c.post(url + "/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 100})
            return await slow, health, waited, big

    with running(app) as url:
        slow, health, waited, big = asyncio.run(go(url))
    assert slow.status_code == 200 and health.status_code == 200
    assert waited < 1.0  # answered while the other request's tokenizer still ran (2 s)
    assert big.status_code == 400 and big.json()["error"]["code"] == "kv_memory_exceeded"


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "gemma3_text", "lfm2", "qwen3_next", "mamba2"])
def test_a_transformers_decoder_is_batched_with_the_tokens_it_gives_alone(tmp_path, model_type):
    """An imported decoder that is not our Llama (a tiny GPT-2, Qwen2, Gemma 3 with a sliding window shorter than
    the rows, a hybrid of attention and per-row states: LFM2's short convolutions, Qwen3-Next's gated delta rule; or
    Mamba-2, states only)
    shares forward passes (hf_batch.py: left-padded rows, joining and leaving mid-stream) and every row gets the
    tokens it would get alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slmkit.model.tokenizer import byte_tokenizer

    shapes = {"gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256),
              "qwen2": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, max_position_embeddings=256),
              "gemma3_text": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=16, intermediate_size=128, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"]),
              "lfm2": dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, max_position_embeddings=256,
                           layer_types=["conv", "full_attention", "conv"]),
              "qwen3_next": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, intermediate_size=128, linear_num_value_heads=4, linear_num_key_heads=2,
                                 linear_key_head_dim=16, linear_value_head_dim=16, num_experts=0,
                                 moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                 layer_types=["linear_attention", "full_attention"]),
              "mamba2": dict(num_hidden_layers=2, hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=1,
                             expand=2, conv_kernel=4, chunk_size=16)}
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        **shapes[model_type]))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load(tmp_path)
    prompts = [lm.encode(s) for s in ["the cat sat on the mat", "x", "hello there, how are you today?"]]
    expected = [list(generate_ids(lm.model, ids, greedy(24), lm.eos_ids, lm.context)) for ids in prompts]
    engine = Engine(lm, max_batch=4).start()
    try:
        assert engine.hf is not None
        got = decode_concurrently(engine, prompts, greedy(24))
        later = decode_concurrently(engine, prompts[:1], greedy(24))  # after the batch emptied
    finally:
        engine.stop()
    assert got == expected and later == expected[:1]
    assert engine.max_seen_batch >= 2  # they shared passes
