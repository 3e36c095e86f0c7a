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
    assert rows[0]["torch_imported"] is True  # the torch worker times slm generate's loop
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


def test_llama_cpp_and_onnx_workers_never_import_torch_and_report_medians(tmp_path):
    """Each worker runs in a fresh process; what it reports about its own sys.modules is the proof."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from slmkit.edge.bench import run_one
    from slmkit.edge.export import main as export

    src = tiny_llama_folder(tmp_path / "fp32", seed=4)
    export(src, tmp_path / "m.gguf", format="gguf", quant="f32", verify=False)
    export(src, tmp_path / "onnx", format="onnx", verify=False)
    for target in (tmp_path / "m.gguf", tmp_path / "onnx"):
        row = run_one(target, threads=1, memory_cap=None, new_tokens=4, data=None, ppl_tokens=64, repeats=3)
        assert "error" not in row, row
        assert row["torch_imported"] is False, row["backend"]
        assert row["repeats"] == 3 and len(row["decode_tok_s_runs"]) == 3
        assert row["decode_tok_s"] == sorted(row["decode_tok_s_runs"])[1]  # the median of three


def test_timed_takes_medians_after_a_warm_up():
    from slmkit.edge.bench import timed

    calls, speeds = [], iter([0.5, 0.1, 0.3])  # per-token seconds of the three timed runs

    def decode(ids, n):
        calls.append(n)
        if len(calls) == 1:  # the warm-up: slow and untimed
            return 9.0, [9.0] * n
        s = next(speeds)
        return 2 * s, [s] * n

    r = timed(decode, [1, 2, 3, 4], 10, 3)
    assert calls == [8, 10, 10, 10]
    assert r["decode_tok_s"] == pytest.approx(1 / 0.3) and r["prefill_tok_s"] == pytest.approx(4 / 0.6)
    assert r["p50_ms"] == pytest.approx(300) and r["p95_ms"] == pytest.approx(500)


def test_nll_sum_is_cross_entropy():
    import numpy as np
    import torch

    from slmkit.edge.bench import nll_sum

    logits = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32) * 4
    targets = [1, 0, 10, 3, 3]
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.tensor(targets),
                                                 reduction="sum").item()
    assert nll_sum(logits, targets) == pytest.approx(expected, rel=1e-12)
