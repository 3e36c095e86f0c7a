"""Time-to-quality on tiny Shakespeare: `slm train --time 180s` with default settings vs nanoGPT's CPU recipe and a
hand-tuned plain `transformers` Llama, same run, same machine.

Data: ../shared/data/tinyshakespeare.txt; first 90% for training, last 10% held out (nanoGPT's split). The metric
is bits per byte on the held-out 10% (the text is ASCII, so bits per byte = bits per character).

nanoGPT is upstream's own train.py, run from ../shared/peers/nanogpt (unmodified) as a subprocess with its README's
CPU recipe (2000 iterations, 2 threads) on the files its data/shakespeare_char/prepare.py makes; its figure is the
val loss of its last evaluation (train.py's estimate_loss: 20 random batches of the held-out 10%) / ln 2.

    python benchmarks/bench_time_to_quality.py [--seconds 180] [--skip-peers | --only SYSTEM] [--peer-iters 2000]
        [--json ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

from benchmarks.peers.nanogpt_upstream import RECIPE_ITERS, nanogpt_available, run_cpu_recipe  # noqa: E402

SYSTEMS = ("slmkit", "nanoGPT", "transformers")


def run_slmkit(train_txt: Path, val_txt: Path, tmp: Path, seconds: float, extra: str) -> dict:
    """`slm train --time SECONDS` with default settings, then `slm eval` on the held-out text."""
    train_cmd = [sys.executable, "-m", "slmkit", "train", "--data", str(train_txt), "--out", str(tmp / "model"),
                 "--time", f"{seconds:g}s", "--no-progress", *shlex.split(extra)]
    subprocess.run(train_cmd, check=True)
    out = subprocess.run([sys.executable, "-m", "slmkit", "eval", str(tmp / "model"), "--data", str(val_txt),
                          "--json"], check=True, capture_output=True, text=True)
    ev = json.loads(out.stdout.strip().splitlines()[-1])
    summary = json.loads((tmp / "model" / "training_summary.json").read_text())
    return {"bits_per_byte": ev["bits_per_byte"], "train_seconds": summary["train_seconds"],
            "preset": summary["preset"], "parameters": summary["parameters"], "tokens_per_s": summary["tokens_per_s"]}


def run_hf_llama(text: str, n: int, seconds: float) -> dict:
    """The plain `transformers` Llama on bytes for SECONDS of training, scored on the whole held-out split."""
    from benchmarks.peers.hf_llama import train_hf_llama

    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    nb = len(text[:n].encode("utf-8"))
    r = train_hf_llama(raw[:nb], raw[nb:], vocab_size=256, seconds=seconds)
    return {"bits_per_byte": r["val_loss"] / math.log(2), "train_seconds": r["train_seconds"],
            "parameters": r["params"], "tokens_per_s": r["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--skip-peers", action="store_true", help="only run slmkit")
    ap.add_argument("--only", choices=SYSTEMS, help="run this one system alone")
    ap.add_argument("--peer-iters", type=int, default=RECIPE_ITERS, help="nanoGPT's --max_iters (and "
                    f"--lr_decay_iters); the recipe's {RECIPE_ITERS} unless a short check of the peer is wanted")
    ap.add_argument("--extra", default="", help='extra flags for slm train, one string (e.g. "--lr 0.01")')
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/time_to_quality.json"))
    args = ap.parse_args()
    if args.peer_iters < 1:
        ap.error(f"--peer-iters {args.peer_iters}: give at least 1")
    systems = ("slmkit",) if args.skip_peers else (args.only,) if args.only else SYSTEMS
    text = DATA.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text(text[:n], encoding="utf-8")
        (tmp / "val.txt").write_text(text[n:], encoding="utf-8")
        if "slmkit" in systems:
            rows["slmkit (defaults)"] = run_slmkit(tmp / "train.txt", tmp / "val.txt", tmp, args.seconds, args.extra)
        if "nanoGPT" in systems and nanogpt_available():
            r = run_cpu_recipe(text, tmp, max_iters=args.peer_iters, threads=2)
            rows[f"nanoGPT CPU recipe ({args.peer_iters} iters)"] = {
                "bits_per_byte": r["val_loss"] / math.log(2), "train_seconds": r["train_seconds"],
                "parameters": r["params"], "tokens_per_s": r["tokens_per_s"]}
        if "transformers" in systems:
            rows["transformers Llama 3L/128d bytes"] = run_hf_llama(text, n, args.seconds)
    print(f"\n{'system':<36}{'held-out bits/byte':>20}{'train s':>9}{'params':>11}")
    for name, r in rows.items():
        print(f"{name:<36}{r['bits_per_byte']:>20.3f}{r['train_seconds']:>9.0f}{r['parameters']:>11,}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seconds": args.seconds, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
