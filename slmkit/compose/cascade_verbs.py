"""`slm classify`, `slm eval`, `slm generate` and `slm chat` on a cascade folder: the same options as on a model
folder, answered through the cascade, each answer saying which model produced it.

The CLI (slmkit/__main__.py) asks `for_cascade` before running one of these verbs: a cascade folder gets the
functions here, anything else the verb's own main(). (Dispatching from inside the verbs' modules would make them
import this package, which imports them: an import cycle.)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slmkit.compose.cascade import Cascade, RemoteError, is_cascade, load_cascade


def for_cascade(verb: str, model_dir) -> Callable | None:
    """The function answering VERB when MODEL_DIR is a cascade folder; None otherwise."""
    if not is_cascade(model_dir):
        return None
    return {"classify": classify, "eval": evaluate, "generate": generate, "chat": chat}.get(verb)


def _open(model_dir: Path, kind: str, verb: str, device: str = "auto") -> Cascade:
    cascade = load_cascade(Path(model_dir), device)
    if cascade.kind != kind:
        raise SystemExit(f"error: {model_dir} is a {cascade.kind} cascade; `slm {verb}` needs a {kind} cascade")
    return cascade


def _remote_failed(e: RemoteError) -> SystemExit:
    return SystemExit(f"error: the cascade's large model: {e}")


def classify(model_dir: Path, text: str | None = None, data: Path | None = None, text_col: str = "text",
             top_k: int = 1, as_json: bool = False, batch_size: int = 32, max_length: int | None = None) -> list[dict]:
    """`slm classify CASCADE`: top-k labels per text and the model that answered ("small" or "large")."""
    from slmkit.infer.classify import texts_to_classify

    texts = texts_to_classify(text, data, text_col, top_k, batch_size, max_length)
    cascade = _open(model_dir, "classifier", "classify")
    try:
        rows = cascade.classify(texts, top_k, batch_size, max_length)
    except RemoteError as e:
        raise _remote_failed(e) from None
    results = [{"text": t, "labels": r["labels"], "model": r["model"], "confidence": r["confidence"]}
               for t, r in zip(texts, rows, strict=True)]
    for r in results:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        elif text is not None:
            print("\n".join(f"{x['label']}\t{x['score']:.4f}" for x in r["labels"]) + f"\t[{r['model']}]")
        else:
            labels = "\t".join(f"{x['label']} {x['score']:.3f}" for x in r["labels"])
            print(f"{labels}\t[{r['model']}]\t{r['text'][:80]!r}")
    return results


def evaluate(model_dir: Path, data: list[str], text_col: str = "text", label_col: str = "label",
             batch_size: int = 8, as_json: bool = False, skip_bad_lines: bool = False, device: str = "auto",
             block_size: int | None = None, **rest) -> dict:
    """`slm eval CASCADE --data ...`: a classifier cascade on labelled rows (accuracy, macro-F1), a decoder cascade on
    chat JSONL (loss); both with the escalation rate and the per-model split."""
    from slmkit.infer.evaluate import refuse_for
    from slmkit.options import check_numbers

    check_numbers(dict(block_size=block_size, batch_size=batch_size))
    cascade = load_cascade(Path(model_dir), device)
    given = dict(rest, text_col=text_col, label_col=label_col, skip_bad_lines=skip_bad_lines, block_size=block_size)
    refuse_for("classifier" if cascade.kind == "classifier" else "chat", given)
    if cascade.kind == "classifier":
        result = _evaluate_classifier(cascade, data, text_col, label_col, batch_size)
        head = f"accuracy {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f}"
        score = "accuracy"
    else:
        result = _evaluate_decoder(cascade, data, batch_size, skip_bad_lines, block_size)
        head = f"assistant-token loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}"
        score = "loss"
    if as_json:
        print(json.dumps(result))
    else:
        split = " | ".join(f"{w} {d['n']:,} rows" + (f" at {score} {d[score]:.4f}" if d["n"] else "")
                           for w, d in result["per_model"].items())
        print(f"{head} | escalated {result['escalation_rate']:.1%} | {split} | examples {result['examples']:,}")
    return result


def _evaluate_classifier(cascade: Cascade, data: list[str], text_col: str, label_col: str, batch_size: int) -> dict:
    """Accuracy and macro-F1 of the cascade's answers; per model: the rows it answered and its accuracy on them."""
    from slmkit.data.labelled import read_labelled_files
    from slmkit.infer.classify import classification_metrics

    texts, labels = read_labelled_files(data, text_col, label_col, cascade.labels, ("label", "cascade's labels"))
    try:
        rows = cascade.classify(texts, 1, max(32, batch_size))
    except RemoteError as e:
        raise _remote_failed(e) from None
    pred = [r["labels"][0]["label"] for r in rows]
    index = {name: i for i, name in enumerate(cascade.labels)}
    m = classification_metrics([index[y] for y in labels], [index[p] for p in pred], cascade.labels)
    per_model = {}
    for who in ("small", "large"):
        mine = [i for i, r in enumerate(rows) if r["model"] == who]
        right = sum(pred[i] == labels[i] for i in mine)
        per_model[who] = {"model": cascade.names[who], "n": len(mine),
                          "accuracy": right / len(mine) if mine else None}
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "escalation_rate": per_model["large"]["n"] /
            len(rows), "per_model": per_model, "threshold": cascade.threshold, "examples": len(rows)}


def _evaluate_decoder(cascade: Cascade, data: list[str], batch_size: int, skip_bad_lines: bool,
                      block_size: int | None = None) -> dict:
    """Each conversation goes where the cascade would send it (the small model answers its last assistant turn
    greedily, as at calibration; the mean log-prob of that answer decides), and the model it goes to scores it: the
    loss on its assistant tokens, as `slm eval` computes on chat JSONL. The loss is the mean over all scored tokens
    (each conversation in its own model's tokens). BLOCK_SIZE (at most each model's context) caps the tokens a
    conversation is scored on, as `slm eval --block-size` does on a model folder."""
    import math

    import torch

    from slmkit.compose.cascade import mean_logprob
    from slmkit.data.chat import build_examples, evaluate_chat, pad_id_of, read_conversations
    from slmkit.data.corpus import expand_paths

    if cascade.large.remote is not None:
        raise SystemExit(f"error: the loss of a cascade needs its large model's token probabilities; "
                         f"{cascade.large.name} is a URL: evaluate with a local large model folder")
    conversations = read_conversations(expand_paths(data), skip_bad_lines)
    greedy = dict(max_new_tokens=int(cascade.spec["calibration"].get("max_new_tokens") or 64), temperature=0.0,
                  top_k=0)
    routed: dict[str, list] = {"small": [], "large": []}
    for messages in conversations:
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        _, prompt_ids, answer_ids, _ = cascade.small.answer(messages=messages[:last], **greedy)
        conf = mean_logprob(cascade.small.lm, prompt_ids, answer_ids)
        routed["small" if conf >= cascade.threshold else "large"].append(messages)
    per_model, total, tokens = {}, 0.0, 0
    for who, convs in routed.items():
        lm = getattr(cascade, who).lm
        r = {"loss": None, "tokens": 0}
        if convs:
            with torch.no_grad():
                block = min(block_size or lm.context, lm.context)
                r = evaluate_chat(lm.model, build_examples(convs, lm.tokenizer, block),
                                  pad_id_of(lm.tokenizer), batch_size, str(next(lm.model.parameters()).device))
            total, tokens = total + r["loss"] * r["tokens"], tokens + r["tokens"]
        per_model[who] = {"model": cascade.names[who], "n": len(convs), "loss": r["loss"], "tokens": r["tokens"]}
    loss = total / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
            "escalation_rate": len(routed["large"]) / len(conversations), "per_model": per_model,
            "threshold": cascade.threshold, "examples": len(conversations)}


# generate's and chat's flags for one model's decoding, which a cascade (two models, each loaded as saved, decoded
# eagerly) cannot honour: given, each is refused rather than dropped.
NOT_FOR_CASCADE = {"draft": "give it a model folder", "draft_tokens": "speculative decoding needs a model folder",
                   "lookup": "speculative decoding needs a model folder",
                   "compile": "a cascade decodes eagerly; give --compile with a model folder",
                   "dtype": "a cascade loads its models in fp32"}


def _decoding_flags(model_dir: Path, options: dict) -> None:
    """Refuse the flags of NOT_FOR_CASCADE; honour --threads (CPU threads for both models)."""
    import torch

    from slmkit.options import check_numbers, refuse_unused

    refuse_unused(f"a cascade folder ({model_dir})", options, NOT_FOR_CASCADE, {"dtype": "fp32"})
    check_numbers({"threads": options.get("threads")})
    if options.get("threads"):
        torch.set_num_threads(options["threads"])


def generate(model_dir: Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, num_samples: int = 1, stream: bool = True, as_json: bool = False,
             device: str = "auto", **unsupported) -> list[str]:
    """`slm generate CASCADE`: the small model's continuation, or the large one's when the small one is unsure.
    Nothing streams: the small answer is needed whole before the decision."""
    from slmkit.infer.generate import NonFiniteLogits, checked_sampling
    from slmkit.options import check_numbers

    _decoding_flags(model_dir, unsupported)
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=list(stop or []))
    checked_sampling(**params)
    check_numbers(dict(num_samples=num_samples), {"num_samples": "texts to sample"})
    cascade = _open(model_dir, "decoder", "generate", device)
    texts = []
    for i in range(num_samples):
        t0 = time.perf_counter()
        try:
            out = cascade.generate(prompt=prompt, seed=None if seed is None else seed + i, **params)
        except RemoteError as e:
            raise _remote_failed(e) from None
        except NonFiniteLogits as e:
            raise SystemExit(f"error: {model_dir}: {e}") from None
        seconds = time.perf_counter() - t0
        texts.append(out["text"])
        if as_json:  # generate's keys, plus the model that answered and the small model's confidence
            print(json.dumps({"prompt": prompt, "text": out["text"], "tokens": out["tokens"],
                              "seconds": round(seconds, 3), "first_token_seconds": round(seconds, 3),
                              "tokens_per_s": round(out["tokens"] / max(1e-9, seconds), 1), "model": out["model"],
                              "confidence": round(out["confidence"], 4)}))
        else:
            print(prompt + out["text"])
            print(f"[{out['model']} ({cascade.names[out['model']]}) answered: mean log-prob {out['confidence']:.3f}, "
                  f"threshold {cascade.threshold:.3f}; {out['tokens']} tokens in {seconds:.2f} s]", file=sys.stderr)
    return texts


def chat(model_dir: Path, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.1, seed: int | None = None,
         device: str = "auto", **unsupported) -> None:
    """`slm chat CASCADE`: each reply from the small model, or from the large one when the small one is unsure; the
    answering model is shown after each reply. A failed escalation is one line, and the conversation goes on."""
    from slmkit.infer.chat import user_turns
    from slmkit.infer.generate import checked_sampling

    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed)
    checked_sampling(**params)
    _decoding_flags(model_dir, unsupported)
    cascade = _open(model_dir, "decoder", "chat", device)
    print(f"chatting with the cascade {Path(model_dir).name} ({cascade.names['small']} -> "
          f"{cascade.names['large']}); /reset clears, /quit leaves", file=sys.stderr)
    for messages, user in user_turns(system):
        try:
            out = cascade.generate(messages=messages + [{"role": "user", "content": user}], **params)
        except RemoteError as e:
            print(f"error: the cascade's large model: {e}", file=sys.stderr)
            continue
        print(f"model> {out['text'].strip()}")
        print(f"[{out['model']}: {cascade.names[out['model']]}]", file=sys.stderr)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": out["text"].strip()}]
