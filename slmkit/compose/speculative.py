"""Speculative decoding: a small draft model proposes K tokens, the target checks them all in one forward pass.

Why it pays: at batch 1 a decoder's step is bound by reading its weights, so the target scores K+1 tokens in one
pass for little more than the price of one. The draft (same tokenizer, ~10x cheaper) guesses the next K tokens one at
a time; the target keeps the longest prefix it agrees with and adds one token of its own, so every cycle yields
between 1 and K+1 tokens for one target pass (Leviathan et al. 2023; Chen et al. 2023).

Exactness:
- greedy (temperature 0): a draft token is kept only when it is the target's argmax at that position (penalty
  included), and the first disagreement emits the target's own argmax: the text is the target's, token for token
  (up to the float rounding of a K+1-token forward pass vs the one-token step);
- sampled: draft token d (drawn from the draft's distribution Q) is kept with probability min(1, P(d)/Q(d)); on a
  rejection the token is drawn from max(0, P - Q), renormalised. P and Q are the distributions sample_next draws
  from (temperature, top-k, top-p, repetition penalty), so the output follows the target's sampling distribution.

Both key/value caches are the models' preallocated ones: "rolling back" a rejected suffix is moving the position
back; the stale entries past it are overwritten by the next tokens and never attended to.

K adapts (when not fixed): the acceptance rate a per token is estimated as it goes, the draft step and the verify pass
are timed, and each cycle takes the K that maximises expected tokens per second, (1 - a^(K+1)) / (1 - a) tokens for
K draft steps plus one verify pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from slmkit.infer.sampling import NonFiniteLogits, SamplingParams, candidates, draw, penalized, sample_next

K_MAX = 12  # the longest guess the adaptive policy tries; beyond it a small draft's acceptance has long decayed
PROBE = 16  # while the draft sits out (K = 0), it guesses one token every PROBE cycles to re-measure its acceptance
PASS_GROWTH = 0.1  # the prior cost of each extra token in a target pass, in one-token steps, until two are measured


@dataclass
class SpecStats:
    """What the draft achieved: tokens proposed and accepted, verify passes (cycles), tokens emitted."""

    proposed: int = 0
    accepted: int = 0
    cycles: int = 0
    emitted: int = 0
    lookup_proposed: int = 0  # of proposed/accepted: the guesses that came from the text (NgramIndex)
    lookup_accepted: int = 0

    def count(self, proposed: int, accepted: int, from_lookup: bool = False) -> None:
        """One verify pass that checked PROPOSED guesses and kept ACCEPTED."""
        self.cycles += 1
        self.proposed += proposed
        self.accepted += accepted
        if from_lookup:
            self.lookup_proposed += proposed
            self.lookup_accepted += accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        out = {"acceptance_rate": round(self.acceptance_rate, 4), "draft_proposed": self.proposed,
               "draft_accepted": self.accepted, "verify_passes": self.cycles,
               "tokens_per_pass": round(self.emitted / self.cycles, 3) if self.cycles else 0.0}
        if self.lookup_proposed:
            out.update(lookup_proposed=self.lookup_proposed, lookup_accepted=self.lookup_accepted)
        return out


class DraftLength:
    """How many tokens the draft guesses next. FIXED: always that many; None: the K that maximises expected tokens per
    second under running estimates of the per-token acceptance rate, the draft's step time, and the target's pass
    time as a function of the tokens it checks (measured, not assumed equal: on a CPU whose caches hold the model,
    a step is bound by per-op overhead and a 5-token pass can cost 1.5x a one-token step)."""

    def __init__(self, fixed: int | None = None, start: int = 4, decay: float = 0.9):
        self.fixed, self.best, self.decay = fixed, fixed or start, decay
        self.hits, self.trials = 2.0, 3.0  # a prior of 2/3 acceptance, forgotten within ~10 cycles
        self.t_draft: float | None = None  # seconds per draft step
        self.t_pass: dict[int, float] = {}  # tokens checked in one target pass (1: a plain step) -> seconds
        self.idle = 0  # cycles the target has decoded alone since the draft last guessed

    @property
    def k(self) -> int:
        """The next cycle's guess length. When guessing does not pay (K = 0: the target alone), one guess every
        PROBE cycles keeps the acceptance estimate current: the text may move to where the draft does well."""
        if self.best == 0 and self.idle >= PROBE:
            return 1
        return self.best

    def update(self, proposed: int, accepted: int, t_draft: float, t_pass: float) -> None:
        """One cycle's outcome. Accepted tokens come before the first rejection: accepted successes in
        accepted + (1 if a rejection happened) trials, the maximum-likelihood count for a per-token rate."""
        ema = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
        self.t_pass[proposed + 1] = ema(self.t_pass.get(proposed + 1), t_pass)
        if proposed == 0:
            self.idle += 1
        else:
            self.idle = 0
            d = self.decay
            self.hits = d * self.hits + accepted
            self.trials = d * self.trials + accepted + (accepted < proposed)
            self.t_draft = ema(self.t_draft, t_draft / proposed)
        if self.fixed is None and self.t_draft is not None:
            self.best = self.best_k()

    def pass_time(self, tokens: int) -> float:
        """The target's pass over TOKENS tokens: measured, else a line through the measured ones (one measured point:
        PASS_GROWTH of a step per extra token, a prior the measurements replace)."""
        if tokens in self.t_pass:
            return self.t_pass[tokens]
        known = sorted(self.t_pass.items())
        if len(known) == 1:
            (t0, s0), = known
            step = s0 / (1 + PASS_GROWTH * (t0 - 1))
            return step * (1 + PASS_GROWTH * (tokens - 1))
        (t0, s0), (t1, s1) = min(((p, q) for p in known for q in known if p[0] < q[0]),
                                 key=lambda pq: abs(pq[0][0] - tokens) + abs(pq[1][0] - tokens))
        return s0 + max(0.0, (s1 - s0) / (t1 - t0)) * (tokens - t0)  # never cheaper for checking more

    def best_k(self) -> int:
        a = min(self.hits / max(self.trials, 1e-9), 0.999)
        rate = lambda k: (1 - a ** (k + 1)) / (1 - a) / (k * self.t_draft + self.pass_time(k + 1))  # noqa: E731
        return max(range(K_MAX + 1), key=rate)  # 0: the draft costs more than its guesses save


def dense_probs(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """The distribution sample_next draws from, as a normalised (VOCAB,) vector (zeros outside its candidates)."""
    probs, ids = candidates(penalized(logits, p, seen), p)
    out = torch.zeros(vocab)
    if ids is None:
        n = min(vocab, probs.numel())
        out[:n] = probs[:n]
    else:
        keep = ids < vocab
        out[ids[keep]] = probs[keep]
    total = float(out.sum())
    if not total > 0:
        raise NonFiniteLogits()
    return out / total


def _seen(ids: list[int], p: SamplingParams) -> torch.Tensor | None:
    return torch.tensor(sorted(set(ids)), dtype=torch.long) if p.repetition_penalty != 1.0 else None


def judge(target_rows: torch.Tensor, drafted: list[int], draft_probs: list[torch.Tensor], ids: list[int],
          p: SamplingParams, gen: torch.Generator | None) -> tuple[int, int]:
    """The rejection rule. TARGET_ROWS (k+1, V): the target's logits after ids, ids+d1, ..., ids+d1..dk. Returns
    (how many drafted tokens are kept, the target's own next token after them)."""
    vocab = target_rows.shape[-1]
    for j, d in enumerate(drafted):
        seen = _seen(ids + drafted[:j], p)
        if p.temperature <= 0:
            t = sample_next(target_rows[j], p, seen, gen)
            if t != d:
                return j, t
            continue
        P = dense_probs(target_rows[j], p, seen, vocab)
        Q = draft_probs[j]
        if float(torch.rand((), generator=gen)) * float(Q[d]) < float(P[d]):  # u < P(d)/Q(d), without dividing by 0
            continue
        residual = (P - Q).clamp_min(0)
        return j, draw(residual if float(residual.sum()) > 0 else P, gen)
    k = len(drafted)
    return k, sample_next(target_rows[k], p, _seen(ids + drafted, p), gen)


class _Runner:
    """One model's side of the loop: its cache and how many tokens of the sequence it has processed (its position).
    Rolling back is lowering `pos`; the cache rows past it are overwritten before anything attends to them."""

    def __init__(self, model: torch.nn.Module, size: int):
        self.model, self.pos = model, 0
        self.cache = model.new_cache(1, size)
        self.device = model.cos.device  # a buffer every Llama module has

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Process TOKENS at the current position -> logits (len(tokens), V) in fp32 on the CPU. One token takes the
        model's decode step (the compiled one under --compile), several one forward pass."""
        if len(tokens) == 1:
            logits = self.model.step(tokens[0], self.cache, self.pos)[None]
        else:
            x = torch.tensor([tokens], device=self.device)
            logits = self.model(x, cache=self.cache, pos=self.pos)[0]
        self.pos += len(tokens)
        return logits.float().cpu()


class NgramIndex:
    """Prompt lookup (HF's `prompt_lookup_num_tokens`, llama.cpp's lookup decoding): guesses read from the text so
    far. Where its last n tokens (n from SIZES, longest first) occurred before, the tokens that followed that
    occurrence are the guess. Free to make, and often right where text repeats (names, boilerplate, code, a small
    model's greedy loops); the target checks them like a draft's. The index grows with the sequence: each n-gram
    maps to the end of its latest occurrence."""

    def __init__(self, sizes: tuple[int, ...] = (3, 2)):
        self.sizes, self.seen, self.done = sizes, {}, 0

    def guess(self, ids: list[int], k: int) -> list[int]:
        """Up to K tokens that followed the latest earlier occurrence of IDS's last n tokens ([] if none)."""
        for end in range(max(self.done, 1), len(ids)):  # index n-grams that have a token after them
            for n in self.sizes:
                if end >= n:
                    self.seen[tuple(ids[end - n:end])] = end
        self.done = max(self.done, len(ids))
        if k <= 0:
            return []
        for n in self.sizes:
            end = self.seen.get(tuple(ids[-n:])) if len(ids) > n else None
            if end is not None:
                return ids[end:end + k]
        return []


def speculative_ids(target: torch.nn.Module, draft: torch.nn.Module | None, prompt_ids: list[int],
                    p: SamplingParams, eos_ids: set[int], context: int, draft_context: int,
                    draft_tokens: int | None = None, stats: SpecStats | None = None, length: DraftLength | None = None,
                    lookup: bool = False, lookup_length: DraftLength | None = None) -> Iterator[int]:
    """generate_ids' contract (new token ids, one at a time, until EOS, max_new_tokens or the context end), decoded
    speculatively with DRAFT guessing DRAFT_TOKENS tokens a cycle (None: adaptive). Both are slmkit Llama modules with
    the same vocabulary. Where the sequence outgrows the draft's context the target goes on alone. With LOOKUP, a
    cycle whose last tokens occurred before takes its guess from the text instead (NgramIndex; its own adaptive
    length, LOOKUP_LENGTH); DRAFT may then be None."""
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    stats = stats if stats is not None else SpecStats()
    ids = list(prompt_ids)[-(context - 1):]
    limit = min(p.max_new_tokens, context - len(ids))
    if limit <= 0 or not ids:
        return
    size = len(ids) + limit + 1
    tgt = _Runner(target, size)
    dft = _Runner(draft, min(size + K_MAX, draft_context)) if draft is not None else None
    length = length or DraftLength(draft_tokens)  # shared across calls, it starts from what earlier ones learnt
    index, lk = (NgramIndex(), lookup_length or DraftLength(draft_tokens)) if lookup else (None, None)
    vocab = target.config["vocab_size"]
    with torch.inference_mode():
        if len(ids) > 1:  # both models process all but the last token, which each cycle's verify pass feeds
            tgt.feed(ids[:-1])
            if dft is not None and len(ids) - 1 <= draft_context - 2:
                dft.feed(ids[:-1])
        made = 0
        while made < limit:
            room = min(limit - made - 1, context - len(ids))
            t0 = time.perf_counter()
            guess = index.guess(ids, max(0, min(lk.k, room))) if index is not None else []
            if guess:  # the text's guess; a draft's sampled probabilities for it: all on the guessed token
                source, drafted = lk, guess
                q_probs = [] if p.temperature <= 0 else [torch.zeros(vocab).index_fill_(0, torch.tensor([d]), 1.0)
                                                         for d in guess]
            else:
                if lk is not None and lk.k == 0:
                    lk.idle += 1  # the lookup sat out: count it, so that it probes again (DraftLength.k)
                source = length
                k = 0 if dft is None else max(0, min(length.k, room, draft_context - len(ids) - 1))
                drafted, q_probs = _draft(dft, ids, k, p, gen)
            t1 = time.perf_counter()
            new, accepted = _verify(tgt, ids, drafted, q_probs, p, gen)
            source.update(len(drafted), accepted, t1 - t0, time.perf_counter() - t1)
            stats.count(len(drafted), accepted, from_lookup=bool(guess))
            for tok in new:
                if tok in eos_ids or made >= limit:
                    return
                made += 1
                stats.emitted += 1
                ids.append(tok)
                yield tok


def _draft(dft: _Runner | None, ids: list[int], k: int, p: SamplingParams,
           gen: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
    """The draft model's K guesses after IDS, and (when sampling) the distributions it drew them from."""
    drafted: list[int] = []
    q_probs: list[torch.Tensor] = []
    if k <= 0 or dft is None:
        return drafted, q_probs
    vocab = dft.model.config["vocab_size"]
    dft.pos = min(dft.pos, len(ids) - 1)  # forget guesses the target rejected
    q = dft.feed(ids[dft.pos:])[-1]  # catch up: the tokens since its last cycle (corrections, bonus, lookups)
    for j in range(k):
        seen = _seen(ids + drafted, p)
        if p.temperature <= 0:
            d = sample_next(q, p, seen)
        else:
            q_probs.append(dense_probs(q, p, seen, vocab))
            d = draw(q_probs[-1], gen)
        drafted.append(d)
        if j < k - 1:
            q = dft.feed([d])[0]
    return drafted, q_probs


def _verify(tgt: _Runner, ids: list[int], drafted: list[int], q_probs: list[torch.Tensor], p: SamplingParams,
            gen: torch.Generator | None) -> tuple[list[int], int]:
    """The target's pass over IDS's last token and the guesses (it has processed all but that token): the new tokens
    (the kept guesses, then the target's own) and how many guesses were kept."""
    rows = tgt.feed([ids[-1]] + drafted)  # (k+1, V): the target's logits after ids, ids+d1, ..., ids+d1..dk
    kept, own = judge(rows, drafted, q_probs, ids, p, gen)
    tgt.pos = len(ids) + kept  # the target keeps ids + the kept guesses; its own token is fed next cycle
    return drafted[:kept] + [own], kept


def attach_draft(lm, draft, draft_tokens: int | None = None, lookup: bool = False) -> None:
    """Make LM (a generate.LoadedModel) decode speculatively with DRAFT (another LoadedModel, or None with LOOKUP:
    guesses from the text only): every caller of lm.stream / lm.generate (slm generate, slm chat) then gets it. The
    last call's SpecStats land in lm.spec_stats. One line, naming the fix, when the pair cannot work together."""
    from slmkit.model.llama import Llama
    from slmkit.options import check_numbers

    for role, m in (("target", lm), ("--draft", draft)):
        if m is not None and not isinstance(m.model, Llama):
            raise SystemExit(f"error: {role} {m.path}: speculative decoding needs slmkit Llama decoders; bring a "
                             f"Hugging Face folder in with `slm import {m.path} --out DIR` first")
    if draft is not None and draft.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise SystemExit(f"error: --draft {draft.path}: its tokenizer ({len(draft.tokenizer):,} tokens) differs from "
                         f"{lm.path}'s ({len(lm.tokenizer):,}); a draft must share the target's. Make one from it: "
                         f"slm distill --teacher {lm.path} --student slm-3m --data TEXT --cache-teacher --out DRAFT")
    check_numbers(dict(draft_tokens=draft_tokens))  # the verbs check it before loading; the Python API here
    lm.draft, lm.spec_stats = draft, SpecStats()
    lm.draft_length = DraftLength(draft_tokens)  # this pair's acceptance and timings, carried from call to call
    lm.lookup, lm.lookup_length = lookup, DraftLength(draft_tokens) if lookup else None

    def decode(model, ids, p, eos_ids, context):
        lm.spec_stats = SpecStats()
        return speculative_ids(model, draft.model if draft is not None else None, ids, p, eos_ids, context,
                               draft.context if draft is not None else context, draft_tokens, lm.spec_stats,
                               lm.draft_length, lookup, lm.lookup_length)

    lm.decode = decode
