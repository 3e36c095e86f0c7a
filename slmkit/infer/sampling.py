"""Sampling: the settings (SamplingParams) and the draw of the next token from a model's logits.

Its own module, below the decode loops that use it: generate.py's batch-1 loop, serve's batching engine, and
compose/speculative.py, which must draw from exactly the distribution these functions define.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style: divides positive logits of seen tokens)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """A ValueError naming the setting that cannot sample (they crashed in topk, or divided by zero and passed
        for NaN weights). The server's request schema narrows these further."""
        for ok, name, rule in ((self.max_new_tokens >= 0, "max_new_tokens", "0 or more"),
                               (self.temperature >= 0, "temperature", "0 (greedy) or more"),
                               (self.top_k >= 0, "top_k", "0 (off) or more"),
                               (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
                               (self.repetition_penalty > 0, "repetition_penalty", "positive (1 = off)")):
            if not ok:  # comparisons with NaN are False: NaN is refused too
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be {rule}")


def checked_sampling(**settings) -> SamplingParams:
    """SamplingParams for a CLI verb (generate, chat): a setting that cannot sample is one line naming its flag."""
    try:
        return SamplingParams(**settings)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


class NonFiniteLogits(ValueError):
    """The model scored the next token NaN or infinite: its weights hold NaN/inf (a diverged training run)."""

    def __init__(self) -> None:
        super().__init__("the model's next-token scores are NaN or infinite: its weights hold NaN/inf (a run that "
                         "diverged?); `slm eval` the folder, or retrain with a lower --lr")


def sample_next(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
                gen: torch.Generator | None = None) -> int:
    """Pick the next token id from LOGITS (V,) under P. SEEN: ids already in the context (for the penalty).

    With top-k on (the default), temperature, top-p, softmax and the draw work on the k best logits only, not on all
    V (49k at 135M): the same distribution (renormalised over the top k) at ~1/10 of the cost per token
    (docs/benchmarks.md)."""
    logits = penalized(logits, p, seen)
    if p.temperature <= 0:  # greedy; numpy's argmax is vectorised, torch's CPU argmax ~10x slower at V = 49k
        i = int(logits.detach().numpy().argmax()) if logits.device.type == "cpu" else int(torch.argmax(logits))
        if not math.isfinite(logits[i]):  # argmax lands on a NaN when there is one: one scalar read checks them all
            raise NonFiniteLogits()
        return i
    probs, ids = candidates(logits, p)
    try:
        i = draw(probs, gen)
    except ValueError:  # softmax of finite logits sums to 1: a NaN/inf score made it NaN
        raise NonFiniteLogits() from None
    return i if ids is None else int(ids[i])


def penalized(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """LOGITS (V,) as fp32, with the repetition penalty applied to the SEEN ids (a copy when it changes them)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = logits.clone()
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    return logits


def candidates(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution sample_next draws from (temperature > 0): weights over the candidates and their token ids
    (None: the weights cover all V, in id order). Not normalised after top-p: draw() takes weights."""
    ids = None  # the candidates' token ids, once probs holds only the candidates (sorted, best first)
    if p.top_k and p.top_k < logits.numel():
        logits, ids = torch.topk(logits, p.top_k)  # (k,)
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        if ids is None:  # the nucleus is nearly always among a few hundred tokens: sorting all V costs ~7 ms at 49k
            every = probs
            probs, ids = torch.topk(every, min(NUCLEUS_SEARCH, every.numel()))
            if float(probs.sum()) <= p.top_p and probs.numel() < every.numel():
                probs, ids = torch.sort(every, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > p.top_p, 0.0)  # the smallest set reaching top_p
    return probs, ids


def draw(weights: torch.Tensor, gen: torch.Generator | None = None) -> int:
    """An index into WEIGHTS (V,), >= 0, not necessarily summing to 1, drawn with probability proportional to its
    weight: by inverse CDF, one cumsum and a binary search (~75 us at V = 49k on CPU, where torch.multinomial takes
    ~1.3 ms). A zero weight is never drawn: searchsorted(right=True) skips the flat steps of the CDF."""
    cdf = weights.cumsum(0)
    total = float(cdf[-1])
    if not total > 0:  # NaN logits, or every weight zero: as torch.multinomial would, refuse rather than guess
        raise ValueError(f"cannot sample: the token weights sum to {total} (NaN or -inf logits from the model?)")
    u = torch.rand((), generator=gen, dtype=cdf.dtype) * total
    return min(int(torch.searchsorted(cdf, u, right=True)), weights.numel() - 1)


NUCLEUS_SEARCH = 256  # sample_next's first look for the top-p set: the best 256 tokens, all V only if they fall short
