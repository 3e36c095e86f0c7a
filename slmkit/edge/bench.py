"""Verb `bench`: the edge profile of exported models, one backend per subprocess.

    slm bench DIR model.gguf onnx_dir int8_dir [--threads 1] [--memory-cap 512M] [--data held_out.txt]

Each target runs in a fresh Python process (so peak RSS is that backend's alone, not this process's):
    model folder -> torch fp32 (our decode loop)      `slm quantize` folder -> torch int8
    .gguf file   -> llama.cpp (llama-cpp-python)      `slm export --format onnx` folder -> onnxruntime
It measures file size, load time, peak RSS, prefill and decode tokens/s (medians of --repeats runs after an untimed
warm-up), p50/p95 per-token latency over those runs and, with --data, perplexity on the first windows of that text.
The torch workers time `slm generate --temperature 0`'s own decode loop; the llama.cpp and onnxruntime workers never
import torch, so their load time and peak RSS are the runtime's alone. `--threads 1` plus `--memory-cap`
(RLIMIT_DATA in the child: heap and anonymous mappings, not the shared libraries) simulate a constrained device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 4


def parse_size(text: str) -> int:
    """'512M' -> bytes (options.parse_size: K, M, G, T; plain numbers are bytes); 0 or less is an error."""
    from slmkit.options import parse_size as bytes_of

    try:
        size = bytes_of(text)
    except ValueError:
        raise SystemExit(f"error: --memory-cap {text!r} is not a size; write e.g. 512M or 2G") from None
    if size <= 0:  # the user's words, not a byte count: "-5M", not -5242880
        raise SystemExit(f"error: --memory-cap {text} must be positive (e.g. 512M; leave it out for no limit)")
    return size


def backend_of(path: Path) -> str:
    """Which runtime opens PATH."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "llama.cpp"
        raise SystemExit(f"error: {path} is not a GGUF file; pass a .gguf, an ONNX export folder or a model folder")
    if (path / "slmkit_onnx.json").is_file():
        meta = json.loads((path / "slmkit_onnx.json").read_text())
        if meta.get("kind") != "decoder-with-past":
            raise SystemExit(f"error: {path} is an ONNX {meta.get('kind')} graph; slm bench profiles decoders")
        return "onnxruntime int8" if meta.get("quant") == "int8" else "onnxruntime"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"error: {path} is not a model folder, ONNX export folder or GGUF file")
    quant = json.loads(cfg_path.read_text()).get("slmkit_quantization")
    return f"torch {quant.get('method', 'int8')}" if quant else "torch fp32"


def size_of(path: Path) -> int:
    """The model's bytes: the file, or a folder's weights (not a training run's checkpoint.safetensors, which holds
    the optimizer state for --resume)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir()
               if f.suffix in (".safetensors", ".onnx", ".gguf") and f.name != "checkpoint.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Runners: each returns (load_s, encode(text) -> ids, decode(ids, n) -> (prefill_s, per-token seconds),
# logits(ids) -> (T, V), context). Only the torch runners import torch: a llama.cpp or onnxruntime worker measures
# that runtime alone (torch's import costs ~0.5 GB of RSS and its thread pool competes for the cores).


def _torch_runner(path: Path, threads: int):
    import torch
    import transformers  # noqa: F401  imported before the clock starts: load time is the model's, not Python's

    from slmkit.infer.generate import SamplingParams, generate_ids, load
    from slmkit.model.folder import logits_of

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    lm = load(path, threads=threads)
    load_s = time.perf_counter() - t0

    def decode(ids: list[int], n: int) -> tuple[float, list[float]]:
        """Time `slm generate --temperature 0`'s own loop: prefill to the first token, then each next token."""
        stamps = [time.perf_counter()]
        for _ in generate_ids(lm.model, ids, SamplingParams(max_new_tokens=n + 1, temperature=0), set(), lm.context):
            stamps.append(time.perf_counter())
        return stamps[1] - stamps[0], list(np.diff(stamps[1:]))

    @torch.inference_mode()
    def full(ids: list[int]) -> np.ndarray:
        return logits_of(lm.model, torch.tensor([ids]))[0].float().numpy()

    return load_s, lm.encode, decode, full, lm.context


def _stepper(step: Callable[[list[int], int], np.ndarray]) -> Callable:
    """decode(ids, n) for a runtime with step(ids, pos) -> last logits: greedy, one token per step."""
    def decode(ids: list[int], n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        logits = step(ids, 0)
        prefill_s, lat, pos = time.perf_counter() - t0, [], len(ids)
        for _ in range(n):
            t = time.perf_counter()
            logits = step([int(np.argmax(logits))], pos)
            lat.append(time.perf_counter() - t)
            pos += 1
        return prefill_s, lat
    return decode


def _llama_cpp_runner(path: Path, threads: int):
    from gguf import GGUFReader

    from slmkit.edge.runtimes import llama_cpp_model

    field = GGUFReader(path).fields["llama.context_length"]
    ctx = int(field.parts[field.data[0]][0])
    t0 = time.perf_counter()
    llm = llama_cpp_model(path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0

    def encode(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def last_logits() -> np.ndarray:
        # without logits_all, llama-cpp-python no longer copies logits into llm.scores: read the context's buffer
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    def step(ids: list[int], pos: int) -> np.ndarray:
        if pos == 0:
            llm.reset()
        llm.eval(ids)
        return last_logits()

    def full(ids: list[int]) -> np.ndarray:
        llm.reset()
        rows = []
        for i in range(len(ids)):  # logits_all is off (its buffer would inflate RSS): one position at a time
            llm.eval(ids[i:i + 1])
            rows.append(last_logits())
        return np.stack(rows)

    return load_s, encode, _stepper(step), full, ctx


def _onnx_runner(path: Path, threads: int):
    from tokenizers import Tokenizer  # the Rust tokenizer itself: transformers' would import torch

    from slmkit.edge.runtimes import empty_past, onnx_session

    cfg = json.loads((path / "config.json").read_text())
    t0 = time.perf_counter()
    sess = onnx_session(path / "model.onnx", threads)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    load_s = time.perf_counter() - t0
    state = {}

    def step(ids: list[int], pos: int) -> np.ndarray:
        if pos == 0:
            state["k"] = state["v"] = empty_past(cfg)
        logits, state["k"], state["v"] = sess.run(None, {"input_ids": np.array([ids], dtype=np.int64),
                                                         "past_keys": state["k"], "past_values": state["v"]})
        return logits[0, -1]

    def full(ids: list[int]) -> np.ndarray:
        past = empty_past(cfg)
        return sess.run(None, {"input_ids": np.array([ids], dtype=np.int64), "past_keys": past,
                               "past_values": past})[0][0]

    return load_s, lambda text: tok.encode(text).ids, _stepper(step), full, int(cfg["max_position_embeddings"])


def nll_sum(logits: np.ndarray, targets: list[int]) -> float:
    """Summed cross-entropy of (T, V) LOGITS against T target ids, in float64 numpy (no torch in the worker)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    log_z = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]  # (T,)
    return float((log_z - x[np.arange(len(targets)), targets]).sum())


def timed(decode, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Medians over REPEATS greedy runs after one untimed warm-up (first-call allocations, lazy kernel setup)."""
    decode(prompt, min(new_tokens, 8))
    prefill, decode_rates, lat = [], [], []
    for _ in range(repeats):
        p, steps = decode(prompt, new_tokens)
        prefill.append(len(prompt) / p)
        decode_rates.append(len(steps) / sum(steps))
        lat += steps
    return {"prompt_tokens": len(prompt), "repeats": repeats, "prefill_tok_s": float(np.median(prefill)),
            "decode_tok_s": float(np.median(decode_rates)), "decode_tok_s_runs": decode_rates,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p95_ms": 1e3 * float(np.percentile(lat, 95))}


def worker(spec: dict) -> dict:
    """Run one backend (in its own process) and return its measurements."""
    import resource

    if spec.get("memory_cap"):
        resource.setrlimit(resource.RLIMIT_DATA, (spec["memory_cap"], spec["memory_cap"]))
    threads = spec["threads"] or os.cpu_count() or 1
    path, backend = Path(spec["path"]), spec["backend"]
    if backend == "llama.cpp":
        load_s, encode, decode, full, ctx = _llama_cpp_runner(path, threads)
    elif backend.startswith("onnxruntime"):
        load_s, encode, decode, full, ctx = _onnx_runner(path, threads)
    else:
        load_s, encode, decode, full, ctx = _torch_runner(path, threads)
    prompt = encode(PROMPT)[: max(1, ctx - spec["new_tokens"] - 2)]
    result = {"load_s": load_s, **timed(decode, prompt, spec["new_tokens"], spec.get("repeats", 3))}
    if spec.get("data"):
        ids = encode(Path(spec["data"]).read_text(encoding="utf-8", errors="replace")[:200_000])
        window = min(ctx, 256)
        nll, n = 0.0, 0
        for s in range(0, min(len(ids) - 1, spec["ppl_tokens"]), window):
            chunk = ids[s:s + window + 1]
            if len(chunk) < 2:
                break
            nll += nll_sum(full(chunk[:-1]), chunk[1:])
            n += len(chunk) - 1
        result["perplexity"] = math.exp(nll / max(1, n))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    result["torch_imported"] = "torch" in sys.modules  # the llama.cpp and onnxruntime workers must say False
    return result


def run_one(path: Path, threads: int | None, memory_cap: int | None, new_tokens: int, data: Path | None,
            ppl_tokens: int, repeats: int = 3) -> dict:
    """Profile PATH in a fresh Python process (`worker`); a row of measurements, or of its error."""
    backend = backend_of(path)
    spec = {"path": str(path), "backend": backend, "threads": threads, "memory_cap": memory_cap,
            "new_tokens": new_tokens, "data": str(data) if data else None, "ppl_tokens": ppl_tokens,
            "repeats": repeats}
    code = "import json,sys; from slmkit.edge.bench import worker; print(json.dumps(worker(json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    row = {"target": str(path), "backend": backend, "size_mb": size_of(path) / 1e6}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        row["error"] = "out of memory under --memory-cap" if "MemoryError" in proc.stderr or "alloc" in last else last
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


COLUMNS = [("backend", "backend", "{}"), ("size_mb", "size MB", "{:.2f}"), ("load_s", "load s", "{:.2f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
           ("decode_tok_s", "decode tok/s", "{:.1f}"), ("p50_ms", "p50 ms", "{:.2f}"), ("p95_ms", "p95 ms", "{:.2f}"),
           ("perplexity", "perplexity", "{:.3f}")]


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if c[0] in ("backend", "decode_tok_s") or any(c[0] in r for r in rows)]
    lines = ["| target | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [c[2].format(r[c[0]]) if c[0] in r else r.get("error", "-") if c[0] == "decode_tok_s" else "-"
                 for c in cols]
        lines.append(f"| {Path(r['target']).name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    """Decode tokens/s and size per target, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "decode_tok_s" in r]
    names = [f"{Path(r['target']).name}\n({r['backend']})" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(ok)), 4))
    axes[0].bar(names, [r["decode_tok_s"] for r in ok], color="tab:blue")
    axes[0].set_ylabel("decode tokens/s")
    axes[1].bar(names, [r["size_mb"] for r in ok], color="tab:orange")
    axes[1].set_ylabel("size MB")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(targets: list[Path], threads: int | None = None, memory_cap: str | None = None, new_tokens: int = 64,
         data: Path | None = None, ppl_tokens: int = 1024, as_json: bool = False, out: Path | None = None,
         repeats: int = 3, overwrite: bool = False) -> list:
    """Profile each TARGET (model folder, int8 folder, ONNX export folder or .gguf) in its own process."""
    from slmkit.files import atomic_write_bytes
    from slmkit.options import check_numbers

    cap = parse_size(memory_cap) if memory_cap else None
    check_numbers(dict(threads=threads, new_tokens=new_tokens, ppl_tokens=ppl_tokens, repeats=repeats),
                  {"new_tokens": "greedy tokens to decode per target", "ppl_tokens": "tokens of --data to score",
                   "repeats": "timed runs per target"})
    for t in targets:
        if not Path(t).exists():
            raise SystemExit(f"error: {t} does not exist; pass model folders, ONNX export folders or .gguf files")
        backend_of(Path(t))
    if data is not None and not Path(data).is_file():
        raise SystemExit(f"error: --data {data} does not exist")
    if out is not None and not Path(out).parent.is_dir():
        raise SystemExit(f"error: the directory of --out {out} does not exist; create it first")
    if out is not None:  # the report and its chart: neither replaces a file without --overwrite
        from slmkit.files import check_out  # (light: the parent process imports no runtime)

        for path in (Path(out), Path(out).with_suffix(".png")):
            check_out(path, overwrite, sources=[Path(t) for t in targets], kind="file")
    rows = [run_one(Path(t), threads, cap, new_tokens, data, ppl_tokens, repeats) for t in targets]
    table = markdown(rows)
    if as_json:
        print(json.dumps(rows))
    else:
        print(table)
    if out is not None:
        png = Path(out).with_suffix(".png")
        chart(rows, png)
        setting = f"threads {threads or os.cpu_count()}" + (f", memory cap {memory_cap}" if cap else "")
        atomic_write_bytes(Path(out), f"# slm bench ({setting})\n\n{table}\n\n![decode tokens/s and size]({png.name})\n"
                           .encode())
    return rows


def add_args(p) -> None:
    p.add_argument("targets", nargs="+", type=Path, help="model folders (torch), `slm quantize` folders (torch "
                   "int8), `slm export --format onnx` folders (onnxruntime), .gguf files (llama.cpp)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per backend (default: all cores); 1 "
                   "simulates a small device")
    p.add_argument("--memory-cap", default=None, help="limit each backend process's heap, e.g. 512M (RLIMIT_DATA); "
                   "a backend that does not fit reports out of memory")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens to decode per target (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per target after one warm-up; tokens/s are "
                   "their medians (default: 3)")
    p.add_argument("--data", type=Path, default=None, help="held-out text file: adds perplexity per backend")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="tokens of --data to score (default: 1024)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON list of rows")
    p.add_argument("--out", type=Path, default=None, help="write a markdown report here and a PNG chart beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report (and its chart)")
