import json
import subprocess
import sys

import pytest

from slmkit.__main__ import VERBS


def _slm(*args):
    return subprocess.run([sys.executable, "-m", "slmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_top_level_help_lists_every_verb():
    r = _slm("--help")
    assert r.returncode == 0
    for verb in VERBS:
        assert verb in r.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb):
    r = _slm(verb, "--help")
    assert r.returncode == 0 and f"usage: slm {verb}" in r.stdout
    assert r.stdout.count("--") >= 2


def test_unknown_verb_fails():
    assert _slm("bogus").returncode == 2


def test_eval_json_has_the_contract_keys(tiny_model, corpus):
    r = _slm("eval", tiny_model, "--data", corpus, "--json", "--max-tokens", "2000")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert 0 < result["bits_per_byte"] < 8 and result["tokens"] > 0


def test_info_reports_parameters(tiny_model):
    r = _slm("info", tiny_model, "--json")
    assert json.loads(r.stdout)["parameters"] > 0
    r = _slm("info", "--preset", "slm-1m", "--json")
    assert json.loads(r.stdout)["parameters"] == 1_000_576


def test_generate_streams_text(tiny_model):
    r = _slm("generate", tiny_model, "--prompt", "ROMEO:", "--max-new-tokens", "10", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:") and "tokens/s" in r.stderr


def test_expected_mistakes_are_one_line_without_traceback(tmp_path):
    r = _slm("train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "m")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _slm("eval", tmp_path, "--data", tmp_path / "nope.txt")
    assert r.returncode == 1 and "not a model folder" in r.stderr
    r = _slm("train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "m", "--preset", "slm-huge")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1


def test_chat_uses_the_template_and_exits_on_eof(tiny_model):
    r = subprocess.run([sys.executable, "-m", "slmkit", "chat", str(tiny_model), "--max-new-tokens", "5",
                        "--seed", "0"], input="hello\n/quit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "model>" in r.stdout and "chat template" in r.stderr
