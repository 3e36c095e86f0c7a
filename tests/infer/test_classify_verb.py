import pytest

from slmkit.infer.classify import texts_to_classify


def test_text_col_is_refused_with_a_single_text(tmp_path):
    """--text-col names a --data file's column: with --text it was dropped without a word."""
    with pytest.raises(SystemExit, match="^error: --text-col does not apply to --text"):
        texts_to_classify("a text", None, "body", 1, 32, None)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "first"}\n{"body": "second"}\n')
    assert texts_to_classify(None, rows, "body", 1, 32, None) == ["first", "second"]
    assert texts_to_classify("a text", None, "text", 1, 32, None) == ["a text"]


def test_text_col_is_refused_for_a_plain_text_file(tmp_path):
    """A .txt file holds one text per line: --text-col named a column it does not have, and was dropped."""
    lines = tmp_path / "texts.txt"
    lines.write_text("first\nsecond\n")
    with pytest.raises(SystemExit, match="^error: --text-col does not apply to .*texts.txt: a plain text file"):
        texts_to_classify(None, lines, "body", 1, 32, None)
    assert texts_to_classify(None, lines, "text", 1, 32, None) == ["first", "second"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_labelled_data_that_is_not_utf8_is_one_line(suffix, tmp_path):
    from slmkit.data.labelled import read_texts

    bad = tmp_path / f"texts{suffix}"
    body = {".txt": b"caf\xe9 au lait\n", ".csv": b"text,label\ncaf\xe9,a\n", ".jsonl": b'{"text": "caf\xe9"}\n'}
    bad.write_bytes(body[suffix])
    with pytest.raises(SystemExit, match=r"^error: .*texts\..*: not UTF-8 text .*byte 0xe9.*re-encode"):
        read_texts(bad)
