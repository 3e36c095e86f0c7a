"""Continuous batching: one background thread steps every active sequence of a model together.

Decoding a small model on a CPU is bound by per-step overhead (Python, op dispatch, reading the weights), not by
arithmetic, so one forward pass over 16 sequences costs little more than over one: batching is what makes the
aggregate tokens/s grow with the number of clients. Sequences join and leave between steps ("continuous"):

- a new request takes a row of the key/value cache (kv.py: grown as rows need it, within `--kv-memory`) once the
  budget allows; its prompt is read in chunks of at most `prefill_chunk` tokens that ride in the same forward pass
  as the decode steps of the rows already streaming (ragged.py), so those never stall for a whole prompt,
- every step then runs the model once on the last token of all active rows, each at its own position
  (`Llama.forward(..., pos=LongTensor)`; a lone row takes `Llama.step`, the batch-1 decode step, as `slm generate`
  does), and samples each row with `sampling.sample_next`,
- the active rows are kept at the front of the cache (a finished row's successors move up), so the step only
  touches `cache[:n]` views, and a prompt being read sits behind the rows that decode,
- with a draft model (`slm serve --draft`), a request that arrives while nothing else is running decodes
  speculatively in a row of its own (compose/speculative.py: several tokens per target pass); requests that arrive
  under load, or ask for logprobs, join the batch as usual: batching already amortises the weight reads there.

The engine knows nothing about HTTP: `Engine.generate()` is a plain iterator of `Token`s, and `submit()` delivers
the same events to any callback (the server's asyncio queues). Text, stop strings and JSON live in the callers.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from slmkit.infer.generate import LoadedModel, SamplingParams, generate_ids, sample_next


class Overloaded(Exception):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int = 1):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Token:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob) of the likeliest alternatives


@dataclass
class Finish:
    reason: str  # "stop" (end of text), "length" (max_tokens or context end), "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    message: str = ""


Event = Token | Finish


class Request:
    """One sequence to generate. Events go to SINK (called from the engine thread)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None],
                 top_logprobs: int | None = None):
        self.prompt_ids, self.params, self.sink, self.top_logprobs = list(prompt_ids), params, sink, top_logprobs
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating (client gone, stop string seen); the engine frees the row before its next step."""
        self.cancelled = True


@dataclass
class _Row:
    req: Request
    limit: int  # tokens this row may still generate
    pos: int  # positions of this row in the cache: prompt tokens read so far, then every token fed
    logits: torch.Tensor | None  # (V,) logits of the next token (fast path); None while the prompt is being read
    gen: torch.Generator | None
    made: int = 0
    ids_iter: Iterator[int] | None = None  # fallback path: generate_ids for models without our cache

    @property
    def reserve(self) -> int:
        """Cache positions this row may reach: its prompt and every token it may generate."""
        return len(self.req.prompt_ids) + self.limit

    @property
    def reading(self) -> bool:
        """Still reading its prompt (fast path)."""
        return self.ids_iter is None and self.pos < len(self.req.prompt_ids)


# Prompt tokens read in one pass while no row is decoding: nobody waits on them but requests not yet admitted.
IDLE_PREFILL = 512


class Engine:
    """Batches the decoding of one model. `start()` launches the thread; `stop()` ends it (pending requests get
    Finish("cancelled")). KV_MEMORY bounds the key/value cache in bytes (default kv.DEFAULT_KV_MEMORY); PREFILL_CHUNK
    is how many prompt tokens join a step while other rows decode."""

    def __init__(self, lm: LoadedModel, max_batch: int = 16, max_queue: int = 64, kv_memory: int | None = None,
                 prefill_chunk: int = 64):
        from slmkit.model.llama import Llama
        from slmkit.serve.kv import DEFAULT_KV_MEMORY, KVCache

        self.lm, self.max_batch, self.max_queue, self.prefill_chunk = lm, max_batch, max_queue, prefill_chunk
        self.fast = isinstance(lm.model, Llama)
        self.hf = None  # a transformers decoder's batch (hf_batch.py), when its cache allows
        if not self.fast:
            from slmkit.serve.hf_batch import HFBatch, batchable

            self.hf = HFBatch(lm.model, kv_memory) if batchable(lm.model) else None
        # the memory budget's bookkeeping: our cache, or the transformers batch (the same rule); None: no batching
        self.kv = KVCache(lm.model, kv_memory or DEFAULT_KV_MEMORY, max_batch) if self.fast else self.hf
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row] = []
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # forward passes so far (tests and metrics)
        self.max_seen_batch = 0
        self.max_step_tokens = 0  # most tokens (decode + prompt) in one pass
        self.spec_rows: list[_Row] = []  # speculative rows (with a draft): own caches, tokens from row.ids_iter
        self.spec_stats = None  # compose.speculative.SpecStats summed over every speculative request

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.spec_rows)

    def start(self) -> Engine:
        if not self.running:
            self.running = True
            self.thread = threading.Thread(target=self._loop, name=f"slm-engine-{self.lm.path.name}", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None],
               top_logprobs: int | None = None) -> Request:
        """Queue one sequence. Raises Overloaded when the queue is full, ValueError when the prompt leaves no room
        (in the context, or in the key/value memory budget)."""
        from slmkit.serve.kv import format_bytes

        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.lm.context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.lm.context}")
        need = len(prompt_ids) + min(params.max_new_tokens, self.lm.context - len(prompt_ids))
        if self.kv is not None and not self.kv.fits([need]):
            raise ValueError(f"the prompt and max_tokens need {need} positions of key/value memory "
                             f"({format_bytes(need * self.kv.position_bytes)}); the server's --kv-memory "
                             f"{format_bytes(self.kv.budget)} holds {self.kv.budget_positions}: lower max_tokens")
        req = Request(prompt_ids, params, sink, top_logprobs)
        with self.cond:
            if not self.running:
                raise Overloaded(retry_after=5)
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(retry_after=1)
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 top_logprobs: int | None = None) -> Iterator[Token]:
        """A plain iterator of the tokens of one sequence (batched with whatever else is running)."""
        q: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, params, q.put, top_logprobs)
        try:
            while True:
                ev = q.get()
                if isinstance(ev, Finish):
                    if ev.reason == "error":
                        raise RuntimeError(ev.message)
                    return
                yield ev
        finally:
            req.cancel()

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.waiting and not self.rows and not self.spec_rows:
                    if self.kv is not None and self.kv.rows:
                        self.kv.release()  # idle: give the cache's memory back
                    self.cond.wait()
                if not self.running:
                    break
                self._admit_waiting()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug must not kill the thread silently: fail the requests in flight
                for row in self.rows + self.spec_rows:
                    row.req.sink(Finish("error", len(row.req.prompt_ids), row.made, f"{type(e).__name__}: {e}"))
                self.rows, self.spec_rows = [], []
        with self.cond:  # shutting down: nobody is left waiting forever
            pending = [r.req for r in self.rows + self.spec_rows] + list(self.waiting)
            self.rows, self.spec_rows, self.waiting = [], [], collections.deque()
        for req in pending:
            req.sink(Finish("cancelled", len(req.prompt_ids), 0, "the server is shutting down"))

    def _admit_waiting(self) -> None:
        """Move waiting requests into rows, first come first served, while rows and the KV budget allow (called
        under the lock; no model work here: prompts are read by the steps)."""
        while self.waiting and self.active < self.max_batch:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                req.sink(Finish("cancelled", len(req.prompt_ids), 0))
                continue
            row = self._row_for(req)
            if row.ids_iter is None and not self.kv.fits([r.reserve for r in self.rows] + [row.reserve]):
                return  # waits for rows to finish: the cache could not grow to what every row may need
            self.waiting.popleft()
            (self.spec_rows if self._speculate(req) else self.rows).append(row)

    def _row_for(self, req: Request) -> _Row:
        p, ids, ctx = req.params, req.prompt_ids, self.lm.context
        limit = min(p.max_new_tokens, ctx - len(ids))
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        if self._speculate(req):
            from slmkit.compose.speculative import SpecStats, speculative_ids

            self.spec_stats = self.spec_stats or SpecStats()
            # the pair's DraftLength (attach_draft's: --draft-tokens, or adaptive) carries over from request to request
            draft = self.lm.draft
            it = speculative_ids(self.lm.model, draft.model if draft else None, ids, p, self.lm.eos_ids, ctx,
                                 draft.context if draft else ctx, stats=self.spec_stats, length=self.lm.draft_length,
                                 lookup=self.lm.lookup, lookup_length=self.lm.lookup_length)
            return _Row(req, limit, len(ids), None, gen, ids_iter=it)
        if self.fast or self.hf is not None:
            return _Row(req, limit, 0, None, gen)  # its prompt is read by the coming steps
        return _Row(req, limit, len(ids), None, gen, ids_iter=generate_ids(self.lm.model, ids, p, self.lm.eos_ids, ctx))

    def _speculate(self, req: Request) -> bool:
        """Decode REQ speculatively: there is a draft (or --lookup), nothing else is running or waiting, no logprobs
        asked."""
        return ((self.lm.draft is not None or self.lm.lookup) and self.fast and req.top_logprobs is None
                and not self.rows and not self.spec_rows and len(self.waiting) <= 1)

    def _next_of(self, rows: list[_Row]) -> list[_Row]:
        """One token from each iterator row (generate.py's batch-1 loop, or the speculative one); the rows left."""
        keep = []
        for row in rows:
            req = row.req
            if req.cancelled:
                req.sink(Finish("cancelled", len(req.prompt_ids), row.made))
                continue
            tok = next(row.ids_iter, None) if row.made < row.limit else None
            if tok is None:
                req.sink(Finish("stop" if row.made < row.limit else "length", len(req.prompt_ids), row.made))
                continue
            row.made += 1
            req.sink(Token(tok))
            keep.append(row)
        return keep

    def _sample(self, row: _Row) -> int | None:
        """ROW's next token, sent to its sink; None when the row is done (its Finish sent)."""
        req = row.req
        if req.cancelled:
            req.sink(Finish("cancelled", len(req.prompt_ids), row.made))
            return None
        if row.made >= row.limit:
            req.sink(Finish("length", len(req.prompt_ids), row.made))
            return None
        tok = sample_next(row.logits.clone(), req.params, None, row.gen)
        if tok in self.lm.eos_ids:
            req.sink(Finish("stop", len(req.prompt_ids), row.made))
            return None
        row.made += 1
        req.sink(self._token(tok, row.logits, req.top_logprobs))
        if row.made >= row.limit:
            req.sink(Finish("length", len(req.prompt_ids), row.made))
            return None
        return tok

    def _step(self) -> None:
        """Sample one token for every decoding row, retire finished rows, then one forward pass over the decoding
        rows' tokens and the next chunks of the prompts being read."""
        self.spec_rows = self._next_of(self.spec_rows)
        feed: list[int] = []
        keep: list[_Row] = []
        for row in self.rows:
            if row.ids_iter is not None:  # fallback for models without our cache: generate.py's loop
                keep += self._next_of([row])
            elif row.reading:
                if row.req.cancelled:
                    row.req.sink(Finish("cancelled", len(row.req.prompt_ids), 0))
                else:
                    keep.append(row)
            elif (tok := self._sample(row)) is not None:
                keep.append(row)
                feed.append(tok)
        if self.fast:
            self._compact(keep)
        elif self.hf is not None:  # the batch holds the rows that have read their prompts, in self.rows's order
            batched = [r for r in self.rows if not r.reading]
            self.hf.keep([batched.index(r) for r in keep if not r.reading])
        self.rows = keep
        if self.fast and keep:
            self._forward(keep, feed)
        elif self.hf is not None and keep:
            self._forward_hf(keep, feed)

    def _forward_hf(self, rows: list[_Row], feed: list[int]) -> None:
        """A transformers decoder: one step for the first len(FEED) rows, then each new row's whole prompt."""
        d = len(feed)
        if d:
            logits = self.hf.step(feed).float().cpu()  # (d, V)
            for i, row in enumerate(rows[:d]):
                row.logits, row.pos = logits[i], row.pos + 1
        for row in rows[d:]:  # read alone, then appended to the batch (hf_batch.py)
            row.logits = self.hf.add(row.req.prompt_ids).float().cpu()
            row.pos = len(row.req.prompt_ids)
        self.steps += 1
        self.max_seen_batch = max(self.max_seen_batch, len(rows))

    def _forward(self, rows: list[_Row], feed: list[int]) -> None:
        """One pass: FEED (a token for each of the first len(feed) rows, which decode) and the next prompt chunks of
        the rows after them (reading, first come first served, prefill_chunk tokens in all while any row decodes)."""
        from slmkit.serve.ragged import Plan, ragged_forward

        d = len(feed)
        budget = self.prefill_chunk if d else max(self.prefill_chunk, IDLE_PREFILL)
        chunks: list[tuple[int, _Row, int]] = []
        for i, row in enumerate(rows[d:], start=d):
            take = min(len(row.req.prompt_ids) - row.pos, budget)
            if take <= 0:
                break
            chunks.append((i, row, take))
            budget -= take
        self.kv.ensure(len(rows), max([r.pos + 1 for r in rows[:d]] + [r.pos + t for _, r, t in chunks]),
                       max(r.reserve for r in rows))
        device = self.lm.model.cos.device  # a buffer every Llama module has (int8 ones too)
        cache = self.kv.view(len(rows))
        if not chunks and d == 1:  # one client: generate()'s batch-1 step, in about half the ops of a forward
            logits = self.lm.model.step(feed[0], self.kv.view(1), rows[0].pos)[None]  # (1, V)
        elif not chunks:
            pos = torch.tensor([r.pos for r in rows[:d]], device=device)  # (d,)
            logits = self.lm.model(torch.tensor(feed, device=device)[:, None], cache=self.kv.view(d), pos=pos)[:, -1]
        else:
            plan = Plan([r.pos for r in rows[:d]], [(i, r.pos, t) for i, r, t in chunks], device)
            tokens = feed + [tok for _, r, t in chunks for tok in r.req.prompt_ids[r.pos:r.pos + t]]
            logits = ragged_forward(self.lm.model, tokens, cache, plan)  # (d + chunks, V)
        logits = logits.float().cpu()
        for i, row in enumerate(rows[:d]):
            row.logits, row.pos = logits[i], row.pos + 1
        for j, (_, row, t) in enumerate(chunks):
            row.pos += t
            if not row.reading:  # its whole prompt is in: the logits of its first token
                row.logits = logits[d + j]
        self.steps += 1
        self.max_seen_batch = max(self.max_seen_batch, d + len(chunks))
        self.max_step_tokens = max(self.max_step_tokens, d + sum(t for *_, t in chunks))

    def _compact(self, keep: list[_Row]) -> None:
        """Move the cache rows of the surviving sequences to the front, in KEEP's order (rows keep their order, so
        a row only ever moves towards the front and never overwrites one not yet moved)."""
        src = [self.rows.index(r) for r in keep]
        for dst, s in enumerate(src):
            if s != dst and keep[dst].pos:
                self.kv.move(dst, s, keep[dst].pos)

    @staticmethod
    def _token(tok: int, logits: torch.Tensor, top: int | None) -> Token:
        if top is None:
            return Token(tok)
        lp = torch.log_softmax(logits, dim=-1)  # the model's distribution, before temperature / top-p
        alts = []
        if top > 0:
            vals, idx = lp.topk(min(top, lp.numel()))
            alts = list(zip(idx.tolist(), vals.tolist(), strict=True))
        return Token(tok, float(lp[tok]), alts)
