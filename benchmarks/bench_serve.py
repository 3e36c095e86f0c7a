"""Claim: `slm serve` batches concurrent requests (aggregate tokens/s grows with clients), and on the same SmolLM2
weights it keeps up with llama.cpp's own server given as many slots as clients (issue 34: >= llama-server's aggregate
tokens/s at 16 and 64 clients, >= 0.8x at 1 client, 0 errors, RSS flat over a soak).

Each target is started as its own process on a free loopback port, 2 threads, and driven by 1, 4, 16, 64 concurrent
clients (each sends streamed /v1/completions requests one after another): aggregate completion tokens/s, p50/p95
time to first token and request latency, errors, and the server's peak RSS (sampled every 0.25 s, children
included). Targets:

    slm       slm serve MODEL (--dtype, default bf16)          slm-int8  slm serve INT8 (an `slm quantize` folder)
    llama-server   llama.cpp's server on GGUF, --parallel = clients (restarted per level), continuous batching
    llama-cpp-python   python -m llama_cpp.server on GGUF (one slot)

    python benchmarks/bench_serve.py --model /tmp/bs/smollm2 --int8 /tmp/smollm2-int8 --gguf smollm2-q8_0.gguf \\
        --llama-server llama.cpp/build/bin/llama-server --clients 1 4 16 64 [--soak 600]

--soak S drives the first target at 16 clients for S seconds afterwards and samples its RSS every 10 s.
Tokens are counted from the stream (`usage` when the server sends it, else one per content chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the city begins", "In the morning the committee met to",
           "Once upon a time, in a small town", "The best way to learn a language is",
           "Scientists have found that the ocean", "My favourite recipe for bread",
           "The report on the new railway said", "When the storm reached the coast,"]
# llama-cpp-python 0.3.36 built natively segfaults in its repacked q8_0/q4_0 kernels on AMX CPUs (see
# slmkit.edge.runtimes): its server is started with weight repacking off, as slmkit's own checks open llama.cpp.
LCPP_NO_REPACK = """import sys, llama_cpp.llama_cpp as low
d = low.llama_model_default_params
def params():
    p = d(); p.use_extra_bufts = False; return p
low.llama_model_default_params = params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def command(target: str, a, port: int, clients: int) -> list[str]:
    """The server command line of TARGET at a level of CLIENTS (llama-server gets a slot per client)."""
    threads = str(a.threads)
    if target in ("slm", "slm-int8"):
        folder, dtype = (a.model, a.dtype) if target == "slm" else (a.int8, "fp32")
        top = max(a.clients)
        return [sys.executable, "-m", "slmkit", "serve", f"bench={folder}", "--port", str(port), "--threads", threads,
                "--device", "cpu", "--dtype", dtype, "--max-batch", str(top), "--max-queue", str(4 * top),
                "--kv-memory", a.kv_memory] + (["--compile"] if a.compile and target == "slm" else [])
    if target == "llama-server":
        ctx = clients * a.slot_context  # llama-server splits its context among the slots
        return [str(a.llama_server), "-m", str(a.gguf), "--port", str(port), "-t", threads, "-tb", threads,
                "--parallel", str(clients), "-c", str(ctx), "--alias", "bench", "--no-webui"]
    if target == "llama-cpp-python":
        return [sys.executable, "-c", LCPP_NO_REPACK, "--model", str(a.gguf), "--port", str(port), "--n_threads",
                threads, "--n_threads_batch", threads, "--n_ctx", str(a.slot_context * 4), "--model_alias", "bench"]
    raise SystemExit(f"unknown target {target!r}")


class RSS:
    """Peak and samples of a process tree's resident memory, polled in a thread."""

    def __init__(self, pid: int, every: float = 0.25):
        self.proc, self.every, self.peak, self.samples = psutil.Process(pid), every, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def now(self) -> int:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def start(target: str, a, clients: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(command(target, a, port, clients), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    probe = url + ("/v1/models" if target == "llama-cpp-python" else "/health")
    t0 = time.time()
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"{target} exited with {proc.returncode} while starting: {' '.join(proc.args)}")
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{target} did not come up in 300 s")


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float | None, float, int, bool]:
    """A streamed completion: (time to first token, latency, completion tokens, ok)."""
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return None, time.perf_counter() - t0, 0, False
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"].get("completion_tokens")
            text = "".join(c.get("text") or "" for c in data.get("choices") or [])
            if text:
                chunks += 1
                first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, usage if usage is not None else chunks, True


async def level(url: str, clients: int, requests_each: int, max_tokens: int, seconds: float | None = None) -> dict:
    """CLIENTS concurrent clients, each sending REQUESTS_EACH requests (or, with SECONDS, until that much time)."""
    lat, ttft, tokens, errors = [], [], 0, 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        r = 0
        while (r < requests_each) if seconds is None else (time.perf_counter() - t0 < seconds):
            body = {"model": "bench", "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": 1000 * c + r, "stream": True,
                    "stream_options": {"include_usage": True}}
            r += 1
            try:
                first, took, n, ok = await one_request(http, url, body)
            except (httpx.HTTPError, json.JSONDecodeError):  # a broken event is the server's error, not the bench's
                errors += 1
                continue
            errors += not ok
            tokens += n
            lat.append(took)
            if first is not None:
                ttft.append(first)

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(clients)])
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat) + errors, "errors": errors, "completion_tokens": tokens,
            "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_ttft_s": round(statistics.median(ttft), 3) if ttft else None,
            "p95_ttft_s": round(percentile(ttft, 0.95), 3), "p50_latency_s": round(statistics.median(lat), 3),
            "p95_latency_s": round(percentile(lat, 0.95), 3)}


def run_target(target: str, a) -> list[dict]:
    """Every level of TARGET; llama-server is restarted per level with one slot per client."""
    rows, proc = [], None
    try:
        for n in a.clients:
            if target == "llama-cpp-python" and n > a.lcpp_max_clients:
                continue  # one slot: 64 clients only queue longer, and cost minutes
            if proc is None or target == "llama-server":
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
                proc, url = start(target, a, n)
                asyncio.run(level(url, 2, 1, 8))  # warm-up: first-call allocations, thread start
            rss = RSS(proc.pid)
            row = asyncio.run(level(url, n, max(1, -(-a.min_requests // n)), a.max_tokens))
            row["peak_rss_mb"] = round(rss.close() / 2**20)
            rows.append({"target": target, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return rows


def soak(target: str, a) -> dict:
    """TARGET at 16 clients for a.soak seconds, RSS sampled every 10 s (is memory flat?)."""
    proc, url = start(target, a, 16)
    rss = RSS(proc.pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        t0 = time.time()
        while not stop.wait(10):
            samples.append((round(time.time() - t0), round(rss.now() / 2**20)))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        row = asyncio.run(level(url, 16, 0, a.max_tokens, seconds=a.soak))
    finally:
        stop.set()
        th.join()
        row_peak = rss.close()
        proc.terminate()
        proc.wait(30)
    return {"target": target, **row, "peak_rss_mb": round(row_peak / 2**20), "rss_mb_every_10s": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a decoder model folder (slm serve)")
    ap.add_argument("--int8", type=Path, help="the same model as an `slm quantize` folder (--method int8 or w8a8)")
    ap.add_argument("--gguf", type=Path, help="the same model as GGUF (slm export --format gguf --quant q8_0)")
    ap.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    ap.add_argument("--targets", nargs="+", help="default: every target the arguments allow")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=8, help="requests per level at least (default: 8)")
    ap.add_argument("--threads", type=int, default=2, help="each server's threads (default: 2)")
    ap.add_argument("--dtype", default="bf16", help="slm serve --dtype for MODEL (default: bf16)")
    ap.add_argument("--kv-memory", default="2G", help="slm serve --kv-memory (default: 2G)")
    ap.add_argument("--compile", action="store_true", help="slm serve --compile for MODEL (single-request steps)")
    ap.add_argument("--slot-context", type=int, default=512, help="llama.cpp context per slot (default: 512)")
    ap.add_argument("--lcpp-max-clients", type=int, default=16, help="largest level for llama-cpp-python (default: 16)")
    ap.add_argument("--soak", type=float, default=0, help="seconds of a 16-client soak of the first target")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vs_llamacpp.json")
    a = ap.parse_args()
    targets = a.targets or (["slm"] + (["slm-int8"] if a.int8 else []) + (["llama-server"] if a.llama_server else [])
                            + (["llama-cpp-python"] if a.gguf else []))
    cfg = json.loads((a.model / "config.json").read_text())
    result = {"model": str(a.model), "int8": str(a.int8) if a.int8 else None, "gguf": str(a.gguf) if a.gguf else None,
              "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"), "max_tokens": a.max_tokens,
              "threads": a.threads, "dtype": a.dtype, "compile": a.compile, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv), "rows": [],
              "soak": None}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for t in targets:  # written after each target, so a run cut short keeps what it measured
        result["rows"] += run_target(t, a)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    if a.soak:
        result["soak"] = soak(targets[0], a)
    print_table(result["rows"], targets)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out}")


def print_table(rows: list[dict], targets: list[str]) -> None:
    """One line per target and level, with the ratio to llama-server's aggregate tokens/s at the same level."""
    peer = {r["clients"]: r["tokens_per_s"] for r in rows if r["target"] == "llama-server"}
    print(f"{'target':>16} {'clients':>7} {'errors':>6} {'tokens':>7} {'tok/s':>7} {'x llama-server':>14} "
          f"{'ttft p50/p95 s':>15} {'latency p50/p95 s':>18} {'RSS MB':>7}")
    for r in rows:
        ratio = r["tokens_per_s"] / peer[r["clients"]] if peer.get(r["clients"]) else float("nan")
        r["x_llama_server"] = round(ratio, 2)
        print(f"{r['target']:>16} {r['clients']:>7} {r['errors']:>6} {r['completion_tokens']:>7} "
              f"{r['tokens_per_s']:>7.1f} {ratio:>14.2f} {r['p50_ttft_s']!s:>7}/{r['p95_ttft_s']:<7} "
              f"{r['p50_latency_s']:>9}/{r['p95_latency_s']:<8} {r['peak_rss_mb']:>7}")


if __name__ == "__main__":
    main()
