"""The FastAPI app around the routes (routes.py): middleware, error handlers, start-up and shutdown, static files.

Every error leaves in OpenAI's JSON shape: routes raise `APIError` before the first byte of a response, and the
handlers here translate the rest (validation errors, unknown paths, crashes), so a client sees one shape whatever
failed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import APIError, ErrorResponse, Settings, error_body
from slmkit.serve.registry import Served
from slmkit.serve.routes import STATIC, router

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Decoder engines run while the app does: started on start-up, stopped on shutdown."""
    models: dict[str, Served] = app.state.models
    for m in models.values():
        if m.engine is not None:
            m.engine.start()
    yield
    for m in models.values():  # SIGTERM: uvicorn drains connections, then we end the engine threads
        if m.engine is not None:
            m.engine.stop()


# -- errors, all in OpenAI's shape ---------------------------------------------------------------------------------
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", []) if x != "body"]
    msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
    return JSONResponse(error_body(msg, param=".".join(loc) or None), status_code=400)


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


async def _crash(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def create_app(models: dict[str, Served], settings: Settings | None = None) -> FastAPI:
    """An app serving MODELS (name -> loaded model). Decoder engines are started here and stopped on shutdown."""
    settings = settings or Settings()
    app = FastAPI(title="slmkit", version="0.1.0", lifespan=lifespan, responses=ERRORS,
                  description="OpenAI-compatible API for small language models (slm serve).")
    # what the routes read through their dependencies (routes.get_models, get_settings, get_metrics)
    app.state.models, app.state.settings = models, settings
    app.state.metrics, app.state.created = Metrics(), int(time.time())
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Timed, metrics=app.state.metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app
