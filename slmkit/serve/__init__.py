"""Verb `serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for decoder, encoder and classifier folders.

protocol.py holds the request/response schemas, settings and the error shape, registry.py the loaded models
(`Served`), routes.py the endpoints, app.py the app around them (middleware, error handlers, start-up and shutdown),
batching.py the continuous-batching engine (usable without HTTP), metrics.py the Prometheus text, static/ the web
chat page served at `/`.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.hardware import in_fresh_thread
from slmkit.serve.registry import Served, load_served  # also importable from here, as before


def parse_spec(spec: str) -> tuple[str, Path]:
    """'NAME=DIR' or 'DIR' (named after the folder)."""
    name, sep, d = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, Path(d)
    return Path(spec).resolve().name, Path(spec)


def read_keys(path: Path) -> list[str]:
    """API keys, one per line; blank lines and # comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SystemExit(f"error: cannot read --api-keys-file {path}: {e.strerror}") from None
    keys = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not keys:
        raise SystemExit(f"error: --api-keys-file {path} holds no keys (one per line)")
    return keys


def main(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
         api_keys_file: Path | None = None, cors_origin: list[str] | None = None, max_batch: int = 16,
         max_queue: int = 64, max_tokens_limit: int = 1024, max_prompt_tokens: int | None = None,
         max_body_bytes: int = 1_000_000, dtype: str = "fp32", threads: int | None = None,
         device: str = "auto", compile: bool = False, router: Path | None = None, remote_key_env: str | None = None,
         draft: list[str] | None = None, draft_tokens: int | None = None, kv_memory: str | int = "2G",
         prefill_chunk: int = 64, lookup: bool = False) -> None:
    """Serve the model folders DIR ... over an OpenAI-compatible HTTP API, with a web chat page at /.

    Decoders answer /v1/completions and /v1/chat/completions, encoders /v1/embeddings, classifiers /v1/classify.
    A model is named after its folder, or NAME=DIR; NAME=URL serves a model behind an OpenAI-compatible URL.
    --router ROUTER adds the model `auto`, which sends each request to the served model the router picks.
    Binds 127.0.0.1 unless --host says otherwise. --kv-memory bounds each decoder's key/value cache (e.g. 2G).
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SystemExit("error: slm serve needs FastAPI and uvicorn: pip install 'slmkit[serve]'") from None
    import torch

    from slmkit.compose.router_serve import ROUTER_NAME, remote_served, router_served, url_spec
    from slmkit.options import check_numbers
    from slmkit.serve.app import create_app
    from slmkit.serve.kv import parse_memory
    from slmkit.serve.protocol import Settings

    if api_key and api_keys_file:
        raise SystemExit("error: give --api-key or --api-keys-file, not both")
    if not 0 < port < 65536:
        raise SystemExit(f"error: --port {port} must be in 1-65535")
    check_numbers(dict(max_batch=max_batch, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                       max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, threads=threads,
                       draft_tokens=draft_tokens, prefill_chunk=prefill_chunk),
                  {"max_batch": "sequences decoded together", "max_queue": "requests that may wait for a batch row",
                   "max_tokens_limit": "the largest max_tokens a request may ask for",
                   "max_prompt_tokens": "leave it out for the model's context", "max_body_bytes": "e.g. 1000000",
                   "prefill_chunk": "prompt tokens read per step while others decode, e.g. 64"})
    from slmkit.infer.generate import refuse_draft_tokens

    refuse_draft_tokens(draft or None, draft_tokens, lookup)
    try:
        kv_bytes = parse_memory(kv_memory)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if threads:
        torch.set_num_threads(threads)
    keys = [api_key] if api_key else read_keys(api_keys_file) if api_keys_file else []
    served: dict[str, Served] = {}
    for spec in models:
        remote = url_spec(spec)  # NAME=URL: asked per request (compose/router_serve.py)
        name, d = remote or parse_spec(spec)
        if name in served:
            raise SystemExit(f"error: two models are named {name!r}; name them with NAME=DIR")
        if remote:
            served[name] = remote_served(name, str(d), remote_key_env)
            continue
        if not Path(d).is_dir():
            raise SystemExit(f"error: {d} is not a folder; give model folders (or NAME=DIR)")
        # loaded in a thread of its own: a live thread that ran the loading math would slow the engine's decoding
        served[name] = in_fresh_thread(load_served, name, Path(d), max_batch, max_queue, dtype, device, compile,
                                       kv_bytes, prefill_chunk)
    if draft or lookup:  # speculative decoding for the decoder(s) named, or from the text for every decoder
        from slmkit.serve.registry import serve_drafts

        in_fresh_thread(serve_drafts, served, draft or [], draft_tokens, dtype, device, compile, lookup)
    if router is not None:  # the model `auto`: its route labels must be the names served above
        served[ROUTER_NAME] = in_fresh_thread(router_served, Path(router), served, "cpu")
    settings = Settings(api_keys=keys, max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit,
                        max_prompt_tokens=max_prompt_tokens, max_batch=max_batch, max_queue=max_queue,
                        cors_origins=list(cors_origin or []))
    app = create_app(served, settings)
    kinds = ", ".join(f"{n} ({m.kind}, {m.device})" for n, m in served.items())
    print(f"serving {kinds} on http://{host}:{port}/ (API under /v1, {'keys required' if keys else 'no API key'})")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


def add_args(p) -> None:
    p.add_argument("models", nargs="+", metavar="DIR", help="model folders to serve: DIR (named after the folder) or "
                   "NAME=DIR; decoders, encoders and classifiers; NAME=URL: a model behind an OpenAI-compatible URL "
                   "(e.g. big=http://host:8000/v1), asked per request")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    keys.add_argument("--api-keys-file", type=Path, help="file of accepted API keys, one per line")
    p.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable; "
                   "default: CORS off)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per model (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch row before the server "
                   "answers 429 with Retry-After (default: 64)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for "
                   "(default: 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt in tokens (default: the "
                   "model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body; larger is 413 "
                   "(default: 1000000)")
    p.add_argument("--kv-memory", default="2G", metavar="SIZE", help="key/value cache budget per decoder, e.g. 2G "
                   "or 512M: the cache grows with the sequences in flight up to it, and a request that would pass it "
                   "waits for a row to finish (default: 2G)")
    p.add_argument("--prefill-chunk", type=int, default=64, metavar="N", help="prompt tokens read per decode step "
                   "while other requests stream: longer prompts take several steps, so no stream stalls for a whole "
                   "prompt (default: 64)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="decoder weight precision")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (default: a GPU when there is one), cpu, cuda, cuda:1 …")
    p.add_argument("--router", type=Path, help="router folder (slm route train): adds the model `auto`, which sends "
                   "each request to the model the router picks; its route labels must be the names served here")
    p.add_argument("--remote-key-env", metavar="VAR", help="environment variable holding the API key sent to the "
                   "NAME=URL models (read from the environment, never from a flag: flags show in ps)")
    p.add_argument("--compile", action="store_true", help="decode single requests with torch.compile'd kernels (see "
                   "slm generate --help; batched steps stay eager)")
    p.add_argument("--draft", action="append", metavar="[NAME=]DIR", help="speculative decoding for decoder NAME (or "
                   "the only decoder): a small model folder with the same tokenizer; a request that arrives while the "
                   "model is idle decodes several tokens per pass (repeatable; docs/compose.md)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens a draft guesses per check "
                   "(default: adaptive)")
    p.add_argument("--lookup", action="store_true", help="speculative decoding from the text itself for every "
                   "decoder (prompt lookup: see slm generate --help), alone or with --draft; like a draft, it serves "
                   "a request that arrives while the model is idle")
