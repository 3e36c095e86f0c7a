"""The models a server answers for: `Served` (one loaded model and what it needs to answer) and `load_served`.

Its own module so that the verb (`slmkit.serve`), the app and the routes all import it from below, without a cycle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Served:
    """One model the server answers for: a decoder (lm + engine), an encoder or a classifier (model + tokenizer)."""

    name: str
    path: Path
    kind: str  # "decoder" | "encoder" | "classifier"
    context: int
    device: str = "cpu"
    lm: Any = None  # generate.LoadedModel
    engine: Any = None  # batching.Engine
    model: Any = None
    tokenizer: Any = None
    labels: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cascade: Any = None  # compose.cascade.Cascade: a cascade folder, answered through compose/cascade_serve.py
    pooling: Any = None  # infer.embed.Pooling of an encoder: read from its folder once, not per request


def load_served(name: str, model_dir: Path, max_batch: int = 16, max_queue: int = 64, dtype: str = "fp32",
                device: str = "cpu", compile: bool = False, kv_memory: int | None = None,
                prefill_chunk: int = 64) -> Served:
    """Open MODEL_DIR as whatever kind it is, on DEVICE ("auto": a GPU when there is one); decoders get a (not yet
    started) batching engine whose key/value cache stays within KV_MEMORY bytes (batching.Engine)."""
    from slmkit.compose.cascade import is_cascade
    from slmkit.hardware import pick_device
    from slmkit.infer.classify import is_classifier, load_classifier
    from slmkit.infer.load import read_config
    from slmkit.model.presets import is_encoder

    device = pick_device(device)
    if is_cascade(model_dir):  # the small model's kind; answers go through the cascade (cascade_serve.py)
        return cascade_served(name, Path(model_dir), device)
    cfg = read_config(Path(model_dir))
    if is_classifier(cfg):
        model, tok, labels = load_classifier(Path(model_dir), device)
        return Served(name, Path(model_dir), "classifier", int(getattr(model.config, "max_position_embeddings", 512)),
                      device, model=model, tokenizer=tok, labels=labels)
    if is_encoder(cfg):
        from slmkit.infer.embed import load_encoder, pooling_of

        model, tok = load_encoder(Path(model_dir), device)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return Served(name, Path(model_dir), "encoder", int(getattr(model.config, "max_position_embeddings", 512)),
                      device, model=model, tokenizer=tok, pooling=pooling_of(Path(model_dir)))
    from slmkit.infer.generate import load
    from slmkit.serve.batching import Engine

    lm = load(Path(model_dir), dtype=dtype, device=device, compile=compile)  # compile: batch-1 steps only
    return Served(name, Path(model_dir), "decoder", lm.context, device, lm=lm,
                  engine=Engine(lm, max_batch=max_batch, max_queue=max_queue, kv_memory=kv_memory,
                                prefill_chunk=prefill_chunk))


def cascade_served(name: str, folder: Path, device: str = "cpu") -> Served:
    """A cascade folder as a classifier or a decoder: the small model's tokenizer and context, no batching engine
    (each request runs the small model, then maybe the large one, in a worker thread)."""
    from slmkit.compose.cascade import load_cascade

    c = load_cascade(folder, device)
    if c.kind == "classifier":
        return Served(name, folder, "classifier", int(getattr(c.small.model.config, "max_position_embeddings", 512)),
                      device, model=c.small.model, tokenizer=c.small.tokenizer, labels=c.labels, cascade=c)
    return Served(name, folder, "decoder", c.small.lm.context, device, lm=c.small.lm, cascade=c)


def serve_drafts(served: dict, drafts: list[str], draft_tokens: int | None = None, dtype: str = "fp32",
                 device: str = "cpu", compile: bool = False, lookup: bool = False) -> None:
    """`slm serve --draft [NAME=]DIR`: give the served decoder NAME (the only decoder, without NAME=) a draft. Its
    engine then decodes a request that arrives while it is idle speculatively (serve/batching.py). LOOKUP
    (`--lookup`): every decoder served (slmkit Llama ones) also guesses from the text, with or without a draft."""
    from slmkit.compose.speculative import attach_draft
    from slmkit.infer.generate import load

    decoders = [n for n, m in served.items() if m.kind == "decoder" and m.lm is not None]
    for spec in drafts:
        name, sep, folder = spec.rpartition("=")
        if not sep or Path(spec).exists():
            if len(decoders) != 1:
                raise SystemExit(f"error: --draft {spec}: say which model it drafts for, --draft NAME=DIR (NAME one "
                                 f"of {', '.join(decoders) or 'no decoder served'})")
            name, folder = decoders[0], spec
        if name not in decoders:
            raise SystemExit(f"error: --draft {spec}: {name!r} is not a decoder served here ({', '.join(decoders)})")
        if not Path(folder).is_dir():
            raise SystemExit(f"error: --draft {spec}: {folder} is not a model folder")
        m = served[name]
        attach_draft(m.lm, load(Path(folder), dtype=dtype, device=m.device, compile=compile), draft_tokens, lookup)
    if lookup:
        from slmkit.model.llama import Llama

        for name in decoders:
            m = served[name]
            if m.lm.draft is None and isinstance(m.lm.model, Llama) and m.cascade is None:
                attach_draft(m.lm, None, draft_tokens, lookup=True)
