"""The endpoints: module-level functions on one APIRouter that translate HTTP <-> the engine, and nothing else.

What `create_app` put on `app.state` (the models, the settings, the metrics) reaches a route through small
dependencies, so each route reads as a plain function of its request. Every error is raised before the first byte of
a response (validation, auth, limits, overload), so a streamed reply never ends in a half-written error.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from slmkit.compose.cascade_serve import cascade_classify, cascade_reply
from slmkit.compose.router_serve import chat_text, remote_of, remote_reply, route_request, routed_reply
from slmkit.hardware import in_fresh_thread_async
from slmkit.infer.generate import SamplingParams, TextStream
from slmkit.serve.batching import Finish, Overloaded, Token
from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import (
    APIError,
    ChatCompletion,
    ChatRequest,
    ClassificationList,
    ClassifyRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ModelList,
    Settings,
    sse_event,
)
from slmkit.serve.registry import Served

STATIC = Path(__file__).parent / "static"
USED_WITH = {"decoder": "completions and chat", "encoder": "/v1/embeddings", "classifier": "/v1/classify",
             "remote": "completions and chat", "router": "completions and chat"}

router = APIRouter()


# -- dependencies: the app's state, read per request -------------------------------------------------------------
async def get_models(request: Request) -> dict[str, Served]:
    return request.app.state.models


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


Models = Annotated[dict[str, Served], Depends(get_models)]
ServerSettings = Annotated[Settings, Depends(get_settings)]
ServerMetrics = Annotated[Metrics, Depends(get_metrics)]


def check_key(request: Request, settings: ServerSettings) -> None:
    """401 unless the request carries one of the server's API keys (none configured: every request passes)."""
    if not settings.api_keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
    ok = False
    for k in settings.api_keys:  # every key is compared, in constant time, so timing reveals neither key nor match
        ok |= hmac.compare_digest(given, k.encode())
    if not ok:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                       code="invalid_api_key")


AUTH = [Depends(check_key)]  # /v1 and /metrics; the page and /health stay open for browsers and probes


def lookup(models: dict[str, Served], name: str, kind: str) -> Served:
    """The model NAME, which must be a KIND: else 404 (unknown) or 400 (e.g. an encoder asked for a completion)."""
    m = models.get(name)
    if m is None:
        raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists: {', '.join(models)}",
                       param="model", code="model_not_found")
    if m.kind != kind:
        raise APIError(400, f"model {name!r} is a {m.kind}: use it with {USED_WITH[m.kind]}", param="model",
                       code="wrong_model_kind")
    return m


# -- pages and plumbing ------------------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/health")
async def health(models: Models) -> dict:
    return {"status": "ok", "models": list(models)}


@router.get("/metrics", dependencies=AUTH, response_class=PlainTextResponse)
async def prometheus(models: Models, metrics: ServerMetrics) -> PlainTextResponse:
    engines = {n: m.engine for n, m in models.items() if m.engine is not None}
    return PlainTextResponse(metrics.render(engines), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=AUTH, response_model=ModelList)
async def list_models(request: Request, models: Models) -> dict:
    created = request.app.state.created
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "slmkit",
                                        "kind": m.kind, "context_length": m.context} for n, m in models.items()]}


# -- generation ----------------------------------------------------------------------------------------------------
@router.post("/v1/completions", dependencies=AUTH, response_model=Completion)
async def completions(req: CompletionRequest, request: Request, models: Models, settings: ServerSettings,
                      metrics: ServerMetrics):
    prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
    if isinstance(req.prompt, list) and len(req.prompt) > 1:
        raise APIError(400, "one prompt per request (use n for several choices)", param="prompt")
    routed = await route_request(models, req, prompt, metrics)  # model `auto`: req.model becomes the chosen route
    if (remote := remote_of(models, req.model)) is not None:  # NAME=URL (compose/router_serve.py)
        return await remote_reply(req, remote, prompt, None, settings, routed)
    m = lookup(models, req.model, "decoder")
    ids = await asyncio.to_thread(m.lm.encode, prompt)  # off the event loop, which streams every other reply
    job = check_prompt(req, m, prompt, req.max_tokens, False, req.logprobs, settings, ids)
    if m.cascade is not None:  # the small model, then maybe the large one (compose/cascade_serve.py)
        return routed_reply(await cascade_reply(job, None, metrics), routed)
    return routed_reply(await reply(request, job, metrics), routed)


@router.post("/v1/chat/completions", dependencies=AUTH, response_model=ChatCompletion)
async def chat_completions(req: ChatRequest, request: Request, models: Models, settings: ServerSettings,
                           metrics: ServerMetrics):
    from slmkit.infer.chat import render_prompt

    messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.content or ""}
                for x in req.messages]
    routed = await route_request(models, req, chat_text(messages), metrics)  # `auto`: on the last user message
    if (remote := remote_of(models, req.model)) is not None:
        return await remote_reply(req, remote, None, messages, settings, routed)
    m = lookup(models, req.model, "decoder")
    try:  # in a worker thread, as the tokenizing: a long conversation must not hold up every stream's next token
        prompt = await asyncio.to_thread(render_prompt, m.lm.tokenizer, messages)
    except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template rejects these messages: {e}", param="messages") from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    ids = await asyncio.to_thread(m.lm.encode, prompt)
    job = check_prompt(req, m, prompt, req.max_completion_tokens or req.max_tokens, True, top, settings, ids)
    if m.cascade is not None:
        return routed_reply(await cascade_reply(job, messages, metrics), routed)
    return routed_reply(await reply(request, job, metrics), routed)


@dataclass
class Job:
    """One decoder request that passed the checks: what the engine gets and what the reply's JSON needs."""

    req: CompletionRequest | ChatRequest
    m: Served
    prompt: str
    ids: list[int]  # the prompt's tokens
    max_new: int
    chat: bool  # chat.completion shapes, else text_completion
    top: int | None  # log probabilities of the chosen and TOP likeliest tokens; None: no logprobs

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def check_prompt(req: CompletionRequest | ChatRequest, m: Served, prompt: str, max_tokens: int | None, chat: bool,
                 top: int | None, settings: Settings, ids: list[int] | None = None) -> Job:
    """PROMPT (tokenized as IDS, or here) checked against the model's context and the server's limits, or a 400
    naming the limit."""
    ids = m.lm.encode(prompt) if ids is None else ids
    limit = min(settings.max_prompt_tokens or m.context, m.context - 1)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) > limit:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit} for "
                       f"{req.model!r} (context {m.context})", param="messages", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    if max_tokens is not None and len(ids) + max_tokens > m.context:
        raise APIError(400, f"this model's context is {m.context} tokens; the prompt ({len(ids)}) plus max_tokens "
                       f"({max_tokens}) is {len(ids) + max_tokens}: shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    if len(req.stop_list()) > 4:
        raise APIError(400, "at most 4 stop strings", param="stop")
    max_new = max_tokens or min(settings.max_tokens_limit, m.context - len(ids))
    return Job(req, m, prompt, ids, max_new, chat, top)


async def reply(request: Request, job: Job, metrics: Metrics) -> dict | StreamingResponse:
    """JOB's completion: a whole JSON object, or (stream=true) a response of SSE chunks that has already started
    decoding, so that an overload is a 429 rather than a broken stream."""
    rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
    gen = events(request, job, metrics)
    if not job.req.stream:
        return await whole_reply(job, rid, gen)
    first = await _first(gen)  # errors (overload) surface before the response starts
    return StreamingResponse(sse_lines(job, rid, first, gen), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def submit_all(job: Job) -> tuple[asyncio.Queue, list]:
    """Queue req.n sequences; their events arrive, tagged with the choice index, on one asyncio queue."""
    req = job.req
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    handles = []
    try:
        for i in range(req.n):
            p = SamplingParams(max_new_tokens=job.max_new, temperature=req.temperature, top_k=0, top_p=req.top_p,
                               seed=None if req.seed is None else req.seed + i, stop=req.stop_list())
            sink = lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev))  # noqa: E731
            handles.append(job.m.engine.submit(job.ids, p, sink, job.top))
    except (Overloaded, ValueError) as e:
        for h in handles:
            h.cancel()
        if isinstance(e, ValueError):  # more key/value memory than --kv-memory holds, even alone
            raise APIError(400, str(e), param="max_tokens", code="kv_memory_exceeded") from None
        raise APIError(429, str(e), "rate_limit_exceeded", code="server_busy",
                       headers={"Retry-After": str(e.retry_after)}) from None
    return q, handles


async def watch_disconnect(request: Request, handles: list) -> None:
    """Cancel HANDLES once the client of a whole (not streamed) reply hangs up: that reply has no write to fail.
    A task beside the reply, so the token loop waits on its queue alone (no timer per token)."""
    while True:
        await asyncio.sleep(0.5)
        if await request.is_disconnected():
            for h in handles:
                h.cancel()
            return


async def events(request: Request, job: Job,
                 metrics: Metrics) -> AsyncIterator[tuple[int, str, Token | None, Finish | None]]:
    """(choice, text piece, token, finish) as they come; stop strings end a choice; cancels on exit."""
    q, handles = submit_all(job)
    streams = [TextStream(job.m.lm.tokenizer, job.req.stop_list()) for _ in handles]
    open_ = set(range(len(handles)))
    t0, first = time.perf_counter(), True
    # a stream learns of a hang-up from its failed write (Starlette then closes this generator)
    watcher = None if job.req.stream else asyncio.create_task(watch_disconnect(request, handles))
    try:
        while open_:
            i, ev = await q.get()  # cancelled rows end with Finish("cancelled"), so this never waits forever
            if i not in open_:
                continue
            if isinstance(ev, Token):
                if first:
                    metrics.first_token(time.perf_counter() - t0)
                    first = False
                yield i, streams[i].push(ev.id), ev, None
                if streams[i].stopped:
                    handles[i].cancel()
                    open_.discard(i)
                    yield i, "", None, Finish("stop", len(job.ids), len(streams[i].ids))
                continue
            open_.discard(i)
            if ev.reason == "error":
                raise APIError(500, ev.message, "server_error")
            yield i, streams[i].finish(), None, Finish(ev.reason if ev.reason != "cancelled" else "stop",
                                                       len(job.ids), ev.completion_tokens)
    finally:
        if watcher is not None:
            watcher.cancel()
        for h in handles:
            h.cancel()
        metrics.tokens(job.m.name, len(job.ids) * len(handles), sum(len(s.ids) for s in streams))


async def sse_lines(job: Job, rid: str, first, gen: AsyncIterator) -> AsyncIterator[str]:
    """The stream=true reply: a role chunk per choice (chat), a chunk per text piece or finish, the usage chunk if
    asked, then [DONE]; closing GEN cancels the sequences when the client leaves."""
    req, completion = job.req, 0
    base = {"id": rid, "object": job.object + (".chunk" if job.chat else ""), "created": int(time.time()),
            "model": req.model}
    if job.chat:
        for i in range(req.n):
            yield sse_event({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
    try:
        async for i, piece, tok, fin in _chain(first, gen):
            if tok is not None:
                completion += 1
            if not piece and fin is None and job.top is None:
                continue
            yield sse_event({**base, "choices": [chunk_choice(job, i, piece, tok, fin)]})
        if req.stream_options and req.stream_options.include_usage:
            n_prompt = len(job.ids)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}
            yield sse_event({**base, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()  # client gone or done: cancel the sequences, free their rows


def chunk_choice(job: Job, i: int, piece: str, tok: Token | None, fin: Finish | None) -> dict:
    """One streamed choice: a chat delta or a text piece, with the token's logprobs when asked."""
    choice: dict = {"index": i, "finish_reason": fin.reason if fin else None}
    with_logprobs = job.top is not None and tok is not None
    if job.chat:
        choice["delta"] = {"content": piece} if piece or fin is None else {}
        if with_logprobs:
            choice["logprobs"] = {"content": [logprob_entry(job.m, tok)]}
    else:
        choice["text"] = piece
        if with_logprobs:
            choice["logprobs"] = legacy_logprobs([logprob_entry(job.m, tok)])
    return choice


async def whole_reply(job: Job, rid: str, gen: AsyncIterator) -> dict:
    """The stream=false reply: every choice's text, finish reason and (if asked) logprobs, with the usage."""
    n = job.req.n
    texts: list[list[str]] = [[] for _ in range(n)]
    toks: list[list[Token]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    completion = 0
    async for i, piece, tok, fin in gen:
        texts[i].append(piece)
        if tok is not None:
            toks[i].append(tok)
            completion += 1
        if fin is not None:
            reasons[i] = fin.reason
    usage = {"prompt_tokens": len(job.ids), "completion_tokens": completion,
             "total_tokens": len(job.ids) + completion}
    choices = [whole_choice(job, i, "".join(texts[i]), toks[i], reasons[i]) for i in range(n)]
    return {"id": rid, "object": job.object, "created": int(time.time()), "model": job.req.model,
            "choices": choices, "usage": usage}


def whole_choice(job: Job, i: int, text: str, toks: list[Token], reason: str | None) -> dict:
    entries = [logprob_entry(job.m, t) for t in toks] if job.top is not None else None
    if job.chat:
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": {"content": entries} if entries is not None else None}
    return {"index": i, "text": (job.prompt if job.req.echo else "") + text, "finish_reason": reason,
            "logprobs": None if entries is None else legacy_logprobs(entries)}


def logprob_entry(m: Served, tok: Token) -> dict:
    """A token's chat-API logprobs: its text, log probability, UTF-8 bytes and the likeliest alternatives."""
    dec = lambda t: m.lm.tokenizer.decode([t])  # noqa: E731
    return {"token": dec(tok.id), "logprob": tok.logprob, "bytes": list(dec(tok.id).encode()),
            "top_logprobs": [{"token": dec(t), "logprob": lp, "bytes": list(dec(t).encode())} for t, lp in tok.top]}


def legacy_logprobs(entries: list[dict]) -> dict:
    """/v1/completions' older shape of the same ENTRIES: parallel lists, alternatives as {token: logprob}."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{x["token"]: x["logprob"] for x in e["top_logprobs"]} for e in entries]}


async def _first(gen: AsyncIterator):
    """The first item of GEN (None if empty), so errors raised while starting surface before the response."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen: AsyncIterator):
    if first is not None:
        yield first
        async for x in gen:
            yield x


# -- encoders ------------------------------------------------------------------------------------------------------
def texts_of(inp: str | list[str], settings: Settings) -> list[str]:
    """The input texts of an embeddings or classify request: 1 to settings.max_inputs, none empty."""
    texts = [inp] if isinstance(inp, str) else list(inp)
    if not texts or any(not t for t in texts):
        raise APIError(400, "input must be a non-empty text or a list of non-empty texts", param="input")
    if len(texts) > settings.max_inputs:
        raise APIError(400, f"at most {settings.max_inputs} texts per request", param="input")
    return texts


@router.post("/v1/embeddings", dependencies=AUTH, response_model=EmbeddingList)
async def embeddings(req: EmbeddingRequest, models: Models, settings: ServerSettings, metrics: ServerMetrics) -> dict:
    from slmkit.infer.embed import embed

    m = lookup(models, req.model, "encoder")
    texts = texts_of(req.input, settings)
    n_tokens = sum(len(m.tokenizer(t)["input_ids"]) for t in texts)
    async with m.lock:  # one forward pass at a time per model; the event loop stays free meanwhile
        vecs = await in_fresh_thread_async(embed, m.path, texts, 32, None, m.device, m.model, m.tokenizer,
                                           m.pooling)
    if req.dimensions is not None:
        vecs = vecs[:, :req.dimensions]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype(np.float32).tobytes()).decode()
             if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vecs)]
    metrics.tokens(m.name, n_tokens, 0)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


@router.post("/v1/classify", dependencies=AUTH, response_model=ClassificationList)
async def classify(req: ClassifyRequest, models: Models, settings: ServerSettings, metrics: ServerMetrics) -> dict:
    from slmkit.infer.classify import encode, max_length_for, pad_id_for, predict_logits

    m = lookup(models, req.model, "classifier")
    texts = texts_of(req.input, settings)
    if m.cascade is not None:
        return await cascade_classify(req, m, texts, metrics)
    seqs = encode(m.tokenizer, texts, max_length_for(m.model.config, m.tokenizer, None))
    async with m.lock:
        logits = await in_fresh_thread_async(predict_logits, m.model, seqs, pad_id_for(m.tokenizer), 32, m.device)
    probs = torch.softmax(logits, dim=-1)
    p, idx = probs.topk(min(req.top_k, len(m.labels)), dim=-1)  # (N, k)
    n_tokens = sum(map(len, seqs))
    metrics.tokens(m.name, n_tokens, 0)
    data = [{"index": i, "labels": [{"label": m.labels[j], "score": q} for q, j in zip(rp, ri, strict=True)]}
            for i, (rp, ri) in enumerate(zip(p.tolist(), idx.tolist(), strict=True))]
    return {"object": "list", "model": req.model, "data": data,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
