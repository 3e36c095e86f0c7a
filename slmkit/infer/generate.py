"""Verb `generate`, and the decode loop every caller uses (chat, the server, benchmarks) as a plain iterator.

Batch-1 decoding of a small model is bound by per-token overhead, not arithmetic: our loop runs the model on one
new token at a time against a preallocated key/value cache, with no per-step allocation of cache objects, logits
processors or stopping-criteria lists. `benchmarks/bench_decode.py` compares it with `transformers`' generate().
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from slmkit.infer.sampling import NonFiniteLogits, SamplingParams, checked_sampling, sample_next


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name a transformers model's forward takes its key/value cache by: `cache` from transformers 5.x's rename
    on (`past_key_values` warns until 5.40 and is then gone), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()  # no autograd records: 5 ms a token at 135M when it did (docs/benchmarks.md, 2026-12-07)
def generate_ids(model: torch.nn.Module, prompt_ids: list[int], p: SamplingParams, eos_ids: set[int],
                 context: int) -> Iterator[int]:
    """Yield new token ids one at a time (a KV-cache decode loop for batch 1). Stops at EOS or the context end."""
    from slmkit.model.llama import Llama

    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    device = next(model.parameters()).device
    ids = list(prompt_ids)[-(context - 1):]  # keep the most recent tokens if the prompt overflows the context
    limit = min(p.max_new_tokens, context - len(ids))
    if limit <= 0:
        return
    x = torch.tensor([ids], device=device)
    seen = torch.tensor(sorted(set(ids)), dtype=torch.long) if p.repetition_penalty != 1.0 else None
    if isinstance(model, Llama):
        cache = model.new_cache(1, len(ids) + limit)
        logits = model(x, cache=cache, pos=0)[0, -1]
        step = lambda tok, pos: model.step(tok, cache, pos)  # noqa: E731
    else:  # any transformers causal LM: its own cache object, filled in place
        from transformers.cache_utils import DynamicCache

        hf_cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        logits = model(input_ids=x, use_cache=True, **hf_cache).logits[0, -1]

        def step(tok: int, pos: int) -> torch.Tensor:
            return model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **hf_cache).logits[0, -1]

    pos = len(ids)
    for _ in range(limit):
        tok = sample_next(logits.cpu(), p, seen, gen)
        if tok in eos_ids:
            return
        yield tok
        if seen is not None:
            seen = torch.unique(torch.cat([seen, torch.tensor([tok])]))
        logits = step(tok, pos)
        pos += 1


def fit_prompt(ids: list[int], max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """(the prompt's ids that fit, how many were dropped from its start). A prompt that leaves less than
    MAX_NEW_TOKENS of room in CONTEXT loses its oldest tokens, but keeps at least half the context: an answer needs
    the end of its question more than it needs to be long."""
    if len(ids) + max_new_tokens <= context:
        return list(ids), 0
    keep = min(len(ids), max(context - max_new_tokens, context // 2), context - 1)
    return list(ids[len(ids) - keep:]), len(ids) - keep


def _tap(tokens: Iterator[int], on_token: Callable[[int], None]) -> Iterator[int]:
    for tok in tokens:
        on_token(tok)
        yield tok


class LoadedModel:
    """A model folder ready to generate: the module, its tokenizer and its context length."""

    def __init__(self, model_dir: Path, model: torch.nn.Module, tokenizer, context: int):
        self.path, self.model, self.tokenizer, self.context = Path(model_dir), model, tokenizer, context
        # The decode loop: generate_ids, or another with its contract (compose.speculative.attach_draft's).
        self.decode: Callable[..., Iterator[int]] = generate_ids
        self.draft: LoadedModel | None = None  # with a draft: speculative decoding, its last SpecStats in spec_stats
        self.spec_stats = None
        self.prompt_cut = 0  # tokens the last stream() dropped from its prompt's start to fit the context
        self.draft_length = None  # compose.speculative.DraftLength: the pair's acceptance and timings, across calls
        self.lookup, self.lookup_length = False, None  # guesses from the text itself (--lookup), and their K policy
        eos = {tokenizer.eos_token_id}
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
            tid = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
            if tid is not None:
                eos.add(tid)
        self.eos_ids = {e for e in eos if e is not None}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def stream(self, prompt: str | list[int], on_token: Callable[[int], None] | None = None,
               **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated; honours stop strings. ON_TOKEN sees each token id as it is
        sampled (a piece can hold several tokens, or none yet: incomplete UTF-8 and possible stop strings wait)."""
        p = SamplingParams(**sampling)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids, self.prompt_cut = fit_prompt(ids, p.max_new_tokens, self.context)
        tokens = self.decode(self.model, ids, p, self.eos_ids, self.context)
        if on_token is not None:
            tokens = _tap(tokens, on_token)
        yield from stream_text(self.tokenizer, tokens, p.stop)

    def generate(self, prompt: str | list[int], **sampling) -> str:
        """The full completion of PROMPT (without the prompt)."""
        return "".join(self.stream(prompt, **sampling))


class TextStream:
    """Push-style detokenizer: token ids in, safe text pieces out. Holds back incomplete UTF-8 and anything that
    could still become a stop string; `stopped` turns true once a stop string appears (it is never emitted)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, tok: int) -> str:
        """Add one token; the text that is now safe to show ("" if none)."""
        self.ids.append(tok)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
        if cut >= 0:  # never emitted: the last len(stop)-1 characters are always held back
            self.stopped = True
            piece = self.text[self.emitted:cut] if cut > self.emitted else ""
            self.emitted = len(self.text)
            return piece
        safe = len(self.text) - self.hold
        if safe > self.emitted:
            piece, self.emitted = self.text[self.emitted:safe], safe
            return piece
        return ""

    def finish(self) -> str:
        """The held-back tail, once no more tokens come."""
        piece = self.text[self.emitted:] if len(self.text) > self.emitted and not self.stopped else ""
        self.emitted = len(self.text)
        return piece


def stream_text(tokenizer, token_iter: Iterator[int], stop: list[str]) -> Iterator[str]:
    """Token ids -> text pieces. Holds back incomplete UTF-8 and anything that could still become a stop string."""
    ts = TextStream(tokenizer, stop)
    for tok in token_iter:
        piece = ts.push(tok)
        if piece:
            yield piece
        if ts.stopped:
            return
    tail = ts.finish()
    if tail:
        yield tail


def load(model_dir: Path, threads: int | None = None, dtype: str = "fp32", device: str = "cpu",
         compile: bool = False) -> LoadedModel:
    """Load MODEL_DIR (ours or any local Hugging Face causal LM folder) for generation on DEVICE ("auto": a GPU
    when there is one).

    dtype "bf16" halves the bytes of weights read per token at a small cost in precision. Decoding is memory-bound,
    but whether it is faster rests on the CPU's bf16 matrix-vector kernels: eagerly 1.3-1.4x fp32 on a Xeon with AMX,
    0.6-0.8x on an AMD Zen 5; with compile=True 1.2-1.6x fp32's compiled rate at 135M on the Zen 5 (docs/benchmarks.md).

    compile=True decodes with torch.compile'd kernels (decode.compile_step): from ~7M parameters on, 1.2-1.4x the
    eager loop's tokens/s in fp32 and 2-3x in bf16 on CPU, after a few seconds of compiling while loading.
    slmkit's Llama module with float weights only; other models decode eagerly (a note says so).
    """
    from slmkit.hardware import pick_device, require_cpp_compiler
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.llama import decode_layout
    from slmkit.model.tokenizer import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    cfg = read_config(Path(model_dir))
    tokenizer = load_tokenizer(Path(model_dir))
    if dtype not in ("fp32", "bf16"):
        raise SystemExit(f"error: unknown --dtype {dtype!r}; use fp32 or bf16")
    model = load_model(Path(model_dir), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    dev = pick_device(device)
    model = model.to(dev)
    compiled = None
    if compile:
        from slmkit.infer.decode import compile_step

        if dev == "cpu":
            require_cpp_compiler()
        try:
            compiled = compile_step(model)  # keeps weights contiguous: its kernels stream rows
        except ValueError as e:  # another architecture, or int8 layers
            print(f"note: {model_dir}: {e}; decoding eagerly", file=sys.stderr)
    if compiled is None:
        model = decode_layout(model)  # the CPU weight layout; a no-op on GPUs
    else:
        model.compiled_step = compiled
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    return LoadedModel(Path(model_dir), model, tokenizer, int(context))


def main(model_dir: Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
         top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
         num_samples: int = 1, stream: bool = True, as_json: bool = False, threads: int | None = None,
         dtype: str = "fp32", device: str = "auto", compile: bool = False, draft: Path | None = None,
         draft_tokens: int | None = None, lookup: bool = False) -> list[str]:
    """Generate a continuation of PROMPT with the model in MODEL_DIR; prints it (streamed) and returns the texts.
    With --draft, a small model with the same tokenizer guesses tokens that MODEL_DIR checks (speculative decoding);
    with --lookup, the text so far does (prompt lookup), alone or with a draft."""
    from slmkit.options import check_numbers

    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=list(stop or []))
    checked_sampling(**params)
    check_numbers(dict(num_samples=num_samples, threads=threads, draft_tokens=draft_tokens),
                  {"num_samples": "texts to sample"})
    refuse_draft_tokens(draft, draft_tokens, lookup)
    lm = load(model_dir, threads=threads, dtype=dtype, device=device, compile=compile)
    if draft is not None or lookup:
        from slmkit.compose.speculative import attach_draft

        attach_draft(lm, load(draft, dtype=dtype, device=device, compile=compile) if draft is not None else None,
                     draft_tokens, lookup)
    try:
        return _print_samples(lm, prompt, params, seed, num_samples, stream, as_json)
    except NonFiniteLogits as e:
        if stream and not as_json:
            print(flush=True)  # end the streamed line: the error gets a line of its own
        raise SystemExit(f"error: {model_dir}: {e}") from None


def _print_samples(lm: LoadedModel, prompt: str, params: dict, seed: int | None, num_samples: int, stream: bool,
                   as_json: bool) -> list[str]:
    texts = []
    for i in range(num_samples):
        s = None if seed is None else seed + i
        t0, pieces, stamps = time.perf_counter(), [], []  # stamps: when each token was sampled
        if stream and not as_json:
            print(prompt, end="", flush=True)
        for piece in lm.stream(prompt, on_token=lambda _, st=stamps: st.append(time.perf_counter()), seed=s, **params):
            pieces.append(piece)
            if stream and not as_json:
                print(piece, end="", flush=True)
        seconds = time.perf_counter() - t0
        if lm.prompt_cut and i == 0:
            print(f"note: the prompt is longer than the model's {lm.context}-token context allows with "
                  f"--max-new-tokens {params['max_new_tokens']}: its first {lm.prompt_cut} tokens were dropped",
                  file=sys.stderr)
        text = "".join(pieces)
        texts.append(text)
        n = len(stamps)  # tokens sampled (not the text re-tokenized: a stop string or broken UTF-8 changes that)
        # The first token waits for the prompt's forward pass (and, on the first call, for kernels to warm up: ~0.5 s
        # on a GPU): the rate after it is the decoding speed.
        first = (stamps[0] if stamps else t0 + seconds) - t0
        rate = (n - 1) / (seconds - first) if n > 1 and seconds > first else n / max(1e-9, seconds)
        if as_json:
            spec = lm.spec_stats.as_dict() if lm.spec_stats else {}  # with --draft
            print(json.dumps({"prompt": prompt, "text": text, "tokens": n, "seconds": round(seconds, 3),
                              "first_token_seconds": round(first, 3), "tokens_per_s": round(rate, 1),
                              "prompt_tokens_dropped": lm.prompt_cut, **spec}))
        elif stream:
            spec = f", draft acceptance {lm.spec_stats.acceptance_rate:.0%}" if lm.spec_stats else ""
            print(f"\n[{n} tokens in {seconds:.2f} s: first after {first:.2f} s, then {rate:.1f} tokens/s{spec}]",
                  file=sys.stderr)
        else:
            print(prompt + text)
    return texts


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="model folder")
    p.add_argument("--prompt", default="", help="text to continue (default: empty: sample from scratch)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the K likeliest tokens; 0 = off (default: 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default: 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise repeated tokens; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to draw (default: 1)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print only when finished")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="one JSON object per sample: prompt, text, tokens, seconds, first_token_seconds, tokens_per_s, "
                   "prompt_tokens_dropped (a prompt too long for the context loses its start)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight precision (bf16: half the memory; "
                   "faster decoding with --compile, and eagerly on some CPUs only, e.g. Xeons with AMX)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:1 …")
    p.add_argument("--compile", action="store_true", help="decode with torch.compile'd kernels: a few seconds of "
                   "compiling, then ~1.3x the tokens/s in fp32 and 2-3x in bf16 on CPU from ~7M parameters (slmkit's "
                   "Llama models; needs a C++ compiler on CPU)")
    add_draft_args(p)


def refuse_draft_tokens(draft: Path | None, draft_tokens: int | None, lookup: bool = False) -> None:
    """--draft-tokens sets how many tokens a --draft (or --lookup) guesses: without either it would change nothing."""
    if draft is None and not lookup and draft_tokens is not None:
        raise SystemExit("error: --draft-tokens does not apply without --draft or --lookup: give --draft DIR (a small "
                         "model with the same tokenizer) or --lookup, or drop --draft-tokens")


def add_draft_args(p) -> None:
    """--draft and --draft-tokens, for generate, chat and serve."""
    p.add_argument("--draft", type=Path, default=None, metavar="DIR", help="speculative decoding: a small model "
                   "folder with the same tokenizer (e.g. from slm distill) guesses tokens that the model checks in one "
                   "pass; greedy text is the model's own, sampled text follows its distribution (docs/compose.md)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens the draft guesses per check "
                   "(default: adaptive, 0-12, from the measured acceptance rate and speeds)")
    p.add_argument("--lookup", action="store_true", help="speculative decoding from the text itself (prompt lookup): "
                   "where the last 3 or 2 tokens occurred before, the tokens that followed are the guess the model "
                   "checks; free to make, it pays where text repeats (names, boilerplate, code, a small model's greedy "
                   "loops); with --draft, the draft guesses where the text cannot")
