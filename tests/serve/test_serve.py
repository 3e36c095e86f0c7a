"""`slm serve`: the batching engine without HTTP, then a real uvicorn server on loopback driven by the official
`openai` client, httpx and schemathesis (tiny random-weight models: behaviour, not quality)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_server import decode_concurrently, model_folders, running, serve_folders, slowed  # noqa: E402

from slmkit.infer.generate import SamplingParams, generate_ids, load  # noqa: E402
from slmkit.serve.batching import Engine, Overloaded  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(folders):
    """One server for the API tests: decoder, encoder, classifier; no key."""
    app = serve_folders(folders, max_tokens_limit=200, max_body_bytes=20_000)
    with running(app) as url:
        yield url, app


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


# -- the engine, no HTTP ----------------------------------------------------------------------------------------
def test_batched_decoding_matches_batch_1_decoding_token_for_token(folders):
    lm = load(folders["tiny"])
    prompts = [lm.encode(s) for s in ["the cat", "hello there, how are you", "the dog sat on the log. the", "x"]]
    expected = [list(generate_ids(lm.model, ids, greedy(25), lm.eos_ids, lm.context)) for ids in prompts]
    engine = Engine(lm, max_batch=4).start()
    try:
        got = decode_concurrently(engine, prompts, greedy(25))
    finally:
        engine.stop()
    assert got == expected
    assert engine.max_seen_batch > 1  # the sequences really shared forward passes


def test_a_lone_request_takes_the_batch_1_step_and_decodes_the_same(folders):
    lm = load(folders["tiny"])
    ids = lm.encode("the dog sat on the log. the")
    expected = list(generate_ids(lm.model, ids, greedy(25), lm.eos_ids, lm.context))
    calls = []
    step = lm.model.step
    lm.model.step = lambda *a: calls.append(1) or step(*a)  # instance attribute: this test's model only
    engine = Engine(lm, max_batch=4).start()
    try:
        got = [t.id for t in engine.generate(ids, greedy(25))]
    finally:
        engine.stop()
    assert got == expected and len(calls) == len(expected) - 1  # every step after the prefill


def test_engine_reports_logprobs_and_frees_a_cancelled_row(folders):
    lm = load(folders["tiny"])
    engine = Engine(lm, max_batch=2).start()
    try:
        toks = list(engine.generate(lm.encode("the cat"), greedy(3), top_logprobs=2))
        assert len(toks) == 3 and all(t.logprob <= 0 and len(t.top) == 2 for t in toks)
        assert toks[0].top[0][0] == toks[0].id  # greedy picks the likeliest token
        it = engine.generate(lm.encode("the cat"), greedy(200))
        next(it)
        it.close()  # the consumer leaves: the request is cancelled
        t0 = time.time()
        while engine.active and time.time() - t0 < 5:
            time.sleep(0.01)
        assert engine.active == 0
    finally:
        engine.stop()


def test_a_full_queue_refuses_instead_of_growing(folders):
    lm = load(folders["tiny"])
    engine = Engine(lm, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    engine.running = True
    engine.submit(lm.encode("a"), greedy(5), lambda ev: None)
    with pytest.raises(Overloaded):
        engine.submit(lm.encode("b"), greedy(5), lambda ev: None)
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(3, 3 + lm.context)), greedy(5), lambda ev: None)


# -- the HTTP API through the official openai client ------------------------------------------------------------
def test_openai_client_chat_completions_and_embeddings(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list().data} == {"tiny", "enc", "clf"}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 0 and chat.usage.total_tokens == chat.usage.prompt_tokens + \
        chat.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, seed=1, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content  # streamed and whole replies agree
    comp = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=2, n=2)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text  # greedy: same text
    assert len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens // 2
    emb = client.embeddings.create(model="enc", input=["the cat sat", "good movie"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 32
    assert abs(sum(x * x for x in emb.data[0].embedding) - 1) < 1e-4


def test_sse_stream_ends_with_done_and_stop_strings_cut(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
    full = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30).json()["choices"][0]["text"]
    if len(full) > 2:
        stop = full[1:3]
        cut = httpx.post(url + "/v1/completions", json={**body, "stream": False, "stop": [stop]}, timeout=30).json()
        assert cut["choices"][0]["text"] == full[:full.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def test_classify_returns_labels_with_probabilities(server):
    url, _ = server
    r = httpx.post(url + "/v1/classify", json={"model": "clf", "input": ["good", "bad day"], "top_k": 2}, timeout=30)
    data = r.json()["data"]
    assert r.status_code == 200 and len(data) == 2
    assert {x["label"] for x in data[0]["labels"]} == {"neg", "pos"}
    assert abs(sum(x["score"] for x in data[0]["labels"]) - 1) < 1e-5


# -- errors: OpenAI's shape, before the first byte ---------------------------------------------------------------
@pytest.mark.parametrize("body, status, code", [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "enc", "prompt": "x"}, 400, "wrong_model_kind"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens_too_large"),
    ({"model": "tiny", "prompt": "the cat " * 200, "max_tokens": 5}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "the cat " * 60, "max_tokens": 150}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, None),
    ({"model": "tiny"}, 400, None),
    ({"model": "tiny", "prompt": "x" * 30_000}, 413, "body_too_large"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, code):
    url, _ = server
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code


def test_api_keys_are_required_when_configured(folders):
    app = serve_folders({"tiny": folders["tiny"]}, api_keys=["k1", "k2"])
    with running(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes and the page need no key
        assert httpx.get(url + "/").status_code == 200


def test_cors_is_off_unless_an_origin_is_given(folders):
    from fastapi.testclient import TestClient

    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(serve_folders({"enc": folders["enc"]}))
    assert "access-control-allow-origin" not in closed.options("/v1/embeddings", headers=pre).headers
    opened = TestClient(serve_folders({"enc": folders["enc"]}, cors_origins=["http://app.example"]))
    r = opened.options("/v1/embeddings", headers=pre)
    assert r.headers["access-control-allow-origin"] == "http://app.example"


# -- load, overload, cancellation ------------------------------------------------------------------------------
async def _chat(client, url, max_tokens: int, **kw):
    return await client.post(url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **kw})


def test_concurrent_clients_share_batches_without_errors(server):
    url, app = server
    engine = app.state.models["tiny"].engine

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[_chat(c, url, 20, seed=i) for i in range(8)])

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 8
    assert engine.max_seen_batch > 1
    text = httpx.get(url + "/metrics").text
    for name in ("slm_requests_total", "slm_request_duration_seconds_bucket", "slm_completion_tokens_total",
                 "slm_queue_depth", "slm_time_to_first_token_seconds_count"):
        assert name in text


def test_overload_answers_429_with_retry_after(folders):
    app = serve_folders({"tiny": folders["tiny"]}, max_batch=1, max_queue=1)

    async def go(url):
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[_chat(c, url, 200, temperature=0) for _ in range(6)])

    with running(app) as url:
        rs = asyncio.run(go(url))
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and set(codes) <= {200, 429}
        busy = next(r for r in rs if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error"]["code"] == "server_busy"
        assert httpx.get(url + "/health").status_code == 200  # still alive


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(folders, stream):
    app = serve_folders({"tiny": folders["tiny"]}, max_batch=1)
    engine = app.state.models["tiny"].engine
    slowed(engine)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "temperature": 0,
            "stream": stream}
    with running(app) as url:
        if stream:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the reply has started; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        t0 = time.time()
        while (engine.active or engine.queue_depth) and time.time() - t0 < 3:
            time.sleep(0.02)
        assert engine.active == 0 and engine.steps < 120  # cancelled well before its 200 tokens (> 4 s)
        ok = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200


# -- schema fuzzing -------------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    url, app = server
    schema = schemathesis.openapi.from_dict(app.openapi())
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            r = case.call(base_url=url, timeout=30)
            assert r.status_code < 500, (case.method, case.path, case.body, r.text)

        check()


# -- the verb ------------------------------------------------------------------------------------------------
def test_slm_serve_starts_and_stops_cleanly_on_sigterm(folders, tmp_path):
    from tiny_server import free_port

    port = free_port()
    # the repo first, then whatever the caller's PYTHONPATH holds (dependencies installed with --target, say)
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", f"chat={folders['tiny']}", "--port", str(port),
                             "--threads", "1", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["models"] == ["chat"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("slm serve did not come up: " + proc.stdout.read())
        proc.send_signal(signal.SIGTERM)
        # uvicorn drains, runs the app's shutdown (engine threads end), then re-raises SIGTERM as its exit status
        assert proc.wait(20) in (0, -signal.SIGTERM)
        assert "serving chat (decoder, cpu)" in proc.stdout.read()  # --device cpu: where each model runs
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_errors_are_one_line(tmp_path, folders, monkeypatch):
    import torch

    from slmkit.serve import main

    with pytest.raises(SystemExit, match="not a folder"):
        main([str(tmp_path / "missing")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: .* sees 0 CUDA GPU"):
        main([str(folders["tiny"])], device="cuda")
    keys = tmp_path / "keys.txt"
    keys.write_text("# none\n")
    with pytest.raises(SystemExit, match="holds no keys"):
        main([str(tmp_path)], api_keys_file=keys)


@pytest.mark.parametrize("setting, message", [
    (dict(max_batch=0), "--max-batch 0 must be positive"),
    (dict(max_queue=0), "--max-queue 0 must be positive"),  # every request would get 429
    (dict(max_tokens_limit=0), "--max-tokens-limit 0 must be positive"),
    (dict(max_prompt_tokens=0), "--max-prompt-tokens 0 must be positive"),
    (dict(max_body_bytes=-1), "--max-body-bytes -1 must be positive"),
    (dict(threads=-1), "--threads -1 must be positive"),  # crashed in torch.set_num_threads
    (dict(port=70000), "--port 70000 must be in 1-65535"),  # crashed in bind()
    (dict(port=0), "--port 0 must be in 1-65535")])  # the OS picks a port the startup line would not show
def test_serve_names_a_setting_that_cannot_serve_before_loading(setting, message, tmp_path):
    from slmkit.serve import main as serve

    with pytest.raises(SystemExit, match="^error: " + message):
        serve([str(tmp_path / "no-model")], **setting)


def test_a_streamed_event_stays_one_line_for_clients_that_split_on_unicode_line_breaks():
    """httpx (and str.splitlines) end a line at U+2028, U+2029 and NEL too; a generated one cut an SSE event in two."""
    import json

    from httpx._decoders import LineDecoder

    from slmkit.serve.protocol import sse_event

    text = "a\u2028b\u2029c\x85d\ne é 日本 \U0001f600"
    lines = [line for line in LineDecoder().decode(sse_event({"choices": [{"text": text}]})) if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["text"] == text
    assert "é 日本" in lines[0]  # other text stays readable UTF-8
