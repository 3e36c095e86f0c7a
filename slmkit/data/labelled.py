"""data.labelled."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

MAX_LABELS = 1000  # more distinct values than this is almost surely a text or id column, not labels


COLUMNED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # files with named fields; the rest: one text a line


def read_rows(path: Path, columns: dict[str, str]) -> list[tuple]:
    """Rows of PATH as tuples (line number, value of each column). COLUMNS maps column name -> the flag naming it.

    CSV/TSV (header row), JSONL (one object per line) and Parquet; plain .txt/.md files count as one text per line
    when only a text column is asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist")
    try:
        return _read_rows(path, columns)
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason}, byte 0x{e.object[e.start]:02x}); re-encode "
                         "it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_rows(path: Path, columns: dict[str, str]) -> list[tuple]:
    names, suffix = list(columns), path.suffix.lower()

    def missing(col: str, where: str, have) -> SystemExit:
        return SystemExit(f"error: {where}: no {col!r} column (columns: {', '.join(map(str, have)) or 'none'}); "
                          f"name it with {columns[col]}")

    rows: list[tuple] = []
    if suffix in (".jsonl", ".json"):
        from slmkit.data.corpus import iter_jsonl

        for lineno, row in iter_jsonl(path):
            for col in names:
                if not isinstance(row, dict) or col not in row:
                    raise missing(col, f"{path}:{lineno}", row if isinstance(row, dict) else [])
            rows.append((lineno, *(row[c] for c in names)))
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for col in names:
                if col not in (reader.fieldnames or []):
                    raise missing(col, str(path), reader.fieldnames or [])
            rows = [(reader.line_num, *(row[c] for c in names)) for row in reader]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("error: reading Parquet needs pyarrow: pip install 'slmkit[data]'") from None
        table = pq.read_table(path)
        for col in names:
            if col not in table.column_names:
                raise missing(col, str(path), table.column_names)
        cols = [table.column(c).to_pylist() for c in names]
        rows = [(i + 1, *vals) for i, vals in enumerate(zip(*cols, strict=True))]
    elif len(names) == 1:  # plain text: one example per non-empty line
        if names[0] != "text":  # a column named for a file that has none would be dropped without a word
            raise SystemExit(f"error: {columns[names[0]]} does not apply to {path}: a plain text file holds one text "
                             "per line; drop it or give CSV, TSV, JSONL or Parquet")
        with open(path, encoding="utf-8", errors="strict") as fh:
            rows = [(i, line.rstrip("\n")) for i, line in enumerate(fh, 1) if line.strip()]
    else:
        raise SystemExit(f"error: {path} is plain text; labelled data must be CSV, TSV, JSONL or Parquet with "
                         f"columns {' and '.join(map(repr, names))}")
    if not rows:
        raise SystemExit(f"error: {path} holds no rows")
    return rows


def read_texts(path: Path, text_col: str = "text") -> list[str]:
    """The text column (or the lines of a text file), refusing empty texts with the line that holds one."""
    return [_text(t, path, line, text_col) for line, t in read_rows(path, {text_col: "--text-col"})]


def read_labelled(path: Path, text_col: str = "text", label_col: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from PATH, with one-line errors for missing columns and empty cells."""
    texts, labels = [], []
    for line, text, label in read_rows(path, {text_col: "--text-col", label_col: "--label-col"}):
        texts.append(_text(text, path, line, text_col))
        if label is None or str(label).strip() == "":
            raise SystemExit(f"error: {path}:{line}: empty label in column {label_col!r}; fill it or drop the row")
        labels.append(str(label).strip())
    return texts, labels


def _text(value, path: Path, line: int, col: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SystemExit(f"error: {path}:{line}: empty text in column {col!r}; fill it or drop the row")
    return value


def discover_labels(labels: list[str], path: Path, label_col: str) -> list[str]:
    """The sorted label set (numerically when every label is an integer); refuse one label or a non-label column."""
    distinct = set(labels)
    if len(distinct) < 2:
        raise SystemExit(f"error: {path}: column {label_col!r} has a single label ({next(iter(distinct))!r}); "
                         "classification needs at least two")
    if len(distinct) > MAX_LABELS or (len(labels) >= 50 and len(distinct) > len(labels) / 2):
        raise SystemExit(f"error: {path}: column {label_col!r} has {len(distinct):,} distinct values in "
                         f"{len(labels):,} rows: probably not a label column (the text, or an id?); pick the label "
                         "column with --label-col")
    numeric = all(s.lstrip("-").isdigit() for s in distinct)
    return sorted(distinct, key=(lambda s: (int(s), s)) if numeric else None)


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): about FRACTION of each label held out, at least one of any label with 2+."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for idx in by_label.values():
        idx = rng.permutation(idx)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        held += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def read_labelled_files(paths: list, text_col: str, label_col: str, allowed: list[str],
                        what: str) -> tuple[list[str], list[str]]:
    """Texts and labels of every file in PATHS, each label one of ALLOWED: the first other is one line naming the file
    and WHAT the labels are (e.g. "route", "router's routes")."""
    texts, labels = [], []
    for path in paths:
        t, ls = read_labelled(Path(path), text_col, label_col)
        unknown = sorted(set(ls) - set(allowed))
        if unknown:
            raise SystemExit(f"error: {path}: {what[0]} {unknown[0]!r} is not one of the {what[1]} "
                             f"({', '.join(allowed[:20])}); check --label-col or the data")
        texts += t
        labels += ls
    return texts, labels
