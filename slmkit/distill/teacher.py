"""The teacher's side of causal distillation: live (its forward pass every step) or cached (once, top-k kept).

On a CPU the teacher's forward pass is the cost of distillation: SmolLM2-135M reads ~10x the student's weights per
token. `--cache-teacher` runs it once over the training windows and keeps, per position, its K most likely tokens and
their log-probabilities at the run's temperature (ids uint16/int32, log-probs fp16: 6K bytes a token), memory-mapped;
later passes, resumed runs and further students with the same teacher, data, block size, K and temperature read it
back instead (the KD loss then runs over K + 1 buckets: losses.kd_topk).

The training windows lie on a fixed grid (window w = tokens[w * block : w * block + block + 1]), shuffled once a pass,
so every window a run draws is one the cache holds. A cache is built into KEY.partial/ with its progress saved every
few seconds: a killed build resumes where it stopped; the finished folder KEY/ is renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slmkit.files import atomic_write_json
from slmkit.model.adapters import weights_fingerprint
from slmkit.training.chunked import CHUNK_ELEMENTS, hidden_and_head

CACHE_VERSION = 1


def grid_windows(n_tokens: int, block: int) -> int:
    """Windows of BLOCK inputs (+1 target) on the fixed grid of a token stream of N_TOKENS."""
    return max(0, (n_tokens - 1) // block)


def window_batch(tokens: np.ndarray, windows, block: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) (B, block) for grid windows WINDOWS."""
    rows = np.stack([np.asarray(tokens[w * block: w * block + block + 1], dtype=np.int64) for w in windows])
    xy = torch.from_numpy(rows)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (the teacher's final hidden states (B*T, C), its head (V, C)), or (its logits (B*T, V), None) when its head is
    not a plain linear map. Under autocast, in its dtype: chunks of logits are then computed at that speed."""
    found = hidden_and_head(teacher, x)
    if found is None:
        return teacher(input_ids=x).logits.flatten(0, 1), None
    h, w = found
    device = x.device.type
    dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    return h.flatten(0, 1).to(dt), w.to(dt)


def teacher_logits(h: torch.Tensor, w: torch.Tensor | None, rows) -> torch.Tensor:
    """The teacher's fp32 logits for ROWS of what teacher_hidden returned."""
    return (h[rows] if w is None else h[rows] @ w.t()).float()


@dataclass
class TopKCache:
    """The teacher's top-k tokens and log-probabilities per position of every grid window: ids and logp (W, T, K)."""
    path: Path
    ids: np.ndarray
    logp: np.ndarray
    meta: dict

    def rows(self, windows, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids (B*T, K) int64, log-probs (B*T, K) fp32) for grid windows WINDOWS."""
        ids = torch.from_numpy(np.stack([self.ids[w] for w in windows]).astype(np.int64))
        logp = torch.from_numpy(np.stack([self.logp[w] for w in windows]).astype(np.float32))
        return ids.flatten(0, 1).to(device), logp.flatten(0, 1).to(device)

    @property
    def bytes(self) -> int:
        return int(self.ids.nbytes + self.logp.nbytes)


def cache_key(teacher: nn.Module, data_key: str, block: int, k: int, temperature: float, n_windows: int) -> str:
    """What a cache depends on: the teacher's weights, the training tokens, the grid, K and the temperature."""
    what = f"v{CACHE_VERSION}|{weights_fingerprint(teacher)}|{data_key}|{block}|{k}|{temperature:g}|{n_windows}"
    return hashlib.sha256(what.encode()).hexdigest()[:24]


def open_cache(root: Path, key: str) -> TopKCache | None:
    folder = root / key
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    return TopKCache(folder, np.load(folder / "ids.npy", mmap_mode="r"), np.load(folder / "logp.npy", mmap_mode="r"),
                     meta)


def build_cache(teacher: nn.Module, tokens: np.ndarray, block: int, k: int, temperature: float, root: Path, key: str,
                device: str, autocast_dtype, batch: int = 8, progress: bool = True) -> TopKCache:
    """Run TEACHER once over every grid window of TOKENS and keep its top-K (see the module docstring); resumes a
    partial build of the same KEY."""
    found = open_cache(root, key)
    if found is not None:
        return found
    n_windows, vocab = grid_windows(len(tokens), block), None
    part = root / f"{key}.partial"
    part.mkdir(parents=True, exist_ok=True)
    done = json.loads((part / "progress.json").read_text())["done"] if (part / "progress.json").is_file() else 0
    start, started, saved = done, time.perf_counter(), time.perf_counter()
    ids = logp = None
    while done < n_windows:
        windows = range(done, min(done + batch, n_windows))
        x, _ = window_batch(tokens, windows, block, device)
        with torch.autocast(device.split(":")[0], dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            h, w = teacher_hidden(teacher, x)
        if ids is None:
            vocab = h.shape[-1] if w is None else w.shape[0]
            ids, logp = _open_arrays(part, n_windows, block, min(k, vocab), vocab, mode="r+" if done else "w+")
        top_ids, top_logp = _top_k(h, w, min(k, vocab), temperature)
        ids[done:windows.stop] = top_ids.view(len(windows), block, -1).cpu().numpy()
        logp[done:windows.stop] = top_logp.view(len(windows), block, -1).cpu().numpy()
        done = windows.stop
        if time.perf_counter() - saved > 10 or done == n_windows:  # a killed build loses at most ~10 s
            ids.flush(), logp.flush()
            atomic_write_json(part / "progress.json", {"done": done})
            saved = time.perf_counter()
            if progress:
                rate = (done - start) * block / (saved - started)
                print(f"\rteacher cache: {done:,}/{n_windows:,} windows ({rate:,.0f} tokens/s)", end="",
                      file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    seconds = time.perf_counter() - started
    atomic_write_json(part / "meta.json", {"windows": n_windows, "block": block, "k": min(k, vocab or k),
                                           "temperature": temperature, "build_seconds": seconds,
                                           "built_tokens": (n_windows - start) * block})
    shutil.rmtree(root / key, ignore_errors=True)
    os.replace(part, root / key)
    return open_cache(root, key)


def _open_arrays(folder: Path, n_windows: int, block: int, k: int, vocab: int, mode: str):
    id_dtype = np.uint16 if vocab <= 65536 else np.int32
    shape = (n_windows, block, k)
    if mode == "w+":
        return (np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=id_dtype, shape=shape),
                np.lib.format.open_memmap(folder / "logp.npy", mode="w+", dtype=np.float16, shape=shape))
    return (np.load(folder / "ids.npy", mmap_mode="r+"), np.load(folder / "logp.npy", mmap_mode="r+"))


def _top_k(h: torch.Tensor, w: torch.Tensor | None, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K ids and log-probabilities at TEMPERATURE per row, chunk by chunk (never the whole logits)."""
    vocab = h.shape[-1] if w is None else w.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    ids, logp = [], []
    for s in range(0, h.shape[0], chunk):
        z = torch.log_softmax(teacher_logits(h, w, slice(s, s + chunk)) / temperature, dim=-1)
        top = z.topk(k, dim=-1)
        ids.append(top.indices)
        logp.append(top.values)
    return torch.cat(ids), torch.cat(logp)
