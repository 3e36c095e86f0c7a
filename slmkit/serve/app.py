"""The FastAPI app: routes translate HTTP <-> the engine, and nothing else.

Every error is raised before the first byte of a response (validation, auth, limits, overload), so a streamed
reply never ends in a half-written error; all errors use OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.infer.generate import SamplingParams, TextStream
from slmkit.serve import Served
from slmkit.serve.batching import Finish, Overloaded, Token
from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import (
    ChatCompletion,
    ChatRequest,
    ClassificationList,
    ClassifyRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    ModelList,
    Settings,
    error_body,
)

STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


class BodyLimit:
    """ASGI middleware: 413 for a body over LIMIT bytes, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = JSONResponse(error_body(f"the request body is over {self.limit} bytes", code="body_too_large"),
                               status_code=413)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"the request body is over {self.limit} bytes", code="body_too_large")
            return msg

        return await self.app(scope, counted, send)


class Timed:
    """ASGI middleware: count every request by path and status, time it to the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def timed_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.request(scope["path"], status[0], time.perf_counter() - t0)


def create_app(models: dict[str, Served], settings: Settings | None = None) -> FastAPI:
    """An app serving MODELS (name -> loaded model). Decoder engines are started here and stopped on shutdown."""
    from contextlib import asynccontextmanager

    settings = settings or Settings()
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in models.values():
            if m.engine is not None:
                m.engine.start()
        yield
        for m in models.values():  # SIGTERM: uvicorn drains connections, then we end the engine threads
            if m.engine is not None:
                m.engine.stop()

    app = FastAPI(title="slmkit", version="0.1.0", lifespan=lifespan, responses=ERRORS,
                  description="OpenAI-compatible API for small language models (slm serve).")
    app.state.models, app.state.settings = models, settings
    keys = [k.encode() for k in settings.api_keys]

    def check_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        ok = False
        for k in keys:  # every key is compared, in constant time, so timing reveals neither key nor match
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key")

    auth = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Timed, metrics=metrics)

    def get(name: str, kind: str) -> Served:
        m = models.get(name)
        if m is None:
            raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists: {', '.join(models)}",
                           param="model", code="model_not_found")
        if m.kind != kind:
            what = {"decoder": "completions and chat", "encoder": "/v1/embeddings", "classifier": "/v1/classify"}
            raise APIError(400, f"model {name!r} is a {m.kind}: use it with {what[m.kind]}", param="model",
                           code="wrong_model_kind")
        return m

    # -- pages and plumbing -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(models)}

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        engines = {n: m.engine for n, m in models.items() if m.engine is not None}
        return PlainTextResponse(metrics.render(engines), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "slmkit",
                                            "kind": m.kind, "context_length": m.context} for n, m in models.items()]}

    # -- generation ---------------------------------------------------------------------------------------------
    def prepare(req, m: Served, prompt: str, max_tokens: int | None) -> tuple[list[int], int]:
        ids = m.lm.encode(prompt)
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
        return ids, max_tokens or min(settings.max_tokens_limit, m.context - len(ids))

    def submit_all(m: Served, ids: list[int], req, max_new: int, top: int | None):
        """Queue req.n sequences; their events arrive, tagged with the choice index, on one asyncio queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        handles = []
        try:
            for i in range(req.n):
                p = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=0, top_p=req.top_p,
                                   seed=None if req.seed is None else req.seed + i, stop=req.stop_list())
                sink = lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev))  # noqa: E731
                handles.append(m.engine.submit(ids, p, sink, top))
        except Overloaded as e:
            for h in handles:
                h.cancel()
            raise APIError(429, str(e), "rate_limit_exceeded", code="server_busy",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return q, handles

    async def events(request: Request, m: Served, ids: list[int], req, max_new: int, top: int | None,
                     kind: str) -> AsyncIterator[tuple[int, str, Token | None, Finish | None]]:
        """(choice, text piece, token, finish) as they come; stop strings end a choice; cancels on exit."""
        q, handles = submit_all(m, ids, req, max_new, top)
        streams = [TextStream(m.lm.tokenizer, req.stop_list()) for _ in handles]
        open_ = set(range(len(handles)))
        t0, first = time.perf_counter(), True
        checked = t0
        try:
            while open_:
                try:
                    i, ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                # a whole (not streamed) reply has no write to fail when the client leaves: ask now and then
                if not req.stream and time.perf_counter() - checked > 0.5:
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                if i not in open_:
                    continue
                if isinstance(ev, Token):
                    if first:
                        metrics.first_token(time.perf_counter() - t0)
                        first = False
                    piece = streams[i].push(ev.id)
                    yield i, piece, ev, None
                    if streams[i].stopped:
                        handles[i].cancel()
                        open_.discard(i)
                        yield i, "", None, Finish("stop", len(ids), len(streams[i].ids))
                    continue
                open_.discard(i)
                if ev.reason == "error":
                    raise APIError(500, ev.message, "server_error")
                yield i, streams[i].finish(), None, Finish(ev.reason if ev.reason != "cancelled" else "stop",
                                                           len(ids), ev.completion_tokens)
        finally:
            for h in handles:
                h.cancel()
            metrics.tokens(m.name, len(ids) * len(handles), sum(len(s.ids) for s in streams))

    def logprob_entry(m: Served, tok: Token) -> dict:
        dec = lambda t: m.lm.tokenizer.decode([t])  # noqa: E731
        return {"token": dec(tok.id), "logprob": tok.logprob, "bytes": list(dec(tok.id).encode()),
                "top_logprobs": [{"token": dec(t), "logprob": lp, "bytes": list(dec(t).encode())} for t, lp in tok.top]}

    async def run(request: Request, req, m: Served, prompt: str, max_tokens: int | None, chat: bool,
                  top: int | None):
        ids, max_new = prepare(req, m, prompt, max_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        gen = events(request, m, ids, req, max_new, top, obj)
        if req.stream:
            first = await _first(gen)  # errors (overload) surface before the response starts

            async def sse() -> AsyncIterator[str]:
                completion = 0
                base = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": int(time.time()),
                        "model": req.model}
                if chat:
                    for i in range(req.n):
                        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]})
                try:
                    async for i, piece, tok, fin in _chain(first, gen):
                        if tok is not None:
                            completion += 1
                        if not piece and fin is None and top is None:
                            continue
                        choice: dict = {"index": i, "finish_reason": fin.reason if fin else None}
                        if chat:
                            choice["delta"] = {"content": piece} if piece or fin is None else {}
                            if top is not None and tok is not None:
                                choice["logprobs"] = {"content": [logprob_entry(m, tok)]}
                        else:
                            choice["text"] = piece
                            if top is not None and tok is not None:
                                e = logprob_entry(m, tok)
                                choice["logprobs"] = {"tokens": [e["token"]], "token_logprobs": [e["logprob"]],
                                                      "top_logprobs": [{x["token"]: x["logprob"]
                                                                        for x in e["top_logprobs"]}]}
                        yield _sse({**base, "choices": [choice]})
                    if req.stream_options and req.stream_options.include_usage:
                        n_prompt = len(ids)
                        yield _sse({**base, "choices": [], "usage": {"prompt_tokens": n_prompt,
                                                                      "completion_tokens": completion,
                                                                      "total_tokens": n_prompt + completion}})
                    yield "data: [DONE]\n\n"
                finally:
                    await gen.aclose()  # client gone or done: cancel the sequences, free their rows

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [[] for _ in range(req.n)]
        lps: list[list[Token]] = [[] for _ in range(req.n)]
        reasons: list[str | None] = [None] * req.n
        completion = 0
        async for i, piece, tok, fin in gen:
            texts[i].append(piece)
            if tok is not None:
                lps[i].append(tok)
                completion += 1
            if fin is not None:
                reasons[i] = fin.reason
        usage = {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}
        choices = []
        for i in range(req.n):
            text = "".join(texts[i])
            entries = [logprob_entry(m, t) for t in lps[i]] if top is not None else None
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reasons[i],
                          "logprobs": {"content": entries} if entries is not None else None}
            else:
                lp = None if entries is None else {
                    "tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{x["token"]: x["logprob"] for x in e["top_logprobs"]} for e in entries]}
                choice = {"index": i, "text": (prompt if req.echo else "") + text, "finish_reason": reasons[i],
                          "logprobs": lp}
            choices.append(choice)
        return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": usage}

    @app.post("/v1/completions", dependencies=auth, response_model=Completion)
    async def completions(req: CompletionRequest, request: Request):
        m = get(req.model, "decoder")
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
        if isinstance(req.prompt, list) and len(req.prompt) > 1:
            raise APIError(400, "one prompt per request (use n for several choices)", param="prompt")
        return await run(request, req, m, prompt, req.max_tokens, False, req.logprobs)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion)
    async def chat_completions(req: ChatRequest, request: Request):
        from slmkit.infer.chat import render_prompt

        m = get(req.model, "decoder")
        messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.content or ""}
                    for x in req.messages]
        try:
            prompt = render_prompt(m.lm.tokenizer, messages)
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await run(request, req, m, prompt, req.max_completion_tokens or req.max_tokens, True, top)

    # -- encoders -----------------------------------------------------------------------------------------------
    def texts_of(inp: str | list[str]) -> list[str]:
        texts = [inp] if isinstance(inp, str) else list(inp)
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be a non-empty text or a list of non-empty texts", param="input")
        if len(texts) > settings.max_inputs:
            raise APIError(400, f"at most {settings.max_inputs} texts per request", param="input")
        return texts

    @app.post("/v1/embeddings", dependencies=auth, response_model=EmbeddingList)
    async def embeddings(req: EmbeddingRequest):
        from slmkit.infer.embed import embed

        m = get(req.model, "encoder")
        texts = texts_of(req.input)
        n_tokens = sum(len(m.tokenizer(t)["input_ids"]) for t in texts)
        async with m.lock:  # one forward pass at a time per model; the event loop stays free meanwhile
            vecs = await asyncio.to_thread(embed, m.path, texts, 32, None, m.device, m.model, m.tokenizer)
        if req.dimensions is not None:
            vecs = vecs[:, :req.dimensions]
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype(np.float32).tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vecs)]
        metrics.tokens(m.name, n_tokens, 0)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/v1/classify", dependencies=auth, response_model=ClassificationList)
    async def classify(req: ClassifyRequest):
        from slmkit.infer.classify import _max_length, _pad_id, encode, predict_logits

        m = get(req.model, "classifier")
        texts = texts_of(req.input)
        seqs = encode(m.tokenizer, texts, _max_length(m.model.config, m.tokenizer, None))
        async with m.lock:
            logits = await asyncio.to_thread(predict_logits, m.model, seqs, _pad_id(m.tokenizer), 32, m.device)
        probs = torch.softmax(logits, dim=-1)
        p, idx = probs.topk(min(req.top_k, len(m.labels)), dim=-1)  # (N, k)
        n_tokens = sum(map(len, seqs))
        metrics.tokens(m.name, n_tokens, 0)
        data = [{"index": i, "labels": [{"label": m.labels[j], "score": q} for q, j in zip(rp, ri, strict=True)]}
                for i, (rp, ri) in enumerate(zip(p.tolist(), idx.tolist(), strict=True))]
        return {"object": "list", "model": req.model, "data": data,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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
