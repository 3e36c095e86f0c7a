"""A real uvicorn server on a free loopback port, in a thread, serving tiny model folders (serve tests, web test)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tiny_encoders import tiny_base_folder, tiny_bert_config, wordpiece
from tiny_models import tiny_llama_folder


def tiny_classifier_folder(path: Path, tokenizer) -> Path:
    from transformers import BertForSequenceClassification

    cfg = tiny_bert_config(tokenizer, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_folders(root: Path) -> dict[str, Path]:
    """name -> folder: a tiny chat decoder (ChatML), an encoder and a classifier."""
    tok = wordpiece()
    return {"tiny": tiny_llama_folder(root / "tiny"), "enc": tiny_base_folder(root / "enc", tok),
            "clf": tiny_classifier_folder(root / "clf", tok)}


def decode_concurrently(engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Token ids from ENGINE for every prompt, each submitted from its own thread (so rows share forward passes)."""
    got: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, [t.id for t in engine.generate(prompts[i],
                                                                                               params)]))
               for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve APP on 127.0.0.1:<free port> until the block ends; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 20 or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def serve_folders(folders: dict[str, Path], **settings):
    """create_app over FOLDERS with Settings(**SETTINGS)."""
    from slmkit.serve import load_served
    from slmkit.serve.app import create_app
    from slmkit.serve.protocol import Settings

    s = Settings(**settings)
    return create_app({n: load_served(n, d, s.max_batch, s.max_queue) for n, d in folders.items()}, s)


def slowed(engine, seconds: float = 0.02):
    """Make each forward pass and decode step of ENGINE's model take SECONDS longer, so a reply is still running
    when we hang up."""
    model = engine.lm.model
    forward, step = model.forward, model.step
    model.forward = lambda *a, **kw: (time.sleep(seconds), forward(*a, **kw))[1]
    model.step = lambda *a, **kw: (time.sleep(seconds), step(*a, **kw))[1]
