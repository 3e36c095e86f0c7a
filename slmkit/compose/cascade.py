"""A calibrated cascade: a small model answers, and hands the request to a large one when it is unsure (FrugalGPT's
idea: the large model's quality for a fraction of its cost).

    cascade folder/cascade.json -> small (a folder) + large (a folder or an OpenAI-compatible URL) + a threshold
    request -> small answers -> confidence < threshold ? large answers : small's answer stands -> (answer, model)

Confidence is, for a classifier cascade, the small model's top probability after temperature scaling (Guo et al.,
2017; T fitted on the calibration data), and for a decoder cascade the mean log-probability of the small model's own
answer tokens (one forward pass over prompt + answer, under the model's unscaled distribution). `slm cascade`
(cascade_cli.py) picks the threshold on held-out data; this module reads the folder and answers through it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.compose.remote import RemoteError, RemoteModel, is_url

CASCADE_FILE = "cascade.json"
FORMAT = "slmkit-cascade"
EMPTY_ANSWER = -100.0  # the confidence of an empty answer (no tokens to average): below any threshold in practice


def is_cascade(folder) -> bool:
    """Is FOLDER a cascade folder (written by `slm cascade`)?"""
    return folder is not None and not is_url(str(folder)) and (Path(folder) / CASCADE_FILE).is_file()


def stored_ref(out: Path, target: str | Path) -> str:
    """How cascade.json names TARGET: a URL as is, a folder relative to the cascade folder OUT when it can be (the
    pair moves together), absolute otherwise (another drive)."""
    import os

    if is_url(str(target)):
        return str(target)
    try:
        return Path(os.path.relpath(Path(target).resolve(), Path(out).resolve())).as_posix()
    except ValueError:
        return str(Path(target).resolve())


def resolve_ref(folder: Path, ref: str) -> str | Path:
    """cascade.json's SMALL or LARGE -> a URL or a folder path (relative ones are relative to the cascade folder)."""
    return ref if is_url(ref) else (Path(folder) / ref if not Path(ref).is_absolute() else Path(ref))


def read_spec(folder: Path) -> dict:
    """cascade.json of FOLDER, checked: a one-line error naming the file and field otherwise."""
    import json

    path = Path(folder) / CASCADE_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}; rebuild it with `slm cascade`") from None
    for key in ("kind", "small", "large", "threshold"):
        if key not in spec:
            raise SystemExit(f"error: {path} has no {key!r} field; rebuild it with `slm cascade`")
    if spec["kind"] not in ("classifier", "decoder"):
        raise SystemExit(f"error: {path}: kind {spec['kind']!r} must be classifier or decoder")
    return spec


# -- calibration maths ---------------------------------------------------------------------------------------------
def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the NLL of softmax(LOGITS / T) for labels Y,
    by L-BFGS on log T (positive by construction). LOGITS (N, K), Y (N,)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    logits = logits.detach().float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def top_probability(logits: torch.Tensor, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, predicted label id) per row of LOGITS (N, K): the top softmax(LOGITS / T) probability."""
    p, idx = torch.softmax(logits.float() / temperature, dim=-1).max(dim=-1)
    return p.numpy().astype(np.float64), idx.numpy()


def sweep(confidence: np.ndarray, small_q: np.ndarray, large_q: np.ndarray) -> list[dict]:
    """The quality-vs-escalation curve: for each threshold t that separates the calibration rows, escalating the
    rows with confidence < t gives {threshold, escalation_rate, quality} (quality: the mean of the answering
    model's per-row quality). From t = min confidence (nothing escalated) to just above the max (everything)."""
    n = len(confidence)
    order = np.argsort(confidence, kind="stable")  # least confident first: they are escalated first
    c, s, g = confidence[order], small_q[order], large_q[order]
    quality = (s.sum() + np.concatenate([[0.0], np.cumsum(g - s)])) / n  # (n+1,): k = rows escalated
    points = []
    for k in range(n + 1):
        if 0 < k < n and c[k] == c[k - 1]:
            continue  # tied confidences cannot be split by a threshold
        t = float(c[k]) if k < n else float(np.nextafter(c[-1], np.inf))
        points.append({"threshold": t, "escalation_rate": k / n, "quality": float(quality[k])})
    return points


def pick(points: list[dict], large_quality: float, max_escalation: float | None,
         min_quality: float | None) -> dict:
    """The operating point: with MAX_ESCALATION, the best quality escalating at most that fraction (ties: fewer
    escalations); with MIN_QUALITY, the fewest escalations whose quality is >= MIN_QUALITY x LARGE_QUALITY."""
    eps = 1e-12
    if max_escalation is not None:
        ok = [p for p in points if p["escalation_rate"] <= max_escalation + eps]
        return max(ok, key=lambda p: (p["quality"], -p["escalation_rate"]))
    target = min_quality * large_quality
    ok = [p for p in points if p["quality"] >= target - eps]
    if not ok:
        best = max(points, key=lambda p: p["quality"])
        raise SystemExit(f"error: no threshold reaches --min-quality {min_quality:g} x the large model's "
                         f"{large_quality:.4f} on the calibration data (best {best['quality']:.4f} at escalation "
                         f"{best['escalation_rate']:.1%}); lower --min-quality or give --max-escalation")
    return min(ok, key=lambda p: (p["escalation_rate"], -p["quality"]))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts: longest common subsequence of their lowercased whitespace words (1.0 = same words in
    the same order). Quality per row of a decoder cascade's calibration."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:  # dynamic programme over b, one row at a time: O(len(a) * len(b)) time, O(len(b)) memory
        cur = [0]
        for j, z in enumerate(b):
            cur.append(prev[j] + 1 if x == z else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


# -- the two ends ------------------------------------------------------------------------------------------------
@dataclass
class Classifier:
    """A classifier folder loaded for a cascade (model, tokenizer, labels) or a remote one (RemoteModel)."""

    name: str
    model: object = None
    tokenizer: object = None
    labels: list[str] | None = None
    remote: RemoteModel | None = None
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass at a time per local model

    def logits(self, texts: list[str], batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
        """(N, K) logits of a local classifier, reading the first MAX_LENGTH tokens (None: the model's context)."""
        from slmkit.infer.classify import encode, max_length_for, pad_id_for, predict_logits

        seqs = encode(self.tokenizer, texts, max_length_for(self.model.config, self.tokenizer, max_length))
        with self.lock:
            return predict_logits(self.model, seqs, pad_id_for(self.tokenizer), batch_size, self.device)

    def top(self, texts: list[str], top_k: int = 1, batch_size: int = 32,
            max_length: int | None = None) -> list[list[dict]]:
        """Top-K {"label", "score"} rows for TEXTS (local: softmax probabilities; remote: its /v1/classify)."""
        if self.remote is not None:
            return self.remote.classify(texts, top_k)
        return top_rows(self.logits(texts, batch_size, max_length), self.labels, 1.0, top_k)


def top_rows(logits: torch.Tensor, labels: list[str], temperature: float, top_k: int) -> list[list[dict]]:
    p, idx = torch.softmax(logits.float() / temperature, dim=-1).topk(min(max(1, top_k), len(labels)), dim=-1)
    return [[{"label": labels[j], "score": q} for q, j in zip(rp, ri, strict=True)]
            for rp, ri in zip(p.tolist(), idx.tolist(), strict=True)]


def open_classifier(ref: str | Path, model: str | None = None, api_key_env: str | None = None, device: str = "cpu",
                    timeout: float = 60.0) -> Classifier:
    """A classifier folder, or a URL serving /v1/classify (MODEL names the served model)."""
    from slmkit.infer.classify import load_classifier

    if is_url(str(ref)):
        return Classifier(str(ref), remote=RemoteModel(str(ref), model, api_key_env, timeout=timeout))
    m, tok, labels = load_classifier(Path(ref), device)
    return Classifier(Path(ref).name, m, tok, labels, device=device)


class Decoder:
    """A decoder folder loaded for generation (generate.LoadedModel) or a remote OpenAI-compatible model."""

    def __init__(self, ref: str | Path, model: str | None = None, api_key_env: str | None = None,
                 device: str = "cpu", timeout: float = 60.0):
        from slmkit.infer.generate import load

        self.remote = RemoteModel(str(ref), model, api_key_env, timeout=timeout) if is_url(str(ref)) else None
        self.lm = None if self.remote is not None else load(Path(ref), device=device)
        self.name = str(ref) if self.remote is not None else Path(ref).name
        self.lock = threading.Lock()  # one generation at a time per local model (server threads share it)

    def answer(self, prompt: str | None = None, messages: list[dict] | None = None,
               **sampling) -> tuple[str, list[int], list[int], int]:
        """(text, prompt ids, answer ids, answer tokens) for a raw PROMPT or chat MESSAGES; the ids are [] for a
        remote model. SAMPLING: SamplingParams' fields."""
        if self.remote is not None:
            wire = {k: sampling.get(k) for k in ("temperature", "top_p", "seed", "stop")}
            wire["max_tokens"] = sampling.get("max_new_tokens")
            out = self.remote.chat(messages, **wire) if messages is not None else self.remote.complete(prompt, **wire)
            return out["text"], [], [], int(out["usage"].get("completion_tokens") or 0)
        from slmkit.infer.chat import render_prompt, reply_stops

        text = prompt if messages is None else render_prompt(self.lm.tokenizer, messages)
        if messages is not None:
            sampling = {**sampling, "stop": list(sampling.get("stop") or []) + reply_stops(self.lm.tokenizer)}
        answer: list[int] = []
        with self.lock:
            ids = self.lm.encode(text)
            reply = "".join(self.lm.stream(ids, on_token=answer.append, **sampling))
        return reply, ids, answer, len(answer)


@torch.no_grad()
def mean_logprob(lm, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean log-probability of ANSWER_IDS after PROMPT_IDS under LM's model (one forward pass, temperature 1);
    EMPTY_ANSWER when there are no answer tokens."""
    from slmkit.model.folder import logits_of

    if not answer_ids:
        return EMPTY_ANSWER
    ids = (list(prompt_ids) + list(answer_ids))[-lm.context:]
    x = torch.tensor([ids], device=next(lm.model.parameters()).device)  # (1, T)
    logp = torch.log_softmax(logits_of(lm.model, x[:, :-1]).float(), dim=-1)[0]  # (T-1, V)
    picked = logp.gather(-1, x[0, 1:, None])[:, 0]  # (T-1,): log p of each next token
    return float(picked[-len(answer_ids):].mean())


# -- a loaded cascade -----------------------------------------------------------------------------------------------
class Cascade:
    """A cascade folder ready to answer. Every answer carries `model`: "small" or "large" (which one produced it),
    and `confidence`: the small model's, that decided."""

    def __init__(self, folder: Path, device: str = "cpu", timeout: float = 60.0):
        """TIMEOUT: seconds per remote answer, unless cascade.json sets one (`slm cascade --timeout`)."""
        self.folder, self.spec = Path(folder), read_spec(folder)
        self.kind, self.threshold = self.spec["kind"], float(self.spec["threshold"])
        self.temperature = float(self.spec.get("temperature") or 1.0)
        small, large = (resolve_ref(self.folder, self.spec[k]) for k in ("small", "large"))
        for ref in (small, large):
            if not is_url(str(ref)) and not Path(ref).is_dir():
                raise SystemExit(f"error: {self.folder / CASCADE_FILE}: model folder {ref} does not exist; move it "
                                 "back or rebuild the cascade with `slm cascade`")
        if is_url(str(small)):
            raise SystemExit(f"error: {self.folder / CASCADE_FILE}: small must be a model folder, not a URL")
        remote = dict(model=self.spec.get("large_model"), api_key_env=self.spec.get("api_key_env"),
                      timeout=float(self.spec.get("timeout") or timeout))
        if self.kind == "classifier":
            self.small = open_classifier(small, device=device)
            self.large = open_classifier(large, device=device, **remote)
            self.labels = self.small.labels
        else:
            self.small, self.large = Decoder(small, device=device), Decoder(large, device=device, **remote)
        self.names = {"small": self.small.name, "large": self.large.name}

    def classify(self, texts: list[str], top_k: int = 1, batch_size: int = 32,
                 max_length: int | None = None) -> list[dict]:
        """For each of TEXTS: {"labels": [{"label", "score"}], "model": "small"|"large", "confidence"}. The small
        model's scores are its temperature-scaled probabilities. MAX_LENGTH: tokens read per text (default: as
        calibrated). Raises RemoteError if escalated rows cannot reach a remote large model."""
        max_length = max_length or self.spec.get("max_length")
        logits = self.small.logits(texts, batch_size, max_length)  # (N, K)
        conf, _ = top_probability(logits, self.temperature)
        rows = [{"labels": r, "model": "small", "confidence": float(c)}
                for r, c in zip(top_rows(logits, self.labels, self.temperature, top_k), conf, strict=True)]
        escalate = [i for i, c in enumerate(conf) if c < self.threshold]
        if escalate:
            answers = self.large.top([texts[i] for i in escalate], top_k, batch_size, max_length)
            for i, r in zip(escalate, answers, strict=True):
                rows[i].update(labels=r, model="large")
        return rows

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, **sampling) -> dict:
        """A raw PROMPT's continuation or the reply to chat MESSAGES: {"text", "model", "confidence", "tokens"}. The
        small model answers in full first (the mean log-prob of its tokens decides), then the large one if it is
        unsure. Raises RemoteError when a remote large model cannot answer."""
        text, prompt_ids, answer_ids, n = self.small.answer(prompt, messages, **sampling)
        with self.small.lock:
            conf = mean_logprob(self.small.lm, prompt_ids, answer_ids)
        if conf >= self.threshold:
            return {"text": text, "model": "small", "confidence": conf, "tokens": n}
        text, _, _, n = self.large.answer(prompt, messages, **sampling)
        return {"text": text, "model": "large", "confidence": conf, "tokens": n}


def load_cascade(folder: Path, device: str = "cpu", timeout: float = 60.0) -> Cascade:
    """The cascade in FOLDER, both models opened (a remote large model is only contacted when needed)."""
    from slmkit.hardware import pick_device

    return Cascade(Path(folder), pick_device(device), timeout)


__all__ = ["CASCADE_FILE", "Cascade", "RemoteError", "is_cascade", "load_cascade", "read_spec"]
