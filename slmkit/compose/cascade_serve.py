"""`slm serve` on a cascade folder: the replies of /v1/completions, /v1/chat/completions and /v1/classify when the
served model is a cascade (routes.py hands them here once a request has passed its checks).

Which model answered is in the reply's `model` field and the `X-Slm-Model` header: "NAME/small" or "NAME/large"
(NAME: the cascade's served name; a classify request whose texts went to both says "NAME/small+large", and each
row carries its own `model`). A large model that cannot answer fails only the requests escalated to it: a 502 in
OpenAI's error shape naming its URL; requests the small model keeps answer as before. Streaming: the small model's
answer must be whole before the decision, so a streamed reply sends the chosen answer in one chunk once decided.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from fastapi.responses import JSONResponse, StreamingResponse

from slmkit.compose.cascade import RemoteError
from slmkit.hardware import in_fresh_thread_async
from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import APIError, sse_event


def _escalation_failed(name: str, e: RemoteError) -> APIError:
    return APIError(502, f"model {name!r} is a cascade: this request went to its large model, which failed: {e}",
                    "server_error", code="large_model_unavailable")


async def cascade_classify(req, m, texts: list[str], metrics: Metrics) -> JSONResponse:
    """/v1/classify through the cascade M (registry.Served): top-k labels per text, each row with its model."""
    try:
        rows = await in_fresh_thread_async(m.cascade.classify, texts, req.top_k)
    except RemoteError as e:
        metrics.cascade(m.name, "large_failed")
        raise _escalation_failed(req.model, e) from None
    who = sorted({r["model"] for r in rows}, key=["small", "large"].index)
    for w in who:
        metrics.cascade(m.name, w, sum(r["model"] == w for r in rows))
    n_tokens = sum(len(m.tokenizer(t)["input_ids"]) for t in texts)
    metrics.tokens(m.name, n_tokens, 0)
    answered = f"{req.model}/{'+'.join(who)}"
    data = [{"index": i, "labels": r["labels"], "model": f"{req.model}/{r['model']}"} for i, r in enumerate(rows)]
    return JSONResponse({"object": "list", "model": answered, "data": data,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}},
                        headers={"X-Slm-Model": answered})


async def cascade_reply(job, messages: list[dict] | None, metrics: Metrics) -> JSONResponse | StreamingResponse:
    """A completion or chat completion through the cascade: JOB (routes.Job: the checked request, its prompt and
    token budget) and, for chat, the MESSAGES (a remote large model gets them as they are)."""
    req, m = job.req, job.m
    if req.n != 1 or job.top is not None:
        raise APIError(400, f"model {req.model!r} is a cascade: it answers one choice (n=1) without logprobs",
                       param="n" if req.n != 1 else "logprobs", code="unsupported_for_cascade")
    sampling = dict(max_new_tokens=job.max_new, temperature=req.temperature, top_k=0, top_p=req.top_p,
                    seed=req.seed, stop=req.stop_list())
    t0 = time.perf_counter()
    try:
        out = await in_fresh_thread_async(m.cascade.generate, None if job.chat else job.prompt, messages, **sampling)
    except RemoteError as e:
        metrics.cascade(m.name, "large_failed")
        raise _escalation_failed(req.model, e) from None
    metrics.cascade(m.name, out["model"])
    metrics.first_token(time.perf_counter() - t0)  # the answer arrives whole
    metrics.tokens(m.name, len(job.ids), out["tokens"])
    answered = f"{req.model}/{out['model']}"
    text = ((job.prompt if getattr(req, "echo", False) else "") + out["text"]) if not job.chat else out["text"]
    finish = "length" if out["tokens"] >= job.max_new else "stop"
    usage = {"prompt_tokens": len(job.ids), "completion_tokens": out["tokens"],
             "total_tokens": len(job.ids) + out["tokens"]}
    base = {"id": ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": answered}
    headers = {"X-Slm-Model": answered, "X-Slm-Cascade-Confidence": f"{out['confidence']:.4f}"}
    if not req.stream:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": None} if job.chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({**base, "object": job.object, "choices": [choice], "usage": usage}, headers=headers)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_chunks(job, base, text, finish, usage if include_usage else None),
                             media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunks(job, base: dict, text: str, finish: str, usage: dict | None) -> Iterator[str]:
    """The decided answer as SSE: (chat: a role chunk), the text in one chunk, the finish chunk, usage, [DONE]."""
    base = {**base, "object": job.object + (".chunk" if job.chat else "")}

    def choice(piece: str | None, reason: str | None, role: bool = False) -> dict:
        if not job.chat:
            return {"index": 0, "text": piece or "", "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
        return {"index": 0, "delta": delta, "finish_reason": reason}

    pieces = ([choice(None, None, role=True)] if job.chat else []) + [choice(text, None), choice(None, finish)]
    for c in pieces:
        yield sse_event({**base, "choices": [c]})
    if usage is not None:
        yield sse_event({**base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"
