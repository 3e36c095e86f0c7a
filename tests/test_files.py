"""Nothing overwritten or lost: files.check_out / replace_dir, and every verb that writes an output refusing the
current folder, its own inputs and existing outputs (without --overwrite) in one line, before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import tiny_llama_folder, write_chats

from slmkit.__main__ import main as slm
from slmkit.files import check_out, replace_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("files") / "model", seed=3)


def refused(capsys, *argv) -> str:
    """Run `slm ARGV` in process; it must fail with exactly one line on stderr, returned."""
    assert slm([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def listing(path: Path) -> dict[str, bytes]:
    """Every file under PATH with its bytes: to show nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- the rule itself ---------------------------------------------------------------------------------------------

def test_check_out_never_allows_the_current_folder_a_parent_or_an_input(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (Path("."), Path(".."), work, tmp_path):
        with pytest.raises(SystemExit, match="current folder or a parent"):
            check_out(out, overwrite=True)
    with pytest.raises(SystemExit, match="input src"):
        check_out(Path("src"), overwrite=True, sources=[Path("src")])
    with pytest.raises(SystemExit, match="input"):  # a folder holding the input is refused too
        check_out(Path("src"), overwrite=True, sources=[Path("src/deep/data.txt")])
    check_out(Path("src/new-model"), overwrite=False, sources=[Path("src")])  # writing beside an input is fine


def test_check_out_asks_for_overwrite_and_the_right_kind_of_path(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.gguf").write_bytes(b"x")
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        check_out(tmp_path / "full", overwrite=False)
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        check_out(tmp_path / "a.gguf", overwrite=False, kind="file")
    with pytest.raises(SystemExit, match="is a folder; give a file path"):
        check_out(tmp_path / "empty", overwrite=True, kind="file")
    with pytest.raises(SystemExit, match="is a file; give a folder path"):
        check_out(tmp_path / "a.gguf", overwrite=True)
    check_out(tmp_path / "empty", overwrite=False)  # an empty folder (made by the user for it) is fine
    check_out(tmp_path / "full", overwrite=True)


def test_replace_dir_swaps_whole_folders_and_restores_the_old_one_on_failure(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, out)
    assert listing(out) == {"new.txt": b"new"} and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old folder is gone, nothing left aside
    other = tmp_path / "other"
    other.mkdir()
    real_replace = os.replace

    def fail_second(src, dst):  # the rename of the new folder fails: the old one must come back
        if Path(src) == other:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        replace_dir(other, out)
    assert listing(out) == {"new.txt": b"new"}


# --- every verb ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ("export", "{model}", "--format", "hf", "--out", "."),
    ("export", "{model}", "--format", "onnx", "--out", ".."),
    ("export", "{model}", "--format", "hf", "--out", "{model}", "--overwrite"),
    ("export", "{model}", "--format", "gguf", "--out", "{model}", "--overwrite"),
    ("quantize", "{model}", "--out", ".", "--overwrite"),
    ("quantize", "{model}", "--out", "{model}", "--overwrite"),
    ("import", "{model}", "--out", "{model}", "--overwrite"),
    ("train", "--data", "{data}", "--out", ".", "--overwrite", "--steps", "1"),
    ("train", "--data", "{data}", "--out", "{data}", "--overwrite", "--steps", "1"),
    ("finetune", "{model}", "--data", "{data}", "--out", "{model}", "--overwrite", "--steps", "1"),
    ("distill", "--teacher", "{model}", "--data", "{data}", "--out", "{model}", "--overwrite", "--steps", "1"),
    ("quickstart", "--out", ".", "--overwrite"),
    ("cascade", "{model}", "{model}", "--calibrate", "{data}", "--out", "{model}", "--overwrite"),
])
def test_no_verb_writes_over_the_current_folder_or_its_input(argv, model, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's notes\n" * 200)
    monkeypatch.chdir(work)
    before_model, before_work = listing(model), listing(work)
    err = refused(capsys, *(a.format(model=model, data=work / "notes.txt") for a in argv))
    assert any(w in err for w in ("current folder", "input", "must differ")), err
    assert listing(model) == before_model and listing(work) == before_work


@pytest.mark.parametrize("verb", ["export-hf", "export-onnx", "export-gguf", "quantize", "import", "embed", "bench"])
def test_an_existing_output_needs_overwrite(verb, model, tmp_path, capsys):
    is_file = verb in ("export-gguf", "embed", "bench")
    out = tmp_path / {"export-gguf": "out.gguf", "embed": "out.npy", "bench": "out.md"}.get(verb, "out")
    if is_file:
        out.write_bytes(b"the user's file")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("the user's file")
    argv = {"export-hf": ("export", model, "--format", "hf"), "export-onnx": ("export", model, "--format", "onnx"),
            "export-gguf": ("export", model, "--format", "gguf"), "quantize": ("quantize", model),
            "import": ("import", model), "embed": ("embed", model, "--data", model / "config.json"),
            "bench": ("bench", model)}[verb]
    before = listing(tmp_path)
    assert "pass --overwrite" in refused(capsys, *argv, "--out", out)
    assert listing(tmp_path) == before


def test_export_gguf_refuses_a_modelfile_it_did_not_write_and_replaces_with_overwrite(model, tmp_path, capsys):
    (tmp_path / "Modelfile").write_text("FROM llama3\n")
    assert "Modelfile" in refused(capsys, "export", model, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert (tmp_path / "Modelfile").read_text() == "FROM llama3\n" and not (tmp_path / "m.gguf").exists()
    assert slm(["export", str(model), "--format", "gguf", "--quant", "f32", "--no-verify", "--out",
                str(tmp_path / "m.gguf"), "--overwrite"]) == 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf")


def test_a_failed_export_leaves_nothing_behind(model, tmp_path, capsys, monkeypatch):
    """The runtime's check fails (here: forced): no GGUF, no Modelfile and no temporary file remain."""
    import slmkit.edge.export_gguf as export_gguf

    def diverges(path, *args, **kwargs):
        assert Path(path).is_file() and Path(path).name.startswith(".m.gguf.tmp")  # the check reads the temp file
        raise SystemExit(f"error: {path}: llama.cpp's logits differ at position 3")

    monkeypatch.setattr(export_gguf, "verify_gguf", diverges)
    assert "logits differ" in refused(capsys, "export", model, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_hf_with_overwrite_replaces_only_its_own_output(model, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    (tmp_path / "beside.txt").write_text("untouched")
    assert slm(["export", str(model), "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside.txt", "hf"]


def test_quickstart_replaces_its_own_folder_but_not_a_users(tmp_path, capsys, monkeypatch):
    from slmkit.training.quickstart import corpus_dir, previous_quickstart

    data = corpus_dir()
    qs = tmp_path / "slm-quickstart"
    qs.mkdir()
    (qs / "config.json").write_text("{}")
    (qs / "training_summary.json").write_text(json.dumps({"data": [str(data)]}))
    assert previous_quickstart(qs, data)
    (qs / "my-notes.txt").write_text("mine")  # the user's file in it: no longer only a quickstart's
    assert not previous_quickstart(qs, data)
    assert "not a quickstart model folder; pass --overwrite" in refused(capsys, "quickstart", "--out", qs)
    assert (qs / "my-notes.txt").read_text() == "mine"
    other = tmp_path / "trained"
    tiny_llama_folder(other)
    (other / "training_summary.json").write_text(json.dumps({"data": ["/my/corpus"]}))
    assert not previous_quickstart(other, data)


def test_merge_refuses_its_adapter_and_base_as_out(tmp_path, capsys):
    pytest.importorskip("peft")
    from slmkit.training.finetune import main as finetune

    base = tiny_llama_folder(tmp_path / "base")
    chats = write_chats(tmp_path / "chats.jsonl")
    finetune(base, [str(chats)], tmp_path / "adapter", task="sft", lora=True, lora_r=2, steps=1, batch_size=2,
             block_size=64, warmup=0, eval_every="1000", progress=False)
    capsys.readouterr()
    before = listing(tmp_path)
    for out in (tmp_path / "adapter", base):
        assert "input" in refused(capsys, "merge", tmp_path / "adapter", "--out", out, "--overwrite")
    assert listing(tmp_path) == before


def test_a_run_that_fails_before_training_leaves_no_folder_behind(model, tmp_path, capsys):
    """The corpus is too small / a JSONL row is malformed: found after OUT was made; OUT must not stay behind."""
    (tmp_path / "tiny.txt").write_text("hello world\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a good row"}\n{"text": bro\n')
    refused(capsys, "train", "--data", tmp_path / "tiny.txt", "--out", tmp_path / "m1", "--steps", "1")
    refused(capsys, "finetune", model, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "m2", "--steps", "1")
    refused(capsys, "distill", "--teacher", model, "--data", tmp_path / "tiny.txt", "--out", tmp_path / "m3",
            "--student", "slm-tiny", "--steps", "1")
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3"))
    (tmp_path / "m4").mkdir()  # a folder the user made stays, failed run or not
    refused(capsys, "train", "--data", tmp_path / "tiny.txt", "--out", tmp_path / "m4", "--steps", "1")
    assert (tmp_path / "m4").is_dir()
