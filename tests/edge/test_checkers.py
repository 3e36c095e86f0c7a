"""Runtime parity checks run in a child process: a runtime that crashes there (a signal) leaves the export in place,
marked unverified, with one line naming the runtime, the signal and the fix; a real mismatch is still an error."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from tiny_models import tiny_llama_folder

from slmkit.__main__ import main as cli
from slmkit.edge.runtimes import CRASH_HOOK, Crash, run_probe


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("checkers") / "model", seed=7)


def test_a_gguf_checker_killed_by_sigsegv_keeps_the_file_marked_unverified(model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv(CRASH_HOOK, "SIGSEGV")  # the child segfaults as a natively built llama.cpp does on AMX
    out = tmp_path / "m-q8_0.gguf"
    assert cli(["export", str(model), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert "not verified: llama.cpp crashed (SIGSEGV)" in lines[0]
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in lines[0]
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "Modelfile").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_the_summary_says_unverified_and_why(model, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from slmkit.edge.export import main as export

    monkeypatch.setenv(CRASH_HOOK, "SIGABRT")
    summary = export(model, tmp_path / "m.gguf", format="gguf", quant="f16")
    assert summary["verified"] is False and "llama.cpp crashed (SIGABRT)" in summary["reason"]
    assert "top1_agreement" not in summary
    monkeypatch.delenv(CRASH_HOOK)
    summary = export(model, tmp_path / "m.gguf", format="gguf", quant="f16", overwrite=True)
    assert summary["verified"] is True and "reason" not in summary and summary["top1_agreement"] == 1.0


def test_an_onnx_checker_crash_is_written_into_the_folder_metadata(model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv(CRASH_HOOK, "SIGSEGV")
    out = tmp_path / "onnx"
    assert cli(["export", str(model), "--format", "onnx", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "not verified: onnxruntime crashed (SIGSEGV)" in line
    meta = json.loads((out / "slmkit_onnx.json").read_text())
    assert meta["verified"] is False and "onnxruntime crashed (SIGSEGV)" in meta["reason"]
    assert (out / "model.onnx").is_file()


def test_a_verified_onnx_export_says_so_in_its_metadata(model, tmp_path):
    pytest.importorskip("onnxruntime")
    from slmkit.edge.export import main as export

    assert export(model, tmp_path / "onnx", format="onnx")["verified"] is True
    assert json.loads((tmp_path / "onnx" / "slmkit_onnx.json").read_text())["verified"] is True


def test_run_probe_names_the_signal(model, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from slmkit.edge.export import main as export

    export(model, tmp_path / "m.gguf", format="gguf", quant="f32", verify=False)
    spec = {"path": str(tmp_path / "m.gguf"), "n_ctx": 64, "text": "hello", "ids": [1, 2, 3], "threads": 1}
    monkeypatch.setenv(CRASH_HOOK, "SIGBUS")
    crash = run_probe("llama.cpp", spec)
    assert isinstance(crash, Crash) and crash.what == signal.Signals.SIGBUS.name
    monkeypatch.delenv(CRASH_HOOK)
    got = run_probe("llama.cpp", spec)
    assert got["logits"].shape[0] == 3 and got["tokens"].ndim == 1


def test_a_runtime_that_refuses_the_file_is_an_error_not_a_crash(tmp_path):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SystemExit, match=r"^error: .*bad.gguf: llama.cpp cannot run it \(.*\); please report"):
        run_probe("llama.cpp", {"path": str(bad), "n_ctx": 64, "text": "x", "ids": [1], "threads": 1})
