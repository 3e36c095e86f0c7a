"""The tokenizer side of GGUF: which llama.cpp pre-tokenizer a Hugging Face tokenizer.json matches, and back.

llama.cpp does not run tokenizer.json's pre-tokenizer: it looks up `tokenizer.ggml.pre` (a name) in its own table of
split rules. A byte-level BPE exports correctly only when that name splits text as tokenizer.json does, so we
recognise the pre-tokenizer's steps and map them to a name (and, importing a GGUF, a name back to the steps):

    family        tokenizer.json pre_tokenizer                                  llama.cpp names (same split rules)
    gpt2          ByteLevel(use_regex) — GPT-2's regex                          gpt-2, mpt, olmo, jais
    digits+gpt2   Digits(individual) then ByteLevel(use_regex)                  smollm, starcoder, refact, codeshell
    llama3        Split(Llama 3 regex: digits in runs of 1-3) + ByteLevel      llama-bpe, dbrx, smaug
    qwen2         Split(the same regex with single digits) + ByteLevel          qwen2, stablelm2

The first name of each family is the one written when the folder does not record another (a folder imported from a
GGUF records its original name in tokenizer_config.json as `gguf_pre`). Anything else is refused in one line.
"""

from __future__ import annotations

import json

# tokenizer.json's spellings of the two split regexes (transformers writes them this way for Llama 3 and Qwen2).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPLIT_BYTES = {**_BYTES, "use_regex": False}  # the Split step already cut the text


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# family -> (llama.cpp names, the first being the default; tokenizer.json pre_tokenizer steps)
FAMILIES: dict[str, tuple[tuple[str, ...], list[dict]]] = {
    "gpt2": (("gpt-2", "mpt", "olmo", "jais"), [_BYTES]),
    "digits+gpt2": (("smollm", "starcoder", "refact", "codeshell"),
                    [{"type": "Digits", "individual_digits": True}, _BYTES]),
    "llama3": (("llama-bpe", "dbrx", "smaug"), [_split(LLAMA3_REGEX), _SPLIT_BYTES]),
    "qwen2": (("qwen2", "stablelm2"), [_split(QWEN2_REGEX), _SPLIT_BYTES]),
}


def _steps(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    return [s for p in pre["pretokenizers"] for s in _steps(p)] if pre.get("type") == "Sequence" else [pre]


def _key(step: dict) -> tuple:
    """What in a step changes the split (trim_offsets only moves offsets; a Split's regex may be spelt as a String)."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, bool(step.get("add_prefix_space")), step.get("use_regex", True)
    if kind == "Digits":
        return kind, bool(step.get("individual_digits"))
    if kind == "Split":
        return kind, json.dumps(step.get("pattern"), sort_keys=True), step.get("behavior"), bool(step.get("invert"))
    return (json.dumps(step, sort_keys=True),)


def family_of(pre_tokenizer: dict | None) -> str | None:
    """The family whose split rules a tokenizer.json pre_tokenizer has, or None."""
    keys = [_key(s) for s in _steps(pre_tokenizer)]
    return next((f for f, (_, steps) in FAMILIES.items() if keys == [_key(s) for s in steps]), None)


def family_of_name(name: str) -> str | None:
    return next((f for f, (names, _) in FAMILIES.items() if name in names), None)


def pre_tokenizer_for(name: str) -> dict | None:
    """tokenizer.json's pre_tokenizer for llama.cpp's pre-tokenizer NAME, or None when we do not know the name."""
    family = family_of_name(name)
    if family is None:
        return None
    steps = FAMILIES[family][1]
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def describe(pre: dict | None) -> str:
    """A short spelling of a pre_tokenizer for messages: Sequence[Digits, ByteLevel]."""
    steps = _steps(pre)
    return "none" if not steps else "+".join(s.get("type", "?") for s in steps)


def pre_name(spec: dict, recorded: str | None, where: str) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json SPEC: RECORDED (the name the folder's GGUF had) when its
    rules are the same, else the family's default. Unknown split rules are a one-line error naming WHERE."""
    if spec.get("normalizer") is not None:
        raise SystemExit(f"error: {where}: the tokenizer normalizes text ({spec['normalizer'].get('type')}), which "
                         "llama.cpp's gpt2 vocabulary does not; export with --format onnx or --format hf")
    family = family_of(spec.get("pre_tokenizer"))
    if family is None and not spec["model"].get("merges"):  # a byte tokenizer: no merges, so any split gives its bytes
        family = "gpt2"
    if family is None:
        known = "; ".join(f"{' / '.join(n[:2])}" for n, _ in FAMILIES.values())
        raise SystemExit(f"error: {where}: its pre-tokenizer ({describe(spec.get('pre_tokenizer'))}) matches none of "
                         f"llama.cpp's that slmkit knows ({known}); export with --format onnx or --format hf, or "
                         "report the model")
    names = FAMILIES[family][0]
    return recorded if recorded in names else names[0]


def vocab_of(tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings (byte-level spelling), token types and merges for a byte-level BPE / byte tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise SystemExit("error: GGUF export supports byte-level BPE tokenizers (slmkit's, GPT-2's, SmolLM's, Llama "
                         f"3's, Qwen2's); this folder's tokenizer is {spec['model']['type']} — use --format onnx or "
                         "--format hf")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab:
        raise SystemExit(f"error: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                   if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    tokens, types = [], []
    for i in range(n_vocab):  # ids the tokenizer never emits (padded embeddings) become unused placeholders
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if t is None else gguf.TokenType.CONTROL if t in special else
                     gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, [int(t) for t in types], merges
