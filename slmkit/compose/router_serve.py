"""`slm serve a=DIR b=DIR c=URL --router ROUTER`: the model `auto` (a router over the served models) and models
behind an OpenAI-compatible URL (routes.py hands requests here).

    request for `auto` -> the route for its text (a completion's prompt; a chat's last user message), decided
    before generating -> answered exactly as if sent to that route: the reply's `model` field and the
    `X-Slm-Model` header name it, `X-Slm-Route-Reason` says what decided (rule, router, fallback)

A remote route (NAME=URL) is asked per request through compose/remote.py: one that cannot answer fails only the
requests sent to it, with a 502 in OpenAI's error shape naming its URL; the other routes keep answering. Its reply
arrives whole, so a streamed one is sent as one chunk (compose/cascade_serve.py's SSE shape).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from fastapi.responses import JSONResponse, StreamingResponse

from slmkit.compose.remote import RemoteError, RemoteModel, is_url
from slmkit.hardware import in_fresh_thread_async
from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import APIError, Settings
from slmkit.serve.registry import Served

ROUTER_NAME = "auto"  # the model name that carries the router


def url_spec(spec: str) -> tuple[str, str] | None:
    """'NAME=URL' -> (NAME, URL); None for a folder spec; a bare URL is refused (a route needs a name)."""
    name, sep, url = spec.partition("=")
    if sep and name and is_url(url):
        return name, url
    if is_url(spec):
        raise SystemExit(f"error: {spec}: name a model behind a URL, e.g. big={spec} (the name is what requests and "
                         "router labels use)")
    return None


def remote_served(name: str, url: str, api_key_env: str | None = None, timeout: float = 60.0) -> Served:
    """A model behind an OpenAI-compatible URL (its first listed model), asked per request with the API key in the
    environment variable API_KEY_ENV; nothing is contacted now, so a server that is down fails its own requests."""
    try:
        remote = RemoteModel(url, api_key_env=api_key_env, timeout=timeout, retries=2)
    except RemoteError as e:  # the key's variable is not set
        raise SystemExit(f"error: --remote-key-env: {e}") from None
    return Served(name, Path(url), "remote", 0, remote.url, model=remote)  # device: where it runs


def router_served(folder: Path, served: dict[str, Served], device: str = "cpu") -> Served:
    """The model `auto`: the router in FOLDER over the SERVED models, whose names must be its route labels."""
    from slmkit.compose.router import load_router

    if ROUTER_NAME in served:
        raise SystemExit(f"error: a served model is named {ROUTER_NAME!r}, the name --router gives the router; "
                         "rename it (NAME=DIR)")
    router = load_router(Path(folder), device)
    missing = [r for r in router.routes if r not in served]
    if missing:
        raise SystemExit(f"error: --router {folder}: routes {', '.join(missing)} are not served; serve them as "
                         f"NAME=DIR or NAME=URL (serving: {', '.join(served) or 'nothing'})")
    wrong = [f"{r} ({served[r].kind})" for r in router.routes if served[r].kind not in ("decoder", "remote")]
    if wrong:
        raise SystemExit(f"error: --router {folder}: routes must be decoders or URLs; {', '.join(wrong)} cannot "
                         "answer completions")
    contexts = [served[r].context for r in router.routes if served[r].kind == "decoder"]
    return Served(ROUTER_NAME, Path(folder), "router", min(contexts, default=0), device, model=router)


def chat_text(messages: list[dict]) -> str:
    """What a chat is routed on: its last user message (all the text if there is none)."""
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
    return users[-1] if users else "\n".join(m["content"] for m in messages if m["content"])


async def route_request(models: dict[str, Served], req, text: str, metrics: Metrics) -> dict[str, str]:
    """A request for a router model: pick the route for TEXT and make REQ a request for it (req.model = the
    route's name). Returns the headers that say so ({} for any other model)."""
    m = models.get(req.model)
    if m is None or m.kind != "router":
        return {}
    async with m.lock:  # one classifier pass at a time; the event loop stays free meanwhile
        route, confidence, reason = (await in_fresh_thread_async(m.model.route, [text]))[0]
    metrics.route(m.name, route, reason)
    req.model = route
    return {"X-Slm-Model": route, "X-Slm-Route-Reason": reason, "X-Slm-Route-Confidence": f"{confidence:.4f}"}


def routed_reply(reply, headers: dict[str, str]):
    """REPLY (a dict or a response) with the routing HEADERS; a model header already set (a cascade's
    'route/small') is kept."""
    if not headers:
        return reply
    if isinstance(reply, dict):
        return JSONResponse(reply, headers=headers)
    for k, v in headers.items():
        if k not in reply.headers:
            reply.headers[k] = v
    return reply


def remote_of(models: dict[str, Served], name: str) -> Served | None:
    m = models.get(name)
    return m if m is not None and m.kind == "remote" else None


async def remote_reply(req, m: Served, prompt: str | None, messages: list[dict] | None, settings: Settings,
                       headers: dict[str, str]) -> JSONResponse | StreamingResponse:
    """A completion (PROMPT) or chat (MESSAGES) answered by the remote model M, in our reply's shape with
    model = M's served name."""
    from slmkit.compose.cascade_serve import _chunks  # the one-chunk SSE reply of an answer that arrives whole

    if req.n != 1 or (req.logprobs if messages is not None else req.logprobs is not None):
        raise APIError(400, f"model {m.name!r} is a remote model: it answers one choice (n=1) without logprobs",
                       param="n" if req.n != 1 else "logprobs", code="unsupported_for_remote")
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    sampling = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                    seed=req.seed)
    try:
        out = await (in_fresh_thread_async(m.model.chat, messages, **sampling) if messages is not None else
                     in_fresh_thread_async(m.model.complete, prompt, **sampling))
    except RemoteError as e:
        raise APIError(502, f"model {m.name!r} (a remote model) could not answer: {e}", "server_error",
                       code="remote_model_unavailable") from None
    chat = messages is not None
    obj = "chat.completion" if chat else "text_completion"
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": m.name}
    usage = out.get("usage") or {}
    usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    finish = out.get("finish_reason") or "stop"
    headers = {"X-Slm-Model": m.name, **headers}
    if req.stream:
        job = _Whole(chat, obj)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_chunks(job, base, out["text"], finish, usage if include_usage else None),
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choice = ({"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": finish,
               "logprobs": None} if chat else {"index": 0, "text": out["text"], "finish_reason": finish,
                                               "logprobs": None})
    return JSONResponse({**base, "object": obj, "choices": [choice], "usage": usage}, headers=headers)


class _Whole:
    """What the one-chunk SSE writer reads of a job: chat or completion shapes, and the object name."""

    def __init__(self, chat: bool, obj: str):
        self.chat, self.object = chat, obj
