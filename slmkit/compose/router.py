"""A router over specialists: text -> the name of the model that should answer it, decided before generating.

    text -> keyword/regex rules (first match wins) -> else the classifier's most probable route
         -> below --min-confidence: the fallback route

A router folder IS a classifier folder (what `slm finetune --task classify` writes, so `slm classify` and
`slm eval` read it too) plus router.json: the routes, the rules, the fallback and the confidence threshold. The
route names are the model names given to `slm serve`. `slm route train` (route_cli.py) writes one; `load_router`
opens one; `evaluate_router` backs `slm eval ROUTER --data labelled.jsonl`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROUTER_FILE = "router.json"
FORMAT = "slmkit-router"


@dataclass(frozen=True)
class Rule:
    """Send texts matching PATTERN (a case-insensitive regex, searched anywhere in the text) to ROUTE."""

    route: str
    pattern: str

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text, re.IGNORECASE) is not None


def parse_rule(spec: str, where: str = "--rule") -> Rule:
    """'ROUTE=REGEX' -> a Rule, or one line naming WHERE the bad rule came from."""
    route, sep, pattern = spec.partition("=")
    if not sep or not route.strip() or not pattern:
        raise SystemExit(f"error: {where} {spec!r}: write ROUTE=REGEX, e.g. code='\\bdef |import '")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise SystemExit(f"error: {where} {spec!r}: not a regular expression ({e})") from None
    return Rule(route.strip(), pattern)


def read_rules(path: Path) -> list[Rule]:
    """A rules file: one ROUTE=REGEX per line, blank lines and # comments skipped, first match wins."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SystemExit(f"error: cannot read --rules {path}: {e.strerror}") from None
    return [parse_rule(line.strip(), f"{path}:{i}") for i, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def is_router(folder: Path) -> bool:
    """True for a folder written by `slm route train` (it holds router.json)."""
    return (Path(folder) / ROUTER_FILE).is_file()


def read_spec(folder: Path) -> dict:
    """router.json of FOLDER, checked: routes, labels, rules, fallback, min_confidence."""
    path = Path(folder) / ROUTER_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is not readable JSON ({e}); train the router again with "
                         "`slm route train`") from None
    missing = [k for k in ("routes", "labels", "rules", "fallback", "min_confidence") if k not in spec]
    if spec.get("format") != FORMAT or missing:
        raise SystemExit(f"error: {path} is not a router file (format {spec.get('format')!r}, missing: "
                         f"{', '.join(missing) or 'none'}); train it again with `slm route train`")
    return spec


class Router:
    """A loaded router: `route(texts)` -> [(route, confidence, reason)], reason one of rule, router, fallback."""

    def __init__(self, folder: Path, spec: dict, model, tokenizer, labels: list[str]):
        self.folder, self.spec = Path(folder), spec
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.rules = [Rule(r["route"], r["pattern"]) for r in spec["rules"]]
        self.fallback: str | None = spec["fallback"]
        self.min_confidence = float(spec["min_confidence"])
        self.routes: list[str] = list(spec["routes"])

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """The classifier's route probabilities: (N, len(labels)) float32."""
        from slmkit.infer.classify import encode, max_length_for, pad_id_for, predict_logits

        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        limit = max_length_for(self.model.config, self.tokenizer, self.spec.get("max_length"))
        seqs = encode(self.tokenizer, texts, limit)
        device = str(next(self.model.parameters()).device)
        logits = predict_logits(self.model, seqs, pad_id_for(self.tokenizer), 32, device)
        return logits.softmax(-1).numpy()

    def route(self, texts: list[str]) -> list[tuple[str, float, str]]:
        """Rules first (confidence 1), then the classifier; under min_confidence the fallback answers (its
        confidence is the classifier's, so a caller can see how unsure it was)."""
        out: list[tuple[str, float, str] | None] = [None] * len(texts)
        rest = []
        for i, text in enumerate(texts):
            rule = next((r for r in self.rules if r.matches(text)), None)
            if rule is not None:
                out[i] = (rule.route, 1.0, "rule")
            else:
                rest.append(i)
        probs = self.probabilities([texts[i] for i in rest])  # (len(rest), n_labels)
        for i, p in zip(rest, probs, strict=True):
            best = int(p.argmax())
            if self.fallback is not None and p[best] < self.min_confidence:
                out[i] = (self.fallback, float(p[best]), "fallback")
            else:
                out[i] = (self.labels[best], float(p[best]), "router")
        return out  # type: ignore[return-value]


def load_router(folder: Path, device: str = "cpu") -> Router:
    """Open a router folder: its classifier (on DEVICE) and router.json."""
    from slmkit.infer.classify import load_classifier

    folder = Path(folder)
    if not is_router(folder):
        raise SystemExit(f"error: {folder} is not a router (no {ROUTER_FILE}); make one with `slm route train "
                         f"--data labelled.jsonl --encoder DIR --out {folder}`")
    spec = read_spec(folder)
    model, tokenizer, labels = load_classifier(folder, device)
    if labels != spec["labels"]:
        raise SystemExit(f"error: {folder}: the classifier's labels ({', '.join(labels)}) differ from "
                         f"{ROUTER_FILE}'s ({', '.join(spec['labels'])}); train the router again")
    return Router(folder, spec, model, tokenizer, labels)


def routing_report(router: Router, texts: list[str], truth: list[str]) -> dict:
    """Routing accuracy, per-route precision/recall/F1, the confusion matrix (rows: true route, columns: chosen
    route) and how many texts each stage (rule, router, fallback) decided."""
    from slmkit.infer.classify import classification_metrics

    picks = router.route(texts)
    names = list(router.routes)
    index = {r: i for i, r in enumerate(names)}
    result = classification_metrics([index[t] for t in truth], [index[r] for r, _, _ in picks], names)
    reasons = [why for _, _, why in picks]
    result["decided_by"] = {k: reasons.count(k) for k in ("rule", "router", "fallback")}
    result["mean_confidence"] = float(np.mean([c for _, c, _ in picks])) if picks else 0.0
    return result


def evaluate_router(folder: Path, data: list[str], text_col: str = "text", label_col: str = "label",
                    as_json: bool = False, device: str = "cpu") -> dict:
    """`slm eval ROUTER --data labelled.jsonl`: routing accuracy and the confusion matrix on labelled rows."""
    from slmkit.data.labelled import read_labelled_files

    router = load_router(Path(folder), device)
    texts, truth = read_labelled_files(data, text_col, label_col, router.routes, ("route", "router's routes"))
    result = routing_report(router, texts, truth)
    if as_json:
        print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "examples", "labels", "confusion_matrix",
                                                 "per_class", "decided_by", "mean_confidence")}))
    else:
        print(format_report(result))
    return result


def format_report(result: dict) -> str:
    """The routing accuracy line, the confusion matrix as a table and per-route recall."""
    names, cm = result["labels"], result["confusion_matrix"]
    width = max(8, *map(len, names))
    by = result["decided_by"]
    lines = [f"routing accuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} | examples "
             f"{result['examples']:,} | decided by rule {by['rule']}, router {by['router']}, fallback {by['fallback']}",
             "confusion matrix (rows: true route, columns: chosen route)",
             " " * width + "".join(f" {n:>{width}}" for n in names) + f" {'recall':>8}"]
    for name, row in zip(names, cm, strict=True):
        recall = result["per_class"][name]["recall"]
        lines.append(f"{name:<{width}}" + "".join(f" {v:>{width}}" for v in row) + f" {recall:>8.3f}")
    return "\n".join(lines)
