"""Filters: why a teacher's answer (or a new instruction) is not kept, and duplicate detection.

Each check returns a reason (a short snake_case word the report counts) or None (keep). In the order applied:

    empty            nothing but whitespace
    invalid_text     U+FFFD (bytes that did not decode), control characters
    truncated        the teacher hit --max-new-tokens: an answer cut mid-sentence (--keep-truncated keeps it)
    too_short        fewer than --min-words words
    too_long         more than --max-words words
    repetition       a degenerate loop: under half of the word 4-grams of a 40+ word answer are distinct
    refusal          "I'm sorry, I can't", "as an AI language model", ... (--keep-refusals keeps them)
    blacklist        matches a --blacklist regular expression
    echo             repeats the prompt: not one word that the prompt does not have
    duplicate        the same answer (case and spacing aside) as a kept one
    near_duplicate   MinHash Jaccard of word 3-grams >= --near-dup-threshold (0.8) with a kept answer, or with
                     --near-dup rouge, ROUGE-L >= the threshold (0.7)

New instructions from --expand: empty, invalid_text, too_short (< 3 words), too_long (> 150 words),
unsuitable (asks for an image, a file, audio, ...: a text model cannot do it), blacklist, duplicate and
near_duplicate (ROUGE-L >= 0.7 with a task in the pool, as Alpaca's pipeline does).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from slmkit.compose.cascade import rouge_l

_WORD = re.compile(r"\w+")
REFUSALS = [r"\bas an ai\b", r"\b(?:ai|large) language model\b",
            r"\bi(?:'m| am) (?:sorry|afraid|unable|not able)\b",
            r"\bi (?:can ?not|can't|won't|will not) (?:help|assist|answer|provide|do|comply|fulfil)",
            r"\bi do(?: not|n't) have (?:access|the ability|personal)\b"]
# Tasks a text-only model cannot do (Alpaca filters the same kinds of words).
UNSUITABLE = r"\b(?:image|images|picture|photo|graph|plot|chart|diagram|flowchart|draw|drawing|video|audio|music|" \
             r"sound|file|attachment|map|link|url|website)\b"


@dataclass
class FilterSettings:
    min_words: int = 3
    max_words: int = 800
    keep_truncated: bool = False
    keep_refusals: bool = False
    blacklist: list[str] = field(default_factory=list)  # regular expressions, searched case-insensitively
    near_dup: str = "minhash"  # "minhash", "rouge" or "off"
    near_dup_threshold: float | None = None  # None: 0.8 for minhash (Jaccard), 0.7 for rouge (ROUGE-L F1)

    def __post_init__(self) -> None:
        if self.near_dup not in ("minhash", "rouge", "off"):
            raise SystemExit(f"error: --near-dup {self.near_dup!r}: use minhash, rouge or off")
        if self.near_dup_threshold is None:
            self.near_dup_threshold = 0.8 if self.near_dup == "minhash" else 0.7
        if not 0 < self.near_dup_threshold <= 1:
            raise SystemExit(f"error: --near-dup-threshold {self.near_dup_threshold} must be in (0, 1]")
        self.refusal_re = re.compile("|".join(REFUSALS), re.IGNORECASE)
        try:
            self.blacklist_re = [re.compile(p, re.IGNORECASE) for p in self.blacklist]
        except re.error as e:
            raise SystemExit(f"error: --blacklist {e.pattern!r} is not a regular expression ({e})") from None


def invalid_text(text: str) -> bool:
    """Undecodable bytes (U+FFFD) or control characters other than newline and tab."""
    return "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text)


def repetitive(words: list[str], n: int = 4, min_words: int = 40, min_distinct: float = 0.5) -> bool:
    """A loop small teachers fall into: under MIN_DISTINCT of the word N-grams are distinct."""
    if len(words) < min_words:
        return False
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < min_distinct * len(grams)


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def check_answer(prompt: str, answer: str, finish_reason: str | None, s: FilterSettings) -> str | None:
    """Why ANSWER (to PROMPT) is dropped, or None: every check of the module docstring but the duplicate ones."""
    if not answer.strip():
        return "empty"
    if invalid_text(answer):
        return "invalid_text"
    if finish_reason == "length" and not s.keep_truncated:
        return "truncated"
    words = answer.split()
    if len(words) < s.min_words:
        return "too_short"
    if len(words) > s.max_words:
        return "too_long"
    if repetitive([w.lower() for w in words]):
        return "repetition"
    if not s.keep_refusals and s.refusal_re.search(answer):
        return "refusal"
    if any(r.search(answer) for r in s.blacklist_re):
        return "blacklist"
    if not set(_WORD.findall(answer.lower())) - set(_WORD.findall(prompt.lower())):
        return "echo"  # not one word the prompt lacks. ("... is mercury." answers with one: kept.)
    return None


def check_instruction(text: str, s: FilterSettings) -> str | None:
    """Why a new instruction from --expand is dropped, or None (duplicates are the pool's business)."""
    if not text.strip():
        return "empty"
    if invalid_text(text) or not text[0].isalnum():
        return "invalid_text"
    n = len(text.split())
    if n < 3:
        return "too_short"
    if n > 150:
        return "too_long"
    if re.search(UNSUITABLE, text, re.IGNORECASE):
        return "unsuitable"
    if any(r.search(text) for r in s.blacklist_re):
        return "blacklist"
    return None


# -- duplicates ------------------------------------------------------------------------------------------------------
class Dedup:
    """The kept texts, for exact and near-duplicate checks. `check(text)` -> "duplicate", "near_duplicate" or None;
    `add(text)` records a kept one. MinHash uses datasketch's MinHash + LSH index (sub-linear lookups: fine at
    millions of rows); ROUGE-L compares with every kept text (quadratic: thousands)."""

    def __init__(self, method: str = "minhash", threshold: float = 0.8, num_perm: int = 128):
        self.method, self.threshold, self.num_perm = method, threshold, num_perm
        self.exact: set[str] = set()
        self.texts: list[str] = []  # normalized, for ROUGE-L
        self.lsh, self.sketches = None, {}  # minhash: the LSH index, and digest -> MinHash to confirm its candidates
        self._last: tuple | None = None  # (text, its MinHash): check() then add() of a kept answer sketch it once
        if method == "minhash":
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise SystemExit('error: --near-dup minhash needs datasketch: pip install -e ".[synth]" (or pass '
                                 "--near-dup rouge, or off)") from None
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def _minhash(self, text: str):
        from datasketch import MinHash

        if self._last is not None and self._last[0] == text:
            return self._last[1]
        words = text.split()
        shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles])
        self._last = (text, m)
        return m

    def check(self, text: str) -> str | None:
        key = normalized(text)
        if hashlib.sha1(key.encode()).hexdigest() in self.exact:
            return "duplicate"
        if self.method == "minhash":
            m = self._minhash(key)  # LSH finds likely matches; their estimated Jaccard decides
            if any(self.sketches[d].jaccard(m) >= self.threshold for d in self.lsh.query(m)):
                return "near_duplicate"
        if self.method == "rouge" and any(rouge_l(key, t) >= self.threshold for t in self.texts):
            return "near_duplicate"
        return None

    def add(self, text: str) -> None:
        key = normalized(text)
        digest = hashlib.sha1(key.encode()).hexdigest()
        if digest in self.exact:
            return
        self.exact.add(digest)
        if self.method == "minhash":
            self.sketches[digest] = self._minhash(key)
            self.lsh.insert(digest, self.sketches[digest])
        elif self.method == "rouge":
            self.texts.append(key)
