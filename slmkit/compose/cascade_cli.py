"""Verb `cascade`: calibrate a small model against a large one on held-out data and write a cascade folder.

    SMALL, LARGE, DATA -> both models answer every row -> per-row quality (accuracy, or ROUGE-L F1 of a reply)
    -> small's confidence per row -> sweep thresholds: (escalation rate, quality) -> pick one -> DIR/
       cascade.json (the cascade), curve.json + curve.png (quality vs escalation), README.md (the card)

The folder is what `slm classify`, `slm eval`, `slm generate`, `slm chat` and `slm serve` take in place of a model
folder (cascade_verbs.py, cascade_serve.py); cascade.py reads it and answers through it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slmkit.compose.cascade import (
    CASCADE_FILE,
    FORMAT,
    Decoder,
    RemoteError,
    fit_temperature,
    mean_logprob,
    open_classifier,
    pick,
    rouge_l,
    stored_ref,
    sweep,
    top_probability,
)
from slmkit.compose.remote import is_url

DEFAULT_MIN_QUALITY = 0.99  # neither --min-quality nor --max-escalation: keep 99% of the large model's quality


def calibrate_classifier(small_dir: Path, large: str, data: Path, text_col: str, label_col: str, batch_size: int,
                         max_length: int | None, device: str, remote: dict) -> dict:
    """Both classifiers on every labelled row of DATA: the temperature, confidences and per-row correctness."""
    from slmkit.data.labelled import read_labelled

    small = open_classifier(small_dir, device=device)
    big = open_classifier(large, device=device, **remote)
    if big.labels is not None and sorted(big.labels) != sorted(small.labels):
        raise SystemExit(f"error: {small_dir} and {large} have different label sets ({', '.join(small.labels[:8])} "
                         f"vs {', '.join(big.labels[:8])}); a cascade needs the same labels")
    texts, labels = read_labelled(Path(data), text_col, label_col)
    unknown = sorted(set(labels) - set(small.labels))
    if unknown:
        raise SystemExit(f"error: {data}: label {unknown[0]!r} is not one of {small_dir}'s labels "
                         f"({', '.join(small.labels[:20])}); check --label-col or the data")
    y = torch.tensor([small.labels.index(v) for v in labels])
    print(f"calibrating on {len(texts):,} rows of {data}: small {small.name} ...", file=sys.stderr)
    logits = small.logits(texts, batch_size, max_length)  # (N, K)
    temperature = fit_temperature(logits, y)
    conf, pred = top_probability(logits, temperature)
    print(f"  large {big.name} ...", file=sys.stderr)
    try:
        large_pred = [r[0]["label"] for r in big.top(texts, 1, batch_size, max_length)]
    except RemoteError as e:
        raise SystemExit(f"error: the large model: {e}") from None
    strays = sorted(set(large_pred) - set(small.labels))
    if strays:
        raise SystemExit(f"error: {large} answers label {strays[0]!r}, not one of {small_dir}'s labels; a cascade "
                         "needs the same labels")
    return {"confidence": conf, "small_q": (pred == y.numpy()).astype(np.float64),
            "large_q": np.array([a == b for a, b in zip(large_pred, labels, strict=True)], dtype=np.float64),
            "temperature": temperature, "quality": "accuracy",
            "confidence_method": "top probability after temperature scaling (Guo et al., 2017)"}


def calibrate_decoder(small_dir: Path, large: str, data: Path, max_new_tokens: int, device: str, remote: dict,
                      skip_bad_lines: bool = False) -> dict:
    """Both decoders answer every conversation of chat JSONL DATA greedily: the small model's mean token log-prob
    and each answer's ROUGE-L F1 against the reference (the conversation's last assistant turn)."""
    from slmkit.data.chat import read_conversations

    conversations = read_conversations([Path(data)], skip_bad_lines)
    small, big = Decoder(small_dir, device=device), Decoder(large, device=device, **remote)
    greedy = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0)
    conf, small_q, large_q = [], [], []
    print(f"calibrating on {len(conversations):,} conversations of {data} (greedy, {max_new_tokens} tokens at "
          "most)", file=sys.stderr)
    for i, messages in enumerate(conversations):
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")  # the reply to match
        history, reference = messages[:last], messages[last]["content"]
        text, prompt_ids, answer_ids, _ = small.answer(messages=history, **greedy)
        conf.append(mean_logprob(small.lm, prompt_ids, answer_ids))
        small_q.append(rouge_l(text, reference))
        try:
            large_q.append(rouge_l(big.answer(messages=history, **greedy)[0], reference))
        except RemoteError as e:
            raise SystemExit(f"error: the large model: {e}") from None
        if (i + 1) % 50 == 0:
            print(f"  {i + 1:,}/{len(conversations):,}", file=sys.stderr)
    return {"confidence": np.array(conf), "small_q": np.array(small_q), "large_q": np.array(large_q),
            "temperature": None, "quality": "rouge_l_f1", "max_new_tokens": max_new_tokens,
            "confidence_method": "mean token log-probability of the small model's answer"}


def plot_curve(points: list[dict], chosen: dict, figures: dict, quality: str, out_png: Path) -> None:
    """Quality against the share of requests escalated, the two models' own quality and the chosen point."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slmkit.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([p["escalation_rate"] for p in points], [p["quality"] for p in points], color="tab:blue",
            label="cascade")
    ax.axhline(figures["large"], color="tab:orange", linestyle="--", linewidth=1, label="large alone")
    ax.axhline(figures["small"], color="tab:green", linestyle=":", linewidth=1, label="small alone")
    ax.plot([chosen["escalation_rate"]], [chosen["quality"]], "o", color="tab:red",
            label=f"chosen: {chosen['escalation_rate']:.0%} escalated")
    ax.set_xlabel("share of requests escalated to the large model")
    ax.set_ylabel(quality.replace("_", " ") + " (calibration data)")
    ax.set_title("cascade: quality vs escalation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def card(spec: dict) -> str:
    """README.md of a cascade folder: what answers, when it escalates, the calibration figures."""
    c = spec["calibration"]
    q = c["quality"].replace("_", " ")
    return "\n".join([
        f"# Cascade: {spec['small']} -> {spec['large']}", "",
        f"A {spec['kind']} cascade written by `slm cascade`. The small model ({spec['small']}) answers; when its "
        f"confidence ({spec['confidence']}) is under **{spec['threshold']:.6g}**, the large model "
        f"({spec['large']}) answers instead. Every answer says which one produced it.", "",
        f"Calibrated on {c['examples']:,} rows of `{c['data']}` ({q}; target: {c['target']}):", "",
        "| small alone | large alone | cascade | escalated |", "|---|---|---|---|",
        f"| {c['small']:.4f} | {c['large']:.4f} | {c['cascade']:.4f} | {c['escalation_rate']:.1%} |", "",
        "![quality vs escalation](curve.png)", "",
        "Use it wherever a model folder goes: `slm classify`, `slm eval`, `slm generate`, `slm chat`, "
        "`slm serve`.", ""])


def write_folder(out: Path, spec: dict, points: list[dict], chosen: dict, overwrite: bool) -> None:
    """The cascade folder, written next to OUT and renamed into place (readers never see half of one)."""
    import shutil

    from slmkit.files import atomic_write_bytes, atomic_write_json, replace_dir

    tmp = out.with_name(f".{out.name}.tmp-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        atomic_write_json(tmp / CASCADE_FILE, spec)
        atomic_write_json(tmp / "curve.json", {"quality": spec["calibration"]["quality"], "chosen": chosen,
                                               "figures": spec["calibration"], "points": points})
        plot_curve(points, chosen, spec["calibration"], spec["calibration"]["quality"], tmp / "curve.png")
        atomic_write_bytes(tmp / "README.md", card(spec).encode())
        if out.exists() and not overwrite:  # checked again: another run may have written it meanwhile
            raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_inputs(small: Path, large: str, out: Path, max_escalation: float | None, min_quality: float | None,
                 timeout: float, overwrite: bool) -> str:
    """The cascade's kind ("classifier" or "decoder", SMALL's), or a one-line error for a setting that cannot work."""
    from slmkit.files import check_out
    from slmkit.infer.classify import is_classifier
    from slmkit.infer.load import read_config
    from slmkit.model.presets import is_encoder

    if max_escalation is not None and min_quality is not None:
        raise SystemExit("error: give --max-escalation or --min-quality, not both")
    if max_escalation is not None and not 0 <= max_escalation <= 1:
        raise SystemExit(f"error: --max-escalation {max_escalation} must be a fraction in [0, 1], e.g. 0.35")
    if min_quality is not None and not 0 < min_quality <= 1.5:
        raise SystemExit(f"error: --min-quality {min_quality} is a fraction of the large model's quality, e.g. 0.99")
    if not timeout > 0:
        raise SystemExit(f"error: --timeout {timeout} must be positive (seconds)")
    if is_url(str(small)) or not Path(small).is_dir():
        raise SystemExit(f"error: SMALL {small} is not a model folder; the small model runs here")
    if not is_url(large) and not Path(large).is_dir():
        raise SystemExit(f"error: LARGE {large} is neither a model folder nor an http(s) URL")
    check_out(out, overwrite, sources=[Path(small)] + ([] if is_url(large) else [Path(large)]))
    cfg = read_config(Path(small))
    if is_encoder(cfg) and not is_classifier(cfg):
        raise SystemExit(f"error: {small} is an encoder without a classifier head; a cascade takes classifiers "
                         "(`slm finetune --task classify`) or decoders")
    return "classifier" if is_classifier(cfg) else "decoder"


# The flags one kind of cascade (or of large model) reads: given for another, each is refused in one line.
NOT_FOR = {
    "classifier": {"max_new_tokens": "it is a decoder cascade's reply budget",
                   "skip_bad_lines": "it is for a decoder cascade's chat JSONL"},
    "decoder": {"text_col": "a decoder cascade calibrates on chat JSONL's messages",
                "label_col": "a decoder cascade calibrates on chat JSONL's replies",
                "batch_size": "a decoder cascade answers one calibration row at a time",
                "max_length": "it is a classifier cascade's (a decoder reads its whole context)"},
    "a large model folder": {k: "it is for a URL large model" for k in ("large_model", "api_key_env", "timeout")},
}


def refuse_unused(kind: str, large: str, given: dict) -> None:
    """One line for a flag of GIVEN that a KIND cascade with LARGE would not read."""
    from slmkit.options import defaults_of
    from slmkit.options import refuse_unused as refuse

    refuse(f"a {kind} cascade", given, NOT_FOR[kind], defaults_of(main))
    if not is_url(large):
        refuse("a large model folder", given, NOT_FOR["a large model folder"], defaults_of(main))


def main(small: Path, large: str, calibrate: Path, out: Path, max_escalation: float | None = None,
         min_quality: float | None = None, large_model: str | None = None, api_key_env: str | None = None,
         text_col: str = "text", label_col: str = "label", max_new_tokens: int = 64, batch_size: int = 32,
         max_length: int | None = None, timeout: float = 60.0, device: str = "auto", skip_bad_lines: bool = False,
         overwrite: bool = False, as_json: bool = False) -> dict:
    """Build a cascade: SMALL answers, LARGE (a model folder or an OpenAI-compatible URL) takes the requests SMALL is
    unsure of. The threshold is calibrated on --calibrate DATA (held-out rows, not your test set).

    Classifiers: DATA is labelled CSV/TSV/JSONL/Parquet; confidence = SMALL's top probability after temperature
    scaling fitted on DATA; quality = accuracy. Decoders: DATA is chat JSONL ({"messages": [...]} or {"prompt",
    "response"} rows); both models answer greedily, confidence = the mean log-probability of SMALL's answer tokens,
    quality = ROUGE-L F1 against the reference reply.

    --max-escalation F: the best quality escalating at most a fraction F of the calibration rows. --min-quality F:
    the fewest escalations whose quality is >= F x LARGE's quality on DATA. Neither: --min-quality 0.99.
    """
    from slmkit.hardware import pick_device
    from slmkit.options import check_numbers

    check_numbers(dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length),
                  {"max_new_tokens": "reply tokens at most per calibration row", "batch_size": "texts per pass"})
    out = Path(out)
    kind = check_inputs(small, large, out, max_escalation, min_quality, timeout, overwrite)
    refuse_unused(kind, large, dict(large_model=large_model, api_key_env=api_key_env, text_col=text_col,
                                    label_col=label_col, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    max_length=max_length, timeout=timeout, skip_bad_lines=skip_bad_lines))
    if min_quality is None and max_escalation is None:
        min_quality = DEFAULT_MIN_QUALITY
    device = pick_device(device)
    remote = dict(model=large_model, api_key_env=api_key_env, timeout=timeout)
    try:
        if kind == "classifier":
            cal = calibrate_classifier(Path(small), large, calibrate, text_col, label_col, batch_size, max_length,
                                       device, remote)
        else:
            cal = calibrate_decoder(Path(small), large, calibrate, max_new_tokens, device, remote, skip_bad_lines)
    except RemoteError as e:  # e.g. the model list, asked before the first request
        raise SystemExit(f"error: the large model: {e}") from None
    points = sweep(cal["confidence"], cal["small_q"], cal["large_q"])
    large_q, small_q = float(cal["large_q"].mean()), float(cal["small_q"].mean())
    chosen = pick(points, large_q, max_escalation, min_quality)
    target = {"max_escalation": max_escalation} if max_escalation is not None else {"min_quality": min_quality}
    figures = {"data": str(calibrate), "examples": len(cal["confidence"]), "quality": cal["quality"],
               "small": small_q, "large": large_q, "cascade": chosen["quality"],
               "escalation_rate": chosen["escalation_rate"],
               "relative_to_large": chosen["quality"] / large_q if large_q > 0 else None, "target": target}
    if "max_new_tokens" in cal:
        figures["max_new_tokens"] = cal["max_new_tokens"]
    spec = {"format": FORMAT, "version": 1, "kind": kind, "small": stored_ref(out, small),
            "large": stored_ref(out, large), "large_model": large_model, "api_key_env": api_key_env,
            "timeout": timeout if is_url(large) else None,
            "confidence": cal["confidence_method"], "temperature": cal["temperature"],
            "threshold": chosen["threshold"], "max_length": max_length, "rule": "escalate when confidence < threshold",
            "calibration": figures}
    write_folder(out, spec, points, chosen, overwrite)
    if as_json:
        print(json.dumps({"out": str(out), "threshold": chosen["threshold"], **figures}))
    else:
        print(f"{cal['quality']}: small {small_q:.4f} | large {large_q:.4f} | cascade {chosen['quality']:.4f} "
              f"({figures['relative_to_large'] or 0:.1%} of large) | escalated {chosen['escalation_rate']:.1%} | "
              f"threshold {chosen['threshold']:.6g}\nwrote {out} (cascade.json, curve.png, curve.json, README.md)")
    return spec


def add_args(p) -> None:
    p.add_argument("small", type=Path, help="the small model folder (answers first): a classifier or a decoder")
    p.add_argument("large", help="the large model: a folder of the same kind, or an OpenAI-compatible URL (e.g. "
                   "http://host:8000/v1 of slm serve or llama.cpp's llama-server; /v1 may be left out)")
    p.add_argument("--calibrate", type=Path, required=True, metavar="DATA", help="held-out calibration data: "
                   "labelled CSV/TSV/JSONL/Parquet (classifiers) or chat JSONL (decoders); not your test set")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the cascade folder to write")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--max-escalation", type=float, metavar="F", help="escalate at most this fraction of the "
                        "calibration rows, at the best quality that allows (e.g. 0.35)")
    target.add_argument("--min-quality", type=float, metavar="F", help="the fewest escalations whose quality "
                        "(accuracy, or ROUGE-L F1) is >= F x the large model's on DATA (default: 0.99)")
    p.add_argument("--large-model", help="URL only: the model name to request (default: the first the server lists)")
    p.add_argument("--api-key-env", metavar="VAR", help="URL only: the environment variable holding the API key "
                   "(never the key itself: flags show in `ps`)")
    p.add_argument("--text-col", default="text", help="classifiers: text column (default: text)")
    p.add_argument("--label-col", default="label", help="classifiers: label column (default: label)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decoders: reply tokens at most per calibration "
                   "row (default: 64)")
    p.add_argument("--batch-size", type=int, default=32, help="classifiers: texts per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, help="classifiers: tokens read per text, at calibration and after "
                   "(default: the model's context; `slm classify --max-length` overrides it)")
    p.add_argument("--timeout", type=float, default=60.0, help="URL only: seconds to wait for each answer, at "
                   "calibration and after (default: 60; 3 tries with backoff)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:1 …")
    p.add_argument("--skip-bad-lines", action="store_true", help="chat JSONL: skip malformed rows (with a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the calibration figures as one JSON "
                   "object (keys: out, threshold, small, large, cascade, escalation_rate, ...)")
