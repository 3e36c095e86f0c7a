"""nanoGPT as a peer, run from its unmodified upstream files in ../shared/peers/nanogpt (none of its code is copied
here; see ../shared/peers/README.md for the commit and its CPU recipe).

Two ways in:
- ``nanogpt_train_step``: upstream ``model.py`` imported from that folder, the model built and the optimizer made as
  upstream ``train.py`` does (``model.configure_optimizers``), one training iteration as a function to time.
- ``run_cpu_recipe``: upstream ``train.py`` run as a subprocess with its README's CPU recipe, in a working
  directory holding what its ``data/shakespeare_char/prepare.py`` would write, and its log parsed.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
NANOGPT_DIR = ROOT.parent / "shared" / "peers" / "nanogpt"
SKIP_NOTE = "nanoGPT peer skipped: ../shared/peers/nanogpt is missing (upstream nanoGPT is run from there)"

# The CPU recipe of nanoGPT's README, verbatim (2000 iterations; val loss ~1.88 nats/char upstream).
CPU_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
              "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
              "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
RECIPE_ITERS = 2000
EVAL_INTERVAL = 250  # config/train_shakespeare_char.py's, which the recipe keeps
WARMUP_ITERS = 100  # the same file's; train.py's get_lr divides by zero when lr_decay_iters equals it
# Iterations left out of the median iteration time: the first ones pay for allocator and kernel warm-up.
WARMUP_ITERS_EXCLUDED = 10

STEP_LINE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)")  # train.py's estimate_loss report
ITER_LINE = re.compile(r"^iter (\d+): loss (\S+), time (\S+)ms")  # train.py's per-iteration log (log_interval=1)


def nanogpt_available() -> bool:
    """True when ../shared/peers/nanogpt holds upstream's files; otherwise print the one-line skip note."""
    if (NANOGPT_DIR / "model.py").is_file() and (NANOGPT_DIR / "train.py").is_file():
        return True
    print(SKIP_NOTE)
    return False


def import_nanogpt() -> tuple[type, type]:
    """Upstream ``model.py``'s ``GPT`` and ``GPTConfig``, imported from ../shared/peers/nanogpt."""
    if str(NANOGPT_DIR) not in sys.path:
        sys.path.insert(0, str(NANOGPT_DIR))
    from model import GPT, GPTConfig

    return GPT, GPTConfig


def nanogpt_train_step(
    vocab_size: int,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    block_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    beta2: float = 0.99,
    grad_clip: float = 1.0,
    seed: int = 1337,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], int]:
    """Upstream nanoGPT's model at its CPU recipe's shape, with the optimizer ``train.py`` makes, and one iteration of
    its loop as ``step(X, Y) -> loss`` (forward, backward, clipping, AdamW, zero_grad; a constant learning rate: the
    schedule does not change a step's cost). Returns ``(step, get_num_params())``. Defaults are the recipe's."""
    GPT, GPTConfig = import_nanogpt()
    torch.manual_seed(seed)
    # bias=False and dropout=0.0: train.py's default and the recipe's flag
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, dropout=0.0, bias=False))
    # as train.py: configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    optimizer = model.configure_optimizers(weight_decay, lr, (0.9, beta2), "cpu")

    def step(X: torch.Tensor, Y: torch.Tensor) -> float:
        _, loss = model(X, Y)
        loss.backward()
        if grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model.get_num_params()


def write_shakespeare_char(text: str, data_dir: Path) -> int:
    """Write the files upstream ``data/shakespeare_char/prepare.py`` makes from ``text`` (its input.txt), in its format,
    without its download: train.bin / val.bin (uint16 character ids of the first 90% / the last 10%) and meta.pkl
    (``vocab_size``, ``itos``, ``stoi``). Returns the vocabulary size."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = int(len(text) * 0.9)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.bin", text[:n]), ("val.bin", text[n:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data_dir / name)
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return len(chars)


def recipe_args(max_iters: int = RECIPE_ITERS) -> list[str]:
    """The README's CPU recipe; with ``max_iters`` other than its 2000 (a short check), that many iterations with the
    schedule's decay over them (and a tenth of them of warmup when they are not more than the recipe's 100 warmup
    iterations), and an evaluation at the last one, so the final val loss is the run's end."""
    if max_iters == RECIPE_ITERS:
        return list(CPU_RECIPE)
    args = [a for a in CPU_RECIPE if not a.startswith(("--max_iters=", "--lr_decay_iters="))]
    args += [f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}"]
    if max_iters <= WARMUP_ITERS:
        args.append(f"--warmup_iters={max_iters // 10}")
    if max_iters % EVAL_INTERVAL:
        args.append(f"--eval_interval={max_iters}")
    return args


def parse_log(lines: list[str], tokens_per_iter: int) -> dict:
    """The final val loss (nats/char, train.py's ``estimate_loss``), the evaluations, and timings from the per-iteration
    log: ``ms_per_iter`` and ``tokens_per_s`` from the median iteration after the first 10, and ``train_seconds``, the
    logged iteration times summed with those that also ran ``estimate_loss`` counted at the median."""
    evals = [{"iter": int(m[1]), "train": float(m[2]), "val": float(m[3])} for m in map(STEP_LINE.match, lines) if m]
    times = [(int(m[1]), float(m[3]) / 1000) for m in map(ITER_LINE.match, lines) if m]
    if not evals or not times:
        raise RuntimeError("nanoGPT's train.py printed no 'step N: ... val loss' or 'iter N: ...' lines")
    steady = [t for _, t in times[WARMUP_ITERS_EXCLUDED:]] or [t for _, t in times]
    median_s = statistics.median(steady)
    evaluated = {e["iter"] for e in evals}
    train_seconds = sum(median_s if it in evaluated else t for it, t in times)
    return {"val_loss": evals[-1]["val"], "evals": evals, "iters": len(times), "train_seconds": train_seconds,
            "ms_per_iter": median_s * 1000, "tokens_per_s": tokens_per_iter / median_s}


def run_cpu_recipe(text: str, workdir: Path, *, max_iters: int = RECIPE_ITERS, threads: int = 2) -> dict:
    """Run upstream ``train.py`` with the README's CPU recipe on ``text`` in ``workdir`` (a copy of upstream's files
    plus the shakespeare_char data; train.py also writes its checkpoint there), with ``threads`` torch threads.

    Prints train.py's evaluation lines as they come. Returns ``parse_log``'s keys plus ``params``
    (``get_num_params()`` of the model train.py builds).
    """
    run_dir = workdir / "nanogpt"
    shutil.copytree(NANOGPT_DIR, run_dir)  # train.py reads configurator.py and config/ from its working directory
    vocab_size = write_shakespeare_char(text, run_dir / "data" / "shakespeare_char")
    args = recipe_args(max_iters)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", *args]
    print(f"nanoGPT: {' '.join(cmd[1:])} (in {run_dir}, {threads} threads)", flush=True)
    lines = []
    with subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if STEP_LINE.match(line):
                print(f"nanoGPT: {line.rstrip()}", flush=True)
    if proc.returncode:
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
    block_size, batch_size = int(flags["block_size"]), int(flags["batch_size"])
    GPT, GPTConfig = import_nanogpt()
    params = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=int(flags["n_layer"]),
                           n_head=int(flags["n_head"]), n_embd=int(flags["n_embd"]), dropout=0.0,
                           bias=False)).get_num_params()
    return {**parse_log(lines, block_size * batch_size), "params": params}
