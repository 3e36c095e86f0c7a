"""Shared fixtures: a small real-English corpus and one tiny trained model folder, reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text(n_chars: int = 60_000) -> str:
    """Real text: tiny Shakespeare when ../shared is present, else Python's own documentation topics."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())[:n_chars]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches go to a temp dir, never the user's ~/.cache."""
    os.environ["SLMKIT_CACHE"] = str(tmp_path_factory.mktemp("slmkit-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> Path:
    """slm-tiny trained for a few steps with a 320-token BPE: the model folder other tests load."""
    from slmkit.training.train import main as train

    out = tmp_path_factory.mktemp("models") / "tiny"
    train(data=[str(corpus)], out=out, preset="slm-tiny", vocab_size=320, steps=30, block_size=64, batch_size=8,
          progress=False)
    return out
