"""The cascade (slmkit.compose.cascade*): calibration maths, `slm cascade`, the verbs on a cascade folder, and
`slm serve` answering through one, on tiny models written on the fly (no training: seconds)."""

import json
import shutil

import pytest
import torch
from tiny_encoders import tiny_base_folder, tiny_bert_config, toy_rows, wordpiece, write_csv
from tiny_models import CHATS, tiny_llama_folder, write_chats

from slmkit.__main__ import main as slm
from slmkit.compose.cascade import fit_temperature, load_cascade, mean_logprob, pick, rouge_l, sweep
from slmkit.compose.cascade_cli import main as build

# -- calibration maths ---------------------------------------------------------------------------------------------


def test_sweep_and_pick_match_a_hand_computed_curve():
    import numpy as np

    conf = np.array([0.9, 0.6, 0.3, 0.8])
    small_q, large_q = np.array([1.0, 0.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])
    points = sweep(conf, small_q, large_q)  # escalating 0, 1, 2, 3, 4 rows, least confident first
    assert [p["escalation_rate"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [p["quality"] for p in points] == [0.5, 0.5, 0.75, 0.75, 0.75]
    assert [p["threshold"] for p in points[:4]] == [0.3, 0.6, 0.8, 0.9] and points[4]["threshold"] > 0.9
    # the fewest escalations reaching the large model's 0.75: escalate the two least confident rows
    assert pick(points, 0.75, None, 1.0) == points[2]
    # at most 30% escalated: 0 or 1 rows give the same 0.5, so escalate none
    assert pick(points, 0.75, 0.3, None) == points[0]
    with pytest.raises(SystemExit, match="no threshold reaches --min-quality 1.5"):
        pick(points, 0.75, None, 1.5)


def test_tied_confidences_are_never_split():
    import numpy as np

    points = sweep(np.array([0.5, 0.5, 0.9]), np.array([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0]))
    assert [p["escalation_rate"] for p in points] == [0.0, 2 / 3, 1.0]


def test_fit_temperature_undoes_overconfidence():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, 5, generator=g) * 2
    y = torch.multinomial(torch.softmax(true, -1), 1, generator=g)[:, 0]
    assert fit_temperature(true * 3, y) == pytest.approx(3.0, rel=0.1)  # 3x too sharp -> T ~ 3
    assert fit_temperature(true, y) == pytest.approx(1.0, rel=0.1)


def test_rouge_l_f1():
    assert rouge_l("The cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat sat", "the cat") == pytest.approx(0.8)  # P 2/3, R 1
    assert rouge_l("dogs bark", "the cat") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


# -- classifier cascades ---------------------------------------------------------------------------------------------
def linear_classifier(path, tok, texts, direction: torch.Tensor):
    """A tiny random BERT whose head scores texts along DIRECTION of its pooled features, centred and scaled on
    TEXTS so that its predictions split and its confidences spread (no training)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    cfg = tiny_bert_config(tok, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    m = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        f = m.bert(**tok(texts, padding=True, return_tensors="pt")).pooler_output  # (N, C)
        r = direction / f.std(0)
        k = 3 / ((f - f.mean(0)) @ r).std()
        m.classifier.weight.copy_(torch.stack([-k * r, k * r]))
        b = float(k * (f.mean(0) @ r))
        m.classifier.bias.copy_(torch.tensor([b, -b]))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """SMALL and LARGE classifiers and labelled data whose labels are LARGE's answers (LARGE: accuracy 1), SMALL a
    noisy copy of LARGE's direction: right where it is sure, unsure where it is wrong, as a cascade wants."""
    from slmkit.infer.classify import predict

    d = tmp_path_factory.mktemp("clf")
    tok = wordpiece()
    texts = [t for t, _ in toy_rows(120, seed=3)]
    g = torch.Generator().manual_seed(1)
    big = torch.randn(32, generator=g)
    linear_classifier(d / "large", tok, texts, big)
    linear_classifier(d / "small", tok, texts, big + 0.8 * torch.randn(32, generator=g))
    labels = [top[0][0] for top in predict(d / "large", texts)]
    return {"dir": d, "cal": write_csv(d / "cal.csv", list(zip(texts[:80], labels[:80], strict=True))),
            "test": write_csv(d / "test.csv", list(zip(texts[80:], labels[80:], strict=True))), "texts": texts}


def run_json(capsys, *argv) -> list[dict]:
    capsys.readouterr()
    assert slm(list(map(str, argv))) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_classifier_cascade_reaches_the_large_model_and_eval_reproduces_calibration(clf, capsys):
    d = clf["dir"]
    spec = build(d / "small", str(d / "large"), clf["cal"], d / "casc", min_quality=1.0)
    cal = spec["calibration"]
    assert cal["large"] == 1.0 and 0.5 < cal["small"] < 1.0  # the fixture's intent
    assert cal["cascade"] == 1.0 and 0 < cal["escalation_rate"] < 1  # fewer escalations than "all"
    saved = json.loads((d / "casc" / "cascade.json").read_text())
    assert saved["small"] == "../small" and saved["kind"] == "classifier" and saved["temperature"] > 0
    assert (d / "casc" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    points = json.loads((d / "casc" / "curve.json").read_text())["points"]
    assert points[0]["escalation_rate"] == 0.0 and points[-1]["escalation_rate"] == 1.0
    # slm eval on the calibration data makes the same decisions: the same accuracy and escalation rate
    (r,) = run_json(capsys, "eval", d / "casc", "--data", clf["cal"], "--json")
    assert r["accuracy"] == pytest.approx(cal["cascade"]) and r["escalation_rate"] == pytest.approx(
        cal["escalation_rate"])
    split = r["per_model"]
    assert split["small"]["n"] + split["large"]["n"] == 80 and split["large"]["accuracy"] == 1.0
    assert split["large"]["n"] == round(cal["escalation_rate"] * 80) and split["small"]["model"] == "small"


def test_classify_says_which_model_answered_and_escalates_below_the_threshold(clf, capsys):
    from slmkit.infer.classify import predict

    d = clf["dir"]
    build(d / "small", str(d / "large"), clf["cal"], d / "casc2", max_escalation=0.5)
    rows = run_json(capsys, "classify", d / "casc2", "--data", clf["test"], "--json", "--top-k", "2")
    threshold = json.loads((d / "casc2" / "cascade.json").read_text())["threshold"]
    texts = [r["text"] for r in rows]
    large = predict(d / "large", texts, top_k=2)
    for r, big in zip(rows, large, strict=True):
        assert r["model"] == ("large" if r["confidence"] < threshold else "small") and len(r["labels"]) == 2
        if r["model"] == "large":  # the large model's own answer, scores included
            assert [(x["label"], x["score"]) for x in r["labels"]] == [(a, pytest.approx(b)) for a, b in big]
        else:  # the small model's calibrated probability is the confidence that decided
            assert r["labels"][0]["score"] == pytest.approx(r["confidence"])
    assert {r["model"] for r in rows} == {"small", "large"}


def test_a_large_model_behind_a_url_calibrates_and_answers_as_the_local_folder_does(clf, tmp_path, capsys):
    from tiny_server import running, serve_folders

    d = clf["dir"]
    local = build(d / "small", str(d / "large"), clf["cal"], tmp_path / "local", max_escalation=0.5)
    with running(serve_folders({"big": d / "large"})) as url:
        remote = build(d / "small", url, clf["cal"], tmp_path / "remote", max_escalation=0.5, large_model="big")
        assert remote["large"] == url and remote["threshold"] == local["threshold"]
        assert remote["calibration"]["cascade"] == local["calibration"]["cascade"]
        rows = run_json(capsys, "classify", tmp_path / "remote", "--data", clf["test"], "--json")
        want = run_json(capsys, "classify", tmp_path / "local", "--data", clf["test"], "--json")
    assert [(r["model"], r["labels"][0]["label"]) for r in rows] == [(r["model"], r["labels"][0]["label"])
                                                                      for r in want]
    assert any(r["model"] == "large" for r in rows)
    with pytest.raises(SystemExit) as e:  # the server is gone: escalated rows cannot be answered
        from slmkit.compose.cascade_verbs import classify

        classify(tmp_path / "remote", data=clf["test"])
    assert "the cascade's large model" in str(e.value) and url in str(e.value)


def test_cascade_refuses_bad_input_in_one_line(clf, tmp_path):
    d = clf["dir"]
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        build(d / "small", str(d / "large"), clf["cal"], d / "casc")
    shutil.copytree(d / "large", tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "spam", "1": "ham"}, {"spam": 0, "ham": 1}
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="different label sets"):
        build(d / "small", str(tmp_path / "other"), clf["cal"], tmp_path / "c1")
    with pytest.raises(SystemExit, match="not both"):
        build(d / "small", str(d / "large"), clf["cal"], tmp_path / "c2", max_escalation=0.3, min_quality=0.9)
    with pytest.raises(SystemExit, match=r"127\.0\.0\.1:9/v1/classify cannot be reached .* is the server running"):
        build(d / "small", "http://127.0.0.1:9", clf["cal"], tmp_path / "c3", large_model="x")
    with pytest.raises(SystemExit, match="is an encoder without a classifier head"):
        build(tiny_base_folder(tmp_path / "enc", wordpiece()), str(d / "large"), clf["cal"], tmp_path / "c4")
    assert not any((tmp_path / c).exists() for c in ("c1", "c3", "c4"))


@pytest.mark.parametrize("kind, flag, value", [
    ("classifier", "max_new_tokens", 32), ("classifier", "skip_bad_lines", True), ("classifier", "timeout", 5.0),
    ("classifier", "large_model", "big"), ("decoder", "text_col", "body"), ("decoder", "batch_size", 8),
    ("decoder", "max_length", 64), ("decoder", "api_key_env", "KEY")])
def test_a_flag_this_cascade_would_not_read_is_refused_before_calibrating(clf, dec, tmp_path, kind, flag, value):
    """--max-new-tokens on classifiers, --text-col/--batch-size/--max-length on decoders and the URL settings with a
    local large model were accepted and dropped."""
    d, data = (clf["dir"], clf["cal"]) if kind == "classifier" else (dec["dir"], dec["chats"])
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to a"):
        build(d / "small", str(d / "large"), data, tmp_path / "c", **{flag: value})
    assert not (tmp_path / "c").exists()


# -- decoder cascades ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dec(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    tiny_llama_folder(d / "small", seed=0)
    tiny_llama_folder(d / "large", seed=1)
    return {"dir": d, "chats": write_chats(d / "chats.jsonl", CHATS, repeat=1)}


def set_threshold(folder, value: float) -> None:
    spec = json.loads((folder / "cascade.json").read_text())
    spec["threshold"] = value
    (folder / "cascade.json").write_text(json.dumps(spec))


def test_mean_logprob_is_the_mean_of_the_answer_tokens_log_probabilities(dec):
    from slmkit.infer.generate import load

    lm = load(dec["dir"] / "small")
    prompt, answer = lm.encode("the cat sat"), lm.encode(" on the mat")
    want = []
    for i in range(len(answer)):  # token by token, one forward pass per prefix (no graph: inference only)
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + answer[:i]]))[0, -1]
        want.append(float(torch.log_softmax(logits.float(), -1)[answer[i]]))
    assert mean_logprob(lm, prompt, answer) == pytest.approx(sum(want) / len(want), abs=1e-4)


def test_decoder_cascade_generates_with_the_model_its_confidence_picks(dec, capsys):
    from slmkit.infer.generate import load

    d = dec["dir"]
    spec = build(d / "small", str(d / "large"), dec["chats"], d / "casc", max_escalation=0.5, max_new_tokens=6)
    assert spec["kind"] == "decoder" and spec["calibration"]["quality"] == "rouge_l_f1"
    assert spec["calibration"]["escalation_rate"] <= 0.5
    greedy = ["--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "5", "--json"]
    set_threshold(d / "casc", -1e9)  # never unsure: the small model answers
    (r,) = run_json(capsys, "generate", d / "casc", *greedy)
    assert r["model"] == "small" and r["confidence"] <= 0
    assert {"prompt", "text", "tokens", "seconds", "first_token_seconds", "tokens_per_s"} <= set(r)
    assert r["text"] == load(d / "small").generate("the cat", max_new_tokens=5, temperature=0)
    set_threshold(d / "casc", 1.0)  # a mean log-prob is <= 0: always escalated
    (r,) = run_json(capsys, "generate", d / "casc", *greedy)
    assert r["model"] == "large"
    assert r["text"] == load(d / "large").generate("the cat", max_new_tokens=5, temperature=0)


def test_chat_through_a_cascade_shows_the_answering_model_and_survives_a_failed_escalation(dec, capsys,
                                                                                           monkeypatch):
    from slmkit.compose.cascade_verbs import chat

    d = dec["dir"]
    build(d / "small", str(d / "large"), dec["chats"], d / "casc-chat", max_new_tokens=4)
    spec = json.loads((d / "casc-chat" / "cascade.json").read_text())
    spec.update(large="http://127.0.0.1:9", large_model="gone", threshold=-1e9)
    (d / "casc-chat" / "cascade.json").write_text(json.dumps(spec))
    capsys.readouterr()
    lines = iter(["hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat(d / "casc-chat", max_new_tokens=3, temperature=0)
    out = capsys.readouterr()
    assert out.out.startswith("model> ") and "[small: small]" in out.err
    set_threshold(d / "casc-chat", 1.0)  # every reply escalated to a URL nobody serves: one line, then go on
    lines = iter(["hello", "again", "/quit"])
    chat(d / "casc-chat", max_new_tokens=3, temperature=0)
    err = capsys.readouterr().err
    assert err.count("error: the cascade's large model: http://127.0.0.1:9/v1/chat/completions cannot be") == 2


def test_eval_on_a_decoder_cascade_scores_each_conversation_with_the_model_it_goes_to(dec, capsys):
    d = dec["dir"]
    build(d / "small", str(d / "large"), dec["chats"], d / "casc-eval", max_new_tokens=4)
    alone = {who: run_json(capsys, "eval", d / who, "--data", dec["chats"], "--json")[0] for who in ("small", "large")}
    for threshold, who in ((-1e9, "small"), (1.0, "large")):
        set_threshold(d / "casc-eval", threshold)
        (r,) = run_json(capsys, "eval", d / "casc-eval", "--data", dec["chats"], "--json")
        assert r["loss"] == pytest.approx(alone[who]["loss"], rel=1e-5) and r["tokens"] == alone[who]["tokens"]
        assert r["escalation_rate"] == (1.0 if who == "large" else 0.0) and r["per_model"][who]["n"] == len(CHATS)
    spec = json.loads((d / "casc-eval" / "cascade.json").read_text())
    spec["threshold"] = sorted(json.loads((d / "casc-eval" / "curve.json").read_text())["points"],
                               key=lambda p: p["escalation_rate"])[2]["threshold"]  # two of four escalated
    (d / "casc-eval" / "cascade.json").write_text(json.dumps(spec))
    (r,) = run_json(capsys, "eval", d / "casc-eval", "--data", dec["chats"], "--json")
    split = r["per_model"]
    assert r["escalation_rate"] == 0.5 and split["small"]["n"] == split["large"]["n"] == 2
    mixed = (split["small"]["loss"] * split["small"]["tokens"] + split["large"]["loss"] * split["large"]["tokens"])
    assert r["loss"] == pytest.approx(mixed / r["tokens"])


def test_eval_on_a_decoder_cascade_honours_block_size_and_refuses_what_it_cannot_use(dec, capsys):
    """--block-size was dropped (each model's whole context scored) while build_examples' note advised raising it;
    --max-tokens, --threads and the decoding flags of generate/chat were dropped too."""
    from slmkit.compose.cascade_verbs import chat, generate

    d = dec["dir"]
    build(d / "small", str(d / "large"), dec["chats"], d / "casc-flags", max_new_tokens=4)
    set_threshold(d / "casc-flags", -1e9)  # the small model scores everything
    short = ["--data", dec["chats"], "--block-size", "60", "--json"]
    (r,) = run_json(capsys, "eval", d / "casc-flags", *short)
    (alone,) = run_json(capsys, "eval", d / "small", *short)
    (whole,) = run_json(capsys, "eval", d / "casc-flags", "--data", dec["chats"], "--json")
    assert r["tokens"] == alone["tokens"] < whole["tokens"] and r["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert slm(["eval", str(d / "casc-flags"), "--data", str(dec["chats"]), "--max-tokens", "50"]) == 1
    assert "--max-tokens does not apply to `slm eval` on chat JSONL" in capsys.readouterr().err
    for flag, value in (("compile", True), ("dtype", "bf16"), ("draft", d / "small"), ("draft_tokens", 3)):
        with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to a cascade"):
            generate(d / "casc-flags", prompt="hi", **{flag: value})
        if flag != "dtype":  # chat has no --dtype
            with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to a cascade"):
                chat(d / "casc-flags", **{flag: value})
    before = torch.get_num_threads()
    try:  # --threads was dropped too: now both models decode with it
        generate(d / "casc-flags", prompt="hi", max_new_tokens=2, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- serve -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(clf, dec, tmp_path_factory):
    """A server with a classifier cascade and a decoder cascade whose large model is an unreachable URL."""
    from tiny_server import running, serve_folders

    d = tmp_path_factory.mktemp("served")
    build(clf["dir"] / "small", str(clf["dir"] / "large"), clf["cal"], d / "ccasc", max_escalation=0.5)
    build(dec["dir"] / "small", str(dec["dir"] / "large"), dec["chats"], d / "dcasc", max_new_tokens=4)
    spec = json.loads((d / "dcasc" / "cascade.json").read_text())
    spec.update(large="http://127.0.0.1:9/v1", large_model="gone")  # nothing listens on port 9
    (d / "dcasc" / "cascade.json").write_text(json.dumps(spec))
    app = serve_folders({"ccasc": d / "ccasc", "dcasc": d / "dcasc"})
    app.state.models["dcasc"].cascade.large.remote.backoff = 0.01
    with running(app) as url:
        yield url, app


def test_serve_cascade_through_the_openai_client_and_an_unreachable_large_model(served):
    import httpx
    import openai

    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    cascade = app.state.models["dcasc"].cascade
    cascade.threshold = 1.0  # every answer escalated: to a URL nobody serves
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="dcasc", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 502 and "127.0.0.1:9/v1/chat/completions cannot be reached" in str(e.value)
    cascade.threshold = -1e9  # the small model keeps answering
    raw = client.chat.completions.with_raw_response.create(
        model="dcasc", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    reply = raw.parse()
    assert reply.model == "dcasc/small" and raw.headers["x-slm-model"] == "dcasc/small"
    streamed = client.chat.completions.create(model="dcasc", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    text = client.completions.create(model="dcasc", prompt="the cat", max_tokens=3, temperature=0)
    assert text.model == "dcasc/small" and isinstance(text.choices[0].text, str)
    prom = httpx.get(url + "/metrics").text  # the failed escalation is counted, as are the small answers
    assert 'slm_cascade_answers_total{model="dcasc",answered_by="large_failed"} 1' in prom
    assert 'slm_cascade_answers_total{model="dcasc",answered_by="small"} 3' in prom
    assert 'slm_cascade_escalations_total{model="dcasc"} 1' in prom


def test_serve_classifier_cascade_rows_and_metrics(served, clf):
    import httpx

    url, app = served
    threshold = app.state.models["ccasc"].cascade.threshold
    r = httpx.post(url + "/v1/classify", json={"model": "ccasc", "input": clf["texts"][80:100]}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    models = [row["model"] for row in body["data"]]
    assert set(models) <= {"ccasc/small", "ccasc/large"} and body["model"] == r.headers["x-slm-model"]
    escalated = models.count("ccasc/large")
    assert 0 < escalated < 20  # the calibrated threshold splits these texts (max-escalation 0.5 on similar ones)
    direct = app.state.models["ccasc"].cascade.classify(clf["texts"][80:100])
    for row, c in zip(body["data"], direct, strict=True):
        assert row["model"] == f"ccasc/{c['model']}" and (c["confidence"] < threshold) == (c["model"] == "large")
    prom = httpx.get(url + "/metrics").text
    assert f'slm_cascade_escalations_total{{model="ccasc"}} {escalated}' in prom


def test_load_cascade_names_a_missing_model_folder(clf, tmp_path):
    build(clf["dir"] / "small", str(clf["dir"] / "large"), clf["cal"], tmp_path / "a" / "casc")
    shutil.copytree(tmp_path / "a" / "casc", tmp_path / "moved")  # ../../small is not next to it any more
    with pytest.raises(SystemExit, match="model folder .* does not exist; move it back or rebuild"):
        load_cascade(tmp_path / "moved")
