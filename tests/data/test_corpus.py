import json
from functools import partial

import numpy as np
import pytest
import torch

from slmkit.data.corpus import (
    EpochSampler,
    batch_at,
    epoch_rows,
    epoch_windows,
    expand_paths,
    get_batch,
    iter_text_chunks,
    split_tokens,
    tokenize_to_memmap,
)
from slmkit.model.tokenizer import byte_tokenizer


def test_reads_txt_jsonl_csv_parquet_dirs_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file\n")
    (tmp_path / "b.md").write_text("# markdown\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "json row"}) + "\n\n" + json.dumps({"text": "row 2"}) + "\n")
    (tmp_path / "d.csv").write_text('body,label\n"csv, with comma",1\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["parquet row"]}), tmp_path / "e.parquet")
    files = expand_paths([str(tmp_path / "*.txt"), tmp_path / "b.md", tmp_path / "c.jsonl"])
    assert [f.name for f in files] == ["a.txt", "b.md", "c.jsonl"]
    texts = [t for t, _ in iter_text_chunks(files)]
    assert texts == ["plain text file\n", "# markdown\n", "json row", "row 2"]
    tables = [t for t, _ in iter_text_chunks(expand_paths([tmp_path / "d.csv", tmp_path / "e.parquet"]), "body")]
    assert tables == ["csv, with comma", "parquet row"]
    assert len(expand_paths([tmp_path])) == 5


def test_tokens_are_cached_by_content(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hello world " * 100)
    tok = byte_tokenizer()
    p1, meta = tokenize_to_memmap([f], tok)
    p2, _ = tokenize_to_memmap([f], tok)
    assert p1 == p2 and meta["tokens"] == 1200 + 1 and meta["bytes"] == 1200  # +1: the document separator
    f.write_text("hello there " * 100)
    p3, _ = tokenize_to_memmap([f], tok)
    assert p3 != p1


def test_large_text_streams_in_chunks_without_splitting_lines(tmp_path, monkeypatch):
    import slmkit.data.corpus as data

    monkeypatch.setattr(data, "CHUNK_BYTES", 64)
    f = tmp_path / "big.txt"
    lines = [f"line number {i} with some words" for i in range(50)]
    f.write_text("\n".join(lines))
    chunks = list(iter_text_chunks([f]))
    assert len(chunks) > 5 and chunks[0][1] and not any(new for _, new in chunks[1:])
    assert "".join(t for t, _ in chunks) == "\n".join(lines)


def test_batches_are_shifted_windows_and_split_takes_the_end():
    import torch

    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, 16)
    assert len(val) == 100 and val[0] == 900
    x, y = get_batch(train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and int(y.max()) < 900


@pytest.mark.parametrize("n_tokens,block", [(1000, 16), (1001, 16), (50, 16), (18, 16)])
def test_an_epoch_is_every_window_once_at_a_moving_phase(n_tokens, block):
    """One window fewer than fits, each once, all in range (a window is BLOCK + 1 tokens), in a shuffled order; the
    phase and order change from epoch to epoch and depend on (seed, epoch) alone."""
    passes = [epoch_windows(n_tokens, block, seed=3, epoch=e) for e in range(8)]
    n = max(1, (n_tokens - 1) // block - 1)
    for starts in passes:
        assert len(starts) == n and len(set(starts.tolist())) == n
        assert starts.min() >= 0 and starts.max() + block + 1 <= n_tokens
        assert len(set((starts % block).tolist())) == 1  # one phase: windows tile the pass without overlapping
    assert np.array_equal(passes[0], epoch_windows(n_tokens, block, seed=3, epoch=0))
    if n > 1:
        assert not np.array_equal(passes[0], epoch_windows(n_tokens, block, seed=4, epoch=0))
        assert len({int(p[0] % block) for p in passes}) > 1  # the phase moves
        assert len({tuple(np.argsort(p).tolist()) for p in passes}) > 1  # and the order changes


def test_epoch_sampler_splits_ranks_and_resumes_from_its_count():
    """A pass visits every window once, across epoch boundaries too; two ranks take disjoint halves of what one
    process would take; a sampler rebuilt from DRAWN continues exactly."""
    n_tokens, block = 1000, 16
    per_epoch = len(epoch_windows(n_tokens, block, 0, 0))  # 61
    one = EpochSampler(partial(epoch_windows, n_tokens, block, 0))
    taken = [one.take(5) for _ in range(30)]  # 150 windows: two passes and a bit
    flat = [i for batch in taken for i in batch]
    assert sorted(flat[:per_epoch]) == sorted(epoch_windows(n_tokens, block, 0, 0).tolist())
    assert sorted(flat[per_epoch:2 * per_epoch]) == sorted(epoch_windows(n_tokens, block, 0, 1).tolist())
    assert one.drawn == 150
    ranks = [EpochSampler(partial(epoch_windows, n_tokens, block, 0), rank=r, world=2) for r in range(2)]
    both = [[i for _ in range(15) for i in s.take(5)] for s in ranks]
    assert not set(both[0][:per_epoch // 2]) & set(both[1][:per_epoch // 2])
    assert both[0][:5] + both[1][:5] == flat[:10] and ranks[0].drawn == ranks[1].drawn == 150
    again = EpochSampler(partial(epoch_windows, n_tokens, block, 0), drawn=70)
    assert again.take(5) == flat[70:75]
    x, y = batch_at(np.arange(n_tokens, dtype=np.uint16), flat[:3], block)
    assert x.shape == (3, block) and x[:, 0].tolist() == flat[:3] and torch.equal(x[:, 1:], y[:, :-1])


def test_rows_pass_once_each_and_a_short_stream_gives_one_window():
    """Chat examples (finetune --task sft): every row once a pass, a new order each pass. A packed stream shorter
    than one window still yields its one window, at 0."""
    rows = EpochSampler(partial(epoch_rows, 10, 5))
    taken = [i for _ in range(5) for i in rows.take(4)]  # 20 rows: two passes
    assert sorted(taken[:10]) == sorted(taken[10:]) == list(range(10)) and taken[:10] != taken[10:]
    assert epoch_windows(20, 64, seed=0, epoch=3).tolist() == [0]


def test_default_split_is_one_percent_with_a_floor_of_eight_blocks():
    big = np.arange(1_000_000, dtype=np.uint32)
    train, val = split_tokens(big, None, 256)
    assert len(val) == 10_000 and val[0] == 990_000 and len(train) == 990_000
    small = np.arange(20_000, dtype=np.uint16)  # 1% would be 200 tokens, fewer than one block: 8 blocks instead
    assert len(split_tokens(small, None, 64)[1]) == 8 * 65
    tiny = np.arange(3_000, dtype=np.uint16)  # 8 blocks would be 17%: capped at 10%
    assert len(split_tokens(tiny, None, 64)[1]) == 300


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"good text \xff\xfe bad", "not valid UTF-8 at byte offset 10"),
])
def test_bad_text_files_are_named_with_the_problem(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        list(iter_text_chunks(expand_paths([f])))


def test_replace_errors_keeps_going(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good \xff text")
    assert [t for t, _ in iter_text_chunks([f], replace_errors=True)] == ["good \ufffd text"]


def test_table_errors_name_the_column_and_line(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_text('{"body": "a"}\n')
    with pytest.raises(SystemExit, match=r"x.jsonl:1: no 'text' field"):
        list(iter_text_chunks([j]))
    j.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(SystemExit, match=r"x.jsonl:2: malformed JSON"):
        list(iter_text_chunks([j]))
    c = tmp_path / "x.csv"
    c.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="has no column 'text'"):
        list(iter_text_chunks([c]))
    with pytest.raises(SystemExit, match="does not exist"):
        expand_paths([tmp_path / "missing.txt"])


def test_a_bad_jsonl_line_advises_skip_bad_lines_only_where_the_verb_has_it(tmp_path, capsys):
    """`slm train` has no --skip-bad-lines (its error must not advise it); `slm eval` has it, for text JSONL too."""
    from slmkit.__main__ import main as slm
    from slmkit.data.corpus import tokenize_to_memmap
    from slmkit.model.tokenizer import byte_tokenizer

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a good row of text"}\n{"text": broken\n{"text": "another good row"}\n')
    with pytest.raises(SystemExit) as e:
        tokenize_to_memmap([data], byte_tokenizer())
    assert "rows.jsonl:2: malformed JSON" in e.value.code and "--skip-bad-lines" not in e.value.code
    assert slm(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--steps", "1"]) == 1
    assert "--skip-bad-lines" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="fix the line or pass --skip-bad-lines"):
        tokenize_to_memmap([data], byte_tokenizer(), skip_bad_lines=False)
    path, meta = tokenize_to_memmap([data], byte_tokenizer(), skip_bad_lines=True)
    assert "rows.jsonl:2: skipped" in capsys.readouterr().err and meta["tokens"] > 30
