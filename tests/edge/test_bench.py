"""slm bench: one subprocess per backend, a markdown table, a PNG chart, the constrained-device options."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_llama_folder

from slmkit.edge.bench import backend_of, markdown, parse_size
from slmkit.edge.bench import main as bench


def test_parse_size():
    assert parse_size("512M") == 512 * 2**20 and parse_size("2g") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(SystemExit, match="not a size"):
        parse_size("lots")
    with pytest.raises(SystemExit, match=r"^error: --memory-cap -5M must be positive"):  # as written, not in bytes
        parse_size("-5M")


def test_bench_profiles_each_backend_and_writes_a_report(tmp_path, corpus, capsys):
    from slmkit.edge.export import main as export
    from slmkit.edge.quantize import main as quantize

    src = tiny_llama_folder(tmp_path / "fp32", seed=4)
    targets = [src, quantize(src, tmp_path / "int8")]  # every process costs seconds: one per kind of backend
    try:
        import llama_cpp  # noqa: F401

        export(src, tmp_path / "m.gguf", format="gguf", quant="q8_0", verify=False)
        targets.append(tmp_path / "m.gguf")
    except ImportError:
        export(src, tmp_path / "onnx", format="onnx", verify=False)
        targets.append(tmp_path / "onnx")
    capsys.readouterr()
    rows = bench(targets, threads=1, memory_cap="4G", new_tokens=4, data=corpus, ppl_tokens=64, as_json=True,
                 out=tmp_path / "report.md")
    assert json.loads(capsys.readouterr().out) == rows
    assert [r["backend"] for r in rows][:2] == ["torch fp32", "torch int8"]
    for r in rows:
        assert "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0 and r["p95_ms"] >= r["p50_ms"] * 0.99
        assert 1 < r["perplexity"] < 1000
    assert rows[1]["size_mb"] < rows[0]["size_mb"]
    for r in rows[1:]:  # every runtime scores the same text about as the float model does (not uniform logits)
        assert abs(r["perplexity"] / rows[0]["perplexity"] - 1) < 0.005, r
    assert "| fp32 | torch fp32 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert markdown([{"target": "x", "backend": "b", "error": "boom"}]).count("boom") == 1


def test_bench_rejects_what_it_cannot_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match="not a GGUF file"):
        backend_of(tmp_path / "notes.txt")
    with pytest.raises(SystemExit, match="does not exist"):
        bench([tmp_path / "missing"])


@pytest.mark.parametrize("setting, message", [
    (dict(new_tokens=0), "--new-tokens 0 must be positive"),  # ZeroDivisionError in the tokens/s cell
    (dict(ppl_tokens=0), "--ppl-tokens 0 must be positive"),
    (dict(memory_cap="0"), "--memory-cap 0 must be positive"),  # quietly meant no limit
    (dict(threads=0), "--threads 0 must be positive")])
def test_bench_names_a_number_that_cannot_profile(setting, message, tmp_path):
    with pytest.raises(SystemExit, match="^error: " + message):
        bench([tmp_path / "missing"], **setting)
