"""A/B of two checkouts of slmkit on this machine: the eager decode step, the compiled decode step and a training step.

Each measurement runs in a fresh process that imports slmkit from one tree; the trees alternate, and the ratio is the
median over rounds of new/old in that round, so a busy minute on a shared host slows both sides of a ratio alike.

    git worktree add ../slmkit-old HEAD~1
    python benchmarks/ab_trees.py ../slmkit-old . [--rounds 6] [--threads 1] [--what eager train compiled]

eager / compiled: Llama.step tokens/s at slm-1m, slm-7m, slm-30m (fp32, random weights, decode_layout for eager,
compile_step for compiled; 32-token prefill). train: ms per training step at nanoGPT's shape (bench_throughput's),
fp32 and bf16 autocast, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = (("slm-1m", 2048, 256), ("slm-7m", 8192, 256), ("slm-30m", 16384, 128))


def _step_rate(model, n: int, reps: int = 5) -> float:
    import torch

    rates = []
    with torch.inference_mode():
        cache = model.new_cache(1, 64 + n)
        model(torch.randint(0, 100, (1, 32)), cache=cache, pos=0)
        for i in range(16):  # warm-up
            model.step(5, cache, 32 + i)
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(n):
                model.step(7, cache, 32 + i)
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _train_ms(dtype) -> float:
    import torch

    from slmkit.model.folder import build_model
    from slmkit.model.presets import build_config
    from slmkit.training.losses import causal_lm_loss
    from slmkit.training.optim import make_optimizer

    torch.manual_seed(1337)
    cfg = build_config("slm-1m", 65, {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                                      "hidden_size": 128}, block_size=64)
    model = build_model(cfg)
    opt = make_optimizer(model, 1e-3, 0.1, "cpu", "adamw", ns_bf16=dtype == torch.bfloat16)
    x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))  # (batch, block)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = causal_lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        times.append((time.perf_counter() - t0) / 10 * 1e3)
    return statistics.median(times)


def measure(what: str, threads: int) -> dict:
    """One tree's figures (run inside the child process, with that tree first on sys.path)."""
    import torch

    from slmkit.model.folder import build_model
    from slmkit.model.llama import decode_layout
    from slmkit.model.presets import build_config

    torch.set_num_threads(threads)
    if what == "train":
        return {"fp32 ms": _train_ms(None), "bf16 ms": _train_ms(torch.bfloat16)}
    out = {}
    for preset, vocab, n in SHAPES:
        torch.manual_seed(0)
        model = build_model(build_config(preset, vocab, {})).eval()
        if what == "eager":
            decode_layout(model)
        else:
            from slmkit.infer.decode import compile_step

            model.compiled_step = compile_step(model)
        out[f"{preset} tok/s"] = _step_rate(model, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="1 is steadier on a shared 2-core host")
    ap.add_argument("--what", nargs="+", default=["eager", "train", "compiled"], choices=["eager", "train", "compiled"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: WHAT THREADS, in the tree's process
    args = ap.parse_args()
    if args.child:
        import slmkit

        assert Path(slmkit.__file__).resolve().is_relative_to(Path(os.environ["PYTHONPATH"])), slmkit.__file__
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    for what in args.what:
        pairs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            got = []
            for tree in (args.old, args.new):  # the tree first on the child's path, before any installed slmkit
                env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
                proc = subprocess.run([sys.executable, __file__, "-", "-", "--child", what, str(args.threads)],
                                      capture_output=True, text=True, check=True, env=env)
                got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for key in got[0]:
                pairs.setdefault(key, []).append((got[0][key], got[1][key]))
        for key, p in pairs.items():
            faster = [(o / n) if key.endswith("ms") else (n / o) for o, n in p]  # new's speed / old's
            print(f"{what:9s} {key:14s} old {statistics.median(o for o, _ in p):8.1f}  new "
                  f"{statistics.median(n for _, n in p):8.1f}  speed new/old {statistics.median(faster):.3f} "
                  f"(rounds: {', '.join(f'{r:.3f}' for r in faster)})", flush=True)


if __name__ == "__main__":
    main()
