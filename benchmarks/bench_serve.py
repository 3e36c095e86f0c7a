"""Claim: `slm serve` batches concurrent requests, so aggregate tokens/s grows with the number of clients
(issue 6 target: 16 clients >= 4x the 1-client aggregate tokens/s, with no errors).

Starts `slm serve MODEL_DIR` as a separate process on a free loopback port, then for 1, 4 and 16 concurrent clients
sends /v1/completions requests (each client one after another) and measures aggregate completion tokens/s (usage
counts, so early end-of-text is counted honestly) and p50/p95 request latency. Prints a table, writes JSON.

    python benchmarks/bench_serve.py --model /tmp/slm3m [--clients 1 4 16] [--max-tokens 64]
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
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the", "JULIET:\nO Romeo",
           "MENENIUS:\nWhy, masters", "Second Servingman:", "LADY CAPULET:\nWhat say you", "GLOUCESTER:\nStay"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def level(url: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    lat: list[float] = []
    tokens = errors = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for r in range(requests_each):
            body = {"model": "bench", "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": 1000 * c + r}
            t0 = time.perf_counter()
            resp = await http.post(url + "/v1/completions", json=body)
            lat.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors += 1
                continue
            tokens += resp.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, http) for c in range(clients)])
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests_each, "errors": errors, "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(statistics.median(lat), 3), "p95_latency_s": round(percentile(lat, 0.95), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a decoder model folder")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=8, help="requests per level at least (default: 8)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (default: 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    a = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", f"bench={a.model}", "--port", str(port),
                               "--threads", str(a.threads), "--max-batch", str(max(a.clients)),
                               "--max-queue", str(4 * max(a.clients))], env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        asyncio.run(level(url, 2, 1, 8))  # warm-up: first-call allocations, thread start
        rows = [asyncio.run(level(url, n, max(2, -(-a.min_requests // n)), a.max_tokens)) for n in a.clients]
    finally:
        server.terminate()
        server.wait(30)
    base = rows[0]["tokens_per_s"]
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens':>7} {'tok/s':>8} {'x 1-client':>10} "
          f"{'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base, 2)
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['completion_tokens']:>7} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup']:>10.2f} {r['p50_latency_s']:>7.3f} {r['p95_latency_s']:>7.3f}")
    cfg = json.loads((a.model / "config.json").read_text())
    result = {"model": str(a.model), "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"),
              "max_tokens": a.max_tokens, "server_threads": a.threads, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
