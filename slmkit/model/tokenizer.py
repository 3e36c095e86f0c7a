"""Train and load tokenizers (byte-level BPE, raw bytes, WordPiece) with Hugging Face `tokenizers`; chat templates.

Every tokenizer we write is a `tokenizer.json` that `AutoTokenizer.from_pretrained(DIR)` opens. Both kinds use the
GPT-2 byte-level alphabet, so any UTF-8 text round-trips exactly and a token's byte length is known exactly
(needed for bits per byte).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"  # document separator; also the BOS that starts every document
PAD = "<|pad|>"
SPECIALS = [EOS, PAD, "<|im_start|>", "<|im_end|>"]  # the last two frame chat turns (ChatML)

# ChatML, the template most small chat models (SmolLM2, Qwen) use; written into tokenizer_config.json.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (what ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def default_vocab_size(n_bytes: int) -> int:
    """A BPE vocabulary that fits the corpus: about sqrt(bytes), as a power of two in [512, 32768].

    Tiny corpora cannot support many merges (rare tokens never get trained), large ones gain from more.
    """
    return int(min(32768, max(512, 2 ** round(math.log2(max(1, n_bytes) ** 0.5)))))


def _wrap(tok, chat_template: str | None = CHATML_TEMPLATE):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with our special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    eos_id = tok.token_to_id(EOS)
    # Every encoded text starts with the document separator, exactly as training documents do.
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                      special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=SPECIALS[2:], chat_template=chat_template,
                                   model_max_length=1_000_000, clean_up_tokenization_spaces=False)


def _bpe_trainer(vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIALS):
        raise SystemExit(f"error: --vocab-size {vocab_size} is too small; byte-level BPE needs at least "
                         f"{256 + len(SPECIALS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on TEXTS (streamed) and return a transformers fast tokenizer."""
    tok, trainer = _bpe_trainer(vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok)


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, the order BERT's vocab.txt uses


def _wordpiece_trainer(vocab_size: int, lowercase: bool, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 2 * len(BERT_SPECIALS):
        raise SystemExit(f"error: --vocab-size {vocab_size} is too small for a WordPiece tokenizer")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=BERT_SPECIALS, continuing_subword_prefix="##",
                                        show_progress=False)
    return tok, trainer


def _wrap_wordpiece(tok, lowercase: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", model_max_length=512,
                                   do_lower_case=lowercase, clean_up_tokenization_spaces=True)


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = False, min_frequency: int = 2):
    """Train a BERT-style WordPiece tokenizer on TEXTS (streamed) and return a transformers fast tokenizer.

    WordPieceTrainer, BertNormalizer (lowercasing and accent stripping when LOWERCASE, as BERT's uncased models),
    BertPreTokenizer, `##` continuation pieces; every encoded text becomes `[CLS] text [SEP]` (pairs:
    `[CLS] a [SEP] b [SEP]` with token type 1 for b).
    """
    tok, trainer = _wordpiece_trainer(vocab_size, lowercase, min_frequency)
    tok.train_from_iterator(texts, trainer)
    return _wrap_wordpiece(tok, lowercase)


def count_words(texts: Iterable[str], kind: str = "bpe", lowercase: bool = False) -> Counter:
    """How often each pre-token ("word", as train_bpe (KIND "bpe": byte-level, 'Ġthe') or train_wordpiece
    ("wordpiece": normalized, split on spaces and punctuation) splits text) occurs: all the statistics either
    trainer reads."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                      lowercase=lowercase) if kind == "wordpiece" else None
    split = pre_tokenizers.BertPreTokenizer() if kind == "wordpiece" else pre_tokenizers.ByteLevel(
        add_prefix_space=False)
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in split.pre_tokenize_str(norm.normalize_str(text) if norm else text))
    return counts


def train_from_counts(counts: dict[str, int], vocab_size: int, kind: str = "bpe", lowercase: bool = False,
                      min_frequency: int = 2, cap: int = 20_000_000):
    """train_bpe's (KIND "bpe") or train_wordpiece's tokenizer from word counts (count_words') instead of text: what
    either learns depends on nothing else. Counts beyond CAP in total are scaled down (the order barely moves)."""
    from tokenizers import pre_tokenizers

    tok, trainer = _bpe_trainer(vocab_size, min_frequency) if kind == "bpe" else _wordpiece_trainer(
        vocab_size, lowercase, min_frequency)
    split_for_use = tok.pre_tokenizer
    scale = min(1.0, cap / max(1, sum(counts.values())))
    # words hold no whitespace (byte-level maps it to visible characters; BERT's split drops it): one per space
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator((" ".join([w] * max(1, round(c * scale))) for w, c in counts.items() if w.strip() == w),
                            trainer)
    tok.pre_tokenizer = split_for_use
    return _wrap(tok) if kind == "bpe" else _wrap_wordpiece(tok, lowercase)


def byte_tokenizer():
    """One token per UTF-8 byte (256) plus the special tokens: no training, works for any language."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(SPECIALS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def load_tokenizer(model_dir: Path):
    """The tokenizer saved in a model folder (local files only)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise SystemExit(f"error: {model_dir} holds no tokenizer (tokenizer.json); pass a model folder written by "
                         "`slm train` or a Hugging Face folder with its tokenizer")
    config = model_dir / "tokenizer_config.json"
    try:
        cls = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        cls = None  # AutoTokenizer reports what is wrong with the file
    try:
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (model_dir / "tokenizer.json").is_file():
            # The generic tokenizer.json class (what `slm train` saves): load it directly. AutoTokenizer would first
            # read the model's config through AutoConfig, whose imports cost ~2 s of every verb's start-up here.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed tokenizer.json
        name = "tokenizer.json" if not (model_dir / "tokenizer.json").is_file() else "tokenizer files"
        raise SystemExit(f"error: {model_dir}: cannot load the tokenizer ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:160]}); check or restore its {name} "
                         "(tokenizer.json, tokenizer_config.json) from the model's source") from None
    check_vocab_fits(model_dir, tok)
    return tok


def check_vocab_fits(model_dir: Path, tokenizer) -> None:
    """A tokenizer with ids past the model's embedding table would index out of range (or, on some paths, silently
    wrap): one line naming both files instead."""
    path = Path(model_dir) / "config.json"
    try:
        vocab_size = json.loads(path.read_text(encoding="utf-8")).get("vocab_size") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return  # the model loader reports a broken config.json itself
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise SystemExit(f"error: {model_dir}: the tokenizer has {len(tokenizer):,} tokens but config.json's "
                         f"vocab_size is {vocab_size:,}; the tokenizer belongs to another model — copy this model's "
                         "own tokenizer files into the folder")


def encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (the data pipeline inserts separators itself). Uses the Rust batch path."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # folders saved for inference (sentence encoders) cut/pad to 128
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its settings
        backend.no_truncation()
        backend.no_padding()
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte."""
    n = len(tokenizer)
    lengths = np.zeros(n, dtype=np.int64)
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    special = set(tokenizer.all_special_ids)
    for tid in range(n):
        if tid in special:
            continue
        piece = backend.id_to_token(tid)
        if piece is None:
            continue
        if byte_level:
            lengths[tid] = len(piece)  # one printable character per byte
        else:  # SentencePiece-style: decode the piece alone (approximate for byte-fallback pieces)
            lengths[tid] = len(tokenizer.decode([tid]).encode("utf-8"))
    return lengths


def tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
