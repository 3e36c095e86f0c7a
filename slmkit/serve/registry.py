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


def load_served(name: str, model_dir: Path, max_batch: int = 16, max_queue: int = 64, dtype: str = "fp32",
                device: str = "cpu", compile: bool = False) -> Served:
    """Open MODEL_DIR as whatever kind it is, on DEVICE ("auto": a GPU when there is one); decoders get a (not yet
    started) batching engine."""
    from slmkit.hardware import pick_device
    from slmkit.infer.classify import is_classifier, load_classifier
    from slmkit.infer.load import read_config
    from slmkit.model.presets import is_encoder

    cfg = read_config(Path(model_dir))
    device = pick_device(device)
    if is_classifier(cfg):
        model, tok, labels = load_classifier(Path(model_dir), device)
        return Served(name, Path(model_dir), "classifier", int(getattr(model.config, "max_position_embeddings", 512)),
                      device, model=model, tokenizer=tok, labels=labels)
    if is_encoder(cfg):
        from slmkit.infer.embed import load_encoder

        model, tok = load_encoder(Path(model_dir), device)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return Served(name, Path(model_dir), "encoder", int(getattr(model.config, "max_position_embeddings", 512)),
                      device, model=model, tokenizer=tok)
    from slmkit.infer.generate import load
    from slmkit.serve.batching import Engine

    lm = load(Path(model_dir), dtype=dtype, device=device, compile=compile)  # compile: batch-1 steps only
    return Served(name, Path(model_dir), "decoder", lm.context, device, lm=lm,
                  engine=Engine(lm, max_batch=max_batch, max_queue=max_queue))
