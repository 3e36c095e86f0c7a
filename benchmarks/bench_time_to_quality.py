"""Time-to-quality on tiny Shakespeare: `slm train --time 180s` with default settings vs nanoGPT's CPU recipe and a
hand-tuned plain `transformers` Llama, same run, same machine.

Data: ../shared/data/tinyshakespeare.txt; first 90% for training, last 10% held out (nanoGPT's split). The metric
is bits per byte on the held-out 10% (the text is ASCII, so bits per byte = bits per character).

    python benchmarks/bench_time_to_quality.py [--seconds 180] [--skip-peers] [--json ...]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--skip-peers", action="store_true", help="only run slmkit")
    ap.add_argument("--extra", default="", help='extra flags for slm train, one string (e.g. "--lr 0.01")')
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/time_to_quality.json"))
    args = ap.parse_args()
    text = DATA.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text(text[:n], encoding="utf-8")
        (tmp / "val.txt").write_text(text[n:], encoding="utf-8")
        train_cmd = [sys.executable, "-m", "slmkit", "train", "--data", str(tmp / "train.txt"), "--out",
                     str(tmp / "model"), "--time", f"{args.seconds:g}s", "--no-progress", *shlex.split(args.extra)]
        subprocess.run(train_cmd, check=True)
        out = subprocess.run([sys.executable, "-m", "slmkit", "eval", str(tmp / "model"), "--data",
                              str(tmp / "val.txt"), "--json"], check=True, capture_output=True, text=True)
        ev = json.loads(out.stdout.strip().splitlines()[-1])
        summary = json.loads((tmp / "model" / "training_summary.json").read_text())
        rows["slmkit (defaults)"] = {"bits_per_byte": ev["bits_per_byte"], "train_seconds": summary["train_seconds"],
                                     "preset": summary["preset"], "parameters": summary["parameters"],
                                     "tokens_per_s": summary["tokens_per_s"]}
        if not args.skip_peers:
            chars = sorted(set(text))  # nanoGPT's character vocabulary (65 symbols)
            stoi = {c: i for i, c in enumerate(chars)}
            enc = lambda s: np.array([stoi[c] for c in s], dtype=np.uint16)  # noqa: E731
            from benchmarks.peers.nanogpt import train_nanogpt

            r = train_nanogpt(enc(text[:n]), enc(text[n:]), vocab_size=len(chars), threads=2)
            rows["nanoGPT CPU recipe (2000 iters)"] = {"bits_per_byte": r["val_loss"] / math.log(2),
                                                       "train_seconds": r["train_seconds"],
                                                       "parameters": r["params"], "tokens_per_s": r["tokens_per_s"]}
            from benchmarks.peers.hf_llama import train_hf_llama

            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
            nb = len(text[:n].encode("utf-8"))
            r = train_hf_llama(raw[:nb], raw[nb:], vocab_size=256, seconds=args.seconds)
            rows["transformers Llama 3L/128d bytes"] = {"bits_per_byte": r["val_loss"] / math.log(2),
                                                        "train_seconds": r["train_seconds"],
                                                        "parameters": r["params"], "tokens_per_s": r["tokens_per_s"]}
    print(f"\n{'system':<36}{'held-out bits/byte':>20}{'train s':>9}{'params':>11}")
    for name, r in rows.items():
        print(f"{name:<36}{r['bits_per_byte']:>20.3f}{r['train_seconds']:>9.0f}{r['parameters']:>11,}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seconds": args.seconds, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
