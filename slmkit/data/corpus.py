"""Corpora -> documents -> one memory-mapped token file, cached by content hash; training windows, shuffled pass by
pass (or drawn at random, nanoGPT's way).

Inputs: .txt/.md files, directories and globs of them, JSONL with a text field, CSV and Parquet with a named text
column. Everything streams: no corpus has to fit in memory, only one chunk at a time.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".text", ".markdown", ".rst"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".tsv"}
CHUNK_BYTES = 1 << 20  # text files are decoded and tokenized 1 MiB at a time


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files, directories (recursively) and globs -> a sorted list of readable data files."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if any(ch in str(raw) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            if not matches:
                raise SystemExit(f"error: no files match {raw!r}")
            files += [m for m in matches if m.is_file()]
        elif p.is_dir():
            wanted = TEXT_SUFFIXES | TABLE_SUFFIXES
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in wanted)
            if not found:
                raise SystemExit(f"error: directory {p} holds no .txt/.md/.jsonl/.csv/.parquet files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: data file {p} does not exist")
    for f in files:
        if f.stat().st_size == 0:
            raise SystemExit(f"error: data file {f} is empty; remove it or pass other --data")
    return files


def iter_text_chunks(files: list[Path], text_col: str = "text", replace_errors: bool = False,
                     skip_bad_lines: bool | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (text, starts_new_document) pieces from FILES, one bounded chunk at a time. SKIP_BAD_LINES: None when
    the verb has no --skip-bad-lines (its errors must not advise one)."""
    for f in files:
        suffix = f.suffix.lower()
        if suffix in {".jsonl", ".json"}:
            yield from ((t, True) for t in _iter_jsonl(f, text_col, skip_bad_lines))
        elif suffix in {".csv", ".tsv"}:
            yield from ((t, True) for t in _iter_csv(f, text_col, "\t" if suffix == ".tsv" else ","))
        elif suffix == ".parquet":
            yield from ((t, True) for t in _iter_parquet(f, text_col))
        else:
            yield from _iter_text_file(f, replace_errors)


def iter_documents(files: list[Path], text_col: str = "text", replace_errors: bool = False) -> Iterator[str]:
    """Whole-ish texts for tokenizer training (text files arrive in chunks; BPE statistics don't care)."""
    for text, _ in iter_text_chunks(files, text_col, replace_errors):
        yield text


def _iter_text_file(f: Path, replace_errors: bool) -> Iterator[tuple[str, bool]]:
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if replace_errors else "strict")
    offset, first, pending = 0, True, ""
    with open(f, "rb") as fh:
        while True:
            raw = fh.read(CHUNK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                # e.start is relative to the bytes the decoder held plus this read; report the absolute offset.
                held = len(decoder.getstate()[0]) if hasattr(decoder, "getstate") else 0
                raise SystemExit(f"error: {f} is not valid UTF-8 at byte offset {offset - held + e.start}; "
                                 "fix the file or pass --replace-errors to substitute U+FFFD") from None
            offset += len(raw)
            text = pending + text
            if raw:  # cut at the last newline so a chunk boundary never splits a word
                cut = text.rfind("\n") + 1
                text, pending = (text[:cut], text[cut:]) if cut > 0 else ("", text)
            if text:
                yield text, first
                first = False
            if not raw:
                break


def iter_jsonl(f: Path, skip_bad_lines: bool | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) for every non-blank line of a JSONL file. A malformed line is a one-line error
    naming file and line; with SKIP_BAD_LINES a warning (None: the caller offers no --skip-bad-lines)."""
    with open(f, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad_lines:
                    print(f"warning: {f}:{lineno}: skipped malformed JSON ({e.msg})", file=sys.stderr)
                    continue
                hint = "" if skip_bad_lines is None else " or pass --skip-bad-lines"
                raise SystemExit(f"error: {f}:{lineno}: malformed JSON ({e.msg}); fix the line{hint}") from None


def _iter_jsonl(f: Path, col: str, skip_bad_lines: bool | None) -> Iterator[str]:
    for lineno, row in iter_jsonl(f, skip_bad_lines):
        if not isinstance(row, dict) or col not in row:
            raise SystemExit(f"error: {f}:{lineno}: no {col!r} field; name the text field with --text-col")
        if isinstance(row[col], str) and row[col]:
            yield row[col]


def _iter_csv(f: Path, col: str, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(1 << 30)
    with open(f, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if reader.fieldnames is None or col not in reader.fieldnames:
            raise SystemExit(f"error: {f} has no column {col!r} (columns: {', '.join(reader.fieldnames or [])}); "
                             "name the text column with --text-col")
        for row in reader:
            if row[col]:
                yield row[col]


def _iter_parquet(f: Path, col: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: reading Parquet needs pyarrow: pip install 'slmkit[data]'") from None
    pf = pq.ParquetFile(f)
    if col not in pf.schema_arrow.names:
        raise SystemExit(f"error: {f} has no column {col!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                         "name the text column with --text-col")
    for batch in pf.iter_batches(columns=[col], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def corpus_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def fingerprint(files: list[Path], extra: str) -> str:
    """Content hash of every input file plus EXTRA (tokenizer, options): the token-cache key."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:24]


def cache_dir(kind: str = "tokens") -> Path:
    """slmkit's cache folder for KIND (tokens: tokenized corpora; teacher: distillation caches)."""
    return Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit")) / kind


def tokenize_to_memmap(files: list[Path], tokenizer, text_col: str = "text", replace_errors: bool = False,
                       skip_bad_lines: bool | None = None) -> tuple[Path, dict]:
    """Tokenize FILES once into a flat token file (EOS before every document); reuse it when content matches.

    Returns the .bin path and its metadata (dtype, token count, byte count).
    """
    from slmkit.model.tokenizer import EOS, encode_plain, tokenizer_fingerprint

    key = fingerprint(files, f"{tokenizer_fingerprint(tokenizer)}|{text_col}|{replace_errors}|{bool(skip_bad_lines)}")
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = out_dir / f"{key}.bin", out_dir / f"{key}.json"
    if bin_path.is_file() and meta_path.is_file():
        return bin_path, json.loads(meta_path.read_text())
    eos = tokenizer.convert_tokens_to_ids(EOS) if EOS in tokenizer.get_vocab() else tokenizer.eos_token_id
    eos = tokenizer.sep_token_id if eos is None else eos  # BERT-style tokenizers separate documents with [SEP]
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    tmp = bin_path.with_suffix(f".tmp-{os.getpid()}")
    n_tokens = n_bytes = n_docs = 0
    with open(tmp, "wb") as out:
        batch: list[tuple[str, bool]] = []

        def flush() -> None:
            nonlocal n_tokens
            for (_, new_doc), ids in zip(batch, encode_plain(tokenizer, [t for t, _ in batch]), strict=True):
                arr = np.asarray(([eos] if new_doc else []) + ids, dtype=dtype)
                out.write(arr.tobytes())
                n_tokens += len(arr)
            batch.clear()

        pending = 0
        for text, new_doc in iter_text_chunks(files, text_col, replace_errors, skip_bad_lines):
            batch.append((text, new_doc))
            n_bytes += len(text.encode("utf-8"))
            n_docs += new_doc
            pending += len(text)
            if pending > 8 * CHUNK_BYTES or len(batch) >= 4096:
                flush()
                pending = 0
        flush()
    if n_tokens == 0 or n_bytes == 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: the data ({', '.join(map(str, files[:3]))}) holds no text")
    os.replace(tmp, bin_path)
    meta = {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs, "dtype": np.dtype(dtype).name,
            "files": [str(f) for f in files]}
    meta_path.write_text(json.dumps(meta))
    return bin_path, meta


def load_tokens(bin_path: Path, meta: dict) -> np.ndarray:
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")


def default_val_tokens(n_tokens: int, block_size: int) -> int:
    """The held-out split when --val-fraction is not given: 1% of the tokens, but at least 8 evaluation windows (at
    most 10%). Why not nanoGPT's 10%: the end of a corpus is often the only text of its kind (the last document, the
    last play), and a split taken from the end removes it from training. On tiny Shakespeare that tail is the start
    of the play the benchmark's held-out text continues; holding out 10% cost 0.2 bits/byte there, 1% cost 0.03
    (docs/benchmarks.md). 1% still leaves a corpus of a few MB thousands of held-out tokens to measure with."""
    return max(n_tokens // 100, min(n_tokens // 10, 8 * (block_size + 1)))


def split_tokens(tokens: np.ndarray, val_fraction: float | None, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out split from the END of the data: VAL_FRACTION of it, or `default_val_tokens` when None."""
    n_val = default_val_tokens(len(tokens), block_size) if val_fraction is None else int(len(tokens) * val_fraction)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if len(train) <= block_size + 1:
        raise SystemExit(f"error: the corpus has {len(tokens):,} tokens, too few for --block-size {block_size} "
                         f"(need more than {block_size + 1} for training); add data or lower --block-size")
    if n_val > 0 and len(val) <= block_size + 1:
        raise SystemExit(f"error: the held-out split has {len(val):,} tokens, too few for --block-size {block_size}; "
                         "raise --val-fraction, add data, or lower --block-size")
    return train, val


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator,
              device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (nanoGPT-style, `--sampling random`). The generator's state is the data position: saving it
    resumes exactly."""
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=gen).tolist()
    return batch_at(tokens, ix, block_size, device)


def batch_at(tokens: np.ndarray, ix: list[int], block_size: int, device: str = "cpu") -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Inputs and next-token targets of the windows of TOKENS that start at IX: (B, T) each."""
    rows = np.stack([tokens[i:i + block_size + 1] for i in ix]).astype(np.int64)  # (B, T+1)
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]  # (B, T), (B, T)
    if device != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def epoch_windows(n_tokens: int, block_size: int, seed: int, epoch: int) -> np.ndarray:
    """Start offsets of one shuffled pass over N_TOKENS in windows of BLOCK_SIZE + 1 tokens: every window once, in a
    random order, at a random phase, so window edges move from pass to pass. Both come from (SEED, EPOCH) alone.

    The pass holds one window fewer than fits, which leaves room to shift the phase by up to a whole block."""
    n = max(1, (n_tokens - 1) // block_size - 1)
    slack = n_tokens - 1 - n * block_size  # >= 1 whenever n_tokens > block_size + 1, as split_tokens guarantees
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    # slack < 0 only for a stream shorter than one window (a small packed chat set): one window, at 0, cut short
    phase = int(torch.randint(max(0, min(slack, block_size)) + 1, (1,), generator=g))
    return phase + block_size * torch.randperm(n, generator=g).numpy()


def epoch_rows(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """One shuffled pass over N_ROWS examples (e.g. conversations): every row once, in an order from (SEED, EPOCH)."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()


class EpochSampler:
    """Training windows (or rows) drawn without replacement (`--sampling epoch`): pass after pass over the data, the
    pass's order from ORDER(epoch), e.g. `partial(epoch_windows, n_tokens, block_size, seed)`, instead of independent
    random draws that see some windows three times and others not at all in a pass. On tiny Shakespeare at ~8 passes
    it lowered the held-out loss by 0.03-0.04 bits/byte over two seeds at equal steps (docs/benchmarks.md).

    Every rank shuffles the same way and takes its own slice of each global batch, so data-parallel ranks never
    repeat each other. The whole state is DRAWN, the items taken by all ranks so far: a checkpoint saves it and a
    resumed run takes the items the uninterrupted one would have."""

    def __init__(self, order: Callable[[int], np.ndarray], rank: int = 0, world: int = 1, drawn: int = 0):
        self.order, self.rank, self.world, self.drawn = order, rank, world, drawn
        # one pass's offsets in memory: 8 bytes a window, ~1% of a token file of 2-byte tokens in 256-token windows
        self._epoch, self._items = 0, order(0)
        self.per_epoch = len(self._items)

    def take(self, batch_size: int) -> list[int]:
        """This rank's BATCH_SIZE items of the next global batch (BATCH_SIZE x world items)."""
        first = self.drawn + self.rank * batch_size
        ix = []
        for i in range(first, first + batch_size):
            epoch, k = divmod(i, self.per_epoch)
            if epoch != self._epoch:
                self._epoch, self._items = epoch, self.order(epoch)
            ix.append(int(self._items[k]))
        self.drawn += batch_size * self.world
        return ix


def eval_windows(tokens: np.ndarray, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows covering TOKENS (evenly thinned to MAX_WINDOWS)."""
    starts = np.arange(0, len(tokens) - block_size - 1, block_size)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(np.int64)]
    return starts
